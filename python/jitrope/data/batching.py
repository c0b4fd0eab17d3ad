"""Batches: a resumable, sharded stream of indices and the maker of (image, label, condition)
batches from an :class:`ImageSet`."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from .imageset import ImageSet, resize_images, to_float


class IndexStream:
    """Deterministic, resumable stream of global batches of indices, sharded over ranks.

    Epoch e is ``randperm(n)`` from a generator seeded with ``(seed, e)``; a global batch is the next
    ``batch_size`` positions (running on into the next epoch), and rank r takes every
    ``world``-th of them from position r. The global batch is thus the same for any world size.
    State: ``(epoch, pos)``.
    """

    def __init__(self, n: int, seed: int, *, rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("IndexStream: empty data set")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.pos = 0, 0
        self._perm: Optional[Tensor] = None

    def _permutation(self) -> Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g)
        return self._perm

    def next_global(self, batch_size: int) -> Tensor:
        out = []
        need = batch_size
        while need:
            perm = self._permutation()
            take = min(need, self.n - self.pos)
            out.append(perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
            if self.pos == self.n:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return torch.cat(out)

    def next(self, batch_size: int) -> Tensor:
        """This rank's share of the next global batch of ``batch_size``."""
        if batch_size % self.world:
            raise ValueError(f"batch size {batch_size} is not divisible by the world size {self.world}")
        return self.next_global(batch_size)[self.rank :: self.world]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n or int(state["seed"]) != self.seed:
            raise ValueError(
                f"data order state is for n={state['n']}, seed={state['seed']}; "
                f"this run has n={self.n}, seed={self.seed}"
            )
        self.epoch, self.pos, self._perm = int(state["epoch"]), int(state["pos"]), None


def vendor_partners(ds: ImageSet):
    """``(partners, n_partners)``: ``partners[i]`` holds up to ``len(domains)`` indices of the same group
    as item i, the other domains first (-1 pads), ``n_partners[i]`` how many (the item itself when alone)."""
    order = torch.argsort(ds.groups, stable=True)
    gs = ds.groups[order].tolist()
    by_group: Dict[int, List[int]] = {}
    for i, g_ in zip(order.tolist(), gs):
        by_group.setdefault(g_, []).append(i)
    width = max(len(v) for v in by_group.values())
    partners = torch.full((len(ds), width), -1, dtype=torch.long)
    for members in by_group.values():
        for i in members:
            others = [j for j in members if j != i] or [i]
            partners[i, : len(others)] = torch.tensor(others)
    return partners, (partners >= 0).sum(1)


class BatchMaker:
    """Turns indices into float batches: ``x`` in [-1, 1], labels, and the condition image.

    ``cond``: "none", "downsample" (the same image at ``cond_size``) or "other_vendor" (the same
    emoji from another vendor when there is one, else the same image, at ``cond_size``).
    """

    def __init__(
        self, ds: ImageSet, *, cond: str = "none", cond_size: Optional[int] = None, hflip: bool = False, device="cpu"
    ):
        if cond not in ("none", "downsample", "other_vendor"):
            raise ValueError(f"data.cond must be none, downsample or other_vendor, got {cond!r}")
        if cond != "none" and not cond_size:
            raise ValueError(f"data.cond={cond} needs model.cond_img_size")
        if cond == "none" and cond_size:
            raise ValueError(
                f"model.cond_img_size={cond_size} needs a condition: set data.cond=downsample or other_vendor"
            )
        self.ds, self.cond, self.hflip, self.device = ds, cond, hflip, torch.device(device)
        self.images = ds.images.to(self.device)
        self.labels = ds.labels.to(self.device)
        self.cond_images = resize_images(ds.images, cond_size).to(self.device) if cond != "none" else None
        if cond == "other_vendor":
            self.partners, self.n_partners = vendor_partners(ds)

    def __call__(self, idx: Tensor, u: Optional[Tensor] = None):
        """Batch of ``idx``; ``u`` ([len(idx), 2] uniforms in [0, 1)) picks the condition vendor and
        the flips (drawn here when not given)."""
        if u is None:
            u = torch.rand(len(idx), 2)
        x = to_float(self.images[idx.to(self.device)])
        y = self.labels[idx.to(self.device)]
        cond = None
        if self.cond == "downsample":
            cond = to_float(self.cond_images[idx.to(self.device)])
        elif self.cond == "other_vendor":
            k = (u[:, 0] * self.n_partners[idx]).long().clamp_max(self.n_partners[idx] - 1)
            j = self.partners[idx, k]
            cond = to_float(self.cond_images[j.to(self.device)])
        if self.hflip:
            flip = (u[:, 1] < 0.5).to(self.device)[:, None, None, None]
            x = torch.where(flip, x.flip(-1), x)
            if cond is not None:
                cond = torch.where(flip, cond.flip(-1), cond)
        return x, y, cond
