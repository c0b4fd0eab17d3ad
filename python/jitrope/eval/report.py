"""The results page of the positional-encoding study: Markdown tables, PNG plots and sample panels.

:func:`write_results_page` writes ``<page>.md``, ``<page>.json`` (every run's record, the FD-emoji
sanity checks and the stage times) and ``<page>_*.png`` beside it from the run records of
:func:`jitrope.eval.study.run_record` (or those of a ``results.json`` an earlier page wrote: pages
are regenerated from their JSON alone with ``scripts/ablate_posenc.py --stage report --from-json``).
Every number comes from the records; the verdicts are :mod:`jitrope.eval.study`'s rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .study import (
    across_sizes,
    across_sizes_values,
    add_oracle_ratios,
    best_scalings,
    fmt_pm,
    get,
    mean_sd,
    per_encoding,
    ranking_by_step,
    size_label,
    size_records,
    size_stats,
    top_group,
    verdict,
)

__all__ = [
    "METRIC_COLS",
    "SIZE_METRICS",
    "README_BEGIN",
    "README_END",
    "PageInfo",
    "md_table",
    "answer_sentences",
    "write_results_page",
    "readme_answer",
    "write_readme_answer",
]

METRIC_COLS = [  # key path, header, format, lower is better
    (("final_train_loss",), "final train loss", ".4f", True),
    (("vloss", "mean"), "held-out v-loss", ".4f", True),
    (("vloss_null_cond", "mean"), "v-loss, null cond", ".4f", True),
    (("class_samples", "fd_emoji"), "FD-emoji", ".3f", True),
    (("class_samples", "class_acc"), "class acc", ".3f", False),
    (("cond_samples", "psnr"), "PSNR (dB)", ".2f", False),
    (("cond_samples", "ssim"), "SSIM", ".3f", False),
    (("step_ms",), "step (ms)", ".0f", True),
    (("cpu_ms",), "CPU ms/step", ".0f", True),
]
N_QUALITY = 7  # the first columns measure the model; the rest, the machine

SIZE_METRICS = [  # key, label, format, lower is better
    ("fd_emoji", "FD-emoji", ".3f", True),
    ("class_acc", "class acc", ".3f", False),
    ("vloss", "held-out v-loss", ".4f", True),
    ("vloss_ratio", "v-loss / oracle", ".3f", True),
]


@dataclass
class PageInfo:
    """What the page says about the study beside the records: how it was made and on what."""

    command: str  # the command that regenerates the page
    config: str  # the training config, as shown
    img_size: int
    patch_size: int
    cond_img_size: Optional[int]
    width: int
    depth: int
    heads: int
    in_context: int
    steps: int
    batch: int
    lr: Optional[float]
    names: Sequence[str]  # encodings of the main ablation, in order
    n_per_class: int
    sample_steps: int
    step_n_per_class: int
    res_n_per_class: int
    machine: str
    device: str
    jobs: int
    out_dir: str
    regimes: Mapping[str, str] = field(default_factory=dict)  # regime -> how it trains (one line)
    regime_notes: Mapping[str, str] = field(default_factory=dict)  # regime -> what some encodings do otherwise
    trained_sizes: Mapping[str, Sequence[Tuple[int, int]]] = field(default_factory=dict)
    study_sizes: Sequence[Tuple[int, int]] = ()  # sizes of the every-size study (empty: from the records)
    timing: Mapping[str, float] = field(default_factory=dict)  # stage -> seconds
    gpu_run: Optional[str] = None  # the command of the 64x64 GPU run, still owed unless run
    gpu_done: bool = False
    scale: Optional[str] = None  # the study's preset, kept in results.json so a page rebuilt from it matches
    earlier_label: str = ""  # e.g. "300 steps, 2 seeds": the rows of encodings outside the main ablation
    reproduce: Sequence[str] = ()  # commands, in order


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """A Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# ----------------------------------------------------------------------------------- plots
class _Plots:
    def __init__(self, out: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.stem, self.files = plt, out.with_suffix(""), {}

    def save(self, fig, suffix: str) -> str:
        from PIL import Image

        p = Path(f"{self.stem}_{suffix}.png")
        fig.tight_layout()
        fig.savefig(p, dpi=80)
        self.plt.close(fig)
        Image.open(p).convert("RGB").quantize(256).save(p, optimize=True)  # a palette keeps the docs small
        self.files[suffix] = p.name
        return p.name


def _colors(plt, names):
    return {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}


def _plot_main(P: _Plots, rows, names, step_n_per_class) -> None:
    plt = P.plt
    colors = _colors(plt, names)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n in names:
        rs = [r for r in rows if r["pos_embed"] == n and r.get("loss_curve")]
        if not rs:
            continue
        steps = rs[0]["loss_curve"]["steps"]
        k = min(len(r["loss_curve"]["loss"]) for r in rs)
        ax.plot(
            steps[:k],
            [sum(r["loss_curve"]["loss"][i] for r in rs) / len(rs) for i in range(k)],
            label=n,
            color=colors[n],
            lw=1.2,
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.legend(fontsize=7)
    P.save(fig, "loss")

    cols = [c for c in METRIC_COLS[1:N_QUALITY]]
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.2))
    for ax, (path, head, _, lower) in zip(axes.flat, cols):
        st = [mean_sd(per_encoding(rows, names, path)[n]) for n in names]
        ax.bar(
            range(len(names)),
            [m or 0 for m, _ in st],
            yerr=[sd or 0 for _, sd in st],
            capsize=3,
            color=[colors[n] for n in names],
        )
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{head} ({'lower' if lower else 'higher'} is better)", fontsize=9)
    P.save(fig, "bars")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n in names:
        rs = [r for r in rows if r["pos_embed"] == n and (r.get("fd_vs_step") or {}).get("steps")]
        if not rs:
            continue
        # by step, as the table does: a run may lack a checkpoint's evaluation
        at = [dict(zip(r["fd_vs_step"]["steps"], r["fd_vs_step"]["fd_emoji"])) for r in rs]
        steps = sorted({s for a in at for s in a})
        st = [mean_sd([a.get(s) for a in at]) for s in steps]
        ax.errorbar(
            steps,
            [m for m, _ in st],
            yerr=[sd or 0 for _, sd in st],
            label=n,
            color=colors[n],
            capsize=2,
            marker="o",
            ms=3,
        )
    ax.set_xlabel("step")
    ax.set_ylabel(f"FD-emoji ({step_n_per_class} samples per class)")
    ax.legend(fontsize=7)
    P.save(fig, "fd_steps")


def _size_order(sizes) -> List[Tuple[int, int]]:
    return sorted({tuple(s) for s in sizes}, key=lambda hw: (hw[0] * hw[1], hw[0] != hw[1], hw))


def _plot_sizes(P: _Plots, flat, sizes, combos: Mapping[str, Mapping[Tuple[str, str], str]], train_px) -> None:
    """One plot per metric: metric vs size, one line per encoding x regime at its best scaling mode."""
    plt = P.plt
    encs = sorted({k[0] for c in combos.values() for k in c})
    colors = _colors(plt, encs)
    styles = {"single": "-", "mixed": "--"}
    for key, label, _, lower in SIZE_METRICS:
        stats = size_stats(flat, key)
        if not stats:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for (enc, regime), scaling in sorted(combos.get(key, {}).items()):
            xs, ys, es = [], [], []
            for i, hw in enumerate(sizes):
                m, sd, _ = stats.get((enc, regime, scaling, hw), (None, None, 0))
                if m is not None:
                    xs.append(i)
                    ys.append(m)
                    es.append(sd or 0)
            if xs:
                ax.errorbar(
                    xs,
                    ys,
                    yerr=es,
                    color=colors[enc],
                    ls=styles.get(regime, ":"),
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=f"{enc}, {regime}, {scaling}",
                )
        ax.set_xticks(
            range(len(sizes)),
            [size_label(hw) + (" (train)" if hw == (train_px, train_px) else "") for hw in sizes],
            fontsize=7,
        )
        ax.set_xlabel("sampling size (pixels; rows x columns)")
        ax.set_ylabel(f"{label} ({'lower' if lower else 'higher'} is better)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
        P.save(fig, f"size_{key}")


def _plot_size_samples(P: _Plots, rows, flat, sizes, combos, seed) -> None:
    """Sample grids of one seed at every size (the same noise seed everywhere), a row per encoding x
    regime at its best FD-emoji scaling mode."""
    from PIL import Image

    plt = P.plt
    best = combos.get("fd_emoji", {})
    if not best:
        return
    same = {(x["pos_embed"], x["regime"], x["seed"], tuple(x["hw"]), x["scaling"]): x.get("same_as") for x in flat}
    keys = sorted(best)
    fig, axes = plt.subplots(len(keys), len(sizes), figsize=(1.5 * len(sizes), 1.7 * len(keys)), squeeze=False)
    for i, (enc, regime) in enumerate(keys):
        run = next(
            (r for r in rows if r["pos_embed"] == enc and r.get("regime", "single") == regime and r["seed"] == seed),
            None,
        )
        for j, hw in enumerate(sizes):
            ax = axes[i][j]
            ax.axis("off")
            scaling = best[(enc, regime)]
            scaling = same.get((enc, regime, seed, hw, scaling)) or scaling
            name = f"px{hw[0]}" if hw[0] == hw[1] else f"px{hw[0]}x{hw[1]}"
            f = Path(run["grids"]) / f"{name}_{scaling}.png" if run is not None and run.get("grids") else None
            if f is not None and f.exists():
                ax.imshow(Image.open(f))
            else:
                ax.text(0.5, 0.5, "not available", ha="center", va="center", fontsize=7)
            if i == 0:
                ax.set_title(size_label(hw), fontsize=8)
            if j == 0:
                ax.text(
                    -0.05,
                    0.5,
                    f"{enc}\n{regime}\n{best[(enc, regime)]}",
                    transform=ax.transAxes,
                    ha="right",
                    va="center",
                    fontsize=6,
                )
    P.save(fig, "size_samples")


# ----------------------------------------------------------------------------------- sections
MAX_NEAR = 3  # an answer names the runners-up within noise of the best only up to this many


def answer_sentences(rows, names, flat, sizes, regimes: Mapping[str, str]) -> List[str]:
    """The page's answer: which encoding at the training size (the tally of the quality metrics on
    which it is best or within noise of the best), and which encoding, scaling and regime serve every
    size of the study (lowest FD-emoji averaged over the sizes, per seed, then over seeds; when more
    than ``MAX_NEAR`` others are within noise of it, the sentence says that none is clearly best and
    names the clearly worse ones), and the best on held-out v-loss over the sizes when it stands out."""
    out = []
    tally = {n: 0 for n in names}
    for path, _, _, lower in METRIC_COLS[:N_QUALITY]:
        for n in top_group(per_encoding(rows, names, path), lower):
            tally[n] += 1
    if any(tally.values()):
        best = max(tally.values())
        lead = [n for n, v in tally.items() if v == best]
        out.append(
            f"At the training size: {' and '.join(f'`{n}`' for n in lead)} "
            f"{'is' if len(lead) == 1 else 'are'} the best or within noise of the best on {best} of "
            f"{N_QUALITY} quality metrics."
        )
    if flat and sizes:
        several = len({x["regime"] for x in flat}) > 1

        def combo(key: str) -> str:  # "enc | regime | scaling" as words
            e, g, sc = key.split(" | ")
            return f"`{e}` {sc}" + (f" ({g} regime)" if several else "")

        def listed(pairs, spec: str) -> str:
            return ", ".join(f"{combo(n)} ({format(v, spec)})" for n, v in pairs)

        where = f"For one model across sizes ({', '.join(size_label(s) for s in sizes)})"
        c = across_sizes(flat, "fd_emoji", True, sizes)
        if c.best is not None:
            enc, regime, scaling = c.best.split(" | ")
            trained = regimes.get(regime, regime)
            head = f"`{enc}` with `{scaling}` scaling, trained {trained}"
            fd = fmt_pm(*c.stats[c.best], ".3f")
            if c.has_noise and len(c.near) > MAX_NEAR:
                # most combinations tie: naming one "the" answer would overstate the evidence
                out.append(
                    f"{where}: no encoding, scaling and regime is clearly best on FD-emoji averaged over the "
                    f"sizes; {len(c.near) + 1} of {len(c.stats)} are within noise of the lowest, {head} ({fd})"
                    + (f"; clearly worse: {listed(c.apart, '.3f')}" if c.apart else "")
                    + "."
                )
            else:
                out.append(
                    f"{where}: use {head} (FD-emoji averaged over the sizes {fd})"
                    + (f"; within noise of it: {listed(c.near, '.3f')}" if c.near and c.has_noise else "")
                    + ("" if c.has_noise else " (one seed: no noise estimate)")
                    + "."
                )
        v = across_sizes(flat, "vloss", True, sizes)
        if v.best is not None and v.has_noise and len(v.near) <= MAX_NEAR:
            enc, regime, scaling = v.best.split(" | ")
            out.append(
                f"On held-out v-loss averaged over the sizes the best is `{enc}` with `{scaling}` scaling, "
                f"trained {regimes.get(regime, regime)} ({fmt_pm(*v.stats[v.best], '.4f')})"
                + (f"; within noise of it: {listed(v.near, '.4f')}" if v.near else "")
                + (f"; the other {len(v.apart)} are clearly worse" if v.apart else "")
                + "."
            )
    return out


def _setup(info: PageInfo, rows, seeds, timing, sanity) -> List[str]:
    gh = info.img_size // info.patch_size
    cg = None if info.cond_img_size is None else info.cond_img_size // info.patch_size
    tokens = gh * gh + (cg * cg if cg else 0)
    r0 = rows[0]
    n_seeds = {n: len([r for r in rows if r["pos_embed"] == n]) for n in info.names}
    train_s = timing.get("train")
    L = [
        "## Setup",
        "",
        f"- Config `{info.config}`: {info.img_size}x{info.img_size} emoji at patch {info.patch_size} ({gh}x{gh} grid, "
        f"{gh * gh} tokens"
        + (
            f", plus a {info.cond_img_size}x{info.cond_img_size} condition image: {gh * gh} -> {tokens} tokens"
            if cg
            else ""
        )
        + f"), class labels, width {info.width}, depth {info.depth}, {info.heads} heads, {info.in_context} "
        "in-context tokens.",
        f"- {info.steps} training steps per run, batch {info.batch}, AdamW lr {info.lr}, {len(info.names)} encodings x "
        f"seeds {seeds}: the same data, data order, steps, batch, optimizer and seed for every encoding (the seed "
        "changes initialisation and data order together). Only `model.pos_embed` differs.",
    ]
    if "vloss" in r0:
        L.append(
            f"- Evaluation of the EMA weights at step {info.steps}: held-out v-loss at t = "
            f"{', '.join(f'{t:g}' for t in r0['vloss']['t'])} with fixed noise ({r0['vloss']['n_images']} "
            f"held-out images); {r0.get('class_samples', {}).get('n', 0)} class-conditional samples "
            f"({info.n_per_class} per class) and {r0.get('cond_samples', {}).get('n', 0)} condition-image "
            "samples, "
            f"Heun {info.sample_steps} steps, CFG {r0.get('sampling', {}).get('cfg')}."
        )
    L.append(
        "- Mean ± sample standard deviation over the seeds (n per encoding: "
        + ", ".join(f"`{n}` {k}" for n, k in n_seeds.items())
        + ")."
    )
    times = []
    if train_s is not None:
        times.append(f"training {train_s / 3600:.1f} h of runs ({info.jobs} at a time)")
    for stage in ("eval", "sizes"):
        if timing.get(stage) is not None:
            times.append(f"{stage} {timing[stage] / 60:.0f} min")
    if sanity.get("_featnet_seconds") is not None:
        times.append(f"feature network {sanity['_featnet_seconds'] / 60:.0f} min (once, cached)")
    L.append(
        f"- Machine: {info.machine}."
        + (" Times: " + ", ".join(times) + "." if times else "")
        + (
            " On this CPU the machine was shared with other jobs, so wall times are only rough; CPU ms/step "
            "(one thread) is the steadier measure."
            if info.device == "cpu"
            else ""
        )
    )
    return L + [""]


def _metrics_text() -> List[str]:
    return [
        "## Metrics",
        "",
        "- **FD-emoji**: Fréchet distance between the Gaussians fitted to the features of the samples and of the "
        "training split, in a small CNN trained once on the emoji training split with category and vendor heads "
        "(`jitrope/eval/featnet.py`, cached under its config hash). The FID formula in another network: not "
        "comparable with published FIDs. Lower is better; its floor at this sample count is the real images' value "
        "below.",
        "- **class acc**: share of class-conditional samples that the feature network's category head assigns to "
        "the asked class.",
        "- **PSNR / SSIM**: condition-image samples (condition = the held-out image downsampled) against that "
        "held-out image.",
        "- **v-loss**: the training objective on held-out images at fixed t and noise, with the condition image "
        "and with the null condition (class only).",
        "",
    ]


def _sanity(rows, sanity) -> List[str]:
    L = ["## Sanity checks of FD-emoji", ""]
    cells = [[k, f"{v:.4f}"] for k, v in sanity.items() if not k.startswith("_")]
    real = next((r for r in rows if get(r, ("class_samples", "fd_emoji_real")) is not None), None)
    if real is not None:
        cells.append(
            [
                f"real held-out images, {real['class_samples'].get('n_real', '-')} of them (the evaluation's floor)",
                f"{get(real, ('class_samples', 'fd_emoji_real')):.4f}",
            ]
        )
    return L + md_table(["check", "value"], cells) + [""]


def _main_table(rows, names, earlier, earlier_label, files) -> List[str]:
    L = ["## Results at the training resolution", ""]
    header = ["pos_embed", *(c[1] for c in METRIC_COLS), "params"]
    body = []
    for n in names:
        rs = [r for r in rows if r["pos_embed"] == n]
        cells = [fmt_pm(*mean_sd(per_encoding(rows, names, path)[n]), spec) for path, _, spec, _ in METRIC_COLS]
        params = next((r["params"] for r in rs if r.get("params")), None)
        body.append([f"`{n}`", *cells, "-" if params is None else f"{params / 1e6:.3f}M"])
    enames = [n for n in dict.fromkeys(r["pos_embed"] for r in earlier) if n not in names]
    for n in enames:
        cells = [fmt_pm(*mean_sd(per_encoding(earlier, enames, path)[n]), spec) for path, _, spec, _ in METRIC_COLS]
        params = next((r["params"] for r in earlier if r["pos_embed"] == n and r.get("params")), None)
        body.append([f"`{n}` ({earlier_label})", *cells, "-" if params is None else f"{params / 1e6:.3f}M"])
    real = next((r for r in rows if get(r, ("class_samples", "fd_emoji_real")) is not None), None)
    if real is not None:
        body.append(
            [
                "real held-out images",
                "-",
                "-",
                "-",
                f"{get(real, ('class_samples', 'fd_emoji_real')):.3f}",
                f"{get(real, ('class_samples', 'class_acc_real')):.3f}",
            ]
            + ["-"] * (len(METRIC_COLS) - 4)
        )
    L += md_table(header, body) + [""]
    if enames:
        L += [
            f"Rows marked ({earlier_label}) are the earlier, shorter ablation's: not comparable with the rows "
            "above (fewer steps), and left out of the verdicts below.",
            "",
        ]
    L += [f"![training loss]({files['loss']}) ![metrics]({files['bars']})", ""]
    return L


def _fd_steps(rows, names, step_n_per_class, files) -> List[str]:
    ranks = ranking_by_step(rows, names)
    if not ranks:
        return []
    steps = list(ranks)
    L = [
        "## FD-emoji as training goes on",
        "",
        f"FD-emoji of {step_n_per_class} samples per class at every checkpoint (mean ± sd over seeds), and the "
        "order of the encodings at each checkpoint (best first): does the ranking change as the models train?",
        "",
    ]
    body = []
    for n in names:
        rs = [r for r in rows if r["pos_embed"] == n and (r.get("fd_vs_step") or {}).get("steps")]
        cells = []
        for s in steps:
            vals = [
                r["fd_vs_step"]["fd_emoji"][r["fd_vs_step"]["steps"].index(s)]
                for r in rs
                if s in r["fd_vs_step"]["steps"]
            ]
            cells.append(fmt_pm(*mean_sd(vals), ".3f"))
        body.append([f"`{n}`", *cells])
    body.append(["order", *(" < ".join(ranks[s]) for s in steps)])
    L += md_table(["pos_embed", *(f"step {s}" for s in steps)], body) + [""]
    first, last = ranks[steps[0]], ranks[steps[-1]]
    L += [
        (
            "The ranking at the last checkpoint is the one at the first."
            if first == last
            else f"The ranking changes: {' < '.join(first)} at step {steps[0]}, {' < '.join(last)} at step {steps[-1]}."
        )
        + " (Means only: see the spreads in the table.)",
        "",
        f"![FD-emoji vs step]({files['fd_steps']})",
        "",
    ]
    return L


def _sizes_section(rows, flat, sizes, combos, info: PageInfo, files, train_px) -> List[str]:
    regimes_present = sorted({x["regime"] for x in flat}, key=lambda g: (g != "single", g))
    L = [
        "## Every size: one model for many image sizes",
        "",
        f"Class-conditional samples ({info.res_n_per_class} per class, null condition, the same noise seed at every "
        "size and for every model) at every size of the study, under every scaling mode (`model.pos_scaling`): "
        "`extrapolate` (integer positions beyond the training range), `interpolate` (positions scaled into the "
        "training range, per axis; learned tables resampled), `ntk` (NTK-aware RoPE base, per axis), `yarn` "
        "(YaRN's per-frequency ramp and attention temperature). `ntk` and `yarn` scale RoPE only: a table part "
        "interpolates under them, and they change nothing on an axis no longer than in training (their numbers are "
        "then another mode's). FD-emoji and class accuracy after resizing to the feature network's "
        f"{train_px}x{train_px} (non-square samples squeezed); held-out v-loss with the null condition on the "
        "held-out images resized to each size, and its ratio to an *oracle*: the same encoding and seed trained at "
        "that size ("
        + "; ".join(
            f"`{g}`: {', '.join(size_label(s) for s in info.trained_sizes.get(g, ()))}" for g in regimes_present
        )
        + ").",
        "",
    ]
    L += [
        "Training regimes: "
        + "; ".join(
            f"`{g}`: trained {info.regimes.get(g, g)}"
            + (f" ({info.regime_notes[g]})" if g in info.regime_notes else "")
            for g in regimes_present
        )
        + ". Seeds: "
        + ", ".join(f"`{g}` {sorted({x['seed'] for x in flat if x['regime'] == g})}" for g in regimes_present)
        + ".",
        "",
    ]
    repeats: Dict[Tuple, set] = {}  # (enc, regime, mode, hw) -> the modes whose samples it repeats
    for x in flat:
        repeats.setdefault((x["pos_embed"], x["regime"], x["scaling"], tuple(x["hw"])), set()).add(x.get("same_as"))
    for key, label, spec, lower in SIZE_METRICS:
        stats = size_stats(flat, key)
        if not stats:
            continue
        L += [f"### {label} ({'lower' if lower else 'higher'} is better)", ""]
        body = []
        for regime in regimes_present:
            encs = [n for n in dict.fromkeys(x["pos_embed"] for x in flat if x["regime"] == regime)]
            for enc in encs:
                modes = [
                    m
                    for m in ("extrapolate", "interpolate", "ntk", "yarn")
                    if any(k[:3] == (enc, regime, m) for k in stats)
                ]
                for m in modes:
                    cells, same = [], set()
                    for hw in sizes:
                        v = stats.get((enc, regime, m, hw))
                        rep = repeats.get((enc, regime, m, hw), {None})
                        same |= rep
                        mark = "= " if None not in rep else ""
                        cells.append("n/a" if v is None else mark + fmt_pm(v[0], v[1], spec))
                    name = f"{m} (= {same.pop()})" if len(same) == 1 and None not in same else m
                    star = " *" if combos.get(key, {}).get((enc, regime)) == m else ""
                    body.append([f"`{enc}`", regime, name + star, *cells])
        L += md_table(
            [
                "pos_embed",
                "regime",
                "scaling",
                *(size_label(s) + (" (train)" if s == (train_px, train_px) else "") for s in sizes),
            ],
            body,
        )
        L += [
            "",
            f"\\* the best scaling mode of that encoding and regime on {label} averaged over the sizes. "
            "= : the samples of another mode (named in the row when always the same one: ntk and yarn on a table, "
            "or on an axis no longer than in training, and every mode at the training size). "
            "n/a: the mode cannot place that size (e.g. `learned1d` cannot extrapolate), or no run has it.",
            "",
        ]
        if f"size_{key}" in files:
            L += [f"![{label} vs size]({files[f'size_{key}']})", ""]
    L += ["Across sizes (per seed, the mean over every size of the study; then mean ± sd over seeds):", ""]
    for key, label, spec, lower in SIZE_METRICS[:3]:
        L.append(
            "- "
            + verdict(
                across_sizes_values(flat, key, sizes), lower, spec, f"{label} over sizes (encoding | regime | scaling)"
            )
        )
    L += [""]
    if "size_samples" in files:
        L += [
            f"Samples of seed {_grid_seed(flat)} at every size (rows: encoding, regime and its best FD-emoji scaling "
            "mode; in each grid, rows are classes):",
            "",
            f"![samples at every size]({files['size_samples']})",
            "",
        ]
    return L


def _grid_seed(flat) -> int:
    """The seed of the sample panel: the smallest with an every-size study (only those runs have grids)."""
    return min(x["seed"] for x in flat)


def _conclusion(rows, names, flat, sizes, info: PageInfo) -> List[str]:
    L = [
        "## Conclusion",
        "",
        "Mechanical reading of the tables (best mean; an encoding differs only when the gap is "
        "larger than twice the combined seed spread; with few seeds that spread is itself a rough estimate, so read "
        '"clearly" as indicative):',
        "",
    ]
    for path, head, spec, lower in METRIC_COLS[:N_QUALITY]:
        L.append("- " + verdict(per_encoding(rows, names, path), lower, spec, head))
    L += ["", "### Answer", ""]
    L += [" ".join(answer_sentences(rows, names, flat, sizes, info.regimes)) or "Too few runs for an answer.", ""]
    return L


def _limits(info: PageInfo, rows) -> List[str]:
    gh = info.img_size // info.patch_size
    cg = None if info.cond_img_size is None else info.cond_img_size // info.patch_size
    tokens = gh * gh + (cg * cg if cg else 0)
    L = ["## Limits", ""]
    n_train = next((r["featnet"].get("n_train") for r in rows if r.get("featnet", {}).get("n_train")), None)
    if info.device == "cpu":
        if n_train:
            L.append(
                f"- Budget: {info.steps} steps of batch {info.batch} are {info.steps * info.batch / n_train:.1f} "
                "passes over the training split, on a 2-core CPU shared with other jobs."
            )
        L.append(
            f"- Image size: {info.img_size}x{info.img_size} ({gh}x{gh} grid, {gh * gh} -> {tokens} tokens), a "
            "small JiT; the problem statement's 64x64 setting (16x16 grid, 256 -> 320 tokens) is "
            + (f"`{info.gpu_run}`" if info.gpu_run else "the `--scale seed` run")
            + ", sized for one GPU"
            + (": it is on this page." if info.gpu_done else ": the GPU run is still owed.")
        )
    else:
        L.append(f"- This page is the `{info.config}` run on {info.machine}.")
    return L + [""]


def _reproduce(info: PageInfo, out: Path) -> List[str]:
    L = [
        "## Reproduce",
        "",
        "```",
        *info.reproduce,
        "```",
        "",
        "Stages can be run one by one (`--stage train|eval|report`); every stage resumes. Runs, logs, checkpoints and "
        f"`metrics.jsonl` are in `{info.out_dir}/seed<k>/<encoding>/` (other regimes in "
        f"`{info.out_dir}/<regime>/seed<k>/<encoding>/`); every run's metrics in `{out.with_suffix('.json').name}`.",
    ]
    return L


def _previous_section(prev: Sequence[Mapping[str, Any]]) -> List[str]:
    """The earlier single-seed, 2000-step CPU ablation, from its JSON."""
    L = [
        "",
        "## Earlier run: 2000 steps, one seed",
        "",
        "The first ablation (`python scripts/ablate_posenc.py --steps 2000` of the time, one seed, config "
        "`emoji32_cpu.yaml`; formerly `docs/ablation.md`), kept for its longer training. NN class acc: share of "
        "samples whose nearest training image (pixel L2) has the asked class.",
        "",
    ]
    body = [
        [
            f"`{r['pos_embed']}`",
            f"{r['vloss']['mean']:.4f}",
            f"{r['vloss_null_cond']['mean']:.4f}",
            f"{r['class_samples']['nn_class_acc']:.3f}",
            f"{r['cond_samples']['cond_rms']:.3f}",
        ]
        for r in prev
    ]
    return L + md_table(["pos_embed", "held-out v-loss", "v-loss, null cond", "NN class acc", "cond RMS"], body) + [""]


# ----------------------------------------------------------------------------------- the page
def _prepare(rows, info: PageInfo):
    """The main ablation's records, its encodings and seeds, and the every-size records with the sizes
    they cover, in page order: what the page and the README's answer are written from."""
    main = [r for r in rows if r.get("regime", "single") == "single" and r["pos_embed"] in info.names and "vloss" in r]
    if not main:
        raise ValueError("no evaluated run of the main ablation to report")
    names = [n for n in info.names if any(r["pos_embed"] == n for r in main)]
    seeds = sorted({r["seed"] for r in main})
    train_px = info.img_size
    flat = size_records([r for r in rows if r.get("resolution")], train_px)
    add_oracle_ratios(flat, info.trained_sizes, list(info.trained_sizes) or ["single"])
    sizes = [tuple(x["hw"]) for x in flat]  # the study's sizes, and the training size wherever it has numbers
    sizes = _size_order(
        [s for s in info.study_sizes if s in sizes] + [s for s in sizes if s == (train_px, train_px)]
        if info.study_sizes
        else sizes
    )
    return main, names, seeds, flat, sizes


def write_results_page(
    rows: Sequence[Mapping[str, Any]],
    info: PageInfo,
    out: Path,
    *,
    sanity: Mapping[str, Any],
    earlier: Sequence[Mapping[str, Any]] = (),
    previous: Optional[Sequence[Mapping[str, Any]]] = None,
) -> Path:
    """Write the page ``out`` (Markdown), ``out.json`` and ``out``'s plots from the run records.

    ``rows``: records of the main ablation (``regime`` "single" or absent: the tables, plots and verdicts
    at the training size) and of every regime's every-size study (their ``resolution``); ``earlier``:
    records of a shorter ablation whose encodings are not in ``info.names`` (shown, labelled, never
    compared); ``previous``: the 2000-step single-seed records of the first ablation."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    main, names, seeds, flat, sizes = _prepare(rows, info)
    train_px = info.img_size
    combos = {key: best_scalings(flat, key, lower, sizes) for key, _, _, lower in SIZE_METRICS}
    combos["vloss_ratio"] = combos["vloss"]  # the oracle does not depend on the mode; ratios exist at a few sizes
    P = _Plots(out)
    _plot_main(P, main, names, info.step_n_per_class)
    if flat:
        _plot_sizes(P, flat, sizes, combos, train_px)
        _plot_size_samples(P, rows, flat, sizes, combos, _grid_seed(flat))
    files = P.files
    L = [
        "# Which positional encoding? Results of the ablation",
        "",
        f"Generated by `{info.command}` (every number and picture on this page; nothing typed in by hand).",
        "",
    ]
    L += _setup(info, main, seeds, info.timing, sanity)
    L += _metrics_text()
    L += _sanity(main, sanity)
    L += _main_table(main, names, earlier, info.earlier_label, files)
    L += _fd_steps(main, names, info.step_n_per_class, files)
    if flat:
        L += _sizes_section(rows, flat, sizes, combos, info, files, train_px)
    L += _conclusion(main, names, flat, sizes, info)
    L += _limits(info, main)
    L += _reproduce(info, out)
    if previous:
        L += _previous_section(previous)
    out.write_text("\n".join(L) + "\n")
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "runs": clean,
                "fd_sanity": dict(sanity),
                "timing": dict(info.timing),
                "study": {"scale": info.scale, "out_dir": info.out_dir},
            },
            indent=1,
        )
    )
    return out


# ----------------------------------------------------------------------------------- the README's answer
README_BEGIN = "<!-- answer: written by scripts/ablate_posenc.py --readme (edits here are overwritten) -->"
README_END = "<!-- /answer -->"
README_COLS = [c for c in METRIC_COLS if c[1] in ("held-out v-loss", "FD-emoji", "class acc", "PSNR (dB)")]


def readme_answer(rows: Sequence[Mapping[str, Any]], info: PageInfo, page_link: str) -> List[str]:
    """The README's answer to the problem statement's question, from the same records and rule as the
    page (:func:`answer_sentences`): the answer, the main metrics with their seed spread, the limits,
    and a link ``page_link`` to the page."""
    main, names, seeds, flat, sizes = _prepare(rows, info)
    body = [
        [f"`{n}`", *(fmt_pm(*mean_sd(per_encoding(main, names, path)[n]), spec) for path, _, spec, _ in README_COLS)]
        for n in names
    ]
    answer = " ".join(answer_sentences(main, names, flat, sizes, info.regimes)) or "Too few runs for an answer."
    L = [
        f"**Answer ({info.steps} steps, seeds {'/'.join(map(str, seeds))}, {info.img_size}x{info.img_size} emoji):** "
        + answer,
        "",
        f"At the training size (mean ± standard deviation over the seeds; the page [{page_link}]({page_link}) has "
        "every metric, FD-emoji against step, the every-size study, plots and sample grids):",
        "",
        *md_table(["pos_embed", *(c[1] for c in README_COLS)], body),
        "",
        "Limits:",
        *_limits(info, main)[2:],
        f"Written by `{info.command}`.",
    ]
    return L


def write_readme_answer(readme: Path, lines: Sequence[str]) -> None:
    """Replace the text between :data:`README_BEGIN` and :data:`README_END` in ``readme`` by ``lines``
    (written to a temporary file and renamed, so a failure leaves the README as it was)."""
    readme = Path(readme)
    text = readme.read_text()
    ok = text.count(README_BEGIN) == 1 and text.count(README_END) == 1
    if not ok or text.index(README_BEGIN) > text.index(README_END):
        raise ValueError(f"{readme} needs one line {README_BEGIN!r} and, after it, one line {README_END!r}")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(head + README_BEGIN + "\n" + "\n".join(lines).rstrip("\n") + "\n" + README_END + tail)
    tmp.replace(readme)
