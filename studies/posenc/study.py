"""Reading, statistics and verdicts of the positional-encoding study (``studies/posenc/run.py``).

The study trains the same JiT once per encoding, seed and training regime and evaluates each run
with ``jitrope.eval.evaluate``; this module turns what the runs left on disk into numbers:

- readers: a run's ``metrics.jsonl`` (:mod:`jitrope.runlog`: loss curve, step time, wall and CPU
  time), its evaluation JSONs (the final one, one per checkpoint for FD-emoji vs step, the
  every-size study), gathered into one record per run (:func:`run_record`);
- statistics over seeds: mean and sample standard deviation per encoding (:func:`mean_sd`), and the
  verdict rule (:func:`compare`, :func:`verdict`, :func:`top_group`): two encodings differ clearly
  only when the gap of their means exceeds the 95% margin of a two-sided t-test with the *pooled*
  standard deviation of every encoding in the comparison, ``t(0.975, df) * s_p * sqrt(1/n1 + 1/n2)``
  with ``s_p^2 = sum((n_i - 1) s_i^2) / df`` and ``df = sum(n_i - 1)``. A spread estimated from
  2 or 3 seeds of one encoding can be tiny by chance; the pooled one, from every encoding's
  seeds, does not collapse that way, and the t quantile pays for its few degrees of freedom;
- the every-size study: one flat record per (run, size, scaling) (:func:`size_records`), held-out
  v-loss as a ratio to an "oracle" run trained at that size (:func:`add_oracle_ratios`), the best
  scaling mode per encoding and regime, and the answer for one model across sizes (:func:`across_sizes`);
- FD-emoji sanity checks on real images (:func:`fd_sanity_checks`);
- where each encoding places the condition tokens, read from the model (:func:`condition_placement`).

The page is :mod:`studies.posenc.report`'s; the plans and the time they take, :mod:`studies.posenc.plan`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from jitrope.eval.metrics import frechet_distance, gaussian_stats
from jitrope.model import JiT
from jitrope.posenc import sincos_2d
from jitrope.runlog import read_metrics

KeyPath = Sequence[str]  # keys into a nested record, e.g. ("vloss", "mean")
CONFIDENCE = 0.95  # two-sided: an encoding is clearly apart when a t-test at this level says so


class Metric(NamedTuple):
    """A number of a run record: where it is, its label on the page, its format, and its direction."""

    path: Tuple[str, ...]
    label: str
    spec: str
    lower: bool  # lower is better


# What the study measures of each run, in page order (a column without a value in any run is left out).
QUALITY = [
    Metric(("final_train_loss",), "final train loss", ".4f", True),
    Metric(("vloss", "mean"), "held-out v-loss", ".4f", True),
    Metric(("vloss_null_cond", "mean"), "v-loss, no condition", ".4f", True),
    Metric(("class_samples", "fd_emoji"), "FD-emoji", ".3f", True),
    Metric(("class_samples", "class_acc"), "class acc", ".3f", False),
    Metric(("cond_samples", "fd_emoji"), "FD-emoji, cond. samples", ".3f", True),
    Metric(("cond_samples", "class_acc"), "class acc, cond. samples", ".3f", False),
    Metric(("cond_samples", "psnr"), "PSNR (dB)", ".2f", False),
    Metric(("cond_samples", "ssim"), "SSIM", ".3f", False),
]
CLOCKS = [
    Metric(("step_ms",), "wall ms/step", ".0f", True),
    Metric(("cpu_ms",), "CPU ms/step", ".0f", True),
    Metric(("train_wall_s",), "training wall (s)", ".0f", True),
]
# The same measure with the condition image (its tokens in the sequence) and without it (class only):
# label, with, without. The samples differ in more than the condition: see the page.
WITH_WITHOUT = [
    (QUALITY[1], ("vloss_null_cond", "mean"), "held-out v-loss"),
    (QUALITY[5], ("class_samples", "fd_emoji"), "FD-emoji"),
    (QUALITY[6], ("class_samples", "class_acc"), "class acc"),
]
SIZE_METRICS = [  # key, label, format, lower is better
    ("fd_emoji", "FD-emoji", ".3f", True),
    ("class_acc", "class acc", ".3f", False),
    ("vloss", "held-out v-loss", ".4f", True),
    ("vloss_ratio", "v-loss / oracle", ".3f", True),
]


# ----------------------------------------------------------------------------------- statistics
def get(record: Mapping[str, Any], path: KeyPath) -> Optional[float]:
    """``record[path[0]][path[1]]...`` as a float, or None where a key is missing or the value is None."""
    r: Any = record
    for k in path:
        if not isinstance(r, Mapping) or k not in r:
            return None
        r = r[k]
    return None if r is None else float(r)


def _finite(vals: Iterable[Optional[float]]) -> List[float]:
    return [x for x in vals if x is not None and math.isfinite(x)]


def mean_sd(vals: Iterable[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation of the finite values (sd None for one value: no noise estimate)."""
    v = _finite(vals)
    if not v:
        return None, None
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, sd


def fmt_pm(m: Optional[float], sd: Optional[float], spec: str) -> str:
    """``"m ± sd"`` in ``spec``; ``"m"`` without a spread, ``"-"`` without a value."""
    if m is None:
        return "-"
    return format(m, spec) if sd is None else f"{format(m, spec)} ± {format(sd, spec.lstrip('+'))}"


def per_encoding(rows: Sequence[Mapping], names: Sequence[str], path: KeyPath) -> Dict[str, List[Optional[float]]]:
    """``{encoding: [value of path, one per run]}`` for the runs of each name."""
    return {n: [get(r, path) for r in rows if r["pos_embed"] == n] for n in names}


def pooled_sd(groups: Iterable[Sequence[Optional[float]]]) -> Tuple[Optional[float], int]:
    """The pooled standard deviation ``s_p`` of the groups' finite values and its degrees of freedom
    ``df = sum(n_i - 1)``: the spread around each group's own mean, from every group at once (groups
    of one value add nothing). ``(None, 0)`` when no group has two values."""
    ss, df = 0.0, 0
    for g in groups:
        v = _finite(g)
        if len(v) > 1:
            m = sum(v) / len(v)
            ss += sum((x - m) ** 2 for x in v)
            df += len(v) - 1
    return (math.sqrt(ss / df), df) if df else (None, 0)


def _t_within(t: float, df: int) -> float:
    """``P(|T| < t)`` of Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4)."""
    th = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(th), math.cos(th) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2 * th / math.pi
    term = total = 1.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (th + s * math.cos(th) * total)


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided critical value ``t`` with ``P(|T| < t) = confidence`` for Student's t with ``df``
    degrees of freedom (e.g. 12.71 at df 1, 2.31 at df 8, 1.96 as df grows), by bisection."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    lo, hi = 0.0, 1.0
    while _t_within(hi, df) < confidence:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_within(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


class Stat(NamedTuple):
    mean: float
    sd: Optional[float]  # the group's own sample standard deviation (shown), None for one value
    n: int


@dataclass
class Comparison:
    """The outcome of :func:`compare`: the best name, the others apart from it or within noise
    (``(name, mean)`` pairs), every name's :class:`Stat`, and the pooled spread ``sd_pooled`` with its
    degrees of freedom ``df`` (0: no noise estimate, nothing is called apart)."""

    best: Optional[str]
    stats: Dict[str, Stat]
    apart: List[Tuple[str, float]]
    near: List[Tuple[str, float]]
    sd_pooled: Optional[float] = None
    df: int = 0

    @property
    def has_noise(self) -> bool:
        return self.df > 0

    @property
    def top(self) -> List[str]:
        """The best and those within noise of it (empty without a noise estimate)."""
        return [self.best] + [n for n, _ in self.near] if self.best is not None and self.has_noise else []

    def margin(self, n1: int, n2: int) -> Optional[float]:
        """The gap two means of ``n1`` and ``n2`` runs must exceed to be called apart."""
        if not self.has_noise:
            return None
        return t_quantile(CONFIDENCE, self.df) * self.sd_pooled * math.sqrt(1 / n1 + 1 / n2)


def compare(values: Mapping[str, Sequence[Optional[float]]], lower: bool) -> Comparison:
    """Best by mean, and which others are apart from it (gap above :meth:`Comparison.margin`, the 95%
    two-sided t-test with the pooled standard deviation of every name) or within noise. Names without
    a value are left out; a pooled spread of 0 calls nothing apart."""
    stats = {}
    for n, v in values.items():
        m, sd = mean_sd(v)
        if m is not None:
            stats[n] = Stat(m, sd, len(_finite(v)))
    if not stats:
        return Comparison(None, {}, [], [])
    best = (min if lower else max)(stats, key=lambda n: stats[n].mean)
    sp, df = pooled_sd(values[n] for n in stats)
    if sp is not None and sp <= 1e-12 * max(abs(s.mean) for s in stats.values()):
        sp = 0.0  # rounding, not spread: identical runs call nothing apart
    c = Comparison(best, stats, [], [], sp, df)
    for n, s in stats.items():
        if n != best:
            margin = c.margin(stats[best].n, s.n)
            apart = margin is not None and margin > 0 and abs(s.mean - stats[best].mean) > margin
            (c.apart if apart else c.near).append((n, s.mean))
    return c


def rule_text(c: Comparison, spec: str) -> str:
    """The spread behind a verdict, in words: the pooled sd, its df and the margin at the best's count."""
    if not c.has_noise:
        return ""
    n = c.stats[c.best].n
    return (
        f"pooled sd {format(c.sd_pooled, spec)}, df {c.df}; margin {format(c.margin(n, n), spec)} at {n} vs {n} seeds"
    )


def verdict(values: Mapping[str, Sequence[Optional[float]]], lower: bool, spec: str, label: str) -> str:
    """One mechanical sentence of :func:`compare`'s outcome."""
    c = compare(values, lower)
    if len(c.stats) < 2:
        return f"{label}: too few runs to compare."
    if not c.has_noise:
        order = sorted(c.stats, key=lambda n: c.stats[n].mean, reverse=not lower)
        return (
            f"{label} (one seed, no noise estimate): "
            + (" < " if lower else " > ").join(f"`{n}` {format(c.stats[n].mean, spec)}" for n in order)
            + ("" if lower else " (higher is better)")
            + "."
        )
    b = c.stats[c.best]
    out = f"{label}: best `{c.best}` ({fmt_pm(b.mean, b.sd, spec)}; {rule_text(c, spec)})"
    if c.apart:
        out += "; clearly worse: " + ", ".join(f"`{n}` {format(m, spec)}" for n, m in c.apart)
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
    images (the floor at the sample count), of blurred held-out images (box blur over an eighth of the
    image side: 4x4 at 32x32, 8x8 at 64x64, so every size loses the same detail) and of uniform noise
    (both large), the feature network's accuracies, and the Fréchet distance of two Gaussians against
    the closed form ``|dmu|^2 + d (sqrt(a) - 1)^2`` (from exact moments and from 20000 samples)."""
    g = generator
    sub = train_images[torch.randperm(len(train_images), generator=g)[:n]]
    k = max(2, held_images.shape[-1] // 8)
    blur = F.avg_pool2d(held_images, k).repeat_interleave(k, -1).repeat_interleave(k, -2)
    d = 16
    mu, s1 = torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    x = torch.randn(20000, d, generator=g, dtype=torch.float64)
    y = 1.5 * torch.randn(20000, d, generator=g, dtype=torch.float64) + 0.5
    return {
        "identical (training split vs itself)": float(fd(train_images)),
        f"real held-out images (all {len(held_images)})": float(fd(held_images)),
        f"real training images ({len(sub)}, the sample count)": float(fd(sub)),
        f"blurred held-out images ({k}x{k} box)": float(fd(blur)),
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


# ----------------------------------------------------------------------------------- condition tokens
def _centres(n_cond: int, n_image: int) -> List[float]:
    """Where the aligned centres of ``n_cond`` condition cells fall on an image axis of ``n_image``
    cells: ``(i + 0.5) * n_image / n_cond - 0.5``."""
    return [(i + 0.5) * n_image / n_cond - 0.5 for i in range(n_cond)]


def _listed(vals: Sequence[float]) -> str:
    v = [f"{x:g}" for x in vals]
    return ", ".join(v) if len(v) <= 4 else f"{v[0]}, {v[1]}, ..., {v[-1]}"


def condition_placement(mc, names: Sequence[str]) -> Dict[str, str]:
    """``{encoding: one line}``: where each encoding of ``names`` puts the condition tokens of a model of
    config ``mc`` (a ``JiTConfig`` with a condition image), read from the model's own position parts
    and checked against the rule the line states (aligned centres ``y = (i + 0.5) * gh / ch - 0.5``
    for RoPE and the sin-cos table, the slots after the image's for ``learned1d``, the condition's
    own row/column tables for ``factorized2d``). Raises ``AssertionError`` if the model disagrees."""
    out = {}
    for name in names:
        model = JiT(dataclasses.replace(mc, pos_embed=name, pos_impl="torch"))
        (gh, gw), (ch, cw) = model.cfg.grid, model.cfg.cond_grid
        n_img, n_cond = gh * gw, ch * cw
        want = torch.tensor([(y, x) for y in _centres(ch, gh) for x in _centres(cw, gw)])
        said = []
        for part_name, part in model.pos.parts.items():
            if part_name == "learned1d":
                assert part.pos_embed.shape[0] == n_img + n_cond, part.pos_embed.shape
                slots = f"slots {n_img}..{n_img + n_cond - 1} of its {n_img + n_cond}-slot table"
                said.append(
                    f"a learned vector per slot: the {n_cond} condition tokens take {slots}, after the image's "
                    f"0..{n_img - 1} (no 2D relation between them)"
                )
            elif part_name == "factorized2d":
                rows, cols = part.cond_pos_h.shape[0], part.cond_pos_w.shape[0]
                said.append(
                    f"its own row and column tables for the condition grid: token (i, j) of the {ch}x{cw} grid gets "
                    f"`cond_pos_h[i] + cond_pos_w[j]` (tables of {rows} x {cols} rows), apart from the image's "
                    f"`pos_h`/`pos_w`"
                )
            elif part.rotary:
                got = part.coords[-n_cond:].double()
                assert torch.allclose(got, want.double(), atol=1e-6), (name, got[:3])
                said.append(
                    f"rotated by the aligned centres of its cells on the {gh}x{gw} image grid, y = (i + 0.5) * {gh} / "
                    f"{ch} - 0.5: rows {_listed(_centres(ch, gh))} among the image's 0..{gh - 1}"
                    + ("" if (ch, gh) == (cw, gw) else f", columns {_listed(_centres(cw, gw))}")
                )
            elif part_name == "sincos2d":
                table = part.table[n_img:].double()
                assert torch.allclose(table, sincos_2d(want, part.width).double(), atol=1e-6), name
                said.append(f"the fixed sin-cos table evaluated at the aligned centres ({_listed(_centres(ch, gh))})")
        out[name] = "; plus ".join(said) if len(said) < 2 else f"{said[0]}, plus the same rotation as `rope2d`"
    return out
