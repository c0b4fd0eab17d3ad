"""Sample a trained JiT: class-conditional grids and condition-image-following samples.

    python -m jitrope.sample --ckpt runs/emoji32 --out samples/grid.png
    python -m jitrope.sample --ckpt runs/emoji32 --classes "Smileys & Emotion,Animals & Nature" --n 8 --cfg 3
    python -m jitrope.sample --ckpt runs/emoji32 --cond my_cond_images/ --cfg 2 --sampler euler --steps 30
    python -m jitrope.sample --ckpt runs/emoji32 --config my_sampling.yaml sample.steps=30 model.pos_impl=torch

Writes the labelled grid to ``--out`` and every image to a folder beside it (``<out stem>/``).
Settings are config keys (``sample.*``, see :class:`jitrope.config.SampleConfig`), read as in
training: the run's stored config, then ``--config FILE``, then ``section.key=value`` overrides,
then the flags (each flag sets one key, e.g. ``--steps`` is ``sample.steps``).
This module is the command line only: the model comes from :func:`jitrope.checkpoint.load_model`
(or its parts), the samples from :mod:`jitrope.sampling`, the grids and files from :mod:`jitrope.grids`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, model_from_weights, run_config
from .cli import Flag, add_flags, check_image_out, fail, flag_layer
from .config import Config, ConfigError, SampleConfig
from .data import (
    IMAGE_EXTENSIONS,
    DataError,
    composite_on_white,
    image_files,
    parse_sizes,
    to_float,
    to_rgba8,
    to_uint8,
)
from .diffusion import SAMPLERS, Diffusion
from .grids import condition_rows, label_stem, make_grid, make_size_grid, save_image
from .posenc import IMPLS
from .runtime import cpu_setup, resolve_device
from .sampling import NonFiniteSamples, generate, generate_sizes

__all__ = [
    "run",
    "parse_classes",
    "load_cond_images",
    "SampleError",
    "FLAGS",
    "main",
]


class SampleError(ValueError):
    """Bad sampling input; the message says which and why."""


def parse_classes(spec: Optional[str], class_names: Sequence[str]) -> List[int]:
    """``"0,3"``, ``"Smileys & Emotion,Flags"``, ``"all"`` or ``"null"`` (unconditional) -> indices.

    Names match case-insensitively, or by a unique prefix. The null class is ``len(class_names)``.
    """
    if spec is None or spec.strip().lower() == "all":
        return list(range(len(class_names)))
    out = []
    lower = [c.lower() for c in class_names]
    for tok in [s.strip() for s in spec.split(",") if s.strip()]:
        if tok.lower() in ("null", "none", "uncond"):
            out.append(len(class_names))
        elif tok.lstrip("-").isdigit():
            i = int(tok)
            if not 0 <= i <= len(class_names):
                raise SampleError(
                    f"class index {i} is out of range 0..{len(class_names) - 1} (or {len(class_names)} = null)"
                )
            out.append(i)
        elif tok.lower() in lower:
            out.append(lower.index(tok.lower()))
        else:
            hits = [i for i, c in enumerate(lower) if c.startswith(tok.lower())]
            if len(hits) != 1:
                known = ", ".join(f"{i}: {c}" for i, c in enumerate(class_names))
                raise SampleError(f"unknown class {tok!r}; the model's classes are {known} (or 'null')")
            out.append(hits[0])
    if not out:
        raise SampleError(f"no classes in {spec!r}")
    return out


def load_cond_images(path, size: int, *, resize: bool = False) -> Tuple[Tensor, List[str]]:
    """Condition images from a file or a folder of images -> float ``[N, 3, size, size]`` and names.

    Transparency is composited on white (as in training). Wrong sizes are an error unless ``resize``.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files, _ = image_files(p)  # not the hidden ones: the AppleDouble ._x.png of macOS is no image
        if not files:
            raise SampleError(f"condition folder {p} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    elif p.is_file():
        files = [p]
    else:
        raise SampleError(f"condition image {p} does not exist")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                if im.size != (size, size):
                    if not resize:
                        raise SampleError(
                            f"condition image {f} is {im.size[0]}x{im.size[1]}, the model expects {size}x{size} "
                            "(model.cond_img_size); pass --cond-resize to resize it"
                        )
                    im = to_rgba8(im).resize((size, size), Image.LANCZOS)
                out.append(composite_on_white(im))
        # DecompressionBombError: a header claiming more pixels than PIL's limit, refused before decoding
        except (UnidentifiedImageError, OSError, DataError, Image.DecompressionBombError) as e:
            raise SampleError(f"cannot read condition image {f}: {e}") from None
    return to_float(torch.stack(out)), [f.name for f in files]


def _parse_interval(s: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cfg-interval wants LO,HI (e.g. 0.1,1.0), got {s!r}") from None
    return lo, hi


# Every flag sets one config key; the key's value in the run's config, --config and the overrides
# stands where the flag is not given.
FLAGS = (
    Flag("--out", "sample.out", "grid image (.png, .jpg, ...); single images go to a folder named after it"),
    Flag(
        "--classes",
        "sample.classes",
        "comma-separated class names or indices, 'all', or 'null' (unconditional); "
        "with --cond: one class for all rows or one per condition image (default: null)",
    ),
    Flag("--n", "sample.n", "samples per row", {"type": int}),
    Flag("--cond", "sample.cond", "condition image, or folder of them (size model.cond_img_size)"),
    Flag(
        "--cond-resize",
        "sample.cond_resize",
        "resize condition images of another size instead of failing",
        {"action": "store_const", "const": True},
    ),
    Flag("--cfg", "sample.cfg", "guidance scale (1 = no guidance)", {"type": float}),
    Flag("--cfg-interval", "sample.cfg_interval", "LO,HI: guide only for t in [LO, HI]", {"type": _parse_interval}),
    Flag("--sampler", "sample.sampler", "sampler", {"choices": tuple(SAMPLERS)}),
    Flag("--steps", "sample.steps", "sampler steps", {"type": int}),
    Flag("--seed", "sample.seed", "noise seed", {"type": int}),
    Flag("--batch-size", "sample.batch_size", "images per forward pass", {"type": int}),
    Flag(
        "--sizes",
        "sample.sizes",
        "HxW,HxW,...: one grid of every class (rows) at every size (columns, --n "
        "each), all sizes in one packed forward per step",
    ),
    Flag(
        "--max-tokens",
        "sample.max_tokens",
        "the most image tokens sampled together (one packed batch, or one batch); more is refused",
        {"type": int},
    ),
    Flag(
        "--img-size", "sample.img_size", "sample at another size (where the positional encoding allows)", {"type": int}
    ),
    Flag("--ema", "sample.ema", "which weights: EMA index 0 / 1, or none (raw)"),
    Flag("--device", "sample.device", "auto | cpu | cuda | cuda:N"),
    Flag(
        "--num-threads",
        "sample.num_threads",
        "CPU threads (default: torch's; 1 is fastest on a busy machine)",
        {"type": int},
    ),
    Flag("--pos-impl", "model.pos_impl", "op implementation of the positional encoding", {"choices": IMPLS}),
    Flag("--scale", "sample.scale", "upscale factor of the grid (default: to about 64 px per image)", {"type": int}),
    Flag("--no-singles", "sample.singles", "write the grid only", {"action": "store_const", "const": False}),
    Flag("--no-progress", "sample.progress", "hide the progress bar", {"action": "store_const", "const": False}),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jitrope.sample",
        description="Sample a trained JiT checkpoint into a labelled grid PNG (plus the single images). "
        "Without --cond: one row per class. With --cond: one row per condition image, the condition "
        "shown first. Settings are the config keys in brackets, from the run's config (sample.*), "
        "--config FILE and section.key=value overrides; a flag sets its key.",
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="run folder (newest checkpoint), checkpoints/step_* folder, or weights.safetensors",
    )
    p.add_argument("--config", help="YAML file of config keys (e.g. a sample: section), over the run's config")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (values parsed as YAML)")
    p.add_argument(
        "--allow-unverified", action="store_true", help="load a checkpoint that has no manifest to verify its files by"
    )
    add_flags(p, FLAGS)
    return p


def run(args: argparse.Namespace, flags: Optional[Mapping[str, Any]] = None) -> Path:
    """Sample as ``args`` (from :func:`build_parser`) and the typed ``flags`` layer say; returns the grid's path."""
    w = load_checkpoint(args.ckpt, allow_unverified=args.allow_unverified)
    cfg = run_config(w, args.config, args.overrides, flags)
    s = cfg.sample
    device = resolve_device(s.device, "sample.device")
    out, singles = _outputs(s)  # the output before the work, so that no sampling is lost to a bad name
    cpu_setup(s.num_threads)
    model, info = model_from_weights(w, cfg, ema=s.ema, device=device)
    img_size = s.img_size if s.img_size is not None else model.cfg.img_size
    if img_size % model.cfg.patch_size:
        raise ConfigError(
            f"config key sample.img_size: {img_size} is not a multiple of the patch size {model.cfg.patch_size}"
        )
    if s.sizes is not None:
        return _run_sizes(cfg, model, info, out, singles)
    return _run_rows(cfg, model, info, img_size, device, out, singles)


def _outputs(s: SampleConfig) -> Tuple[Path, Path]:
    """The grid image to write and the folder of the single images beside it, both checked."""
    out = check_image_out(s.out, "sample.out")
    singles = out.with_suffix("")
    if s.singles and singles.exists() and not singles.is_dir():
        raise ConfigError(
            f"config key sample.out: the single images go to {singles}, which is a file "
            "(set sample.singles=false, or another sample.out)"
        )
    return out, singles


def _class_name(c: int, class_names: Sequence[str]) -> str:
    return class_names[c] if c < len(class_names) else "null"


def _rows(s: SampleConfig, model, info: Mapping[str, Any], img_size: int) -> Tuple[List[int], List[str], Any]:
    """The rows of the grid: ``(class of each row, row labels, condition image of each row or None)``;
    one row per class, or with ``sample.cond`` one per condition image."""
    class_names = info["class_names"]
    if s.cond is None:
        cls = parse_classes(s.classes, class_names)
        return cls, [_class_name(c, class_names) for c in cls], None
    mc = model.cfg
    if mc.cond_img_size is None:
        raise SampleError(
            f"{info['path']}: this model takes no condition image (model.cond_img_size is null); "
            "drop --cond (sample.cond)"
        )
    conds, cond_names = load_cond_images(s.cond, mc.cond_img_size * img_size // mc.img_size, resize=s.cond_resize)
    rows = len(conds)
    cls = parse_classes(s.classes, class_names) if s.classes is not None else [len(class_names)]
    if len(cls) == 1:
        cls = cls * rows
    elif len(cls) != rows:
        raise SampleError(f"--classes gives {len(cls)} classes for {rows} condition images; give 1 or {rows}")
    return cls, [f"{n} | {_class_name(c, class_names)}" for n, c in zip(cond_names, cls)], conds


@contextlib.contextmanager
def _sampling(total_steps: int, show: bool):
    """A progress bar over ``total_steps`` sampler steps; a ValueError of the sampling (e.g. a grid the
    positional encoding cannot place) becomes a SampleError."""
    bar = tqdm(total=total_steps, desc="sampling", unit="step", disable=True if not show else None)
    try:
        yield bar
    except ValueError as e:
        raise SampleError(f"the model cannot sample this: {e}") from None
    finally:
        bar.close()


def _run_rows(cfg: Config, model, info: Mapping[str, Any], img_size: int, device, out: Path, singles: Path) -> Path:
    """``sample.n`` samples per row (:func:`_rows`) at ``img_size``, a condition image first in its row."""
    s = cfg.sample
    cls, row_labels, row_cond = _rows(s, model, info, img_size)
    labels = torch.tensor(cls, dtype=torch.long).repeat_interleave(s.n)
    cond = row_cond.repeat_interleave(s.n, dim=0) if row_cond is not None else None
    batch = min(s.batch_size, len(labels))
    tokens = (img_size // model.cfg.patch_size) ** 2 * batch
    if tokens > s.max_tokens:
        raise ConfigError(
            f"config key sample.img_size: a batch of {batch} images of {img_size}x{img_size} takes {tokens} image "
            f"tokens, over the sampler's limit sample.max_tokens={s.max_tokens}; lower sample.batch_size, or raise "
            "sample.max_tokens"
        )
    interval = tuple(s.cfg_interval)
    with _sampling(math.ceil(len(labels) / s.batch_size) * s.steps, s.progress) as bar:
        x = generate(
            model,
            Diffusion.from_config(cfg.diffusion),
            labels,
            cond,
            img_size=img_size,
            steps=s.steps,
            sampler=s.sampler,
            cfg=s.cfg,
            cfg_interval=interval,
            seed=s.seed,
            batch_size=s.batch_size,
            device=device,
            progress=bar.update,
        )
    u8 = imgs = to_uint8(x)
    ncol = s.n
    if row_cond is not None:  # the condition first in its row, at the sample size
        imgs, ncol = condition_rows(row_cond, u8, s.n), s.n + 1
    scale_f = s.scale if s.scale is not None else max(1, 64 // img_size)
    make_grid(imgs, ncol, row_labels=row_labels, scale=scale_f).save(out)
    if s.singles:
        singles.mkdir(parents=True, exist_ok=True)
        for i in range(len(u8)):
            r, c = divmod(i, s.n)
            save_image(u8[i], singles / f"r{r:02d}_c{c:02d}_{label_stem(row_labels[r])}.png")
    print(
        f"wrote {out} ({len(labels)} samples, step {info['step']} {info['weights']}, {s.sampler} {s.steps} steps, "
        f"cfg {s.cfg} on {list(interval)})"
    )
    return out


def _run_sizes(cfg: Config, model, info: Mapping[str, Any], out: Path, singles: Path) -> Path:
    """``sample.sizes``: rows = classes, columns = sizes (``sample.n`` samples each), in one packed batch."""
    s = cfg.sample
    sizes = _sizes(s, model)
    class_names = info["class_names"]
    cls = parse_classes(s.classes, class_names)
    row_labels = [_class_name(c, class_names) for c in cls]
    # row-major: class r, then size k, then sample j
    labels = torch.tensor(cls, dtype=torch.long).repeat_interleave(len(sizes) * s.n)
    grid_sizes = [hw for _ in cls for hw in sizes for _ in range(s.n)]
    p = model.cfg.patch_size
    tokens = sum((h // p) * (w // p) for h, w in grid_sizes)
    if tokens > s.max_tokens:  # all of them in one packed batch
        raise ConfigError(
            f"config key sample.sizes: {len(cls)} classes x {len(sizes)} sizes x {s.n} samples take {tokens} image "
            f"tokens in one packed batch, over the sampler's limit sample.max_tokens={s.max_tokens}; sample fewer "
            "classes, sizes or samples (sample.n), or raise sample.max_tokens"
        )
    interval = tuple(s.cfg_interval)
    with _sampling(s.steps, s.progress) as bar:
        xs = generate_sizes(
            model,
            Diffusion.from_config(cfg.diffusion),
            labels,
            grid_sizes,
            steps=s.steps,
            sampler=s.sampler,
            cfg=s.cfg,
            cfg_interval=interval,
            seed=s.seed,
            device=next(model.parameters()).device,
            progress=lambda k: bar.update(1),
        )
    side = max(max(hw) for hw in sizes)
    scale_f = s.scale if s.scale is not None else max(1, 64 // side)
    make_size_grid(xs, len(sizes) * s.n, row_labels=row_labels, scale=scale_f).save(out)
    if s.singles:
        singles.mkdir(parents=True, exist_ok=True)
        for i, x in enumerate(xs):
            r, c = divmod(i, len(sizes) * s.n)
            h, w = x.shape[-2:]
            save_image(x, singles / f"r{r:02d}_c{c:02d}_{h}x{w}_{label_stem(row_labels[r])}.png")
    print(
        f"wrote {out} ({len(xs)} samples at {len(sizes)} sizes in one packed batch, step {info['step']} "
        f"{info['weights']}, {s.sampler} {s.steps} steps, cfg {s.cfg} on {list(interval)})"
    )
    return out


def _sizes(s: SampleConfig, model) -> List[Tuple[int, int]]:
    """The sizes of ``sample.sizes``, each one the model can sample (class rows, the null condition)."""
    if s.cond is not None:
        raise SampleError(
            "sample.sizes samples class rows with the null condition; drop --cond (sample.cond), "
            "or sample a condition grid at one size with --img-size"
        )
    if s.img_size is not None:
        raise SampleError(
            "sample.sizes and sample.img_size both give the size; keep one (sample.sizes=null samples one size)"
        )
    sizes = parse_sizes(s.sizes, "config key sample.sizes")
    for h, w in dict.fromkeys(sizes):  # each size alone first, so that an error names it
        try:
            model.packed_layout([(h, w)])
        except ValueError as e:
            raise SampleError(f"config key sample.sizes: the model cannot sample {h}x{w}: {e}") from None
    return sizes


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # flags may come between the overrides
    layer, names = flag_layer(args, FLAGS)
    try:
        run(args, layer)
    except (SampleError, CheckpointError, DataError, ConfigError, OSError, NonFiniteSamples) as e:
        return fail(e, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
