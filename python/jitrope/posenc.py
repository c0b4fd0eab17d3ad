"""Positional encodings of the JiT model, one class per ``JiTConfig.pos_embed`` value (docs/training.md).

Every encoding has the same two hooks, so the model never asks which one it runs, nor which
implementation (``pos_impl``) of the ops it uses:

* ``add(x, layout)``: the *additive* part, applied once to the token sequence
  ``[image tokens | condition tokens]`` right after patch embedding;
* ``qk_norm_rope(qk, weight, layer, layout)``: what attention layer ``layer`` does to its q/k pair
  (the strided ``[2, B, H, N, D]`` view of the qkv projection): the qk RMSNorm with its two weights,
  then the *rotary* part, if any. It returns a new ``[2, B, H, N, D]`` tensor (q, k).

An encoding is a :class:`PositionalEncoding` made of parts from :data:`PARTS`; :data:`POS_EMBEDS`
maps each ``pos_embed`` value to its parts (``"sincos2d+rope2d"`` is the sin-cos table plus axial
RoPE). The geometry of a call (grids, prefix, resize mode) travels in a :class:`SeqLayout`.

Condition tokens carry real 2D positions under every encoding: aligned grid centres for RoPE and
sin-cos (``rope.sequence_coords``), their own row/column tables for ``factorized2d``, their own
slots for ``learned1d``. Other grid sizes than the training one follow ``SeqLayout.scaling``
(:data:`jitrope.rope.SCALING_MODES`, per axis): ``"extrapolate"`` uses integer positions beyond the
training range (RoPE, sin-cos; ``factorized2d`` up to its table size), ``"interpolate"`` maps the new
grid onto the training range (RoPE and sin-cos at fractional coordinates, learned tables resampled
bilinearly). ``"ntk"`` and ``"yarn"`` scale RoPE *frequencies* (:func:`jitrope.rope.scale_freqs`;
coordinates stay integer; yarn also tempers the attention logits, :meth:`PositionalEncoding.attn_scale`);
they have no meaning for a table, so the table parts (``learned1d``, ``sincos2d``, ``factorized2d``,
the sin-cos of ``sincos2d+rope2d``) interpolate under them (``SeqLayout.table_scaling``).
``learned1d`` cannot extrapolate and says so.

Packed batches (docs/ops.md, :mod:`jitrope.packing`): ``add`` also takes a :class:`PackedLayout` (its
input stream ``[image | condition]`` per sample, batch dim 1) and ``qk_norm_rope`` a :class:`PackedSeqs`
(per-token coordinates). What each encoding does there, per sample, is what it does to that sample
alone (a loop over single images gives the same numbers):

* ``rope2d`` / ``rope2d_mixed``: rotate by each token's coordinates (in-context (0, 0), image (i, j) of
  its own grid, condition tokens at aligned centres; laid onto the training grid when interpolating).
  Nothing is cached: the fused op computes angles from the coordinates, the torch path makes cos/sin
  per call, as eager code must when positions change every batch.
* ``sincos2d``: the sin-cos table evaluated at the same per-token coordinates, per call.
* ``factorized2d``: ``pos2d_add_indexed`` with per-token ``rows``/``cols`` into the row/column tables
  (image tables, then condition tables, concatenated). Extrapolation reads rows up to the table size;
  interpolation adds one table resampled from the trained rows per grid other than the training one.
* ``learned1d``: per-token ``slots`` into its table; samples at the training grids read it as trained,
  other grids need ``pos_scaling="interpolate"`` (or ntk / yarn, under which tables interpolate) and get
  the table resampled per grid, as in the batched path.

Every ``pos_scaling`` mode works on a packed batch. Under ``ntk`` / ``yarn`` the RoPE parts rotate each
sequence by its own grid's scaled frequencies: :meth:`Rope2D.packed_freqs` makes one table per sequence
(``[S, ..., 2, D/2]``, :func:`jitrope.rope.scale_freqs` with the stream's per-sequence scales) and the op
(or the reference's :func:`~jitrope.reference.rope_angles`) picks each token's by ``freqs_index``; yarn's
temperature differs per sequence, so :meth:`PositionalEncoding.packed_attn_factor` hands attention a
per-token factor that it folds into the queries. The tables interpolate under both, as in the batched path.

``pos_impl="torch"`` does what a user's eager code does: like the published JiT (EVA-02
``VisionRotaryEmbeddingFast``) it keeps RoPE's cos/sin tables for the training sequence as buffers,
and derived tables of other grids (cos/sin, sin-cos, summed factorized tables) are kept across calls
while the parameters they come from are unchanged. Tables made from parameters that are being
trained are made once per forward (per layer for RoPE-Mixed, whose layers differ), so gradients flow.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import EXTENSION_ERROR, HAS_EXTENSION, ops
from .packing import PackedLayout, PackedSeqs
from .reference import compute_dtype, pos2d_add_indexed_ref, pos2d_table, rms_norm, rope_angles, rotate_pairs
from .rope import FREQ_SCALINGS, SCALING_MODES, attn_logit_factor, axial_freqs, scale_freqs, sequence_coords

__all__ = [
    "SeqLayout",
    "PosEncGeometry",
    "IMPLS",
    "resolve_impl",
    "qk_norm_rope_fused",
    "qk_norm_rope_tables",
    "rope_cos_sin",
    "PosPart",
    "Learned1D",
    "SinCos2D",
    "Factorized2D",
    "Rope2D",
    "Rope2DMixed",
    "PositionalEncoding",
    "PARTS",
    "POS_EMBEDS",
    "SCALINGS",
    "build_pos_encoding",
    "check_pos_embed",
    "sincos_2d",
]

Grid = Tuple[int, int]
SCALINGS = SCALING_MODES  # extrapolate | interpolate | ntk | yarn


class SeqLayout(NamedTuple):
    """Geometry of one model sequence ``[prefix (L_ctx) | image grid | condition grid]``.

    ``grid``/``cond_grid`` are the token grids of this call, ``train_grid``/``train_cond_grid``
    those the model was built for; ``scaling`` says how to place a grid that differs from the
    training one (:data:`SCALINGS`). A NamedTuple so torch.compile treats it as plain constants.
    """

    grid: Grid
    cond_grid: Optional[Grid]
    prefix: int
    train_grid: Grid
    train_cond_grid: Optional[Grid]
    scaling: str = "extrapolate"

    @property
    def n_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_cond(self) -> int:
        return 0 if self.cond_grid is None else self.cond_grid[0] * self.cond_grid[1]

    @property
    def n_tokens(self) -> int:
        """Length of the sequence once the in-context (prefix) tokens are in."""
        return self.prefix + self.n_image + self.n_cond

    @property
    def segments(self) -> Dict[str, Tuple[int, int]]:
        """``{"context" | "image" | "cond": (start, end)}`` token ranges in the full sequence."""
        a, b = self.prefix, self.prefix + self.n_image
        return {"context": (0, a), "image": (a, b), "cond": (b, b + self.n_cond)}

    @property
    def at_train_size(self) -> bool:
        return self.grid == self.train_grid and self.cond_grid == self.train_cond_grid

    @property
    def scale_hw(self) -> Tuple[float, float]:
        """Per-axis ratio of this image grid to the training grid, (rows, columns)."""
        return self.grid[0] / self.train_grid[0], self.grid[1] / self.train_grid[1]

    @property
    def table_scaling(self) -> str:
        """How absolute tables place this grid: ``ntk``/``yarn`` scale RoPE frequencies, tables interpolate."""
        return "interpolate" if self.scaling in FREQ_SCALINGS else self.scaling

    def ref_grid(self) -> Optional[Grid]:
        """Grid that coordinates are laid onto: the training grid when interpolating, else none
        (integer coordinates: extrapolation, and ntk / yarn, which scale frequencies instead)."""
        return self.train_grid if self.scaling == "interpolate" else None

    def coords(self, prefix: int = 0, *, device=None) -> Tensor:
        """``[prefix + n_image + n_cond, 2]`` float32 (row, column) of every token (docs/ops.md)."""
        return sequence_coords(
            self.grid, prefix=prefix, cond_grid=self.cond_grid, ref_grid=self.ref_grid(), device=device
        )


class PosEncGeometry(NamedTuple):
    """What an encoding needs to know about the model to build its tables."""

    width: int
    num_heads: int
    depth: int
    grid: Grid
    cond_grid: Optional[Grid]
    max_grid: Grid  # row/column table sizes of factorized2d (image)
    max_cond_grid: Optional[Grid]  # ... and of its condition tables
    theta: float
    context_len: int = 0  # in-context tokens in front of the sequence from some block on

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


IMPLS = ("fused", "torch")
_warned_fallback = False


def resolve_impl(pos_impl: str) -> str:
    """The implementation that runs: ``"fused"`` (the C++/CUDA ops) or ``"torch"`` (plain PyTorch).

    ``"fused"`` without a loadable extension falls back to ``"torch"`` and warns once per process
    (docs/training.md): the numbers are the same, only slower.
    """
    global _warned_fallback
    if pos_impl not in IMPLS:
        raise ValueError(f"pos_impl must be one of {list(IMPLS)}, got {pos_impl!r}")
    if pos_impl == "torch" or HAS_EXTENSION:
        return pos_impl
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"jitrope: pos_impl='fused' but the extension is not loaded ({EXTENSION_ERROR}); "
            "using the pure-PyTorch reference ops (pos_impl='torch') instead.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"


def qk_norm_rope_fused(
    qk: Tensor,
    weight: Tensor,
    coords: Optional[Tensor],
    freqs: Optional[Tensor],
    eps: float,
    freqs_index: Optional[Tensor] = None,
) -> Tensor:
    """``pos_impl="fused"``: ``jitrope::qk_norm_rope`` (docs/ops.md), RMSNorm of q and k (``weight: [2, D]``)
    and the rotation (when ``freqs``) in one pass over the strided q/k view, written in the layout SDPA reads;
    ``freqs_index`` (docs/ops.md) picks a table of ``freqs [F, ...]`` per token.

    The one place where attention meets the fused ops.
    """
    return ops.qk_norm_rope(qk, weight, coords, freqs, eps=eps, freqs_index=freqs_index)


def qk_norm_rope_tables(qk: Tensor, weight: Tensor, cos_sin: Optional[Tuple[Tensor, Tensor]], eps: float) -> Tensor:
    """``pos_impl="torch"``: docs/ops.md with precomputed ``cos, sin: [1 or H, N, D/2]`` (None: no rotation).

    Norm and rotation in float32 (float64 for float64), rounded once, as the fused op; both are the
    reference's own functions (:func:`jitrope.reference.rms_norm`, :func:`jitrope.reference.rotate_pairs`).
    """
    h = rms_norm(qk, weight.view(2, *([1] * (qk.dim() - 2)), -1), eps)
    if cos_sin is not None:
        h = rotate_pairs(h, *cos_sin, interleaved=True)
    return h.to(qk.dtype)


def rope_cos_sin(
    coords: Tensor, freqs: Tensor, dtype: torch.dtype, *, freqs_index: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """cos and sin of the angles of docs/ops.md (:func:`jitrope.reference.rope_angles`, ``freqs_index`` as there:
    a table of ``freqs [F, ...]`` per token), ``[1 or H, N, D/2]`` in ``dtype``."""
    phi = rope_angles(coords, freqs, dtype, freqs_index=freqs_index)
    return phi.cos(), phi.sin()


class _Derived:
    """Tables derived from a part's tensors, kept across calls while those are unchanged.

    ``get(key, sources, make)`` returns ``make()`` (cached under ``key``) and makes it again when a
    source tensor changed in place (optimizer step, ``load_state_dict``) or was replaced. It does not
    cache while tracing (``torch.compile`` makes the table in its graph; a cached tensor written from a
    CUDA graph would be overwritten by the next replay) nor when a source is being trained, where the
    table must carry gradients: then the caller makes it once per forward.
    """

    def __init__(self, max_entries: int = 32):
        self.max_entries = max_entries
        self.entries: Dict[tuple, Tuple[tuple, object]] = {}

    def get(self, key: tuple, sources: Sequence[Tensor], make: Callable[[], object]):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
            return make()
        stamp = tuple((id(t), t._version) for t in sources)
        key = key + (torch.is_inference_mode_enabled(),)  # an inference tensor must not reach autograd later
        hit = self.entries.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = make()
        if len(self.entries) >= self.max_entries:
            del self.entries[next(iter(self.entries))]  # oldest first (dicts keep insertion order)
        self.entries[key] = (stamp, value)
        return value

    def clear(self) -> None:
        self.entries.clear()


def sincos_2d(coords: Tensor, dim: int, *, temperature: float = 10000.0) -> Tensor:
    """MAE / DiT 2D sin-cos embedding evaluated at ``coords: [N, 2]`` (row, column) -> ``[N, dim]``.

    Same layout as MAE's ``get_2d_sincos_pos_embed``: the first half of the channels encodes the
    column, the second the row, each as ``[sin(p * w_k), cos(p * w_k)]`` with
    ``w_k = temperature ** (-k / (dim / 4))``. Fractional coordinates are fine (aligned condition
    tokens, interpolated grids). Computed in float64, returned as float32.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    q = dim // 4
    omega = temperature ** (-torch.arange(q, dtype=torch.float64, device=coords.device) / q)
    c = coords.to(torch.float64)

    def one_axis(p: Tensor) -> Tensor:
        out = p[:, None] * omega[None, :]
        return torch.cat((out.sin(), out.cos()), dim=1)

    return torch.cat((one_axis(c[:, 1]), one_axis(c[:, 0])), dim=1).to(torch.float32)


def _resize_grid_table(table: Tensor, src: Grid, dst: Grid) -> Tensor:
    """Bilinearly resample a row-major ``[src_h * src_w, D]`` table to ``[dst_h * dst_w, D]``.

    ``align_corners=False`` samples at the same cell centres as ``rope.grid_coords(ref_grid=...)``,
    so every interpolated encoding agrees on where a token sits.
    """
    if tuple(src) == tuple(dst):
        return table
    d = table.shape[-1]
    img = table.reshape(1, src[0], src[1], d).permute(0, 3, 1, 2)
    out = F.interpolate(img.float(), size=tuple(dst), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(dst[0] * dst[1], d).to(table.dtype)


def _resize_axis_table(table: Tensor, n: int) -> Tensor:
    """Linearly resample a ``[m, D]`` table of positions along one axis to ``[n, D]`` (cell centres)."""
    if table.shape[0] == n:
        return table
    out = F.interpolate(table.t()[None].float(), size=n, mode="linear", align_corners=False)
    return out[0].t().to(table.dtype)


class PosPart(nn.Module):
    """One ingredient of a positional encoding. Subclasses override what they provide.

    Class attributes declare the shape constraints the part puts on the model, checked by
    :func:`check_pos_embed`: ``head_dim_multiple`` (RoPE splits a head into row/column quarters),
    ``width_multiple`` (sin-cos splits the width into row/column sin/cos quarters).
    """

    rotary = False
    head_dim_multiple = 1
    width_multiple = 1

    def __init__(self, geom: PosEncGeometry, impl: str):
        super().__init__()
        self.impl = impl
        self._derived = _Derived()

    def add(self, x: Tensor, layout: SeqLayout) -> Tensor:
        return x

    def check_packed(self, layout: PackedLayout) -> None:
        """Raise ``ValueError`` (host side, before any compute) when this part cannot place ``layout``'s grids."""

    def _apply(self, fn, recurse=True):
        # Derived tables are made again on the new device / in the new dtype.
        self._derived.clear()
        return super()._apply(fn, recurse)


class Learned1D(PosPart):
    """The seed's scheme: one learnable vector per token slot (std 0.02), added.

    Condition tokens get their own slots after the image slots (the "extra handling" a fixed 1D
    table needs for the 256 -> 320 sequence). The table only knows the training grid: another grid
    raises unless ``scaling="interpolate"``, which resamples each segment's slots as a 2D grid.
    """

    def __init__(self, geom: PosEncGeometry, impl: str):
        super().__init__(geom, impl)
        n = geom.grid[0] * geom.grid[1]
        n_cond = 0 if geom.cond_grid is None else geom.cond_grid[0] * geom.cond_grid[1]
        self.n_image = n
        self.train_grid = tuple(geom.grid)
        self.train_cond_grid = None if geom.cond_grid is None else tuple(geom.cond_grid)
        self.pos_embed = nn.Parameter(torch.empty(n + n_cond, geom.width))
        nn.init.normal_(self.pos_embed, std=0.02)

    def _cannot_extrapolate(self, grid, cond_grid) -> ValueError:
        return ValueError(
            f"pos_embed='learned1d' has one slot per training token (image grid {self.train_grid}, "
            f"condition grid {self.train_cond_grid}) and cannot extrapolate to image grid "
            f"{grid} / condition grid {cond_grid}; set pos_scaling='interpolate' to "
            "resample the table bilinearly, or use a 2D encoding"
        )

    def table(self, layout: SeqLayout) -> Tensor:
        if layout.at_train_size:
            return self.pos_embed
        if layout.grid == self.train_grid and layout.cond_grid is None:
            return self.pos_embed[: self.n_image]  # no condition tokens: the image slots alone
        if layout.table_scaling != "interpolate":
            raise self._cannot_extrapolate(layout.grid, layout.cond_grid)
        return self._derived.get((layout,), (self.pos_embed,), lambda: self._resized(layout))

    def check_packed(self, layout: PackedLayout) -> None:
        if layout.table_scaling == "interpolate":
            return
        for g, cg in zip(layout.img_grids, layout.cond_grids):
            if g != self.train_grid or cg not in (self.train_cond_grid, None):
                raise self._cannot_extrapolate(g, cg)

    def packed_table(self, layout: PackedLayout) -> Tensor:
        """The table ``layout.slots`` index: the trained slots, then one resampled table per grid of
        ``layout.image_tables``, then per grid of ``layout.cond_tables``."""
        img, cond = self.pos_embed[: self.n_image], self.pos_embed[self.n_image :]
        parts = [self.pos_embed]
        parts += [_resize_grid_table(img, self.train_grid, g) for g in layout.image_tables]
        parts += [_resize_grid_table(cond, self.train_cond_grid, g) for g in layout.cond_tables]
        return torch.cat(parts) if len(parts) > 1 else self.pos_embed

    def _resized(self, layout: SeqLayout) -> Tensor:
        img = _resize_grid_table(self.pos_embed[: self.n_image], self.train_grid, layout.grid)
        if layout.cond_grid is None:
            return img
        cond = _resize_grid_table(self.pos_embed[self.n_image :], self.train_cond_grid, layout.cond_grid)
        return torch.cat((img, cond), dim=0)

    def add(self, x: Tensor, layout: SeqLayout) -> Tensor:
        if isinstance(layout, PackedLayout):
            return x + self.packed_table(layout)[layout.slots].to(x.dtype)
        return x + self.table(layout).to(x.dtype)


class SinCos2D(PosPart):
    """Fixed 2D sin-cos table (MAE / DiT / JiT), added; computed for any grid.

    Image tokens sit at integer (row, column), condition tokens at the centres they cover on the
    image grid; with ``scaling="interpolate"`` other grids are laid onto the training range.
    The training-size table is a non-persistent buffer (checkpoints stay encoding-agnostic).
    """

    width_multiple = 4

    def __init__(self, geom: PosEncGeometry, impl: str):
        super().__init__(geom, impl)
        self.width = geom.width
        train = SeqLayout(geom.grid, geom.cond_grid, 0, geom.grid, geom.cond_grid)
        self.register_buffer("table", sincos_2d(train.coords(), geom.width), persistent=False)

    def add(self, x: Tensor, layout: SeqLayout) -> Tensor:
        if isinstance(layout, PackedLayout):
            return x + sincos_2d(layout.table_coords, self.width).to(x.dtype)
        if layout.at_train_size:
            table = self.table
        else:
            placed = layout._replace(scaling=layout.table_scaling)
            table = self._derived.get(
                (placed, x.device), (), lambda: sincos_2d(placed.coords(device=x.device), self.width)
            )
        return x + table.to(x.dtype)


class Factorized2D(PosPart):
    """Seed option B: learnable row and column tables (std 0.02), added by ``pos2d_add``.

    The image grid uses ``pos_h: [max_h, D]``, ``pos_w: [max_w, D]``; condition tokens have their
    own pair (``cond_pos_h``/``cond_pos_w``) added by a second ``pos2d_add`` at their token offset,
    so a coarser condition grid gets positions of its own rather than borrowed image rows.
    Extrapolation uses rows up to the table size (rows beyond the training grid are only as good
    as their training, which never touched them); interpolation resamples the trained rows.
    """

    def __init__(self, geom: PosEncGeometry, impl: str):
        super().__init__(geom, impl)
        self.train_grid = tuple(geom.grid)
        self.train_cond_grid = None if geom.cond_grid is None else tuple(geom.cond_grid)
        self.pos_h = nn.Parameter(torch.empty(geom.max_grid[0], geom.width))
        self.pos_w = nn.Parameter(torch.empty(geom.max_grid[1], geom.width))
        tables = [self.pos_h, self.pos_w]
        if geom.cond_grid is not None:
            self.cond_pos_h = nn.Parameter(torch.empty(geom.max_cond_grid[0], geom.width))
            self.cond_pos_w = nn.Parameter(torch.empty(geom.max_cond_grid[1], geom.width))
            tables += [self.cond_pos_h, self.cond_pos_w]
        for t in tables:
            nn.init.normal_(t, std=0.02)

    @staticmethod
    def _tables(pos_h: Tensor, pos_w: Tensor, grid: Grid, train: Grid, scaling: str, what: str):
        if scaling == "interpolate" and tuple(grid) != tuple(train):
            return _resize_axis_table(pos_h[: train[0]], grid[0]), _resize_axis_table(pos_w[: train[1]], grid[1])
        if grid[0] > pos_h.shape[0] or grid[1] > pos_w.shape[0]:
            raise ValueError(
                f"pos_embed='factorized2d': the {what} grid {tuple(grid)} is larger than its row/column "
                f"tables ({pos_h.shape[0]}, {pos_w.shape[0]}); raise pos_max_grid / pos_max_cond_grid "
                "or use pos_scaling='interpolate'"
            )
        return pos_h, pos_w

    def _segments(self, layout: SeqLayout):
        """``(pos_h, pos_w, grid, token_offset)`` of the image grid and, if any, the condition grid."""
        ph, pw = self._tables(self.pos_h, self.pos_w, layout.grid, self.train_grid, layout.table_scaling, "image")
        segs = [(ph, pw, layout.grid, 0)]
        if layout.cond_grid is not None:
            ph, pw = self._tables(
                self.cond_pos_h,
                self.cond_pos_w,
                layout.cond_grid,
                self.train_cond_grid,
                layout.table_scaling,
                "condition",
            )
            segs.append((ph, pw, layout.cond_grid, layout.n_image))
        return segs

    def check_packed(self, layout: PackedLayout) -> None:
        for s, (g, cg) in enumerate(zip(layout.img_grids, layout.cond_grids)):
            self._tables(self.pos_h, self.pos_w, g, self.train_grid, layout.table_scaling, f"image (sample {s})")
            if cg is not None:
                self._tables(
                    self.cond_pos_h,
                    self.cond_pos_w,
                    cg,
                    self.train_cond_grid,
                    layout.table_scaling,
                    f"condition (sample {s})",
                )

    def packed_tables(self, layout: PackedLayout) -> Tuple[Tensor, Tensor]:
        """Row and column tables that ``layout.rows`` / ``layout.cols`` index: the image tables, one pair
        resampled from the trained rows per grid of ``layout.image_tables``, the condition tables, one pair
        per grid of ``layout.cond_tables``."""
        (th, tw), hs, ws = self.train_grid, [self.pos_h], [self.pos_w]
        for gh, gw in layout.image_tables:
            hs.append(_resize_axis_table(self.pos_h[:th], gh))
            ws.append(_resize_axis_table(self.pos_w[:tw], gw))
        if self.train_cond_grid is not None:
            (tch, tcw), hs, ws = self.train_cond_grid, hs + [self.cond_pos_h], ws + [self.cond_pos_w]
            for ch, cw in layout.cond_tables:
                hs.append(_resize_axis_table(self.cond_pos_h[:tch], ch))
                ws.append(_resize_axis_table(self.cond_pos_w[:tcw], cw))
        return torch.cat(hs), torch.cat(ws)

    def _add_packed(self, x: Tensor, layout: PackedLayout) -> Tensor:
        ph, pw = self.packed_tables(layout)
        # The torch path is the op's reference itself; both get the tables in x's dtype.
        add = ops.pos2d_add_indexed if self.impl == "fused" else pos2d_add_indexed_ref
        return add(x, ph.to(x.dtype), pw.to(x.dtype), layout.rows, layout.cols)

    def add(self, x: Tensor, layout: SeqLayout) -> Tensor:
        if isinstance(layout, PackedLayout):
            return self._add_packed(x, layout)
        if self.impl == "fused":
            # The op wants tables in x's dtype: cast explicitly (autocast does not touch custom ops).
            for ph, pw, grid, offset in self._segments(layout):
                kw = {"token_offset": offset} if offset else {}
                x = ops.pos2d_add(x, ph.to(x.dtype), pw.to(x.dtype), grid, **kw)
            return x
        # The summed [n_image + n_cond, D] table, made as pos2d_add_ref makes it (tables rounded to
        # x's dtype, summed in float32), then one add: the reference's numbers, a user's eager cost.
        acc = compute_dtype(x)
        sources = [
            p
            for p in (self.pos_h, self.pos_w, getattr(self, "cond_pos_h", None), getattr(self, "cond_pos_w", None))
            if p is not None
        ]
        table = self._derived.get((layout, x.dtype, x.device), sources, lambda: self._summed(layout, x.dtype, acc))
        return (x.to(acc) + table).to(x.dtype)

    def _summed(self, layout: SeqLayout, dtype: torch.dtype, acc: torch.dtype) -> Tensor:
        parts = []
        for ph, pw, grid, _ in self._segments(layout):
            parts.append(pos2d_table(ph.to(dtype), pw.to(dtype), grid, acc))
        return torch.cat(parts, dim=0)


class Rope2D(PosPart):
    """Seed option A / JiT: axial 2D RoPE on q and k (EVA-02 ``VisionRotaryEmbeddingFast`` layout).

    Half of each head's interleaved pairs turn with the row, half with the column. In-context
    tokens sit at (0, 0) (not rotated), condition tokens at the aligned centres of docs/ops.md.

    The training sequence's coordinates and (for ``pos_impl="torch"``) its cos/sin tables are
    non-persistent buffers covering ``[in-context | image | condition]``; a sequence without the
    in-context tokens uses their tail. They are made again, in float32 (float64 in a float64
    model), whenever the module moves or is cast, so a model cast wholesale to bf16 keeps
    float32 angles (docs/ops.md) and both implementations see the same frequencies.
    """

    rotary = True
    head_dim_multiple = 4

    def __init__(self, geom: PosEncGeometry, impl: str):
        super().__init__(geom, impl)
        self.head_dim, self.theta = geom.head_dim, geom.theta
        self.train_layout = SeqLayout(geom.grid, geom.cond_grid, geom.context_len, geom.grid, geom.cond_grid)
        self._make_tables(torch.float32, None)

    def _make_tables(self, dtype: torch.dtype, device) -> None:
        self.register_buffer(
            "freqs", axial_freqs(self.head_dim, self.theta, dtype=dtype, device=device), persistent=False
        )
        self._make_coords(dtype, device)
        if self.impl == "torch":
            cos, sin = rope_cos_sin(self.coords, self.freqs, dtype)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def _make_coords(self, dtype: torch.dtype, device) -> None:
        coords = self.train_layout.coords(self.train_layout.prefix, device=device).to(dtype)
        self.register_buffer("coords", coords, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        c = self.coords  # tells where fn moved the module and which dtype it asked for
        self._make_tables(torch.float64 if c.dtype == torch.float64 else torch.float32, c.device)
        return self

    def layer_freqs(self, layer: int) -> Tensor:
        """``[2, D/2]`` (shared) or ``[H, 2, D/2]`` frequencies of attention layer ``layer``."""
        return self.freqs

    def scaled_freqs(self, layer: int, layout: SeqLayout) -> Tensor:
        """:meth:`layer_freqs` for ``layout``'s grid: scaled per axis under ``ntk``/``yarn``
        (:func:`jitrope.rope.scale_freqs`), as they are otherwise (those modes keep integer coordinates)."""
        f = self.layer_freqs(layer)
        if layout.scaling not in FREQ_SCALINGS or layout.grid == layout.train_grid:
            return f
        per_layer = layer if self.freqs.dim() > 2 else None  # RoPE-Mixed: every layer has its own
        return self._derived.get(
            ("freqs", per_layer, layout.grid, layout.train_grid, layout.scaling),
            (self.freqs,),
            lambda: scale_freqs(
                f,
                layout.scale_hw,
                layout.scaling,
                theta=self.theta,
                head_dim=self.head_dim,
                train_grid=layout.train_grid,
            ),
        )

    def packed_freqs(self, layer: int, seqs: PackedSeqs) -> Tensor:
        """:meth:`layer_freqs` for a packed stream: as they are, or under ntk / yarn one table per sequence,
        ``[S, ..., 2, D/2]``, scaled to that sequence's grid as :meth:`scaled_freqs` scales it for the
        image alone (:func:`jitrope.rope.scale_freqs` with the per-sequence scales ``seqs.freq_scale``;
        made in the graph, nothing cached: the grids change every batch). ``seqs.freqs_index`` picks them."""
        f = self.layer_freqs(layer)
        if seqs.freqs_index is None:
            return f
        return scale_freqs(
            f,
            seqs.freq_scale,
            seqs.freq_mode,
            theta=self.theta,
            head_dim=self.head_dim,
            train_grid=self.train_layout.train_grid,
        )

    def attn_factor(self, layout: SeqLayout) -> float:
        """Factor on the attention logits of ``layout`` (YaRN's temperature; 1 unless ``yarn`` on more tokens)."""
        return attn_logit_factor(layout.scale_hw, layout.scaling)

    def _prefix(self, layout: SeqLayout, n_tokens: int) -> int:
        prefix = n_tokens - layout.n_image - layout.n_cond
        if prefix not in (0, layout.prefix):
            raise ValueError(
                f"rope2d: a q/k of {n_tokens} tokens does not fit the sequence layout (image {layout.grid}, "
                f"condition {layout.cond_grid}, in-context {layout.prefix})"
            )
        return prefix

    def _at_train(self, layout: SeqLayout) -> bool:
        return layout.at_train_size and layout.prefix == self.train_layout.prefix

    def _coords(self, layout: SeqLayout, prefix: int, device) -> Tensor:
        if self._at_train(layout):
            return self.coords[layout.prefix - prefix :]
        return self._derived.get(("coords", layout, prefix, device), (), lambda: layout.coords(prefix, device=device))

    def _cos_sin(self, layout: SeqLayout, prefix: int, layer: int, qk: Tensor) -> Tuple[Tensor, Tensor]:
        acc = compute_dtype(qk)
        if self._at_train(layout) and self.cos.dtype == acc:
            start = layout.prefix - prefix
            return self.cos[:, start:], self.sin[:, start:]
        freqs = self.scaled_freqs(layer, layout)
        return self._derived.get(
            ("cos_sin", layout, prefix, qk.device, acc),
            (self.freqs,),
            lambda: rope_cos_sin(self._coords(layout, prefix, qk.device), freqs, acc),
        )

    def qk_norm_rope(self, qk: Tensor, weight: Tensor, layer: int, layout: SeqLayout, eps: float) -> Tensor:
        if isinstance(layout, PackedSeqs):
            # Per-token coordinates (and under ntk / yarn per-sequence frequency tables) of a packed stream:
            # nothing to cache, positions change every batch.
            freqs, index = self.packed_freqs(layer, layout), layout.freqs_index
            if self.impl == "fused":
                return qk_norm_rope_fused(qk, weight, layout.coords, freqs, eps, index)
            cos_sin = rope_cos_sin(layout.coords, freqs, compute_dtype(qk), freqs_index=index)
            return qk_norm_rope_tables(qk, weight, cos_sin, eps)
        prefix = self._prefix(layout, qk.shape[-2])
        if self.impl == "fused":
            coords = self._coords(layout, prefix, qk.device)
            return qk_norm_rope_fused(qk, weight, coords, self.scaled_freqs(layer, layout), eps)
        return qk_norm_rope_tables(qk, weight, self._cos_sin(layout, prefix, layer, qk), eps)


class Rope2DMixed(Rope2D):
    """RoPE-Mixed (Heo et al. 2024): learned frequencies per layer and head, ``[depth, H, 2, D/2]``.

    Initialised from the axial frequencies with the (row, column) directions of each head turned
    by a random angle (the paper's init), so pairs can mix both axes; trained through the op's
    gradient to ``freqs``. The torch path makes each layer's cos/sin in that layer's call while the
    frequencies train, and keeps them across calls when they do not (sampling).
    """

    def __init__(self, geom: PosEncGeometry, impl: str):
        PosPart.__init__(self, geom, impl)  # not Rope2D's: here ``freqs`` is a parameter, not a buffer
        self.head_dim, self.theta = geom.head_dim, geom.theta
        self.train_layout = SeqLayout(geom.grid, geom.cond_grid, geom.context_len, geom.grid, geom.cond_grid)
        base = axial_freqs(geom.head_dim, geom.theta)  # [2, D/2]: (row coef, column coef) per pair
        f = base[0] + base[1]  # each pair's magnitude
        quarter = geom.head_dim // 4
        angle = torch.rand(geom.depth, geom.num_heads, 1) * (2 * math.pi)
        cos, sin = angle.cos(), angle.sin()
        # Row pairs point along (cos a, sin a) in (row, column); column pairs along (-sin a, cos a).
        is_row = torch.arange(geom.head_dim // 2) < quarter
        row_coef = torch.where(is_row, f * cos, -f * sin)
        col_coef = torch.where(is_row, f * sin, f * cos)
        self.freqs = nn.Parameter(torch.stack((row_coef, col_coef), dim=2))
        self._make_coords(torch.float32, None)

    def _apply(self, fn, recurse=True):
        PosPart._apply(self, fn, recurse)
        c = self.coords
        self._make_coords(torch.float64 if c.dtype == torch.float64 else torch.float32, c.device)
        return self

    def layer_freqs(self, layer: int) -> Tensor:
        # Angles are float32 at least (docs/ops.md), even in a model cast wholesale to bf16/fp16.
        f = self.freqs[layer]
        return f if f.dtype in (torch.float32, torch.float64) else f.float()

    def _cos_sin(self, layout: SeqLayout, prefix: int, layer: int, qk: Tensor) -> Tuple[Tensor, Tensor]:
        acc = compute_dtype(qk)
        return self._derived.get(
            ("cos_sin", layer, layout, prefix, qk.device, acc),
            (self.freqs,),
            lambda: rope_cos_sin(self._coords(layout, prefix, qk.device), self.scaled_freqs(layer, layout), acc),
        )


PARTS: Dict[str, Type[PosPart]] = {
    "learned1d": Learned1D,
    "sincos2d": SinCos2D,
    "factorized2d": Factorized2D,
    "rope2d": Rope2D,
    "rope2d_mixed": Rope2DMixed,
}

# pos_embed value -> the parts it is made of (docs/training.md).
POS_EMBEDS: Dict[str, Tuple[str, ...]] = {
    "learned1d": ("learned1d",),
    "sincos2d": ("sincos2d",),
    "factorized2d": ("factorized2d",),
    "rope2d": ("rope2d",),
    "rope2d_mixed": ("rope2d_mixed",),
    "sincos2d+rope2d": ("sincos2d", "rope2d"),
}


def check_pos_embed(name: str, *, width: int, num_heads: int) -> None:
    """Raise ``ValueError`` naming the config field when ``name`` cannot work with these shapes."""
    if name not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {list(POS_EMBEDS)}, got {name!r}")
    for part in POS_EMBEDS[name]:
        cls = PARTS[part]
        head_dim = width // num_heads
        if head_dim % cls.head_dim_multiple:
            raise ValueError(
                f"pos_embed={name!r} needs hidden_size / num_heads (head_dim) to be a multiple of "
                f"{cls.head_dim_multiple}, got hidden_size={width}, num_heads={num_heads} (head_dim={head_dim})"
            )
        if width % cls.width_multiple:
            raise ValueError(
                f"pos_embed={name!r} needs hidden_size to be a multiple of {cls.width_multiple}, got {width}"
            )


class PositionalEncoding(nn.Module):
    """A ``pos_embed`` value: its parts, applied in order (additive) / delegated to (rotary).

    ``impl`` is the op implementation that actually runs (:func:`resolve_impl`); nothing outside
    the encoding needs to know it.
    """

    def __init__(self, name: str, geom: PosEncGeometry, impl: str = "fused"):
        super().__init__()
        check_pos_embed(name, width=geom.width, num_heads=geom.num_heads)
        self.name = name
        self.geom = geom
        self.impl = resolve_impl(impl)
        self.parts = nn.ModuleDict({p: PARTS[p](geom, self.impl) for p in POS_EMBEDS[name]})
        rotary = [p for p, m in self.parts.items() if m.rotary]
        if len(rotary) > 1:
            raise ValueError(f"pos_embed={name!r} combines more than one rotary encoding: {rotary}")
        # A name, not the module: a second attribute would register the part twice.
        self._rotary: Optional[str] = rotary[0] if rotary else None

    @property
    def rotary(self) -> Optional[PosPart]:
        """The rotary part (``Rope2D``/``Rope2DMixed``), or None."""
        return None if self._rotary is None else self.parts[self._rotary]

    def add(self, x: Tensor, layout: SeqLayout) -> Tensor:
        """Additive encodings of ``x: [B, n_image + n_cond, D]`` (before in-context tokens), or of a packed
        input stream ``[1, T_in, D]`` with its :class:`PackedLayout`."""
        for part in self.parts.values():
            x = part.add(x, layout)
        return x

    def check_packed(self, layout: PackedLayout) -> None:
        """Raise ``ValueError`` naming the encoding when it cannot place ``layout``'s grids."""
        for part in self.parts.values():
            part.check_packed(layout)

    def qk_norm_rope(self, qk: Tensor, weight: Tensor, layer: int, layout: SeqLayout, *, eps: float = 1e-6) -> Tensor:
        """q/k of attention layer ``layer``: RMSNorm over head_dim, then the rotary encoding, if any.

        ``qk: [2, B, H, N, D]`` may be any strided view (that of the qkv projection is read in
        place); ``weight: [2, D]`` scales q (row 0) and k (row 1); ``N`` is ``layout``'s sequence with
        or without its in-context tokens, or ``layout`` is the :class:`PackedSeqs` of a packed stream
        (``B = 1``, ``N = T``). Returns a new ``[2, B, H, N, D]`` tensor in ``qk``'s dtype.
        """
        rotary = self.rotary
        if rotary is not None:
            return rotary.qk_norm_rope(qk, weight, layer, layout, eps)
        if self.impl == "fused":
            return qk_norm_rope_fused(qk, weight, None, None, eps)
        return qk_norm_rope_tables(qk, weight, None, eps)

    def attn_scale(self, layout: SeqLayout, head_dim: int) -> Optional[float]:
        """The ``scale=`` of attention for ``layout``: None (SDPA's ``1/sqrt(head_dim)``) unless the rotary
        part tempers the logits (YaRN on a larger grid), then that factor times ``1/sqrt(head_dim)``."""
        rotary = self.rotary
        factor = 1.0 if rotary is None else rotary.attn_factor(layout)
        return None if factor == 1.0 else factor / math.sqrt(head_dim)

    def packed_attn_factor(self, seqs: PackedSeqs) -> Optional[Tensor]:
        """What :meth:`attn_scale` is for a packed stream, per token: ``[T]`` float64, the factor on the logits
        of each token's queries (YaRN's temperature of its sequence's grid), or None when every factor is 1
        or the encoding has no rotary part (the tables have no temperature)."""
        return None if self.rotary is None else seqs.attn_factor

    def extra_repr(self) -> str:
        return f"name={self.name!r}, impl={self.impl!r}"


def build_pos_encoding(name: str, geom: PosEncGeometry, impl: str = "fused") -> PositionalEncoding:
    return PositionalEncoding(name, geom, impl)
