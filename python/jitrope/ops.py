"""Python entry points of jitrope's fused operators; docs/ops.md says what each computes.

Thin wrappers over ``torch.ops.jitrope.*``. The kernels (CPU, CUDA) and the autograd formulas
are C++ (csrc/), so the ops train the same way from LibTorch; this module adds the fake
(meta) kernels that let ``torch.compile`` trace them, and documents the API.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import EXTENSION_ERROR, HAS_EXTENSION

__all__ = ["rope2d", "rope2d_", "pos2d_add", "pos2d_add_", "qk_norm_rope", "pos2d_add_indexed"]


def _require_extension(name: str) -> None:
    if not HAS_EXTENSION:
        raise RuntimeError(
            f"jitrope.ops.{name}: the C++ extension jitrope._C is not loaded ({EXTENSION_ERROR}); "
            "build it with `pip install --no-build-isolation -e .` or use the reference in "
            "jitrope.reference (pos_impl='torch')."
        )


def rope2d(
    x: Tensor, coords: Tensor, freqs: Tensor, *, interleaved: bool = True, freqs_index: Optional[Tensor] = None
) -> Tensor:
    """Rotate channel pairs of ``x: [..., H, N, D]`` by 2D angles (fused 2D RoPE).

    Args:
        x: float16/bfloat16/float32/float64 ``[..., H, N, D]``, D even, any strides (a q/k view of
            a fused qkv projection, e.g. ``[2, B, H, N, D]``, is read in place without a copy).
        coords: float ``[N, 2]`` per-token (row y, column x); fractional values are fine and
            (0, 0) leaves a token unrotated (class / register tokens).
        freqs: float ``[2, D/2]`` shared by all heads or ``[H, 2, D/2]`` per head; differentiable
            (learned "mixed" frequencies).
        interleaved: pairs are channels (2m, 2m+1) (EVA-02 / JiT) if True, else (m, m + D/2).
        freqs_index: optional int64 ``[N]`` (per-sequence frequencies of a packed batch):
            ``freqs`` then has a leading table dim, ``[F, 2, D/2]`` or ``[F, H, 2, D/2]``, and token n
            turns by table ``freqs_index[n]``; its gradient is per table, deterministic. Its values
            are checked, which on CUDA waits for the device.

    Pair m of token n in head h turns by ``coords[n,0]*freqs[h,0,m] + coords[n,1]*freqs[h,1,m]``,
    computed in float32 (float64 for float64 x). Returns a new tensor shaped like ``x``.
    """
    _require_extension("rope2d")
    return torch.ops.jitrope.rope2d.default(x, coords, freqs, interleaved, freqs_index)


def rope2d_(
    x: Tensor, coords: Tensor, freqs: Tensor, *, interleaved: bool = True, freqs_index: Optional[Tensor] = None
) -> Tensor:
    """In-place :func:`rope2d` for inference; returns ``x``."""
    _require_extension("rope2d_")
    torch.ops.jitrope.rope2d_.default(x, coords, freqs, interleaved, freqs_index)
    return x


# Fake (meta) kernels, as pytorch/extension-cpp writes them: only what decides the outputs' shapes,
# dtypes and strides, so that torch.compile and FakeTensor trace the ops. The argument checks and
# their messages are C++'s (csrc/ops/<op>.cpp); the real kernels run them on every call.
if HAS_EXTENSION:

    @torch.library.register_fake("jitrope::rope2d")
    def _rope2d_fake(x: Tensor, coords: Tensor, freqs: Tensor, interleaved: bool = True, freqs_index=None) -> Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("jitrope::rope2d_")
    def _rope2d__fake(x: Tensor, coords: Tensor, freqs: Tensor, interleaved: bool = True, freqs_index=None) -> Tensor:
        return x

    @torch.library.register_fake("jitrope::rope2d_backward")
    def _rope2d_backward_fake(
        grad_out: Tensor,
        coords: Tensor,
        freqs: Tensor,
        x: Optional[Tensor],
        interleaved: bool = True,
        freqs_index: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        if x is None:
            return torch.empty_like(grad_out), freqs.new_empty(0)
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
    torch.ops.jitrope.pos2d_add_.default(x, pos_h, pos_w, list(grid), token_offset, row_offset, col_offset)
    return x


if HAS_EXTENSION:

    @torch.library.register_fake("jitrope::pos2d_add")
    def _pos2d_add_fake(x, pos_h, pos_w, grid, token_offset=0, row_offset=0, col_offset=0):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("jitrope::pos2d_add_")
    def _pos2d_add__fake(x, pos_h, pos_w, grid, token_offset=0, row_offset=0, col_offset=0):
        return x

    @torch.library.register_fake("jitrope::pos2d_add_backward")
    def _pos2d_add_backward_fake(grad_out, grid, max_h, max_w, token_offset, row_offset, col_offset):
        D = grad_out.shape[-1]
        return grad_out.new_empty((max_h, D)), grad_out.new_empty((max_w, D))


def qk_norm_rope(
    qk: Tensor,
    weight: Tensor,
    coords: Optional[Tensor] = None,
    freqs: Optional[Tensor] = None,
    *,
    eps: float = 1e-6,
    interleaved: bool = True,
    freqs_index: Optional[Tensor] = None,
) -> Tensor:
    """RMSNorm of q and k over head_dim, then the 2D rotation of :func:`rope2d`, in one pass.

    Args:
        qk: float16/bfloat16/float32/float64 ``[2, B, H, N, D]`` (q = qk[0], k = qk[1]), D even, any
            strides: ``qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]`` is read in place.
        weight: float ``[2, D]``, the q-norm (row 0) and k-norm (row 1) weights.
        coords, freqs: as in :func:`rope2d`, or both None to normalize without rotating.
        eps: added to the mean square, as in JiT's RMSNorm.
        interleaved: the channel pairing of :func:`rope2d`.
        freqs_index: per-token frequency tables, as in :func:`rope2d` (needs coords and freqs).

    Per row ``y = x / sqrt(mean(x^2) + eps) * weight[s]`` with float32 statistics (float64 for
    float64), rotated before rounding. Returns a new contiguous ``[2, B, H, N, D]`` tensor, the
    layout ``F.scaled_dot_product_attention`` reads. Gradients reach qk, weight and freqs (the
    weight and freqs gradients are reduced in float32, deterministically).
    """
    _require_extension("qk_norm_rope")
    return torch.ops.jitrope.qk_norm_rope.default(qk, weight, coords, freqs, eps, interleaved, freqs_index)


if HAS_EXTENSION:

    @torch.library.register_fake("jitrope::qk_norm_rope")
    def _qk_norm_rope_fake(qk, weight, coords=None, freqs=None, eps=1e-6, interleaved=True, freqs_index=None):
        return qk.new_empty(qk.shape)

    @torch.library.register_fake("jitrope::qk_norm_rope_backward")
    def _qk_norm_rope_backward_fake(
        grad_out, qk, weight, coords, freqs, eps, interleaved, freqs_grad, freqs_index=None
    ):
        grad_freqs = freqs.new_empty(freqs.shape) if freqs_grad else weight.new_empty(0)
        return qk.new_empty(qk.shape), weight.new_empty(weight.shape), grad_freqs


def pos2d_add_indexed(x: Tensor, pos_h: Tensor, pos_w: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The factorized 2D position table on packed tokens (docs/ops.md): every token its own row and column.

    Args:
        x: float16/bfloat16/float32/float64 ``[..., N, D]``, any leading dims (B = 0 too), any strides.
        pos_h: ``[max_h, D]`` row table, x's dtype and device; differentiable.
        pos_w: ``[max_w, D]`` column table, likewise.
        rows, cols: int64 ``[N]`` on x's device, values in ``[-1, max_h)`` and ``[-1, max_w)``;
            -1 leaves that table out for the token (class, register or condition tokens).

    ``out[..., n, :] = x[..., n, :] + pos_h[rows[n]] + pos_w[cols[n]]``, the table sum formed first in
    float32 (float64 for float64 x) and rounded once; a token with both indices -1 is copied. Returns a
    new contiguous tensor shaped like ``x``. Gradients reach x, pos_h and pos_w; the table gradients
    are summed in float32 in a fixed order (same bits every run, no atomics). On a CUDA device the
    index range check reads two minima and maxima back to the host (one synchronization per call).
    """
    _require_extension("pos2d_add_indexed")
    return torch.ops.jitrope.pos2d_add_indexed.default(x, pos_h, pos_w, rows, cols)


if HAS_EXTENSION:

    def _check_devices(op: str, x_name: str, x: Tensor, **tensors: Tensor) -> None:
        # A meta tensor beside real ones dispatches to these fakes, not to the C++ checks: refuse it
        # with the C++ message.
        for name, t in tensors.items():
            msg = f"{op}: {name} must be on {x_name}'s device {x.device}, got {t.device}"
            torch._check(t.device == x.device, lambda msg=msg: msg)

    @torch.library.register_fake("jitrope::pos2d_add_indexed")
    def _pos2d_add_indexed_fake(x, pos_h, pos_w, rows, cols):
        _check_devices("pos2d_add_indexed", "x", x, pos_h=pos_h, pos_w=pos_w, rows=rows, cols=cols)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("jitrope::pos2d_add_indexed_backward")
    def _pos2d_add_indexed_backward_fake(grad_out, rows, cols, max_h, max_w):
        _check_devices("pos2d_add_indexed_backward", "grad_out", grad_out, rows=rows, cols=cols)
        D = grad_out.shape[-1]
        return grad_out.new_empty((max_h, D)), grad_out.new_empty((max_w, D))
