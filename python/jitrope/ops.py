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
