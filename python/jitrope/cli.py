"""Command-line plumbing shared by ``jitrope.sample``, ``jitrope.evaluate`` and ``jitrope.convert``.

Their flags are spellings of config keys (``--steps 10`` is ``sample.steps=10``): one table of
:class:`Flag` per command builds its argparse options (:func:`add_flags`) and turns the flags given
into a layer of typed values over the config file and the dotted overrides (:func:`flag_layer`,
passed to :func:`jitrope.config.load_config` as ``flags``). A user error is one ``error:`` line that
names the flag typed beside its key (:func:`fail`). Output paths are checked before any work
(:func:`check_image_out`, :func:`check_file_out`).
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

from .config import ConfigError
from .fileio import check_writable_dir

__all__ = [
    "Flag",
    "add_flags",
    "flag_layer",
    "name_flags",
    "fail",
    "check_image_out",
    "check_file_out",
]


class Flag(NamedTuple):
    """A command-line flag that sets one config key; ``options`` go to ``add_argument``."""

    flag: str  # "--steps"
    key: str  # "sample.steps"
    help: str
    options: Mapping[str, Any] = {}


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    """One option per flag; a flag not given sets nothing (the config's value stands)."""
    for f in flags:
        options = dict(f.options)
        if "action" not in options and "choices" not in options:
            options["metavar"] = f.key.rpartition(".")[2].upper()
        parser.add_argument(f.flag, dest=f.key, default=argparse.SUPPRESS, help=f"{f.help} [{f.key}]", **options)


def flag_layer(args: argparse.Namespace, flags: Sequence[Flag]) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, str]]:
    """The flags given as a nested ``{section: {key: value}}`` dict, and ``{key: flag}`` of them."""
    given = vars(args)
    layer: Dict[str, Dict[str, Any]] = {}
    names: Dict[str, str] = {}
    for f in flags:
        if f.key in given:
            section, key = f.key.split(".", 1)
            v = given[f.key]
            layer.setdefault(section, {})[key] = list(v) if isinstance(v, tuple) else v
            names[f.key] = f.flag
    return layer, names


def name_flags(message: str, names: Mapping[str, str]) -> str:
    """``message`` with each config key that a flag set also named by that flag:
    ``config key sample.steps must be ...`` -> ``--steps (sample.steps) must be ...``."""
    for key, flag in names.items():  # not in a suggestion for a misspelt key ("did you mean sample.steps?")
        message = re.sub(
            rf"(config key )?(?<![\w.])(?<!mean ){re.escape(key)}(?!\w)", f"{flag} ({key})", message, count=1
        )
    return message


def fail(e: BaseException, names: Optional[Mapping[str, str]] = None) -> int:
    """Print ``e`` as one ``error:`` line (naming the flags of ``names``); the exit status 2."""
    msg = " ".join(name_flags(str(e), names or {}).split("\n"))
    print(f"error: {msg}", file=sys.stderr)
    return 2


def check_file_out(path, key: str) -> Path:
    """A file to write at the end: not a folder, and its folder writable (made if missing)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"config key {key}: {p} is a folder; give the path of a file in it")
    check_writable_dir(p.parent, f"the folder of {key}")
    return p


def check_image_out(path, key: str) -> Path:
    """:func:`check_file_out`, and an image format (from the file name) that PIL writes RGB images in:
    tried on a 1x1 image, so the real save at the end cannot fail on the format."""
    from PIL import Image

    p = Path(path).expanduser()
    Image.init()
    ext = p.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    why = None
    if fmt is None or fmt not in Image.SAVE:
        why = f"{ext!r} is not an image format that can be written" if ext else "the name has no image extension"
    else:
        try:
            Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
        except (OSError, ValueError, KeyError) as e:
            why = f"{fmt} cannot hold an RGB image ({e})"
    if why is not None:
        raise ConfigError(f"config key {key}: {p.name}: {why}; use .png, .jpg or .webp")
    return check_file_out(p, key)
