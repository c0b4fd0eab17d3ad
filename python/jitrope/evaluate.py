"""Evaluate a checkpoint without any downloaded network: prints and writes JSON metrics.

    python -m jitrope.evaluate --ckpt runs/emoji32 --data emoji
    python -m jitrope.evaluate --ckpt runs/emoji32/checkpoints/step_00002000 --out eval.json --n-per-class 16

The metrics (held-out v-loss, class and condition samples, FD-emoji and class accuracy, the
resolution study, the optional Inception FID) are :mod:`jitrope.eval.evaluate`'s; ``--metrics``
picks the groups (``vloss,class,cond,res``; default all).

Settings are config keys, read as in training: the run's stored config, then ``--config FILE``,
then ``section.key=value`` overrides, then the flags, each of which sets one key. ``eval.*``
(:class:`jitrope.config.EvalConfig`) says what to measure and where to write; the samples are
drawn as ``sample.*`` says (``--steps``, ``--sampler``, ``--cfg``, ``--ema`` set those);
``--data`` and ``--data-root`` set ``data.*``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from .checkpoint import CheckpointError, load_checkpoint, run_config
from .cli import Flag, add_flags, check_file_out, fail, flag_layer
from .config import EVAL_METRICS, Config, ConfigError
from .data import DataError
from .diffusion import SAMPLERS
from .eval.evaluate import evaluate_weights
from .fileio import atomic_write_text, check_writable_dir
from .posenc import SCALINGS
from .runtime import cpu_setup, resolve_device
from .sampling import NonFiniteSamples

__all__ = ["FLAGS", "build_parser", "main"]


def _comma_list(kind, what: str):
    def parse(s: str):
        try:
            return [kind(v) for v in s.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--{what} wants comma-separated {kind.__name__} values, got {s!r}"
            ) from None

    return parse


# Every flag sets one config key; the key's value in the run's config, --config and the overrides
# stands where the flag is not given. --data is handled apart: it sets data.name, or data.root too.
FLAGS = (
    Flag("--data-root", "data.root", "the data folder (emoji cache, or the image folder)"),
    Flag("--split", "eval.split", "held-out split to evaluate", {"choices": ("val", "train", "all")}),
    Flag("--out", "eval.out", "JSON file (default: <run>/eval/step_<N>.json)"),
    Flag("--ema", "sample.ema", "EMA index 0 / 1 or none"),
    Flag("--t-grid", "eval.t_grid", "comma-separated t values of the v-loss", {"type": _comma_list(float, "t-grid")}),
    Flag("--max-images", "eval.max_images", "held-out images in the v-loss", {"type": int}),
    Flag("--n-per-class", "eval.n_per_class", "class-conditional samples per class", {"type": int}),
    Flag("--n-cond", "eval.n_cond", "condition-image samples", {"type": int}),
    Flag("--steps", "sample.steps", "sampler steps", {"type": int}),
    Flag("--sampler", "sample.sampler", "sampler", {"choices": tuple(SAMPLERS)}),
    Flag("--cfg", "sample.cfg", "guidance scale", {"type": float}),
    Flag("--batch-size", "eval.batch_size", "images per forward pass", {"type": int}),
    Flag("--seed", "eval.seed", "seed of the fixed noise and samples", {"type": int}),
    Flag("--device", "eval.device", "auto | cpu | cuda | cuda:N"),
    Flag(
        "--metrics",
        "eval.metrics",
        f"comma-separated metric groups: {', '.join(EVAL_METRICS)}",
        {"type": _comma_list(str, "metrics")},
    ),
    Flag(
        "--featnet",
        "eval.featnet",
        "feature network of FD-emoji / class accuracy: auto (cached, trained once on "
        "the training split if missing), a .safetensors file, or none",
    ),
    Flag(
        "--res-px",
        "eval.res_px",
        "comma-separated image sizes of the resolution study (e.g. 24,40,48 for a model trained at 32x32); empty: none",
        {"type": _comma_list(int, "res-px")},
    ),
    Flag(
        "--res-hw",
        "eval.res_hw",
        "comma-separated sizes HxW of the resolution study (rows x columns, e.g. 32x48,48x32)",
        {"type": _comma_list(str, "res-hw")},
    ),
    Flag(
        "--res-scalings",
        "eval.res_scalings",
        f"comma-separated pos_scaling modes of the resolution study ({', '.join(SCALINGS)}; default all)",
        {"type": _comma_list(str, "res-scalings")},
    ),
    Flag("--res-n-per-class", "eval.res_n_per_class", "samples per class at each size of --res-px", {"type": int}),
    Flag("--grids", "eval.grids", "folder for sample grid PNGs (training size and every --res-px / --res-hw size)"),
    Flag(
        "--fid-inception",
        "eval.fid_inception",
        "Inception weights file (torch-fidelity's "
        "pt_inception-2015-12-05-6726825d.pth): adds the standard FID; needs pip install torch-fidelity",
    ),
    Flag(
        "--num-threads",
        "eval.num_threads",
        "CPU threads (default: torch's; 1 is fastest on a busy machine)",
        {"type": int},
    ),
)
_DATA_NAMES = ("emoji", "synthetic", "folder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jitrope.evaluate",
        description="Evaluate a JiT checkpoint on held-out data: v-loss on a fixed t grid with fixed noise, "
        "class-following of samples by nearest training image, pixel statistics, and (with a condition "
        "image) how closely samples follow their condition. Prints a summary and writes JSON. Settings are "
        "the config keys in brackets, from the run's config, --config FILE and section.key=value "
        "overrides; a flag sets its key.",
    )
    p.add_argument(
        "--ckpt", required=True, help="run folder (newest checkpoint), checkpoints/step_* folder or weights file"
    )
    p.add_argument("--config", help="YAML file of config keys (e.g. an eval: section), over the run's config")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (values parsed as YAML)")
    p.add_argument(
        "--allow-unverified", action="store_true", help="load a checkpoint that has no manifest to verify its files by"
    )
    p.add_argument(
        "--data",
        default=None,
        help=f"{' | '.join(_DATA_NAMES)} [data.name], or a folder of class "
        "subfolders [data.name=folder, data.root] (default: the run's data)",
    )
    add_flags(p, FLAGS)
    return p


def _out_path(cfg: Config, w: Mapping[str, Any]) -> Path:
    if cfg.eval.out is not None:
        return check_file_out(cfg.eval.out, "eval.out")
    p = Path(w["path"]).parent  # .../checkpoints/step_N
    run = p.parent.parent if p.parent.name == "checkpoints" else p
    return check_file_out(run / "eval" / f"step_{w['step']:08d}.json", "eval.out")


def _data_flag(data: str, layer: Dict[str, Dict[str, Any]], names: Dict[str, str]) -> None:
    """``--data``: a data set's name (data.name), or a folder of images (data.name=folder, data.root)."""
    if data in _DATA_NAMES:
        layer.setdefault("data", {})["name"] = data
        names["data.name"] = "--data"
    else:
        layer.setdefault("data", {}).update(name="folder", root=data)
        names.update({"data.name": "--data", "data.root": "--data"})


def _check_files(cfg: Config, w: Mapping[str, Any]) -> Path:
    """Every output and input file before the evaluation, so that no work is lost; returns
    the JSON file to write."""
    e = cfg.eval
    out = _out_path(cfg, w)
    if e.grids is not None:
        check_writable_dir(e.grids, "eval.grids")
    if e.fid_inception is not None and not Path(e.fid_inception).expanduser().is_file():
        raise ConfigError(f"config key eval.fid_inception: no Inception weights file at {e.fid_inception}")
    if e.featnet not in (None, "none", "auto") and not Path(e.featnet).expanduser().is_file():
        raise ConfigError(f"config key eval.featnet: no feature network file at {e.featnet} (auto, none or a file)")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # flags may come between the overrides
    layer, names = flag_layer(args, FLAGS)
    if args.data is not None:
        _data_flag(args.data, layer, names)
    try:
        w = load_checkpoint(args.ckpt, allow_unverified=args.allow_unverified)
        cfg = run_config(w, args.config, args.overrides, layer)
        device = resolve_device(cfg.eval.device, "eval.device")
        out = _check_files(cfg, w)
        cpu_setup(cfg.eval.num_threads)
        res = evaluate_weights(w, cfg, device)
        atomic_write_text(out, json.dumps(res, indent=2))
    except (CheckpointError, DataError, ConfigError, OSError, ImportError, NonFiniteSamples) as err:
        return fail(err, names)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
