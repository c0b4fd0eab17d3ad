"""Runs every fused op forward and backward on CUDA over awkward shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/sanitize_ops.py

Shapes cover odd sizes, strided q/k views of a qkv tensor, misaligned (unvectorizable) rows,
B = 0, per-head frequencies, prefix tokens and offsets, in every dtype; packed [2, 1, H, T, D] q/k views with
per-token coords of several grids (packed batches, docs/ops.md), ``freqs_index`` (per-sequence
frequency tables of rope2d / qk_norm_rope) and ``pos2d_add_indexed``. Each result is compared
with the reference so a kernel that reads the wrong bytes fails here too, not only under the
sanitizer. Exits non-zero on any mismatch.
"""

import argparse
import sys

import torch

import jitrope
from jitrope import ops
from jitrope.reference import pos2d_add_ref, qk_norm_rope_ref, rope2d_ref
from jitrope.rope import axial_freqs, sequence_coords

TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def check(name, got, want, dtype):
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    ok = err <= TOL[dtype] * max(1.0, want.double().abs().max().item() if want.numel() else 1.0)
    print(f"{'ok ' if ok else 'BAD'} {name:60s} max abs err {err:.3e}")
    return ok


def rope_cases(dev, dtype):
    ok = True
    for B, H, N0, D, per_head, inter in [
        (2, 3, 5, 8, False, True),
        (1, 4, 33, 66, True, False),
        (0, 2, 4, 8, False, True),
        (3, 12, 16, 64, True, True),
    ]:
        gh = max(1, int(N0**0.5))
        coords = sequence_coords((gh, N0 // gh), prefix=N0 - gh * (N0 // gh) + 1, cond_grid=(1, 1)).to(dev)
        N = coords.shape[0]
        qkv = torch.randn(B, N, 3, H, D, device=dev, dtype=dtype)
        qk = qkv.permute(2, 0, 3, 1, 4)[:2]
        freqs = (
            torch.randn(H, 2, D // 2) if per_head else axial_freqs(D) if D % 4 == 0 else torch.randn(2, D // 2)
        ).to(dev)
        freqs.requires_grad_(True)
        x = qk.detach().clone().requires_grad_(True)
        out = ops.rope2d(qk, coords, freqs, interleaved=inter)
        ok &= check(
            f"rope2d fwd {dtype} B{B} H{H} N{N} D{D} ph{per_head} il{inter}",
            out,
            rope2d_ref(qk, coords, freqs, interleaved=inter),
            dtype,
        )
        g = torch.randn_like(out)
        y = ops.rope2d(x, coords, freqs, interleaved=inter)
        gx, gf = torch.autograd.grad(y, (x, freqs), g)
        xr = x.detach().double().requires_grad_(True)
        fr = freqs.detach().double().requires_grad_(True)
        gxr, gfr = torch.autograd.grad(rope2d_ref(xr, coords.double(), fr, interleaved=inter), (xr, fr), g.double())
        ok &= check(f"rope2d bwd x {dtype} B{B} N{N} D{D}", gx, gxr, dtype)
        # The freqs gradient has freqs' dtype (float32 here, also for float64 x): judge it at the
        # looser of the two precisions.
        fdt = dtype if TOL[dtype] >= TOL[freqs.dtype] else freqs.dtype
        ok &= check(f"rope2d bwd freqs {dtype} B{B} N{N} D{D}", gf, gfr, fdt)
        if B:
            z = qk[..., 1 : D - 1]  # rows that start off a 16-byte boundary
            ok &= check(
                f"rope2d misaligned {dtype}",
                ops.rope2d(z, coords, freqs[..., : (D - 2) // 2].detach(), interleaved=inter),
                rope2d_ref(z, coords, freqs[..., : (D - 2) // 2].detach(), interleaved=inter),
                dtype,
            )
            w = out.clone()
            with torch.no_grad():
                ops.rope2d_(w, coords, -freqs.detach(), interleaved=inter)
            ok &= check(f"rope2d_ inverse {dtype}", w, qk, dtype)
    return ok


def pos_cases(dev, dtype):
    ok = True
    for B, N, D, grid, t0, r0, c0, mh, mw in [
        (2, 9, 8, (2, 3), 1, 0, 1, 4, 5),
        (3, 300, 66, (16, 16), 32, 2, 0, 20, 18),
        (0, 5, 4, (1, 1), 0, 0, 0, 1, 1),
        (1, 77, 7, (4, 9), 5, 3, 4, 9, 13),
    ]:
        x = torch.randn(B, N, D, device=dev, dtype=dtype).requires_grad_(True)
        ph = torch.randn(mh, D, device=dev, dtype=dtype).requires_grad_(True)
        pw = torch.randn(mw, D, device=dev, dtype=dtype).requires_grad_(True)
        kw = dict(token_offset=t0, row_offset=r0, col_offset=c0)
        out = ops.pos2d_add(x, ph, pw, grid, **kw)
        ok &= check(
            f"pos2d_add fwd {dtype} B{B} N{N} D{D} grid{grid}", out, pos2d_add_ref(x, ph, pw, grid, **kw), dtype
        )
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, ph, pw), g)
        xr, phr, pwr = (t.detach().double().requires_grad_(True) for t in (x, ph, pw))
        want = torch.autograd.grad(pos2d_add_ref(xr, phr, pwr, grid, **kw), (xr, phr, pwr), g.double())
        for n, a, b in zip(("x", "pos_h", "pos_w"), got, want):
            ok &= check(
                f"pos2d_add bwd {n} {dtype} B{B} N{N}", a, b, dtype if dtype != torch.float16 else torch.bfloat16
            )
        xs = torch.randn(N, B, D + 1, device=dev, dtype=dtype).transpose(0, 1)[..., :D]
        ok &= check(
            f"pos2d_add strided x {dtype}",
            ops.pos2d_add(xs, ph.detach(), pw.detach(), grid, **kw),
            pos2d_add_ref(xs, ph.detach(), pw.detach(), grid, **kw),
            dtype,
        )
    return ok


def qk_norm_rope_cases(dev, dtype):
    ok = True
    # (B, H, N, D, freqs kind, interleaved): D up to the CUDA kernel's 8 pairs per lane, odd pairs.
    for B, H, N, D, kind, inter in [
        (2, 3, 5, 8, "shared", True),
        (1, 4, 33, 66, "per_head", False),
        (0, 2, 4, 8, "shared", True),
        (3, 12, 70, 64, "shared", True),
        (1, 2, 9, 10, None, True),
        (1, 1, 3, 512, "per_head", False),
    ]:
        qkv = torch.randn(B, N, 3, H, D, device=dev, dtype=dtype)
        qk = qkv.permute(2, 0, 3, 1, 4)[:2]
        weight = (torch.rand(2, D, device=dev) + 0.5).requires_grad_(True)
        coords = freqs = None
        if kind is not None:
            coords = sequence_coords((1, N - 1), prefix=1).to(dev)
            freqs = (
                (torch.randn(H, 2, D // 2) if kind == "per_head" else torch.randn(2, D // 2))
                .to(dev)
                .requires_grad_(True)
            )
        x = qk.detach().clone().requires_grad_(True)
        out = ops.qk_norm_rope(x, weight, coords, freqs, interleaved=inter)
        name = f"qk_norm_rope {dtype} B{B} H{H} N{N} D{D} {kind} il{inter}"
        ok &= check(f"{name} fwd", out, qk_norm_rope_ref(qk, weight, coords, freqs, interleaved=inter), dtype)
        g = torch.randn_like(out)
        leaves = [x, weight] + ([freqs] if freqs is not None else [])
        got = torch.autograd.grad(out, leaves, g)
        leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
        ref = qk_norm_rope_ref(
            leaves64[0],
            leaves64[1],
            None if coords is None else coords.double(),
            leaves64[2] if freqs is not None else None,
            interleaved=inter,
        )
        want = torch.autograd.grad(ref, leaves64, g.double())
        for n, a, b in zip(("qk", "weight", "freqs"), got, want):
            # weight / freqs gradients are float32 sums over B*H*N rows: judge them at float32 or looser.
            fdt = dtype if n == "qk" or TOL[dtype] >= TOL[torch.float32] else torch.float32
            ok &= check(f"{name} bwd {n}", a, b, fdt)
        if B:
            z = qk[..., 1 : D - 1]  # rows that start off a 16-byte boundary
            ok &= check(
                f"{name} misaligned",
                ops.qk_norm_rope(z, weight[:, 1 : D - 1].detach(), interleaved=inter),
                qk_norm_rope_ref(z, weight[:, 1 : D - 1].detach(), interleaved=inter),
                dtype,
            )
    return ok


def _packed_coords(grids, dev):
    return torch.cat([sequence_coords(g) for g in grids]).to(dev)


def _per_table(fn, x, coords, freqs, fi):
    """Reference for per-sequence tables: each table's tokens through ``fn`` with that table alone."""
    out = torch.empty_like(x)
    for f in range(freqs.shape[0]):
        sel = fi == f
        if sel.any():
            out[..., sel, :] = fn(x[..., sel, :], coords[sel], freqs[f])
    return out


def packed_cases(dev, dtype):
    """rope2d and qk_norm_rope on a packed [2, 1, H, T, D] q/k view (per-token coords of odd grids), and with
    per-sequence tables (``freqs_index``)."""
    ok = True
    grids = [(3, 5), (1, 1), (7, 2), (4, 4)]
    coords = _packed_coords(grids, dev)
    T, H, D = coords.shape[0], 3, 18
    qk = torch.randn(1, T, 3, H, D, device=dev, dtype=dtype).permute(2, 0, 3, 1, 4)[:2]
    freqs = torch.randn(2, D // 2, device=dev)
    weight = torch.rand(2, D, device=dev) + 0.5
    ok &= check(f"rope2d packed {dtype} T{T}", ops.rope2d(qk, coords, freqs), rope2d_ref(qk, coords, freqs), dtype)
    ok &= check(
        f"qk_norm_rope packed {dtype} T{T}",
        ops.qk_norm_rope(qk, weight, coords, freqs),
        qk_norm_rope_ref(qk, weight, coords, freqs),
        dtype,
    )
    g = torch.randn(qk.shape, device=dev, dtype=dtype)
    x = qk.detach().clone().requires_grad_(True)
    got = torch.autograd.grad(ops.rope2d(x, coords, freqs), x, g)[0]
    xr = x.detach().double().requires_grad_(True)
    want = torch.autograd.grad(rope2d_ref(xr, coords.double(), freqs.double()), xr, g.double())[0]
    ok &= check(f"rope2d packed bwd {dtype} T{T}", got, want, dtype)
    sizes = [h * w for h, w in grids]
    fi = torch.repeat_interleave(torch.tensor([0, 2, 1, 2]), torch.tensor(sizes)).to(dev)
    tables = torch.randn(3, 2, D // 2, device=dev)
    ok &= check(
        f"rope2d freqs_index {dtype} T{T}",
        ops.rope2d(qk, coords, tables, freqs_index=fi),
        _per_table(rope2d_ref, qk, coords, tables, fi),
        dtype,
    )
    x = qk.detach().clone().requires_grad_(True)
    ft = tables.clone().requires_grad_(True)
    gx, gf = torch.autograd.grad(ops.rope2d(x, coords, ft, freqs_index=fi), (x, ft), g)
    xr, fr = x.detach().double().requires_grad_(True), ft.detach().double().requires_grad_(True)
    wx, wf = torch.autograd.grad(_per_table(rope2d_ref, xr, coords.double(), fr, fi), (xr, fr), g.double())
    ok &= check(f"rope2d freqs_index bwd x {dtype}", gx, wx, dtype)
    ok &= check(
        f"rope2d freqs_index bwd freqs {dtype}",
        gf,
        wf,
        dtype if TOL[dtype] >= TOL[torch.float32] else torch.float32,
    )
    ok &= check(
        f"qk_norm_rope freqs_index {dtype} T{T}",
        ops.qk_norm_rope(qk, weight, coords, tables, freqs_index=fi),
        _per_table(lambda a, c, f: qk_norm_rope_ref(a, weight, c, f), qk, coords, tables, fi),
        dtype,
    )
    return ok


def pos_indexed_cases(dev, dtype):
    """pos2d_add_indexed: odd widths, -1 entries, strided x, B = 0, forward and backward."""

    def ref(x, ph, pw, rows, cols):
        add_h = torch.where(rows[:, None] >= 0, ph[rows.clamp_min(0)], 0)
        return x + add_h + torch.where(cols[:, None] >= 0, pw[cols.clamp_min(0)], 0)

    ok = True
    for B, N, D, mh, mw in [(2, 37, 7, 5, 9), (0, 4, 8, 2, 2), (3, 300, 66, 20, 18)]:
        rows = torch.randint(-1, mh, (N,), device=dev)
        cols = torch.randint(-1, mw, (N,), device=dev)
        x = torch.randn(N, B, D + 1, device=dev, dtype=dtype).transpose(0, 1)[..., :D]  # strided
        ph = torch.randn(mh, D, device=dev, dtype=dtype)
        pw = torch.randn(mw, D, device=dev, dtype=dtype)
        name = f"pos2d_add_indexed {dtype} B{B} N{N} D{D}"
        ok &= check(
            f"{name} fwd",
            ops.pos2d_add_indexed(x, ph, pw, rows, cols),
            ref(x.double(), ph.double(), pw.double(), rows, cols),
            dtype,
        )
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, ph, pw)]
        out = ops.pos2d_add_indexed(*leaves, rows, cols)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, g)
        l64 = [t.detach().double().requires_grad_(True) for t in leaves]
        want = torch.autograd.grad(ref(*l64, rows, cols), l64, g.double())
        for n, a, b in zip(("x", "pos_h", "pos_w"), got, want):
            ok &= check(f"{name} bwd {n}", a, b, dtype if dtype != torch.float16 else torch.bfloat16)
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="device to run on (default: cuda)")
    p.add_argument(
        "--cases",
        choices=("all", "packed"),
        default="all",
        help="all (default) or packed: only the packed-batch cases (packed views, freqs_index, pos2d_add_indexed)",
    )
    args = p.parse_args()
    if args.device == "cuda" and not (torch.cuda.is_available() and jitrope.has_cuda_kernels()):
        sys.exit("sanitize_ops: needs a CUDA device and the extension's CUDA kernels")
    torch.manual_seed(0)
    ok = True
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        if args.cases == "all":
            ok &= rope_cases(args.device, dtype)
            ok &= pos_cases(args.device, dtype)
            ok &= qk_norm_rope_cases(args.device, dtype)
        ok &= packed_cases(args.device, dtype)
        ok &= pos_indexed_cases(args.device, dtype)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print("sanitize_ops:", "all ok" if ok else "MISMATCHES")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
