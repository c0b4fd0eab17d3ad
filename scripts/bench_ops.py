#!/usr/bin/env python
"""Benchmark jitrope's fused ops against eager PyTorch and a plain copy of the same bytes.

For each op and case it prints the fused time, the eager time (the code a user would write, named in
each op's docstring: for rope2d and qk_norm_rope the published JiT / EVA-02 way, cos/sin tables
computed once and cached), with --compile the time of torch.compile of that eager code (what a user
picks instead of a custom kernel), the time of a plain copy of the bytes the op reads and writes (a
clone of x; forward+backward: a clone of x and of the gradient), and the ratios fused/copy (1.0 =
as fast as a copy, the memory-bandwidth bound), eager/fused and compiled/fused (speed-ups), for the
forward and the forward+backward. All ratios of a row come from the same run. Times are medians
over --reps runs after --warmup runs, taken with CUDA events on a GPU.

    python scripts/bench_ops.py --op rope2d --device cpu --dtype float32
    python scripts/bench_ops.py --op qk_norm_rope --threads 2 --compile
    python scripts/bench_ops.py --op pos2d_add --threads 2
    python scripts/bench_ops.py --op pos2d_add_indexed --quick --compile
    python scripts/bench_ops.py --op all --device cuda --dtype bfloat16,float32 --compile --json bench.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import jitrope  # noqa: E402
from jitrope import ops  # noqa: E402
from jitrope.reference import rope2d_ref  # noqa: E402
from jitrope.rope import axial_freqs, sequence_coords  # noqa: E402

# ---------------------------------------------------------------- generic harness


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(
    op: str,
    case: str,
    pass_: str,
    *,
    fused: Callable[[], object],
    eager: Callable[[], object],
    copy: Callable[[], object],
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
    compiled: Optional[Callable[[], object]] = None,
    note: str = "",
) -> Dict[str, object]:
    """One table row: fused, eager, compiled (when given and --compile) and copy times of the same
    work, and their ratios."""
    fns = [("fused", fused), ("eager", eager), ("copy", copy)]
    if compiled is not None and args.compile:
        fns.append(("compiled", compiled))
    t = {name: time_ms(fn, device, warmup=args.warmup, reps=args.reps) for name, fn in fns}
    return {
        "op": op,
        "case": case,
        "pass": pass_,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "fused_ms": t["fused"],
        "eager_ms": t["eager"],
        "copy_ms": t["copy"],
        "fused_over_copy": t["fused"] / t["copy"],
        "eager_over_fused": t["eager"] / t["fused"],
        "compiled_ms": t.get("compiled"),
        "compiled_over_fused": t["compiled"] / t["fused"] if "compiled" in t else None,
        "note": note,
    }


COLUMNS = [
    ("op", "op", "{}"),
    ("case", "case", "{}"),
    ("pass", "pass", "{}"),
    ("dtype", "dtype", "{}"),
    ("fused_ms", "fused ms", "{:.3f}"),
    ("eager_ms", "eager ms", "{:.3f}"),
    ("copy_ms", "copy ms", "{:.3f}"),
    ("fused_over_copy", "fused/copy", "{:.2f}"),
    ("eager_over_fused", "eager/fused", "{:.2f}"),
    ("compiled_ms", "compiled ms", "{:.3f}"),
    ("compiled_over_fused", "compiled/fused", "{:.2f}"),
    ("note", "note", "{}"),
]


def print_table(rows: List[Dict[str, object]]) -> None:
    cells = [["-" if r[key] is None else fmt.format(r[key]) for key, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(head), *(len(c[i]) for c in cells)) for i, (_, head, _) in enumerate(COLUMNS)]
    print("  ".join(head.ljust(w) for (_, head, _), w in zip(COLUMNS, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


# ---------------------------------------------------------------- pos2d_add


def bench_pos2d_add(device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> List[Dict[str, object]]:
    """(B, N, D, grid, token_offset): the problem statement's 16x16 grid of 256 tokens at width 768,
    the 8x8 condition grid appended after them (256 -> 320), and a larger image. Eager: the
    broadcast add a model would write (a cat when the grid does not cover the sequence). Copy: a
    clone of x (plus one of the gradient for forward+backward)."""
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
                return x + table
            return torch.cat((x[:, :t0], x[:, t0:t1] + table, x[:, t1:]), dim=1)

        case = f"B{B} N{N} D{D} grid{gh}x{gw}@{t0}"
        rows.append(
            measure(
                "pos2d_add", case, "fwd", device=device, dtype=dtype, args=args,
                fused=lambda: fused(x, pos_h, pos_w),
                eager=lambda: eager(x, pos_h, pos_w),
                copy=lambda: x.clone(),
            )
        )
        inputs = tuple(t.detach().requires_grad_() for t in (x, pos_h, pos_w))
        rows.append(
            measure(
                "pos2d_add", case, "fwd+bwd", device=device, dtype=dtype, args=args,
                fused=lambda: torch.autograd.grad(fused(*inputs), inputs, grad),
                eager=lambda: torch.autograd.grad(eager(*inputs), inputs, grad),
                copy=lambda: (x.clone(), grad.clone()),
            )
        )
    return rows


# ---------------------------------------------------------------- pos2d_add_indexed


def packed_table_indices(tokens: int, sizes, prefix: int, gen: torch.Generator):
    """rows, cols int64 [tokens] of a packed batch: images of random grids from `sizes`, each with
    `prefix` class tokens (-1, -1) before its gh*gw grid tokens, until the budget is full; the tail
    that no image fits is padding (-1, -1)."""
    rows, cols = [], []
    while True:
        gh, gw = sizes[int(torch.randint(len(sizes), (1,), generator=gen))]
        if len(rows) + prefix + gh * gw > tokens:
            break
        rows += [-1] * prefix + [i for i in range(gh) for _ in range(gw)]
        cols += [-1] * prefix + [j for _ in range(gh) for j in range(gw)]
    pad = tokens - len(rows)
    return torch.tensor(rows + [-1] * pad), torch.tensor(cols + [-1] * pad)


def bench_pos2d_add_indexed(
    device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> List[Dict[str, object]]:
    """A packed batch [1, T, D] of emoji-like images (grids 4x4 to 12x12, non-square too, patch 4 on
    16-48 px), a class token each, whose indices change every call (a pool of 8 packings, cycled).
    Fused: pos2d_add_indexed. Eager: what a competent user writes, index_select of each table with a
    zero row appended for -1, then x + (h + w). Compiled: torch.compile of that eager code. Copy: a
    clone of x (plus one of the gradient for forward+backward)."""
    grids = [(4, 4), (6, 6), (8, 8), (10, 10), (12, 12), (8, 12), (12, 8), (6, 10)]
    sizes = [(4096, 384), (16384, 768), (65536, 768), (262144, 768)]
    if args.quick:
        sizes = sizes[:1]
    max_h = max(g[0] for g in grids)
    max_w = max(g[1] for g in grids)
    rows = []
    for T, D in sizes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, T, D, generator=gen).to(device, dtype)
        pos_h = (0.02 * torch.randn(max_h, D, generator=gen)).to(device, dtype)
        pos_w = (0.02 * torch.randn(max_w, D, generator=gen)).to(device, dtype)
        grad = torch.randn(1, T, D, generator=gen).to(device, dtype)
        pool = [tuple(t.to(device) for t in packed_table_indices(T, grids, 1, gen)) for _ in range(8)]
        waste = sum(int(((r < 0) & (c < 0)).sum()) for r, c in pool) / (len(pool) * T)

        def eager(x, pos_h, pos_w, rows, cols):
            zero = pos_h.new_zeros(1, pos_h.shape[1])
            # -1 % (max + 1) is the appended zero row.
            h = torch.cat((pos_h, zero)).index_select(0, rows % (pos_h.shape[0] + 1))
            w = torch.cat((pos_w, zero)).index_select(0, cols % (pos_w.shape[0] + 1))
            return x + (h + w)

        compiled = _compiled(eager, args)

        def cycling(fn):
            """fn(rows, cols) with the next packing of the pool on every call."""
            state = {"i": 0}

            def call():
                state["i"] = (state["i"] + 1) % len(pool)
                return fn(*pool[state["i"]])

            return call

        case = f"T{T} D{D} packed {len(grids)} grids"
        note = f"indices change every call; eager = index_select + add; -1 tokens {100 * waste:.0f}%"
        rows.append(
            measure(
                "pos2d_add_indexed", case, "fwd", device=device, dtype=dtype, args=args,
                fused=cycling(lambda r, c: ops.pos2d_add_indexed(x, pos_h, pos_w, r, c)),
                eager=cycling(lambda r, c: eager(x, pos_h, pos_w, r, c)),
                compiled=cycling(lambda r, c: compiled(x, pos_h, pos_w, r, c)),
                copy=lambda: x.clone(), note=note,
            )
        )
        inputs = tuple(t.detach().requires_grad_() for t in (x, pos_h, pos_w))

        def fwd_bwd(fn):
            return cycling(lambda r, c: torch.autograd.grad(fn(*inputs, r, c), inputs, grad))

        rows.append(
            measure(
                "pos2d_add_indexed", case, "fwd+bwd", device=device, dtype=dtype, args=args,
                fused=fwd_bwd(ops.pos2d_add_indexed), eager=fwd_bwd(eager), compiled=fwd_bwd(compiled),
                copy=lambda: (x.clone(), grad.clone()), note=note,
            )
        )
    return rows


# ---------------------------------------------------------------- rope2d


def _rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), -1).flatten(-2)


def _eva_tables(coords: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype):
    """EVA-02 / JiT per-token tables [N, D]: each pair's angle repeated on both of its channels."""
    phi = (coords[:, None, 0] * freqs[None, 0] + coords[:, None, 1] * freqs[None, 1]).repeat_interleave(2, -1)
    return phi.cos().to(dtype), phi.sin().to(dtype)


def bench_rope2d(device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> List[Dict[str, object]]:
    """JiT-like q and k (B=8, H=12, N=32 in-context + 16x16 image tokens, D=64) as one [2, B, H, N, D]
    view of a qkv projection. Fused: one rope2d call on the view. Eager: the EVA-02 / JiT way,
    x*cos + rotate_half(x)*sin on q and on k with precomputed per-token tables (learned per-head
    frequencies: jitrope.reference.rope2d_ref). Copy: a clone of the view (plus one of the
    gradient for forward+backward)."""
    B, H, D, prefix, grid = 8, 12, 64, 32, (16, 16)
    N = prefix + grid[0] * grid[1]
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype, generator=gen)
    x = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]
    coords = sequence_coords(grid, prefix=prefix, device=device)
    freqs = axial_freqs(D, device=device)
    cos, sin = _eva_tables(coords, freqs, dtype)

    def eva(t):
        return t * cos + _rotate_half_interleaved(t) * sin

    def eva_qk(t):
        return eva(t[0]), eva(t[1])

    eva_qk_compiled = _compiled(eva_qk, args)
    case = f"B{B} H{H} N{N} D{D} qk-view"
    note = "eager = published EVA/JiT rope, cached cos/sin tables"
    rows = [
        measure(
            "rope2d", case, "fwd", device=device, dtype=dtype, args=args,
            fused=lambda: ops.rope2d(x, coords, freqs),
            eager=lambda: eva_qk(x),
            compiled=lambda: eva_qk_compiled(x),
            copy=lambda: x.clone(),
            note=note,
        )
    ]

    xg = x.detach().requires_grad_()
    g = torch.randn(x.shape, device=device, dtype=dtype, generator=gen)

    def fused_fb():
        return torch.autograd.grad(ops.rope2d(xg, coords, freqs), xg, g)

    def eager_fb(fn=eva_qk):
        return torch.autograd.grad(fn(xg), xg, (g[0], g[1]))

    rows.append(
        measure(
            "rope2d", case, "fwd+bwd", device=device, dtype=dtype, args=args,
            fused=fused_fb, eager=eager_fb, compiled=lambda: eager_fb(eva_qk_compiled),
            copy=lambda: (x.clone(), g.clone()), note=note,
        )
    )

    # RoPE-Mixed: learned per-head frequencies get a gradient too.
    fh = (torch.randn(H, 2, D // 2, device=device, generator=gen) * 0.1).requires_grad_()

    def fused_mixed():
        return torch.autograd.grad(ops.rope2d(xg, coords, fh), (xg, fh), g)

    def eager_mixed():
        return torch.autograd.grad(rope2d_ref(xg, coords, fh), (xg, fh), g)

    rows.append(
        measure(
            "rope2d", case + " per-head learned freqs", "fwd+bwd", device=device, dtype=dtype, args=args,
            fused=fused_mixed, eager=eager_mixed, copy=lambda: (x.clone(), g.clone()),
            note="eager = jitrope.reference.rope2d_ref (learned freqs: sin/cos recomputed every step)",
        )
    )
    return rows


# ---------------------------------------------------------------- qk_norm_rope


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """JiT's RMSNorm module (LLaMA style): float32 statistics, weight applied, cast back."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf).to(x.dtype)


def bench_qk_norm_rope(device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> List[Dict[str, object]]:
    """The rope2d case with JiT's q/k RMSNorm in front: qk is the [2, B, H, N, D] view of a qkv
    projection. Fused: one qk_norm_rope call on the view. Eager: the published JiT code, the
    RMSNorm module on q and on k, then x*cos + rotate_half(x)*sin with cached per-token tables.
    Copy: a clone of the view (plus one of the gradient for forward+backward)."""
    B, H, D, prefix, grid = 8, 12, 64, 32, (16, 16)
    N = prefix + grid[0] * grid[1]
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype, generator=gen)
    x = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]
    weight = 1 + 0.1 * torch.randn(2, D, device=device, generator=gen)
    coords = sequence_coords(grid, prefix=prefix, device=device)
    freqs = axial_freqs(D, device=device)
    cos, sin = _eva_tables(coords, freqs, dtype)

    def published(t, w):
        q, k = _rms_norm(t[0], w[0]), _rms_norm(t[1], w[1])
        return q * cos + _rotate_half_interleaved(q) * sin, k * cos + _rotate_half_interleaved(k) * sin

    published_compiled = _compiled(published, args)
    case = f"B{B} H{H} N{N} D{D} qk-view"
    note = "eager = published JiT: RMSNorm modules, then rope with cached cos/sin tables"
    rows = [
        measure(
            "qk_norm_rope", case, "fwd", device=device, dtype=dtype, args=args,
            fused=lambda: ops.qk_norm_rope(x, weight, coords, freqs),
            eager=lambda: published(x, weight),
            compiled=lambda: published_compiled(x, weight),
            copy=lambda: x.clone(),
            note=note,
        )
    ]
    xg = x.detach().requires_grad_()
    wg = weight.detach().requires_grad_()
    g = torch.randn(x.shape, device=device, dtype=dtype, generator=gen)

    def fused_fb():
        return torch.autograd.grad(ops.qk_norm_rope(xg, wg, coords, freqs), (xg, wg), g)

    def eager_fb(fn=published):
        return torch.autograd.grad(fn(xg, wg), (xg, wg), (g[0], g[1]))

    rows.append(
        measure(
            "qk_norm_rope", case, "fwd+bwd", device=device, dtype=dtype, args=args,
            fused=fused_fb, eager=eager_fb, compiled=lambda: eager_fb(published_compiled),
            copy=lambda: (x.clone(), g.clone()), note=note,
        )
    )
    return rows


def _compiled(fn: Callable, args: argparse.Namespace) -> Callable:
    """torch.compile of the eager baseline (compiled lazily, on the first timed warm-up call)."""
    return torch.compile(fn, fullgraph=True) if args.compile else fn


# ---------------------------------------------------------------- command line

BENCHES: Dict[str, Callable[[torch.device, torch.dtype, argparse.Namespace], List[Dict[str, object]]]] = {
    "pos2d_add": bench_pos2d_add,
    "pos2d_add_indexed": bench_pos2d_add_indexed,
    "rope2d": bench_rope2d,
    "qk_norm_rope": bench_qk_norm_rope,
}
OPS = list(BENCHES)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=[*OPS, "all"], default="all", help="which op to benchmark")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default=None, help="comma-separated dtypes (default: float32 on CPU, bfloat16,float32 on CUDA)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    p.add_argument("--reps", type=int, default=30, help="timed runs (the median is reported)")
    p.add_argument("--quick", action="store_true", help="only the first size of each op")
    p.add_argument(
        "--compile", action="store_true",
        help="also time torch.compile of the eager baselines (rope2d, qk_norm_rope, pos2d_add_indexed); "
        "compiling takes minutes on a CPU",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    if not jitrope.HAS_EXTENSION:
        print(f"jitrope extension not built: {jitrope.EXTENSION_ERROR}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = args.dtype or ("bfloat16,float32" if device.type == "cuda" else "float32")
    dtypes = [getattr(torch, d.strip()) for d in dtypes.split(",")]
    names = OPS if args.op == "all" else [args.op]

    rows: List[Dict[str, object]] = []
    for name in names:
        for dtype in dtypes:
            with torch.inference_mode(False):
                rows.extend(BENCHES[name](device, dtype, args))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"jitrope {jitrope.__version__}, torch {torch.__version__}, {where}; median of {args.reps} runs\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
