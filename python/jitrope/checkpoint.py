"""Checkpoints: weights in safetensors, training state in a weights-only torch file, atomic, last K kept.

Layout of a run directory::

    <out_dir>/config.yaml                          the resolved config of the run
    <out_dir>/checkpoints/step_00001000/
        weights.safetensors   model.* / ema0.* / ema1.* tensors; metadata: format, step, config, ema_decays,
                              class_names,
                              model_config (the resolved JiTConfig, so presets may change later)
        state.pt              optimizer, lr schedule, RNG and data-order state (tensors and primitives only)
        manifest.json         sha256 and size of each file above, written last

A checkpoint folder is written under a temporary name and renamed into place, so every
``step_*`` folder is complete; a reader never sees half of one. Loading verifies the digests of
the files it reads (bit rot, a copy cut short) and never unpickles code: safetensors for weights,
``torch.load(weights_only=True)`` for the state. Any problem raises a :class:`CheckpointError`
that names the file and what is wrong. Given a run folder, the newest checkpoint that verifies is
used, with a warning naming each newer one that was skipped; an explicit ``step_*`` folder or
file that fails is an error. A folder without a manifest (a copy cut short, or written before
manifests existed) cannot be verified and fails too, unless the caller passes
``allow_unverified=True`` (the CLIs' ``--allow-unverified``); then it loads with a warning.

The model of a checkpoint (what sampling and evaluation load): :func:`load_checkpoint` reads and
verifies its weights once, :func:`run_config` is the config stored with them under the caller's
files, overrides and flags, :func:`model_from_weights` builds the model and loads one set of weights
(raw or an EMA), refusing weights whose forward of a fixed probe batch is not finite
(:mod:`jitrope.usable`); :func:`load_model` does all three.

``keep_last`` prunes only checkpoints that verify, newest first, so the newest good one is never
deleted; one that fails verification is renamed ``corrupt-step_*`` (kept, but no longer a
``step_*`` folder that shadows the good ones).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .config import Config, ConfigError, config_from_dict, load_config
from .diffusion import Diffusion
from .fileio import fsync_dir, sha256_file
from .model import JiT
from .published import refused_global
from .usable import probe_loss

__all__ = [
    "CheckpointError",
    "UnverifiedCheckpointError",
    "FORMAT",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_weights",
    "load_train_state",
    "check_state_dict",
    "verify_checkpoint",
    "newest_valid_checkpoint",
    "clean_stale_temps",
    "move_aside",
    "prune_checkpoints",
    "load_checkpoint",
    "run_config",
    "resolved_configs",
    "model_from_weights",
    "load_model",
]

FORMAT = "jitrope-ckpt-1"
WEIGHTS = "weights.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model / run."""


class UnverifiedCheckpointError(CheckpointError):
    """A checkpoint has no manifest (or the manifest does not list a file), so it cannot be
    verified; ``allow_unverified=True`` loads it anyway."""


def _unshare(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Contiguous CPU tensors, none sharing storage (safetensors refuses shared or strided ones)."""
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().to("cpu")
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if key in seen or not v.is_contiguous():
            v = v.clone(memory_format=torch.contiguous_format)
        elif key is not None:
            seen.add(key)
        out[k] = v.contiguous()
    return out


def save_checkpoint(
    run_dir,
    step: int,
    *,
    model: Mapping[str, Tensor],
    emas: Sequence[Mapping[str, Tensor]] = (),
    ema_decays: Sequence[float] = (),
    state: Optional[Mapping[str, Any]] = None,
    config: Optional[Mapping[str, Any]] = None,
    class_names: Sequence[str] = (),
    model_config: Optional[Mapping[str, Any]] = None,
    keep_last: int = 3,
    allow_unverified: bool = False,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>/`` atomically, then keep the newest ``keep_last``
    checkpoints that verify (:func:`prune_checkpoints`; 0 keeps all), moving damaged ones aside.

    A write that fails (a full disk: ``OSError``, or the writers' own errors) raises a
    CheckpointError naming the checkpoint; its temp folder is removed and the checkpoints already
    there are untouched."""
    ck = Path(run_dir) / "checkpoints"
    final = ck / f"step_{step:08d}"
    tmp = ck / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tensors = {f"model.{k}": v for k, v in model.items()}
    for i, e in enumerate(emas):
        tensors.update({f"ema{i}.{k}": v for k, v in e.items()})
    meta = _metadata(step, len(emas), config, ema_decays, class_names, model_config)
    try:
        ck.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        files = _write_step(tmp, step, tensors, meta, state)
        if final.exists():
            _replace_step(final, tmp)
        else:
            os.rename(tmp, final)
        fsync_dir(ck)
    except CheckpointError:
        raise
    # torch.save reports a full disk as a RuntimeError ("unexpected pos"), safetensors as its own error
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(
            f"cannot write checkpoint {final} ({type(e).__name__}: {e}); nothing of it was kept"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for name, info in files.items():  # just hashed: pruning and a later load need not read them again
        f = final / name
        st = f.stat()
        _VERIFIED[(str(f.resolve()), st.st_size, st.st_mtime_ns)] = info["sha256"]
    prune_checkpoints(run_dir, keep_last, allow_unverified=allow_unverified, written=step)
    return final


def _metadata(step: int, n_emas: int, config, ema_decays, class_names, model_config) -> Dict[str, str]:
    """The safetensors metadata of a checkpoint (strings: JSON where a value is not one)."""
    return {
        "format": FORMAT,
        "step": str(step),
        "config": json.dumps(dict(config or {})),
        "ema_decays": json.dumps([float(d) for d in ema_decays]),
        "num_emas": str(n_emas),
        "class_names": json.dumps(list(class_names)),
        "model_config": json.dumps(dict(model_config or {})),
    }


def _write_step(
    tmp: Path, step: int, tensors: Mapping[str, Tensor], meta: Mapping[str, str], state: Optional[Mapping[str, Any]]
) -> Dict[str, Dict[str, Any]]:
    """The files of a checkpoint in the folder ``tmp`` (weights, training state, manifest last), each
    synced to disk, names included; returns the manifest's ``{file: {sha256, bytes}}``."""
    from safetensors.torch import save_file

    save_file(_unshare(tensors), str(tmp / WEIGHTS), metadata=dict(meta))
    if state is not None:
        torch.save(dict(state), tmp / STATE)
    files = {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)  # the file names too, before the folder is renamed into place
    return files


def _replace_step(final: Path, tmp: Path) -> None:
    """Put ``tmp`` at ``final``, which exists: a damaged one is moved aside (kept), a good one is
    replaced (a re-saved step); rename is atomic, so a reader sees one or the other."""
    try:
        _verify_step(final)
    except CheckpointError as e:
        move_aside(final, str(e))
        os.rename(tmp, final)
        return
    old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def move_aside(ckpt_dir, reason: str) -> Path:
    """Rename a damaged ``step_*`` folder to ``corrupt-step_*`` (``-2``, ``-3``, ... when taken), so
    it no longer shadows the checkpoints that verify; nothing in it is deleted. Returns the new path."""
    d = Path(ckpt_dir)
    dest = d.with_name(f"corrupt-{d.name}")
    k = 1
    while dest.exists():
        k += 1
        dest = d.with_name(f"corrupt-{d.name}-{k}")
    os.rename(d, dest)
    _warn(f"moved damaged checkpoint {d.name} aside to {dest} ({reason})")
    return dest


def prune_checkpoints(
    run_dir, keep_last: int, *, allow_unverified: bool = False, written: Optional[int] = None
) -> List[Path]:
    """Keep the newest ``keep_last`` checkpoints that verify (0: all) and delete the older ones that
    verify; returns the deleted folders. A checkpoint that fails verification is never counted and
    never deleted: it is moved aside (:func:`move_aside`). One without a manifest is left where it
    is when ``allow_unverified`` (the run was resumed from such checkpoints), else moved aside too.
    ``written``: the step just written; with ``keep_last`` 0 only the folders newer than it (which
    would shadow it) are checked, so keeping all never hashes the whole run again."""
    kept, deleted = 0, []
    for step, p in reversed(_step_folders(run_dir)):
        if keep_last <= 0 and (written is None or step <= written):
            break
        try:
            _verify_step(p)
        except UnverifiedCheckpointError as e:
            if not allow_unverified:
                move_aside(p, str(e))
            continue
        except CheckpointError as e:
            move_aside(p, str(e))
            continue
        kept += 1
        if 0 < keep_last < kept:
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p)
    return deleted


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# (path, size, mtime) -> digest of files already verified in this process: sample / evaluate read
# a checkpoint more than once, and hashing a large one twice is wasted time
_VERIFIED: Dict[Tuple[str, int, int], str] = {}


def verify_checkpoint(ckpt_dir, files: Sequence[str] = (WEIGHTS, STATE), *, allow_unverified: bool = False) -> None:
    """Check ``files`` of a ``step_*`` folder against its manifest; raise a CheckpointError naming
    the first file that is missing or differs. A folder without a manifest, or a file the manifest
    does not list, raises an :class:`UnverifiedCheckpointError`, or passes with a warning when
    ``allow_unverified``. Files in ``files`` that neither exist nor are listed are not required
    (a checkpoint without training state)."""
    d = Path(ckpt_dir)
    mf = d / MANIFEST
    if not mf.is_file():
        why = (
            f"{' and '.join(str(d / n) for n in files)} cannot be verified: {d} has no {MANIFEST} (a copy cut "
            "short, a file copied out of its checkpoint, or written by an older jitrope)"
        )
        if not allow_unverified:
            raise UnverifiedCheckpointError(f"{why}; pass --allow-unverified to load it anyway")
        _warn(f"{why}: loading it without verifying its digests (--allow-unverified)")
        return
    try:
        listed = json.loads(mf.read_text())["files"]
        if not isinstance(listed, dict):
            raise ValueError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mf}: unreadable manifest ({e}); the checkpoint is damaged") from None
    for name in files:
        f = d / name
        if name not in listed:
            if f.exists():
                why = f"{f} is not listed in {mf}"
                if not allow_unverified:
                    raise UnverifiedCheckpointError(
                        f"{why}, so it cannot be verified; pass --allow-unverified to load it anyway"
                    )
                _warn(f"{why}: loading it without verifying its digest (--allow-unverified)")
            continue
        want = listed[name]
        if not isinstance(want, dict):
            raise CheckpointError(
                f"{mf}: the entry of {name} is {want!r}, not an object with sha256 and bytes; the manifest is damaged"
            )
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {mf})")
        st = f.stat()
        if st.st_size != want.get("bytes"):
            raise CheckpointError(
                f"{f}: {st.st_size} bytes, the manifest says {want.get('bytes')}; the file is truncated or damaged"
            )
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        got = _VERIFIED.get(key) or sha256_file(f)
        if got != want.get("sha256"):
            raise CheckpointError(
                f"{f}: sha256 {got[:16]}... does not match the manifest "
                f"({str(want.get('sha256'))[:16]}...); the file is damaged"
            )
        _VERIFIED[key] = got


def _verify_step(p: Path, files: Sequence[str] = (WEIGHTS, STATE), allow_unverified: bool = False) -> None:
    """:func:`verify_checkpoint` of a ``step_*`` folder, which must hold a weights file."""
    if not (p / WEIGHTS).is_file():
        raise CheckpointError(f"{p / WEIGHTS} is missing")
    verify_checkpoint(p, files, allow_unverified=allow_unverified)


def newest_valid_checkpoint(
    run_dir, files: Sequence[str] = (WEIGHTS, STATE), *, allow_unverified: bool = False
) -> Optional[Path]:
    """The newest ``step_*`` folder of a run whose ``files`` verify; each newer one that fails
    (a damaged or missing file, no manifest unless ``allow_unverified``) is skipped with a warning
    saying why. None when the run has no checkpoint; a CheckpointError when it has some but none
    verifies."""
    cks = _step_folders(run_dir)
    errors = []
    for _, p in reversed(cks):
        try:
            _verify_step(p, files, allow_unverified)
        except CheckpointError as e:
            _warn(f"skipping checkpoint {p.name}: {e}")
            errors.append(str(e))
            continue
        return p
    if cks:
        raise CheckpointError(f"no checkpoint of {run_dir} verifies: {'; '.join(errors)}")
    return None


def clean_stale_temps(run_dir) -> List[Path]:
    """Remove ``.tmp-step_*`` / ``.old-step_*`` folders that a killed writer left in
    ``<run_dir>/checkpoints``; returns what was removed. An ``.old-step_N-*`` folder whose
    ``step_N`` is missing is renamed back instead: a writer replacing a verified ``step_N`` was
    killed between its two renames, and that folder is the only copy left. Call only while no other
    process writes to the run."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    stale = []
    for p in sorted(ck.iterdir()):
        if not (p.is_dir() and p.name.startswith((".tmp-step_", ".old-step_"))):
            continue
        back = ck / p.name[len(".old-") :].rsplit("-", 1)[0]
        if p.name.startswith(".old-") and _STEP_DIR.match(back.name) and not back.exists():
            os.rename(p, back)
            _warn(f"restored {back.name} from {p.name}, left by an interrupted checkpoint replacement")
            continue
        shutil.rmtree(p, ignore_errors=True)
        stale.append(p)
    return stale


def _step_folders(run_dir) -> List[Tuple[int, Path]]:
    """Every ``step_*`` folder of a run, complete or not, oldest first, as ``(step, folder)``."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    out = []
    for p in ck.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def list_checkpoints(run_dir) -> List[Tuple[int, Path]]:
    """Checkpoints of a run that hold a weights file, oldest first, as ``(step, folder)``."""
    return [(s, p) for s, p in _step_folders(run_dir) if (p / WEIGHTS).is_file()]


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The newest ``step_*`` folder of a run, whether or not it verifies (or holds weights)."""
    cks = _step_folders(run_dir)
    return cks[-1][1] if cks else None


# a published JiT checkpoint (checkpoint-last.pth) or a bare state dict is read through the converter
_CONVERT_HINT = (
    "to use a published JiT checkpoint, convert it first: jitrope-convert {p} --preset JiT-B/16 (its model) "
    "--out <folder>, then give --ckpt that folder"
)


def _format_of(f: Path) -> Optional[str]:
    """The ``format`` in the header of a safetensors file (None: none, or not readable as one)."""
    try:
        with safe_open(str(f), "pt", device="cpu") as fh:
            return (fh.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def resolve_checkpoint(path, *, allow_unverified: bool = False) -> Path:
    """A run folder (-> its newest checkpoint whose weights verify), a ``step_*`` folder, or a
    ``weights.safetensors`` file -> the verified ``weights.safetensors`` file. ``allow_unverified``:
    a checkpoint without a manifest loads with a warning instead of failing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist (give a run folder, a step_* folder or a {WEIGHTS} file)")
    if p.is_file():
        if p.suffix != ".safetensors" or (p.name != WEIGHTS and _format_of(p) != FORMAT):
            raise CheckpointError(f"{p} is not a jitrope checkpoint; {_CONVERT_HINT.format(p=shlex.quote(str(p)))}")
        verify_checkpoint(p.parent, [p.name], allow_unverified=allow_unverified)
        return p
    if (p / WEIGHTS).is_file() or _STEP_DIR.match(p.name):
        if not (p / WEIGHTS).is_file():
            raise CheckpointError(f"{p / WEIGHTS} is missing")
        verify_checkpoint(p, [WEIGHTS], allow_unverified=allow_unverified)
        return p / WEIGHTS
    newest = newest_valid_checkpoint(p, [WEIGHTS], allow_unverified=allow_unverified)
    if newest is None:
        raise CheckpointError(f"{p} holds no checkpoint (no {WEIGHTS} and no checkpoints/step_*/{WEIGHTS})")
    return newest / WEIGHTS


def load_weights(path, *, allow_unverified: bool = False) -> Dict[str, Any]:
    """Read a weights file (found and verified by :func:`resolve_checkpoint`): ``{"model": sd,
    "emas": [sd, ...], "ema_decays": [...], "step": int, "config": dict, "class_names": [...],
    "model_config": dict (resolved JiTConfig fields), "path": Path}``."""
    f = resolve_checkpoint(path, allow_unverified=allow_unverified)
    try:
        with safe_open(str(f), "pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({e}); it may be truncated or corrupt") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{f}: format {meta.get('format')!r} is not {FORMAT!r}; not a jitrope checkpoint (a bare state dict? "
            f"{_CONVERT_HINT.format(p=shlex.quote(str(f)))})"
        )
    try:
        n_ema = int(meta.get("num_emas", "0"))
        out: Dict[str, Any] = {
            "step": int(meta["step"]),
            "config": json.loads(meta.get("config", "{}")),
            "ema_decays": json.loads(meta.get("ema_decays", "[]")),
            "class_names": json.loads(meta.get("class_names", "[]")),
            "model_config": json.loads(meta.get("model_config", "{}")),
            "path": f,
        }
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{f}: bad metadata ({e})") from None
    groups: Dict[str, Dict[str, Tensor]] = {}
    for k, v in tensors.items():
        prefix, _, name = k.partition(".")
        groups.setdefault(prefix, {})[name] = v
    expected = {"model"} | {f"ema{i}" for i in range(n_ema)}
    if set(groups) - expected or "model" not in groups:
        raise CheckpointError(f"{f}: tensor groups {sorted(groups)} do not match the expected {sorted(expected)}")
    out["model"] = groups["model"]
    out["emas"] = [groups.get(f"ema{i}", {}) for i in range(n_ema)]
    return out


def load_train_state(ckpt_dir, *, allow_unverified: bool = False) -> Dict[str, Any]:
    """The verified ``state.pt`` beside a weights file (tensors and primitives only: ``weights_only=True``)."""
    p = Path(ckpt_dir)
    if p.is_file():
        p = p.parent
    f = p / STATE
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: cannot resume training from {p} (weights only?)")
    verify_checkpoint(p, [STATE], allow_unverified=allow_unverified)
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (unpickling errors come in many types)
        refused = refused_global(str(e))
        if refused is not None:
            raise CheckpointError(
                f"{f} holds an object of {refused}: refused (the training state is tensors and primitives "
                "only, weights_only=True); it was not written by jitrope"
            ) from None
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise CheckpointError(f"{f}: cannot load the training state ({type(e).__name__}: {first})") from None


def check_state_dict(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], *, where: str) -> None:
    """Raise a CheckpointError naming missing / unexpected keys and shape mismatches."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    # a silent cast (int32 -> float32, float64 -> float32) would hide a checkpoint of another model
    dtypes = [
        f"{k}: checkpoint {got[k].dtype} vs model {expected[k].dtype}"
        for k in expected
        if k in got and got[k].dtype != expected[k].dtype
    ]
    if missing or unexpected or shapes or dtypes:
        parts = []

        def few(xs):
            return ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")

        if missing:
            parts.append(f"missing {few(missing)}")
        if unexpected:
            parts.append(f"unexpected {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {few(shapes)}")
        if dtypes:
            parts.append(f"dtype mismatch {few(dtypes)}")
        raise CheckpointError(f"{where} does not fit the model: {'; '.join(parts)}")


# ------------------------------------------------------------------ the model of a checkpoint
def load_checkpoint(ckpt, *, allow_unverified: bool = False) -> Dict[str, Any]:
    """The weights of a run folder (its newest checkpoint that verifies), ``step_*`` folder or
    weights file (:func:`load_weights`), verified once. ``allow_unverified``:
    also load a checkpoint that has no manifest to verify it by."""
    path = resolve_checkpoint(ckpt, allow_unverified=allow_unverified)
    return load_weights(path, allow_unverified=allow_unverified)


def _stored(w: Mapping[str, Any]) -> Dict[str, Any]:
    stored = dict(w["config"])
    if w.get("model_config"):  # the resolved fields: independent of later changes to presets
        stored["model"] = dict(w["model_config"])
    return stored


def run_config(
    w: Mapping[str, Any], path=None, overrides: Sequence[str] = (), flags: Optional[Mapping[str, Any]] = None
) -> Config:
    """The config to sample / evaluate the checkpoint ``w`` (:func:`load_checkpoint`) with: the one
    stored with it, then the YAML file ``path``, the dotted ``overrides`` and the typed ``flags``
    (:func:`jitrope.config.load_config`)."""
    stored = _stored(w)
    try:  # the run's own config first, so that its faults are not blamed on the command line
        config_from_dict(stored, where=f"config stored in {w['path']}", stored=True).model_config()
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{w['path']}: its stored config does not build a model: {e}") from None
    return load_config(path, overrides, base=stored, flags=flags)


def resolved_configs(w: Mapping[str, Any], cfg: Config) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The config stored with the weights ``w`` and ``cfg``, as dicts of what they resolve to, for
    ``--resume`` to compare: the ``model`` section as the JiTConfig fields it builds (a preset, or
    its keys spelt out with the same values, alike), the other sections with the defaults of keys
    that a config of an older version does not name."""
    stored = _stored(w)
    try:
        old = config_from_dict(stored, where=f"config stored in {w['path']}", stored=True)
        saved = {**old.to_dict(), "model": old.model_config().to_dict()}
    except (ConfigError, ValueError, TypeError):  # a config this version no longer accepts: as it was stored
        saved = dict(stored)
    return saved, {**cfg.to_dict(), "model": cfg.model_config().to_dict()}


def model_from_weights(w: Mapping[str, Any], cfg: Config, *, ema: str = "0", device="cpu"):
    """The model of ``cfg`` with the weights ``ema`` of ``w`` ("0" / "1": an EMA, "none": the raw
    weights), in eval mode on ``device``; returns ``(model, info)`` (see :func:`load_model`)."""
    path = w["path"]
    try:
        mcfg = cfg.model_config()
    except (ConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"model config: {e}") from None
    model = JiT(mcfg)
    if ema in ("none", "raw", "model"):
        sd, which = w["model"], "model"
    else:
        try:
            i = int(ema)
            sd = w["emas"][i]
        except (ValueError, IndexError):
            raise CheckpointError(
                f"{path} has {len(w['emas'])} EMA(s) ({w['ema_decays']}); ema {ema!r} is not one of "
                'them ("none": the raw weights)'
            ) from None
        which = f"ema{i}"
    check_state_dict(model.state_dict(), sd, where=f"{path} [{which}]")
    model.load_state_dict(sd)
    model.to(device).eval()
    loss = probe_loss(model, Diffusion.from_config(cfg.diffusion))
    if not math.isfinite(loss):  # finite weights of a diverged run (1e30) sample nothing but nan
        raise CheckpointError(
            f"{path} [{which}]: these weights give a probe loss of {loss}, so they cannot sample: the run had "
            "diverged when it wrote them; load an earlier checkpoint (a checkpoints/step_* folder) or other weights "
            "(sample.ema)"
        )
    names = list(w["class_names"])
    if len(names) != mcfg.num_classes:
        names = [f"class {i}" for i in range(mcfg.num_classes)]
    info = {"step": w["step"], "path": path, "weights": which, "ema_decays": w["ema_decays"], "class_names": names}
    return model, info


def load_model(ckpt, *, ema: str = "0", device="cpu", pos_impl: Optional[str] = None, allow_unverified: bool = False):
    """Load a checkpoint (run folder, ``step_*`` folder or weights file) for sampling.

    ``ema``: "0" / "1" (which EMA; the 0.9999 one is the one sampled by default) or "none" (raw weights).
    Returns ``(model in eval mode, Config of the run, info)``; info has step, path, weights (which
    set), ema_decays and class_names.
    """
    w = load_checkpoint(ckpt, allow_unverified=allow_unverified)
    cfg = run_config(w, flags={"model": {"pos_impl": pos_impl}} if pos_impl is not None else None)
    model, info = model_from_weights(w, cfg, ema=ema, device=device)
    return model, cfg, info
