"""Reading, statistics and verdicts of the positional-encoding study (``scripts/ablate_posenc.py``).

The study trains the same JiT once per encoding, seed and training regime and evaluates each run
with :mod:`jitrope.eval.evaluate`; this module turns what the runs left on disk into numbers:

- readers: a run's ``metrics.jsonl`` (:mod:`jitrope.runlog`: loss curve, step time, wall and CPU
  time), its evaluation JSONs (the final one, one per checkpoint for FD-emoji vs step, the
  every-size study), gathered into one record per run (:func:`run_record`);
- statistics over seeds: mean and sample standard deviation (:func:`mean_sd`), and the rule that
  calls two encodings different only when their means differ by more than twice the combined seed
  spread, ``|m1 - m2| > 2 sqrt(sd1^2 + sd2^2)`` (:func:`compare`, :func:`verdict`, :func:`top_group`);
- the every-size study: one flat record per (run, size, scaling) (:func:`size_records`), held-out
  v-loss as a ratio to an "oracle" run trained at that size (:func:`add_oracle_ratios`), the best
  scaling mode per encoding and regime, and the answer for one model across sizes (:func:`across_sizes`);
- FD-emoji sanity checks on real images (:func:`fd_sanity_checks`);
- the time a study plan takes on a machine of a measured step time (:func:`estimate_seconds`), and
  what its runs have trained so far with the time the rest takes at their own step time
  (:func:`training_progress`).

Plots and the Markdown page are :mod:`jitrope.eval.report`'s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..runlog import read_metrics

__all__ = [
    "get",
    "mean_sd",
    "fmt_pm",
    "per_encoding",
    "Comparison",
    "compare",
    "verdict",
    "top_group",
    "curve_from_metrics",
    "step_times",
    "fd_vs_step",
    "run_record",
    "size_label",
    "size_records",
    "add_oracle_ratios",
    "size_stats",
    "best_scalings",
    "across_sizes_values",
    "across_sizes",
    "ranking_by_step",
    "fd_sanity_checks",
    "StudyPlan",
    "estimate_seconds",
    "training_progress",
]

KeyPath = Sequence[str]  # keys into a nested record, e.g. ("vloss", "mean")


# ----------------------------------------------------------------------------------- statistics
def get(record: Mapping[str, Any], path: KeyPath) -> Optional[float]:
    """``record[path[0]][path[1]]...`` as a float, or None where a key is missing or the value is None."""
    r: Any = record
    for k in path:
        if not isinstance(r, Mapping) or k not in r:
            return None
        r = r[k]
    return None if r is None else float(r)


def mean_sd(vals: Iterable[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation of the finite values (sd None for one value: no noise estimate)."""
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return None, None
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, sd


def fmt_pm(m: Optional[float], sd: Optional[float], spec: str) -> str:
    """``"m ± sd"`` in ``spec``; ``"m"`` without a spread, ``"-"`` without a value."""
    if m is None:
        return "-"
    return format(m, spec) if sd is None else f"{format(m, spec)} ± {format(sd, spec)}"


def per_encoding(rows: Sequence[Mapping], names: Sequence[str], path: KeyPath) -> Dict[str, List[Optional[float]]]:
    """``{encoding: [value of path, one per run]}`` for the runs of each name."""
    return {n: [get(r, path) for r in rows if r["pos_embed"] == n] for n in names}


@dataclass
class Comparison:
    """The outcome of :func:`compare`: the best name, the others apart from it or within noise
    (``(name, mean)`` pairs), and whether every name had a spread (else: no noise estimate)."""

    best: Optional[str]
    stats: Dict[str, Tuple[float, Optional[float]]]
    apart: List[Tuple[str, float]]
    near: List[Tuple[str, float]]
    has_noise: bool

    @property
    def top(self) -> List[str]:
        """The best and those within noise of it (empty without a noise estimate)."""
        return [self.best] + [n for n, _ in self.near] if self.best is not None and self.has_noise else []


def compare(values: Mapping[str, Sequence[Optional[float]]], lower: bool) -> Comparison:
    """Best by mean, and which others differ from it by more than twice the combined seed spread
    ``sqrt(sd_best^2 + sd^2)`` (apart) or not (within noise). Names without a value are left out."""
    stats = {n: mean_sd(v) for n, v in values.items()}
    stats = {n: s for n, s in stats.items() if s[0] is not None}
    if not stats:
        return Comparison(None, {}, [], [], False)
    best = (min if lower else max)(stats, key=lambda n: stats[n][0])
    has_noise = all(sd is not None for _, sd in stats.values())
    bm, bsd = stats[best]
    apart, near = [], []
    for n, (m, sd) in stats.items():
        if n == best:
            continue
        if not has_noise:
            near.append((n, m))
            continue
        noise = math.sqrt(bsd**2 + sd**2)
        (apart if abs(m - bm) > 2 * noise and noise > 0 else near).append((n, m))
    return Comparison(best, stats, apart, near, has_noise)


def verdict(values: Mapping[str, Sequence[Optional[float]]], lower: bool, spec: str, label: str) -> str:
    """One mechanical sentence of :func:`compare`'s outcome."""
    c = compare(values, lower)
    if len(c.stats) < 2:
        return f"{label}: too few runs to compare."
    if not c.has_noise:
        order = sorted(c.stats, key=lambda n: c.stats[n][0], reverse=not lower)
        return (
            f"{label} (one seed, no noise estimate): "
            + (" < " if lower else " > ").join(f"`{n}` {format(c.stats[n][0], spec)}" for n in order)
            + ("" if lower else " (higher is better)")
            + "."
        )
    out = f"{label}: best `{c.best}` ({fmt_pm(*c.stats[c.best], spec)})"
    if c.apart:
        out += "; clearly worse (gap > 2x the combined seed spread): " + ", ".join(
            f"`{n}` {format(m, spec)}" for n, m in c.apart
        )
    if c.near:
        out += "; within noise of it: " + ", ".join(f"`{n}` {format(m, spec)}" for n, m in c.near)
    return out + "."


def top_group(values: Mapping[str, Sequence[Optional[float]]], lower: bool) -> List[str]:
    """The best name by mean and those within noise of it (:func:`compare`); empty without spreads."""
    return compare(values, lower).top


# ----------------------------------------------------------------------------------- readers
def curve_from_metrics(records: Sequence[Mapping[str, Any]]) -> Dict[str, List[float]]:
    """Loss curve and clocks of a run from its ``metrics.jsonl`` records."""
    return {
        "steps": [r["step"] for r in records],
        "loss": [r["loss"] for r in records],
        "wall_s": [r.get("wall_s") for r in records],
        "cpu_s": [r.get("cpu_s") for r in records],
    }


def step_times(records: Sequence[Mapping[str, Any]]) -> Dict[str, Optional[float]]:
    """Milliseconds of wall and CPU time per training step, from the intervals between records that
    do not include a (re)start (``startup``), and the run's training wall and CPU seconds."""
    wall = cpu = steps = 0.0
    for a, b in zip(records, records[1:]):
        if b.get("startup") or b.get("wall_s") is None or a.get("wall_s") is None:
            continue
        n = b["step"] - a["step"]
        wall += b["wall_s"] - a["wall_s"]
        cpu += (b.get("cpu_s") or 0.0) - (a.get("cpu_s") or 0.0)
        steps += n
    last = records[-1] if records else {}
    return {
        "step_ms": 1000.0 * wall / steps if steps else None,
        "cpu_ms": 1000.0 * cpu / steps if steps else None,
        "train_wall_s": last.get("wall_s"),
        "train_cpu_s": last.get("cpu_s"),
    }


def fd_vs_step(folder: Path, max_step: int) -> Dict[str, List[float]]:
    """FD-emoji and class accuracy of the evaluations ``<folder>/step_*.json`` up to ``max_step``."""
    pts = []
    for f in sorted(Path(folder).glob("step_*.json")):
        d = json.loads(f.read_text())
        cs = d.get("class_samples", {})
        if d["step"] <= max_step and "fd_emoji" in cs:
            pts.append((d["step"], cs["fd_emoji"], cs.get("class_acc")))
    pts.sort()
    return {"steps": [p[0] for p in pts], "fd_emoji": [p[1] for p in pts], "class_acc": [p[2] for p in pts]}


def run_record(
    run: Path,
    *,
    steps: int,
    seed: int,
    regime: str,
    pos_embed: str,
    final: Optional[Path] = None,
    sizes: Optional[Path] = None,
    steps_folder: Optional[Path] = None,
) -> Dict[str, Any]:
    """One record per run: its final evaluation (``final`` JSON, if any), the every-size study
    (``sizes`` JSON: its ``resolution``), FD-emoji vs step (``steps_folder``), and from
    ``metrics.jsonl`` the loss curve, the final training loss (mean of the last 10% of the logged
    steps), step times and training wall / CPU time, all up to ``steps``."""
    r: Dict[str, Any] = json.loads(Path(final).read_text()) if final is not None and Path(final).exists() else {}
    r.update(pos_embed=pos_embed, seed=seed, regime=regime, run=str(run), steps=steps)
    if sizes is not None and Path(sizes).exists():
        s = json.loads(Path(sizes).read_text())
        r["resolution"] = s.get("resolution", [])
        r.setdefault("params", s.get("params"))
        r.setdefault("step", s.get("step"))
    records = read_metrics(run, max_step=steps) if (Path(run) / "metrics.jsonl").exists() else []
    if records:
        curve = curve_from_metrics(records)
        r["loss_curve"] = {"steps": curve["steps"], "loss": curve["loss"]}
        tail = max(1, len(curve["loss"]) // 10)
        r["final_train_loss"] = sum(curve["loss"][-tail:]) / tail
        r.update(step_times(records))
    if steps_folder is not None:
        r["fd_vs_step"] = fd_vs_step(steps_folder, steps)
    return r


# ----------------------------------------------------------------------------------- every size
def size_label(hw: Sequence[int]) -> str:
    """``"32²"`` for a square size, ``"32x48"`` (rows x columns) otherwise."""
    return f"{hw[0]}²" if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def _row_hw(row: Mapping[str, Any]) -> Tuple[int, int]:
    if "hw" in row:
        return int(row["hw"][0]), int(row["hw"][1])
    return int(row["px"]), int(row["px"])  # records of older versions: square sizes only


def size_records(
    rows: Sequence[Mapping[str, Any]], train_px: int, metrics: Sequence[str] = ("fd_emoji", "class_acc", "vloss")
) -> List[Dict[str, Any]]:
    """One flat record ``{pos_embed, regime, seed, hw, scaling, <metrics>, same_as?}`` per run, size and
    scaling mode that has numbers (skipped modes are left out). A run whose study lacks its training
    size gets it from its main evaluation (FD-emoji and class accuracy of ``class_samples``, the same
    for every mode), as pages of older versions did."""
    out = []
    for r in rows:
        base = {"pos_embed": r["pos_embed"], "regime": r.get("regime", "single"), "seed": r["seed"]}
        seen = set()
        for row in r.get("resolution", []):
            if "skipped" in row:
                continue
            hw = _row_hw(row)
            seen.add(hw)
            rec = {**base, "hw": hw, "scaling": row["scaling"], **{m: row.get(m) for m in metrics}}
            if "same_as" in row:
                rec["same_as"] = row["same_as"]
            out.append(rec)
        if (train_px, train_px) not in seen and "class_samples" in r:
            # sorted: a set's order changes with the hash seed, and the record order decides ties on the page
            for scaling in sorted({x["scaling"] for x in r.get("resolution", [])} or {"extrapolate", "interpolate"}):
                out.append(
                    {
                        **base,
                        "hw": (train_px, train_px),
                        "scaling": scaling,
                        "fd_emoji": get(r, ("class_samples", "fd_emoji")),
                        "class_acc": get(r, ("class_samples", "class_acc")),
                        "vloss": None,
                    }
                )
    return out


ORACLE_SCALINGS = ("extrapolate", "interpolate")  # how a run places the sizes it trained at


def add_oracle_ratios(
    flat: List[Dict[str, Any]], trained: Mapping[str, Iterable[Sequence[int]]], order: Sequence[str]
) -> None:
    """Add ``vloss_ratio``: a record's held-out v-loss over that of the *oracle* of its encoding, seed
    and size, i.e. the run of the first regime in ``order`` whose training sizes (``trained[regime]``)
    include the size, placed as it trained (extrapolate, or interpolate where it cannot). Sizes no
    regime trained at get no ratio."""
    trained_sets = {g: {tuple(hw) for hw in trained.get(g, ())} for g in order}
    index = {(x["pos_embed"], x["regime"], x["seed"], tuple(x["hw"]), x["scaling"]): x for x in flat}
    for x in flat:
        hw = tuple(x["hw"])
        oracle = next((g for g in order if hw in trained_sets[g]), None)
        if oracle is None or x.get("vloss") is None:
            continue
        for s in ORACLE_SCALINGS:
            o = index.get((x["pos_embed"], oracle, x["seed"], hw, s))
            if o is not None and o.get("vloss"):
                x["vloss_ratio"] = x["vloss"] / o["vloss"]
                x["oracle"] = oracle
                break


def size_stats(
    flat: Sequence[Mapping[str, Any]], metric: str
) -> Dict[Tuple, Tuple[Optional[float], Optional[float], int]]:
    """``{(pos_embed, regime, scaling, hw): (mean, sd, n)}`` of ``metric`` over seeds."""
    groups: Dict[Tuple, List[float]] = {}
    for x in flat:
        if x.get(metric) is not None:
            groups.setdefault((x["pos_embed"], x["regime"], x["scaling"], tuple(x["hw"])), []).append(x[metric])
    return {k: (*mean_sd(v), len(v)) for k, v in groups.items()}


def _per_seed_means(flat: Sequence[Mapping[str, Any]], metric: str, sizes: Sequence[Tuple[int, int]]):
    """``{(pos_embed, regime, scaling): [per seed: the mean of metric over sizes]}``, for the seeds that
    have every size (a combination that cannot place one of the sizes has no score; one that only
    repeats another mode's samples, e.g. ntk on an encoding without RoPE, is that mode and left out)."""
    want = {tuple(s) for s in sizes}
    per: Dict[Tuple, Dict[int, Dict[Tuple[int, int], float]]] = {}
    own = set()  # combinations with samples of their own somewhere (not only repeats of another mode)
    for x in flat:
        if x.get(metric) is None or tuple(x["hw"]) not in want:
            continue
        k = (x["pos_embed"], x["regime"], x["scaling"])
        per.setdefault(k, {}).setdefault(x["seed"], {})[tuple(x["hw"])] = x[metric]
        if "same_as" not in x:
            own.add(k)
    out = {}
    for k, seeds in per.items():
        vals = [sum(v.values()) / len(v) for v in seeds.values() if set(v) == want]
        if vals and k in own:
            out[k] = vals
    return out


def best_scalings(
    flat: Sequence[Mapping[str, Any]], metric: str, lower: bool, sizes: Sequence[Tuple[int, int]]
) -> Dict[Tuple[str, str], str]:
    """``{(pos_embed, regime): the scaling mode with the best mean of metric over sizes}``."""
    scores = {k: mean_sd(v)[0] for k, v in _per_seed_means(flat, metric, sizes).items()}
    best: Dict[Tuple[str, str], str] = {}
    for (enc, regime, scaling), m in scores.items():
        cur = best.get((enc, regime))
        if cur is None or (m < scores[(enc, regime, cur)] if lower else m > scores[(enc, regime, cur)]):
            best[(enc, regime)] = scaling
    return best


def across_sizes_values(
    flat: Sequence[Mapping[str, Any]], metric: str, sizes: Sequence[Tuple[int, int]]
) -> Dict[str, List[float]]:
    """``{"enc | regime | scaling": [per seed: the mean of metric over every size of sizes]}``."""
    return {" | ".join(k): v for k, v in _per_seed_means(flat, metric, sizes).items()}


def across_sizes(
    flat: Sequence[Mapping[str, Any]], metric: str, lower: bool, sizes: Sequence[Tuple[int, int]]
) -> Comparison:
    """Which (encoding, regime, scaling) serves every size of ``sizes`` best: per seed the mean of
    ``metric`` over the sizes, then :func:`compare` over seeds. Names are ``"enc | regime | scaling"``."""
    return compare(across_sizes_values(flat, metric, sizes), lower)


def ranking_by_step(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str], metric: str = "fd_emoji", lower: bool = True
) -> Dict[int, List[str]]:
    """``{step: encodings ordered by their mean metric at that checkpoint}`` (FD-emoji vs step)."""
    at: Dict[int, Dict[str, List[float]]] = {}
    for r in rows:
        f = r.get("fd_vs_step") or {}
        for s, v in zip(f.get("steps", []), f.get(metric, [])):
            if v is not None and r["pos_embed"] in names:
                at.setdefault(s, {}).setdefault(r["pos_embed"], []).append(v)
    return {s: sorted(d, key=lambda n: sum(d[n]) / len(d[n]), reverse=not lower) for s, d in sorted(at.items())}


# ----------------------------------------------------------------------------------- FD sanity
def fd_sanity_checks(
    fd: Callable[[Any], float], train_images, held_images, n: int, *, generator, featnet_info: Mapping[str, Any]
) -> Dict[str, float]:
    """FD-emoji sanity checks: ``fd(images)`` (FD of a float [-1, 1] batch to the training split's
    features) of the training split itself (~0), of the real held-out images and of ``n`` training
    images (the floor at the sample count), of blurred held-out images and of uniform noise (both
    large), the feature network's accuracies, and the Fréchet distance of two Gaussians against the
    closed form ``|dmu|^2 + d (sqrt(a) - 1)^2`` (from exact moments and from 20000 samples)."""
    import torch
    import torch.nn.functional as F

    from .metrics import frechet_distance, gaussian_stats

    g = generator
    sub = train_images[torch.randperm(len(train_images), generator=g)[:n]]
    k = 4  # blur: average 4x4 blocks, then back to size
    blur = F.avg_pool2d(held_images, k).repeat_interleave(k, -1).repeat_interleave(k, -2)
    d = 16
    mu, s1 = torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    x = torch.randn(20000, d, generator=g, dtype=torch.float64)
    y = 1.5 * torch.randn(20000, d, generator=g, dtype=torch.float64) + 0.5
    return {
        "identical (training split vs itself)": float(fd(train_images)),
        f"real held-out images (all {len(held_images)})": float(fd(held_images)),
        f"real training images ({len(sub)}, the sample count)": float(fd(sub)),
        "blurred held-out images (4x4 box)": float(fd(blur)),
        "uniform noise images": float(fd(torch.rand(held_images.shape, generator=g) * 2 - 1)),
        "featnet class accuracy, held-out": float(featnet_info.get("val_cat_acc", float("nan"))),
        "featnet class accuracy, chance": float(featnet_info.get("chance_cat_acc", float("nan"))),
        "featnet vendor accuracy, held-out": float(featnet_info.get("val_vendor_acc", float("nan"))),
        f"Gaussians N(0, I) vs N(0.5, 2.25 I), d={d}, from their exact mean and covariance: FD": float(
            frechet_distance(mu, s1, mu + 0.5, 2.25 * s1)
        ),
        "... the same from 20000 samples of each": float(frechet_distance(*gaussian_stats(x), *gaussian_stats(y))),
        "... closed form |dmu|^2 + d (1.5 - 1)^2": d * 0.25 + d * (1.5 - 1.0) ** 2,
    }


# ----------------------------------------------------------------------------------- time
@dataclass
class StudyPlan:
    """What a study runs, for :func:`estimate_seconds`."""

    train_runs: int  # runs of the main ablation
    extra_train_runs: int  # runs of the other regimes (mixed sizes), the same steps
    steps: int
    batch: int
    checkpoints: int  # FD-vs-step evaluations per main run
    size_sets: int  # (seed, regime) pairs that get the every-size study, each for every encoding
    size_units: float  # per such pair: the sum over encodings, sizes and the modes that sample on their own
    #                    (others repeat one: same_as) of the size's token count over the training size's
    n_classes: int
    n_per_class: int  # final evaluation
    step_n_per_class: int
    res_n_per_class: int
    n_cond: int
    max_images: int  # held-out images of the v-loss, final evaluation
    res_max_images: int  # ... at each size and mode
    t_points: int
    sample_steps: int  # Heun steps (2 evaluations each but the last, x2 for guidance)
    jobs: int


def estimate_seconds(plan: StudyPlan, step_s: float) -> Dict[str, float]:
    """Seconds per stage on a machine where one training step (of ``plan.batch`` images at the training
    size) takes ``step_s``, with ``plan.jobs`` runs at a time. A forward pass of one image is taken as
    a third of a training step's per-image cost (forward + backward ~ 3 forwards), scaled by the
    token count of its size; sampling costs ``2 * (2 * steps - 1)`` forwards per image (Heun, CFG)."""
    fwd = step_s / (3.0 * plan.batch)  # one image at the training size
    per_sample = 2 * (2 * plan.sample_steps - 1)
    k = plan.n_classes
    final = (k * plan.n_per_class + plan.n_cond) * per_sample + 2 * plan.t_points * plan.max_images
    steps_eval = plan.checkpoints * k * plan.step_n_per_class * per_sample
    per_unit = k * plan.res_n_per_class * per_sample + plan.t_points * plan.res_max_images
    j = max(1, plan.jobs)
    out = {
        "train": (plan.train_runs + plan.extra_train_runs) * plan.steps * step_s / j,
        "eval": plan.train_runs * (final + steps_eval) * fwd / j,
        "sizes": plan.size_sets * plan.size_units * per_unit * fwd / j,
    }
    out["total"] = sum(out.values())
    return out


def training_progress(runs: Sequence[Sequence[Mapping[str, Any]]], steps: int, jobs: int) -> Dict[str, Optional[float]]:
    """What the runs of a study have trained: ``runs`` holds each run's ``metrics.jsonl`` records (empty
    for a run not started), ``steps`` the steps of every run. Returns the counts of runs ``done``,
    ``partial`` and ``todo``, the ``remaining`` steps, the CPU seconds per step measured over every
    run's intervals that hold no (re)start (``cpu_s_per_step``, None before one such interval) and
    the hours the remaining steps take at that rate, ``jobs`` at a time (``hours``)."""
    cpu = n = 0.0
    for recs in runs:
        for a, b in zip(recs, recs[1:]):
            if not b.get("startup") and a.get("cpu_s") is not None and b.get("cpu_s") is not None:
                cpu += b["cpu_s"] - a["cpu_s"]
                n += b["step"] - a["step"]
    last = [min(recs[-1]["step"], steps) if recs else 0 for recs in runs]
    remaining = sum(steps - k for k in last)
    rate = cpu / n if n else None
    return {
        "done": sum(1 for k in last if k >= steps),
        "partial": sum(1 for k in last if 0 < k < steps),
        "todo": sum(1 for k in last if k == 0),
        "remaining": remaining,
        "cpu_s_per_step": rate,
        "hours": None if rate is None else remaining * rate / max(1, jobs) / 3600,
    }
