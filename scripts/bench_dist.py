#!/usr/bin/env python
"""Per-rank memory and step time of train.parallel=ddp vs fsdp, run under torchrun (or as one process).

For each ``--parallel`` kind it builds the model of a training config the way the trainer does
(:class:`jitrope.distributed.Parallel`, two EMAs, AdamW), trains ``--steps`` steps of random data at the
config's global batch (split over the ranks), and prints, per rank, the bytes of the local shards of
the parameters, the gradients (after a backward), the AdamW state and the EMAs, then the step times:
the first step (compilation included) and the median of the others, wall and CPU.

``--compile MODE`` with ``--compile-how block`` (the trainer's way under fsdp: ``block.compile()`` on each
block) or ``model`` (``torch.compile`` of the whole fully_shard-ed model) measures which compiles once and
runs faster; it also counts the graphs and recompilations torch.compile made.

    torchrun --standalone --nproc_per_node=2 scripts/bench_dist.py --config configs/emoji64_cpu.yaml
    torchrun --standalone --nproc_per_node=2 scripts/bench_dist.py --config configs/emoji64_cpu.yaml \\
        --parallel fsdp --compile default --compile-how block model --steps 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

import jitrope
from jitrope.config import load_config
from jitrope.diffusion import EMA, Diffusion
from jitrope.distributed import PARALLEL, Parallel, local_bytes
from jitrope.model import JiT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/emoji64_cpu.yaml", help="training config: model, batch, EMAs")
    p.add_argument("--parallel", nargs="+", default=list(PARALLEL), choices=PARALLEL, help="kinds to measure")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's train.batch_size)")
    p.add_argument("--steps", type=int, default=3, help="training steps per case (default 3)")
    p.add_argument("--compile", default="none", help="torch.compile mode, or none (default)")
    p.add_argument("--compile-how", nargs="+", default=["block"], choices=("block", "model"), help="fsdp only")
    p.add_argument(
        "--activation-checkpointing",
        nargs="+",
        default=["off"],
        choices=("off", "on"),
        help="keep the blocks' activations (off, default) or recompute them in the backward pass (on); both: each",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    p.add_argument("--json", default=None, help="also write the results (rank 0) to this JSON file")
    return p


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _batch(cfg, n: int, device: torch.device, step: int):
    g = torch.Generator().manual_seed(1000 * step + int(os.environ.get("RANK", "0")))
    m = cfg
    x = torch.randn(n, m.in_channels, m.img_size, m.img_size, generator=g)
    y = torch.randint(0, m.num_classes, (n,), generator=g)
    cond = None
    if m.cond_img_size is not None:
        cond = torch.randn(n, m.cond_in_channels, m.cond_img_size, m.cond_img_size, generator=g)
    t, noise = torch.rand(n, generator=g), torch.randn(x.shape, generator=g)
    return [None if v is None else v.to(device) for v in (x, y, cond, t, noise)]


def run_case(args, tcfg, mcfg, case, device: torch.device, world: int) -> Dict:
    kind, how, ac = case
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = JiT(mcfg).to(device)
    model.activation_checkpointing = ac == "on"
    amp = device.type == "cuda"
    par = Parallel(model, kind, world, device, amp=amp)
    ema = EMA(model, tcfg.ema_decays)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    net, _ = par.wrap(args.compile if how == "block" or kind != "fsdp" else "none", packed=False)
    if args.compile != "none" and how == "model" and kind == "fsdp":
        net = torch.compile(model, mode=args.compile)
    diffusion, per_rank = Diffusion(), (args.batch or tcfg.batch_size) // world
    wall, cpu, mem = [], [], {}
    for step in range(args.steps):
        x, y, cond, t, noise = _batch(mcfg, per_rank, device, step)
        _sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = diffusion.loss(net, x, y, cond, t=t, noise=noise)
        loss.backward()
        if step == 0:
            mem["grads"] = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        par.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        _sync(device)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    mem["params"] = local_bytes(model.parameters())
    mem["adamw"] = local_bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    mem["emas"] = local_bytes(s for shadow in ema.shadows for s in shadow)
    out = dict(parallel=kind, compile=args.compile, how=how if kind == "fsdp" else "-", ac=ac, **mem)
    out.update(first_s=wall[0], wall_ms=1e3 * statistics.median(wall[1:] or wall))
    out.update(cpu_ms=1e3 * statistics.median(cpu[1:] or cpu), params_n=sum(p.numel() for p in model.parameters()))
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.compile != "none":
        out["graphs"] = _compile_count("unique_graphs")
    par.close()
    return out


def _compile_count(key: str) -> Optional[int]:
    try:
        return int(torch._dynamo.utils.counters["stats"][key])
    except (AttributeError, KeyError, TypeError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _print(rows: List[List[Dict]], world: int) -> None:
    mib = 2**20
    print(
        f"{'parallel':<9}{'compile':<9}{'how':<6}{'AC':<4}{'rank':>5}{'params':>10}{'grads':>10}{'AdamW':>10}{'EMAs':>10}"
        f"{'total MiB':>11}{'1st step s':>11}{'ms/step':>9}{'CPU ms':>8}{'graphs':>7}"
        + (f"{'peak GiB':>10}" if "peak_gib" in rows[0][0] else "")
    )
    for per_rank in rows:
        for r, x in enumerate(per_rank):
            total = x["params"] + x["grads"] + x["adamw"] + x["emas"]
            cells = [x[k] / mib for k in ("params", "grads", "adamw", "emas")]
            print(
                f"{x['parallel']:<9}{x['compile']:<9}{x['how']:<6}{x['ac']:<4}{r:>5}"
                + "".join(f"{c:>10.2f}" for c in cells)
                + f"{total / mib:>11.2f}{x['first_s']:>11.2f}{x['wall_ms']:>9.1f}{x['cpu_ms']:>8.1f}"
                + f"{x.get('graphs') if x.get('graphs') is not None else '-':>7}"
                + (f"{x['peak_gib']:>10.2f}" if "peak_gib" in x else "")
            )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = _device()
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg = load_config(args.config, [])
    mcfg = dataclasses.replace(cfg.model_config(), pos_impl="fused" if jitrope.HAS_EXTENSION else "torch")
    hows = {k: args.compile_how if k == "fsdp" and args.compile != "none" else ["block"] for k in args.parallel}
    cases = [(k, h, ac) for k in args.parallel for h in hows[k] for ac in args.activation_checkpointing]
    rows = []
    for case in cases:
        mine = run_case(args, cfg.train, mcfg, case, device, world)
        every = [None] * world
        if world > 1:
            dist.all_gather_object(every, mine)
        rows.append(every if world > 1 else [mine])
    if int(os.environ.get("RANK", "0")) == 0:
        n = rows[0][0]["params_n"]
        print(
            f"# {args.config}: JiT {n / 1e6:.2f}M params, global batch {args.batch or cfg.train.batch_size}, "
            f"{world} rank(s) on {device}, torch {torch.__version__}; bytes of each rank's local shards"
        )
        _print(rows, world)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": args.config, "world": world, "rows": rows}, f, indent=2)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
