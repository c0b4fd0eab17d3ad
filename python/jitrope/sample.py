"""Sample a trained JiT: class-conditional grids and condition-image-following samples.

    python -m jitrope.sample --ckpt runs/emoji32 --out samples/grid.png
    python -m jitrope.sample --ckpt runs/emoji32 --classes "Smileys & Emotion,Animals & Nature" --n 8 --cfg 3
    python -m jitrope.sample --ckpt runs/emoji32 --cond my_cond_images/ --cfg 2 --sampler euler --steps 30
    python -m jitrope.sample --ckpt runs/emoji32 --config my_sampling.yaml sample.steps=30 model.pos_impl=torch

Writes the labelled grid to ``--out`` and every image to a folder beside it (``<out stem>/``).
Settings are config keys (``sample.*``, see :class:`jitrope.config.SampleConfig`), read as in
training: the run's stored config, then ``--config FILE``, then ``section.key=value`` overrides,
then the flags (each flag sets one key, e.g. ``--steps`` is ``sample.steps``).
The Python API (:func:`jitrope.checkpoint.load_model`, :func:`generate`, :func:`make_grid`,
:func:`condition_rows`) is what the trainer and ``jitrope.evaluate`` use.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checkpoint import CheckpointError, load_checkpoint, model_from_weights, run_config
from .cli import Flag, add_flags, check_image_out, fail, flag_layer
from .config import Config, ConfigError
from .data import (
    IMAGE_EXTENSIONS,
    DataError,
    composite_on_white,
    parse_sizes,
    resize_images,
    to_float,
    to_rgba8,
    to_uint8,
)
from .diffusion import SAMPLERS, Diffusion
from .posenc import IMPLS
from .runtime import cpu_setup, resolve_device

__all__ = [
    "generate",
    "generate_sizes",
    "make_size_grid",
    "make_grid",
    "condition_rows",
    "parse_classes",
    "load_cond_images",
    "SampleError",
    "FLAGS",
    "main",
]


class SampleError(ValueError):
    """Bad sampling input; the message says which and why."""


@torch.no_grad()
def generate(
    model,
    diffusion: Diffusion,
    labels: Tensor,
    cond: Optional[Tensor] = None,
    *,
    img_size=None,
    steps: int = 50,
    sampler: str = "heun",
    cfg: float = 1.0,
    cfg_interval: Sequence[float] = (0.1, 1.0),
    seed: int = 0,
    batch_size: int = 64,
    device="cpu",
    progress: Optional[Callable[[int], None]] = None,
) -> Tensor:
    """Samples (float in [-1, 1], on the CPU) for ``labels`` ([N] long) and optional ``cond`` ([N, 3, h, w]).

    ``img_size``: the model's (None), another square size, or ``(H, W)``.

    The noise of all N images comes from one generator seeded with ``seed``, so the result does not
    depend on ``batch_size``. ``progress(k)`` gets the number of sampler steps done in each batch.
    """
    n = labels.shape[0]
    size = img_size or model.cfg.img_size
    h, w = (size, size) if isinstance(size, int) else size
    noise = torch.randn(n, model.cfg.in_channels, h, w, generator=torch.Generator().manual_seed(seed))
    out = []
    autocast = torch.device(device).type == "cuda"
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        c = cond[sl].to(device) if cond is not None else None
        last = [0]

        def step_cb(k, last=last):
            if progress is not None:
                progress(k - last[0])
            last[0] = k

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            z = diffusion.sample(
                model,
                labels[sl].to(device),
                c,
                noise=noise[sl].to(device),
                steps=steps,
                sampler=sampler,
                cfg=cfg,
                cfg_interval=cfg_interval,
                null_class=model.null_class,
                progress=step_cb,
            )
        out.append(z.float().cpu())
    return torch.cat(out) if out else noise


@torch.no_grad()
def generate_sizes(
    model,
    diffusion: Diffusion,
    labels: Tensor,
    sizes: Sequence[Tuple[int, int]],
    *,
    steps: int = 50,
    sampler: str = "heun",
    cfg: float = 1.0,
    cfg_interval: Sequence[float] = (0.1, 1.0),
    seed: int = 0,
    device="cpu",
    progress: Optional[Callable[[int], None]] = None,
) -> List[Tensor]:
    """One sample per ``(labels[s], sizes[s])`` (images of different sizes and aspect ratios), all in one
    packed batch: one forward per network evaluation (:meth:`Diffusion.sample` with ``layout=``). A
    model with a condition image gets the null condition. Returns float ``[C, h, w]`` images on the CPU.

    The noise of image s is drawn after that of images 0..s-1 from one generator seeded with ``seed``."""
    from .packing import pack_images, unpack_images

    if len(sizes) != labels.shape[0]:
        raise ValueError(f"generate_sizes: {labels.shape[0]} labels for {len(sizes)} sizes")
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(model.cfg.in_channels, h, w, generator=g) for h, w in sizes]
    layout = model.packed_layout(list(sizes), device=device)
    p = model.cfg.patch_size
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
        z = diffusion.sample(
            model.forward_tokens,
            labels.to(device),
            None,
            noise=pack_images(noise, p).to(device),
            steps=steps,
            sampler=sampler,
            cfg=cfg,
            cfg_interval=cfg_interval,
            null_class=model.null_class,
            progress=progress,
            layout=layout,
        )
    return unpack_images(z.float().cpu(), layout, p)


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
    from PIL import Image, ImageDraw, ImageFont

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
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
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
    from tqdm import tqdm

    w = load_checkpoint(args.ckpt, allow_unverified=args.allow_unverified)
    cfg = run_config(w, args.config, args.overrides, flags)
    s = cfg.sample
    device = resolve_device(s.device, "sample.device")
    # the output before the work, so that no sampling is lost to a bad name (issue 18)
    out = check_image_out(s.out, "sample.out")
    singles = out.with_suffix("")
    if s.singles and singles.exists() and not singles.is_dir():
        raise ConfigError(
            f"config key sample.out: the single images go to {singles}, which is a file "
            "(set sample.singles=false, or another sample.out)"
        )
    cpu_setup(s.num_threads)
    model, info = model_from_weights(w, cfg, ema=s.ema, device=device)
    class_names = info["class_names"]
    img_size = s.img_size if s.img_size is not None else model.cfg.img_size
    if img_size % model.cfg.patch_size:
        raise ConfigError(
            f"config key sample.img_size: {img_size} is not a multiple of the patch size {model.cfg.patch_size}"
        )

    if s.sizes is not None:
        return _run_sizes(cfg, model, info, out, singles)

    conds, cond_names = None, None
    if s.cond is not None:
        if model.cfg.cond_img_size is None:
            raise SampleError(
                f"{info['path']}: this model takes no condition image (model.cond_img_size is null); "
                "drop --cond (sample.cond)"
            )
        csize = model.cfg.cond_img_size * img_size // model.cfg.img_size
        conds, cond_names = load_cond_images(s.cond, csize, resize=s.cond_resize)
        rows = len(conds)
        cls = parse_classes(s.classes, class_names) if s.classes is not None else [len(class_names)]
        if len(cls) == 1:
            cls = cls * rows
        elif len(cls) != rows:
            raise SampleError(f"--classes gives {len(cls)} classes for {rows} condition images; give 1 or {rows}")
        row_labels = [f"{n} | {class_names[c] if c < len(class_names) else 'null'}" for n, c in zip(cond_names, cls)]
        row_cond = conds
    else:
        cls = parse_classes(s.classes, class_names)
        row_labels = [class_names[c] if c < len(class_names) else "null" for c in cls]
        row_cond = None
    labels = torch.tensor(cls, dtype=torch.long).repeat_interleave(s.n)
    cond = row_cond.repeat_interleave(s.n, dim=0) if row_cond is not None else None

    diffusion = Diffusion.from_config(cfg.diffusion)
    interval = tuple(s.cfg_interval)
    n_batches = math.ceil(len(labels) / s.batch_size)
    bar = tqdm(total=n_batches * s.steps, desc="sampling", unit="step", disable=True if not s.progress else None)
    try:
        x = generate(
            model,
            diffusion,
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
    except ValueError as e:  # e.g. a grid the positional encoding cannot place
        raise SampleError(f"the model cannot sample this: {e}") from None
    finally:
        bar.close()

    u8 = imgs = to_uint8(x)
    ncol = s.n
    if row_cond is not None:  # the condition first in its row, at the sample size
        imgs, ncol = condition_rows(row_cond, u8, s.n), s.n + 1
    scale_f = s.scale if s.scale is not None else max(1, 64 // img_size)
    make_grid(imgs, ncol, row_labels=row_labels, scale=scale_f).save(out)
    if s.singles:
        from PIL import Image

        singles.mkdir(parents=True, exist_ok=True)
        for i in range(len(u8)):
            r, c = divmod(i, s.n)
            Image.fromarray(u8[i].permute(1, 2, 0).numpy()).save(
                singles / f"r{r:02d}_c{c:02d}_{_stem(row_labels[r])}.png"
            )
    print(
        f"wrote {out} ({len(labels)} samples, step {info['step']} {info['weights']}, {s.sampler} {s.steps} steps, "
        f"cfg {s.cfg} on {list(interval)})"
    )
    return out


def _stem(row_label: str) -> str:
    """A row label as part of a file name: letters and digits kept, the rest ``_``, 40 characters."""
    return "".join(ch if ch.isalnum() else "_" for ch in row_label)[:40]


def _run_sizes(cfg: Config, model, info: Mapping[str, Any], out: Path, singles: Path) -> Path:
    """``sample.sizes``: rows = classes, columns = sizes (``sample.n`` samples each), in one packed batch."""
    from tqdm import tqdm

    s = cfg.sample
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
    class_names = info["class_names"]
    cls = parse_classes(s.classes, class_names)
    row_labels = [class_names[c] if c < len(class_names) else "null" for c in cls]
    # row-major: class r, then size k, then sample j
    labels = torch.tensor(cls, dtype=torch.long).repeat_interleave(len(sizes) * s.n)
    grid_sizes = [hw for _ in cls for hw in sizes for _ in range(s.n)]
    diffusion = Diffusion.from_config(cfg.diffusion)
    interval = tuple(s.cfg_interval)
    device = next(model.parameters()).device
    bar = tqdm(total=s.steps, desc="sampling", unit="step", disable=True if not s.progress else None)
    try:
        xs = generate_sizes(
            model,
            diffusion,
            labels,
            grid_sizes,
            steps=s.steps,
            sampler=s.sampler,
            cfg=s.cfg,
            cfg_interval=interval,
            seed=s.seed,
            device=device,
            progress=lambda k: bar.update(1),
        )
    except ValueError as e:  # e.g. a grid the positional encoding cannot place
        raise SampleError(f"the model cannot sample this: {e}") from None
    finally:
        bar.close()
    side = max(max(hw) for hw in sizes)
    scale_f = s.scale if s.scale is not None else max(1, 64 // side)
    make_size_grid(xs, len(sizes) * s.n, row_labels=row_labels, scale=scale_f).save(out)
    if s.singles:
        from PIL import Image

        singles.mkdir(parents=True, exist_ok=True)
        for i, x in enumerate(xs):
            r, c = divmod(i, len(sizes) * s.n)
            h, w = x.shape[-2:]
            Image.fromarray(to_uint8(x).permute(1, 2, 0).numpy()).save(
                singles / f"r{r:02d}_c{c:02d}_{h}x{w}_{_stem(row_labels[r])}.png"
            )
    print(
        f"wrote {out} ({len(xs)} samples at {len(sizes)} sizes in one packed batch, step {info['step']} "
        f"{info['weights']}, {s.sampler} {s.steps} steps, cfg {s.cfg} on {list(interval)})"
    )
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # flags may come between the overrides
    layer, names = flag_layer(args, FLAGS)
    try:
        run(args, layer)
    except (SampleError, CheckpointError, DataError, ConfigError, OSError) as e:
        return fail(e, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
