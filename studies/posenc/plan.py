"""The study's plans: what runs, and the time it takes.

A plan is a YAML file in ``studies/posenc/plans/`` (``--scale NAME``) or anywhere (``--plan-file``):
the training config, encodings, seeds, steps, the evaluation's sample counts, the every-size study,
the training regimes, and the measured step time of its config with the command that measured it.
A plan may start from another (``base: cpu.yaml``) and list only what it changes; mappings merge
key by key, everything else replaces. Options on the command line override a plan's values.

The time a plan takes (:func:`estimate_seconds`) starts from that measured step time; what the runs of
a study have trained so far, and the time the rest takes at their own step time, is
:func:`training_progress`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from jitrope.config import Config, load_config
from jitrope.eval.evaluate import resolution_scalings, scaling_same_as
from jitrope.model import JiT

PLANS = Path(__file__).resolve().parent / "plans"

# The keys a plan may hold. OPTION_KEYS can also be given on the command line (--steps, --res-px, ...).
OPTION_KEYS = (
    "config",
    "encodings",
    "seeds",
    "steps",
    "jobs",
    "device",
    "ckpt_every",
    "log_every",
    "out_dir",
    "n_per_class",
    "n_cond",
    "max_images",
    "sample_steps",
    "t_grid",
    "step_n_per_class",
    "step_seeds",
    "res_px",
    "res_hw",
    "res_n_per_class",
    "res_max_images",
    "res_seeds",
    "scalings",
    "earlier",
)
PLAN_KEYS = OPTION_KEYS + ("base", "about", "regimes", "previous", "also_show", "setting_plans", "step_time")
REGIME_KEYS = ("size_factors", "overrides", "encoding_overrides", "about")


class PlanError(ValueError):
    """A plan file that cannot be read or holds keys no plan has."""


def plan_names() -> List[str]:
    """The plans of ``studies/posenc/plans/``, by name."""
    return sorted(p.stem for p in PLANS.glob("*.yaml"))


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def load_plan(path, _seen: Sequence[Path] = ()) -> Dict[str, Any]:
    """The plan in ``path`` with its ``base`` (a path relative to it) merged underneath."""
    path = Path(path).resolve()
    if path in _seen:
        raise PlanError(f"plan {path}: its bases form a loop")
    try:
        plan = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"plan {path}: {e}") from None
    if not isinstance(plan, Mapping):
        raise PlanError(f"plan {path}: not a mapping of keys")
    unknown = sorted(set(plan) - set(PLAN_KEYS))
    if unknown:
        raise PlanError(f"plan {path}: unknown keys {unknown}; a plan holds {list(PLAN_KEYS)}")
    for name, regime in (plan.get("regimes") or {}).items():
        bad = sorted(set(regime or {}) - set(REGIME_KEYS))
        if bad:
            raise PlanError(f"plan {path}: regime {name!r} has unknown keys {bad}; a regime holds {list(REGIME_KEYS)}")
    if plan.get("base"):
        plan = _merge(load_plan(path.parent / plan["base"], (*_seen, path)), plan)
    plan.pop("base", None)
    return plan


# ----------------------------------------------------------------------------------- regimes
def regime_sizes(regime: Mapping[str, Any], px: int, patch: int) -> List[int]:
    """Image sizes a regime trains at, for a config of ``px`` pixels (multiples of 2 patches, so the
    null condition keeps an integer grid)."""
    step = 2 * patch
    return [max(step, round(f * px / step) * step) for f in regime.get("size_factors") or [1.0]]


def regime_overrides(regime: Mapping[str, Any], cfg: Config) -> List[str]:
    """The config overrides of ``regime`` for a loaded config ``cfg`` (its templates filled in)."""
    mc = cfg.model_config()
    sizes = regime_sizes(regime, mc.img_size, mc.patch_size)
    tokens = cfg.train.batch_size * (mc.img_size // mc.patch_size) ** 2
    text = "[" + ",".join(f"{s}x{s}" for s in sizes) + "]"  # data.sizes takes HEIGHTxWIDTH in pixels
    return [o.format(sizes=text, tokens=tokens) for o in regime.get("overrides") or []]


def regime_about(regime: Mapping[str, Any], cfg: Config) -> str:
    """The regime's one line, filled in for ``cfg``."""
    mc = cfg.model_config()
    sizes = regime_sizes(regime, mc.img_size, mc.patch_size)
    tokens = cfg.train.batch_size * (mc.img_size // mc.patch_size) ** 2
    text = ", ".join(f"{s}²" for s in sizes)
    return str(regime.get("about") or "").format(px=mc.img_size, sizes_text=text, tokens=tokens)


# ----------------------------------------------------------------------------------- estimates
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


# ----------------------------------------------------------------------------------- time
def _seq_tokens(cfg: Config) -> int:
    mc = cfg.model_config()
    cond = 0 if mc.cond_img_size is None else (mc.cond_img_size // mc.patch_size) ** 2
    return (mc.img_size // mc.patch_size) ** 2 + cond + mc.in_context_len


def step_time(a) -> Optional[Dict[str, Any]]:
    """The plan's measured step time for the study ``a`` (a resolved study, see ``run.parse_args``):
    ``{"seconds", "measured", "clock", "measured_by", "note", "config", "scaled"}``, or None when the plan
    has none. ``measured`` is the plan's figure for its ``config``; when ``a.config`` is another config,
    ``seconds`` is that figure scaled by the tokens of one batch (sequence length x batch) of the two
    configs, and ``scaled`` says so."""
    st = dict(a.plan.get("step_time") or {})
    if st.get("seconds") is None:
        return None
    measured = Path(a.plan_root) / a.plan["config"]
    st.update(config=a.plan["config"], scaled=None, measured=st["seconds"])
    if measured.resolve() != Path(a.config).resolve():
        old, new = load_config(measured), load_config(a.config, list(a.overrides))
        ratio = (_seq_tokens(new) * new.train.batch_size) / (_seq_tokens(old) * old.train.batch_size)
        st.update(seconds=st["seconds"] * ratio, scaled=f"scaled by {ratio:.3g} from {a.plan['config']}")
    return st


def study_plan(a) -> StudyPlan:
    """What the study ``a`` runs, for the time estimate; the scaling modes that sample on their own at each
    size are counted on the models themselves (``jitrope.eval.evaluate.scaling_same_as``)."""
    cfg = load_config(a.config, list(a.overrides))
    mc = cfg.model_config()
    sizes = [(p, p) for p in a.res_list] + list(a.hw_list)
    units = 0.0
    for name in a.names if sizes else ():
        model = JiT(dataclasses.replace(mc, pos_embed=name, pos_impl="torch"))
        for hw in sizes:
            usable = [m for m, why in resolution_scalings(model, hw, a.scaling_list).items() if why is None]
            own = [m for i, m in enumerate(usable) if scaling_same_as(model, hw, m, usable[:i]) is None]
            units += len(own) * hw[0] * hw[1] / mc.img_size**2
    return StudyPlan(
        train_runs=len(a.names) * len(a.seed_list),
        extra_train_runs=len(a.names) * len(a.res_seeds_list) * (len(a.regime_list) - 1),
        steps=a.steps,
        batch=cfg.train.batch_size,
        checkpoints=a.steps // a.ckpt_every,
        size_sets=len(a.res_seeds_list) * len(a.regime_list) if sizes else 0,
        size_units=units,
        n_classes=mc.num_classes,
        n_per_class=a.n_per_class,
        step_n_per_class=a.step_n_per_class,
        res_n_per_class=a.res_n_per_class,
        n_cond=a.n_cond,
        max_images=a.max_images,
        res_max_images=a.res_max_images,
        t_points=len(a.t_list),
        sample_steps=a.sample_steps,
        jobs=a.jobs,
    )


def _shown(path, root) -> str:
    p, r = Path(path).resolve(), Path(root).resolve()
    return str(p.relative_to(r)) if p.is_relative_to(r) else str(path)


def plan_lines(a) -> List[str]:
    """What ``--plan`` prints before the progress: the runs, the measured step time of the plan's config
    and the command that measured it, and the time the study takes at that rate."""
    per = {g: len(a.names) * len(a.seed_list if g == a.regime_list[0] else a.res_seeds_list) for g in a.regime_list}
    lines = [
        f"plan {a.plan_name} ({_shown(a.plan_file, a.plan_root)}): {a.plan.get('about', '')}",
        f"{sum(per.values())} runs ({', '.join(f'{g}: {k}' for g, k in per.items())}) of {a.steps} steps: "
        f"{', '.join(a.names)} x seeds {a.seed_list}, {a.jobs} at a time on {a.device}",
    ]
    st = step_time(a)
    if st is None:
        note = (a.plan.get("step_time") or {}).get("note") or "the plan has none"
        return lines + [f"step time: not measured ({note}); no time estimate"]
    unit = "CPU-s" if st["clock"] == "cpu" else "s"
    lines += [
        f"measured step time: {st['measured']:.3f} {unit}/step of {st['config']} ({st.get('note') or ''}), "
        "measured with",
        f"  {st['measured_by']}",
    ]
    if st["scaled"]:
        lines.append(f"for {_shown(a.config, a.plan_root)}: {st['seconds']:.3f} {unit}/step ({st['scaled']})")
    e = {k: v / 3600 for k, v in estimate_seconds(study_plan(a), st["seconds"]).items()}
    lines.append(
        f"time at that rate, {a.jobs} at a time: training {e['train']:.1f} h, evaluation {e['eval']:.1f} h, "
        f"every-size study {e['sizes']:.1f} h; total {e['total']:.1f} h"
    )
    return lines


def progress_line(out_dir, runs: Sequence[Sequence[Mapping[str, Any]]], steps: int, jobs: int) -> str:
    """What the runs in ``out_dir`` have trained (``runs``: each run's ``metrics.jsonl`` records) and the
    time the rest of the training takes at the step time measured in them."""
    p = training_progress(runs, steps, jobs)
    head = f"progress in {out_dir}: {p['done']} of {len(runs)} runs trained, {p['partial']} partial"
    if p["remaining"] == 0:
        return head + "; training is done (the eval and report stages resume from there)"
    if p["cpu_s_per_step"] is None:
        return head + f"; {p['remaining']} steps to train, no step time measured in them yet"
    return (
        head + f"; {p['remaining']} steps to train: {p['hours']:.1f} h at {p['cpu_s_per_step']:.2f} CPU-s/step, the "
        f"rate of these runs (their metrics.jsonl), {jobs} at a time; evaluation and the every-size study follow"
    )
