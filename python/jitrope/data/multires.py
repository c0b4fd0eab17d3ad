"""Mixed-size data for packed training (docs/packing.md): image sizes, the token-budget packer, and the maker
of a packed batch's images (emoji resized per sample, placed on white canvases of any aspect ratio).

Sizes are spelt ``HEIGHTxWIDTH`` in pixels (rows first, as everywhere in jitrope: ``32x48`` is 32 rows
by 48 columns, a wide canvas). Every draw (which sizes, where a small emoji sits on a wide canvas,
flips, the condition vendor) comes from the caller's generator, so a batch is a function of
``(seed, step)`` and a resumed run sees the same batches.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .batching import vendor_partners
from .imageset import ImageSet, resize_images, to_float

__all__ = ["parse_size", "parse_sizes", "check_patch_multiple", "TokenPacker", "padding_waste", "MultiResMaker"]

Size = Tuple[int, int]


def parse_size(spec, what: str) -> Size:
    """``"32x48"`` -> ``(32, 48)`` (height, width in pixels); ``ValueError`` naming ``what`` otherwise."""
    text = str(spec).strip().lower()
    parts = text.split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{what}: cannot parse {spec!r} as HEIGHTxWIDTH in pixels (e.g. 32x48)")
    h, w = (int(p) for p in parts)
    if h <= 0 or w <= 0:
        raise ValueError(f"{what}: {spec!r} must have a positive height and width")
    return h, w


def parse_sizes(spec: Union[str, Sequence[str]], what: str) -> List[Size]:
    """``"16x16,32x48"`` or ``["16x16", "32x48"]`` -> ``[(16, 16), (32, 48)]``; an empty list is an error."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if not items or (isinstance(spec, str) and not spec.strip()):
        raise ValueError(f"{what}: no sizes given (e.g. 16x16,32x48)")
    return [parse_size(s, what) for s in items]


def check_patch_multiple(sizes: Sequence[Size], patch: int, what: str) -> None:
    """Every size a multiple of the patch size, or a ``ValueError`` naming the first that is not."""
    for h, w in sizes:
        if h % patch or w % patch:
            raise ValueError(f"{what}: {h}x{w} is not a multiple of the patch size {patch} (model.patch_size)")


def padding_waste(costs: Sequence[int], budget: int) -> float:
    """The unused fraction of the token ``budget`` for a batch of images taking ``costs`` tokens each;
    an empty batch, or one over the budget, is an error."""
    if len(costs) == 0:
        raise ValueError("a packed batch needs at least one image; got an empty batch")
    used = sum(costs)
    if used > budget:
        raise ValueError(f"the batch takes {used} tokens, over the budget train.tokens_per_batch={budget}")
    return (budget - used) / budget


class TokenPacker:
    """Fills a token budget per batch with images of the given sizes (greedy random fill).

    The batch is drawn rather than packed from a given list: every sample is resized to a size we pick,
    so each pick is uniform over the sizes that still fit the rest of the budget, until none fits. The
    unused rest is then below the smallest image's cost (0.6-1.0% of the budget in the training log
    of configs/emoji_multires_cpu.yaml). First-fit or LPFHP would pack a fixed multiset of lengths
    into several bins; here that needs a carry-over queue of unplaced images between steps, i.e. more
    resume state, for no less waste.
    The price: the last picks of a batch lean to the small sizes.

    ``sizes``: ``(h, w)`` pixels; ``costs``: the tokens each takes in the packed stream (image,
    condition and in-context tokens); ``budget``: ``train.tokens_per_batch``. A size over the budget is
    an error naming it.
    """

    def __init__(self, sizes: Sequence[Size], costs: Sequence[int], budget: int):
        if len(sizes) == 0 or len(sizes) != len(costs):
            raise ValueError(f"TokenPacker needs one cost per size, got {len(sizes)} sizes and {len(costs)} costs")
        if not (isinstance(budget, int) and budget >= 1):
            raise ValueError(f"train.tokens_per_batch must be a positive integer, got {budget!r}")
        for (h, w), c in zip(sizes, costs):
            if c > budget:
                raise ValueError(
                    f"image size {h}x{w} takes {c} tokens, over the budget train.tokens_per_batch="
                    f"{budget}: raise the budget or drop the size from data.sizes"
                )
        self.sizes, self.costs, self.budget = list(sizes), [int(c) for c in costs], budget

    def draw(self, generator: torch.Generator) -> List[int]:
        """Indices into ``sizes`` of one batch (at least one image, within the budget)."""
        rest, picks = self.budget, []
        while True:
            fit = [k for k, c in enumerate(self.costs) if c <= rest]
            if not fit:
                return picks
            k = fit[int(torch.randint(len(fit), (1,), generator=generator))]
            picks.append(k)
            rest -= self.costs[k]

    def waste(self, picks: Sequence[int]) -> float:
        """The unused fraction of the budget of the batch ``picks`` (:func:`padding_waste`)."""
        return padding_waste([self.costs[k] for k in picks], self.budget)


class MultiResMaker:
    """Images of a packed batch: ``idx`` (data indices) at ``sizes[picks[s]]`` each.

    The source images (``ds``, square) are resized to the shorter side of each size and placed on a
    white canvas of that size: centred across, at a random offset along the longer side (the offset
    from the caller's uniforms). The condition image (``cond``: "downsample" or "other_vendor", as in
    :class:`~jitrope.data.batching.BatchMaker`) is the canvas of the same (or partner) emoji at the
    same offset, resized to that size's condition size (``cond_sizes``, one per size).
    """

    def __init__(
        self,
        ds: ImageSet,
        sizes: Sequence[Size],
        *,
        cond: str = "none",
        cond_sizes: Optional[Sequence[Size]] = None,
        hflip: bool = False,
        device="cpu",
    ):
        if cond not in ("none", "downsample", "other_vendor"):
            raise ValueError(f"data.cond must be none, downsample or other_vendor, got {cond!r}")
        if (cond != "none") != (cond_sizes is not None):
            raise ValueError("a condition (data.cond) needs one condition size per image size, and only then")
        self.ds, self.sizes, self.cond, self.hflip = ds, list(sizes), cond, hflip
        self.cond_sizes = None if cond_sizes is None else list(cond_sizes)
        self.device = torch.device(device)
        self.labels = ds.labels.to(self.device)
        # one resized copy of the set per short side (a few MB at these sizes): no resize per step
        self.squares = {m: resize_images(ds.images, m).to(self.device) for m in sorted({min(s) for s in self.sizes})}
        if cond == "other_vendor":
            self.partners, self.n_partners = vendor_partners(ds)

    def _canvas(self, i: int, size: Size, u: float) -> Tensor:
        h, w = size
        m = min(h, w)
        img = self.squares[m][i]
        out = torch.full((img.shape[0], h, w), 255, dtype=img.dtype, device=img.device)
        off = min(int(u * (max(h, w) - m + 1)), max(h, w) - m)
        if h > w:
            out[:, off : off + m, :] = img
        else:
            out[:, :, off : off + m] = img
        return out

    def __call__(self, idx: Tensor, picks: Sequence[int], u: Tensor):
        """``(xs, y, conds)``: lists of float ``[C, h, w]`` images in [-1, 1], labels ``[S]``, condition
        images (None without a condition). ``u``: ``[S, 3]`` uniforms (vendor, flip, offset)."""
        if len(idx) != len(picks) or u.shape != (len(picks), 3):
            raise ValueError(f"idx, picks and u must describe the same {len(picks)} samples")
        xs, conds = [], ([] if self.cond != "none" else None)
        for s, (i, k) in enumerate(zip(idx.tolist(), picks)):
            x = self._canvas(i, self.sizes[k], float(u[s, 2]))
            flip = self.hflip and float(u[s, 1]) < 0.5
            if conds is not None:
                j = i
                if self.cond == "other_vendor":
                    n = int(self.n_partners[i])
                    j = int(self.partners[i, min(int(float(u[s, 0]) * n), n - 1)])
                c = _resize(
                    to_float(x if j == i else self._canvas(j, self.sizes[k], float(u[s, 2]))), self.cond_sizes[k]
                )
                conds.append(c.flip(-1) if flip else c)
            x = to_float(x)
            xs.append(x.flip(-1) if flip else x)
        return xs, self.labels[idx.to(self.device)], conds


def _resize(img: Tensor, size: Size) -> Tensor:
    """``[C, H, W]`` float -> ``size``: whole blocks averaged for an integer factor (as
    :func:`resize_images`), antialiased bicubic otherwise."""
    H, W = img.shape[-2:]
    h, w = size
    if (H, W) == (h, w):
        return img
    if H % h == 0 and W % w == 0 and H // h == W // w:
        return F.avg_pool2d(img[None], H // h)[0]
    return F.interpolate(img[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
