"""Train a JiT on emoji (or a folder of images) with the x-prediction / v-loss objective.

    python -m jitrope.train --config configs/emoji32_cpu.yaml
    python -m jitrope.train --config configs/emoji32_cpu.yaml model.pos_embed=factorized2d train.out_dir=runs/f2d
    python -m jitrope.train --config configs/emoji32_cpu.yaml train.steps=4000 --resume
    torchrun --nproc_per_node=2 -m jitrope.train --config configs/emoji64_s4.yaml

The training itself (bit-exact resume, the run folder's lock, checkpoints, what a stopped run keeps)
is :func:`jitrope.training.train`'s. A run that stops early says in one line what happened, which
checkpoint is the last one kept and the command that continues it. SIGTERM (a scheduler's
preemption) first writes a checkpoint of the step the run is on. Exit status: 0 done, 2 bad input
or such a stop (an ``error:`` line), 130 interrupted (Ctrl-C, as shells report SIGINT), 143
preempted (SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data import DataError
from .fileio import LockedError
from .runtime import RankFailed
from .training import TrainingStopped, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jitrope.train",
        description="Train a JiT diffusion transformer (x-prediction, v-loss). Settings come from a YAML "
        "config and dotted overrides, e.g. model.pos_embed=factorized2d train.steps=2000 train.out_dir=runs/a. "
        "Sections: model.* (JiTConfig fields, or model.preset), train.*, data.*, diffusion.*, sample.*; "
        "--print-config shows all keys with their values. Run under torchrun for data parallel "
        "training (gloo on CPU, nccl on GPU).",
    )
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (values parsed as YAML)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in train.out_dir; the config must train the same thing "
        "(data.root, data.download, model.pos_impl and model.packed_attn may differ)",
    )
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="with --resume: also accept a checkpoint without manifest.json (its digests cannot be "
        "checked; written by an older jitrope), with a warning",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.epilog = (
        "exit status: 0 done; 2 bad input, or a run that stopped and kept its checkpoints (one error: line "
        "says which and how to continue); 130 interrupted (Ctrl-C); 143 preempted (SIGTERM: the checkpoint of the "
        "step it came in is written first)"
    )
    return p


def _resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this run: the same arguments, plus --resume."""
    prog = "jitrope-train" if Path(sys.argv[0]).name == "jitrope-train" else "python -m jitrope.train"
    args = list(argv) + ([] if "--resume" in argv else ["--resume"])
    return " ".join([prog, *(shlex.quote(a) for a in args)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)  # flags may come between the overrides
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        out = train(cfg, resume=args.resume, allow_unverified=args.allow_unverified)
    except TrainingStopped as e:
        if main_rank:
            line = e.describe(_resume_command(argv))
            print(line if e.exit_code in (130, 143) else f"error: {line}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, DataError, CheckpointError, LockedError, OSError, RankFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training began: nothing to keep
        print("interrupted before training began", file=sys.stderr)
        return 130
    if main_rank:
        print(f"done: step {out['step']}, loss {out['loss']:.4f}, run {out['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
