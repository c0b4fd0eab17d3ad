"""Sample grids and image files: labelled PNG sheets of samples, and the single images beside them.

:func:`make_grid` lays images out in rows with a label left of each row; :func:`make_size_grid` does
so for images of different sizes; :func:`condition_rows` puts each condition image in front of its
samples. :func:`save_image` writes one image, :func:`label_stem` turns a row label into part of a
file name.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .data import resize_images, to_uint8

__all__ = ["make_grid", "make_size_grid", "condition_rows", "save_image", "label_stem"]


def make_size_grid(
    images: Sequence[Tensor], ncol: int, *, row_labels: Optional[Sequence[str]] = None, scale: int = 1, pad: int = 2
):
    """:func:`make_grid` of images of different sizes: each centred on white in a cell of the largest
    height and width."""
    H = max(im.shape[-2] for im in images)
    W = max(im.shape[-1] for im in images)
    cells = torch.full((len(images), 3, H, W), 255, dtype=torch.uint8)
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        top, left = (H - h) // 2, (W - w) // 2
        cells[i, :, top : top + h, left : left + w] = to_uint8(im)
    return make_grid(cells, ncol, row_labels=row_labels, scale=scale, pad=pad)


def make_grid(images: Tensor, ncol: int, *, row_labels: Optional[Sequence[str]] = None, scale: int = 1, pad: int = 2):
    """A PIL image of ``images`` (uint8 or float [-1, 1], [N, 3, H, W]) in rows of ``ncol``,
    with ``row_labels[r]`` written left of row r."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    n, _, h, w = images.shape
    h, w = h * scale, w * scale
    nrow = max(1, math.ceil(n / ncol))
    font = ImageFont.load_default()
    margin = 0
    if row_labels:
        draw0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        margin = max(draw0.textlength(str(t), font=font) for t in row_labels) + 2 * pad + 4
        margin = int(min(margin, 260))
    W = margin + ncol * (w + pad) + pad
    H = nrow * (h + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, ncol)
        im = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        if scale != 1:
            im = im.resize((w, h), Image.NEAREST)
        canvas.paste(im, (margin + pad + c * (w + pad), pad + r * (h + pad)))
    for r, text in enumerate(row_labels or []):
        if r < nrow:
            draw.text((pad + 2, pad + r * (h + pad) + h // 2 - 6), str(text)[:40], fill=(0, 0, 0), font=font)
    return canvas


def condition_rows(conds: Tensor, samples: Tensor, n: int) -> Tensor:
    """The cells of condition rows, ``[condition r | its n samples]`` for each row r, to grid with
    ``make_grid(cells, n + 1)``: ``samples`` holds n per condition, row by row. A condition image is
    shown at the samples' size: enlarged nearest-neighbour (its pixels stay visible as blocks),
    or reduced with :func:`jitrope.data.resize_images` when larger. Float [-1, 1] or uint8 samples."""
    if len(samples) != n * len(conds):
        raise ValueError(f"condition_rows: {len(samples)} samples for {len(conds)} conditions of {n} each")
    size = tuple(samples.shape[-2:])
    if conds.shape[-2] > size[0] or conds.shape[-1] > size[1]:
        shown = resize_images(conds, size)
    else:
        shown = torch.nn.functional.interpolate(conds.float(), size=size, mode="nearest")
    if samples.dtype == torch.uint8 and shown.dtype != torch.uint8:
        shown = to_uint8(shown)
    shown = shown.to(samples.dtype)
    return torch.cat([torch.cat([shown[r : r + 1], samples[r * n : (r + 1) * n]]) for r in range(len(conds))])


def label_stem(row_label: str) -> str:
    """A row label as part of a file name: letters and digits kept, the rest ``_``, 40 characters."""
    return "".join(ch if ch.isalnum() else "_" for ch in row_label)[:40]


def save_image(image: Tensor, path) -> None:
    """One image (uint8 or float [-1, 1], ``[3, H, W]``) as an image file; the format from the name."""
    if image.dtype != torch.uint8:
        image = to_uint8(image)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
