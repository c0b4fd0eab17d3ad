"""Sample a trained JiT: class-conditional grids and condition-image-following samples.

    python -m jitrope.sample --ckpt runs/emoji32 --out samples/grid.png
    python -m jitrope.sample --ckpt runs/emoji32 --classes "Smileys & Emotion,Animals & Nature" --n 8 --cfg 3
    python -m jitrope.sample --ckpt runs/emoji32 --cond my_cond_images/ --cfg 2 --sampler euler --steps 30

Writes the labelled grid to ``--out`` and every image to a folder beside it (``<out stem>/``).
The Python API (:func:`load_model`, :func:`generate`, :func:`make_grid`) is what the trainer and
``jitrope.evaluate`` use.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checkpoint import CheckpointError, check_state_dict, load_weights, resolve_checkpoint
from .config import ConfigError, config_from_dict
from .data import IMAGE_EXTENSIONS, DataError, _composite_on_white, resize_images, to_float, to_rgba8, to_uint8
from .diffusion import Diffusion
from .fileio import check_writable_dir

__all__ = ["load_model", "generate", "make_grid", "parse_classes", "load_cond_images", "main"]


class SampleError(ValueError):
    """Bad sampling input; the message says which and why."""


def load_model(ckpt, *, ema: str = "0", device="cpu", pos_impl: Optional[str] = None):
    """Load a checkpoint (run folder, ``step_*`` folder or weights file) for sampling.

    ``ema``: "0" / "1" (which EMA; SPEC: the 0.9999 one is sampled) or "none" (raw weights).
    Returns ``(model in eval mode, Config of the run, info)``; info has step, path, weights (which
    set), ema_decays and class_names.
    """
    from .model import JiT

    w = load_weights(ckpt)
    path = w["path"]
    try:
        stored = dict(w["config"])
        if w.get("model_config"):  # the resolved fields: independent of later changes to presets
            stored["model"] = dict(w["model_config"])
        if pos_impl is not None:
            stored["model"] = {**stored.get("model", {}), "pos_impl": pos_impl}
        cfg = config_from_dict(stored, where=f"config stored in {path}", stored=True)
        mcfg = cfg.model_config()
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its stored config does not build a model: {e}") from None
    model = JiT(mcfg)
    if ema in ("none", "raw", "model"):
        sd, which = w["model"], "model"
    else:
        try:
            i = int(ema)
            sd = w["emas"][i]
        except (ValueError, IndexError):
            raise CheckpointError(f"{path} has {len(w['emas'])} EMA(s) ({w['ema_decays']}); --ema {ema!r} is not one of them") from None
        which = f"ema{i}"
    check_state_dict(model.state_dict(), sd, where=f"{path} [{which}]")
    model.load_state_dict(sd)
    model.to(device).eval()
    names = list(w["class_names"])
    if len(names) != mcfg.num_classes:
        names = [f"class {i}" for i in range(mcfg.num_classes)]
    info = {"step": w["step"], "path": path, "weights": which, "ema_decays": w["ema_decays"], "class_names": names}
    return model, cfg, info


@torch.no_grad()
def generate(
    model,
    diffusion: Diffusion,
    labels: Tensor,
    cond: Optional[Tensor] = None,
    *,
    img_size: Optional[int] = None,
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

    The noise of all N images comes from one generator seeded with ``seed``, so the result does not
    depend on ``batch_size``. ``progress(k)`` gets the number of sampler steps done in each batch.
    """
    n = labels.shape[0]
    size = img_size or model.cfg.img_size
    noise = torch.randn(n, model.cfg.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
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
                raise SampleError(f"class index {i} is out of range 0..{len(class_names) - 1} (or {len(class_names)} = null)")
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
                out.append(_composite_on_white(im))
        except (UnidentifiedImageError, OSError, DataError) as e:
            raise SampleError(f"cannot read condition image {f}: {e}") from None
    return to_float(torch.stack(out)), [f.name for f in files]


def _parse_interval(s: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cfg-interval wants LO,HI (e.g. 0.1,1.0), got {s!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"--cfg-interval needs 0 <= LO <= HI <= 1, got {s!r}")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jitrope.sample",
        description="Sample a trained JiT checkpoint into a labelled grid PNG (plus the single images). "
        "Without --cond: one row per class. With --cond: one row per condition image, the condition "
        "shown first. Defaults for steps/sampler/cfg come from the run's config (sample.*).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="run folder (newest checkpoint), checkpoints/step_* folder, or weights.safetensors")
    p.add_argument("--out", default="samples.png", help="grid PNG; single images go to a folder named after it")
    p.add_argument("--classes", default=None, help="comma-separated class names or indices, 'all', or 'null' (unconditional); "
                   "with --cond: one class for all rows or one per condition image (default: null)")
    p.add_argument("--n", type=int, default=8, help="samples per row")
    p.add_argument("--cond", default=None, help="condition image, or folder of them (size model.cond_img_size)")
    p.add_argument("--cond-resize", action="store_true", help="resize condition images of another size instead of failing")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (1 = no guidance)")
    p.add_argument("--cfg-interval", type=_parse_interval, default=None, help="LO,HI: guide only for t in [LO, HI]")
    p.add_argument("--sampler", choices=("heun", "euler"), default=None)
    p.add_argument("--steps", type=int, default=None, help="sampler steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=None, help="sample at another size (where the positional encoding allows)")
    p.add_argument("--ema", default=None, help="which weights: EMA index 0 / 1, or none (raw); default sample.ema of the run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--num-threads", type=int, default=None, help="CPU threads (default: torch's; 1 is fastest on a busy machine)")
    p.add_argument("--pos-impl", choices=("fused", "torch"), default=None, help="override model.pos_impl")
    p.add_argument("--scale", type=int, default=None, help="upscale factor of the grid (default: to about 64 px per image)")
    p.add_argument("--no-singles", action="store_true", help="write the grid only")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _cpu_setup(num_threads: Optional[int]) -> None:
    torch.set_flush_denormal(True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def check_args(args) -> None:
    """Refuse numbers that make no sense before any work; a given 0 never means "the default"."""
    for name in ("n", "batch_size", "steps", "img_size", "scale", "num_threads"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise SampleError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        raise SampleError(f"--cfg (guidance scale) must be a finite number >= 0, got {args.cfg}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(name)
    except RuntimeError:
        raise SampleError(f"--device {name!r} is not a device (auto | cpu | cuda | cuda:N)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {name}: this machine has no usable CUDA device; use --device cpu or auto")
    return d


def run(args) -> Path:
    from tqdm import tqdm

    check_args(args)
    device = _device(args.device)
    _cpu_setup(args.num_threads)
    out = Path(args.out)
    check_writable_dir(out.parent, "the folder of --out")  # before sampling, so no work is lost
    ckpt = resolve_checkpoint(args.ckpt)  # verified once; a run folder falls back past damaged ones
    w_cfg = load_weights(ckpt)["config"]  # cheap enough; gives the default EMA before building
    ema = args.ema if args.ema is not None else str((w_cfg.get("sample") or {}).get("ema", "0"))
    model, cfg, info = load_model(ckpt, ema=ema, device=device, pos_impl=args.pos_impl)
    s = cfg.sample
    steps = args.steps if args.steps is not None else s.steps
    sampler = args.sampler or s.sampler
    scale = args.cfg if args.cfg is not None else s.cfg
    interval = args.cfg_interval or tuple(s.cfg_interval)
    class_names = info["class_names"]
    img_size = args.img_size if args.img_size is not None else model.cfg.img_size
    if img_size % model.cfg.patch_size:
        raise SampleError(f"--img-size {img_size} is not a multiple of the patch size {model.cfg.patch_size}")

    conds, cond_names = None, None
    if args.cond is not None:
        if model.cfg.cond_img_size is None:
            raise SampleError(f"{info['path']}: this model takes no condition image (model.cond_img_size is null); drop --cond")
        csize = model.cfg.cond_img_size * img_size // model.cfg.img_size
        conds, cond_names = load_cond_images(args.cond, csize, resize=args.cond_resize)
        rows = len(conds)
        cls = parse_classes(args.classes, class_names) if args.classes is not None else [len(class_names)]
        if len(cls) == 1:
            cls = cls * rows
        elif len(cls) != rows:
            raise SampleError(f"--classes gives {len(cls)} classes for {rows} condition images; give 1 or {rows}")
        row_labels = [f"{n} | {class_names[c] if c < len(class_names) else 'null'}" for n, c in zip(cond_names, cls)]
        row_cond = conds
    else:
        cls = parse_classes(args.classes, class_names)
        row_labels = [class_names[c] if c < len(class_names) else "null" for c in cls]
        row_cond = None
    labels = torch.tensor(cls, dtype=torch.long).repeat_interleave(args.n)
    cond = row_cond.repeat_interleave(args.n, dim=0) if row_cond is not None else None

    diffusion = Diffusion.from_config(cfg.diffusion)
    n_batches = math.ceil(len(labels) / args.batch_size)
    bar = tqdm(total=n_batches * steps, desc="sampling", unit="step", disable=True if args.no_progress else None)
    try:
        x = generate(model, diffusion, labels, cond, img_size=img_size, steps=steps, sampler=sampler, cfg=scale,
                     cfg_interval=interval, seed=args.seed, batch_size=args.batch_size, device=device, progress=bar.update)
    except ValueError as e:  # e.g. a grid the positional encoding cannot place
        raise SampleError(f"the model cannot sample this: {e}") from None
    finally:
        bar.close()

    imgs = to_uint8(x)
    ncol = args.n
    if row_cond is not None:  # show the condition (upscaled to the sample size) first in its row
        shown = to_uint8(resize_images(row_cond, img_size) if row_cond.shape[-1] > img_size else
                         torch.nn.functional.interpolate(row_cond, size=(img_size, img_size), mode="nearest"))
        imgs = torch.cat([torch.cat([shown[r : r + 1], imgs[r * args.n : (r + 1) * args.n]]) for r in range(len(row_cond))])
        ncol += 1
    scale_f = args.scale if args.scale is not None else max(1, 64 // img_size)
    make_grid(imgs, ncol, row_labels=row_labels, scale=scale_f).save(out)
    if not args.no_singles:
        from PIL import Image

        d = out.with_suffix("")
        d.mkdir(parents=True, exist_ok=True)
        u8 = to_uint8(x)
        for i in range(len(u8)):
            r, c = divmod(i, args.n)
            name = "".join(ch if ch.isalnum() else "_" for ch in row_labels[r])[:40]
            Image.fromarray(u8[i].permute(1, 2, 0).numpy()).save(d / f"r{r:02d}_c{c:02d}_{name}.png")
    print(f"wrote {out} ({len(labels)} samples, step {info['step']} {info['weights']}, {sampler} {steps} steps, cfg {scale} on {list(interval)})")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (SampleError, CheckpointError, DataError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
