"""Data: the emoji pipeline on fake npm tarballs (no network), the held-out split, folders, batching."""

import base64
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jitrope import data as D
from jitrope.data import (
    EMOJI_CATEGORIES,
    BatchMaker,
    DataError,
    IndexStream,
    fetch_emoji,
    heldout_mask,
    load_emoji,
    load_image_folder,
    make_synthetic,
    resize_images,
)

VERSION = "0.0.1-test"
EMOJI = [  # (unified, category, colour)
    ("1F600", "Smileys & Emotion", (255, 200, 0)),
    ("1F436", "Animals & Nature", (150, 100, 50)),
    ("1F34E", "Food & Drink", (220, 0, 0)),
    ("1F3FB", "Component", (250, 220, 180)),  # skin-tone swatch: never a class
    ("1F680", "Travel & Places", (90, 90, 200)),
    ("1F3C0", "Activities", (240, 120, 0)),
]


def _png(colour, alpha=255, size=64):
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))  # transparent corners
    im.paste(Image.new("RGBA", (size // 2, size // 2), (*colour, alpha)), (size // 4, size // 4))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_fake_tarball(path, vendor, *, missing=(), shade=0):
    """A tarball laid out like emoji-datasource-<vendor> (package/emoji.json, package/img/<vendor>/64/*.png)."""
    meta, files = [], {}
    for unified, cat, colour in EMOJI:
        has = unified not in missing
        meta.append(
            {
                "unified": unified,
                "image": f"{unified.lower()}.png",
                "category": cat,
                "short_name": unified.lower(),
                f"has_img_{vendor}": has,
            }
        )
        if has:
            files[f"package/img/{vendor}/64/{unified.lower()}.png"] = _png(tuple(min(255, c + shade) for c in colour))
    files["package/emoji.json"] = json.dumps(meta).encode()
    files["package/LICENSE"] = b"MIT"
    files[f"package/img/{vendor}/sheets/sheet.png"] = b"not needed"
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    blob = open(path, "rb").read()
    return {
        "id": f"emoji-datasource-{vendor}@{VERSION}",
        "name": f"emoji-datasource-{vendor}",
        "version": VERSION,
        "filename": os.path.basename(path),
        "size": len(blob),
        "integrity": "sha512-" + base64.b64encode(hashlib.sha512(blob).digest()).decode(),
        "files": [{"path": n[len("package/") :], "size": len(b)} for n, b in files.items()],
    }


@pytest.fixture
def fake_npm(tmp_path):
    """A fake `npm` that "packs" prebuilt tarballs and prints `npm pack --json` output; logs its calls."""
    src = tmp_path / "registry"
    src.mkdir()
    for i, vendor in enumerate(("google", "twitter")):
        tgz = src / f"emoji-datasource-{vendor}-{VERSION}.tgz"
        meta = make_fake_tarball(tgz, vendor, missing=("1F3C0",) if vendor == "twitter" else (), shade=5 * i)
        (src / f"{vendor}.json").write_text(json.dumps(meta))
    log = tmp_path / "npm-calls.txt"
    script = tmp_path / "bin" / "npm"
    script.parent.mkdir()
    script.write_text(
        f"""#!{sys.executable}
import json, shutil, sys
args = sys.argv[1:]
open({str(log)!r}, "a").write(" ".join(args) + "\\n")
pkg = args[1]
vendor = pkg.split("@")[0].rsplit("-", 1)[1]
dest = args[args.index("--pack-destination") + 1]
meta = json.load(open({str(src)!r} + "/" + vendor + ".json"))
shutil.copy({str(src)!r} + "/" + meta["filename"], dest)
print(json.dumps([meta]))
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"npm": str(script), "log": log, "root": tmp_path / "cache", "registry": src}


def _load(fake, **kw):
    return load_emoji(
        fake["root"], vendors=("google", "twitter"), version=VERSION, npm=fake["npm"], log=lambda *_: None, **kw
    )


def test_fetch_unpacks_once_and_loads_composited_labelled_images(fake_npm):
    ds = _load(fake_npm)
    # google: 5 emoji (Component left out); twitter: 4 (no 1F3C0 image)
    assert len(ds) == 9 and ds.images.shape == (9, 3, 64, 64) and ds.images.dtype == torch.uint8
    assert ds.class_names == list(EMOJI_CATEGORIES) and ds.domain_names == ["google", "twitter"]
    assert ds.domains.tolist() == [0] * 5 + [1] * 4
    cats = [EMOJI_CATEGORIES[i] for i in ds.labels[:5].tolist()]
    assert cats == ["Smileys & Emotion", "Animals & Nature", "Food & Drink", "Travel & Places", "Activities"]
    assert (ds.images[:, :, 0, 0] == 255).all()  # transparent -> white
    assert ds.images[0, :, 32, 32].tolist() == [255, 200, 0]
    # the same emoji across vendors shares a group
    assert ds.groups[0] == ds.groups[5] and ds.groups[0] != ds.groups[1]
    pkg = fake_npm["root"] / f"emoji-{VERSION}" / "google"
    assert (pkg / "emoji.json").is_file() and not (pkg / "img" / "google" / "sheets").exists()
    assert len(fake_npm["log"].read_text().splitlines()) == 2
    assert not [p for p in (fake_npm["root"] / f"emoji-{VERSION}").iterdir() if p.name.startswith(".tmp")]

    # second time: from the tensor cache, neither npm nor the unpacked folders are touched
    calls = fake_npm["log"].read_text()
    from jitrope.data import emoji as EM

    orig = EM.fetch_emoji
    EM.fetch_emoji = lambda *a, **k: pytest.fail("fetch_emoji called although the cache exists")
    try:
        again = _load(fake_npm)
    finally:
        EM.fetch_emoji = orig
    assert torch.equal(again.images, ds.images) and again.names == ds.names
    assert fake_npm["log"].read_text() == calls


def test_bit_flips_in_the_unpacked_emoji_and_its_cache_are_caught(fake_npm):
    logs = []
    ds = _load(fake_npm)
    calls = fake_npm["log"].read_text()
    version_dir = fake_npm["root"] / f"emoji-{VERSION}"
    manifest = json.loads((version_dir / "google" / "manifest.json").read_text())["files"]
    assert "emoji.json" in manifest and "img/google/64/1f600.png" in manifest and len(manifest) == 8
    # a flipped bit in the tensor cache: rebuilt from the unpacked (verified) images
    cache = version_dir / "cache" / "google-64.safetensors"
    raw = bytearray(cache.read_bytes())
    raw[-100] ^= 0x01
    cache.write_bytes(bytes(raw))
    again = load_emoji(
        fake_npm["root"], vendors=("google", "twitter"), version=VERSION, npm=fake_npm["npm"], log=logs.append
    )
    assert torch.equal(again.images, ds.images)
    assert any(f"ignoring cache {cache}: its content does not match its sha256" in m for m in logs), logs
    # a flipped bit in an unpacked PNG (the cache gone): unpacked again from the verified tarball, not downloaded
    png = version_dir / "google" / "img" / "google" / "64" / "1f600.png"
    raw = bytearray(png.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    png.write_bytes(bytes(raw))
    cache.unlink()
    logs.clear()
    again = load_emoji(
        fake_npm["root"], vendors=("google", "twitter"), version=VERSION, npm=fake_npm["npm"], log=logs.append
    )
    assert torch.equal(again.images, ds.images) and fake_npm["log"].read_text() == calls
    assert any(f"{png} does not match its sha256" in m and "unpacking" in m for m in logs), logs
    assert not [p for p in version_dir.iterdir() if p.name.startswith((".tmp", ".old"))]
    # a lost file, and no tarball to unpack from: a clear error naming the file, not a smaller data set
    png.unlink()
    cache.unlink()
    (fake_npm["root"] / "npm" / f"emoji-datasource-google-{VERSION}.tgz").unlink()
    with pytest.raises(DataError, match=f"{png} is missing, and there is no .*emoji-datasource-google-{VERSION}.tgz"):
        load_emoji(fake_npm["root"], vendors=("google",), version=VERSION, download=False, log=logs.append)
    # with downloads on, it is fetched and unpacked again
    again = load_emoji(
        fake_npm["root"], vendors=("google", "twitter"), version=VERSION, npm=fake_npm["npm"], log=logs.append
    )
    assert torch.equal(again.images, ds.images)


def test_a_failed_unpack_leaves_nothing_half_written(fake_npm):
    root = fake_npm["root"]
    (root / "npm").mkdir(parents=True)
    tgz = root / "npm" / f"emoji-datasource-google-{VERSION}.tgz"
    meta = make_fake_tarball(tgz, "google")
    blob = tgz.read_bytes()
    tgz.write_bytes(blob[: len(blob) // 2])
    meta["size"], meta["integrity"] = (
        len(blob) // 2,
        "sha512-" + base64.b64encode(hashlib.sha512(blob[: len(blob) // 2]).digest()).decode(),
    )
    tgz.with_suffix(".json").write_text(json.dumps(meta))  # matches the truncated file: unpacking must catch it
    with pytest.raises(DataError, match="cannot unpack") as e:
        fetch_emoji("google", root=root, version=VERSION, npm=fake_npm["npm"], log=lambda *_: None)
    assert str(tgz) in str(e.value)
    folder = root / f"emoji-{VERSION}"
    assert not (folder / "google").exists() and not list(folder.glob(".tmp*"))


def test_checksum_mismatch_and_count_mismatch_are_errors(fake_npm):
    root = fake_npm["root"]
    (root / "npm").mkdir(parents=True)
    tgz = root / "npm" / f"emoji-datasource-google-{VERSION}.tgz"
    meta = make_fake_tarball(tgz, "google")
    bad = dict(meta, integrity="sha512-" + base64.b64encode(b"x" * 64).decode())
    tgz.with_suffix(".json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="verification failed"):
        fetch_emoji("google", root=root, version=VERSION, log=lambda *_: None)
    meta["files"].append({"path": "img/google/64/extra.png", "size": 1})
    tgz.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="found 6 images.*expected 7"):
        fetch_emoji("google", root=root, version=VERSION, log=lambda *_: None)
    assert not (root / f"emoji-{VERSION}" / "google").exists()
    tgz.with_suffix(".json").write_text('{"integrity": ')  # cut short: an error naming it, not a traceback
    with pytest.raises(DataError, match=r"google-.*\.json: unreadable npm metadata"):
        fetch_emoji("google", root=root, version=VERSION, log=lambda *_: None)
    tgz.with_suffix(".json").unlink()  # a hand-placed tarball of an unpinned version cannot be verified
    with pytest.raises(DataError, match="no pinned checksum"):
        fetch_emoji("google", root=root, version=VERSION, log=lambda *_: None)


def test_missing_npm_and_missing_data_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("JITROPE_NPM", raising=False)
    with pytest.raises(DataError, match="npm was not found"):
        fetch_emoji("google", root=tmp_path, version=VERSION, npm="no-such-npm-binary-xyz", log=lambda *_: None)
    with pytest.raises(DataError, match="data for google is missing.*prepare_data"):
        fetch_emoji("google", root=tmp_path, version=VERSION, download=False, log=lambda *_: None)
    with pytest.raises(DataError, match="unknown emoji vendor"):
        load_emoji(tmp_path, vendors=("microsoft",))


def test_data_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JITROPE_DATA", str(tmp_path))
    assert D.data_root() == tmp_path and D.data_root("/x") == D.data_root("/x")


def test_pins_cover_every_vendor_of_the_default_version():
    for v in D.EMOJI_VENDORS:
        pin = D.PINS[(f"emoji-datasource-{v}", D.EMOJI_VERSION)]
        assert pin["integrity"].startswith("sha512-") and len(pin["sha256"]) == 64 and pin["n64"] > 3000


def test_heldout_split_is_fixed_and_order_independent():
    keys = [f"{i:05X}" for i in range(4000)]
    m = heldout_mask(keys, 0.05)
    assert 150 < int(m.sum()) < 250
    assert torch.equal(heldout_mask(keys, 0.05), m)
    perm = torch.randperm(4000, generator=torch.Generator().manual_seed(0)).tolist()
    assert torch.equal(heldout_mask([keys[i] for i in perm], 0.05), m[perm])
    assert (heldout_mask(keys, 0.10) | ~m).all()  # a larger fraction only adds items
    # every vendor of one emoji lands on the same side (the key is the emoji's code points)
    ds = make_synthetic(20, 8)
    assert heldout_mask(ds.split_keys, 0.3).tolist() == heldout_mask(list(ds.split_keys), 0.3).tolist()


def test_emoji_split_keeps_vendors_together(fake_npm):
    from jitrope.config import DataConfig

    cfg = DataConfig(name="emoji", root=str(fake_npm["root"]), img_size=32, vendors=("google", "twitter"), holdout=0.5)
    from jitrope.data import datasets as DS

    D_load = DS.load_emoji
    try:
        DS.load_emoji = lambda root, **kw: D_load(root, **{**kw, "version": VERSION, "npm": fake_npm["npm"]})
        tr = D.build_dataset(cfg, "train", log=lambda *_: None)
        va = D.build_dataset(cfg, "val", log=lambda *_: None)
    finally:
        DS.load_emoji = D_load
    assert len(tr) + len(va) == 9 and tr.images.shape[-1] == 32
    assert not set(tr.split_keys) & set(va.split_keys)


def test_image_folder_loader(tmp_path):
    for cls, colour in (("cats", (200, 0, 0)), ("dogs", (0, 0, 200))):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 30), colour).save(tmp_path / cls / "a.jpg")
        Image.new("RGBA", (20, 20), (*colour, 0)).save(tmp_path / cls / "b.png")  # fully transparent -> white
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path, 16)
    assert ds.class_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images.shape == (4, 3, 16, 16) and (ds.images[1] == 255).all()
    assert ds.names[2] == "dogs/a.jpg"
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder(tmp_path, 16)
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path, 16)


def _png_claiming(path, width, height):
    """A PNG whose header claims width x height pixels (its data is a 1x1 image)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (9, 9, 9)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


def test_an_image_claiming_a_huge_size_is_a_data_error(tmp_path, capsys):
    from jitrope import train as T

    (tmp_path / "set" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "set" / "a" / "ok.png")
    bomb = tmp_path / "set" / "a" / "huge.png"
    _png_claiming(bomb, 30000, 30000)
    with pytest.raises(DataError, match=f"{bomb}: unreadable image .*decompression bomb"):
        load_image_folder(tmp_path / "set", 8)
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")
    assert (
        T.main(
            [
                "--config",
                tiny,
                "model.pos_impl=torch",
                "data.name=folder",
                f"data.root={tmp_path / 'set'}",
                "data.img_size=16",
                "model.num_classes=1",
                f"train.out_dir={tmp_path / 'run'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bomb}: unreadable image") and err.count("\n") == 1, err


def test_images_of_any_bit_depth_convert_to_8_bit_rgba(tmp_path):
    from jitrope.data import to_rgba8

    g = np.random.default_rng(0)
    v16 = g.integers(0, 65536, size=(5, 7), dtype=np.uint16)
    Image.fromarray(v16).save(tmp_path / "g16.png")  # a 16-bit grayscale PNG
    vf = g.random((5, 7), dtype=np.float32)
    Image.fromarray(vf, "F").save(tmp_path / "f.tif")  # a float TIFF in [0, 1]
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        got = np.asarray(to_rgba8(im))
    want = np.rint(v16.astype(np.float64) / 257.0).astype(np.uint8)  # scaled, not clamped to white
    assert (
        got.shape == (5, 7, 4)
        and (got[..., 0] == want).all()
        and (got[..., 2] == want).all()
        and (got[..., 3] == 255).all()
    )
    with Image.open(tmp_path / "f.tif") as im:
        got = np.asarray(to_rgba8(im))
    assert (got[..., 1] == np.rint(vf.astype(np.float64) * 255).astype(np.uint8)).all()
    for bad, match in (
        (np.full((4, 4), 2.0, np.float32), r"float image values must lie in \[0, 1\]"),
        (np.full((4, 4), np.nan, np.float32), "float image values"),
    ):
        Image.fromarray(bad, "F").save(tmp_path / "bad.tif")
        with Image.open(tmp_path / "bad.tif") as im, pytest.raises(DataError, match=match):
            to_rgba8(im)
    with pytest.raises(DataError, match="32-bit integer image values"):
        to_rgba8(Image.fromarray(np.full((3, 3), -5, np.int32), "I"))
    # ordinary modes keep their exact 8-bit values
    rgb = g.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    assert (np.asarray(to_rgba8(Image.fromarray(rgb)))[..., :3] == rgb).all()
    assert (np.asarray(to_rgba8(Image.fromarray(rgb).convert("P")))[..., 3] == 255).all()
    # the folder loader uses it: a 16-bit class image is grey, not white
    (tmp_path / "set" / "a").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "set" / "a" / "mid.png")
    ds = load_image_folder(tmp_path / "set", 8)
    assert (ds.images == 128).all()


def test_resize_is_a_box_filter_for_integer_factors():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    assert resize_images(x, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    u8 = torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)
    assert torch.equal(resize_images(u8, 4), torch.full((1, 3, 4, 4), 200, dtype=torch.uint8))
    assert resize_images(u8, 6).shape == (1, 3, 6, 6)


def test_resize_non_square_batches_per_axis():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 4, generator=g)
    # the same integer factor on both axes: still whole blocks
    torch.testing.assert_close(resize_images(x, (4, 2)), torch.nn.functional.avg_pool2d(x, 2))
    # to a square (the feature network's size): the tall sample is squeezed, not cropped
    sq = resize_images(x, 4)
    assert sq.shape == (2, 3, 4, 4)
    want = torch.nn.functional.interpolate(x, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(sq, want)
    assert resize_images(x, (8, 4)) is x
    u8 = torch.full((1, 3, 6, 12), 77, dtype=torch.uint8)
    assert torch.equal(resize_images(u8, (9, 6)), torch.full((1, 3, 9, 6), 77, dtype=torch.uint8))


def test_index_stream_is_deterministic_resumable_and_sharded():
    a = IndexStream(10, seed=3)
    seq = [a.next(4) for _ in range(6)]  # crosses epochs
    assert sorted(torch.cat(seq[:2] + [seq[2][:2]]).tolist()) == list(range(10))
    b = IndexStream(10, seed=3)
    b.next(4)
    state = b.state_dict()
    c = IndexStream(10, seed=3)
    c.load_state_dict(state)
    assert all(torch.equal(c.next(4), s) for s in seq[1:])
    r0, r1 = IndexStream(10, seed=3, rank=0, world=2), IndexStream(10, seed=3, rank=1, world=2)
    for s in seq:
        x0, x1 = r0.next(4), r1.next(4)
        assert torch.equal(x0, s[0::2]) and torch.equal(x1, s[1::2])
    with pytest.raises(ValueError, match="divisible"):
        r0.next(3)
    with pytest.raises(ValueError, match="n=10"):
        IndexStream(11, seed=3).load_state_dict(state)


def test_batch_maker_conditions(fake_npm):
    ds = _load(fake_npm).resized(16)
    bm = BatchMaker(ds, cond="downsample", cond_size=8)
    x, y, cond = bm(torch.tensor([0, 5]))
    assert x.shape == (2, 3, 16, 16) and cond.shape == (2, 3, 8, 8) and -1 <= x.min() and x.max() <= 1
    torch.testing.assert_close(cond, resize_images(x, 8))
    ov = BatchMaker(ds, cond="other_vendor", cond_size=8)
    # item 0 (google 1F600) is paired with item 5 (twitter 1F600); 4 (google 1F3C0) has no partner
    _, _, c = ov(torch.tensor([0, 0, 4]), torch.tensor([[0.1, 0.9], [0.9, 0.9], [0.5, 0.9]]))
    torch.testing.assert_close(c[0], resize_images(D.to_float(ds.images[5:6]), 8)[0])
    torch.testing.assert_close(c[1], c[0])
    torch.testing.assert_close(c[2], resize_images(D.to_float(ds.images[4:5]), 8)[0])
    flip = BatchMaker(ds, hflip=True)
    xf, _, _ = flip(torch.tensor([0]), torch.tensor([[0.0, 0.1]]))
    torch.testing.assert_close(xf, D.to_float(ds.images[:1]).flip(-1))
    with pytest.raises(ValueError, match="cond_img_size"):
        BatchMaker(ds, cond="downsample")
    with pytest.raises(ValueError, match="data.cond"):
        BatchMaker(ds, cond="none", cond_size=8)


def test_synthetic_data_is_deterministic():
    a, b = make_synthetic(18, 16, seed=1), make_synthetic(18, 16, seed=1)
    assert torch.equal(a.images, b.images) and a.labels.tolist() == [i % 9 for i in range(18)]
    assert not torch.equal(a.images, make_synthetic(18, 16, seed=2).images)


def test_heldout_condition_picks_are_held_out_one_per_class(tmp_path):
    from jitrope.data import heldout_picks, make_synthetic, write_heldout_conditions

    ds = make_synthetic(300, 16, seed=3)
    held = heldout_mask(ds.split_keys, 0.2)
    picks = heldout_picks(ds, 0.2, 5)
    assert [int(ds.labels[i]) for i in picks] == list(range(5)) and all(held[i] for i in picks)
    # the first held-out item of its class, in data order
    assert all(not (held[:i] & (ds.labels[:i] == ds.labels[i])).any() for i in picks)
    paths = write_heldout_conditions(ds, tmp_path / "c", 8, holdout=0.2, num_classes=3)
    assert [p.name for p in paths] == [f"heldout_{k}_{ds.class_names[k].split()[0].lower()}.png" for k in range(3)]
    got = torch.from_numpy(np.array(Image.open(paths[1]))).permute(2, 0, 1)
    assert torch.equal(got, resize_images(ds.images[picks[1] : picks[1] + 1], 8)[0])
    with pytest.raises(DataError, match="num_classes must be in 1..9"):
        heldout_picks(ds, 0.2, 0)
    with pytest.raises(DataError, match="has no held-out item at holdout=0.0"):
        heldout_picks(ds, 0.0, 1)


def test_hidden_and_appledouble_files_are_skipped_and_counted(tmp_path):
    """macOS writes ._x.png beside each file on some drives: not an image, it used to stop the run."""
    from jitrope.sample import load_cond_images

    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / cls / "a.png")
        (tmp_path / cls / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "cats" / ".thumb.jpg").write_bytes(b"hidden")
    said = []
    ds = load_image_folder(tmp_path, 8, log=said.append)
    assert ds.names == ["cats/a.png", "dogs/a.png"]
    assert said == [
        f"read 2 images of 2 classes from {tmp_path} (skipped 3 hidden files: .* and the AppleDouble ._* of macOS)"
    ]
    assert load_cond_images(tmp_path / "cats", 8)[1] == ["a.png"]
