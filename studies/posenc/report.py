"""The results page of the positional-encoding study: one section per study (the lead one first, then
the earlier ones whose records the page keeps), each with its tables, verdicts, plots and answer.

:func:`write_page` writes ``<page>.md``, ``<page>.json`` (every section's run records, FD-emoji sanity
checks, stage times and :class:`PageInfo`: a page is rebuilt from it alone with ``studies/posenc/run.py
--stage report --from-json``) and ``<page>_<plan>_*.png`` beside it. Every number comes from the
records; the verdicts are :mod:`studies.posenc.study`'s rule and the answers :mod:`studies.posenc.answer`'s.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import plots
from .answer import has_with_without, held_claims, names_text, quality_metrics, section_claims
from .everysize import grid_seed, md_table, sizes_section
from .study import (
    CLOCKS,
    SIZE_METRICS,
    WITH_WITHOUT,
    add_oracle_ratios,
    best_scalings,
    fmt_pm,
    get,
    mean_sd,
    per_encoding,
    ranking_by_step,
    size_records,
    verdict,
)

ROOT = Path(__file__).resolve().parents[2]
SETTING = (64, 4)  # the problem statement's image size and patch: 16x16 = 256 tokens, 320 with the condition
README_BEGIN = "<!-- answer: written by studies/posenc/run.py --readme (edits here are overwritten) -->"
README_BEGIN_PREFIX = "<!-- answer:"
README_END = "<!-- /answer -->"


@dataclass
class PageInfo:
    """What a section says about its study beside the records: how it was made and on what. Kept in the
    page's JSON, so a page rebuilt from it says the same."""

    plan: str  # the plan's name (the pictures' file names carry it)
    config: str  # the training config, as shown
    img_size: int
    patch_size: int
    cond_img_size: Optional[int]
    null_cond: str  # what stands for no condition image: "absent" (no tokens) or null tokens
    width: int
    depth: int
    heads: int
    in_context: int
    steps: int
    batch: int
    lr: Optional[float]
    names: List[str]  # encodings of the main ablation, in order
    n_per_class: int
    sample_steps: int
    step_n_per_class: int
    res_n_per_class: int
    machine: str
    device: str
    jobs: int
    out_dir: str
    runs_command: str  # the command that trains and evaluates the runs
    regimes: Dict[str, str] = field(default_factory=dict)  # regime -> how it trains (one line)
    regime_notes: Dict[str, str] = field(default_factory=dict)  # regime -> what some encodings do otherwise
    trained_sizes: Dict[str, List[Tuple[int, int]]] = field(default_factory=dict)
    study_sizes: List[Tuple[int, int]] = field(default_factory=list)  # of the every-size study
    step_time: Optional[Dict[str, Any]] = None  # the plan's measured step time (seconds, clock, measured_by, note)
    placement: Dict[str, str] = field(default_factory=dict)  # encoding -> where it puts the condition tokens
    setting_runs: Dict[str, str] = field(default_factory=dict)  # "cpu" / "gpu" -> the command of the 64x64 plans
    earlier: Optional[str] = None  # results JSON of a shorter ablation (its other encodings' rows are shown)
    earlier_label: str = ""  # e.g. "300 steps, 2 seeds"
    previous: Optional[str] = None  # results JSON of an older single-seed ablation, shown at the end

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def n_cond(self) -> int:
        return 0 if self.cond_img_size is None else (self.cond_img_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        """Image and condition tokens with a condition image."""
        return self.grid**2 + self.n_cond

    @property
    def tokens_without(self) -> int:
        """... without one: the image's alone when null_cond is absent, else null tokens in their place."""
        return self.grid**2 if self.null_cond == "absent" else self.tokens

    @property
    def short(self) -> str:
        return f"{self.img_size}x{self.img_size}"

    @property
    def title(self) -> str:
        tokens = f"{self.grid**2} -> {self.tokens} tokens" if self.n_cond else f"{self.grid**2} tokens"
        return f"{self.short} at patch {self.patch_size}, {tokens}"

    @property
    def is_setting(self) -> bool:
        return (self.img_size, self.patch_size) == SETTING

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PageInfo:
        d = dict(d)
        d["trained_sizes"] = {g: [tuple(s) for s in v] for g, v in (d.get("trained_sizes") or {}).items()}
        d["study_sizes"] = [tuple(s) for s in d.get("study_sizes") or []]
        return cls(**d)


@dataclass
class Section:
    """One study on the page: its :class:`PageInfo`, run records, FD-emoji sanity checks, stage times."""

    info: PageInfo
    rows: List[Dict[str, Any]]
    sanity: Dict[str, Any]
    timing: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.rows]
        return {
            "plan": self.info.plan,
            "info": self.info.to_json(),
            "runs": rows,
            "fd_sanity": dict(self.sanity),
            "timing": dict(self.timing),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Section:
        return cls(PageInfo.from_json(d["info"]), list(d["runs"]), dict(d["fd_sanity"]), dict(d.get("timing") or {}))


def read_page_json(path) -> Dict[str, Any]:
    """A page's JSON: ``{"sections": [...]}`` (this version), or the one-study JSON of older pages
    (``{"runs", "fd_sanity", "timing", "study": {"scale", "out_dir"}}``), which has no :class:`PageInfo`."""
    d = json.loads(Path(path).read_text())
    if not isinstance(d, Mapping) or not ("sections" in d or "runs" in d):
        raise ValueError(f"{path}: not a results JSON (no 'sections', no 'runs')")
    return d


@dataclass
class Prepared:
    """What a section is written from: the main ablation's records, its encodings and seeds, the
    every-size records and the sizes they cover (in page order), and the rows of the earlier ablations."""

    main: List[Dict[str, Any]]
    names: List[str]
    seeds: List[int]
    flat: List[Dict[str, Any]]
    sizes: List[Tuple[int, int]]
    earlier: List[Dict[str, Any]]
    previous: Optional[List[Dict[str, Any]]]


def _size_order(sizes) -> List[Tuple[int, int]]:
    return sorted({tuple(s) for s in sizes}, key=lambda hw: (hw[0] * hw[1], hw[0] != hw[1], hw))


def json_runs(path: Optional[str]) -> Optional[List[Dict[str, Any]]]:
    """The run records of a results JSON (a path in the repository): its ``runs``, or the list it is."""
    if not path:
        return None
    d = json.loads((ROOT / path).read_text())
    return d if isinstance(d, list) else d["runs"]


def prepare(sec: Section) -> Prepared:
    info, rows = sec.info, sec.rows
    main = [r for r in rows if r.get("regime", "single") == "single" and r["pos_embed"] in info.names and "vloss" in r]
    if not main:
        raise ValueError(f"{info.plan}: no evaluated run of the main ablation to report")
    names = [n for n in info.names if any(r["pos_embed"] == n for r in main)]
    px = info.img_size
    flat = size_records([r for r in rows if r.get("resolution")], px)
    add_oracle_ratios(flat, info.trained_sizes, list(info.trained_sizes) or ["single"])
    have = [tuple(x["hw"]) for x in flat]  # the study's sizes, and the training size wherever it has numbers
    want = [tuple(s) for s in info.study_sizes]
    sizes = _size_order([s for s in want if s in have] + [s for s in have if s == (px, px)] if want else have)
    earlier = [r for r in json_runs(info.earlier) or [] if r["pos_embed"] not in info.names]
    return Prepared(main, names, sorted({r["seed"] for r in main}), flat, sizes, earlier, json_runs(info.previous))


def draw(sec: Section, prep: Prepared, out: Path) -> Dict[str, str]:
    """The section's pictures beside the page, ``<page>_<plan>_<what>.png``; returns their names by what."""
    P = plots.Plots(out.with_suffix("").with_name(f"{out.stem}_{sec.info.plan}"))
    plots.plot_loss(P, prep.main, prep.names)
    plots.plot_bars(
        P, prep.main, prep.names, [m for m in quality_metrics(prep.main) if m.path != ("final_train_loss",)]
    )
    if any((r.get("fd_vs_step") or {}).get("steps") for r in prep.main):
        plots.plot_fd_steps(P, prep.main, prep.names, sec.info.step_n_per_class)
    if prep.flat:
        combos = size_combos(prep)
        plots.plot_sizes(P, prep.flat, prep.sizes, combos, sec.info.img_size)
        plots.plot_size_samples(P, sec.rows, prep.flat, prep.sizes, combos, grid_seed(prep.flat))
    return P.files


def size_combos(prep: Prepared) -> Dict[str, Dict[Tuple[str, str], str]]:
    """Per every-size metric, the best scaling mode of each encoding and regime."""
    combos = {key: best_scalings(prep.flat, key, lower, prep.sizes) for key, _, _, lower in SIZE_METRICS}
    combos["vloss_ratio"] = combos["vloss"]  # the oracle does not depend on the mode; ratios exist at a few sizes
    return combos


# ----------------------------------------------------------------------------------- a section
def _setup(info: PageInfo, prep: Prepared) -> List[str]:
    g, r0 = info.grid, prep.main[0]
    cond = ""
    if info.n_cond:
        cg = info.cond_img_size // info.patch_size
        c = info.cond_img_size
        cond = f", plus a {c}x{c} condition image ({cg}x{cg} grid): {g * g} -> {info.tokens} tokens; without one, "
        cond += (
            f"no condition tokens (`null_cond: absent`): {g * g}"
            if info.null_cond == "absent"
            else f"{info.n_cond} null condition tokens (`null_cond: {info.null_cond}`)"
        )
    params = next((r["params"] for r in prep.main if r.get("params")), None)
    L = [
        "### Setup",
        "",
        f"- Config `{info.config}`: {info.short} emoji at patch {info.patch_size} ({g}x{g} grid, {g * g} tokens"
        f"{cond}), class labels, width {info.width}, depth {info.depth}, {info.heads} heads, {info.in_context} "
        "in-context tokens" + ("" if params is None else f", {params / 1e6:.2f}M parameters") + ".",
        f"- {info.steps} training steps per run, batch {info.batch}, AdamW lr {info.lr}, {len(info.names)} encodings x "
        f"seeds {prep.seeds}: the same data, data order, steps, batch, optimizer and seed for every encoding (the seed "
        "changes initialisation and data order together). Only `model.pos_embed` differs.",
    ]
    if "vloss" in r0:
        L.append(
            f"- Evaluation of the EMA weights at step {info.steps}: held-out v-loss at t = "
            f"{', '.join(f'{t:g}' for t in r0['vloss']['t'])} with fixed noise ({r0['vloss']['n_images']} "
            f"held-out images), with the condition image and without it; {r0.get('class_samples', {}).get('n', 0)} "
            f"class-conditional samples ({info.n_per_class} per class, no condition) and "
            f"{r0.get('cond_samples', {}).get('n', 0)} condition-image samples, Heun {info.sample_steps} steps, "
            f"CFG {r0.get('sampling', {}).get('cfg')}."
        )
    n_seeds = ", ".join(f"`{n}` {len([r for r in prep.main if r['pos_embed'] == n])}" for n in prep.names)
    L.append(f"- Mean ± sample standard deviation over the seeds (n per encoding: {n_seeds}); machine: {info.machine}.")
    return L + [""]


def _real_cell(rows, m) -> str:
    real = {("class_samples", "fd_emoji"): "fd_emoji_real", ("class_samples", "class_acc"): "class_acc_real"}
    key = real.get(tuple(m.path))
    v = next((get(r, ("class_samples", key)) for r in rows if key and get(r, ("class_samples", key)) is not None), None)
    return "-" if v is None else format(v, m.spec)


def _main_table(info: PageInfo, prep: Prepared, files) -> List[str]:
    metrics = quality_metrics(prep.main)
    body = []
    for rows, names, label in ((prep.main, prep.names, ""), (prep.earlier, None, f" ({info.earlier_label})")):
        names = names or [n for n in dict.fromkeys(r["pos_embed"] for r in rows)]
        for n in names:
            cells = [fmt_pm(*mean_sd(per_encoding(rows, names, m.path)[n]), m.spec) for m in metrics]
            params = next((r["params"] for r in rows if r["pos_embed"] == n and r.get("params")), None)
            body.append([f"`{n}`{label}", *cells, "-" if params is None else f"{params / 1e6:.3f}M"])
    if any(_real_cell(prep.main, m) != "-" for m in metrics):
        body.append(["real held-out images", *(_real_cell(prep.main, m) for m in metrics), "-"])
    L = [f"### Results at {info.short}", ""]
    L += md_table(["pos_embed", *(m.label for m in metrics), "params"], body) + [""]
    if prep.earlier:
        L += [
            f"Rows marked ({info.earlier_label}) are the earlier, shorter ablation's: not comparable with the rows "
            "above (fewer steps), and left out of the verdicts below.",
            "",
        ]
    L += ["Verdicts (the rule above):", ""]
    L += ["- " + verdict(per_encoding(prep.main, prep.names, m.path), m.lower, m.spec, m.label) for m in metrics]
    return L + ["", f"![training loss]({files['loss']}) ![metrics]({files['bars']})", ""]


def _with_without(info: PageInfo, prep: Prepared) -> List[str]:
    if not has_with_without(prep.main):
        return []
    w, wo = info.tokens, info.tokens_without
    r0 = prep.main[0]
    L = [
        f"### The {info.grid**2} -> {w} question: with and without the condition image",
        "",
        f"The same models measured with the condition image ({w} tokens) and without it ({wo} tokens"
        + (", no condition tokens at all" if info.null_cond == "absent" else ", null condition tokens")
        + f"). v-loss: the same {r0['vloss']['n_images']} held-out images, t and noise both ways. FD-emoji and class "
        f"accuracy: {r0['cond_samples']['n']} samples given held-out condition images (classes as the held-out split "
        f"has them) against {r0['class_samples']['n']} class samples ({info.n_per_class} per class): both against "
        "the training split's features, but not the same draw of classes. Change: with minus without, per run.",
        "",
    ]
    head, body, verdicts = ["pos_embed"], {n: [f"`{n}`"] for n in prep.names}, []
    for m, without, label in WITH_WITHOUT:
        head += [f"{label}, with ({w})", f"{label}, without ({wo})", "change"]
        per_w, per_wo = per_encoding(prep.main, prep.names, m.path), per_encoding(prep.main, prep.names, without)
        change = {
            n: [a - b for a, b in zip(per_w[n], per_wo[n]) if a is not None and b is not None] for n in prep.names
        }
        for n in prep.names:
            body[n] += [fmt_pm(*mean_sd(v[n]), m.spec) for v in (per_w, per_wo)]
            body[n].append(fmt_pm(*mean_sd(change[n]), "+" + m.spec))
        verdicts += [
            verdict(per_w, m.lower, m.spec, f"{label} with the condition ({w} tokens)"),
            verdict(per_wo, m.lower, m.spec, f"{label} without it ({wo} tokens)"),
            verdict(change, m.lower, m.spec, f"change of {label} with the condition"),
        ]
    L += md_table(head, list(body.values())) + ["", "Verdicts (the rule above):", ""]
    return L + ["- " + v for v in verdicts] + [""]


def _placement(info: PageInfo) -> List[str]:
    if not info.placement:
        return []
    L = [
        "### Where each encoding puts the condition tokens",
        "",
        "Read from the models' own position tables and coordinates (and checked against the rule each line states) "
        "when the page was written:",
        "",
    ]
    return L + [f"- `{n}`: {line}." for n, line in info.placement.items()] + [""]


def _fd_steps(info: PageInfo, prep: Prepared, files) -> List[str]:
    ranks = ranking_by_step(prep.main, prep.names)
    if not ranks:
        return []
    steps = list(ranks)
    L = [
        "### FD-emoji as training goes on",
        "",
        f"FD-emoji of {info.step_n_per_class} samples per class at every checkpoint (mean ± sd over seeds), and the "
        "order of the encodings at each checkpoint (best first): does the ranking change as the models train?",
        "",
    ]
    body = []
    for n in prep.names:
        at = [
            dict(zip(r["fd_vs_step"]["steps"], r["fd_vs_step"]["fd_emoji"])) for r in prep.main if r["pos_embed"] == n
        ]
        body.append([f"`{n}`", *(fmt_pm(*mean_sd([a.get(s) for a in at]), ".3f") for s in steps)])
    body.append(["order", *(" < ".join(ranks[s]) for s in steps)])
    L += md_table(["pos_embed", *(f"step {s}" for s in steps)], body) + [""]
    first, last = ranks[steps[0]], ranks[steps[-1]]
    L.append(
        (
            "The ranking at the last checkpoint is the one at the first."
            if first == last
            else f"The ranking changes: {' < '.join(first)} at step {steps[0]}, {' < '.join(last)} at step {steps[-1]}."
        )
        + (
            " Between the last two checkpoints it " + ("stays." if ranks[steps[-2]] == last else "changes.")
            if len(steps) > 1
            else ""
        )
        + " (Means only: see the spreads in the table.)"
    )
    return L + ["", f"![FD-emoji vs step]({files['fd_steps']})", ""] if "fd_steps" in files else L + [""]


def _sanity(info: PageInfo, prep: Prepared, sanity) -> List[str]:
    px = sanity.get("_featnet_px", info.img_size)
    secs = sanity.get("_featnet_seconds")
    L = [
        f"### FD-emoji's feature network at {px}x{px}: sanity checks",
        "",
        f"The feature network is trained once on the {info.short} training split (input {px}x{px}"
        + ("" if secs is None else f", {secs / 60:.0f} min")
        + ", cached) and judges every sample at that size. Real against real should be near its floor, real against "
        "blurred or noise images far above it, and the Fréchet distance matches its closed form:",
        "",
    ]
    cells = [[k, f"{v:.4f}"] for k, v in sanity.items() if not k.startswith("_")]
    real = next((r for r in prep.main if get(r, ("class_samples", "fd_emoji_real")) is not None), None)
    if real is not None:
        cells.append(
            [
                f"real held-out images, {real['class_samples'].get('n_real', '-')} of them (the evaluation's floor)",
                f"{get(real, ('class_samples', 'fd_emoji_real')):.4f}",
            ]
        )
    return L + md_table(["check", "value"], cells) + [""]


def _times(info: PageInfo, prep: Prepared, rows, timing, sanity) -> List[str]:
    L = ["### Step time and wall time", ""]
    st = info.step_time
    if st and st.get("seconds") is not None:
        unit = "CPU-s" if st.get("clock") == "cpu" else "s"
        scaled = f"; for `{info.config}`: {st['seconds']:.3f} {unit}/step, {st['scaled']}" if st.get("scaled") else ""
        L.append(
            f"Measured before the study: {st.get('measured', st['seconds']):.3f} {unit}/step of `{st.get('config')}` "
            f"({st.get('note') or ''}), with `{st['measured_by']}`{scaled}. In the runs, from their `metrics.jsonl` "
            "(mean ± sd over seeds):"
        )
    else:
        L.append("In the runs, from their `metrics.jsonl` (mean ± sd over seeds):")
    body = [
        [f"`{n}`", *(fmt_pm(*mean_sd(per_encoding(prep.main, prep.names, m.path)[n]), m.spec) for m in CLOCKS)]
        for n in prep.names
    ]
    L += [""] + md_table(["pos_embed", *(m.label for m in CLOCKS)], body) + [""]
    walls = [r["train_wall_s"] for r in rows if r.get("train_wall_s")]
    times = []
    if walls:
        h = sum(walls) / 3600
        times.append(f"training {h:.1f} h of {len(walls)} runs, {info.jobs} at a time (about {h / info.jobs:.1f} h)")
    if timing.get("eval_count"):
        times.append(
            f"evaluation {timing['eval'] / 3600:.1f} h of {timing['eval_count']} evaluations (each one's wall time, "
            "summed; several ran side by side)"
        )
    elif timing.get("eval") is not None:
        times.append(f"evaluation {timing['eval'] / 60:.0f} min")
    if timing.get("sizes") is not None:
        times.append(f"sizes {timing['sizes'] / 60:.0f} min")
    if sanity.get("_featnet_seconds") is not None:
        times.append(f"feature network {sanity['_featnet_seconds'] / 60:.0f} min (once, cached)")
    if times:
        L.append("Times: " + ", ".join(times) + ".")
    if info.device == "cpu":
        L.append(
            "The machine was shared with other jobs, so wall times are only rough; CPU ms/step (one thread) is the "
            "steadier measure."
        )
    return L + [""]


def _limits(info: PageInfo, prep: Prepared, page_has_setting: bool) -> List[str]:
    L = []
    n_train = next((r["featnet"].get("n_train") for r in prep.main if r.get("featnet", {}).get("n_train")), None)
    if info.device == "cpu" and n_train:
        L.append(
            f"Budget: {info.steps} steps of batch {info.batch} are {info.steps * info.batch / n_train:.1f} passes over "
            "the training split, on a 2-core CPU shared with other jobs."
        )
    cpu, gpu = info.setting_runs.get("cpu"), info.setting_runs.get("gpu")
    if not info.is_setting:
        runs = [f"`{c}` on a {what}" for c, what in ((cpu, "CPU"), (gpu, "GPU")) if c]
        where = "the first section of this page" if page_has_setting else f"not on this page yet ({', '.join(runs)})"
        L.append(
            f"Image size: {info.title}, a small JiT; the problem statement's setting, "
            f"{SETTING[0]}x{SETTING[0]} at patch {SETTING[1]} (256 -> 320 tokens), is {where}."
        )
    elif info.device == "cpu":
        L.append(
            f"The problem statement's setting with a JiT shrunk for a CPU (width {info.width}, depth {info.depth}); "
            + (f"its GPU plan `{gpu}` has not run: no GPU was lent." if gpu else "no GPU run of it.")
        )
    return L


def _previous_section(prev: Sequence[Mapping[str, Any]]) -> List[str]:
    """The earlier single-seed, 2000-step CPU ablation, from its JSON."""
    L = [
        "### Earlier run: 2000 steps, one seed",
        "",
        "The first ablation (2000 steps, one seed, config `emoji32_cpu.yaml`, by the ablation script of the time; "
        "formerly `docs/ablation.md`), kept for its longer training. NN class acc: share of samples whose nearest "
        "training image (pixel L2) has the asked class.",
        "",
    ]
    cols = [("vloss", "mean", ".4f"), ("vloss_null_cond", "mean", ".4f")]
    cols += [("class_samples", "nn_class_acc", ".3f"), ("cond_samples", "cond_rms", ".3f")]
    body = [[f"`{r['pos_embed']}`", *(format(r[a][b], spec) for a, b, spec in cols)] for r in prev]
    return L + md_table(["pos_embed", "held-out v-loss", "v-loss, null cond", "NN class acc", "cond RMS"], body) + [""]


def section_lines(sec: Section, prep: Prepared, files, *, claims: Sequence[str], page_has_setting: bool) -> List[str]:
    """One study's part of the page."""
    info = sec.info
    L = [
        f"## {info.title}",
        "",
        f"The `{info.plan}` study: {len(prep.names)} encodings x seeds {'/'.join(map(str, prep.seeds))}, "
        f"{info.steps} steps each ({names_text(prep.names)}).",
        "",
    ]
    L += _setup(info, prep)
    L += _main_table(info, prep, files)
    L += _with_without(info, prep)
    L += _placement(info)
    L += _fd_steps(info, prep, files)
    L += _sanity(info, prep, sec.sanity)
    L += _times(info, prep, sec.rows, sec.timing, sec.sanity)
    if prep.flat:
        L += sizes_section(prep.flat, prep.sizes, size_combos(prep), info, files, info.img_size)
    L += [f"### Answer at {info.short}", ""] + [f"- {c}" for c in claims] + [""]
    L += ["### Limits", ""] + [f"- {x}" for x in _limits(info, prep, page_has_setting)] + [""]
    if prep.previous:
        L += _previous_section(prep.previous)
    return L


# ----------------------------------------------------------------------------------- the page
RULE = [
    "## How to read this page",
    "",
    "- **FD-emoji**: Fréchet distance between the Gaussians fitted to the features of the samples and of the "
    "training split, in a small CNN trained once on the emoji training split at the study's image size with "
    "category and vendor heads (`jitrope/eval/featnet.py`, cached under its config hash). The FID formula in another "
    "network: not comparable with published FIDs. Lower is better; its floor at the sample count is the real "
    "images' value in each section's sanity checks.",
    "- **class acc**: share of samples that the feature network's category head assigns to the asked class.",
    "- **PSNR / SSIM**: condition-image samples (condition = the held-out image downsampled) against that "
    "held-out image.",
    "- **v-loss**: the training objective on held-out images at fixed t and noise, with the condition image "
    "and without it (class only).",
    "- **Verdicts**: best mean; another encoding is *clearly worse* when the gap of the means exceeds the 95% margin "
    "of a two-sided t-test with the **pooled** standard deviation of every encoding (or combination) in the "
    "comparison, `t(0.975, df) * s_p * sqrt(1/n1 + 1/n2)`, where `s_p^2 = sum((n_i - 1) s_i^2) / df` and "
    "`df = sum(n_i - 1)` (4 encodings x 3 seeds: df 8, t 2.31, margin 1.88 s_p); else *within noise*. A spread "
    "from 2 or 3 seeds of one encoding can be tiny by chance; the pooled one does not collapse that way, and t "
    "pays for the few degrees of freedom. The tables show each encoding's own sample sd; each verdict states "
    "its pooled sd, df and margin. Seeds share data order across encodings, and the rule assumes one spread for "
    "all: read *clearly* as indicative.",
    "",
]


def _answer_lines(sections, preps) -> List[str]:
    """The page's answer: the lead section's claims, whether each later section's answer held in it, and
    the later sections' own claims."""
    lead, lp = sections[0], preps[0]
    L = [f"**{lead.info.title}** ({lead.info.steps} steps, seeds {'/'.join(map(str, lp.seeds))}):", ""]
    L += [f"- {c}" for c in section_claims(lp, lead.info)]
    for sec, prep in zip(sections[1:], preps[1:]):
        held = held_claims(lp, lead.info, prep, sec.info)
        if held:
            L += ["", f"- {held[0]}"] + [f"  - {h}" for h in held[1:]]
        L += ["", f"**{sec.info.title}** ({sec.info.steps} steps, seeds {'/'.join(map(str, prep.seeds))}):", ""]
        L += [f"- {c}" for c in section_claims(prep, sec.info)]
    return L + [""]


def _reproduce(sections, command: str, out: Path) -> List[str]:
    L = ["## Reproduce", "", "```", "python scripts/prepare_data.py            # emoji, once"]
    L += [f"{s.info.runs_command}   # the {s.info.short} runs: train, evaluate" for s in sections]
    L += [f"{command}   # this page (and the README's answer) from the records", "```", ""]
    L.append(
        "Stages run one by one with `--stage train|eval|report`; every stage resumes. Runs, logs, checkpoints and "
        "`metrics.jsonl` are in `<out-dir>/seed<k>/<encoding>/` (other regimes in `<out-dir>/<regime>/seed<k>/"
        "<encoding>/`): " + "; ".join(f"{s.info.short}: `{s.info.out_dir}`" for s in sections) + ". Every section's "
        f"records are in `{out.with_suffix('.json').name}`, from which `--stage report --from-json` rebuilds this page."
    )
    return L


def write_page(sections: Sequence[Section], out: Path, *, command: str) -> Path:
    """Write the page ``out`` (Markdown), ``out.json`` and the sections' pictures from their records; the
    first section leads (its answer opens the page), the others follow, each labelled with its size."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    preps = [prepare(s) for s in sections]
    files = [draw(s, p, out) for s, p in zip(sections, preps)]
    has_setting = any(s.info.is_setting for s in sections)
    L = [
        "# Which positional encoding? Results of the ablation",
        "",
        f"Generated by `{command}` (every number and picture on this page comes from the run records; nothing is "
        "typed in by hand). Sections: " + "; ".join(f"{s.info.title} (`{s.info.plan}`)" for s in sections) + ".",
        "",
        "## Answer",
        "",
    ]
    L += _answer_lines(sections, preps)
    L += RULE
    for sec, prep, f in zip(sections, preps, files):
        L += section_lines(sec, prep, f, claims=section_claims(prep, sec.info), page_has_setting=has_setting)
    L += _reproduce(sections, command, out)
    out.write_text("\n".join(L) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"sections": [s.to_json() for s in sections]}, indent=1))
    return out


# ----------------------------------------------------------------------------------- the README's answer
README_METRICS = ("held-out v-loss", "FD-emoji", "class acc", "PSNR (dB)")


def readme_answer(sections: Sequence[Section], page_link: str, command: str) -> List[str]:
    """The README's answer, from the same records and rule as the page: one claim a line (the lead
    section's, whether each later section's answer held, and each later section's first), the lead section's
    main metrics with their seed spread, its limits, and a link ``page_link`` to the page."""
    preps = [prepare(s) for s in sections]
    lead, lp = sections[0], preps[0]
    where = "At the problem statement's setting, " if lead.info.is_setting else ""
    on = "a GPU" if lead.info.device == "cuda" else "a CPU"
    seeds = "/".join(map(str, lp.seeds))
    L = [f"**{where}{lead.info.title}** ({lead.info.steps} steps, seeds {seeds}, on {on}):", ""]
    L += [f"- {c}" for c in section_claims(lp, lead.info)]
    for sec, prep in zip(sections[1:], preps[1:]):
        held = held_claims(lp, lead.info, prep, sec.info)
        changed = [h.split(":", 1)[0] for h in held[1:]]
        if held:
            L.append(f"- {held[0]}")
            L += [f"  - The best-or-within-noise groups differ on: {'; '.join(changed)}."] if changed else []
        L += ["", f"**{sec.info.title}** ({sec.info.steps} steps, seeds {'/'.join(map(str, prep.seeds))}):", ""]
        L += [f"- {c}" for c in section_claims(prep, sec.info)[:1]]  # the rest is on the page
    metrics = [m for m in quality_metrics(lp.main) if m.label in README_METRICS]
    body = [
        [f"`{n}`", *(fmt_pm(*mean_sd(per_encoding(lp.main, lp.names, m.path)[n]), m.spec) for m in metrics)]
        for n in lp.names
    ]
    L += [
        "",
        f"At {lead.info.short}, mean ± standard deviation over the seeds; [{page_link}]({page_link}) has every metric, "
        "the verdict rule, FD-emoji against step, plots and the earlier studies:",
        "",
        *md_table(["pos_embed", *(m.label for m in metrics)], body),
        "",
        "Limits:",
        "",
    ]
    L += [f"- {x}" for x in _limits(lead.info, lp, lead.info.is_setting)]
    return L + ["", f"Written by `{command}`."]


def write_readme_answer(readme: Path, lines: Sequence[str]) -> None:
    """Replace the text between the line that starts with :data:`README_BEGIN_PREFIX` and
    :data:`README_END` in ``readme`` by ``lines`` (the opening line becomes :data:`README_BEGIN`; written to a
    temporary file and renamed, so a failure leaves the README as it was)."""
    readme = Path(readme)
    text = readme.read_text()
    head, begin, tail = split_readme(text, readme)
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(head + README_BEGIN + "\n" + "\n".join(lines).rstrip("\n") + "\n" + README_END + tail)
    tmp.replace(readme)


def split_readme(text: str, where) -> Tuple[str, str, str]:
    """``(before, the answer block, after)`` of a README's text; ``ValueError`` without one opening line
    (starting with :data:`README_BEGIN_PREFIX`) and, after it, one :data:`README_END`."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, x in enumerate(lines) if x.startswith(README_BEGIN_PREFIX)]
    ends = [i for i, x in enumerate(lines) if x.rstrip("\n") == README_END]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise ValueError(f"{where} needs one line {README_BEGIN_PREFIX} ... --> and, after it, one line {README_END!r}")
    s, e = starts[0], ends[0]
    return "".join(lines[:s]), "".join(lines[s + 1 : e]), lines[e][len(README_END) :] + "".join(lines[e + 1 :])
