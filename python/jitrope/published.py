"""Published JiT checkpoints (the official ``model_jit.py``): reading them safely, and their names as
jitrope's. A leaf: it takes the model as an argument and imports no other jitrope module.

The input is a published ``checkpoint-last.pth`` (a pickle of the dicts ``model``, ``model_ema1``,
``model_ema2``, the optimizer, the epoch and the training's argparse ``Namespace``; the keys may
carry the training wrapper's ``net.`` prefix) or a bare state dict (``.pth`` or ``.safetensors``).
:func:`read_published` reads it with ``torch.load(weights_only=True)``, where ``argparse.Namespace``
is the only class allowed besides tensors and containers: a file holding any other object is
refused, never run.

The names differ from jitrope's in two ways, and :func:`map_published_names` maps them (the model's
``load_state_dict`` calls it too, so it also takes the published names):

- the published attention keeps the q and k RMSNorm weights apart (``blocks.N.attn.q_norm.weight``
  and ``k_norm.weight``, ``[head_dim]`` each); jitrope holds one ``blocks.N.attn.qk_norm.weight``
  ``[2, head_dim]`` (row 0 q, row 1 k), which its fused op takes;
- the published model stores tables that jitrope derives from the config: ``pos_embed``, the fixed
  2D sin-cos table (a parameter without gradient), which is checked against jitrope's table and
  dropped, and the RoPE tables ``feat_rope.freqs_cos`` / ``freqs_sin`` (and ``feat_rope_incontext.*``)
  where a version keeps them as buffers, which are dropped.

Every other key has the same name and shape. :func:`convert_state_dict` checks that every published
key is used and every jitrope parameter is filled, or names what is not (:class:`ConvertError`).
``python -m jitrope.convert`` (:mod:`jitrope.convert`) writes the result as a run folder.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "ConvertError",
    "WEIGHTS",
    "PUBLISHED_POS_EMBED",
    "read_published",
    "map_published_names",
    "convert_state_dict",
    "refused_global",
]

# --weights choice -> the dict of a published checkpoint-last.pth
WEIGHTS = {"model": "model", "ema1": "model_ema1", "ema2": "model_ema2"}
PUBLISHED_POS_EMBED = "sincos2d+rope2d"  # what the published JiT computes: jitrope's default encoding
_QK_NORM = re.compile(r"^(blocks\.\d+\.attn\.)q_norm\.weight$")
_ROPE_TABLES = re.compile(r"^feat_rope(_incontext)?\.freqs_(cos|sin)$")


class ConvertError(ValueError):
    """A published checkpoint cannot be read or does not fit the model; the message says which key."""


def _few(xs: Sequence[str], n: int = 6) -> str:
    return ", ".join(xs[:n]) + (f" (+{len(xs) - n} more)" if len(xs) > n else "")


def read_published(path, weights: Optional[str] = None) -> Tuple[Dict[str, Tensor], str, Dict[str, Any]]:
    """The state dict in a published checkpoint (``weights``: model | ema1 | ema2, default ema1) or a
    bare state dict file; returns ``(state dict, what it is, info)``, info holding the checkpoint's
    ``epoch`` and training ``args`` (a dict) where it has them."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConvertError(f"{p} does not exist" if not p.exists() else f"{p} is not a file")
    if weights is not None and weights not in WEIGHTS:
        raise ConvertError(f"weights {weights!r} is not one of {list(WEIGHTS)}")
    obj = _load_safely(p)
    info: Dict[str, Any] = {}
    if isinstance(obj, Mapping) and any(k in obj for k in WEIGHTS.values()):
        key = WEIGHTS[weights or "ema1"]
        if key not in obj:
            have = [k for k, v in WEIGHTS.items() if v in obj]
            raise ConvertError(f"{p} has no {key!r} (--weights {weights or 'ema1'}); it has {have}")
        sd, what = obj[key], f"{p} [{key}]"
        if isinstance(obj.get("epoch"), int):
            info["epoch"] = obj["epoch"]
        if isinstance(obj.get("args"), argparse.Namespace):
            info["args"] = vars(obj["args"])
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        if weights is not None:
            raise ConvertError(f"--weights {weights}: {p} is a bare state dict, one set of weights; drop --weights")
        sd, what = obj, str(p)
    else:
        kind = f"a dict of {_few(sorted(map(str, obj)))}" if isinstance(obj, Mapping) else type(obj).__name__
        raise ConvertError(
            f"{p} is neither a published JiT checkpoint (dicts {', '.join(WEIGHTS.values())}) nor a "
            f"state dict of tensors: it holds {kind}"
        )
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ConvertError(f"{what} is not a state dict of tensors")
    return dict(sd), what, info


def _load_safely(p: Path) -> Any:
    """What the file ``p`` holds: a safetensors file, or a torch pickle of tensors, containers and the
    training's argparse.Namespace (``weights_only=True``; anything else is refused, never run)."""
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConvertError(f"{p}: not a readable safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = refused_global(str(e))
        if refused is None:  # not a pickle at all, or a damaged one
            detail = re.search(r"WeightsUnpickler error: ?(.*)", str(e))
            detail = detail.group(1).strip() if detail else ""
            raise ConvertError(
                f"{p}: not a readable torch checkpoint ({detail or 'not a pickle of tensors'})"
            ) from None
        raise ConvertError(
            f"{p} holds an object of {refused}: refused (only tensors, containers and argparse.Namespace are "
            "unpickled, weights_only=True); save its state dict alone to convert it"
        ) from None
    except Exception as e:  # noqa: BLE001  (a damaged file fails in many ways)
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ConvertError(f"{p}: not a readable torch checkpoint ({type(e).__name__}: {msg})") from None


# how torch's weights-only unpickler names what it refuses: a global outside its allowlist, one of a
# blocked module (os.system is posix.system), or a class it would have to import
_REFUSED = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),
    re.compile(r"Unsupported global: GLOBAL (\S+)"),
    re.compile(r"(\S+) must be \S+ to load"),
)


def refused_global(message: str) -> Optional[str]:
    """The callable or class (``module.name``) that a ``torch.load(weights_only=True)`` error says it
    refused to unpickle, or None when the error is of another kind (a damaged file)."""
    for pattern in _REFUSED:
        m = pattern.search(message)
        if m:
            return m.group(1).rstrip(".,")
    return None


def _check_sincos(table: Tensor, model, key: str) -> None:
    """The published ``pos_embed`` must be the fixed sin-cos table that jitrope derives for this grid:
    dropping anything else would change what the model computes."""
    part = model.pos.parts["sincos2d"] if "sincos2d" in model.pos.parts else None
    if part is None:
        raise ConvertError(
            f"{key}: the published model adds a fixed 2D sin-cos table, which "
            f"model.pos_embed={model.cfg.pos_embed!r} does not (the published JiT is "
            f"{PUBLISHED_POS_EMBED!r})"
        )
    gh, gw = model.cfg.grid
    ours = part.table[: gh * gw].detach().cpu()
    if tuple(table.shape) != (1, *ours.shape):
        raise ConvertError(
            f"{key}: shape {tuple(table.shape)}, the model's {gh}x{gw} grid has a sin-cos table of {(1, *ours.shape)}"
        )
    diff = float((table[0].detach().cpu().double() - ours.double()).abs().max())
    if not diff <= 1e-5:
        raise ConvertError(
            f"{key} is not the fixed 2D sin-cos table of a {gh}x{gw} grid (max |diff| {diff:.3g}); "
            "jitrope derives that table and cannot hold another"
        )


def map_published_names(sd: MutableMapping[str, Tensor], model, prefix: str = "") -> List[str]:
    """Rename, in place, the published JiT's keys under ``prefix`` to jitrope's: stack each block's
    ``q_norm`` / ``k_norm`` weights into ``qk_norm.weight`` and drop the derived tables (the sin-cos
    ``pos_embed`` after checking it against ``model``'s). Returns the dropped keys. Keys of jitrope
    and unknown keys stay as they are, for the caller's check to name."""
    dropped = []
    for key in [k for k in sd if k.startswith(prefix)]:
        name = key[len(prefix) :]
        m = _QK_NORM.match(name)
        if m:
            k_key = f"{prefix}{m.group(1)}k_norm.weight"
            if k_key in sd and sd[key].shape == sd[k_key].shape:
                sd[f"{prefix}{m.group(1)}qk_norm.weight"] = torch.stack([sd.pop(key), sd.pop(k_key)])
        elif name == "pos_embed":
            _check_sincos(sd[key], model, key)
            del sd[key]
            dropped.append(key)
        elif _ROPE_TABLES.match(name):
            del sd[key]
            dropped.append(key)
    return dropped


def convert_state_dict(
    sd: Mapping[str, Tensor], model, *, where: str = "the published state dict"
) -> Tuple[Dict[str, Tensor], List[str]]:
    """A published JiT state dict (with or without ``net.``) -> ``model``'s state dict, every key used
    and every entry filled with the right shape and dtype (half-precision weights are widened), else a
    :class:`ConvertError` that names them. Returns ``(state dict, dropped derived tables)``."""
    sd = {(k[len("net.") :] if k.startswith("net.") else k): v for k, v in sd.items()}
    dropped = map_published_names(sd, model)
    expected = model.state_dict()
    for k, v in sd.items():  # bf16 / fp16 -> fp32 loses nothing
        if k in expected and v.dtype in (torch.float16, torch.bfloat16) and expected[k].dtype == torch.float32:
            sd[k] = v.float()
    left = [k for k in sd if k not in expected]
    unfilled = [k for k in expected if k not in sd]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    dtypes = [
        f"{k} {sd[k].dtype} vs {expected[k].dtype}"
        for k in expected
        if k in sd and sd[k].shape == expected[k].shape and sd[k].dtype != expected[k].dtype
    ]
    parts = []
    if left:
        parts.append(f"published keys left over: {_few(left)}")
    if unfilled:
        parts.append(f"jitrope entries not filled: {_few(unfilled)}")
    if shapes:
        parts.append(f"shape mismatch (published vs jitrope): {_few(shapes)}")
    if dtypes:
        parts.append(f"dtype mismatch (published vs jitrope): {_few(dtypes)}")
    if parts:
        raise ConvertError(f"{where} does not fit the jitrope JiT of this config: {'; '.join(parts)}")
    bad = [k for k in expected if sd[k].is_floating_point() and not bool(torch.isfinite(sd[k]).all())]
    if bad:
        raise ConvertError(f"{where}: {_few(bad)} hold(s) nan or inf values; weights that are not finite are refused")
    return {k: sd[k].contiguous() for k in expected}, dropped
