"""The data sets a run trains on: the emoji set, a folder of class subfolders, synthetic shapes;
:func:`build_dataset` picks one by ``data.name`` and takes its fixed train / val split, and
:func:`heldout_picks` chooses held-out condition images for sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from .emoji import load_emoji
from .imageset import IMAGE_EXTENSIONS, DataError, ImageSet, composite_on_white, heldout_mask, resize_images, to_rgba8


def image_files(folder: Path) -> Tuple[List[Path], int]:
    """The image files of ``folder`` (by extension), sorted, and how many hidden files with an image
    extension were skipped: ``.x.png``, and the AppleDouble ``._x.png`` that macOS writes beside each
    file on some drives (not an image at all)."""
    found = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()]
    shown = sorted(p for p in found if not p.name.startswith("."))
    return shown, len(found) - len(shown)


def load_image_folder(path, img_size: int, *, log: Callable[[str], None] = print) -> ImageSet:
    """ImageFolder layout: ``path/<class name>/*.png|jpg|...``; classes sorted by name; hidden files
    and folders (``.*``, the AppleDouble ``._*`` among them) are skipped, and ``log`` gets one line
    with the counts.

    Images are alpha-composited on white, centre-cropped to a square and resized to ``img_size``.
    """
    from PIL import Image

    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist (expected {path}/<class>/<image files>)")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {path} has no class subfolders (expected {path}/<class>/<image files>)")
    imgs, labels, names, skipped = [], [], [], 0
    for c, cls in enumerate(classes):
        files, hidden = image_files(path / cls)
        skipped += hidden
        if not files:
            raise DataError(f"class folder {path / cls} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for p in files:
            try:
                with Image.open(p) as im:
                    w, h = im.size
                    s = min(w, h)
                    im = to_rgba8(im).crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                    im = im.resize((img_size, img_size), Image.LANCZOS)
                    imgs.append(composite_on_white(im))
            # a header claiming more pixels than PIL's decompression-bomb limit: refused before decoding
            except (OSError, DataError, Image.DecompressionBombError) as e:
                raise DataError(f"{p}: unreadable image ({e})") from None
            labels.append(c)
            names.append(f"{cls}/{p.name}")
    n = len(imgs)
    log(
        f"read {n} images of {len(classes)} classes from {path}"
        + (f" (skipped {skipped} hidden files: .* and the AppleDouble ._* of macOS)" if skipped else "")
    )
    return ImageSet(
        images=torch.stack(imgs),
        labels=torch.tensor(labels, dtype=torch.long),
        class_names=classes,
        groups=torch.arange(n),
        domains=torch.zeros(n, dtype=torch.long),
        domain_names=["folder"],
        names=names,
        split_keys=names,
    )


SYNTHETIC_CLASSES = ("disc", "square", "ring", "cross", "diamond", "h-stripes", "v-stripes", "triangle", "dot-pair")


def make_synthetic(n: int, img_size: int, *, num_classes: int = 9, seed: int = 0) -> ImageSet:
    """Coloured shapes on white, one shape per class: a data set that needs no download (tests, smoke runs)."""
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise DataError(f"synthetic data has 1..{len(SYNTHETIC_CLASSES)} classes, asked for {num_classes}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    c = (torch.arange(img_size, dtype=torch.float32) + 0.5) / img_size * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    centre = (torch.rand(n, 2, generator=g) - 0.5) * 0.5
    radius = 0.35 + 0.3 * torch.rand(n, generator=g)
    colour = torch.rand(n, 3, generator=g) * 0.8
    imgs = torch.ones(n, 3, img_size, img_size)
    for i in range(n):
        y, x = yy - centre[i, 0], xx - centre[i, 1]
        r = radius[i]
        k = int(labels[i])
        d = (x * x + y * y).sqrt()
        mask = {
            0: d < r,
            1: (x.abs() < r * 0.8) & (y.abs() < r * 0.8),
            2: (d < r) & (d > r * 0.6),
            3: ((x.abs() < r * 0.25) | (y.abs() < r * 0.25)) & (d < r),
            4: (x.abs() + y.abs()) < r,
            5: (torch.remainder(y * 4 / r, 2) < 1) & (x.abs() < r) & (y.abs() < r),
            6: (torch.remainder(x * 4 / r, 2) < 1) & (x.abs() < r) & (y.abs() < r),
            7: (y < r * 0.7) & (y > -r * 0.7 + 2 * x.abs()),
            8: (((x - r / 2) ** 2 + y * y).sqrt() < r / 3) | (((x + r / 2) ** 2 + y * y).sqrt() < r / 3),
        }[k]
        imgs[i][:, mask] = colour[i][:, None]
    return ImageSet(
        images=(imgs * 255).round().to(torch.uint8),
        labels=labels,
        class_names=list(SYNTHETIC_CLASSES[:num_classes]),
        groups=torch.arange(n),
        domains=torch.zeros(n, dtype=torch.long),
        domain_names=["synthetic"],
        names=[f"{SYNTHETIC_CLASSES[int(k)]} #{i}" for i, k in enumerate(labels)],
        split_keys=[f"synthetic-{seed}-{i}" for i in range(n)],
    )


def build_dataset(data_cfg, split: str = "train", *, seed: int = 0, log: Callable[[str], None] = print) -> ImageSet:
    """The ``split`` ("train", "val" or "all") of the data set that ``data_cfg`` (DataConfig) names, at
    ``data_cfg.img_size``."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be train, val or all, got {split!r}")
    name = data_cfg.name
    if name == "emoji":
        ds = load_emoji(
            data_cfg.root, vendors=data_cfg.vendors, skin_tones=data_cfg.skin_tones, download=data_cfg.download, log=log
        )
    elif name == "folder":
        if not data_cfg.root:
            raise DataError("data.name=folder needs data.root=<folder with one subfolder per class>")
        ds = load_image_folder(data_cfg.root, data_cfg.img_size, log=log)
    elif name == "synthetic":
        ds = make_synthetic(data_cfg.num_images, data_cfg.img_size, seed=seed)
    else:
        raise DataError(f"unknown data.name {name!r}; choose emoji, folder or synthetic")
    ds = ds.resized(data_cfg.img_size)
    if split != "all":
        held = heldout_mask(ds.split_keys, data_cfg.holdout)
        ds = ds.subset(held if split == "val" else ~held)
        if len(ds) == 0:
            raise DataError(
                f"the {split} split of {name} is empty (data.holdout={data_cfg.holdout}, {len(held)} images)"
            )
    return ds


def heldout_picks(ds: ImageSet, holdout: float, num_classes: Optional[int] = None) -> List[int]:
    """Indices of one held-out item (never trained on at ``data.holdout=holdout``) of each of the
    first ``num_classes`` classes (default: all), the first in data order: condition images for a
    grid that spans the data. A class without a held-out item is an error naming it."""
    held = heldout_mask(ds.split_keys, holdout).nonzero().flatten().tolist()
    k = ds.num_classes if num_classes is None else num_classes
    if not 1 <= k <= ds.num_classes:
        raise DataError(f"num_classes must be in 1..{ds.num_classes}, got {k}")
    picks = []
    for c in range(k):
        hit = next((i for i in held if int(ds.labels[i]) == c), None)
        if hit is None:
            raise DataError(f"class {ds.class_names[c]!r} has no held-out item at holdout={holdout}")
        picks.append(hit)
    return picks


def write_heldout_conditions(
    ds: ImageSet, out_dir, size: int, *, holdout: float, num_classes: Optional[int] = None
) -> List[Path]:
    """Write :func:`heldout_picks` as ``size`` x ``size`` PNGs (``heldout_<k>_<class>.png``) into
    ``out_dir``, for ``jitrope-sample --cond out_dir``."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, i in enumerate(heldout_picks(ds, holdout, num_classes)):
        img = resize_images(ds.images[i : i + 1], size)[0].permute(1, 2, 0).numpy()  # uint8 RGB
        p = out_dir / f"heldout_{k}_{ds.class_names[int(ds.labels[i])].split()[0].lower()}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths
