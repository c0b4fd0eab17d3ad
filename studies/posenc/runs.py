"""The runs of a study on disk: training and evaluating them (``python -m jitrope.train`` and
``python -m jitrope.evaluate`` in subprocesses, each resuming what is there) and reading them back.

Layout: ``<out_dir>/seed<S>/<encoding, '+' as '_'>/`` for the main ablation (``single``) and
``<out_dir>/<regime>/seed<S>/<encoding>/`` for other regimes; in each, the trainer's ``checkpoints/
step_XXXXXXXX``, ``metrics.jsonl`` and logs, and the evaluations ``eval_<steps>.json`` (the final one),
``eval_steps/step_*.json`` (FD-emoji against step) and ``eval_sizes_<steps>.json`` (the every-size study).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from jitrope.checkpoint import list_checkpoints
from jitrope.config import ConfigError, load_config
from jitrope.data import build_dataset, to_float
from jitrope.eval.featnet import load_or_train_featnet
from jitrope.eval.metrics import frechet_distance, gaussian_stats

from .plan import regime_overrides
from .study import fd_sanity_checks, run_record

ROOT = Path(__file__).resolve().parents[2]


def run_dir(args, name: str, seed: int, regime: str = "single") -> Path:
    base = Path(args.out_dir) if regime == "single" else Path(args.out_dir) / regime
    return base / f"seed{seed}" / name.replace("+", "_")


def regime_runs(args) -> List[Tuple[str, int, str]]:
    """(encoding, seed, regime) of every run: the main ablation, then the other regimes' size-study seeds;
    seed by seed, so that a cut-short study has whole seeds."""
    jobs = [(n, s, "single") for s in args.seed_list for n in args.names]
    for g in args.regime_list[1:]:
        jobs += [(n, s, g) for s in args.res_seeds_list for n in args.names]
    return jobs


def check_regimes(args) -> None:
    """Fill in ``args.regime_overrides``; a regime's overrides must be keys of this jitrope (the mixed
    regime needs packed mixed-size training), else ``ConfigError`` names them."""
    cfg = load_config(args.config, list(args.overrides))
    args.regime_overrides = {g: regime_overrides(args.regime_defs[g], cfg) for g in args.regime_list}
    for g in args.regime_list:
        try:
            load_config(args.config, list(args.overrides) + args.regime_overrides[g])
        except ConfigError as e:
            keys = [o.split("=", 1)[0] for o in args.regime_defs[g].get("overrides") or []]
            raise ConfigError(
                f"--regimes: the {g} regime's overrides {args.regime_overrides[g]} do not fit this "
                f"jitrope (it needs the config keys {', '.join(keys)}): {e}; run --regimes single meanwhile"
            ) from None


def _env(args) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # one thread per process: concurrent OpenMP pools thrash a shared CPU
    return env


def _call(cmd: List[str], log: Path, args, what: str, mode: str = "a") -> None:
    with open(log, mode) as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(args), cwd=ROOT).returncode
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{what} failed (exit {rc}); see {log}:\n  " + "\n  ".join(tail))


def checkpoint_at(run: Path, step: int) -> Optional[Path]:
    """The run's checkpoint of exactly ``step`` (runs keep every checkpoint), or None."""
    return dict(list_checkpoints(run)).get(step)


def train_one(args, name: str, seed: int, regime: str) -> float:
    """Trains (or resumes) one run; returns the seconds it took. A run that already has a checkpoint at
    ``--steps`` is left alone (the learning rate does not depend on the step budget, so a longer run's
    checkpoint is exactly what a run of ``--steps`` would have saved)."""
    run = run_dir(args, name, seed, regime)
    if checkpoint_at(run, args.steps) is not None:
        return 0.0
    run.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "jitrope.train",
        "--config",
        args.config,
        "--resume",
        f"model.pos_embed={name}",
        f"train.seed={seed}",
        f"train.steps={args.steps}",
        f"train.out_dir={run}",
        f"train.ckpt_every={args.ckpt_every}",
        f"train.log_every={args.log_every}",
        "train.keep_last=0",
        "train.sample_every=0",
        "train.tensorboard=false",
        "train.progress=false",
        f"train.device={args.device}",
        *(["train.num_threads=1"] if args.device == "cpu" else []),
        *args.regime_overrides[regime],
        *(args.regime_defs[regime].get("encoding_overrides") or {}).get(name, []),
        *args.overrides,
    ]
    t0 = time.perf_counter()
    _call(cmd, run / "train.log", args, f"{name} seed {seed} ({regime}): training")
    return time.perf_counter() - t0


def _eval_cmd(args, ckpt: Path, out: Path, metrics: str, n_per_class: int, max_images: int) -> List[str]:
    return [
        sys.executable,
        "-m",
        "jitrope.evaluate",  # the command; jitrope.eval.evaluate is its library
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--device",
        args.device,
        *(["--num-threads", "1"] if args.device == "cpu" else []),
        "--metrics",
        metrics,
        "--n-per-class",
        str(n_per_class),
        "--n-cond",
        str(args.n_cond),
        "--max-images",
        str(max_images),
        "--steps",
        str(args.sample_steps),
        "--sampler",
        "heun",
        "--t-grid",
        ",".join(f"{t:g}" for t in args.t_list),
    ]


def _final_ckpt(args, run: Path, what: str) -> Path:
    ckpt = checkpoint_at(run, args.steps)
    if ckpt is None:
        raise RuntimeError(f"{what}: no checkpoint at step {args.steps} in {run}; run --stage train first")
    return ckpt


def eval_final(args, name: str, seed: int, regime: str) -> float:
    """The main evaluation of a main-ablation run at ``--steps``: v-loss, class samples, condition samples."""
    run = run_dir(args, name, seed, regime)
    out = run / f"eval_{args.steps:08d}.json"
    if regime != "single" or out.exists():
        return 0.0
    t0 = time.perf_counter()
    cmd = _eval_cmd(
        args, _final_ckpt(args, run, f"{name} seed {seed}"), out, "vloss,class,cond", args.n_per_class, args.max_images
    )
    _call(cmd, run / "eval.log", args, f"{name} seed {seed}: evaluation")
    return time.perf_counter() - t0


def eval_sizes(args, name: str, seed: int, regime: str) -> float:
    """The every-size study of a run: every size and scaling mode, FD-emoji, class accuracy, v-loss, grids."""
    run = run_dir(args, name, seed, regime)
    out = run / f"eval_sizes_{args.steps:08d}.json"
    if seed not in args.res_seeds_list or not (args.res_list or args.hw_list) or out.exists():
        return 0.0
    t0 = time.perf_counter()
    cmd = _eval_cmd(
        args,
        _final_ckpt(args, run, f"{name} seed {seed} ({regime})"),
        out,
        "res",
        args.res_n_per_class,
        args.res_max_images,
    )
    if args.res_list:
        cmd += ["--res-px", ",".join(map(str, args.res_list))]
    if args.hw_list:
        cmd += ["--res-hw", ",".join(f"{h}x{w}" for h, w in args.hw_list)]
    cmd += [
        "--res-scalings",
        ",".join(args.scaling_list),
        "--res-n-per-class",
        str(args.res_n_per_class),
        "--grids",
        str(run / f"grids_sizes_{args.steps:08d}"),
    ]
    _call(cmd, run / "eval.log", args, f"{name} seed {seed} ({regime}): every-size study")
    return time.perf_counter() - t0


def eval_steps(args, name: str, seed: int, regime: str) -> float:
    """FD-emoji and class accuracy at every checkpoint up to ``--steps`` (FD vs step), main runs."""
    run = run_dir(args, name, seed, regime)
    if regime != "single" or seed not in args.step_seeds_list:
        return 0.0
    t0 = time.perf_counter()
    for step, path in list_checkpoints(run):
        out = run / "eval_steps" / f"step_{step:08d}.json"
        if step <= args.steps and not out.exists():
            out.parent.mkdir(exist_ok=True)
            _call(
                _eval_cmd(args, path, out, "class", args.step_n_per_class, args.max_images),
                run / "eval_steps.log",
                args,
                f"{name} seed {seed}: evaluation of step {step}",
            )
    return time.perf_counter() - t0


def collect(args) -> List[Dict]:
    """One record per run that has an evaluation (:func:`studies.posenc.study.run_record`)."""
    rows = []
    for name, seed, regime in regime_runs(args):
        run = run_dir(args, name, seed, regime)
        final = run / f"eval_{args.steps:08d}.json"
        sizes = run / f"eval_sizes_{args.steps:08d}.json"
        if not (final.exists() or sizes.exists()):
            continue
        r = run_record(
            run,
            steps=args.steps,
            seed=seed,
            regime=regime,
            pos_embed=name,
            final=final,
            sizes=sizes,
            steps_folder=run / "eval_steps",
        )
        r["grids"] = str(run / f"grids_sizes_{args.steps:08d}")
        rows.append(r)
    return rows


def eval_seconds(args) -> Tuple[float, int]:
    """The wall seconds of every evaluation the runs hold (each record's own ``seconds``: main, every-size
    and FD-vs-step evaluations) summed, and their count; evaluations that ran side by side count each."""
    total, count = 0.0, 0
    for name, seed, regime in regime_runs(args):
        run = run_dir(args, name, seed, regime)
        for f in [*run.glob("eval_*.json"), *(run / "eval_steps").glob("step_*.json")]:
            try:
                sec = json.loads(f.read_text()).get("seconds")
            except (OSError, ValueError):
                continue
            if isinstance(sec, (int, float)):
                total, count = total + float(sec), count + 1
    return total, count


def fd_sanity(args) -> Dict[str, float]:
    """The FD-emoji sanity checks of the page, measured with the cached feature network of the config's
    data (its size: 64x64 for a 64x64 config)."""
    dcfg = load_config(args.config, list(args.overrides)).data
    net, extra = load_or_train_featnet(dcfg, device=args.device)
    train, val = build_dataset(dcfg, "train"), build_dataset(dcfg, "val")

    def fd(x):
        return frechet_distance(*gaussian_stats(net.embed(x)[0]), extra["train_mu"], extra["train_sigma"])

    out = fd_sanity_checks(
        fd,
        to_float(train.images),
        to_float(val.images),
        args.n_per_class * train.num_classes,
        generator=torch.Generator().manual_seed(0),
        featnet_info=extra["info"],
    )
    out["_featnet_seconds"] = extra["info"].get("train_seconds", float("nan"))
    out["_featnet_px"] = int(net.img_size)
    return out


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
