"""Training data: the emoji set from npm (SPEC §8), ImageFolder-style folders, a synthetic set.

Everything is small, so a data set is an :class:`ImageSet` of in-memory uint8 tensors. The emoji set:

1. ``npm pack emoji-datasource-<vendor>@16.0.0`` into ``<root>/npm/`` (root: ``data.root``,
   ``$JITROPE_DATA`` or ``~/.cache/jitrope``; npm: ``$JITROPE_NPM`` or ``npm`` on PATH), verified
   against the sha512 ``integrity`` that npm reports and the checksums pinned below; a tarball put
   there by hand is checked against the pins.
2. The 64x64 PNGs and ``emoji.json`` are unpacked once into a temporary folder, counted, and only
   then renamed into place, so a half-written folder is never used.
3. Images are alpha-composited on white, labelled with their ``emoji.json`` category (9 classes,
   "Component" left out) and vendor, and cached as one safetensors file per vendor, which later
   runs load in a fraction of a second.

The same emoji from different vendors shares a ``group`` (image pairs for ``data.cond=other_vendor``).
The held-out split is fixed: an emoji is held out when the sha256 of its code points falls in the
lowest ``holdout`` fraction, whatever the vendors, sizes or order.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DataError",
    "ImageSet",
    "EMOJI_VERSION",
    "EMOJI_VENDORS",
    "EMOJI_CATEGORIES",
    "data_root",
    "fetch_emoji",
    "load_emoji",
    "load_image_folder",
    "make_synthetic",
    "heldout_mask",
    "build_dataset",
    "IndexStream",
    "BatchMaker",
    "resize_images",
    "to_float",
    "to_uint8",
    "to_rgba8",
]

EMOJI_VERSION = "16.0.0"
EMOJI_VENDORS = ("google", "twitter", "apple", "facebook")
# emoji-datasource's own category order; "Component" (skin-tone swatches, hair parts) is left out.
EMOJI_CATEGORIES = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
# Recorded from `npm pack --json` and sha256sum of the 16.0.0 tarballs; n64 = files under img/<vendor>/64/.
PINS: Dict[Tuple[str, str], Dict[str, object]] = {
    ("emoji-datasource-google", "16.0.0"): dict(
        size=74344091,
        n64=3786,
        integrity="sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
        sha256="fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
    ),
    ("emoji-datasource-twitter", "16.0.0"): dict(
        size=61683754,
        n64=3786,
        integrity="sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
        sha256="f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
    ),
    ("emoji-datasource-apple", "16.0.0"): dict(
        size=99291668,
        n64=3793,
        integrity="sha512-dVYjsK0FnCry9F+PBtnivhG2K0xdwlmqYaSgiUtztUdAGPYiHYhZcVKvNBqC791g2qyEcFNTBO6utg4eQ3uLTw==",
        sha256="b34d1665e136f163b0d4433318df151895b785186e8c729b2211b43017945075",
    ),
    ("emoji-datasource-facebook", "16.0.0"): dict(
        size=102958917,
        n64=3645,
        integrity="sha512-b9ZxJdB7nMWGckH1vyCjPSosaa6MJYuojPPFiQ0LmDIZS8vlG454XKcmTFKrXIMAA72O4MRJMYFhvWI8pjyciQ==",
        sha256="017038cf5a4e7fcf03dd9133cbed43d4c281c4b3ce7b927c7160261b92b8821e",
    ),
}
_CACHE_FORMAT = "1"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(RuntimeError):
    """The data is missing, unverifiable or malformed; the message says what to do."""


# ------------------------------------------------------------------------------------ ImageSet
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

    def subset(self, idx) -> "ImageSet":
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

    def resized(self, size: int) -> "ImageSet":
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


def resize_images(images: Tensor, size: int) -> Tensor:
    """Resize a square batch (uint8 or float). Integer downsampling factors average whole blocks
    (box filter, exact for 64 -> 32 -> 16); other sizes use antialiased bicubic."""
    src = images.shape[-1]
    if src == size:
        return images
    was_uint8 = images.dtype == torch.uint8
    x = images.float()
    if size < src and src % size == 0:
        y = F.avg_pool2d(x, src // size)
    else:
        y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    if was_uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y


def heldout_mask(keys: Sequence[str], fraction: float) -> Tensor:
    """True for the items held out: sha256(key) in the lowest ``fraction`` of the hash range."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    thresh = int(fraction * 2**32)
    return torch.tensor([int.from_bytes(hashlib.sha256(k.encode()).digest()[:4], "big") < thresh for k in keys], dtype=torch.bool)


def to_rgba8(im):
    """Any PIL image -> 8-bit RGBA. 16-bit and 32-bit integer grayscale (PNG / TIFF) is scaled by
    65535 -> 255, float grayscale (TIFF) must lie in [0, 1] and is scaled by 255; a plain
    ``convert`` would clamp the first almost to white and turn the second black. Modes PIL cannot
    convert, and values out of range, raise a :class:`DataError`."""
    from PIL import Image
    import numpy as np

    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            if not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
                raise DataError(f"float image values must lie in [0, 1], got [{a.min():g}, {a.max():g}]")
            a = a * 255.0
        else:  # I;16* and I: Pillow's modes for 16-bit images
            if a.min() < 0 or a.max() > 65535:
                raise DataError(f"32-bit integer image values must lie in [0, 65535] (16-bit data), got [{a.min():g}, {a.max():g}]")
            a = a / 257.0
        return Image.fromarray(np.rint(a).astype(np.uint8), "L").convert("RGBA")
    try:
        return im.convert("RGBA")
    except ValueError as e:
        raise DataError(f"cannot convert an image of mode {im.mode} to RGB ({e})") from None


def _composite_on_white(im) -> Tensor:
    from PIL import Image

    rgba = to_rgba8(im)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.size[1], rgb.size[0], 3).permute(2, 0, 1).clone()


# ---------------------------------------------------------------------------------- emoji: fetch
def data_root(root=None) -> Path:
    """``root``, else ``$JITROPE_DATA``, else ``~/.cache/jitrope``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("JITROPE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jitrope"


def _sha512_integrity(path: Path) -> Tuple[str, str, int]:
    h512, h256, n = hashlib.sha512(), hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h512.update(chunk)
            h256.update(chunk)
            n += len(chunk)
    return "sha512-" + base64.b64encode(h512.digest()).decode(), h256.hexdigest(), n


def _verify_tarball(tgz: Path, meta: Optional[dict], pin: Optional[dict]) -> None:
    integrity, sha256, size = _sha512_integrity(tgz)
    problems = []
    if meta is not None:
        if meta.get("integrity") and meta["integrity"] != integrity:
            problems.append(f"sha512 {integrity} != {meta['integrity']} reported by npm")
        if meta.get("size") is not None and int(meta["size"]) != size:
            problems.append(f"size {size} != {meta['size']} reported by npm")
    if pin is not None:
        if pin["integrity"] != integrity or pin["sha256"] != sha256:
            problems.append(f"sha256 {sha256} != pinned {pin['sha256']}")
        if pin["size"] != size:
            problems.append(f"size {size} != pinned {pin['size']}")
    if meta is None and pin is None:
        problems.append("no npm metadata (.json beside it) and no pinned checksum to check it against")
    if problems:
        raise DataError(f"{tgz}: verification failed: {'; '.join(problems)}. Delete it and run again to re-download.")


def _npm_pack(package: str, version: str, dest_dir: Path, npm: Optional[str], log: Callable[[str], None]) -> Tuple[Path, dict]:
    exe = npm or os.environ.get("JITROPE_NPM") or "npm"
    path = shutil.which(exe)
    if path is None:
        raise DataError(
            f"npm was not found (looked for {exe!r} on PATH); it is needed to download {package}@{version}. "
            "Install Node.js and npm (e.g. `apt-get install npm`), or put the tarball from `npm pack "
            f"{package}@{version}` into {dest_dir} by hand, or train on your own images with data.name=folder."
        )
    tmp = Path(tempfile.mkdtemp(prefix=".npm-pack-", dir=dest_dir))
    try:
        log(f"downloading {package}@{version} with npm pack ...")
        proc = subprocess.run(
            [path, "pack", f"{package}@{version}", "--json", "--pack-destination", str(tmp)],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise DataError(f"`npm pack {package}@{version}` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        try:
            meta = json.loads(proc.stdout)[0]
            tgz = tmp / meta["filename"]
        except (ValueError, KeyError, IndexError) as e:
            raise DataError(f"`npm pack {package}@{version} --json` printed no usable JSON ({e}): {proc.stdout[:500]!r}") from None
        if not tgz.is_file():
            raise DataError(f"`npm pack {package}@{version}` reported {meta['filename']} but wrote no such file")
        _verify_tarball(tgz, meta, PINS.get((package, version)))
        final = dest_dir / tgz.name
        _atomic_write_text(final.with_suffix(".json"), json.dumps(meta))
        os.replace(tgz, final)
        return final, meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fetch_emoji(
    vendor: str,
    *,
    root=None,
    version: str = EMOJI_VERSION,
    download: bool = True,
    npm: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Make sure ``<root>/emoji-<version>/<vendor>/`` holds the unpacked, verified package; return it.

    Holds ``emoji.json``, ``LICENSE`` and ``img/<vendor>/64/*.png``.
    """
    root = data_root(root)
    package = f"emoji-datasource-{vendor}"
    final = root / f"emoji-{version}" / vendor
    if (final / "emoji.json").is_file():
        return final
    npm_dir = root / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    tgz = npm_dir / f"{package}-{version}.tgz"
    pin = PINS.get((package, version))
    if tgz.is_file():
        meta_path = tgz.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        _verify_tarball(tgz, meta, pin)
    elif download:
        tgz, meta = _npm_pack(package, version, npm_dir, npm, log)
    else:
        raise DataError(
            f"the emoji data for {vendor} is missing: no {final} and no {tgz}. Run "
            f"`python scripts/prepare_data.py --root {root}` (needs npm) or set data.download=true."
        )
    expected = None
    if meta is not None and meta.get("files"):
        expected = sum(1 for f in meta["files"] if f["path"].startswith(f"img/{vendor}/64/") and f["path"].endswith(".png"))
    elif pin is not None:
        expected = int(pin["n64"])

    log(f"unpacking {tgz.name} ...")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{vendor}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        n_png = 0
        prefix = f"package/img/{vendor}/64/"
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                for m in tar:
                    name = m.name
                    if not m.isfile():
                        continue
                    if name in ("package/emoji.json", "package/LICENSE"):
                        rel = name[len("package/"):]
                    elif name.startswith(prefix) and name.endswith(".png") and "/" not in name[len(prefix):]:
                        rel = name[len("package/"):]
                        n_png += 1
                    else:
                        continue
                    out = tmp / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(m) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{tgz}: cannot unpack ({e}); delete it and run again to re-download") from None
        if not (tmp / "emoji.json").is_file():
            raise DataError(f"{tgz}: has no package/emoji.json")
        if n_png == 0 or (expected is not None and n_png != expected):
            raise DataError(f"{tgz}: found {n_png} images under {prefix}, expected {expected if expected is not None else '> 0'}")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "emoji.json").is_file():  # not just lost a race to another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------- emoji: load
def _emoji_items(meta: list, vendor: str, skin_tones: bool):
    """(image file, category, variant code points, base code points, short name) of each usable emoji."""
    flag = f"has_img_{vendor}"
    for e in meta:
        cat = e.get("category")
        if cat not in EMOJI_CATEGORIES:
            continue
        base = e["unified"]
        if e.get(flag, True):
            yield e["image"], cat, base, base, e.get("short_name", base)
        if skin_tones:
            for v in (e.get("skin_variations") or {}).values():
                if v.get(flag, True):
                    yield v["image"], cat, v["unified"], base, e.get("short_name", base)


def _load_vendor(vendor: str, *, root, version, skin_tones, download, npm, log) -> Tuple[Tensor, List[dict]]:
    from PIL import Image
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    root = data_root(root)
    cache = root / f"emoji-{version}" / "cache" / f"{vendor}{'-skin' if skin_tones else ''}-64.safetensors"
    if cache.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), "pt") as f:
                md = f.metadata() or {}
            if md.get("format") == _CACHE_FORMAT:
                return load_file(str(cache))["images"], json.loads(md["items"])
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            log(f"ignoring unreadable cache {cache} ({e}); rebuilding it")
    pkg = fetch_emoji(vendor, root=root, version=version, download=download, npm=npm, log=log)
    meta = json.loads((pkg / "emoji.json").read_text())
    imgs, items = [], []
    for image, cat, unified, base, short in _emoji_items(meta, vendor, skin_tones):
        p = pkg / "img" / vendor / "64" / image
        if not p.is_file():
            continue  # emoji.json claims an image the package does not ship
        try:
            with Image.open(p) as im:
                t = _composite_on_white(im)
        except OSError as e:
            raise DataError(f"{p}: unreadable image ({e}); delete {pkg} to unpack it again") from None
        if t.shape[-2:] != (64, 64):
            t = resize_images(t[None], 64)[0]
        imgs.append(t)
        items.append(dict(category=cat, unified=unified, base=base, name=short))
    if not imgs:
        raise DataError(f"{pkg}: no usable images")
    images = torch.stack(imgs)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{uuid.uuid4().hex}.tmp")
    save_file({"images": images}, str(tmp), metadata={"format": _CACHE_FORMAT, "items": json.dumps(items)})
    os.replace(tmp, cache)
    return images, items


def load_emoji(
    root=None,
    *,
    vendors: Sequence[str] = EMOJI_VENDORS,
    version: str = EMOJI_VERSION,
    skin_tones: bool = False,
    download: bool = True,
    npm: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> ImageSet:
    """All emoji of ``vendors`` at 64x64 (fetching and caching on first use)."""
    vendors = list(vendors)
    if not vendors:
        raise DataError("data.vendors is empty")
    bad = [v for v in vendors if v not in EMOJI_VENDORS]
    if bad:
        raise DataError(f"unknown emoji vendor(s) {bad}; choose from {list(EMOJI_VENDORS)}")
    all_imgs, labels, domains, items = [], [], [], []
    for d, v in enumerate(vendors):
        imgs, its = _load_vendor(v, root=root, version=version, skin_tones=skin_tones, download=download, npm=npm, log=log)
        all_imgs.append(imgs)
        labels += [EMOJI_CATEGORIES.index(it["category"]) for it in its]
        domains += [d] * len(its)
        items += its
    group_ids: Dict[str, int] = {}
    for u in sorted({it["unified"] for it in items}):
        group_ids[u] = len(group_ids)
    return ImageSet(
        images=torch.cat(all_imgs),
        labels=torch.tensor(labels, dtype=torch.long),
        class_names=list(EMOJI_CATEGORIES),
        groups=torch.tensor([group_ids[it["unified"]] for it in items], dtype=torch.long),
        domains=torch.tensor(domains, dtype=torch.long),
        domain_names=vendors,
        names=[f"{it['name']} ({it['unified'].lower()}, {vendors[d]})" for it, d in zip(items, domains)],
        split_keys=[it["base"] for it in items],
    )


# ------------------------------------------------------------------------- folder and synthetic
def load_image_folder(path, img_size: int) -> ImageSet:
    """ImageFolder layout: ``path/<class name>/*.png|jpg|...``; classes sorted by name.

    Images are alpha-composited on white, centre-cropped to a square and resized to ``img_size``.
    """
    from PIL import Image

    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist (expected {path}/<class>/<image files>)")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {path} has no class subfolders (expected {path}/<class>/<image files>)")
    imgs, labels, names = [], [], []
    for c, cls in enumerate(classes):
        files = sorted(p for p in (path / cls).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"class folder {path / cls} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for p in files:
            try:
                with Image.open(p) as im:
                    w, h = im.size
                    s = min(w, h)
                    im = to_rgba8(im).crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                    im = im.resize((img_size, img_size), Image.LANCZOS)
                    imgs.append(_composite_on_white(im))
            except (OSError, DataError) as e:
                raise DataError(f"{p}: unreadable image ({e})") from None
            labels.append(c)
            names.append(f"{cls}/{p.name}")
    n = len(imgs)
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
    """The ``split`` ("train", "val" or "all") of the data set that ``data_cfg`` (DataConfig) names, at ``data_cfg.img_size``."""
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
        ds = load_image_folder(data_cfg.root, data_cfg.img_size)
    elif name == "synthetic":
        ds = make_synthetic(data_cfg.num_images, data_cfg.img_size, seed=seed)
    else:
        raise DataError(f"unknown data.name {name!r}; choose emoji, folder or synthetic")
    ds = ds.resized(data_cfg.img_size)
    if split != "all":
        held = heldout_mask(ds.split_keys, data_cfg.holdout)
        ds = ds.subset(held if split == "val" else ~held)
        if len(ds) == 0:
            raise DataError(f"the {split} split of {name} is empty (data.holdout={data_cfg.holdout}, {len(held)} images)")
    return ds


# ------------------------------------------------------------------------------------ batching
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
            raise ValueError(f"data order state is for n={state['n']}, seed={state['seed']}; this run has n={self.n}, seed={self.seed}")
        self.epoch, self.pos, self._perm = int(state["epoch"]), int(state["pos"]), None


class BatchMaker:
    """Turns indices into float batches: ``x`` in [-1, 1], labels, and the condition image.

    ``cond``: "none", "downsample" (the same image at ``cond_size``) or "other_vendor" (the same
    emoji from another vendor when there is one, else the same image, at ``cond_size``).
    """

    def __init__(self, ds: ImageSet, *, cond: str = "none", cond_size: Optional[int] = None, hflip: bool = False, device="cpu"):
        if cond not in ("none", "downsample", "other_vendor"):
            raise ValueError(f"data.cond must be none, downsample or other_vendor, got {cond!r}")
        if cond != "none" and not cond_size:
            raise ValueError(f"data.cond={cond} needs model.cond_img_size")
        if cond == "none" and cond_size:
            raise ValueError(f"model.cond_img_size={cond_size} needs a condition: set data.cond=downsample or other_vendor")
        self.ds, self.cond, self.hflip, self.device = ds, cond, hflip, torch.device(device)
        self.images = ds.images.to(self.device)
        self.labels = ds.labels.to(self.device)
        self.cond_images = resize_images(ds.images, cond_size).to(self.device) if cond != "none" else None
        if cond == "other_vendor":
            # partners[i]: up to len(domains) indices of the same group, other domains first
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
            self.partners = partners
            self.n_partners = (partners >= 0).sum(1)

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
