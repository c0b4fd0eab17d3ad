"""The emoji set from npm (docs/training.md): fetch, verify, unpack, and load as an :class:`ImageSet`.

1. ``npm pack emoji-datasource-<vendor>@16.0.0`` into ``<root>/npm/`` (root: ``data.root``,
   ``$JITROPE_DATA`` or ``~/.cache/jitrope``; npm: ``$JITROPE_NPM`` or ``npm`` on PATH), verified
   against the sha512 ``integrity`` that npm reports and the checksums pinned below; a tarball put
   there by hand is checked against the pins.
2. The 64x64 PNGs and ``emoji.json`` are unpacked once into a temporary folder, counted, listed
   with their sha256 in ``manifest.json``, and only then renamed into place, so a half-written
   folder is never used. Each use checks every file against that manifest; a folder that differs
   (a flipped bit, a lost file) or has none is unpacked again from the verified tarball.
3. Images are alpha-composited on white, labelled with their ``emoji.json`` category (9 classes,
   "Component" left out) and vendor, and cached as one safetensors file per vendor, which later
   runs load in a fraction of a second; the sha256 of its images and labels, stored in it, is
   checked on every load, and a cache that differs is rebuilt from the verified folder.

The same emoji from different vendors shares a ``group`` (image pairs for ``data.cond=other_vendor``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..fileio import atomic_path, atomic_write_text, sha256_file
from .imageset import DataError, ImageSet, composite_on_white, resize_images

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
_CACHE_FORMAT = "2"  # 2: with the sha256 of its content
_MANIFEST = "manifest.json"


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


def _unpacked_problem(folder: Path) -> Optional[str]:
    """None when every file of the manifest written at unpacking is there with its sha256; else
    what is wrong."""
    mf = folder / _MANIFEST
    if not mf.is_file():
        return f"{folder} has no {_MANIFEST} (unpacked by an older jitrope, or cut short)"
    try:
        files = json.loads(mf.read_text())["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("'files' is not a non-empty mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{mf} is unreadable ({e})"
    for rel, digest in sorted(files.items()):
        f = folder / rel
        if not f.is_file():
            return f"{f} is missing"
        if sha256_file(f) != digest:
            return f"{f} does not match its sha256 in {mf} (damaged)"
    return None


def _npm_pack(
    package: str, version: str, dest_dir: Path, npm: Optional[str], log: Callable[[str], None]
) -> Tuple[Path, dict]:
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
            raise DataError(
                f"`npm pack {package}@{version}` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        try:
            meta = json.loads(proc.stdout)[0]
            tgz = tmp / meta["filename"]
        except (ValueError, KeyError, IndexError) as e:
            raise DataError(
                f"`npm pack {package}@{version} --json` printed no usable JSON ({e}): {proc.stdout[:500]!r}"
            ) from None
        if not tgz.is_file():
            raise DataError(f"`npm pack {package}@{version}` reported {meta['filename']} but wrote no such file")
        _verify_tarball(tgz, meta, PINS.get((package, version)))
        final = dest_dir / tgz.name
        atomic_write_text(final.with_suffix(".json"), json.dumps(meta))
        os.replace(tgz, final)
        return final, meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    damage = _unpacked_problem(final) if final.exists() else None
    if final.exists() and damage is None:
        return final
    npm_dir = root / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    tgz = npm_dir / f"{package}-{version}.tgz"
    pin = PINS.get((package, version))
    if tgz.is_file():
        meta = _read_npm_meta(tgz)
        _verify_tarball(tgz, meta, pin)
    elif download:
        if damage:
            log(f"{damage}; downloading it again to unpack it")
        tgz, meta = _npm_pack(package, version, npm_dir, npm, log)
    else:
        what = f"{damage}, and there is no {tgz} to unpack it again" if damage else f"no {final} and no {tgz}"
        raise DataError(
            f"the emoji data for {vendor} is missing: {what}. Run "
            f"`python scripts/prepare_data.py --root {root}` (needs npm) or set data.download=true."
        )
    expected = None
    if meta is not None and meta.get("files"):
        expected = sum(
            1 for f in meta["files"] if f["path"].startswith(f"img/{vendor}/64/") and f["path"].endswith(".png")
        )
    elif pin is not None:
        expected = int(pin["n64"])
    log(f"{damage}; unpacking {tgz.name} again" if damage else f"unpacking {tgz.name} ...")
    _unpack(tgz, final, vendor, {"package": package, "version": version}, expected)
    return final


def _read_npm_meta(tgz: Path) -> Optional[dict]:
    """The npm metadata saved beside a downloaded tarball (None: there is none)."""
    meta_path = tgz.with_suffix(".json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise DataError(
            f"{meta_path}: unreadable npm metadata of {tgz.name} ({e}); delete both and run again to re-download"
        ) from None
    return meta


def _unpack(tgz: Path, final: Path, vendor: str, about: dict, expected: Optional[int]) -> None:
    """Unpack ``emoji.json``, ``LICENSE`` and the vendor's 64 px images of the verified tarball into
    ``final`` (replaced as a whole, atomically), with a manifest of their digests; ``expected``: how many
    images there must be (None: any). ``about``: the package and version, for the manifest."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{vendor}-{uuid.uuid4().hex}"
    old = final.parent / f".old-{vendor}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        prefix = f"package/img/{vendor}/64/"
        n_png, digests = _extract(tgz, tmp, prefix)
        if not (tmp / "emoji.json").is_file():
            raise DataError(f"{tgz}: has no package/emoji.json")
        if n_png == 0 or (expected is not None and n_png != expected):
            raise DataError(
                f"{tgz}: found {n_png} images under {prefix}, expected {expected if expected is not None else '> 0'}"
            )
        # the digests of what was read from the verified tarball, not of the files as written back
        (tmp / _MANIFEST).write_text(json.dumps({**about, "files": digests}, indent=0))
        if final.exists():  # damaged: replaced as a whole (rename is atomic)
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if _unpacked_problem(final) is not None:  # not just lost a race to another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _extract(tgz: Path, dest: Path, prefix: str) -> Tuple[int, Dict[str, str]]:
    """Write ``package/emoji.json``, ``package/LICENSE`` and the PNGs directly under ``prefix`` of the
    tarball into ``dest`` (without ``package/``); returns the number of PNGs and the sha256 of each file."""
    n_png, digests = 0, {}
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for m in tar:
                name = m.name
                if not m.isfile():
                    continue
                if name in ("package/emoji.json", "package/LICENSE"):
                    rel = name[len("package/") :]
                elif name.startswith(prefix) and name.endswith(".png") and "/" not in name[len(prefix) :]:
                    rel = name[len("package/") :]
                    n_png += 1
                else:
                    continue
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with tar.extractfile(m) as src, open(out, "wb") as dst:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        dst.write(chunk)
                digests[rel] = h.hexdigest()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tgz}: cannot unpack ({e}); delete it and run again to re-download") from None
    return n_png, digests


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
                images = load_file(str(cache))["images"]
                if _cache_digest(images, md["items"]) == md["sha256"]:
                    return images, json.loads(md["items"])
                log(f"ignoring cache {cache}: its content does not match its sha256 (damaged); rebuilding it")
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
                t = composite_on_white(im)
        except (OSError, Image.DecompressionBombError) as e:
            raise DataError(f"{p}: unreadable image ({e}); delete {pkg} to unpack it again") from None
        if t.shape[-2:] != (64, 64):
            t = resize_images(t[None], 64)[0]
        imgs.append(t)
        items.append(dict(category=cat, unified=unified, base=base, name=short))
    if not imgs:
        raise DataError(f"{pkg}: no usable images")
    images = torch.stack(imgs)
    cache.parent.mkdir(parents=True, exist_ok=True)
    items_json = json.dumps(items)
    with atomic_path(cache) as tmp:
        save_file(
            {"images": images},
            str(tmp),
            metadata={"format": _CACHE_FORMAT, "items": items_json, "sha256": _cache_digest(images, items_json)},
        )
    return images, items


def _cache_digest(images: Tensor, items_json: str) -> str:
    h = hashlib.sha256(items_json.encode())
    h.update(images.contiguous().numpy().data)
    return h.hexdigest()


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
        imgs, its = _load_vendor(
            v, root=root, version=version, skin_tones=skin_tones, download=download, npm=npm, log=log
        )
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
