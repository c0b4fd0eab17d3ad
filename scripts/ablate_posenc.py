#!/usr/bin/env python
"""Ablation of JiT's positional encodings on real images.

Trains the same JiT once per encoding (one config, one seed, one data order: only
``model.pos_embed`` differs), evaluates each run on the held-out split with ``jitrope.evaluate``
(v-loss at fixed t and noise, with and without the condition image; nearest-neighbour class
accuracy of class-conditional samples; how closely condition samples follow their condition),
and writes the table as Markdown and JSON.

    python scripts/ablate_posenc.py                                  # emoji32_cpu, every encoding, 1000 steps, 2 at a time
    python scripts/ablate_posenc.py --steps 2000 --encodings rope2d,factorized2d --jobs 1
    python scripts/ablate_posenc.py --config configs/emoji64_s4.yaml --jobs 1 train.batch_size=64

Runs go to ``<out-dir>/<encoding>`` and are resumed (``--resume``), so an interrupted ablation
continues where it stopped; a finished run is only evaluated again. Each process uses one CPU
thread (``--jobs`` of them run at once).
"""
from __future__ import annotations

import argparse
import json
import os
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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "emoji32_cpu.yaml"), help="training config (YAML)")
    p.add_argument("--encodings", default="all",
                   help=f"comma-separated model.pos_embed values, or 'all' ({', '.join(POS_EMBEDS)})")
    p.add_argument("--steps", type=int, default=1000, help="training steps per encoding (default 1000)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each (default 2)")
    p.add_argument("--out-dir", default="runs/ablation", help="folder of the runs (default runs/ablation)")
    p.add_argument("--report", default=None, help="Markdown table to write (default <out-dir>/ablation.md; "
                   "a .json with the full metrics is written beside it)")
    p.add_argument("--n-per-class", type=int, default=8, help="class-conditional samples per class in the evaluation")
    p.add_argument("--n-cond", type=int, default=32, help="condition-image samples in the evaluation")
    p.add_argument("--max-images", type=int, default=512, help="held-out images in the v-loss")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps in the evaluation (default the config's)")
    p.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides for every run")
    args = p.parse_args(argv)
    names = list(POS_EMBEDS) if args.encodings == "all" else [e.strip() for e in args.encodings.split(",") if e.strip()]
    bad = [e for e in names if e not in POS_EMBEDS]
    if bad:
        p.error(f"--encodings: unknown {bad}; choose from {list(POS_EMBEDS)}")
    if not names:
        p.error("--encodings: none given")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    for o in args.overrides:
        if "=" not in o:
            p.error(f"override {o!r} is not dotted.key=value")
        if o.split("=", 1)[0] in ("model.pos_embed", "train.out_dir", "train.steps"):
            p.error(f"override {o!r}: the ablation sets {o.split('=', 1)[0]} itself")
    args.names = names
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def run_one(name: str, args: argparse.Namespace) -> Dict:
    """Trains (or resumes) one encoding's run, then evaluates it; returns the evaluation."""
    run = Path(args.out_dir) / name.replace("+", "_")
    run.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    train_cmd = [sys.executable, "-m", "jitrope.train", "--config", args.config, "--resume",
                 f"model.pos_embed={name}", f"train.steps={args.steps}", f"train.out_dir={run}",
                 "train.num_threads=1", "train.sample_every=0", *args.overrides]
    eval_json = run / "eval.json"
    eval_cmd = [sys.executable, "-m", "jitrope.evaluate", "--ckpt", str(run), "--out", str(eval_json),
                "--num-threads", "1", "--device", "cpu", "--n-per-class", str(args.n_per_class),
                "--n-cond", str(args.n_cond), "--max-images", str(args.max_images)]
    if args.sample_steps:
        eval_cmd += ["--steps", str(args.sample_steps)]
    t0 = time.perf_counter()
    for what, cmd, log in (("train", train_cmd, run / "train.log"), ("evaluate", eval_cmd, run / "eval.log")):
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        if rc != 0:
            tail = log.read_text().strip().splitlines()[-5:]
            raise RuntimeError(f"{name}: {what} failed (exit {rc}); see {log}:\n  " + "\n  ".join(tail))
    res = json.loads(eval_json.read_text())
    res["ablation_seconds"] = round(time.perf_counter() - t0, 1)
    res["run"] = str(run)
    return res


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def report(results: List[Dict], args: argparse.Namespace) -> str:
    cmd = "python scripts/ablate_posenc.py " + " ".join(args.argv)
    lines = [
        "# Positional-encoding ablation",
        "",
        f"Made by `{cmd.strip()}` (config `{Path(args.config).name}`, {args.steps} steps per encoding, "
        "same seed and data order; only `model.pos_embed` differs). Held-out split; lower is better except "
        "NN class acc.",
        "",
        "- v-loss: velocity MSE at t = 0.1..0.9 with fixed noise, with the condition image / with the null "
        "condition (class only); x-MSE: the same error in image space.",
        "- NN class acc: share of class-conditional samples whose nearest training image has the asked class "
        "(chance and the real held-out images' score in brackets).",
        "- cond RMS: RMS between a condition sample, downsampled, and its (held-out) condition image.",
        "",
        "| pos_embed | step | v-loss | v-loss, null cond | x-MSE | NN class acc | cond RMS | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cs, cond = r.get("class_samples", {}), r.get("cond_samples", {})
        null = r.get("vloss_null_cond", {})
        acc = cs.get("nn_class_acc")
        acc_s = "-" if acc is None else (f"{acc:.3f} ({cs['nn_class_acc_chance']:.3f} / {cs['nn_class_acc_real']:.3f})")
        lines.append(
            f"| `{r['pos_embed']}` | {r['step']} | {_fmt(r['vloss']['mean'])} | {_fmt(null.get('mean'))} | "
            f"{_fmt(r['vloss']['x_mse_mean'])} | {acc_s} | {_fmt(cond.get('cond_rms'), '.3f')} | "
            f"{r['ablation_seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not Path(args.config).exists():
        print(f"error: --config {args.config} does not exist", file=sys.stderr)
        return 2
    print(f"ablation of {len(args.names)} encodings x {args.steps} steps, {args.jobs} at a time, runs in {args.out_dir}",
          flush=True)
    results: Dict[str, Dict] = {}
    failures: List[str] = []
    bar = tqdm(total=len(args.names), desc="encodings", unit="run")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, n, args): n for n in args.names}
        for fut in as_completed(futures):
            name = futures[fut]
            try:
                results[name] = fut.result()
                r = results[name]
                msg = f"{name}: held-out v-loss {r['vloss']['mean']:.4f} ({r['ablation_seconds'] / 60:.1f} min)"
            except RuntimeError as e:
                failures.append(str(e))
                msg = str(e)
            bar.write(msg)
            bar.update(1)
    bar.close()
    ordered = [results[n] for n in args.names if n in results]
    if ordered:
        out = Path(args.report) if args.report else Path(args.out_dir) / "ablation.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        text = report(ordered, args)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(ordered, indent=2))
        print(text)
        print(f"wrote {out} and {out.with_suffix('.json')}")
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
