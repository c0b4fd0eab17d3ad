"""Frequencies and token coordinates for 2D RoPE (SPEC.md §2).

Coordinates are ``[N, 2]`` float tensors of (row y, column x), in the units of the image grid.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["axial_freqs", "grid_coords", "prefix_coords", "sequence_coords"]


def axial_freqs(head_dim: int, theta: float = 10000.0, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """JiT / EVA-02 axial 2D RoPE frequencies, ``[2, head_dim / 2]``.

    ``f_k = theta ** (-k / (head_dim / 4))`` for ``k < head_dim / 4``; pairs ``m < head_dim / 4`` turn
    with the row (``freqs[0] = [f, 0]``) and the rest with the column (``freqs[1] = [0, f]``).
    """
    if head_dim <= 0 or head_dim % 4:
        raise ValueError(f"axial_freqs: head_dim must be a positive multiple of 4, got {head_dim}")
    if not (theta > 0 and math.isfinite(theta)):
        raise ValueError(f"axial_freqs: theta must be positive and finite, got {theta}")
    q = head_dim // 4
    f = theta ** (-torch.arange(q, dtype=torch.float64) / q)
    zeros = torch.zeros(q, dtype=torch.float64)
    freqs = torch.stack((torch.cat((f, zeros)), torch.cat((zeros, f))))
    return freqs.to(dtype=dtype, device=device)


def grid_coords(
    gh: int,
    gw: int,
    *,
    ref_grid: Optional[Sequence[int]] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """Coordinates of a row-major ``gh x gw`` grid of tokens, ``[gh * gw, 2]``.

    Without ``ref_grid`` they are the integer (row, column) indices. With ``ref_grid = (rh, rw)`` the
    grid is laid over a ``rh x rw`` grid covering the same image, each token at the centre of the
    area it covers: ``y = (i + 0.5) * rh / gh - 0.5`` (same for x). This places a coarser condition
    grid on the image grid and scales a larger sampling grid back into the training range.
    """
    if gh <= 0 or gw <= 0:
        raise ValueError(f"grid_coords: grid must be positive, got ({gh}, {gw})")
    i = torch.arange(gh, dtype=torch.float64, device=device)
    j = torch.arange(gw, dtype=torch.float64, device=device)
    if ref_grid is not None:
        rh, rw = ref_grid
        i = (i + 0.5) * (rh / gh) - 0.5
        j = (j + 0.5) * (rw / gw) - 0.5
    yy, xx = torch.meshgrid(i, j, indexing="ij")
    return torch.stack((yy.reshape(-1), xx.reshape(-1)), dim=1).to(dtype)


def prefix_coords(n: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Coordinates of ``n`` special (class / register) tokens: (0, 0), so RoPE leaves them unrotated."""
    return torch.zeros(n, 2, dtype=dtype, device=device)


def sequence_coords(
    grid: Tuple[int, int],
    *,
    prefix: int = 0,
    cond_grid: Optional[Tuple[int, int]] = None,
    ref_grid: Optional[Tuple[int, int]] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """Coordinates of the model sequence ``[prefix tokens | image grid | condition grid]``.

    ``ref_grid`` (interpolation) lays the image grid over the training grid; condition tokens sit at
    the centres they cover on the (possibly rescaled) image grid.
    """
    gh, gw = grid
    parts = [prefix_coords(prefix, dtype=dtype, device=device)]
    parts.append(grid_coords(gh, gw, ref_grid=ref_grid, dtype=dtype, device=device))
    if cond_grid is not None:
        ch, cw = cond_grid
        parts.append(grid_coords(ch, cw, ref_grid=ref_grid or (gh, gw), dtype=dtype, device=device))
    return torch.cat(parts, dim=0)
