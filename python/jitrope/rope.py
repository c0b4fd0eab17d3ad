"""Frequencies and token coordinates for 2D RoPE (docs/ops.md), and their scaling to other grids.

Coordinates are ``[N, 2]`` float tensors of (row y, column x), in the units of the image grid.

Grids larger (or smaller) than the training grid are placed by a *scaling mode*
(:data:`SCALING_MODES`, ``model.pos_scaling``), per axis: a 48x32 image from a 32x32 training
image scales rows by ``s_h = 1.5`` and columns by ``s_w = 1``.

* ``extrapolate``: integer positions beyond the training range, frequencies unchanged;
* ``interpolate``: position interpolation (PI; Chen et al. 2023, arXiv 2306.15595), positions
  squeezed into the training range, ``m -> m / s``; the model does it on the coordinates
  (:func:`grid_coords` with ``ref_grid``), which equals dividing the frequencies by ``s`` up to a
  constant offset that relative rotations do not see;
* ``ntk``: NTK-aware scaling (bloc97, "NTK-Aware Scaled RoPE", r/LocalLLaMA 2023), a larger base
  ``theta' = theta * s^(d / (d - 2))`` with ``d`` the rotary dimension of the axis, applied per axis
  as FiT (Lu et al. 2024, arXiv 2402.12376, "VisionNTK") and Lumina-Next (Zhuo et al. 2024, arXiv
  2406.18583) do: the highest frequency is kept, the lowest is interpolated by exactly ``s``;
* ``yarn``: YaRN (Peng et al. 2023, arXiv 2309.00071, §3.2-3.4), per frequency a ramp between
  interpolation and extrapolation by wavelength, ``h(f) = (1 - gamma(r)) f / s + gamma(r) f`` with
  ``r = L / lambda = L f / (2 pi)``, ``gamma(r) = clamp((r - alpha) / (beta - alpha), 0, 1)``
  (paper: ``alpha = 1``, ``beta = 32``), ``L`` the training length of the axis in tokens; plus the
  attention temperature ``sqrt(1/t) = 0.1 ln(s) + 1``, i.e. logits ``q.k`` times ``1/t``
  (:func:`yarn_attn_factor`).

``ntk`` and ``yarn`` only scale axes that are longer than in training (``s`` is clamped at 1, as
FiT's ``max(L_test / L_train, 1)``): a smaller grid keeps its integer positions and frequencies.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "SCALING_MODES",
    "FREQ_SCALINGS",
    "axial_freqs",
    "ntk_theta",
    "yarn_ramp",
    "yarn_attn_factor",
    "scale_axis_freqs",
    "scale_freqs",
    "scaled_axial_freqs",
    "attn_logit_factor",
    "grid_coords",
    "prefix_coords",
    "sequence_coords",
]

SCALING_MODES = ("extrapolate", "interpolate", "ntk", "yarn")
FREQ_SCALINGS = ("ntk", "yarn")  # the modes that change RoPE frequencies (coordinates stay integer)
YARN_ALPHA, YARN_BETA = 1.0, 32.0  # Peng et al. 2023, §3.2: the ramp's bounds for LLaMA


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


def _check_mode(mode: str) -> None:
    if mode not in SCALING_MODES:
        raise ValueError(f"pos_scaling must be one of {list(SCALING_MODES)}, got {mode!r}")


def ntk_theta(theta: float, scale: float, rotary_dim: int) -> float:
    """bloc97's NTK-aware base ``theta * s^(d / (d - 2))`` for a rotary dimension ``d`` (per axis: ``head_dim / 2``).

    With ``f_k = theta'^(-2k/d)`` the highest frequency (k = 0) is unchanged and the lowest
    (k = d/2 - 1) is divided by exactly ``s``."""
    if rotary_dim <= 2 or rotary_dim % 2:
        raise ValueError(f"ntk: the rotary dimension of an axis must be even and > 2, got {rotary_dim}")
    return theta * scale ** (rotary_dim / (rotary_dim - 2))


def yarn_ramp(r: Tensor, alpha: float = YARN_ALPHA, beta: float = YARN_BETA) -> Tensor:
    """YaRN's ``gamma(r)`` (Peng et al. 2023, eq. 18): 0 (interpolate) for ``r < alpha``, 1 (keep) for
    ``r > beta``, linear between; ``r`` = training length / wavelength."""
    if not beta > alpha:
        raise ValueError(f"yarn: beta must be larger than alpha, got alpha={alpha}, beta={beta}")
    return ((r - alpha) / (beta - alpha)).clamp(0.0, 1.0)


def yarn_attn_factor(scale: float) -> float:
    """YaRN's attention temperature as a factor on the logits ``q.k``: ``1/t = (0.1 ln(s) + 1)^2``
    (Peng et al. 2023, eq. 22: ``sqrt(1/t) = 0.1 ln(s) + 1`` scales q and k); 1 for ``s <= 1``."""
    return (0.1 * math.log(scale) + 1.0) ** 2 if scale > 1.0 else 1.0


def scale_axis_freqs(
    freqs: Tensor,
    scale: Union[float, Tensor],
    mode: str,
    *,
    theta: float,
    rotary_dim: int,
    train_len: Optional[float] = None,
    alpha: float = YARN_ALPHA,
    beta: float = YARN_BETA,
) -> Tensor:
    """Frequencies of one axis (any shape and sign, e.g. a column of learned RoPE-Mixed frequencies)
    scaled for an axis ``scale`` times its training length; computed in float64, returned in
    ``freqs``' dtype.

    Each frequency ``f`` is scaled by a factor that depends on ``|f|`` only, so axial frequencies
    (:func:`axial_freqs`) get exactly the published formulas (module docstring):

    * ``extrapolate``: 1; ``interpolate``: ``1 / s`` (PI, any ``s > 0``);
    * ``ntk``: ``s^(-e)``, ``e = d/(d-2) * ln(1/|f|) / ln(theta)``: for ``f = theta^(-2k/d)`` this is
      ``theta'^(-2k/d) / f`` with ``theta' = ntk_theta(theta, s, d)``; ``e`` is clamped to [0, 1] so
      that a learned frequency outside the axial range is scaled no less than not at all and no
      more than PI;
    * ``yarn``: ``(1 - gamma) / s + gamma`` with ``gamma = yarn_ramp(train_len |f| / (2 pi))``.

    ``ntk`` and ``yarn`` use ``max(s, 1)``: they only stretch axes longer than in training.

    ``scale`` may be a float tensor ``[F]`` instead (one table per sequence of a packed batch, docs/ops.md):
    the result is ``[F, *freqs.shape]``, table ``i`` scaled by ``scale[i]`` with the same formulas, computed
    in the graph (a compiled step does not depend on the values). Its values are not read here: they must
    be positive and finite, as :class:`jitrope.packing.PackedLayout` makes them (grid ratios).
    """
    _check_mode(mode)
    per_table = isinstance(scale, Tensor)
    if per_table:
        if scale.dim() != 1 or not scale.is_floating_point():
            raise ValueError(f"scale must be a float or a float tensor [F], got {scale.dtype} {tuple(scale.shape)}")
    elif not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    if mode == "extrapolate":
        return freqs.expand(scale.shape[0], *freqs.shape) if per_table else freqs
    f = freqs.to(torch.float64)
    if per_table:
        scale = scale.to(device=f.device, dtype=torch.float64).reshape(-1, *([1] * f.dim()))
    if mode == "interpolate":
        return (f / scale).to(freqs.dtype)
    if per_table:
        s = scale.clamp_min(1.0)
    else:
        s = max(float(scale), 1.0)
        if s == 1.0:
            return freqs
    if mode == "ntk":
        return (f * s ** (-_ntk_exponent(f.abs(), theta, rotary_dim))).to(freqs.dtype)
    if train_len is None or not train_len > 0:
        raise ValueError(f"yarn needs the training length of the axis (train_len > 0), got {train_len}")
    gamma = yarn_ramp(train_len * f.abs() / (2 * math.pi), alpha, beta)
    return (f * ((1.0 - gamma) / s + gamma)).to(freqs.dtype)


def _ntk_exponent(mag: Tensor, theta: float, rotary_dim: int) -> Tensor:
    """NTK's ``e`` of frequencies of magnitude ``mag`` (:func:`scale_axis_freqs`): ``d/(d-2) * ln(1/|f|) /
    ln(theta)``, clamped to [0, 1]."""
    if rotary_dim <= 2:
        raise ValueError(f"ntk: an axis needs more than one frequency (rotary dim > 2), got rotary dim {rotary_dim}")
    # ln(1/|f|) / ln(theta), written so that f = 0 (a pair that does not turn with this axis) stays finite
    k_frac = torch.where(mag > 0, -torch.log(mag.clamp_min(1e-300)) / math.log(theta), torch.ones_like(mag))
    return (k_frac * (rotary_dim / (rotary_dim - 2))).clamp(0.0, 1.0)


def scale_freqs(
    freqs: Tensor,
    scale_hw: Union[Sequence[float], Tensor],
    mode: str,
    *,
    theta: float,
    head_dim: int,
    train_grid: Optional[Sequence[int]] = None,
    alpha: float = YARN_ALPHA,
    beta: float = YARN_BETA,
) -> Tensor:
    """RoPE frequencies ``[..., 2, D/2]`` (row coefficients ``[..., 0, :]``, column ``[..., 1, :]``;
    shared ``[2, D/2]`` or per head / layer) scaled per axis: rows by ``scale_hw[0]``, columns by
    ``scale_hw[1]`` (:func:`scale_axis_freqs`; each axis has rotary dimension ``head_dim / 2``).

    ``scale_hw`` may be a float tensor ``[F, 2]`` of per-table (rows, columns) scales (a packed batch):
    the result is then ``[F, ..., 2, D/2]``, the tables that ``freqs_index`` picks from (docs/ops.md)."""
    if freqs.dim() < 2 or freqs.shape[-2] != 2:
        raise ValueError(f"freqs must be [..., 2, D/2], got {tuple(freqs.shape)}")
    if isinstance(scale_hw, Tensor):
        if scale_hw.dim() != 2 or scale_hw.shape[1] != 2:
            raise ValueError(f"scale_hw must be (s_h, s_w) or a tensor [F, 2], got {tuple(scale_hw.shape)}")
        sh, sw = scale_hw.unbind(1)
    else:
        sh, sw = scale_hw
    th, tw = train_grid if train_grid is not None else (None, None)
    kw = dict(theta=theta, rotary_dim=head_dim // 2, alpha=alpha, beta=beta)
    rows = scale_axis_freqs(freqs[..., 0, :], sh, mode, train_len=th, **kw)
    cols = scale_axis_freqs(freqs[..., 1, :], sw, mode, train_len=tw, **kw)
    return torch.stack((rows, cols), dim=-2)


def attn_logit_factor(scale_hw: Sequence[float], mode: str) -> float:
    """The factor on the attention logits: YaRN's ``1/t`` (:func:`yarn_attn_factor`) for ``mode="yarn"``
    on a grid with more tokens than in training, with ``s = s_h * s_w`` (the token ratio: the 1D
    ``s`` is a length ratio, i.e. a token ratio, and the temperature compensates the entropy that
    more tokens add); 1 otherwise."""
    _check_mode(mode)
    if mode != "yarn":
        return 1.0
    return yarn_attn_factor(float(scale_hw[0]) * float(scale_hw[1]))


def scaled_axial_freqs(
    head_dim: int,
    theta: float,
    scale_hw: Sequence[float],
    mode: str,
    *,
    train_grid: Optional[Sequence[int]] = None,
    alpha: float = YARN_ALPHA,
    beta: float = YARN_BETA,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tuple[Tensor, float]:
    """Axial 2D RoPE frequencies (:func:`axial_freqs`) for a grid ``scale_hw = (s_h, s_w)`` times the
    training grid ``train_grid`` (needed by ``yarn``), under ``mode``. Returns ``([2, head_dim / 2]``
    frequencies, the factor on the attention logits)``; the formulas and their sources are in the
    module docstring and :func:`scale_axis_freqs`."""
    base = axial_freqs(head_dim, theta, dtype=torch.float64, device=device)
    freqs = scale_freqs(
        base, scale_hw, mode, theta=theta, head_dim=head_dim, train_grid=train_grid, alpha=alpha, beta=beta
    )
    return freqs.to(dtype), attn_logit_factor(scale_hw, mode)


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
