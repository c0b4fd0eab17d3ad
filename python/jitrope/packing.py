"""Packed batches: images of different sizes in one token stream (docs/ops.md).

A packed batch of S samples concatenates, in sample order, one sequence per sample
``[in-context (L) | image (gh*gw) | condition (ch*cw)]`` into T tokens. Attention is block-diagonal
over ``cu_seqlens`` (:func:`jitrope.attention.varlen_attention`), every token carries its own 2D
position, and adaLN reads the conditioning vector of the token's sequence.

:class:`PackedLayout` describes such a batch. It is built once per batch on the host
(:meth:`PackedLayout.build`, or :meth:`jitrope.model.JiT.packed_layout` from pixel sizes), holds
only index tensors and the per-sample grids, and moves to the device with ``.to(device)``. The
model reads only its tensors (and no Python value that changes from batch to batch), so a compiled
step traces once: :func:`mark_dynamic` marks every per-token and per-sample dimension dynamic.

Images travel as *pixel tokens*: :func:`patchify` turns ``[C, H, W]`` into ``[gh*gw, p*p*C]``
(row-major tokens, channels last within a patch: the order of the model's final layer), the
packed batch is their concatenation ``[T_img, p*p*C]``, and :func:`unpack_images` undoes both.
The diffusion loss and the samplers work on these tokens directly (every pixel once).

Two token streams exist because the in-context tokens join at block ``in_context_start``:
``seqs_in`` is ``[image | condition]`` per sample (what the additive encodings and the first blocks
see), ``seqs`` is ``[in-context | image | condition]``. With ``context_len = 0`` they are one.

Every ``pos_scaling`` mode (:data:`jitrope.rope.SCALING_MODES`) places each sample as the batched path
places that image alone. ``extrapolate`` / ``interpolate`` live in the coordinates and tables. ``ntk`` /
``yarn`` scale RoPE *frequencies* per image grid: each stream carries one frequency table per sequence
(``freq_scale [S, 2]``, the per-axis ratio of the sample's grid to the training grid, from which the model
scales its frequencies with :func:`jitrope.rope.scale_freqs` in the graph), the per-token ``freqs_index``
into them (the token's sample, in-context and condition tokens included, as the batched path turns a
whole sequence with one image's frequencies), and under ``yarn`` the per-token factor on the attention
logits (:func:`jitrope.rope.attn_logit_factor` of the token's sample; None when every factor is 1).
Tables interpolate under ``ntk`` / ``yarn`` (``table_scaling``), as in the batched path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .rope import FREQ_SCALINGS, SCALING_MODES, attn_logit_factor, sequence_coords

__all__ = [
    "PackedSeqs",
    "PackedLayout",
    "patchify",
    "unpatchify",
    "pack_images",
    "unpack_images",
    "mark_dynamic",
    "check_cu_seqlens",
]

Grid = Tuple[int, int]


class PackedSeqs(NamedTuple):
    """One packed token stream as attention, RoPE and adaLN see it (a NamedTuple: plain to torch.compile).

    ``cu_seqlens``: int32 ``[S+1]``, 0 first, T last (the flash-attn / ``torch.nn.attention.varlen``
    convention); ``max_seqlen``: the longest sequence; ``seq_id``: int64 ``[T]``, the sample of each
    token; ``coords``: float32 ``[T, 2]`` (row, column) of docs/ops.md (in-context tokens (0, 0), image
    tokens (i, j) of their own grid, condition tokens at the aligned centres of their image's grid).

    Frequency scaling (``pos_scaling`` ntk / yarn; all None otherwise): ``freq_mode`` the mode,
    ``freq_scale`` float64 ``[S, 2]`` each sample's (rows, columns) scale to the training grid (one RoPE
    frequency table per sequence), ``freqs_index`` int64 ``[T]`` the table of each token (its sample: the
    same tensor as ``seq_id``), ``attn_factor`` float64 ``[T]`` YaRN's factor on the logits of each
    token's queries (None when every factor is 1).
    """

    cu_seqlens: Tensor
    max_seqlen: int
    seq_id: Tensor
    coords: Tensor
    freqs_index: Optional[Tensor] = None
    freq_scale: Optional[Tensor] = None
    freq_mode: Optional[str] = None
    attn_factor: Optional[Tensor] = None

    def tensors(self) -> List[Tensor]:
        """Every tensor of the stream (dim 0: tokens or samples)."""
        opt = (self.freqs_index, self.freq_scale, self.attn_factor)
        return [self.cu_seqlens, self.seq_id, self.coords] + [t for t in opt if t is not None]

    def to(self, device) -> PackedSeqs:
        def move(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(device)

        seq_id = self.seq_id.to(device)
        return self._replace(
            cu_seqlens=self.cu_seqlens.to(device),
            seq_id=seq_id,
            coords=self.coords.to(device),
            freqs_index=seq_id if self.freqs_index is self.seq_id else move(self.freqs_index),
            freq_scale=move(self.freq_scale),
            attn_factor=move(self.attn_factor),
        )


def check_cu_seqlens(cu_seqlens: Tensor, total: int, *, name: str = "cu_seqlens") -> None:
    """Raise ``ValueError`` naming ``name`` unless it is int32 ``[S+1]``, S >= 1, starting at 0, strictly
    increasing and ending at ``total`` (host-side check: it reads the values)."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor) else type(cu_seqlens)
        raise ValueError(f"{name} must be an int32 [S+1] tensor, got {got}")
    if cu_seqlens.numel() < 2:
        raise ValueError(
            f"{name} must hold at least one sequence ([S+1] with S >= 1), got {cu_seqlens.numel()} entries"
        )
    v = cu_seqlens.tolist()
    if v[0] != 0:
        raise ValueError(f"{name} must start at 0, got {v[0]}")
    bad = [i for i in range(1, len(v)) if v[i] <= v[i - 1]]
    if bad:
        i = bad[0]
        raise ValueError(f"{name} must be strictly increasing (no empty sequence), got {v[i - 1]} then {v[i]} at [{i}]")
    if v[-1] != total:
        raise ValueError(f"{name} must end at the token count T = {total}, got {v[-1]}")


def _seqs(
    lengths: Sequence[int],
    coords: Tensor,
    freq_mode: Optional[str] = None,
    freq_scale: Optional[Tensor] = None,
    seq_factor: Optional[Tensor] = None,
) -> PackedSeqs:
    n = torch.tensor(list(lengths), dtype=torch.int64)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = n.cumsum(0).to(torch.int32)
    seq_id = torch.repeat_interleave(torch.arange(len(lengths)), n)
    if freq_mode is None:
        return PackedSeqs(cu, int(max(lengths)), seq_id, coords)
    factor = None if seq_factor is None else seq_factor[seq_id]
    return PackedSeqs(cu, int(max(lengths)), seq_id, coords, seq_id, freq_scale, freq_mode, factor)


@dataclass(frozen=True, eq=False)
class PackedLayout:
    """Geometry and index tensors of one packed batch (docs/ops.md). Build with :meth:`build`.

    Per sample: ``img_grids[s] = (gh, gw)`` (any aspect), ``cond_grids[s]`` (None = no condition
    tokens), the same ``context_len`` in-context tokens. Tensors (all on one device):

    * ``seqs`` / ``seqs_in``: the streams with / without the in-context tokens (:class:`PackedSeqs`);
    * ``rows``, ``cols``: int64 ``[T_in]``, each input-stream token's entry in the factorized2d row and
      column tables. The tables are concatenated as ``[image table (max_h), a resampled table per grid
      of image_tables, condition table (max_ch), one per grid of cond_tables]`` (same for columns);
      -1 = no entry;
    * ``slots``: int64 ``[T_in]``, the entry of learned1d's table ``[its training slots (image, then
      condition), a resampled image table per grid of image_tables, one condition table per grid of
      cond_tables]``;
    * ``in_gather``: int64 ``[T_in]``: where each input-stream token comes from in
      ``cat(image tokens [T_img], condition tokens [T_cond])`` (each in sample order);
    * ``ctx_gather``: int64 ``[T]``: where each full-stream token comes from in
      ``cat(in-context tokens [S*L], input stream [T_in])``;
    * ``image_index``: int64 ``[T_img]``, image tokens' positions in the full stream (unpacking);
    * ``image_seq_id`` ``[T_img]``, ``cond_seq_id`` ``[T_cond]``: the sample of each image / condition
      token; ``image_tokens``: int64 ``[S]``, image tokens per sample (resolution-aware diffusion).

    * ``table_coords``: float32 ``[T_in, 2]``, the input stream's coordinates as the sin-cos table places
      them: ``seqs_in.coords``, except under ntk / yarn, where RoPE keeps integer coordinates (and scales
      its frequencies: :class:`PackedSeqs`) while the tables interpolate.

    ``image_tables`` / ``cond_tables`` name the grids that get tables resampled from the trained
    ones (with ``table_scaling == "interpolate"``, grids other than the training grid, in order of first
    appearance); with ``"extrapolate"`` they are empty and rows/cols/slots index the tables as trained.
    """

    img_grids: Tuple[Grid, ...]
    cond_grids: Tuple[Optional[Grid], ...]
    context_len: int
    scaling: str
    train_grid: Grid
    train_cond_grid: Optional[Grid]
    max_grid: Grid
    max_cond_grid: Optional[Grid]
    image_tables: Tuple[Grid, ...]
    cond_tables: Tuple[Grid, ...]
    seqs: PackedSeqs
    seqs_in: PackedSeqs
    rows: Tensor
    cols: Tensor
    slots: Tensor
    in_gather: Tensor
    ctx_gather: Tensor
    image_index: Tensor
    image_seq_id: Tensor
    cond_seq_id: Tensor
    image_tokens: Tensor
    table_coords: Tensor
    _derived: Dict[object, PackedLayout] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ sizes (host values)
    @property
    def num_samples(self) -> int:
        return len(self.img_grids)

    @property
    def n_image(self) -> int:
        return sum(gh * gw for gh, gw in self.img_grids)

    @property
    def n_cond(self) -> int:
        return sum(0 if g is None else g[0] * g[1] for g in self.cond_grids)

    @property
    def n_tokens(self) -> int:
        """T: tokens of the full stream (with the in-context tokens)."""
        return self.seqs.seq_id.shape[0]

    @property
    def device(self) -> torch.device:
        return self.image_index.device

    @property
    def table_scaling(self) -> str:
        """How the tables place other grids: ntk / yarn scale RoPE frequencies, tables interpolate under them
        (``SeqLayout.table_scaling`` of the batched path)."""
        return "interpolate" if self.scaling in FREQ_SCALINGS else self.scaling

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        img_grids: Sequence[Grid],
        cond_grids: Optional[Sequence[Optional[Grid]]] = None,
        *,
        context_len: int = 0,
        scaling: str = "extrapolate",
        train_grid: Optional[Grid] = None,
        train_cond_grid: Optional[Grid] = None,
        max_grid: Optional[Grid] = None,
        max_cond_grid: Optional[Grid] = None,
        device=None,
    ) -> PackedLayout:
        """The layout of samples with token grids ``img_grids`` (and ``cond_grids``), on ``device``.

        ``train_grid``/``train_cond_grid``: the grids the model was trained on (default: the first
        sample's), used by ``scaling="interpolate"`` (coordinates laid onto the training range, tables
        resampled) and by learned1d's slots; ``max_grid``/``max_cond_grid``: the factorized2d table
        sizes (default: the largest grids). ``scaling="ntk"|"yarn"`` (relative to ``train_grid``) gives each
        stream its per-sequence frequency scales (:class:`PackedSeqs`). Errors name the argument.
        """
        b = _Batch.plan(
            img_grids, cond_grids, context_len, scaling, train_grid, train_cond_grid, max_grid, max_cond_grid
        )
        L, S = context_len, len(b.img_grids)
        parts, lens, lens_in = _sequences(b)
        seqs, seqs_in = _streams(lens, lens_in, torch.cat([p.coords for p in parts]), L, *_freq_tables(b))

        def cat(name: str) -> Tensor:  # the samples' parts of one per-token tensor, in sample order
            return torch.cat([getattr(p, name) for p in parts])

        counts = torch.tensor(b.img_counts, dtype=torch.int64)
        layout = cls(
            img_grids=b.img_grids,
            cond_grids=b.cond_grids,
            context_len=L,
            scaling=scaling,
            train_grid=b.train_grid,
            train_cond_grid=b.train_cond_grid,
            max_grid=b.max_grid,
            max_cond_grid=b.max_cond_grid,
            image_tables=b.image_tables,
            cond_tables=b.cond_tables,
            seqs=seqs,
            seqs_in=seqs_in,
            rows=cat("rows"),
            cols=cat("cols"),
            slots=cat("slots"),
            in_gather=cat("in_gather"),
            ctx_gather=cat("ctx_gather"),
            image_index=cat("image_index"),
            image_seq_id=torch.repeat_interleave(torch.arange(S), counts),
            cond_seq_id=torch.repeat_interleave(torch.arange(S), torch.tensor(b.cond_counts, dtype=torch.int64)),
            image_tokens=counts,
            table_coords=cat("table_coords") if scaling in FREQ_SCALINGS else seqs_in.coords,
        )
        return layout if device is None else layout.to(device)

    def _tensors(self) -> Dict[str, object]:
        names = (
            "seqs",
            "seqs_in",
            "rows",
            "cols",
            "slots",
            "in_gather",
            "ctx_gather",
            "image_index",
            "image_seq_id",
            "cond_seq_id",
            "image_tokens",
            "table_coords",
        )
        return {n: getattr(self, n) for n in names}

    def to(self, device) -> PackedLayout:
        """The same layout with its tensors on ``device``."""
        moved = {n: v.to(device) for n, v in self._tensors().items()}
        if self.seqs_in is self.seqs:
            moved["seqs_in"] = moved["seqs"]
        if self.table_coords is self.seqs_in.coords:
            moved["table_coords"] = moved["seqs_in"].coords
        return dataclasses.replace(self, **moved, _derived={})

    def repeat(self, n: int) -> PackedLayout:
        """The layout of the batch written ``n`` times in a row (samples ``s + k*S``): classifier-free
        guidance runs the conditional and the unconditional batch as one. Kept on the layout."""
        key = ("repeat", n)
        if key not in self._derived:
            self._derived[key] = PackedLayout.build(
                self.img_grids * n,
                self.cond_grids * n,
                context_len=self.context_len,
                scaling=self.scaling,
                train_grid=self.train_grid,
                train_cond_grid=self.train_cond_grid,
                max_grid=self.max_grid,
                max_cond_grid=self.max_cond_grid,
                device=self.device,
            )
        return self._derived[key]

    def split_images(self, tokens: Tensor) -> List[Tensor]:
        """``[T_img, ...]`` image-token rows -> one ``[gh*gw, ...]`` chunk per sample."""
        if tokens.shape[0] != self.n_image:
            raise ValueError(
                f"tokens must have the layout's {self.n_image} image tokens in dim 0, got {tuple(tokens.shape)}"
            )
        return list(tokens.split([gh * gw for gh, gw in self.img_grids]))


class _Offsets(NamedTuple):
    """Where each resampled table starts in the concatenated row / column / slot tables of a batch
    (:class:`PackedLayout`), by ``("image" | "cond", grid)``; ``cond_base``: the (row, column) start of the
    trained condition table."""

    row: Dict[Tuple[str, Grid], int]
    col: Dict[Tuple[str, Grid], int]
    slot: Dict[Tuple[str, Grid], int]
    cond_base: Tuple[int, int]


class _Batch(NamedTuple):
    """The batch-wide geometry of :meth:`PackedLayout.build`, its arguments checked and defaults filled in."""

    img_grids: Tuple[Grid, ...]
    cond_grids: Tuple[Optional[Grid], ...]
    context_len: int
    scaling: str
    train_grid: Grid
    train_cond_grid: Optional[Grid]
    max_grid: Grid
    max_cond_grid: Optional[Grid]
    image_tables: Tuple[Grid, ...]
    cond_tables: Tuple[Grid, ...]
    offsets: _Offsets

    @property
    def img_counts(self) -> List[int]:
        return [gh * gw for gh, gw in self.img_grids]

    @property
    def cond_counts(self) -> List[int]:
        return [0 if g is None else g[0] * g[1] for g in self.cond_grids]

    @classmethod
    def plan(cls, img_grids, cond_grids, context_len, scaling, train_grid, train_cond_grid, max_grid, max_cond_grid):
        if scaling not in SCALING_MODES:
            raise ValueError(
                f"scaling (pos_scaling) of a packed batch must be one of {list(SCALING_MODES)}, got {scaling!r}"
            )
        img_grids = tuple(_grid(g, f"img_grids[{s}]") for s, g in enumerate(img_grids))
        S = len(img_grids)
        if S == 0:
            raise ValueError("img_grids is empty: a packed batch needs at least one image")
        if cond_grids is None:
            cond_grids = (None,) * S
        if len(cond_grids) != S:
            raise ValueError(f"cond_grids must have one entry per image (S = {S}), got {len(cond_grids)}")
        cond_grids = tuple(None if g is None else _grid(g, f"cond_grids[{s}]") for s, g in enumerate(cond_grids))
        if not (isinstance(context_len, int) and context_len >= 0):
            raise ValueError(f"context_len must be an integer >= 0, got {context_len!r}")
        train_grid = _grid(train_grid or img_grids[0], "train_grid")
        present = [g for g in cond_grids if g is not None]
        if train_cond_grid is None and present:
            train_cond_grid = present[0]
        train_cond_grid = None if train_cond_grid is None else _grid(train_cond_grid, "train_cond_grid")
        max_grid = _grid(max_grid or tuple(max(g[a] for g in img_grids) for a in (0, 1)), "max_grid")
        if max_cond_grid is None and present:
            max_cond_grid = tuple(max(g[a] for g in present) for a in (0, 1))
        max_cond_grid = None if max_cond_grid is None else _grid(max_cond_grid, "max_cond_grid")
        if present and train_cond_grid is None:
            raise ValueError("cond_grids has condition grids but train_cond_grid is None")
        # tables resampled to the other grids: interpolate, and ntk / yarn as in the batched path
        tables_interp = scaling == "interpolate" or scaling in FREQ_SCALINGS
        image_tables = _distinct(g for g in img_grids if tables_interp and g != train_grid)
        cond_tables = _distinct(g for g in present if tables_interp and g != train_cond_grid)
        offsets = _table_offsets(image_tables, cond_tables, train_grid, train_cond_grid, max_grid, max_cond_grid)
        return cls(
            img_grids,
            cond_grids,
            context_len,
            scaling,
            train_grid,
            train_cond_grid,
            max_grid,
            max_cond_grid,
            image_tables,
            cond_tables,
            offsets,
        )


def _table_offsets(image_tables, cond_tables, train_grid, train_cond_grid, max_grid, max_cond_grid) -> _Offsets:
    """The offsets of each table block: ``[image table (max_grid), one per grid of image_tables, condition
    table (max_cond_grid), one per grid of cond_tables]``; slots after the trained ones (image, condition)."""
    row: Dict[Tuple[str, Grid], int] = {}
    col: Dict[Tuple[str, Grid], int] = {}
    slot: Dict[Tuple[str, Grid], int] = {}
    n_train_cond = 0 if train_cond_grid is None else train_cond_grid[0] * train_cond_grid[1]
    r, c, k = max_grid[0], max_grid[1], train_grid[0] * train_grid[1] + n_train_cond
    for g in image_tables:
        row["image", g], col["image", g], slot["image", g] = r, c, k
        r, c, k = r + g[0], c + g[1], k + g[0] * g[1]
    cond_base = (r, c)
    if max_cond_grid is not None:
        r, c = r + max_cond_grid[0], c + max_cond_grid[1]
    for g in cond_tables:
        row["cond", g], col["cond", g], slot["cond", g] = r, c, k
        r, c, k = r + g[0], c + g[1], k + g[0] * g[1]
    return _Offsets(row, col, slot, cond_base)


class _Sequence(NamedTuple):
    """One sample's part of each per-token tensor of a :class:`PackedLayout`."""

    coords: Tensor
    table_coords: Optional[Tensor]
    rows: Tensor
    cols: Tensor
    slots: Tensor
    in_gather: Tensor
    ctx_gather: Tensor
    image_index: Tensor


def _sequences(b: _Batch) -> Tuple[List[_Sequence], List[int], List[int]]:
    """Every sample's :func:`_sequence`, and the lengths of the sequences with and without the in-context
    tokens."""
    img_counts, cond_counts = b.img_counts, b.cond_counts
    lens_in = [i + c for i, c in zip(img_counts, cond_counts)]
    lens = [b.context_len + n for n in lens_in]
    # condition tokens gather from after every image token: cat(image tokens, condition tokens)
    cond_starts = [sum(img_counts) + o for o in _starts(cond_counts)]
    starts = zip(_starts(img_counts), cond_starts, _starts(lens_in), _starts(lens))
    return [_sequence(b, s, start) for s, start in enumerate(starts)], lens, lens_in


def _sequence(b: _Batch, s: int, start: Tuple[int, int, int, int]) -> _Sequence:
    """Sample ``s``'s tokens: ``[in-context | image | condition]``. ``start``: where its image tokens and
    its condition tokens start in ``cat(image tokens, condition tokens)``, and its sequence in the input
    and the full stream."""
    grid, cgrid, L, S = b.img_grids[s], b.cond_grids[s], b.context_len, len(b.img_grids)
    img_off, cond_off, in_off, full_off = start
    n_img = grid[0] * grid[1]
    n_in = n_img + (0 if cgrid is None else cgrid[0] * cgrid[1])
    rows, cols, slots = _entries(grid, ("image", grid), b.offsets, (0, 0), b.train_grid[1], 0)
    in_gather = torch.arange(img_off, img_off + n_img)
    if cgrid is not None:
        n_train = b.train_grid[0] * b.train_grid[1]
        cond = _entries(cgrid, ("cond", cgrid), b.offsets, b.offsets.cond_base, b.train_cond_grid[1], n_train)
        rows, cols, slots = (torch.cat(pair) for pair in zip((rows, cols, slots), cond))
        in_gather = torch.cat((in_gather, torch.arange(cond_off, cond_off + n_in - n_img)))
    return _Sequence(
        coords=sequence_coords(
            grid, prefix=L, cond_grid=cgrid, ref_grid=b.train_grid if b.scaling == "interpolate" else None
        ),
        table_coords=(
            sequence_coords(grid, cond_grid=cgrid, ref_grid=b.train_grid) if b.scaling in FREQ_SCALINGS else None
        ),
        rows=rows,
        cols=cols,
        slots=slots,
        in_gather=in_gather,
        ctx_gather=torch.cat((torch.arange(s * L, (s + 1) * L), torch.arange(S * L + in_off, S * L + in_off + n_in))),
        image_index=torch.arange(full_off + L, full_off + L + n_img),
    )


def _entries(grid: Grid, key, off: _Offsets, base: Tuple[int, int], slot_width: int, slot_base: int):
    """``(rows, cols, slots)`` of a token grid: in its resampled tables when it has some (``key`` in
    ``off``), else in the trained ones (rows and columns from ``base``, slots row-major over
    ``slot_width`` columns from ``slot_base``)."""
    gh, gw = grid
    i = torch.arange(gh).repeat_interleave(gw)
    j = torch.arange(gw).repeat(gh)
    if key in off.row:
        return i + off.row[key], j + off.col[key], i * gw + j + off.slot[key]
    return i + base[0], j + base[1], i * slot_width + j + slot_base


def _starts(counts: Sequence[int]) -> List[int]:
    """Where each of ``counts`` starts when they are laid end to end."""
    out, total = [], 0
    for n in counts:
        out.append(total)
        total += n
    return out


def _freq_tables(b: _Batch) -> Tuple[Optional[str], Optional[Tensor], Optional[Tensor]]:
    """``(freq_mode, freq_scale, seq_factor)`` of the streams: under ntk / yarn each sample's grid ratio to
    the training grid and YaRN's logit factor (None when every factor is 1); all None otherwise."""
    if b.scaling not in FREQ_SCALINGS:
        return None, None, None
    scale_hw = [(gh / b.train_grid[0], gw / b.train_grid[1]) for gh, gw in b.img_grids]  # SeqLayout.scale_hw
    factors = [attn_logit_factor(s_hw, b.scaling) for s_hw in scale_hw]
    # none at all when every factor is 1: the default costs no multiply
    seq_factor = torch.tensor(factors, dtype=torch.float64) if any(f != 1.0 for f in factors) else None
    return b.scaling, torch.tensor(scale_hw, dtype=torch.float64), seq_factor


def _streams(lens, lens_in, coords: Tensor, L: int, freq_mode, freq_scale, seq_factor) -> Tuple[PackedSeqs, PackedSeqs]:
    """The full stream (sequences of ``lens`` tokens, ``coords`` of every token) and the input stream
    without the ``L`` in-context tokens of each sequence (the same stream when L = 0)."""
    seqs = _seqs(lens, coords, freq_mode, freq_scale, seq_factor)
    if L == 0:
        return seqs, seqs
    starts = torch.tensor([0] + lens[:-1]).cumsum(0).tolist()
    keep = torch.cat([torch.arange(o + L, o + n) for o, n in zip(starts, lens)])  # drop in-context rows
    return seqs, _seqs(lens_in, coords[keep], freq_mode, freq_scale, seq_factor)


def _grid(g, name: str) -> Grid:
    try:
        gh, gw = (int(v) for v in g)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (rows, columns) pair of positive integers, got {g!r}") from None
    if gh <= 0 or gw <= 0:
        raise ValueError(f"{name} must be a (rows, columns) pair of positive integers, got {g!r}")
    return (gh, gw)


def _distinct(grids) -> Tuple[Grid, ...]:
    out: List[Grid] = []
    for g in grids:
        if g not in out:
            out.append(g)
    return tuple(out)


# ----------------------------------------------------------------------------------- pixel tokens
def patchify(img: Tensor, patch: int) -> Tensor:
    """``[C, H, W]`` -> ``[gh*gw, p*p*C]``: row-major patches, each ``(row in patch, column, channel)``,
    the order :meth:`jitrope.model.JiT.unpatchify` reads."""
    if img.dim() != 3:
        raise ValueError(f"patchify: image must be [C, H, W], got {tuple(img.shape)}")
    C, H, W = img.shape
    if H % patch or W % patch:
        raise ValueError(f"patchify: image size {H}x{W} is not a multiple of patch_size={patch}")
    gh, gw = H // patch, W // patch
    return img.reshape(C, gh, patch, gw, patch).permute(1, 3, 2, 4, 0).reshape(gh * gw, patch * patch * C)


def unpatchify(tokens: Tensor, grid: Grid, patch: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[gh*gw, p*p*C]`` -> ``[C, gh*p, gw*p]``."""
    gh, gw = grid
    C = tokens.shape[-1] // (patch * patch)
    return tokens.reshape(gh, gw, patch, patch, C).permute(4, 0, 2, 1, 3).reshape(C, gh * patch, gw * patch)


def pack_images(images: Sequence[Tensor], patch: int, *, name: str = "images") -> Tensor:
    """A list of ``[C, H_s, W_s]`` images -> their pixel tokens concatenated, ``[sum gh*gw, p*p*C]``."""
    if len(images) == 0:
        raise ValueError(f"{name} is empty: a packed batch needs at least one image")
    C = images[0].shape[0] if images[0].dim() == 3 else None
    for s, im in enumerate(images):
        if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != C:
            got = tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__
            raise ValueError(f"{name}[{s}] must be a [C={C}, H, W] tensor like {name}[0], got {got}")
        if im.shape[1] % patch or im.shape[2] % patch or im.shape[1] == 0 or im.shape[2] == 0:
            raise ValueError(
                f"{name}[{s}]: size {im.shape[1]}x{im.shape[2]} is not a positive multiple of the patch size {patch}"
            )
    return torch.cat([patchify(im, patch) for im in images])


def unpack_images(tokens: Tensor, layout: PackedLayout, patch: int) -> List[Tensor]:
    """Pixel tokens ``[T_img, p*p*C]`` of a packed batch -> one ``[C, H_s, W_s]`` image per sample."""
    return [unpatchify(chunk, g, patch) for chunk, g in zip(layout.split_images(tokens), layout.img_grids)]


def mark_dynamic(layout: PackedLayout, *tensors: Optional[Tensor]) -> None:
    """Mark dim 0 (tokens or samples) of the layout's tensors and of ``tensors`` dynamic for
    torch.compile, so batches with other size mixes reuse the compiled graph instead of recompiling."""
    parts: List[Tensor] = []
    for v in layout._tensors().values():
        parts.extend(v.tensors() if isinstance(v, PackedSeqs) else [v])
    for t in parts + [t for t in tensors if t is not None]:
        torch._dynamo.maybe_mark_dynamic(t, 0)
