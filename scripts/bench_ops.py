#!/usr/bin/env python
"""Benchmark jitrope's fused ops against eager PyTorch and a plain copy of the same bytes.

For every op and size it prints, for the forward and for forward+backward: the fused op's time,
the eager time (the same math in plain PyTorch ops), the time of a plain copy of the bytes the op
must move (forward: one clone of x; forward+backward: one clone of x and one of grad_out), and the
ratios fused/copy (1.0 = as fast as memory allows) and eager/fused (the speed-up). Times are
medians over --iters runs after --warmup runs; CUDA times come from CUDA events.

    python scripts/bench_ops.py --op pos2d_add --device cpu --dtype float32 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import jitrope  # noqa: E402
from jitrope import ops  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ----------------------------------------------------------------------------------------------
# Generic harness: timing, one result row per (op, size, pass), table and JSON output.


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def result_row(op: str, size: str, pass_: str, fused: float, eager: float, copy: float) -> dict:
    return {
        "op": op,
        "size": size,
        "pass": pass_,
        "fused_ms": fused,
        "eager_ms": eager,
        "copy_ms": copy,
        "fused_over_copy": fused / copy,
        "eager_over_fused": eager / fused,
    }


def print_table(rows: list[dict]) -> None:
    head = f"{'op':<10} {'size':<32} {'pass':<8} {'fused ms':>9} {'eager ms':>9} {'copy ms':>9} {'fused/copy':>10} {'eager/fused':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['op']:<10} {r['size']:<32} {r['pass']:<8} {r['fused_ms']:>9.3f} {r['eager_ms']:>9.3f} "
            f"{r['copy_ms']:>9.3f} {r['fused_over_copy']:>10.2f} {r['eager_over_fused']:>11.2f}"
        )


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], grad: torch.Tensor) -> Callable[[], object]:
    """A closure running fn(*inputs) and its backward to every input."""
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)


# ----------------------------------------------------------------------------------------------
# pos2d_add


def bench_pos2d_add(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    # (B, N, D, grid, token_offset): the problem statement's 16x16 grid of 256 tokens at width 768,
    # the 8x8 condition grid appended after them (256 -> 320), and a larger image.
    sizes = [(64, 256, 768, (16, 16), 0), (64, 320, 768, (8, 8), 256), (16, 1024, 1152, (32, 32), 0)]
    if args.quick:
        sizes = sizes[:1]
    rows = []
    for B, N, D, (gh, gw), t0 in sizes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(B, N, D, generator=gen).to(device, dtype)
        pos_h = (0.02 * torch.randn(gh, D, generator=gen)).to(device, dtype)
        pos_w = (0.02 * torch.randn(gw, D, generator=gen)).to(device, dtype)
        grad = torch.randn(B, N, D, generator=gen).to(device, dtype)
        t1 = t0 + gh * gw

        def fused(x, pos_h, pos_w):
            return ops.pos2d_add(x, pos_h, pos_w, (gh, gw), token_offset=t0)

        def eager(x, pos_h, pos_w):
            table = (pos_h[:, None] + pos_w[None]).reshape(1, gh * gw, D)
            if t0 == 0 and t1 == N:
                return x + table  # the broadcast add a model would write
            return torch.cat((x[:, :t0], x[:, t0:t1] + table, x[:, t1:]), dim=1)

        size = f"B{B} N{N} D{D} grid{gh}x{gw}@{t0}"
        w, n = args.warmup, args.iters
        copy = time_ms(lambda: x.clone(), device, w, n)
        rows.append(
            result_row(
                "pos2d_add", size, "fwd",
                time_ms(lambda: fused(x, pos_h, pos_w), device, w, n),
                time_ms(lambda: eager(x, pos_h, pos_w), device, w, n),
                copy,
            )
        )
        inputs = tuple(t.detach().requires_grad_() for t in (x, pos_h, pos_w))
        rows.append(
            result_row(
                "pos2d_add", size, "fwd+bwd",
                time_ms(fwd_bwd(fused, inputs, grad), device, w, n),
                time_ms(fwd_bwd(eager, inputs, grad), device, w, n),
                time_ms(lambda: (x.clone(), grad.clone()), device, w, n),
            )
        )
    return rows


BENCHES: dict[str, Callable[[argparse.Namespace, torch.device, torch.dtype], list[dict]]] = {
    "pos2d_add": bench_pos2d_add,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=["pos2d_add", "rope2d", "all"], default="all", help="which op to time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--iters", type=int, default=15, help="timed runs; the median is reported")
    parser.add_argument("--quick", action="store_true", help="only the first size of each op")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)

    if not jitrope.HAS_EXTENSION:
        parser.error(f"the C++ extension is not built: {jitrope.EXTENSION_ERROR}")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    names = list(BENCHES) if args.op == "all" else [args.op]
    missing = [n for n in names if n not in BENCHES]
    if missing:
        parser.error(f"no benchmark for {', '.join(missing)} in this tree")
    rows = [row for name in names for row in BENCHES[name](args, device, dtype)]
    for r in rows:
        r.update(device=str(device), dtype=args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"jitrope ops, {args.dtype} on {device} ({where}), torch {torch.__version__}; median of {args.iters} runs")
    print_table(rows)
    if args.json:
        meta = {"torch": torch.__version__, "device": str(device), "device_name": where, "dtype": args.dtype}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
