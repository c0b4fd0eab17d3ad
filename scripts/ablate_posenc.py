#!/usr/bin/env python
"""Ablation of JiT's positional encodings on real images, with seeds, metrics, a resolution study
and a results page.

Trains the same JiT once per encoding and seed (one config, one data order per seed: only
``model.pos_embed`` differs), evaluates every run with ``jitrope.evaluate`` and writes a Markdown
results page with tables (mean ± spread over seeds), PNG plots and sample grids.

Scales (``--scale``; every value below can be overridden by its option):

- ``cpu`` (default): ``configs/emoji32_cpu.yaml``, 32x32 emoji at patch 4 (8x8 grid, 64 tokens +
  16 condition tokens), 300 steps, 2 seeds, 2 runs at a time on one CPU thread each (sized for a
  shared 2-core machine: short training, small sample counts, Heun 10 steps). Unseen grids: 6x6,
  10x10, 12x12.
- ``seed``: the problem statement's setting, ``configs/emoji64_ablate.yaml``: 64x64 at patch 4
  (16x16 grid, 256 tokens -> 320 with a 32x32 condition image), a 6-block width-192 JiT, 1500
  steps of batch 128, 3 seeds, bf16 on one CUDA GPU with 6 runs at a time; sized (not yet timed)
  for <= 9 minutes on one H100/H200: the script prints its wall time and the page records the
  stage times. Unseen grids: 12x12, 20x20, 24x24.

Stages (``--stage``): ``train`` trains (or resumes) every run; ``eval`` evaluates every trained
run that has no evaluation yet; ``report`` writes the page from what is there; ``all`` (default)
does the three in order. Every stage resumes: an interrupted ablation continues where it stopped.

Per run, the evaluation gives: final training loss (mean of the last 10% of logged steps),
held-out v-loss with and without the condition image, FD-emoji (Fréchet distance in the features
of a small network trained once on the emoji training split, ``jitrope.featnet``; not FID), class
accuracy of class-conditional samples by that network's category head (its accuracy on real
held-out images beside it), PSNR/SSIM of condition-image samples against their held-out targets,
FD-emoji at every checkpoint (FD vs step), FD-emoji and class accuracy at unseen grids (RoPE and
sin-cos extrapolated and interpolated, the factorized table where it reaches, learned1d only
interpolated), step time and parameter count.

    python scripts/ablate_posenc.py                                    # the CPU ablation -> runs/ablation_cpu/results.md
    python scripts/ablate_posenc.py --scale seed --report docs/results.md
    python scripts/ablate_posenc.py --stage train --encodings rope2d,learned1d --seeds 0
    python scripts/ablate_posenc.py --config configs/tiny_cpu.yaml --steps 2 --seeds 0   # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from tqdm import tqdm  # noqa: E402

from jitrope.posenc import POS_EMBEDS  # noqa: E402

# Every default of a scale; an option given on the command line wins. "px" are image sizes of the
# resolution study (the grid is px / patch).
SCALES: Dict[str, Dict] = {
    "cpu": dict(config="configs/emoji32_cpu.yaml", steps=300, seeds="0,1", jobs=2, device="cpu", ckpt_every=100,
                log_every=25, n_per_class=12, n_cond=48, max_images=192, sample_steps=8, res_px="24,40,48",
                res_n_per_class=4, step_n_per_class=6, t_grid="0.1,0.3,0.5,0.7,0.9", res_seeds="all", step_seeds="all"),
    "seed": dict(config="configs/emoji64_ablate.yaml", steps=1500, seeds="0,1,2", jobs=6, device="cuda",
                 ckpt_every=500, log_every=25, n_per_class=64, n_cond=128, max_images=512, sample_steps=20,
                 res_px="48,80,96", res_n_per_class=16, step_n_per_class=16, t_grid="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                 res_seeds="all", step_seeds="all"),
}
STAGES = ("train", "eval", "report", "all")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu", help="preset of everything below (default cpu)")
    p.add_argument("--stage", choices=STAGES, default="all", help="train | eval | report | all (default all)")
    p.add_argument("--config", default=None, help="training config (YAML; default: the scale's)")
    p.add_argument("--encodings", default="all",
                   help=f"comma-separated model.pos_embed values, or 'all' ({', '.join(POS_EMBEDS)})")
    p.add_argument("--seeds", default=None, help="comma-separated train.seed values (cpu: 0,1; seed: 0,1,2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (cpu: 300; seed: 1500)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (cpu: 2, one CPU thread each; seed: 6 on one GPU)")
    p.add_argument("--device", default=None, help="cpu | cuda (cpu: cpu; seed: cuda)")
    p.add_argument("--ckpt-every", type=int, default=None, help="checkpoint interval: the points of FD vs step")
    p.add_argument("--log-every", type=int, default=None, help="training-loss logging interval (the loss curves)")
    p.add_argument("--out-dir", default=None, help="folder of the runs (default runs/ablation_<scale>)")
    p.add_argument("--report", default=None, help="results page to write (default <out-dir>/results.md); its "
                   "plots and sample grids go beside it as results_*.png, the metrics of every run as results.json")
    p.add_argument("--n-per-class", type=int, default=None, help="class-conditional samples per class (FD-emoji, class accuracy)")
    p.add_argument("--n-cond", type=int, default=None, help="condition-image samples (PSNR/SSIM)")
    p.add_argument("--max-images", type=int, default=None, help="held-out images in the v-loss")
    p.add_argument("--sample-steps", type=int, default=None, help="Heun sampler steps in the evaluation (cpu: 8; seed: 20)")
    p.add_argument("--t-grid", default=None, help="t values of the held-out v-loss (cpu: 0.1,0.3,0.5,0.7,0.9; seed: 0.1..0.9)")
    p.add_argument("--res-px", default=None, help="image sizes of the resolution study (cpu: 24,40,48; seed: 48,80,96); '' skips it")
    p.add_argument("--res-n-per-class", type=int, default=None, help="samples per class at each unseen size")
    p.add_argument("--step-n-per-class", type=int, default=None, help="samples per class at each checkpoint (FD vs step)")
    p.add_argument("--res-seeds", default=None, help="seeds whose runs get the resolution study: comma-separated or 'all' "
                   "(default all)")
    p.add_argument("--step-seeds", default=None, help="seeds whose runs get FD vs step: comma-separated or 'all' (default all)")
    p.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides for every run")
    args = p.parse_args(argv)
    for k, v in SCALES[args.scale].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    names = list(POS_EMBEDS) if args.encodings == "all" else [e.strip() for e in args.encodings.split(",") if e.strip()]
    bad = [e for e in names if e not in POS_EMBEDS]
    if bad:
        p.error(f"--encodings: unknown {bad}; choose from {list(POS_EMBEDS)}")
    if not names:
        p.error("--encodings: none given")
    try:
        args.seed_list = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        args.res_list = [int(s) for s in str(args.res_px).split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds / --res-px want comma-separated integers, got {args.seeds!r} / {args.res_px!r}")
    try:
        for k in ("res_seeds", "step_seeds"):
            v = getattr(args, k)
            setattr(args, k + "_list", list(args.seed_list) if v == "all" else [int(x) for x in v.split(",") if x.strip()])
    except (ValueError, AttributeError):
        p.error(f"--res-seeds / --step-seeds want 'all' or comma-separated integers, got {args.res_seeds!r} / {args.step_seeds!r}")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds: give distinct integers, got {args.seeds!r}")
    for name in ("steps", "jobs", "ckpt_every", "log_every", "n_per_class", "n_cond", "max_images", "sample_steps",
                 "res_n_per_class", "step_n_per_class"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for o in args.overrides:
        if "=" not in o:
            p.error(f"override {o!r} is not dotted.key=value")
        if o.split("=", 1)[0] in ("model.pos_embed", "train.out_dir", "train.steps", "train.seed"):
            p.error(f"override {o!r}: the ablation sets {o.split('=', 1)[0]} itself")
    args.config = str(Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config)
    args.out_dir = args.out_dir or f"runs/ablation_{args.scale}"
    args.names = names
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def run_dir(args, name: str, seed: int) -> Path:
    return Path(args.out_dir) / f"seed{seed}" / name.replace("+", "_")


def _env(args) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # one thread per process: concurrent OpenMP pools thrash a shared CPU
    return env


def _call(cmd: List[str], log: Path, args, what: str, mode: str = "w") -> None:
    with open(log, mode) as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(args), cwd=ROOT).returncode
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{what} failed (exit {rc}); see {log}:\n  " + "\n  ".join(tail))


def checkpoint_at(run: Path, step: int) -> Optional[Path]:
    """The run's checkpoint of exactly ``step`` (runs keep every checkpoint), or None."""
    from jitrope.checkpoint import list_checkpoints

    return dict(list_checkpoints(run)).get(step)


def train_one(args, name: str, seed: int) -> float:
    """Trains (or resumes) one run; returns the seconds it took. The log is appended to, so a
    resumed run keeps its whole loss curve. A run that already has a checkpoint at ``--steps`` is
    left alone (the learning rate does not depend on the step budget, so a longer run's
    checkpoint is exactly what a run of ``--steps`` would have saved)."""
    run = run_dir(args, name, seed)
    if checkpoint_at(run, args.steps) is not None:
        return 0.0
    run.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "jitrope.train", "--config", args.config, "--resume",
           f"model.pos_embed={name}", f"train.seed={seed}", f"train.steps={args.steps}", f"train.out_dir={run}",
           f"train.ckpt_every={args.ckpt_every}", f"train.log_every={args.log_every}", "train.keep_last=0",
           "train.sample_every=0", "train.tensorboard=false", "train.progress=false", f"train.device={args.device}",
           *(["train.num_threads=1"] if args.device == "cpu" else []), *args.overrides]
    t0 = time.perf_counter()
    _call(cmd, run / "train.log", args, f"{name} seed {seed}: training", mode="a")
    return time.perf_counter() - t0


def _eval_cmd(args, ckpt: Path, out: Path, metrics: str, n_per_class: int) -> List[str]:
    return [sys.executable, "-m", "jitrope.evaluate", "--ckpt", str(ckpt), "--out", str(out), "--device", args.device,
            *(["--num-threads", "1"] if args.device == "cpu" else []), "--metrics", metrics,
            "--n-per-class", str(n_per_class), "--n-cond", str(args.n_cond), "--max-images", str(args.max_images),
            "--steps", str(args.sample_steps), "--sampler", "heun", "--t-grid", args.t_grid]


def eval_final(args, name: str, seed: int) -> float:
    """Evaluates one trained run's checkpoint at ``--steps`` in full (unless already written)."""
    run = run_dir(args, name, seed)
    t0 = time.perf_counter()
    final_ckpt = checkpoint_at(run, args.steps)
    if final_ckpt is None:
        raise RuntimeError(f"{name} seed {seed}: no checkpoint at step {args.steps} in {run}; run --stage train first")
    final = run / f"eval_{args.steps:08d}.json"
    want_res = bool(args.res_list) and seed in args.res_seeds_list
    # an evaluation written without the resolution study is redone when the study is now asked for
    if not final.exists() or (want_res and "resolution" not in json.loads(final.read_text())):
        cmd = _eval_cmd(args, final_ckpt, final, "vloss,class,cond,res", args.n_per_class)
        if want_res:
            cmd += ["--res-px", ",".join(map(str, args.res_list)), "--res-n-per-class", str(args.res_n_per_class),
                    "--grids", str(run / f"grids_{args.steps:08d}")]
        _call(cmd, run / "eval.log", args, f"{name} seed {seed}: evaluation", mode="a")
    return time.perf_counter() - t0


def eval_steps(args, name: str, seed: int) -> float:
    """FD-emoji and class accuracy at every checkpoint up to ``--steps`` (FD vs step)."""
    from jitrope.checkpoint import list_checkpoints

    run = run_dir(args, name, seed)
    t0 = time.perf_counter()
    if seed not in args.step_seeds_list:
        return 0.0
    for step, path in list_checkpoints(run):
        out = run / "eval_steps" / f"step_{step:08d}.json"
        if step <= args.steps and not out.exists():
            out.parent.mkdir(exist_ok=True)
            _call(_eval_cmd(args, path, out, "class", args.step_n_per_class), run / "eval_steps.log", args,
                  f"{name} seed {seed}: evaluation of step {step}", mode="a")
    return time.perf_counter() - t0


_LOG = re.compile(r"^step (\d+)/\d+\s+loss ([0-9.eE+-]+)\s+grad [0-9.eE+-]+\s+([0-9.]+) img/s")
_PARAMS = re.compile(r"JiT ([0-9.]+)M params")


def read_train_log(path: Path) -> Dict:
    """Loss curve (last value logged for each step, so resumed runs count once), images/s and
    parameter count from a training log."""
    loss, ips, params = {}, {}, None
    for line in path.read_text().splitlines():
        m = _LOG.match(line.strip())
        if m:
            s = int(m.group(1))
            loss[s], ips[s] = float(m.group(2)), float(m.group(3))
        m = _PARAMS.search(line)
        if m:
            params = float(m.group(1)) * 1e6
    steps = sorted(loss)
    return {"steps": steps, "loss": [loss[s] for s in steps], "img_per_s": [ips[s] for s in steps], "params_from_log": params}


def collect(args) -> List[Dict]:
    """One record per evaluated run: its evaluation, loss curve, FD vs step and training wall time."""
    from jitrope.config import load_config

    batch = load_config(args.config, list(args.overrides)).train.batch_size
    rows = []
    for seed in args.seed_list:
        for name in args.names:
            run = run_dir(args, name, seed)
            f = run / f"eval_{args.steps:08d}.json"
            if not f.exists():
                continue
            r = json.loads(f.read_text())
            curve = read_train_log(run / "train.log")
            keep = [i for i, st in enumerate(curve["steps"]) if st <= args.steps]
            steps, loss, ips = ([curve[k][i] for i in keep] for k in ("steps", "loss", "img_per_s"))
            tail = max(1, len(loss) // 10)
            r["seed"], r["run"] = seed, str(run)
            r["loss_curve"] = {"steps": steps, "loss": loss}
            r["final_train_loss"] = sum(loss[-tail:]) / tail
            ips = ips[1:] or ips  # the first interval includes start-up
            r["step_ms"] = 1000.0 * batch / (sum(ips) / len(ips)) if ips else None
            fd = []
            for e in sorted((run / "eval_steps").glob("step_*.json")):
                d = json.loads(e.read_text())
                if d["step"] <= args.steps and "fd_emoji" in d.get("class_samples", {}):
                    fd.append((d["step"], d["class_samples"]["fd_emoji"]))
            r["fd_vs_step"] = {"steps": [a for a, _ in fd], "fd_emoji": [b for _, b in fd]}
            # Training wall time from the checkpoint folders' times: first checkpoint minus one
            # interval (the start) to the checkpoint at --steps.
            from jitrope.checkpoint import list_checkpoints

            ck = [(st, p.stat().st_mtime) for st, p in list_checkpoints(run) if st <= args.steps]
            if len(ck) >= 2:
                (s0, t0), (s1, t1) = ck[0], ck[-1]
                rate = (t1 - t0) / (s1 - s0)
                r["train_start"], r["train_end"] = t0 - s0 * rate, t1
            rows.append(r)
    return rows


# ----------------------------------------------------------------------------------------- report
METRIC_COLS = [  # key path, header, format, lower is better
    (("final_train_loss",), "final train loss", ".4f", True),
    (("vloss", "mean"), "held-out v-loss", ".4f", True),
    (("vloss_null_cond", "mean"), "v-loss, null cond", ".4f", True),
    (("class_samples", "fd_emoji"), "FD-emoji", ".3f", True),
    (("class_samples", "class_acc"), "class acc", ".3f", False),
    (("cond_samples", "psnr"), "PSNR (dB)", ".2f", False),
    (("cond_samples", "ssim"), "SSIM", ".3f", False),
    (("step_ms",), "step (ms)", ".0f", True),
]


def _get(r: Dict, path) -> Optional[float]:
    for k in path:
        if not isinstance(r, dict) or k not in r:
            return None
        r = r[k]
    return None if r is None else float(r)


def mean_sd(vals: Sequence[float]):
    """Mean and sample standard deviation (None for a single value: no noise estimate)."""
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return None, None
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, sd


def _pm(m, sd, spec: str) -> str:
    if m is None:
        return "-"
    return format(m, spec) if sd is None else f"{format(m, spec)} ± {format(sd, spec)}"


def per_encoding(rows: List[Dict], names: Sequence[str], path) -> Dict[str, List[float]]:
    return {n: [_get(r, path) for r in rows if r["pos_embed"] == n] for n in names}


def verdict(rows: List[Dict], names: Sequence[str], path, lower: bool, spec: str, label: str) -> str:
    """One mechanical sentence: the best encoding by mean, and which others differ from it by more
    than twice the combined seed spread (sqrt(sd1^2 + sd2^2)); the rest are within noise."""
    stats = {n: mean_sd(v) for n, v in per_encoding(rows, names, path).items()}
    stats = {n: s for n, s in stats.items() if s[0] is not None}
    if len(stats) < 2:
        return f"{label}: too few runs to compare."
    best = (min if lower else max)(stats, key=lambda n: stats[n][0])
    bm, bsd = stats[best]
    if any(sd is None for _, sd in stats.values()):
        order = sorted(stats, key=lambda n: stats[n][0], reverse=not lower)
        return (f"{label} (one seed, no noise estimate): " + " < ".join(f"`{n}` {format(stats[n][0], spec)}" for n in order)
                + ("" if lower else " (higher is better)") + ".")
    apart, near = [], []
    for n, (m, sd) in stats.items():
        if n == best:
            continue
        noise = math.sqrt(bsd**2 + sd**2)
        (apart if abs(m - bm) > 2 * noise and noise > 0 else near).append(f"`{n}` {format(m, spec)}")
    out = f"{label}: best `{best}` ({_pm(bm, bsd, spec)})"
    if apart:
        out += "; clearly worse (gap > 2x the combined seed spread): " + ", ".join(apart)
    if near:
        out += "; within noise of it: " + ", ".join(near)
    return out + "."


def top_group(rows: List[Dict], names: Sequence[str], path, lower: bool) -> List[str]:
    """The best encoding by mean and those within noise of it (the rule of :func:`verdict`)."""
    stats = {n: mean_sd(v) for n, v in per_encoding(rows, names, path).items()}
    stats = {n: s for n, s in stats.items() if s[0] is not None and s[1] is not None}
    if not stats:
        return []
    best = (min if lower else max)(stats, key=lambda n: stats[n][0])
    bm, bsd = stats[best]
    return [n for n, (m, sd) in stats.items()
            if n == best or not (abs(m - bm) > 2 * math.sqrt(bsd**2 + sd**2) and (bsd or sd))]


def fd_sanity(args) -> Dict[str, float]:
    """The FD-emoji sanity checks of the results page, measured on real images with the cached
    feature network: identical sets, real held-out vs training, blurred and noise images, and a
    pair of shifted Gaussians against their closed form."""
    import torch
    import torch.nn.functional as F

    from jitrope.config import load_config
    from jitrope.data import build_dataset, to_float
    from jitrope.featnet import load_or_train_featnet
    from jitrope.metrics import frechet_distance, gaussian_stats

    dcfg = load_config(args.config, list(args.overrides)).data
    net, extra = load_or_train_featnet(dcfg, device=args.device)
    ref = (extra["train_mu"], extra["train_sigma"])
    train, val = build_dataset(dcfg, "train"), build_dataset(dcfg, "val")
    held = to_float(val.images)
    g = torch.Generator().manual_seed(0)

    def fd(x):
        return frechet_distance(*gaussian_stats(net.embed(x)[0]), *ref)

    n = args.n_per_class * train.num_classes
    sub = to_float(train.images[torch.randperm(len(train), generator=g)[:n]])
    k = 4  # blur: average 4x4 blocks, then back to size
    blur = F.avg_pool2d(held, k).repeat_interleave(k, -1).repeat_interleave(k, -2)
    d = 16
    mu, s1 = torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    x = torch.randn(20000, d, generator=g, dtype=torch.float64)
    y = 1.5 * torch.randn(20000, d, generator=g, dtype=torch.float64) + 0.5
    closed = d * 0.25 + d * (1.5 - 1.0) ** 2
    return {
        "identical (training split vs itself)": fd(to_float(train.images)),
        f"real held-out images (all {len(val)})": fd(held),
        f"real training images ({n}, the sample count)": fd(sub),
        "blurred held-out images (4x4 box)": fd(blur),
        "uniform noise images": fd(torch.rand(held.shape, generator=g) * 2 - 1),
        "featnet class accuracy, held-out": extra["info"].get("val_cat_acc", float("nan")),
        "featnet class accuracy, chance": extra["info"]["chance_cat_acc"],
        "featnet vendor accuracy, held-out": extra["info"].get("val_vendor_acc", float("nan")),
        f"Gaussians N(0, I) vs N(0.5, 2.25 I), d={d}, from their exact mean and covariance: FD": frechet_distance(
            mu, s1, mu + 0.5, 2.25 * s1),
        "... the same from 20000 samples of each": float(frechet_distance(*gaussian_stats(x), *gaussian_stats(y))),
        "... closed form |dmu|^2 + d (1.5 - 1)^2": closed,
        "_featnet_path": extra["path"],
        "_featnet_seconds": extra["info"].get("train_seconds", float("nan")),
    }


def _plots(rows: List[Dict], args, out: Path, res_keys) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in args.names if any(r["pos_embed"] == n for r in rows)]
    colors = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    stem = out.with_suffix("")
    files = []

    def save(fig, suffix):
        from PIL import Image

        p = Path(f"{stem}_{suffix}.png")
        fig.tight_layout()
        fig.savefig(p, dpi=80)
        plt.close(fig)
        Image.open(p).convert("RGB").quantize(256).save(p, optimize=True)  # a palette keeps the docs small
        files.append(p.name)

    # loss curves: mean over seeds of the logged training loss
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n in names:
        rs = [r for r in rows if r["pos_embed"] == n]
        steps = rs[0]["loss_curve"]["steps"]
        ys = [sum(r["loss_curve"]["loss"][i] for r in rs) / len(rs) for i in range(min(len(r["loss_curve"]["loss"]) for r in rs))]
        ax.plot(steps[: len(ys)], ys, label=n, color=colors[n], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.legend(fontsize=7)
    save(fig, "loss")

    # bars with error bars (mean ± sd over seeds)
    cols = [c for c in METRIC_COLS if c[1] in ("held-out v-loss", "v-loss, null cond", "FD-emoji", "class acc", "PSNR (dB)", "SSIM")]
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.2))
    for ax, (path, head, _, lower) in zip(axes.flat, cols):
        st = [mean_sd(per_encoding(rows, names, path)[n]) for n in names]
        ax.bar(range(len(names)), [m or 0 for m, _ in st], yerr=[sd or 0 for _, sd in st], capsize=3,
               color=[colors[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{head} ({'lower' if lower else 'higher'} is better)", fontsize=9)
    save(fig, "bars")

    # FD-emoji vs step
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n in names:
        rs = [r for r in rows if r["pos_embed"] == n and r["fd_vs_step"]["steps"]]
        if not rs:
            continue
        steps = rs[0]["fd_vs_step"]["steps"]
        st = [mean_sd([r["fd_vs_step"]["fd_emoji"][i] for r in rs if len(r["fd_vs_step"]["fd_emoji"]) > i]) for i in range(len(steps))]
        ax.errorbar(steps, [m for m, _ in st], yerr=[sd or 0 for _, sd in st], label=n, color=colors[n], capsize=2, marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"FD-emoji ({args.step_n_per_class} samples per class)")
    ax.legend(fontsize=7)
    save(fig, "fd_steps")

    # metric vs sampling resolution
    train_px = _train_px(rows[0])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, lab in ((axes[0], "fd_emoji", "FD-emoji"), (axes[1], "class_acc", "class accuracy")):
        for n in names:
            for scaling, ls in (("extrapolate", "-"), ("interpolate", "--")):
                xs, ys, es = [], [], []
                for px in sorted({train_px, *args.res_list}):
                    vals = [v for v in (_res_value(r, px, scaling, metric, train_px) for r in rows if r["pos_embed"] == n) if v is not None]
                    if vals:
                        m, sd = mean_sd(vals)
                        xs.append(px // _patch(rows[0]))
                        ys.append(m)
                        es.append(sd or 0)
                if len(xs) > 1:
                    ax.errorbar(xs, ys, yerr=es, color=colors[n], ls=ls, marker="o", ms=3, capsize=2,
                                label=f"{n} ({scaling[:6]})")
        ax.axvline(train_px // _patch(rows[0]), color="0.6", lw=0.8)
        ax.set_xlabel("sampling grid (tokens per side; grey: training grid)")
        ax.set_ylabel(lab)
    axes[1].legend(fontsize=6, ncol=2)
    save(fig, "resolution")

    # side-by-side sample grids of the first seed: training size, and the largest unseen size
    from PIL import Image

    seed0 = args.seed_list[0]
    big = max(args.res_list) if args.res_list else None
    panels = [("train", f"{train_px}x{train_px} (training)")]
    if big:
        panels += [("extrapolate", f"{big}x{big} extrapolated"), ("interpolate", f"{big}x{big} interpolated")]
    fig, axes = plt.subplots(len(panels), len(names), figsize=(1.7 * len(names), 2.3 * len(panels)), squeeze=False)
    for j, n in enumerate(names):
        grids = run_dir(args, n, seed0) / f"grids_{args.steps:08d}"
        for i, (kind, title) in enumerate(panels):
            ax = axes[i][j]
            ax.axis("off")
            f = grids / (f"px{train_px}_train.png" if kind == "train" else f"px{big}_{kind}.png")
            if f.exists():
                ax.imshow(Image.open(f))
            else:
                ax.text(0.5, 0.5, "not applicable", ha="center", va="center", fontsize=8)
            ax.set_title(f"{n}\n{title}" if i == 0 else title, fontsize=7)
    save(fig, "samples")
    return files


def _patch(r: Dict) -> int:
    return int(r["_patch"])


def _train_px(r: Dict) -> int:
    return int(r["_img_size"])


def _res_value(r: Dict, px: int, scaling: str, metric: str, train_px: int) -> Optional[float]:
    if px == train_px:  # the training grid: both scalings are the plain model
        return _get(r, ("class_samples", metric))
    for row in r.get("resolution", []):
        if row["px"] == px and row["scaling"] == scaling and metric in row:
            return float(row[metric])
    return None


def write_report(rows: List[Dict], args, out: Path, *, timing: Dict, machine: str) -> None:
    from jitrope.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    mc = cfg.model_config()
    for r in rows:
        r["_patch"], r["_img_size"] = mc.patch_size, mc.img_size
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.names if any(r["pos_embed"] == n for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    n_seeds = {n: len([r for r in rows if r["pos_embed"] == n]) for n in names}
    files = _plots(rows, args, out, None)
    sanity = fd_sanity(args)
    cs0 = rows[0]["class_samples"]
    gh = mc.img_size // mc.patch_size
    cg = None if mc.cond_img_size is None else mc.cond_img_size // mc.patch_size
    tokens = gh * gh + (cg * cg if cg else 0)
    cmd = "python scripts/ablate_posenc.py " + " ".join(args.argv)
    starts = [r["train_start"] for r in rows if "train_start" in r]
    ends = [r["train_end"] for r in rows if "train_end" in r]
    train_wall = (max(ends) - min(starts)) / 60 if starts else None
    L = [
        "# Which positional encoding? Results of the ablation",
        "",
        f"Generated by `{cmd.strip()}` (every number and picture on this page; nothing typed in by hand).",
        "",
        "## Setup",
        "",
        f"- Config `{Path(args.config).relative_to(ROOT) if Path(args.config).is_relative_to(ROOT) else args.config}`: "
        f"{mc.img_size}x{mc.img_size} emoji at patch {mc.patch_size} ({gh}x{gh} grid, {gh * gh} tokens"
        + (f", plus a {mc.cond_img_size}x{mc.cond_img_size} condition image: {gh * gh} -> {tokens} tokens" if cg else "")
        + f"), class labels, width {mc.hidden_size}, depth {mc.depth}, {mc.num_heads} heads, "
        f"{mc.in_context_len} in-context tokens.",
        f"- {args.steps} training steps per run, batch {cfg.train.batch_size}, AdamW lr {cfg.train.lr}, "
        f"{len(names)} encodings x seeds {seeds}: the same data, data order, steps, batch, optimizer and seed for "
        "every encoding (the seed changes initialisation and data order together). Only `model.pos_embed` differs.",
        f"- Evaluation of the EMA weights at step {args.steps}: held-out v-loss at t = "
        f"{', '.join(f'{t:g}' for t in rows[0]['vloss']['t'])} with fixed noise "
        f"({rows[0]['vloss']['n_images']} held-out images); {cs0['n']} class-conditional samples "
        f"({args.n_per_class} per class) and {rows[0].get('cond_samples', {}).get('n', 0)} condition-image samples, "
        f"Heun {args.sample_steps} steps, CFG {rows[0]['sampling']['cfg']}.",
        "- Mean ± sample standard deviation over the seeds (n per encoding: "
        + ", ".join(f"`{n}` {k}" for n, k in n_seeds.items()) + ").",
        f"- Machine: {machine}. Training wall time "
        + ("-" if train_wall is None else f"{train_wall:.0f} min")
        + f" ({args.jobs} runs at a time), evaluation {timing.get('eval', float('nan')) / 60:.0f} min, feature network "
        f"{sanity['_featnet_seconds'] / 60:.0f} min (once, cached)."
        + (" On this CPU the machine was shared with other jobs, so step times are only rough." if args.device == "cpu" else ""),
        "",
        "## Metrics",
        "",
        "- **FD-emoji**: Fréchet distance between the Gaussians fitted to the features of the samples and of the "
        "training split, in a small CNN trained once on the emoji training split with category and vendor heads "
        "(`jitrope/featnet.py`, cached under its config hash). The FID formula in another network: not comparable "
        "with published FIDs. Lower is better; its floor at this sample count is the real images' value below.",
        "- **class acc**: share of class-conditional samples that the feature network's category head assigns to "
        "the asked class.",
        "- **PSNR / SSIM**: condition-image samples (condition = the held-out image downsampled) against that "
        "held-out image.",
        "- **v-loss**: the training objective on held-out images at fixed t and noise, with the condition image "
        "and with the null condition (class only).",
        "",
        "## Sanity checks of FD-emoji",
        "",
        "| check | value |",
        "|---|---|",
    ]
    for k, v in sanity.items():
        if not k.startswith("_"):
            L.append(f"| {k} | {v:.4f} |")
    # the same held-out images for every run: one value
    L += [f"| real held-out images, {cs0.get('n_real', '-')} of them (the evaluation's floor) | "
          f"{_get(rows[0], ('class_samples', 'fd_emoji_real')):.4f} |", ""]
    first_last = []
    for n in names:
        rs = [r for r in rows if r["pos_embed"] == n and len(r["fd_vs_step"]["steps"]) > 1]
        if rs:
            a = mean_sd([r["fd_vs_step"]["fd_emoji"][0] for r in rs])[0]
            b = mean_sd([r["fd_vs_step"]["fd_emoji"][-1] for r in rs])[0]
            first_last.append(f"`{n}` {a:.3f} -> {b:.3f}")
    if first_last:
        s0, s1 = rows[0]["fd_vs_step"]["steps"][0], rows[0]["fd_vs_step"]["steps"][-1]
        L += [f"FD-emoji as the models train (step {s0} -> {s1}, {args.step_n_per_class} samples per class, "
              f"seeds {sorted({r['seed'] for r in rows if r['fd_vs_step']['steps']})}): " + ", ".join(first_last) + ".", ""]
    L += ["## Results at the training resolution", "",
          "| pos_embed | " + " | ".join(c[1] for c in METRIC_COLS) + " | params |",
          "|---|" + "---|" * (len(METRIC_COLS) + 1)]
    for n in names:
        cells = [_pm(*mean_sd(per_encoding(rows, names, path)[n]), spec) for path, _, spec, _ in METRIC_COLS]
        params = [r["params"] for r in rows if r["pos_embed"] == n][0]
        L.append(f"| `{n}` | " + " | ".join(cells) + f" | {params / 1e6:.3f}M |")
    L += [
        f"| real held-out images | - | - | - | {_get(rows[0], ('class_samples', 'fd_emoji_real')):.3f} "
        f"| {_get(rows[0], ('class_samples', 'class_acc_real')):.3f} | - | - | - | - |",
        "",
        f"![training loss]({files[0]}) ![metrics]({files[1]})",
        "",
        f"![FD-emoji vs step]({files[2]})",
        "",
    ]
    if args.res_list:
        tpx = mc.img_size
        L += ["## Other resolutions", "",
              f"Class-conditional samples ({args.res_n_per_class} per class, null condition) at grids the models never "
              f"saw (runs of seeds {sorted(set(args.res_seeds_list) & set(seeds))}"
              f"{'; one seed: no spread' if len(set(args.res_seeds_list) & set(seeds)) == 1 else ''}); FD-emoji and class accuracy after resizing to {tpx}x{tpx} for the feature network. "
              "`extrapolate`: integer positions beyond the training range (RoPE, sin-cos; the factorized table's "
              "untrained rows up to twice the training grid); `interpolate`: positions scaled into the training "
              "range (RoPE and sin-cos coordinates, learned tables resampled). `learned1d` can only interpolate "
              "(`model.pos_scaling=interpolate`). The training-grid column repeats the main table.", "",
              "| pos_embed | scaling | " + " | ".join(f"{px // mc.patch_size}x{px // mc.patch_size}" + (" (train)" if px == tpx else "")
                                                    for px in sorted({tpx, *args.res_list})) + " |",
              "|---|---|" + "---|" * len({tpx, *args.res_list})]
        for metric, spec in (("fd_emoji", ".3f"), ("class_acc", ".3f")):
            L.append(f"| **{'FD-emoji' if metric == 'fd_emoji' else 'class acc'}** | |" + " |" * len({tpx, *args.res_list}))
            for n in names:
                for scaling in ("extrapolate", "interpolate"):
                    cells = []
                    for px in sorted({tpx, *args.res_list}):
                        vals = [v for v in (_res_value(r, px, scaling, metric, tpx) for r in rows if r["pos_embed"] == n) if v is not None]
                        cells.append(_pm(*mean_sd(vals), spec) if vals else "n/a")
                    L.append(f"| `{n}` | {scaling} | " + " | ".join(cells) + " |")
        L += ["", f"![metric vs resolution]({files[3]})", "",
              f"Samples of seed {args.seed_list[0]} (rows: classes; same noise for every encoding):", "",
              f"![samples]({files[4]})", ""]
    L += ["## Conclusion", "", "Mechanical reading of the tables (best mean; an encoding differs only when the gap is "
          "larger than twice the combined seed spread; with few seeds that spread is itself a rough estimate, so "
          "read \"clearly\" as indicative):", ""]
    tally = {n: [] for n in names}
    for path, head, spec, lower in METRIC_COLS[:7]:
        L.append("- " + verdict(rows, names, path, lower, spec, head))
        for n in top_group(rows, names, path, lower):
            tally[n].append(head)
    if args.res_list:
        big = max(args.res_list)
        for scaling in ("extrapolate", "interpolate"):
            sub = []
            for r in rows:
                v = _res_value(r, big, scaling, "fd_emoji", mc.img_size)
                if v is not None:
                    sub.append({"pos_embed": r["pos_embed"], "x": v})
            if sub:
                L.append("- " + verdict(sub, names, ("x",), True, ".3f",
                                        f"FD-emoji at {big // mc.patch_size}x{big // mc.patch_size}, {scaling}"))
    L += ["", "Training-resolution metrics (of " + str(len(METRIC_COLS[:7])) + ") on which each encoding is the best or "
          "within noise of the best: " + "; ".join(f"`{n}` {len(v)}" for n, v in sorted(tally.items(), key=lambda kv: -len(kv[1])))
          + "."]
    L += [""]
    if args.device == "cpu":
        epochs = args.steps * cfg.train.batch_size / max(1, rows[0]["featnet"].get("n_train", 1))
        if epochs < 5:
            L += [f"Budget: {args.steps} steps of batch {cfg.train.batch_size} are {epochs:.1f} passes over the "
                  "training split: the models are early in training (see the sample grids), so these tables compare "
                  "how fast each encoding learns, not where it ends up.", ""]
        L += ["Step times were measured on a CPU shared with other jobs; their spread is that of the machine's load.", ""]
        L += [f"Scale: these numbers are at {mc.img_size}x{mc.img_size} ({gh}x{gh} grid, {gh * gh} -> {tokens} tokens) "
              f"after {args.steps} steps on a CPU. The problem statement's 64x64 setting (16x16 grid, 256 -> 320 tokens) "
              "is `python scripts/ablate_posenc.py --scale seed --report docs/results.md` (config "
              "`configs/emoji64_ablate.yaml`, 3 seeds, sized for <= 9 minutes on one H100/H200); CI runs that script "
              "at a tiny scale on the CPU, but it has not been run on a GPU yet: the GPU run is still owed.", ""]
    L += ["## Reproduce", "", "```", "python scripts/prepare_data.py            # emoji, once", cmd.strip(),
          "```", "", "Stages can be run one by one (`--stage train|eval|report`); every stage resumes. Runs, logs and "
          f"checkpoints are in `{args.out_dir}/seed<k>/<encoding>/`; every run's metrics in `{out.with_suffix('.json').name}`."]
    if (ROOT / "docs" / "results_2000steps_seed0.json").exists() and out.resolve().parent == ROOT / "docs":
        L += _previous_section()
    out.write_text("\n".join(L) + "\n")
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    out.with_suffix(".json").write_text(json.dumps({"runs": clean, "fd_sanity": sanity, "timing": timing}, indent=1))


def _previous_section() -> List[str]:
    """The earlier single-seed, 2000-step CPU ablation (formerly docs/ablation.md), from its JSON."""
    prev = json.loads((ROOT / "docs" / "results_2000steps_seed0.json").read_text())
    L = ["", "## Earlier run: 2000 steps, one seed", "",
         "The first ablation (`python scripts/ablate_posenc.py --steps 2000` of the time, one seed, config "
         "`emoji32_cpu.yaml`; formerly `docs/ablation.md`), kept for its longer training. NN class acc: share of "
         "samples whose nearest training image (pixel L2) has the asked class.", "",
         "| pos_embed | held-out v-loss | v-loss, null cond | NN class acc | cond RMS |", "|---|---|---|---|---|"]
    for r in prev:
        L.append(f"| `{r['pos_embed']}` | {r['vloss']['mean']:.4f} | {r['vloss_null_cond']['mean']:.4f} | "
                 f"{r['class_samples']['nn_class_acc']:.3f} | {r['cond_samples']['cond_rms']:.3f} |")
    return L + [""]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not Path(args.config).exists():
        print(f"error: --config {args.config} does not exist", file=sys.stderr)
        return 2
    jobs = [(n, s) for s in args.seed_list for n in args.names]  # seed by seed: a cut-short ablation has whole seeds
    failures: List[str] = []
    t_all = time.perf_counter()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    timing_file = Path(args.out_dir) / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    print(f"ablation ({args.scale}): {len(args.names)} encodings x seeds {args.seed_list} x {args.steps} steps, "
          f"{args.jobs} at a time on {args.device}, runs in {args.out_dir}", flush=True)
    # Every run's main evaluation comes before the FD-vs-step ones, so a cut-short evaluation
    # still has the tables.
    for stage, fns in (("train", [train_one]), ("eval", [eval_final, eval_steps])):
        if args.stage not in (stage, "all"):
            continue
        if stage == "eval":
            from jitrope.config import load_config
            from jitrope.featnet import load_or_train_featnet

            # train the feature network once, here, before parallel evaluations would race for it
            load_or_train_featnet(load_config(args.config, list(args.overrides)).data, device=args.device)
        t0 = time.perf_counter()
        bar = tqdm(total=len(jobs) * len(fns), desc=stage, unit="job")
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(fn, args, n, s): (n, s) for fn in fns for n, s in jobs}
            for fut in as_completed(futures):
                n, s = futures[fut]
                try:
                    bar.write(f"{stage} {n} seed {s}: {fut.result() / 60:.1f} min")
                except RuntimeError as e:
                    failures.append(str(e))
                    bar.write(str(e))
                bar.update(1)
        bar.close()
        if stage == "eval":  # training time comes from the checkpoints (it may span several calls)
            timing[stage] = round(timing.get(stage, 0.0) + time.perf_counter() - t0, 1)
            timing_file.write_text(json.dumps(timing, indent=2))
        if failures:
            break
    if args.stage in ("report", "all") and not failures:
        rows = collect(args)
        if not rows:
            print("error: no evaluated run to report; run --stage train and --stage eval first", file=sys.stderr)
            return 1
        out = Path(args.report) if args.report else Path(args.out_dir) / "results.md"
        write_report(rows, args, out, timing=timing, machine=machine())
        print(f"wrote {out} (and {out.with_suffix('.json').name}, {out.stem}_*.png beside it)")
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    print(f"wall time {(time.perf_counter() - t_all) / 60:.1f} min")
    return 1 if failures else 0


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
