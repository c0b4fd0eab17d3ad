"""Pure-PyTorch references of jitrope's ops, written to mirror SPEC.md line by line.

They are what the fused kernels are tested against, what the benchmarks call "eager", and what
``pos_impl="torch"`` runs. Both differentiate through plain autograd.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["rope2d_ref", "pos2d_add_ref", "qk_norm_rope_ref"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    # SPEC: angles and sums are computed in float32, in float64 for float64 inputs.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rope2d_ref(
    x: Tensor, coords: Tensor, freqs: Tensor, *, interleaved: bool = True, freqs_index: Optional[Tensor] = None
) -> Tensor:
    """2D rotary embedding of ``x: [..., H, N, D]``.

    ``coords: [N, 2]`` holds (row y, column x) of each token, ``freqs: [2, D/2]`` (shared) or
    ``[H, 2, D/2]`` (per head). Pair m of token n in head h turns by
    ``phi = coords[n, 0] * freqs[h, 0, m] + coords[n, 1] * freqs[h, 1, m]``.
    Pairs are channels (2m, 2m+1) when ``interleaved``, else (m, m + D/2).

    With ``freqs_index`` (int64 ``[N]``, SPEC §10), ``freqs`` has a leading table dim (``[F, 2, D/2]``
    or ``[F, H, 2, D/2]``) and token n turns by table ``freqs_index[n]``.
    """
    if freqs_index is not None:
        return _rope2d_indexed_ref(x, coords, freqs, freqs_index, interleaved)
    if x.dim() < 3:
        raise ValueError(f"rope2d: x must be [..., H, N, D], got shape {tuple(x.shape)}")
    H, N, D = x.shape[-3:]
    if D % 2:
        raise ValueError(f"rope2d: x's last dim D must be even, got D={D}")
    if coords.shape != (N, 2):
        raise ValueError(f"rope2d: coords must be [N, 2] = [{N}, 2], got {tuple(coords.shape)}")
    if freqs.dim() == 2:
        freqs = freqs.unsqueeze(0)
    if freqs.dim() != 3 or freqs.shape[-2:] != (2, D // 2) or freqs.shape[0] not in (1, H):
        raise ValueError(f"rope2d: freqs must be [2, {D // 2}] or [{H}, 2, {D // 2}], got {tuple(freqs.shape)}")
    acc = _compute_dtype(x)
    c = coords.to(acc)
    f = freqs.to(acc)
    # phi[h, n, m] = y_n * f[h, 0, m] + x_n * f[h, 1, m]
    phi = c[None, :, 0, None] * f[:, None, 0, :] + c[None, :, 1, None] * f[:, None, 1, :]
    cos, sin = phi.cos(), phi.sin()
    xa = x.to(acc)
    if interleaved:
        a, b = xa[..., 0::2], xa[..., 1::2]
    else:
        a, b = xa[..., : D // 2], xa[..., D // 2 :]
    out_a = a * cos - b * sin
    out_b = a * sin + b * cos
    if interleaved:
        out = torch.stack((out_a, out_b), dim=-1).flatten(-2)
    else:
        out = torch.cat((out_a, out_b), dim=-1)
    return out.to(x.dtype)


def _rope2d_indexed_ref(x: Tensor, coords: Tensor, freqs: Tensor, freqs_index: Tensor, interleaved: bool) -> Tensor:
    """rope2d_ref with per-token frequencies ``freqs[freqs_index]`` (SPEC §10)."""
    H, N, D = x.shape[-3:]
    if freqs_index.dtype != torch.int64 or freqs_index.shape != (N,):
        raise ValueError(
            f"rope2d: freqs_index must be int64 [N] = [{N}], got {freqs_index.dtype} {tuple(freqs_index.shape)}"
        )
    if freqs.dim() not in (3, 4) or freqs.shape[-2:] != (2, D // 2) or (freqs.dim() == 4 and freqs.shape[1] != H):
        raise ValueError(f"rope2d: freqs must be [F, 2, {D // 2}] or [F, {H}, 2, {D // 2}], got {tuple(freqs.shape)}")
    acc = _compute_dtype(x)
    c = coords.to(acc)
    f = freqs.to(acc)[freqs_index]  # [N, (H,) 2, D/2]
    f = (f.unsqueeze(1) if f.dim() == 3 else f).transpose(0, 1)  # [1 or H, N, 2, D/2]
    # phi[h, n, m] = y_n * f[h, n, 0, m] + x_n * f[h, n, 1, m]
    phi = c[None, :, 0, None] * f[:, :, 0, :] + c[None, :, 1, None] * f[:, :, 1, :]
    cos, sin = phi.cos(), phi.sin()
    xa = x.to(acc)
    if interleaved:
        a, b = xa[..., 0::2], xa[..., 1::2]
    else:
        a, b = xa[..., : D // 2], xa[..., D // 2 :]
    out_a = a * cos - b * sin
    out_b = a * sin + b * cos
    if interleaved:
        out = torch.stack((out_a, out_b), dim=-1).flatten(-2)
    else:
        out = torch.cat((out_a, out_b), dim=-1)
    return out.to(x.dtype)


def pos2d_add_ref(
    x: Tensor,
    pos_h: Tensor,
    pos_w: Tensor,
    grid: Sequence[int],
    *,
    token_offset: int = 0,
    row_offset: int = 0,
    col_offset: int = 0,
) -> Tensor:
    """Factorized 2D position add on ``x: [B, N, D]``.

    Token ``t = token_offset + i * gw + j`` gets ``pos_h[row_offset + i] + pos_w[col_offset + j]``;
    every other token is copied unchanged.
    """
    gh, gw = (int(g) for g in grid)
    if x.dim() != 3:
        raise ValueError(f"pos2d_add: x must be [B, N, D], got shape {tuple(x.shape)}")
    B, N, D = x.shape
    for name, table, off, n in (("pos_h", pos_h, row_offset, gh), ("pos_w", pos_w, col_offset, gw)):
        if table.dim() != 2 or table.shape[1] != D:
            raise ValueError(f"pos2d_add: {name} must be [max, D={D}], got {tuple(table.shape)}")
        if off < 0 or n < 0 or off + n > table.shape[0]:
            raise ValueError(f"pos2d_add: grid needs {name} rows [{off}, {off + n}) but {name} has {table.shape[0]}")
    t0, t1 = token_offset, token_offset + gh * gw
    if t0 < 0 or t1 > N:
        raise ValueError(f"pos2d_add: tokens [{t0}, {t1}) of the grid do not fit in N={N}")
    acc = _compute_dtype(x)
    table = pos_h[row_offset : row_offset + gh, None, :].to(acc) + pos_w[None, col_offset : col_offset + gw, :].to(acc)
    seg = (x[:, t0:t1].to(acc) + table.reshape(gh * gw, D)).to(x.dtype)
    return torch.cat((x[:, :t0], seg, x[:, t1:]), dim=1)


def qk_norm_rope_ref(
    qk: Tensor,
    weight: Tensor,
    coords: Optional[Tensor] = None,
    freqs: Optional[Tensor] = None,
    *,
    eps: float = 1e-6,
    interleaved: bool = True,
    freqs_index: Optional[Tensor] = None,
) -> Tensor:
    """The published JiT order on ``qk: [2, B, H, N, D]``: the RMSNorm module of q and of k (float32
    statistics, float64 for float64; ``weight: [2, D]``), then :func:`rope2d_ref` (with
    ``freqs_index`` when given). Returns a contiguous ``[2, B, H, N, D]`` tensor."""
    if qk.dim() != 5 or qk.shape[0] != 2:
        raise ValueError(f"qk_norm_rope: qk must be [2, B, H, N, D], got shape {tuple(qk.shape)}")
    D = qk.shape[-1]
    if weight.shape != (2, D):
        raise ValueError(f"qk_norm_rope: weight must be [2, D] = [2, {D}], got {tuple(weight.shape)}")
    if (coords is None) != (freqs is None):
        raise ValueError("qk_norm_rope: coords and freqs must be given together or both be None")
    acc = _compute_dtype(qk)
    x = qk.to(acc)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = (y * weight.to(acc)[:, None, None, None, :]).to(qk.dtype)
    if coords is not None:
        y = rope2d_ref(y, coords, freqs, interleaved=interleaved, freqs_index=freqs_index)
    elif freqs_index is not None:
        raise ValueError("qk_norm_rope: freqs_index needs coords and freqs")
    return y.contiguous()
