#!/usr/bin/env python
"""Time one JiT training step (forward + backward) with pos_impl="fused" vs pos_impl="torch".

Both models share their weights; only the position ops differ (SPEC §5: "changing the flag changes
nothing else"). The two are timed alternately, step by step, so drift of a shared machine hits
both alike; the median of ``--iters`` steps is reported.

    PYTHONPATH=python python scripts/bench_model.py                       # JiT-S/4, 64x64, CPU
    PYTHONPATH=python python scripts/bench_model.py --pos-embed all --json
    PYTHONPATH=python python scripts/bench_model.py --device cuda --batch 64 --amp
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

import jitrope
from jitrope.model import JiT, JiTConfig
from jitrope.posenc import POS_EMBEDS

# The encodings whose hot path runs a jitrope op (the others are identical under both impls).
OP_ENCODINGS = ["rope2d", "rope2d_mixed", "factorized2d", "sincos2d+rope2d"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="JiT-S/4", help="JiTConfig preset (default: JiT-S/4, 64x64 at patch 4)")
    p.add_argument("--pos-embed", nargs="+", default=["rope2d", "factorized2d"],
                   help=f"encodings to time, or 'all' ({', '.join(OP_ENCODINGS)}); default: rope2d factorized2d")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--cond", type=int, default=32,
                   help="condition image size, 0 for none (default 32: 256 + 64 tokens)")
    p.add_argument("--iters", type=int, default=3, help="timed steps per implementation (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (as training on a GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU; 0 keeps the default")
    p.add_argument("--max-ratio", type=float, default=None,
                   help="exit 1 if fused/torch step time exceeds this for any encoding (e.g. 1.05)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.pos_embed == ["all"]:
        args.pos_embed = list(OP_ENCODINGS)
    for pe in args.pos_embed:
        if pe not in POS_EMBEDS:
            p.error(f"--pos-embed {pe!r}: not one of {list(POS_EMBEDS)}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_encoding(args: argparse.Namespace, pos_embed: str, device: torch.device) -> Dict:
    cfg = JiTConfig.preset(args.preset, pos_embed=pos_embed, pos_impl="torch", cond_img_size=args.cond or None)
    torch.manual_seed(0)
    models = {"torch": JiT(cfg).to(device)}
    row: Dict = {"pos_embed": pos_embed, "params_M": sum(p.numel() for p in models["torch"].parameters()) / 1e6,
                 "tokens": models["torch"].sequence_layout().n_tokens}
    fused = JiT(dataclasses.replace(cfg, pos_impl="fused")).to(device)
    fused.load_state_dict(models["torch"].state_dict())
    if fused.pos_impl == "fused":
        models["fused"] = fused
    else:
        row["fused_error"] = f"extension not loaded: {jitrope.EXTENSION_ERROR}"

    g = torch.Generator().manual_seed(0)
    B, S = args.batch, cfg.img_size
    x = torch.randn(B, 3, S, S, generator=g).to(device)
    t = torch.rand(B, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes + 1, (B,), generator=g).to(device)
    cond = torch.randn(B, 3, args.cond, args.cond, generator=g).to(device) if args.cond else None

    def step(model: JiT) -> float:
        model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = (model(x, t, y, cond=cond) - x).float().pow(2).mean()
        loss.backward()
        _sync(device)
        return time.perf_counter() - t0

    times: Dict[str, List[float]] = {k: [] for k in models}
    for i in range(args.warmup + args.iters):
        for name in list(models):
            try:
                dt = step(models[name])
            except (RuntimeError, NotImplementedError) as e:  # e.g. kernels not built for this device
                row[f"{name}_error"] = str(e).splitlines()[0][:200]
                del models[name], times[name]
                continue
            if i >= args.warmup:
                times[name].append(dt)
    for name, ts in times.items():
        row[f"{name}_ms"] = 1e3 * statistics.median(ts)
    if "fused_ms" in row and "torch_ms" in row:
        row["ratio_fused_over_torch"] = row["fused_ms"] / row["torch_ms"]
    return row


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    meta = {
        "preset": args.preset, "batch": args.batch, "cond": args.cond, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "amp": args.amp, "iters": args.iters, "torch": torch.__version__,
        "has_extension": jitrope.HAS_EXTENSION,
    }
    rows = [bench_encoding(args, pe, device) for pe in args.pos_embed]
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
    else:
        print(f"# {args.preset} train step (fwd+bwd), batch {args.batch}, cond {args.cond or 'none'}, "
              f"{meta['device_name']}, {meta['threads']} threads, amp={args.amp}, median of {args.iters}")
        print(f"{'pos_embed':<18}{'tokens':>7}{'torch ms':>11}{'fused ms':>11}{'fused/torch':>13}")
        for r in rows:
            tm = f"{r['torch_ms']:.1f}" if "torch_ms" in r else "-"
            fm = f"{r['fused_ms']:.1f}" if "fused_ms" in r else "-"
            ratio = f"{r['ratio_fused_over_torch']:.3f}" if "ratio_fused_over_torch" in r else "-"
            print(f"{r['pos_embed']:<18}{r['tokens']:>7}{tm:>11}{fm:>11}{ratio:>13}")
            for k in ("torch_error", "fused_error"):
                if k in r:
                    print(f"    {k.split('_')[0]}: {r[k]}")
    if args.max_ratio is not None:
        slow = [r["pos_embed"] for r in rows if r.get("ratio_fused_over_torch", 0.0) > args.max_ratio]
        missing = [r["pos_embed"] for r in rows if "ratio_fused_over_torch" not in r]
        if slow or missing:
            print(f"fused slower than {args.max_ratio}x torch: {slow}; not measured: {missing}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
