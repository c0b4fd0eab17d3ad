"""The every-size part of a results page: one model sampled at many image sizes under every scaling
mode, per training regime (tables, plots, verdicts and the answer across sizes)."""

from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

from .study import SIZE_METRICS, across_sizes, across_sizes_values, fmt_pm, size_label, size_stats, verdict

MAX_NEAR = 3  # an answer names the runners-up within noise of the best only up to this many
MODES = ("extrapolate", "interpolate", "ntk", "yarn")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """A Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def grid_seed(flat) -> int:
    """The seed of the sample panel: the smallest with an every-size study (only those runs have grids)."""
    return min(x["seed"] for x in flat)


def _regimes_present(flat) -> List[str]:
    return sorted({x["regime"] for x in flat}, key=lambda g: (g != "single", g))


def _intro(flat, info, train_px) -> List[str]:
    present = _regimes_present(flat)
    oracles = "; ".join(f"`{g}`: {', '.join(size_label(s) for s in info.trained_sizes.get(g, ()))}" for g in present)
    regimes = "; ".join(
        f"`{g}`: trained {info.regimes.get(g, g)}" + (f" ({info.regime_notes[g]})" if g in info.regime_notes else "")
        for g in present
    )
    seeds = ", ".join(f"`{g}` {sorted({x['seed'] for x in flat if x['regime'] == g})}" for g in present)
    return [
        "### Every size: one model for many image sizes",
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
        f"that size ({oracles}).",
        "",
        f"Training regimes: {regimes}. Seeds: {seeds}.",
        "",
    ]


def _table_rows(flat, stats, sizes, key, spec, combos) -> List[List[str]]:
    repeats: Dict[Tuple, Set] = {}  # (enc, regime, mode, hw) -> the modes whose samples it repeats
    for x in flat:
        repeats.setdefault((x["pos_embed"], x["regime"], x["scaling"], tuple(x["hw"])), set()).add(x.get("same_as"))
    body = []
    for regime in _regimes_present(flat):
        for enc in dict.fromkeys(x["pos_embed"] for x in flat if x["regime"] == regime):
            for m in (m for m in MODES if any(k[:3] == (enc, regime, m) for k in stats)):
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
    return body


def sizes_section(flat, sizes, combos, info, files, train_px) -> List[str]:
    """The every-size part of a section: a table and a plot per metric, the verdicts across sizes and the
    sample panel (``files``: the pictures drawn, by suffix)."""
    L = _intro(flat, info, train_px)
    head = ["pos_embed", "regime", "scaling"]
    head += [size_label(s) + (" (train)" if s == (train_px, train_px) else "") for s in sizes]
    for key, label, spec, lower in SIZE_METRICS:
        stats = size_stats(flat, key)
        if not stats:
            continue
        L += [f"#### {label} ({'lower' if lower else 'higher'} is better)", ""]
        L += md_table(head, _table_rows(flat, stats, sizes, key, spec, combos))
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
        values = across_sizes_values(flat, key, sizes)
        L.append("- " + verdict(values, lower, spec, f"{label} over sizes (encoding | regime | scaling)"))
    L += [""]
    if "size_samples" in files:
        L += [
            f"Samples of seed {grid_seed(flat)} at every size (rows: encoding, regime and its best FD-emoji scaling "
            "mode; in each grid, rows are classes):",
            "",
            f"![samples at every size]({files['size_samples']})",
            "",
        ]
    return L


def _combo(key: str, several: bool) -> str:  # "enc | regime | scaling" in words
    e, g, sc = key.split(" | ")
    return f"`{e}` {sc}" + (f" ({g} regime)" if several else "")


def sizes_claims(flat, sizes) -> List[str]:
    """The answer across sizes, one claim a line: which encoding, scaling and regime (the page says how
    each regime trains) serve every size of the study best (FD-emoji averaged over the sizes, per seed,
    then over seeds; when more than ``MAX_NEAR`` others are within noise of it, none is named the
    answer), and the best on held-out v-loss over the sizes when it stands out."""
    out = []
    several = len({x["regime"] for x in flat}) > 1
    where = f"For one model across sizes ({', '.join(size_label(s) for s in sizes)})"
    c = across_sizes(flat, "fd_emoji", True, sizes)
    if c.best is not None:
        enc, regime, scaling = c.best.split(" | ")
        head = f"`{enc}` with `{scaling}` scaling" + (f" ({regime} regime)" if several else "")
        fd = fmt_pm(c.stats[c.best].mean, c.stats[c.best].sd, ".3f")
        if c.has_noise and len(c.near) > MAX_NEAR:  # most combinations tie: naming one would overstate it
            out.append(
                f"{where}: no encoding, scaling and regime is clearly best on FD-emoji averaged over the sizes: "
                f"{len(c.near) + 1} of {len(c.stats)} are within noise of the lowest, {head} ({fd})"
                + (f"; {len(c.apart)} {'is' if len(c.apart) == 1 else 'are'} clearly worse." if c.apart else ".")
            )
        else:
            near = ", ".join(f"{_combo(n, several)} ({v:.3f})" for n, v in c.near)
            out.append(
                f"{where}: use {head} (FD-emoji averaged over the sizes {fd})"
                + (f"; within noise of it: {near}" if c.near and c.has_noise else "")
                + ("" if c.has_noise else " (one seed: no noise estimate)")
                + "."
            )
    v = across_sizes(flat, "vloss", True, sizes)
    if v.best is not None and v.has_noise and len(v.near) <= MAX_NEAR:
        enc, regime, scaling = v.best.split(" | ")
        near = ", ".join(f"{_combo(n, several)} ({m:.4f})" for n, m in v.near)
        out.append(
            f"On held-out v-loss averaged over the sizes the best is `{enc}` with `{scaling}` scaling"
            + (f" ({regime} regime)" if several else "")
            + f" ({fmt_pm(v.stats[v.best].mean, v.stats[v.best].sd, '.4f')})"
            + (f"; within noise of it: {near}" if v.near else "")
            + (f"; the other {len(v.apart)} are clearly worse" if v.apart else "")
            + "."
        )
    return out
