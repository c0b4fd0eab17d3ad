"""The answer of a results page and of the README, one claim a line, from the same records and rule as
the tables (:mod:`studies.posenc.study`): which encoding leads each section, the 256 -> 320 question
(with and without the condition image), whether FD-emoji's order still moves, the answer across sizes,
and whether an earlier section's answer held in the lead one."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .everysize import sizes_claims
from .study import QUALITY, WITH_WITHOUT, Comparison, Metric, compare, get, mean_sd, per_encoding, ranking_by_step


def names_text(names: Sequence[str]) -> str:
    """```a```, ```a` and `b```, ```a`, `b` and `c```."""
    q = [f"`{n}`" for n in names]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


def quality_metrics(rows) -> List[Metric]:
    """The quality metrics of :data:`QUALITY` that some run of ``rows`` has."""
    return [m for m in QUALITY if any(get(r, m.path) is not None for r in rows)]


def tally(main, names, metrics: Sequence[Metric]) -> Dict[str, int]:
    """``{encoding: on how many of metrics it is the best or within noise of the best}``."""
    t = {n: 0 for n in names}
    for m in metrics:
        for n in compare(per_encoding(main, names, m.path), m.lower).top:
            t[n] += 1
    return t


def leaders(t: Dict[str, int]) -> List[str]:
    best = max(t.values(), default=0)
    return [n for n, v in t.items() if v == best] if best else []


def tally_claim(main, names) -> Optional[str]:
    metrics = quality_metrics(main)
    t = tally(main, names, metrics)
    lead = leaders(t)
    if not lead:
        return None
    verb = "is" if len(lead) == 1 else "are"
    best = f"the best or within noise of the best on {t[lead[0]]} of {len(metrics)} quality metrics"
    return f"{names_text(lead)} {verb} {best}."


def top_text(c: Comparison) -> str:
    """The best of a comparison and who is within noise of it, in few words."""
    if not c.has_noise:
        return f"`{c.best}` (one seed: no noise estimate)"
    if not c.apart:
        return f"all {len(c.stats)} within noise"
    return f"`{c.best}`" + (f" with {names_text([n for n, _ in c.near])} within noise" if c.near else " alone")


def has_with_without(main) -> bool:
    return any(get(r, WITH_WITHOUT[1][0].path) is not None for r in main)


def deltas(main, names, with_path, without_path) -> Dict[str, List[Optional[float]]]:
    """Per encoding and run: the measure with the condition minus the same without it (paired by run)."""
    out = {}
    for n in names:
        pairs = [(get(r, with_path), get(r, without_path)) for r in main if r["pos_embed"] == n]
        out[n] = [a - b if a is not None and b is not None else None for a, b in pairs]
    return out


def with_without_claims(main, names, tokens_with: int, tokens_without: int) -> List[str]:
    """Which encodings lead with the condition (``tokens_with``) and without it (``tokens_without``), and
    whether the change between the two differs clearly between encodings."""
    if not has_with_without(main):
        return []
    w, wo, ch, apart = [], [], [], []
    for m, without, label in WITH_WITHOUT:
        w.append(f"{label} {top_text(compare(per_encoding(main, names, m.path), m.lower))}")
        wo.append(f"{label} {top_text(compare(per_encoding(main, names, without), m.lower))}")
        d = deltas(main, names, m.path, without)
        means = [x for x in (mean_sd(v)[0] for v in d.values()) if x is not None]
        ch.append(f"{label} {min(means):+{m.spec}} to {max(means):+{m.spec}}" if means else f"{label} -")
        c = compare(d, m.lower)
        if c.apart:
            apart.append(f"{label}, where `{c.best}` gains most and {names_text([n for n, _ in c.apart])} clearly less")
    return [
        f"With the condition ({tokens_with} tokens), best: " + "; ".join(w) + ".",
        f"Without it ({tokens_without} tokens), best: " + "; ".join(wo) + ".",
        f"Change from {tokens_without} to {tokens_with} tokens (mean per encoding): " + "; ".join(ch) + ".",
        "The change differs clearly between encodings on " + "; ".join(apart) + "."
        if apart
        else "No encoding's change is clearly apart from the others'.",
    ]


def fd_order_claim(main, names) -> Optional[str]:
    """Whether FD-emoji's order of the encodings is the same at the last two checkpoints."""
    ranks = ranking_by_step(main, names)
    if len(ranks) < 2:
        return None
    (s1, r1), (s2, r2) = list(ranks.items())[-2:]
    if r1 == r2:
        return f"FD-emoji's order of the encodings is the same at the last two checkpoints (steps {s1} and {s2})."
    return (
        f"FD-emoji's order still changes between the last two checkpoints ({' < '.join(r1)} at step {s1}, "
        f"{' < '.join(r2)} at step {s2}; means only): longer runs may reorder it."
    )


def section_claims(prep, info) -> List[str]:
    """A section's answer, one claim a line."""
    out = [tally_claim(prep.main, prep.names)]
    out += with_without_claims(prep.main, prep.names, info.tokens, info.tokens_without)
    out.append(fd_order_claim(prep.main, prep.names))
    if prep.flat and prep.sizes:
        out += sizes_claims(prep.flat, prep.sizes)
    return [c for c in out if c]


def held_claims(lead, lead_info, other, other_info) -> List[str]:
    """Whether ``other``'s answer (the encodings that lead its tally) held in ``lead``, on the quality
    metrics both measured: the first line says Yes / Partly / No, each further line one metric whose
    group of best-or-within-noise encodings differs."""
    common = [m for m in quality_metrics(lead.main) if m in quality_metrics(other.main)]
    names = [n for n in lead.names if n in other.names]
    t1, t2 = tally(lead.main, names, common), tally(other.main, names, common)
    l1, l2 = leaders(t1), leaders(t2)
    if not l1 or not l2:
        return []
    word = "Yes" if l1 == l2 else ("Partly" if set(l1) & set(l2) else "No")
    verb = "lead" if len(l1) > 1 else "leads"
    out = [
        f"Did the {other_info.short} answer hold at {lead_info.short}? {word}: {names_text(l2)} led at "
        f"{other_info.short} ({t2[l2[0]]} of {len(common)} quality metrics both measured), {names_text(l1)} {verb} at "
        f"{lead_info.short} ({t1[l1[0]]} of {len(common)})."
    ]
    for m in common:
        a = compare(per_encoding(other.main, names, m.path), m.lower).top
        b = compare(per_encoding(lead.main, names, m.path), m.lower).top
        if set(a) != set(b):
            out.append(
                f"{m.label}: best or within noise {names_text(a) if a else 'none'} at {other_info.short}, "
                f"{names_text(b) if b else 'none'} at {lead_info.short}."
            )
    return out
