"""Python entry points of jitrope's fused operators (SPEC.md §2, §3).

Thin wrappers over ``torch.ops.jitrope.*``. The kernels (CPU, CUDA) and the autograd formulas
are C++ (csrc/), so the ops train the same way from LibTorch; this module adds the fake
(meta) kernels that let ``torch.compile`` trace them, and documents the API.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import HAS_EXTENSION, EXTENSION_ERROR

__all__ = ["rope2d", "rope2d_", "pos2d_add", "pos2d_add_"]


def _require_extension(name: str) -> None:
    if not HAS_EXTENSION:
        raise RuntimeError(
            f"jitrope.ops.{name}: the C++ extension jitrope._C is not loaded ({EXTENSION_ERROR}); "
            "build it with `pip install --no-build-isolation -e .` or use the reference in "
            "jitrope.reference (pos_impl='torch')."
        )


def _check_inplace(name: str, x: Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            f"jitrope.ops.{name}: the in-place op is for inference; x requires grad, so call the "
            f"out-of-place {name[:-1]} (or run under torch.no_grad())."
        )


def rope2d(x: Tensor, coords: Tensor, freqs: Tensor, *, interleaved: bool = True) -> Tensor:
    """Rotate channel pairs of ``x: [..., H, N, D]`` by 2D angles (fused 2D RoPE).

    Args:
        x: float16/bfloat16/float32/float64 ``[..., H, N, D]``, D even, any strides (a q/k view of
            a fused qkv projection, e.g. ``[2, B, H, N, D]``, is read in place without a copy).
        coords: float ``[N, 2]`` per-token (row y, column x); fractional values are fine and
            (0, 0) leaves a token unrotated (class / register tokens).
        freqs: float ``[2, D/2]`` shared by all heads or ``[H, 2, D/2]`` per head; differentiable
            (learned "mixed" frequencies).
        interleaved: pairs are channels (2m, 2m+1) (EVA-02 / JiT) if True, else (m, m + D/2).

    Pair m of token n in head h turns by ``coords[n,0]*freqs[h,0,m] + coords[n,1]*freqs[h,1,m]``,
    computed in float32 (float64 for float64 x). Returns a new tensor shaped like ``x``.
    """
    _require_extension("rope2d")
    return torch.ops.jitrope.rope2d.default(x, coords, freqs, interleaved)


def rope2d_(x: Tensor, coords: Tensor, freqs: Tensor, *, interleaved: bool = True) -> Tensor:
    """In-place :func:`rope2d` for inference; returns ``x``."""
    _require_extension("rope2d_")
    _check_inplace("rope2d_", x)
    torch.ops.jitrope.rope2d_.default(x, coords, freqs, interleaved)
    return x


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_rope2d_fake(op: str, x_name: str, x: Tensor, coords: Tensor, freqs: Tensor) -> None:
    # Mirrors check_rope2d_args (csrc/ops/rope2d.cpp) for tracing; the kernels check again.
    torch._check(x.dtype in _FLOAT_DTYPES, lambda: f"{op}: {x_name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    torch._check(x.dim() >= 3, lambda: f"{op}: {x_name} must have shape [..., H, N, D] (at least 3 dims), got {tuple(x.shape)}")
    H, N, D = x.shape[-3:]
    torch._check(D % 2 == 0, lambda: f"{op}: {x_name} must have an even last dim D (channel pairs), got D = {D}")
    torch._check(coords.dtype.is_floating_point, lambda: f"{op}: coords must be a floating tensor [N, 2], got dtype {coords.dtype}")
    torch._check(coords.dim() == 2, lambda: f"{op}: coords must have shape [N, 2] = [{N}, 2], got {tuple(coords.shape)}")
    torch._check(coords.shape[0] == N, lambda: f"{op}: coords must have shape [N, 2] = [{N}, 2], got {tuple(coords.shape)}")
    torch._check(coords.shape[1] == 2, lambda: f"{op}: coords must have shape [N, 2] = [{N}, 2], got {tuple(coords.shape)}")
    torch._check(freqs.dtype.is_floating_point, lambda: f"{op}: freqs must be a floating tensor, got dtype {freqs.dtype}")
    torch._check(
        freqs.dim() in (2, 3),
        lambda: f"{op}: freqs must have shape [2, D/2] or [H, 2, D/2] = [{H}, 2, {D // 2}], got {tuple(freqs.shape)}",
    )
    if freqs.dim() == 3:
        torch._check(freqs.shape[0] == H, lambda: f"{op}: freqs must have shape [H, 2, D/2] = [{H}, 2, {D // 2}], got {tuple(freqs.shape)}")
    torch._check(freqs.shape[-2] == 2, lambda: f"{op}: freqs must have shape [..., 2, D/2] = [..., 2, {D // 2}], got {tuple(freqs.shape)}")
    torch._check(freqs.shape[-1] == D // 2, lambda: f"{op}: freqs must have shape [..., 2, D/2] = [..., 2, {D // 2}], got {tuple(freqs.shape)}")
    torch._check(coords.device == x.device, lambda: f"{op}: coords must be on {x_name}'s device {x.device}, got {coords.device}")
    torch._check(freqs.device == x.device, lambda: f"{op}: freqs must be on {x_name}'s device {x.device}, got {freqs.device}")


if HAS_EXTENSION:

    @torch.library.register_fake("jitrope::rope2d")
    def _rope2d_fake(x: Tensor, coords: Tensor, freqs: Tensor, interleaved: bool = True) -> Tensor:
        _check_rope2d_fake("rope2d", "x", x, coords, freqs)
        return torch.empty_like(x)

    @torch.library.register_fake("jitrope::rope2d_")
    def _rope2d__fake(x: Tensor, coords: Tensor, freqs: Tensor, interleaved: bool = True) -> Tensor:
        _check_rope2d_fake("rope2d_", "x", x, coords, freqs)
        return x

    @torch.library.register_fake("jitrope::rope2d_backward")
    def _rope2d_backward_fake(
        grad_out: Tensor, coords: Tensor, freqs: Tensor, x: Optional[Tensor], interleaved: bool = True
    ) -> Tuple[Tensor, Tensor]:
        _check_rope2d_fake("rope2d_backward", "grad_out", grad_out, coords, freqs)
        if x is None:
            return torch.empty_like(grad_out), freqs.new_empty(0)
        torch._check(x.shape == grad_out.shape, lambda: f"rope2d_backward: x (the forward input) must have grad_out's shape {tuple(grad_out.shape)}, got {tuple(x.shape)}")
        torch._check(x.dtype == grad_out.dtype, lambda: f"rope2d_backward: x (the forward input) must have grad_out's dtype {grad_out.dtype}, got {x.dtype}")
        return torch.empty_like(grad_out), freqs.new_empty(freqs.shape)


def pos2d_add(
    x: Tensor,
    pos_h: Tensor,
    pos_w: Tensor,
    grid: Sequence[int],
    *,
    token_offset: int = 0,
    row_offset: int = 0,
    col_offset: int = 0,
) -> Tensor:
    """Add a factorized 2D position embedding to a grid of tokens of ``x: [B, N, D]``.

    Token ``t = token_offset + i * gw + j`` (row i, column j of ``grid = (gh, gw)``) gets
    ``pos_h[row_offset + i] + pos_w[col_offset + j]``; all other tokens (prefix tokens, other
    segments) are copied unchanged. ``pos_h: [max_h, D]`` and ``pos_w: [max_w, D]`` have x's dtype
    and device. Gradients reach x, pos_h and pos_w (reduced in float32, deterministically).
    """
    _require_extension("pos2d_add")
    return torch.ops.jitrope.pos2d_add.default(x, pos_h, pos_w, list(grid), token_offset, row_offset, col_offset)


def pos2d_add_(
    x: Tensor,
    pos_h: Tensor,
    pos_w: Tensor,
    grid: Sequence[int],
    *,
    token_offset: int = 0,
    row_offset: int = 0,
    col_offset: int = 0,
) -> Tensor:
    """In-place :func:`pos2d_add` for inference; returns ``x``."""
    _require_extension("pos2d_add_")
    _check_inplace("pos2d_add_", x)
    torch.ops.jitrope.pos2d_add_.default(x, pos_h, pos_w, list(grid), token_offset, row_offset, col_offset)
    return x


# Fake (meta) kernels: shapes, dtypes and strides of what the C++ kernels return, with the same
# argument checks, so that torch.compile and FakeTensor trace the ops.
def _check_pos2d_geometry(op: str, x_name: str, x: Tensor, grid, max_h, max_w, token_offset, row_offset, col_offset):
    torch._check(len(grid) == 2, lambda: f"{op}: grid must be (gh, gw), got {len(grid)} values {list(grid)}")
    gh, gw = grid
    N = x.shape[1]
    torch._check(gh >= 0 and gw >= 0, lambda: f"{op}: grid (gh, gw) must be non-negative, got {list(grid)}")
    for name, value in (("token_offset", token_offset), ("row_offset", row_offset), ("col_offset", col_offset)):
        torch._check(value >= 0, lambda: f"{op}: {name} must be >= 0, got {value}")
    torch._check(
        row_offset + gh <= max_h,
        lambda: f"{op}: grid rows need pos_h[{row_offset} : {row_offset} + gh] with gh = {gh}, but pos_h has "
        f"max_h = {max_h} rows (wanted max_h >= row_offset + gh)",
    )
    torch._check(
        col_offset + gw <= max_w,
        lambda: f"{op}: grid columns need pos_w[{col_offset} : {col_offset} + gw] with gw = {gw}, but pos_w has "
        f"max_w = {max_w} rows (wanted max_w >= col_offset + gw)",
    )
    torch._check(
        token_offset + gh * gw <= N,
        lambda: f"{op}: grid {list(grid)} has gh*gw tokens starting at token_offset = {token_offset}, more than "
        f"{x_name} holds: wanted N >= token_offset + gh*gw, got N = {N} ({x_name} of shape {list(x.shape)})",
    )


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_pos2d_activation(op: str, name: str, t: Tensor):
    torch._check(t.dim() == 3, lambda: f"{op}: {name} must be a 3-D tensor [B, N, D], got shape {list(t.shape)}")
    torch._check(
        t.dtype in _FLOAT_DTYPES, lambda: f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}"
    )


def _check_pos2d_add_fake(op, x, pos_h, pos_w, grid, token_offset, row_offset, col_offset):
    _check_pos2d_activation(op, "x", x)
    D = x.shape[2]
    for name, rows, table in (("pos_h", "max_h", pos_h), ("pos_w", "max_w", pos_w)):
        torch._check(
            table.dim() == 2 and table.shape[1] == D,
            lambda: f"{op}: {name} must be [{rows}, D] with x's D = {D}, got shape {list(table.shape)}",
        )
        torch._check(table.dtype == x.dtype, lambda: f"{op}: {name} must have x's dtype {x.dtype}, got {table.dtype}")
        torch._check(
            table.device == x.device, lambda: f"{op}: {name} must be on x's device {x.device}, got {table.device}"
        )
    _check_pos2d_geometry(
        op, "x", x, grid, pos_h.shape[0], pos_w.shape[0], token_offset, row_offset, col_offset
    )


if HAS_EXTENSION:

    @torch.library.register_fake("jitrope::pos2d_add")
    def _pos2d_add_fake(x, pos_h, pos_w, grid, token_offset=0, row_offset=0, col_offset=0):
        _check_pos2d_add_fake("pos2d_add", x, pos_h, pos_w, grid, token_offset, row_offset, col_offset)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("jitrope::pos2d_add_")
    def _pos2d_add__fake(x, pos_h, pos_w, grid, token_offset=0, row_offset=0, col_offset=0):
        _check_pos2d_add_fake("pos2d_add_", x, pos_h, pos_w, grid, token_offset, row_offset, col_offset)
        return x

    @torch.library.register_fake("jitrope::pos2d_add_backward")
    def _pos2d_add_backward_fake(grad_out, grid, max_h, max_w, token_offset, row_offset, col_offset):
        op = "pos2d_add_backward"
        _check_pos2d_activation(op, "grad_out", grad_out)
        torch._check(max_h >= 0 and max_w >= 0, lambda: f"{op}: max_h and max_w must be >= 0, got {max_h} and {max_w}")
        _check_pos2d_geometry(
            op, "grad_out", grad_out, grid, max_h, max_w, token_offset, row_offset, col_offset
        )
        D = grad_out.shape[2]
        return grad_out.new_empty((max_h, D)), grad_out.new_empty((max_w, D))
