"""In-memory image sets and the image conversions every loader shares.

A data set is an :class:`ImageSet` of uint8 ``[N, 3, H, W]`` tensors with labels, groups (the
same subject in several images) and the keys of the fixed held-out split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(RuntimeError):
    """The data is missing, unverifiable or malformed; the message says what to do."""


@dataclass
class ImageSet:
    """An in-memory labelled image set. ``images``: uint8 ``[N, 3, H, W]`` (RGB)."""

    images: Tensor
    labels: Tensor  # long [N], class index
    class_names: List[str]
    groups: Tensor  # long [N]; equal = the same subject (one emoji across vendors)
    domains: Tensor  # long [N]; vendor index (0 for other data)
    domain_names: List[str]
    names: List[str]  # per item, for humans (emoji code points / file name)
    split_keys: List[str] = field(default_factory=list)  # what the held-out hash is taken of

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def img_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, idx) -> ImageSet:
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        il = idx.tolist()
        return ImageSet(
            images=self.images[idx],
            labels=self.labels[idx],
            class_names=list(self.class_names),
            groups=self.groups[idx],
            domains=self.domains[idx],
            domain_names=list(self.domain_names),
            names=[self.names[i] for i in il],
            split_keys=[self.split_keys[i] for i in il] if self.split_keys else [],
        )

    def resized(self, size: int) -> ImageSet:
        if size == self.img_size:
            return self
        out = self.subset(torch.arange(len(self)))
        out.images = resize_images(self.images, size)
        return out


def to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 (clamped, rounded)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


def resize_images(images: Tensor, size) -> Tensor:
    """Resize a batch (uint8 or float) to ``size`` (an int: square, or ``(H, W)``). Integer downsampling
    by the same factor on both axes averages whole blocks (box filter, exact for 64 -> 32 -> 16); other
    sizes (non-square ones included: a tall sample is squeezed, not cropped) use antialiased bicubic."""
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    sh, sw = images.shape[-2:]
    if (sh, sw) == (th, tw):
        return images
    was_uint8 = images.dtype == torch.uint8
    x = images.float()
    if th < sh and sh % th == 0 and sw % tw == 0 and sh // th == sw // tw:
        y = F.avg_pool2d(x, sh // th)
    else:
        y = F.interpolate(x, size=(th, tw), mode="bicubic", antialias=True, align_corners=False)
    if was_uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y


def heldout_mask(keys: Sequence[str], fraction: float) -> Tensor:
    """True for the items held out: sha256(key) in the lowest ``fraction`` of the hash range."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    thresh = int(fraction * 2**32)
    return torch.tensor(
        [int.from_bytes(hashlib.sha256(k.encode()).digest()[:4], "big") < thresh for k in keys], dtype=torch.bool
    )


def to_rgba8(im):
    """Any PIL image -> 8-bit RGBA. 16-bit and 32-bit integer grayscale (PNG / TIFF) is scaled by
    65535 -> 255, float grayscale (TIFF) must lie in [0, 1] and is scaled by 255; a plain
    ``convert`` would clamp the first almost to white and turn the second black. Modes PIL cannot
    convert, and values out of range, raise a :class:`DataError`."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            if not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
                raise DataError(f"float image values must lie in [0, 1], got [{a.min():g}, {a.max():g}]")
            a = a * 255.0
        else:  # I;16* and I: Pillow's modes for 16-bit images
            if a.min() < 0 or a.max() > 65535:
                raise DataError(
                    f"32-bit integer image values must lie in [0, 65535] (16-bit data), got [{a.min():g}, {a.max():g}]"
                )
            a = a / 257.0
        return Image.fromarray(np.rint(a).astype(np.uint8), "L").convert("RGBA")
    try:
        return im.convert("RGBA")
    except ValueError as e:
        raise DataError(f"cannot convert an image of mode {im.mode} to RGB ({e})") from None


def composite_on_white(im) -> Tensor:
    """A PIL image (any mode, :func:`to_rgba8`) over a white background -> uint8 ``[3, H, W]``: how
    every loader turns transparency into the RGB the model sees."""
    from PIL import Image

    rgba = to_rgba8(im)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    return (
        torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        .view(rgb.size[1], rgb.size[0], 3)
        .permute(2, 0, 1)
        .clone()
    )
