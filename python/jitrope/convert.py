"""Published JiT checkpoints (the official ``model_jit.py``) as jitrope checkpoint folders.

    python -m jitrope.convert checkpoint-last.pth --preset JiT-B/16 --out runs/jit_b16
    python -m jitrope.convert checkpoint-last.pth --preset JiT-B/32 --out runs/jit_b32 --weights ema2 \\
        diffusion.noise_scale=2.0
    python -m jitrope.sample --ckpt runs/jit_b16 --classes 207,360 --out grid.png

The input is a published ``checkpoint-last.pth`` or a bare state dict, read safely and mapped onto
jitrope's names by :mod:`jitrope.published`. Every published key is used and every jitrope
parameter is filled, or the conversion names what is not (one ``error:`` line, exit 2). The folder
written is a run folder (``config.yaml`` and ``checkpoints/step_00000000/`` with its manifest)
holding the chosen weights as the raw weights (``sample.ema: none``). It is as careful as training:
weights that are not finite, or whose forward of a fixed probe batch is not, are refused, and an
``--out`` that holds a run, a checkpoint or a lock is refused unless ``--add`` says to add to it
(never while another process holds its lock).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from .cli import fail
from .config import ConfigError, load_config
from .diffusion import Diffusion
from .fileio import LOCK_FILE, LockedError, check_writable_dir, exclusive_lock
from .model import JiT
from .published import PUBLISHED_POS_EMBED, WEIGHTS, ConvertError, convert_state_dict, read_published
from .usable import probe_loss

__all__ = ["convert", "main"]


def convert(
    src, out, *, preset: str, overrides: Sequence[str] = (), weights: Optional[str] = None, add: bool = False, log=print
) -> Path:
    """Convert the published checkpoint or state dict ``src`` into a jitrope run folder ``out`` with
    the model ``preset`` (and ``section.key=value`` overrides, e.g. ``model.pos_impl=torch``);
    returns the checkpoint folder written.

    As careful as training: ``out`` must not hold a run, a checkpoint or a lock, unless ``add``
    (then it is locked as a trainer locks its folder, so never while another process holds it, and
    neither a ``step_00000000`` nor a ``config.yaml`` there is replaced); weights that are not
    finite, or whose forward of the probe batch is not, are refused (:mod:`jitrope.usable`)."""
    cfg = load_config(None, overrides, flags={"model": {"preset": preset}, "sample": {"ema": "none"}})
    mcfg = cfg.model_config()
    cfg.data.img_size = mcfg.img_size
    out = Path(out).expanduser()
    _check_out(out, add)
    check_writable_dir(out, "--out")  # before reading a large file
    if mcfg.pos_embed != PUBLISHED_POS_EMBED:
        log(
            f"warning: model.pos_embed={mcfg.pos_embed!r}: the published JiT uses {PUBLISHED_POS_EMBED!r}, so the "
            "converted model computes another function with these weights"
        )
    with exclusive_lock(out, "--out", log=lambda m: log(f"warning: {m}")):
        _check_out(out, add, locked=True)  # what another process may have written before the lock
        sd, what, info = read_published(src, weights)
        model = JiT(mcfg)
        mapped, dropped = convert_state_dict(sd, model, where=what)
        model.load_state_dict(mapped)  # strict: the check above and torch's agree
        loss = probe_loss(model, Diffusion.from_config(cfg.diffusion))
        if not math.isfinite(loss):
            raise ConvertError(
                f"{what}: these weights give a loss of {loss} on the probe batch, so they cannot sample; nothing "
                "was written"
            )
        ckpt = save_checkpoint(out, 0, model=mapped, config=cfg.to_dict(), model_config=mcfg.to_dict(), keep_last=0)
        if not (out / "config.yaml").exists():
            cfg.save(out / "config.yaml")  # as a training run has it
    epoch = f", published epoch {info['epoch']}" if "epoch" in info else ""
    log(
        f"wrote {ckpt} from {what} ({len(sd)} tensors{epoch}; derived tables dropped: "
        f"{', '.join(dropped) or 'none'}): {preset}, {sum(v.numel() for v in mapped.values()) / 1e6:.1f}M values"
    )
    return ckpt


def _check_out(out: Path, add: bool, locked: bool = False) -> None:
    """``--out`` holds no run, checkpoint or lock (``add``: it may, but not a ``step_00000000``)."""
    first = latest_checkpoint(out)
    if add:
        if (out / "checkpoints" / "step_00000000").exists():
            raise ConvertError(f"--out {out} already holds checkpoints/step_00000000; choose another folder")
        return
    held = [
        what
        for what, there in (
            ("a run (config.yaml)", (out / "config.yaml").exists()),
            (f"checkpoints ({first.name if first else ''})", first is not None),
            ("a lock (.lock)", not locked and os.path.lexists(out / LOCK_FILE)),
        )
        if there
    ]
    if held:
        raise ConvertError(
            f"--out {out} already holds {' and '.join(held)}; choose another folder, or pass --add to add "
            "the converted checkpoint to it"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jitrope.convert",
        description="Convert a published JiT checkpoint (checkpoint-last.pth with model / model_ema1 / "
        "model_ema2, keys with or without net.) or a bare state dict into a jitrope run folder that "
        "jitrope-sample and jitrope-evaluate load. Read safely: weights_only=True, argparse.Namespace the "
        "only class allowed.",
    )
    p.add_argument("published", help="checkpoint-last.pth, or a state dict file (.pth / .safetensors)")
    p.add_argument("--preset", required=True, help="the model's preset, e.g. JiT-B/16 (see jitrope.modelconfig)")
    p.add_argument("--out", required=True, help="run folder to write (config.yaml, checkpoints/step_00000000/)")
    p.add_argument(
        "--weights", choices=tuple(WEIGHTS), default=None, help="which weights of a checkpoint-last.pth (default: ema1)"
    )
    p.add_argument(
        "--add",
        action="store_true",
        help="write into an --out that already holds a run, checkpoints or a lock: never while another "
        "process holds its lock, never over a checkpoint step_00000000, and a config.yaml there is kept",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. model.pos_impl=torch sample.cfg=2.9 diffusion.noise_scale=2.0",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        convert(
            args.published, args.out, preset=args.preset, overrides=args.overrides, weights=args.weights, add=args.add
        )
    except (ConvertError, ConfigError, CheckpointError, LockedError, OSError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
