"""The results page's pictures: loss curves, metric bars, FD-emoji against step, the every-size plots
and the sample panel. Every picture is drawn from the run records (:mod:`studies.posenc.study`)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from .study import SIZE_METRICS, Metric, mean_sd, per_encoding, size_label, size_stats  # noqa: E402


class Plots:
    """Saves figures as ``<stem>_<suffix>.png`` (a 256-colour palette keeps the docs small) and
    remembers their file names by suffix."""

    def __init__(self, stem: Path):
        self.stem, self.files = Path(stem), {}

    def save(self, fig, suffix: str) -> str:
        p = Path(f"{self.stem}_{suffix}.png")
        fig.tight_layout()
        fig.savefig(p, dpi=80)
        plt.close(fig)
        Image.open(p).convert("RGB").quantize(256).save(p, optimize=True)
        self.files[suffix] = p.name
        return p.name

    def keep(self, suffix: str) -> None:
        """Name an existing picture of this stem (drawn by an earlier build that had what it needs)."""
        p = Path(f"{self.stem}_{suffix}.png")
        if p.is_file():
            self.files[suffix] = p.name


def _colors(names):
    return {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}


def plot_loss(P: Plots, rows, names) -> None:
    colors = _colors(names)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n in names:
        rs = [r for r in rows if r["pos_embed"] == n and r.get("loss_curve")]
        if not rs:
            continue
        steps = rs[0]["loss_curve"]["steps"]
        k = min(len(r["loss_curve"]["loss"]) for r in rs)
        mean = [sum(r["loss_curve"]["loss"][i] for r in rs) / len(rs) for i in range(k)]
        ax.plot(steps[:k], mean, label=n, color=colors[n], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.legend(fontsize=7)
    P.save(fig, "loss")


def plot_bars(P: Plots, rows, names, metrics: Sequence[Metric]) -> None:
    colors = _colors(names)
    ncols = 3
    nrows = (len(metrics) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(10, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    for ax, m in zip(axes.flat, metrics):
        st = [mean_sd(per_encoding(rows, names, m.path)[n]) for n in names]
        ax.bar(
            range(len(names)),
            [v or 0 for v, _ in st],
            yerr=[sd or 0 for _, sd in st],
            capsize=3,
            color=[colors[n] for n in names],
        )
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{m.label} ({'lower' if m.lower else 'higher'} is better)", fontsize=8)
    P.save(fig, "bars")


def plot_fd_steps(P: Plots, rows, names, step_n_per_class: int) -> None:
    colors = _colors(names)
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
            steps, [m for m, _ in st], yerr=[sd or 0 for _, sd in st], label=n, color=colors[n], capsize=2, marker="o"
        )
    ax.set_xlabel("step")
    ax.set_ylabel(f"FD-emoji ({step_n_per_class} samples per class)")
    ax.legend(fontsize=7)
    P.save(fig, "fd_steps")


def plot_sizes(P: Plots, flat, sizes, combos: Mapping[str, Mapping[Tuple[str, str], str]], train_px) -> None:
    """One plot per metric: metric vs size, one line per encoding x regime at its best scaling mode."""
    encs = sorted({k[0] for c in combos.values() for k in c})
    colors = _colors(encs)
    styles = {"single": "-", "mixed": "--"}
    for key, label, _, lower in SIZE_METRICS:
        stats = size_stats(flat, key)
        if not stats:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for (enc, regime), scaling in sorted(combos.get(key, {}).items()):
            pts = [(i, stats.get((enc, regime, scaling, hw), (None, None, 0))) for i, hw in enumerate(sizes)]
            pts = [(i, m, sd or 0) for i, (m, sd, _) in pts if m is not None]
            if pts:
                xs, ys, es = zip(*pts)
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
        ticks = [size_label(hw) + (" (train)" if hw == (train_px, train_px) else "") for hw in sizes]
        ax.set_xticks(range(len(sizes)), ticks, fontsize=7)
        ax.set_xlabel("sampling size (pixels; rows x columns)")
        ax.set_ylabel(f"{label} ({'lower' if lower else 'higher'} is better)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
        P.save(fig, f"size_{key}")


def _grid_file(rows, same, enc, regime, seed, hw, scaling):
    run = next(
        (r for r in rows if r["pos_embed"] == enc and r.get("regime", "single") == regime and r["seed"] == seed),
        None,
    )
    if run is None or not run.get("grids"):
        return None
    scaling = same.get((enc, regime, seed, hw, scaling)) or scaling
    name = f"px{hw[0]}" if hw[0] == hw[1] else f"px{hw[0]}x{hw[1]}"
    f = Path(run["grids"]) / f"{name}_{scaling}.png"
    return f if f.exists() else None


def plot_size_samples(P: Plots, rows, flat, sizes, combos, seed) -> None:
    """Sample grids of one seed at every size (the same noise seed everywhere), a row per encoding x
    regime at its best FD-emoji scaling mode. Drawn only when the runs' grids are on disk; otherwise
    the panel an earlier build drew from them is kept (:meth:`Plots.keep`)."""
    best = combos.get("fd_emoji", {})
    same = {(x["pos_embed"], x["regime"], x["seed"], tuple(x["hw"]), x["scaling"]): x.get("same_as") for x in flat}
    keys = sorted(best)
    files: Dict[Tuple, List] = {k: [_grid_file(rows, same, *k, seed, hw, best[k]) for hw in sizes] for k in keys}
    if not any(f for fs in files.values() for f in fs):
        P.keep("size_samples")
        return
    fig, axes = plt.subplots(len(keys), len(sizes), figsize=(1.5 * len(sizes), 1.7 * len(keys)), squeeze=False)
    for i, (enc, regime) in enumerate(keys):
        for j, hw in enumerate(sizes):
            ax, f = axes[i][j], files[(enc, regime)][j]
            ax.axis("off")
            if f is not None:
                ax.imshow(Image.open(f))
            else:
                ax.text(0.5, 0.5, "not available", ha="center", va="center", fontsize=7)
            if i == 0:
                ax.set_title(size_label(hw), fontsize=8)
            if j == 0:
                label = f"{enc}\n{regime}\n{best[(enc, regime)]}"
                ax.text(-0.05, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=6)
    P.save(fig, "size_samples")
