#!/usr/bin/env python
"""Benchmark jitrope's fused ops against eager PyTorch and a plain copy of the same bytes.

For each op and case it prints the fused time, the eager time (the code a user would write, named in
each op's docstring: for rope2d and qk_norm_rope the published JiT / EVA-02 way, cos/sin tables
computed once and cached), with --compile the time of torch.compile of that eager code (what a user
picks instead of a custom kernel), the time of a plain copy of the bytes the op reads and writes (a
clone of x; forward+backward: a clone of x and of the gradient), and the ratios fused/copy (1.0 =
as fast as a copy, the memory-bandwidth bound), eager/fused and compiled/fused (speed-ups), for the
forward and the forward+backward. All ratios of a row come from the same run. Times are medians
over --reps runs after --warmup runs, taken with CUDA events on a GPU; the columns of a row are
timed in turns (one call of each per round), so that a shared machine's changing load weighs on
them alike (--order blocked: all runs of one column, then the next).

    python scripts/bench_ops.py --op rope2d --device cpu --dtype float32
    python scripts/bench_ops.py --op qk_norm_rope --threads 2 --compile
    python scripts/bench_ops.py --op pos2d_add --threads 2
    python scripts/bench_ops.py --op pos2d_add_indexed --quick --compile
    python scripts/bench_ops.py --op all --device cuda --dtype bfloat16,float32 --compile --json bench.json
"""

from __future__ import annotations

import argparse
import ctypes
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
from jitrope.reference import qk_norm_rope_ref, rope2d_ref  # noqa: E402
from jitrope.rope import axial_freqs, sequence_coords  # noqa: E402

# ---------------------------------------------------------------- generic harness


def _timer(device: torch.device, clock: str) -> Callable[[Callable[[], object]], float]:
    """One call of fn timed in milliseconds: CUDA events on a GPU; on a CPU wall time, or with
    clock="cpu" the CPU time of this process (its threads' time on the CPU, page faults included,
    time spent waiting for a core while other jobs run excluded: with 1 thread, what a quiet
    machine's wall clock would read)."""
    if device.type == "cuda":

        def one(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return one
    now = time.process_time if clock == "cpu" else time.perf_counter

    def one(fn: Callable[[], object]) -> float:
        t0 = now()
        fn()
        return (now() - t0) * 1e3

    return one


def time_ms(
    fns: Dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    clock: str = "wall",
    order: str = "interleaved",
) -> Dict[str, float]:
    """Median time in milliseconds of each of fns, after `warmup` untimed calls of each.

    order="interleaved" (the default) takes the timed calls in rounds, one call of every function
    per round, each round starting one function later: a shared machine's load, which drifts over
    seconds, then weighs on every column of a row alike, and no column always follows the same one
    (whose memory traffic it would inherit). order="blocked" times all calls of one function, then
    the next (the order of sessions before 2026-12-07), for comparison."""
    one = _timer(device, clock)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    if order == "blocked":
        for name in names:
            for _ in range(warmup):
                fns[name]()
            for _ in range(reps):
                times[name].append(one(fns[name]))
    else:
        for _ in range(warmup):
            for name in names:
                fns[name]()
        for r in range(reps):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                times[name].append(one(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def keep_freed_blocks() -> str:
    """On glibc, keep freed blocks in the heap for the next allocation instead of handing them back
    to the OS (mallopt: the largest mmap threshold, 32 MiB, and no trimming), so that a timed call
    reuses the memory its previous call freed, as a caching allocator (jemalloc, tcmalloc; the
    advice of PyTorch's CPU performance guide) does. With the defaults, whether a call's 14 MB
    outputs come back as fresh pages, each one faulted in and zeroed by the kernel, depends on the
    allocation history of the process, and so does the copy column. The setting
    applies to every column (fused, eager, compiled, copy). Returns what was set, for the header."""
    if not sys.platform.startswith("linux"):
        return "the platform's allocator"
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "the platform's allocator"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 2**31 - 1):
        return "glibc malloc keeping freed blocks (mmap threshold 32 MiB, no trim)"
    return "glibc malloc, defaults (mallopt refused)"


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
    t = time_ms(dict(fns), device, warmup=args.warmup, reps=args.reps, clock=args.clock, order=args.order)
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


def print_table(rows: List[Dict[str, object]], columns=None) -> None:
    columns = columns or COLUMNS
    cells = [["-" if r[key] is None else fmt.format(r[key]) for key, _, fmt in columns] for r in rows]
    widths = [max(len(head), *(len(c[i]) for c in cells)) for i, (_, head, _) in enumerate(columns)]
    print("  ".join(head.ljust(w) for (_, head, _), w in zip(columns, widths)))
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
                "pos2d_add",
                case,
                "fwd",
                device=device,
                dtype=dtype,
                args=args,
                fused=lambda: fused(x, pos_h, pos_w),
                eager=lambda: eager(x, pos_h, pos_w),
                copy=lambda: x.clone(),
            )
        )
        inputs = tuple(t.detach().requires_grad_() for t in (x, pos_h, pos_w))
        rows.append(
            measure(
                "pos2d_add",
                case,
                "fwd+bwd",
                device=device,
                dtype=dtype,
                args=args,
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
                "pos2d_add_indexed",
                case,
                "fwd",
                device=device,
                dtype=dtype,
                args=args,
                fused=cycling(lambda r, c: ops.pos2d_add_indexed(x, pos_h, pos_w, r, c)),
                eager=cycling(lambda r, c: eager(x, pos_h, pos_w, r, c)),
                compiled=cycling(lambda r, c: compiled(x, pos_h, pos_w, r, c)),
                copy=lambda: x.clone(),
                note=note,
            )
        )
        inputs = tuple(t.detach().requires_grad_() for t in (x, pos_h, pos_w))

        def fwd_bwd(fn):
            return cycling(lambda r, c: torch.autograd.grad(fn(*inputs, r, c), inputs, grad))

        rows.append(
            measure(
                "pos2d_add_indexed",
                case,
                "fwd+bwd",
                device=device,
                dtype=dtype,
                args=args,
                fused=fwd_bwd(ops.pos2d_add_indexed),
                eager=fwd_bwd(eager),
                compiled=fwd_bwd(compiled),
                copy=lambda: (x.clone(), grad.clone()),
                note=note,
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
            "rope2d",
            case,
            "fwd",
            device=device,
            dtype=dtype,
            args=args,
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
            "rope2d",
            case,
            "fwd+bwd",
            device=device,
            dtype=dtype,
            args=args,
            fused=fused_fb,
            eager=eager_fb,
            compiled=lambda: eager_fb(eva_qk_compiled),
            copy=lambda: (x.clone(), g.clone()),
            note=note,
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
            "rope2d",
            case + " per-head learned freqs",
            "fwd+bwd",
            device=device,
            dtype=dtype,
            args=args,
            fused=fused_mixed,
            eager=eager_mixed,
            copy=lambda: (x.clone(), g.clone()),
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
    projection, then the same values as a contiguous tensor. Fused: one
    qk_norm_rope call. Eager: the published JiT code, the RMSNorm module on q and on k, then
    x*cos + rotate_half(x)*sin with cached per-token tables. Copy: a clone of qk (plus one of the
    gradient for forward+backward). Last, on the view, learned per-head frequencies (RoPE-Mixed)
    with their gradient, against jitrope.reference.qk_norm_rope_ref."""
    B, H, D, prefix, grid = 8, 12, 64, 32, (16, 16)
    N = prefix + grid[0] * grid[1]
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype, generator=gen)
    view = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]
    weight = 1 + 0.1 * torch.randn(2, D, device=device, generator=gen)
    coords = sequence_coords(grid, prefix=prefix, device=device)
    freqs = axial_freqs(D, device=device)
    cos, sin = _eva_tables(coords, freqs, dtype)
    g = torch.randn(view.shape, device=device, dtype=dtype, generator=gen)

    def published(t, w):
        q, k = _rms_norm(t[0], w[0]), _rms_norm(t[1], w[1])
        return q * cos + _rotate_half_interleaved(q) * sin, k * cos + _rotate_half_interleaved(k) * sin

    published_compiled = _compiled(published, args)
    note = "eager = published JiT: RMSNorm modules, then rope with cached cos/sin tables"
    rows = []
    for layout, x in (("qk-view", view), ("contiguous", view.contiguous())):
        case = f"B{B} H{H} N{N} D{D} {layout}"
        rows.append(
            measure(
                "qk_norm_rope",
                case,
                "fwd",
                device=device,
                dtype=dtype,
                args=args,
                fused=lambda x=x: ops.qk_norm_rope(x, weight, coords, freqs),
                eager=lambda x=x: published(x, weight),
                compiled=lambda x=x: published_compiled(x, weight),
                copy=lambda x=x: x.clone(),
                note=note,
            )
        )
        xg = x.detach().requires_grad_()
        wg = weight.detach().requires_grad_()

        def fused_fb(xg=xg, wg=wg):
            return torch.autograd.grad(ops.qk_norm_rope(xg, wg, coords, freqs), (xg, wg), g)

        def eager_fb(fn=published, xg=xg, wg=wg):
            return torch.autograd.grad(fn(xg, wg), (xg, wg), (g[0], g[1]))

        rows.append(
            measure(
                "qk_norm_rope",
                case,
                "fwd+bwd",
                device=device,
                dtype=dtype,
                args=args,
                fused=fused_fb,
                eager=eager_fb,
                compiled=lambda eager_fb=eager_fb: eager_fb(published_compiled),
                copy=lambda x=x: (x.clone(), g.clone()),
                note=note,
            )
        )
    # RoPE-Mixed: learned per-head frequencies get a gradient too.
    xg = view.detach().requires_grad_()
    wg = weight.detach().requires_grad_()
    fh = (torch.randn(H, 2, D // 2, device=device, generator=gen) * 0.1).requires_grad_()
    rows.append(
        measure(
            "qk_norm_rope",
            f"B{B} H{H} N{N} D{D} qk-view per-head learned freqs",
            "fwd+bwd",
            device=device,
            dtype=dtype,
            args=args,
            fused=lambda: torch.autograd.grad(ops.qk_norm_rope(xg, wg, coords, fh), (xg, wg, fh), g),
            eager=lambda: torch.autograd.grad(qk_norm_rope_ref(xg, wg, coords, fh), (xg, wg, fh), g),
            copy=lambda: (view.clone(), g.clone()),
            note="eager = jitrope.reference.qk_norm_rope_ref (learned freqs: sin/cos recomputed every step)",
        )
    )
    return rows


def _compiled(fn: Callable, args: argparse.Namespace) -> Callable:
    """torch.compile of the eager baseline (compiled lazily, on the first timed warm-up call)."""
    return torch.compile(fn, fullgraph=True) if args.compile else fn


# ---------------------------------------------------------------- packed batches (--packed)

# HBM peaks of the SXM parts (bytes/s), from NVIDIA's data sheets: the GPU goal is a fraction of these.
HBM_PEAK_GBS = {"H200": 4800.0, "H100": 3350.0}
# Image grids of the packed mixes: on the CPU the emoji mix ({16..48}^2, 32x48, 48x32 at patch 4); on
# CUDA JiT at patch 16 on 256..512 px squares plus 384x512 / 512x384.
PACKED_GRIDS = {
    "cpu": [(4, 4), (6, 6), (8, 8), (10, 10), (12, 12), (8, 12), (12, 8)],
    "cuda": [(16, 16), (20, 20), (24, 24), (28, 28), (32, 32), (24, 32), (32, 24)],
}
PACKED_TOKENS = {"cpu": [2048], "cuda": [65536, 131072, 262144]}


def packed_mix(budget: int, grids, gen: torch.Generator):
    """Grids drawn at random and packed greedily until not even the smallest fits the token budget."""
    smallest = min(h * w for h, w in grids)
    out, used = [], 0
    while used + smallest <= budget:
        g = grids[int(torch.randint(len(grids), (1,), generator=gen))]
        if used + g[0] * g[1] <= budget:
            out.append(g)
            used += g[0] * g[1]
    return out


def packed_inputs(budget: int, calls: int, H: int, D: int, device, dtype, seed: int = 0):
    """``calls`` packed batches, each a new size mix (so a new T and new per-token coords): the [2, 1, H, T, D]
    q/k view of a [1, T, 3, H, D] projection, float32 coords [T, 2] (each image's own grid) and a gradient."""
    gen = torch.Generator().manual_seed(seed)
    dgen = torch.Generator(device=device).manual_seed(seed)  # on the device: 256k-token inputs in no time
    grids = PACKED_GRIDS["cuda" if device.type == "cuda" else "cpu"]
    out = []
    for _ in range(calls):
        mix = packed_mix(budget, grids, gen)
        coords = torch.cat([sequence_coords(g) for g in mix]).to(device)
        T = coords.shape[0]
        qkv = torch.randn(1, T, 3, H, D, generator=dgen, device=device).to(dtype)
        g = torch.randn(2, 1, H, T, D, generator=dgen, device=device).to(dtype)
        out.append((qkv.permute(2, 0, 3, 1, 4)[:2], coords, g))
    return out


def _tables_from_coords(coords: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype):
    """cos/sin [T, D] rebuilt from this call's coords (nothing to cache: positions change every batch)."""
    return _eva_tables(coords, freqs, dtype)


def packed_rope_eager(x: torch.Tensor, coords: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The competent eager code on a packed [2, 1, H, T, D] q/k view: one cos/sin per call, shared by q and k."""
    cos, sin = _tables_from_coords(coords, freqs, x.dtype)
    return x * cos + _rotate_half_interleaved(x) * sin


def packed_qk_norm_rope_eager(
    x: torch.Tensor, weight: torch.Tensor, coords: torch.Tensor, freqs: torch.Tensor
) -> torch.Tensor:
    """JiT's RMSNorm on q and on k, then rope with one cos/sin per call built from the coords."""
    cos, sin = _tables_from_coords(coords, freqs, x.dtype)
    qk = _rms_norm(x, weight[:, None, None, None, :])
    return qk * cos + _rotate_half_interleaved(qk) * sin


def bench_packed(
    op: str, device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> List[Dict[str, object]]:
    """``op`` (rope2d or qk_norm_rope) on packed batches whose positions change every call.

    One timed run is ``--packed-calls`` calls, each on its own size mix (its own T and coords), the
    same inputs for every contender: fused op; eager code that rebuilds cos/sin from the coords per
    call; ``torch.compile(dynamic=True)`` of that code (one graph for every T); a copy of the same
    bytes (a clone of the q/k view, plus one of the gradient for forward+backward). GB/s counts the
    bytes the op must move: read q/k and write the result (forward), plus read the gradient and
    write dq/dk (backward)."""
    H, D = (16, 64) if device.type == "cuda" else (6, 64)
    budgets = args.packed_tokens or PACKED_TOKENS["cuda" if device.type == "cuda" else "cpu"]
    freqs = axial_freqs(D, device=device)
    gen = torch.Generator().manual_seed(1)
    weight = (1 + 0.1 * torch.randn(2, D, generator=gen)).to(device)
    if op == "rope2d":
        eager = packed_rope_eager

        def fused(x, c):
            return ops.rope2d(x, c, freqs)

        def base(fn):
            return lambda x, c: fn(x, c, freqs)
    else:
        eager = packed_qk_norm_rope_eager

        def fused(x, c, w=weight):
            return ops.qk_norm_rope(x, w, c, freqs)

        def base(fn, w=weight):
            return lambda x, c: fn(x, w, c, freqs)

    compiled = torch.compile(eager, dynamic=True, fullgraph=True) if args.compile else None
    rows = []
    for budget in budgets:
        batches = packed_inputs(budget, args.packed_calls, H, D, device, dtype, seed=budget)
        Ts = [c.shape[0] for _, c, _ in batches]
        leaves = [(x.detach().requires_grad_(), c, g) for x, c, g in batches]

        def each(fn):
            return lambda: [fn(x, c) for x, c, _ in batches]

        def each_fb(fn):
            return lambda: [torch.autograd.grad(fn(x, c), x, g) for x, c, g in leaves]

        case = f"T~{budget} ({min(Ts)}..{max(Ts)}) H{H} D{D}, {len(batches)} mixes"
        nbytes = sum(x.numel() * x.element_size() for x, _, _ in batches)
        for pass_, wrap, moved, copy in (
            ("fwd", each, 2 * nbytes, lambda: [x.clone() for x, _, _ in batches]),
            ("fwd+bwd", each_fb, 4 * nbytes, lambda: [(x.clone(), g.clone()) for x, _, g in batches]),
        ):
            row = measure(
                op,
                case,
                pass_,
                device=device,
                dtype=dtype,
                args=args,
                fused=wrap(fused),
                eager=wrap(base(eager)),
                compiled=None if compiled is None else wrap(base(compiled)),
                copy=copy,
                note="torch.compile(dynamic=True)" if compiled is not None else "",
            )
            row["gbs"] = moved / (row["fused_ms"] * 1e-3) / 1e9
            row["copy_gbs"] = moved / (row["copy_ms"] * 1e-3) / 1e9
            row["tokens"] = Ts
            rows.append(row)
    return rows


PACKED_COLUMNS = [
    ("op", "op", "{}"),
    ("case", "case", "{}"),
    ("pass", "pass", "{}"),
    ("dtype", "dtype", "{}"),
    ("fused_ms", "fused ms", "{:.3f}"),
    ("eager_ms", "eager ms", "{:.3f}"),
    ("compiled_ms", "compiled ms", "{:.3f}"),
    ("copy_ms", "copy ms", "{:.3f}"),
    ("fused_over_copy", "fused/copy", "{:.2f}"),
    ("eager_over_fused", "eager/fused", "{:.2f}"),
    ("compiled_over_fused", "compiled/fused", "{:.2f}"),
    ("gbs", "fused GB/s", "{:.1f}"),
    ("copy_gbs", "copy GB/s", "{:.1f}"),
    ("peak_frac", "of peak", "{:.0%}"),
    ("goal", "goal", "{}"),
]


def packed_goals(rows: List[Dict[str, object]], device: torch.device) -> None:
    """The goals next to each row: >= 1.5x compiled on the CPU; >= 70% of HBM peak on a GPU."""
    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in HBM_PEAK_GBS.items() if k in name), None)
    for r in rows:
        r["peak_frac"] = r["gbs"] / peak if peak else None
        if device.type == "cuda":
            r["goal"] = (
                "n/a (unknown HBM peak)"
                if peak is None
                else f">=70% of {peak:.0f} GB/s: {'met' if r['peak_frac'] >= 0.7 else 'NOT met'}"
            )
        elif r["compiled_over_fused"] is None:
            r["goal"] = ">=1.5x compiled: n/a (no --compile)"
        else:
            r["goal"] = f">=1.5x compiled: {'met' if r['compiled_over_fused'] >= 1.5 else 'NOT met'}"


def run_packed(names: List[str], device: torch.device, dtypes, args: argparse.Namespace) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    for name in names:
        if name not in ("rope2d", "qk_norm_rope"):
            continue
        for dtype in dtypes:
            rows.extend(bench_packed(name, device, dtype, args))
    packed_goals(rows, device)
    return rows


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
    p.add_argument(
        "--dtype", default=None, help="comma-separated dtypes (default: float32 on CPU, bfloat16,float32 on CUDA)"
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    p.add_argument("--reps", type=int, default=30, help="timed runs (the median is reported)")
    p.add_argument("--quick", action="store_true", help="only the first size of each op")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile of the eager baselines (rope2d, qk_norm_rope, pos2d_add_indexed); "
        "compiling takes minutes on a CPU",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="CPU timing: wall time (default) or the process's CPU time (with --threads 1, robust to other jobs)",
    )
    p.add_argument(
        "--order",
        choices=["interleaved", "blocked"],
        default="interleaved",
        help="timed calls of a row's columns in rounds, one of each per round (default), or all calls of one "
        "column, then the next",
    )
    p.add_argument(
        "--malloc-defaults", action="store_true", help="CPU: leave glibc malloc as it is (see keep_freed_blocks)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    p.add_argument(
        "--packed",
        action="store_true",
        help="rope2d / qk_norm_rope on packed batches whose positions change every call (a new size mix each "
        "call), against eager code rebuilding cos/sin per call, its torch.compile (--compile) and a copy",
    )
    p.add_argument(
        "--packed-tokens",
        type=lambda v: [int(t) for t in v.split(",")],
        default=None,
        help="--packed: comma-separated token budgets T (default 2048 on CPU; 65536,131072,262144 on CUDA)",
    )
    p.add_argument("--packed-calls", type=int, default=4, help="--packed: size mixes (calls) per timed run (default 4)")
    args = p.parse_args(argv)

    if not jitrope.HAS_EXTENSION:
        print(f"jitrope extension not built: {jitrope.EXTENSION_ERROR}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    alloc = keep_freed_blocks() if device.type == "cpu" and not args.malloc_defaults else "the allocator as it is"
    dtypes = args.dtype or ("bfloat16,float32" if device.type == "cuda" else "float32")
    dtypes = [getattr(torch, d.strip()) for d in dtypes.split(",")]
    names = OPS if args.op == "all" else [args.op]

    if args.packed:
        if args.packed_calls < 1 or any(t < 16 for t in args.packed_tokens or [16]):
            p.error("--packed-calls must be >= 1 and --packed-tokens >= 16")
        with torch.inference_mode(False):
            rows = run_packed(names, device, dtypes, args)
        where = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        )
        print(
            f"jitrope {jitrope.__version__}, torch {torch.__version__}, {where}; packed batches, "
            f"{args.packed_calls} size mixes per run, median of {args.reps} runs, {args.order}"
        )
        print(
            "compiled = torch.compile(dynamic=True, fullgraph=True) of the eager code: one graph for every T; "
            "GB/s = bytes the op must move / fused time\n"
        )
        print_table(rows, PACKED_COLUMNS)
        if args.json:
            args.json.write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": rows}, indent=2))
        return 0

    rows: List[Dict[str, object]] = []
    for name in names:
        for dtype in dtypes:
            with torch.inference_mode(False):
                rows.extend(BENCHES[name](device, dtype, args))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"jitrope {jitrope.__version__}, torch {torch.__version__}, {where}, {alloc}; "
        f"median of {args.reps} runs, {args.order}, {args.clock} clock\n"
    )
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
