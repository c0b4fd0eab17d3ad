"""Block-diagonal attention over packed sequences (docs/ops.md): a token attends only to its own sequence.

One function, :func:`varlen_attention`, with one switch ``impl``:

* ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10), the flash-attention
  varlen kernel: CUDA, float16/bfloat16, no dropout; cost ``sum_s n_s^2``, no mask in memory.
  Called with ``num_splits=1`` (batch invariance: a sequence's output does not depend on what else
  is packed with it, at the cost of split-KV parallelism that only few-query inference would use).
* ``"mask"``: ``F.scaled_dot_product_attention`` with a block-diagonal boolean ``[T, T]`` mask; any
  device and dtype, traceable by torch.compile with T dynamic; cost and memory ``T^2``.
* ``"loop"``: SDPA on each sequence in turn; cost ``sum_s n_s^2`` plus a call per sequence; reads
  ``cu_seqlens`` on the host, so it breaks a compiled graph.
* ``"auto"``: ``"varlen"`` where it applies (CUDA, half precision, no dropout, no float32 logits,
  head_dim a multiple of 8 up to 256), else ``"mask"`` while torch.compile traces (one graph, T
  dynamic) and ``"loop"`` in eager code.

The CPU choice is measured: ``PYTHONPATH=python python scripts/bench_varlen_attention.py`` (1 thread,
3 heads of 64, float32, forward + backward per call, the emoji multi-size mix packed to a token
budget) printed on the 2-core build machine (2026-11-30, other jobs running)::

     budget      T    S   mask ms   loop ms loop/mask
        128     44    1      0.81      0.55      0.67
        256    152    1     11.96     11.44      0.96
        384    348    4     36.13     24.86      0.69
        512    452    9     64.05     30.88      0.48
        768    668   10    143.52     49.39      0.34
       1024   1012   13    316.33     80.99      0.26
       2048   2024   23    914.40    175.54      0.19
       4096   3992   49   3550.31    602.13      0.17

The loop is never slower (its per-call overhead is below the masked call's wasted ``T^2`` work even
at one short sequence) and 4-6x faster from 1k tokens on, so eager CPU code loops. The GPU choice is
not measured here: ``varlen_attn`` is the documented flash-attention varlen entry of torch 2.14.

``fp32_logits=True`` is the official JiT attention (``attn_impl="fp32"``): logits and softmax in
float32 outside autocast, then ``attn.to(v.dtype) @ v``; it runs the mask or the loop path.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .packing import check_cu_seqlens

__all__ = ["varlen_attention", "VARLEN_IMPLS", "block_diagonal_mask", "resolve_varlen_impl", "attention_fp32"]

VARLEN_IMPLS = ("auto", "varlen", "mask", "loop")


def _varlen_attn_applies(q: Tensor, dropout_p: float, fp32_logits: bool) -> bool:
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and dropout_p == 0.0
        and not fp32_logits
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    )


def resolve_varlen_impl(impl: str, q: Tensor, *, dropout_p: float = 0.0, fp32_logits: bool = False) -> str:
    """The path ``impl`` takes for this q (``"auto"`` resolved as the module docstring says)."""
    if impl != "auto":
        return impl
    if _varlen_attn_applies(q, dropout_p, fp32_logits):
        return "varlen"
    return "mask" if torch.compiler.is_compiling() else "loop"


def block_diagonal_mask(cu_seqlens: Tensor, total: int) -> Tensor:
    """``[T, T]`` bool, True where query and key are in the same sequence of ``cu_seqlens``."""
    seq = torch.bucketize(torch.arange(total, device=cu_seqlens.device), cu_seqlens[1:].to(torch.int64), right=True)
    return seq[:, None] == seq[None, :]


def attention_fp32(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """The official JiT attention: logits and softmax in float32 outside autocast (stabler in bf16), then
    ``attn.to(v.dtype) @ v``. ``scale``: the factor on ``q.k`` (SDPA's meaning; None: ``1/sqrt(head_dim)``);
    ``mask``: bool, True where a query may attend to a key (None: everywhere)."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = (q.float() @ k.float().transpose(-2, -1)) * s
        if mask is not None:
            logits = logits.masked_fill(~mask, -math.inf)
        attn = logits.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return attn.to(v.dtype) @ v


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float, scale: Optional[float], fp32_logits: bool
) -> Tensor:
    """Attention of ``[H, N, D]`` q, k, v (``mask [N, N]`` bool or None) -> ``[H, N, D]``."""
    if fp32_logits:
        return attention_fp32(q, k, v, dropout_p, scale, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _check_varlen_args(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, impl: str) -> None:
    """The shapes, dtype and device of :func:`varlen_attention`'s arguments (not the values of cu_seqlens)."""
    if impl not in VARLEN_IMPLS:
        raise ValueError(f"impl must be one of {list(VARLEN_IMPLS)}, got {impl!r}")
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k, v must be [T, H, D] with equal T and H, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be an int32 [S+1] tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    impl: str = "auto",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    fp32_logits: bool = False,
    check: bool = True,
) -> Tensor:
    """Attention within each packed sequence.

    Args:
        q, k, v: ``[T, H, D]`` (the flash-attn / ``varlen_attn`` layout; strided views are fine).
        cu_seqlens: int32 ``[S+1]``, 0 first, T last, increasing (sequence s is ``[cu[s], cu[s+1])``).
        max_seqlen: the longest sequence (the varlen kernel sizes its grid by it).
        impl: ``"auto"`` | ``"varlen"`` | ``"mask"`` | ``"loop"`` (module docstring).
        dropout_p: attention dropout (not with ``"varlen"``).
        scale: logit scale, default ``D ** -0.5``.
        fp32_logits: float32 logits and softmax (JiT's ``attn_impl="fp32"``).
        check: validate the values of ``cu_seqlens`` in eager code (0 first, increasing, T last); it reads
            them on the host, so callers whose layout is valid by construction (the model) skip it.
    Returns:
        ``[T, H, D]`` in q's dtype.
    """
    _check_varlen_args(q, k, v, cu_seqlens, impl)
    T = q.shape[0]
    if check and not torch.compiler.is_compiling():
        check_cu_seqlens(cu_seqlens, T)
    impl = resolve_varlen_impl(impl, q, dropout_p=dropout_p, fp32_logits=fp32_logits)
    if impl == "varlen":
        if not _varlen_attn_applies(q, dropout_p, fp32_logits):
            raise ValueError(
                "impl='varlen' (flash-attention varlen_attn) needs CUDA, float16/bfloat16 q/k/v, head_dim a multiple "
                f"of 8 up to 256, dropout_p=0 and fp32_logits=False; got {q.device.type}, {q.dtype}, head_dim "
                f"{q.shape[-1]}, dropout_p={dropout_p}, fp32_logits={fp32_logits}"
            )
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, num_splits=1)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, D] views, SDPA's layout
    if impl == "mask":
        out = _sdpa(qh, kh, vh, block_diagonal_mask(cu_seqlens, T), dropout_p, scale, fp32_logits)
        return out.transpose(0, 1)
    bounds = cu_seqlens.tolist()
    outs = [
        _sdpa(qh[:, a:b], kh[:, a:b], vh[:, a:b], None, dropout_p, scale, fp32_logits)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=1).transpose(0, 1)
