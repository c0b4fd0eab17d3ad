"""Pure-PyTorch references of jitrope's ops, written to mirror docs/ops.md line by line.

They are what the fused kernels are tested against, what the benchmarks call "eager", and what
``pos_impl="torch"`` runs. Both differentiate through plain autograd.

Each formula is written once, here: :func:`rope_angles` (the angle of docs/ops.md, with per-token tables),
:func:`rotate_pairs` (the rotation of a channel pair), :func:`rms_norm` (JiT's RMSNorm), :func:`pos2d_table`
(docs/ops.md's summed row + column table) and :func:`compute_dtype` (the dtype all of them compute in). The op
references, the ``pos_impl="torch"`` path of :mod:`jitrope.posenc` and the model's RMSNorm modules
all call them, so they agree bit for bit by construction (as gsplat's ``_torch_impl.py`` serves its
reference, fallback and tests).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "rope_angles",
    "rotate_pairs",
    "rms_norm",
    "pos2d_table",
    "rope2d_ref",
    "pos2d_add_ref",
    "qk_norm_rope_ref",
    "pos2d_add_indexed_ref",
]


def compute_dtype(x: Tensor) -> torch.dtype:
    """Statistics, angles and sums are computed in float32, in float64 for float64 ``x``."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rope_angles(coords: Tensor, freqs: Tensor, dtype: torch.dtype, *, freqs_index: Optional[Tensor] = None) -> Tensor:
    """The angles of docs/ops.md, ``phi[h, n, m] = coords[n, 0] * freqs[h, 0, m] + coords[n, 1] * freqs[h, 1, m]``,
    computed in ``dtype``; returns ``[1 or H, N, D/2]`` (1 for shared frequencies ``[2, D/2]``, H for
    per-head ``[H, 2, D/2]``).

    With ``freqs_index`` (int64 ``[N]``, docs/ops.md) ``freqs`` has a leading table dim, ``[F, 2, D/2]`` or
    ``[F, H, 2, D/2]``, and token n uses table ``freqs_index[n]``. Each angle is the same two products
    and one sum either way, so one table indexed by zeros gives the plain call's bits.
    """
    if freqs_index is not None:
        _check_indexed_freqs(freqs, freqs_index, coords.shape[0], "rope_angles")
    return _rope_angles(coords, freqs, dtype, freqs_index)


def _check_indexed_freqs(freqs: Tensor, freqs_index: Tensor, n_tokens: int, what: str) -> None:
    if freqs.dim() not in (3, 4) or freqs.shape[0] == 0:
        raise ValueError(
            f"{what}: with freqs_index, freqs must be [F, 2, D/2] or [F, H, 2, D/2] with F >= 1, "
            f"got {tuple(freqs.shape)}"
        )
    if freqs_index.dtype != torch.int64 or freqs_index.shape != (n_tokens,):
        raise ValueError(
            f"{what}: freqs_index must be an int64 tensor [N] = [{n_tokens}], got {freqs_index.dtype} "
            f"of shape {tuple(freqs_index.shape)}"
        )
    # Data-dependent, so eager only: a traced graph cannot branch on values (indexing still bounds-checks).
    if n_tokens and not torch.compiler.is_compiling():
        lo, hi = int(freqs_index.min()), int(freqs_index.max())
        if lo < 0 or hi >= freqs.shape[0]:
            raise ValueError(
                f"{what}: freqs_index must be in [0, F) = [0, {freqs.shape[0]}) "
                f"(F = freqs.shape[0]), got values in [{lo}, {hi}]"
            )


def _rope_angles(coords: Tensor, freqs: Tensor, dtype: torch.dtype, freqs_index: Optional[Tensor]) -> Tensor:
    c = coords.to(dtype)
    f = freqs.to(dtype)
    if freqs_index is None:
        if f.dim() == 2:
            f = f.unsqueeze(0)  # [1, 2, D/2]
        return c[None, :, 0, None] * f[:, None, 0, :] + c[None, :, 1, None] * f[:, None, 1, :]
    if f.dim() == 3:
        f = f.unsqueeze(1)  # [F, 1, 2, D/2]
    g = f[freqs_index].transpose(0, 1)  # [1 or H, N, 2, D/2]: each token's own table
    return c[None, :, 0, None] * g[:, :, 0, :] + c[None, :, 1, None] * g[:, :, 1, :]


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool) -> Tensor:
    """Turn each channel pair (a, b) of ``x: [..., D]`` by the angle whose ``cos``/``sin`` broadcast to
    ``[..., D/2]``: ``(a cos - b sin, a sin + b cos)``. Pair m is channels (2m, 2m+1) when
    ``interleaved``, else (m, m + D/2). Computed in the promoted dtype of the inputs; the caller rounds."""
    D = x.shape[-1]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : D // 2], x[..., D // 2 :]
    out_a = a * cos - b * sin
    out_b = a * sin + b * cos
    if interleaved:
        return torch.stack((out_a, out_b), dim=-1).flatten(-2)
    return torch.cat((out_a, out_b), dim=-1)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """JiT's (LLaMA's) RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``, statistics and
    result in float32 (float64 for float64 ``x``); ``weight`` broadcasts against ``x`` (``[D]``, or
    ``[2, 1, 1, 1, D]`` for a q/k stack). The caller rounds to the dtype it wants."""
    acc = compute_dtype(x)
    h = x.to(acc)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(acc) * h


def pos2d_table(
    pos_h: Tensor, pos_w: Tensor, grid: Sequence[int], dtype: torch.dtype, *, row_offset: int = 0, col_offset: int = 0
) -> Tensor:
    """docs/ops.md's position table of a ``grid = (gh, gw)``, ``[gh * gw, D]`` in ``dtype``: row ``i * gw + j`` is
    ``pos_h[row_offset + i] + pos_w[col_offset + j]`` (row-major tokens)."""
    gh, gw = (int(g) for g in grid)
    h = pos_h[row_offset : row_offset + gh].to(dtype)
    w = pos_w[col_offset : col_offset + gw].to(dtype)
    return (h[:, None, :] + w[None, :, :]).reshape(gh * gw, pos_h.shape[-1])


def rope2d_ref(
    x: Tensor,
    coords: Tensor,
    freqs: Tensor,
    *,
    interleaved: bool = True,
    freqs_index: Optional[Tensor] = None,
) -> Tensor:
    """2D rotary embedding of ``x: [..., H, N, D]``.

    ``coords: [N, 2]`` holds (row y, column x) of each token, ``freqs: [2, D/2]`` (shared) or
    ``[H, 2, D/2]`` (per head). Pair m of token n in head h turns by
    ``phi = coords[n, 0] * freqs[h, 0, m] + coords[n, 1] * freqs[h, 1, m]``.
    Pairs are channels (2m, 2m+1) when ``interleaved``, else (m, m + D/2).
    With ``freqs_index: [N]`` (int64, docs/ops.md) ``freqs`` is ``[F, 2, D/2]`` or ``[F, H, 2, D/2]`` and
    token n uses table ``freqs_index[n]``.
    """
    if x.dim() < 3:
        raise ValueError(f"rope2d: x must be [..., H, N, D], got shape {tuple(x.shape)}")
    H, N, D = x.shape[-3:]
    if D % 2:
        raise ValueError(f"rope2d: x's last dim D must be even, got D={D}")
    if coords.shape != (N, 2):
        raise ValueError(f"rope2d: coords must be [N, 2] = [{N}, 2], got {tuple(coords.shape)}")
    if freqs_index is not None:
        _check_indexed_freqs(freqs, freqs_index, N, "rope2d")
    one = freqs if freqs_index is None else freqs[0]  # one table: [2, D/2] or [H, 2, D/2]
    if one.dim() == 2:
        one = one.unsqueeze(0)
    if one.dim() != 3 or one.shape[-2:] != (2, D // 2) or one.shape[0] not in (1, H):
        lead = "" if freqs_index is None else "F, "
        raise ValueError(
            f"rope2d: freqs must be [{lead}2, {D // 2}] or [{lead}{H}, 2, {D // 2}], got {tuple(freqs.shape)}"
        )
    acc = compute_dtype(x)
    phi = _rope_angles(coords, freqs, acc, freqs_index)  # [1 or H, N, D/2]
    return rotate_pairs(x.to(acc), phi.cos(), phi.sin(), interleaved=interleaved).to(x.dtype)


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
    acc = compute_dtype(x)
    table = pos2d_table(pos_h, pos_w, (gh, gw), acc, row_offset=row_offset, col_offset=col_offset)
    seg = (x[:, t0:t1].to(acc) + table).to(x.dtype)
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
    statistics, float64 for float64; ``weight: [2, D]``), rounded to ``qk``'s dtype, then
    :func:`rope2d_ref` (``freqs_index`` as there). Returns a contiguous ``[2, B, H, N, D]`` tensor."""
    if qk.dim() != 5 or qk.shape[0] != 2:
        raise ValueError(f"qk_norm_rope: qk must be [2, B, H, N, D], got shape {tuple(qk.shape)}")
    D = qk.shape[-1]
    if weight.shape != (2, D):
        raise ValueError(f"qk_norm_rope: weight must be [2, D] = [2, {D}], got {tuple(weight.shape)}")
    if (coords is None) != (freqs is None):
        raise ValueError("qk_norm_rope: coords and freqs must be given together or both be None")
    if freqs_index is not None and freqs is None:
        raise ValueError("qk_norm_rope: freqs_index needs coords and freqs")
    y = rms_norm(qk, weight[:, None, None, None, :], eps).to(qk.dtype)
    if coords is not None:
        y = rope2d_ref(y, coords, freqs, interleaved=interleaved, freqs_index=freqs_index)
    return y.contiguous()


def pos2d_add_indexed_ref(x: Tensor, pos_h: Tensor, pos_w: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Factorized 2D position table on packed tokens (docs/ops.md), ``x: [..., N, D]``.

    ``out[..., n, :] = x[..., n, :] + pos_h[rows[n]] + pos_w[cols[n]]``; rows[n] = -1 (cols[n] = -1)
    leaves pos_h (pos_w) out, and a token with both -1 is copied unchanged.
    """
    if x.dim() < 2:
        raise ValueError(f"pos2d_add_indexed: x must be [..., N, D], got shape {tuple(x.shape)}")
    N, D = x.shape[-2:]
    for name, table in (("pos_h", pos_h), ("pos_w", pos_w)):
        if table.dim() != 2 or table.shape[1] != D:
            raise ValueError(f"pos2d_add_indexed: {name} must be [max, D={D}], got {tuple(table.shape)}")
    for name, idx, table in (("rows", rows, pos_h), ("cols", cols, pos_w)):
        if idx.dtype != torch.int64 or idx.shape != (N,):
            raise ValueError(f"pos2d_add_indexed: {name} must be int64 [N={N}], got {idx.dtype} {tuple(idx.shape)}")
        # Data-dependent, so eager only (as in rope_angles): a traced graph cannot branch on values.
        if (
            idx.numel()
            and not torch.compiler.is_compiling()
            and not (-1 <= int(idx.min()) and int(idx.max()) < table.shape[0])
        ):
            raise ValueError(f"pos2d_add_indexed: {name} must hold values in [-1, {table.shape[0]})")
    acc = compute_dtype(x)
    # A zero row appended to each table: index -1 picks it, so no index is out of range.
    h = torch.cat((pos_h.to(acc), pos_h.new_zeros(1, D, dtype=acc)))[rows]
    w = torch.cat((pos_w.to(acc), pos_w.new_zeros(1, D, dtype=acc)))[cols]
    has_h, has_w = (rows >= 0)[:, None], (cols >= 0)[:, None]
    # The table sum first, as pos2d_add_ref; one table alone is added as it is.
    table = torch.where(has_h & has_w, h + w, torch.where(has_h, h, w))
    return torch.where(has_h | has_w, (x.to(acc) + table).to(x.dtype), x)
