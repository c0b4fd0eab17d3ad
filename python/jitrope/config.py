"""Run configuration: YAML files plus dotted ``key=value`` overrides, checked against dataclasses.

A config has six sections. ``model.*`` are exactly the fields of :class:`jitrope.modelconfig.JiTConfig`
(plus ``model.preset``, a name for ``JiTConfig.preset``); ``train``, ``data``, ``diffusion``,
``sample`` and ``eval`` are the dataclasses below (``sample`` and ``eval`` also hold the settings of
``jitrope.sample`` and ``jitrope.evaluate``, which read a run's stored config and then the same
files and overrides as training). Precedence: dataclass defaults < ``base:`` file(s) < the YAML
file < command-line overrides. The dataclasses are OmegaConf structured configs: files and
overrides (``OmegaConf.from_dotlist``) are merged onto them, which types every value and resolves
``${section.key}`` interpolations. Unknown keys and values of the wrong type are rejected with a
:class:`ConfigError` that names them (and suggests the closest known key).

    cfg = load_config("configs/emoji32_cpu.yaml", ["model.pos_embed=factorized2d", "train.steps=100"])
    cfg.train.steps, cfg.model["pos_embed"], cfg.model_config()  # -> JiTConfig
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import io
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data.multires import check_patch_multiple, parse_size, parse_sizes
from .diffusion import SAMPLERS, SHIFTS
from .fileio import atomic_write_text
from .modelconfig import JiTConfig
from .rope import SCALING_MODES

__all__ = [
    "ConfigError",
    "Config",
    "TrainConfig",
    "DataConfig",
    "DiffusionConfig",
    "SampleConfig",
    "EvalConfig",
    "EVAL_METRICS",
    "parse_hw",
    "load_config",
    "config_from_dict",
    "parse_overrides",
    "model_fields",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key(s)."""


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1000
    batch_size: int = 64  # global batch, split evenly over the DDP ranks
    out_dir: str = "runs/default"
    blr: float = 5e-5  # lr = blr * batch_size / 256 unless lr is set
    lr: Optional[float] = None
    warmup_steps: int = 100  # linear warmup, then constant
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decays: Tuple[float, ...] = (0.9999, 0.9996)  # the first one is sampled by default
    ema_warmup: bool = False  # decay_k = min(decay, (1 + k) / (10 + k)): useful for short runs
    label_drop: float = 0.1  # p(class -> null class), enables CFG over classes
    cond_drop: float = 0.1  # p(condition image -> null condition), enables CFG over the condition
    log_every: int = 10
    ckpt_every: int = 500  # a checkpoint every this many steps, and one at the end
    keep_last: int = 3  # checkpoints kept; 0 keeps all
    sample_every: int = 500  # sample grid PNG into out_dir/samples; 0 disables
    sample_steps: int = 20  # sampler steps of those periodic grids
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, none on CPU) | bf16 | none
    compile_mode: str = "none"  # none | default | reduce-overhead | max-autotune: torch.compile(model, mode=...)
    num_threads: Optional[int] = None  # torch.set_num_threads on CPU; null leaves torch's default
    tensorboard: bool = True
    progress: bool = True  # tqdm bar (hidden when stderr is not a terminal)
    # packed mixed-size batches (with data.sizes): tokens per batch (image + condition + in-context);
    # batch_size then only sets the learning rate (blr * batch_size / 256)
    tokens_per_batch: Optional[int] = None
    # many ranks (docs/training.md, "Training on many GPUs"): under torchrun, ddp replicates the model
    # on every rank, fsdp shards parameters, gradients, EMAs and optimizer state (FSDP2 fully_shard per
    # block, then the root); one process: ddp trains the plain model, fsdp runs FSDP2 over one rank
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    grad_accum_steps: int = 1  # micro-batches per optimizer step (the batch of a step stays batch_size)


@dataclass
class DataConfig:
    name: str = "emoji"  # emoji | folder | synthetic
    root: Optional[str] = None  # emoji: cache dir ($JITROPE_DATA or ~/.cache/jitrope); folder: the image folder
    img_size: int = 64
    vendors: Tuple[str, ...] = ("google", "twitter", "apple", "facebook")
    cond: str = "none"  # none | downsample (same image, smaller) | other_vendor (same emoji, another vendor)
    holdout: float = 0.05  # fraction of emoji (by id hash; fixed) held out for evaluation
    skin_tones: bool = False  # emoji: also use the skin-tone variants
    hflip: bool = False  # random horizontal flips
    num_images: int = 512  # synthetic only
    download: bool = True  # emoji: fetch with npm pack when the cache has no data
    # packed mixed-size training: sizes HEIGHTxWIDTH in pixels, e.g. [16x16, 32x48, 48x32] (needs
    # train.tokens_per_batch); empty: every image at img_size, batches of train.batch_size
    sizes: Tuple[str, ...] = ()


@dataclass
class DiffusionConfig:
    P_mean: float = -0.8
    P_std: float = 0.8
    t_eps: float = 0.05
    noise_scale: float = 1.0
    shift: str = "none"  # none | sqrt_tokens: per-image time shift by token count (jitrope.diffusion)
    shift_ref_tokens: int = 256  # the token count whose shift is 1


@dataclass
class SampleConfig:
    """How a run samples (its grids, ``jitrope.sample``, ``jitrope.evaluate``): the first five keys are
    the run's defaults; the others are settings of ``jitrope.sample`` (its flags map onto them)."""

    steps: int = 50
    sampler: str = "heun"  # a name of jitrope.diffusion.SAMPLERS
    cfg: float = 2.0
    cfg_interval: Tuple[float, float] = (0.1, 1.0)
    ema: str = "0"  # "0", "1" (index into train.ema_decays) or "none" (raw weights)
    out: str = "samples.png"  # the grid image; single images go to a folder beside it, named after it
    classes: Optional[str] = None  # "0,3", "Flags", "all", "uncond"; null: all (with cond: the null class)
    n: int = 8  # samples per row
    cond: Optional[str] = None  # condition image, or a folder of them
    cond_resize: bool = False  # resize condition images of another size instead of failing
    seed: int = 0
    batch_size: int = 64
    img_size: Optional[int] = None  # null: the model's
    scale: Optional[int] = None  # grid upscale factor; null: to about 64 px per image
    singles: bool = True  # also write every image on its own
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: Optional[int] = None  # torch.set_num_threads on CPU; null leaves torch's default
    progress: bool = True
    sizes: Optional[str] = None  # "16x16,32x48,...": one grid of every class at every size, one packed forward
    # the most image tokens sampled together (a packed batch of sample.sizes, or a batch of sample.batch_size
    # at sample.img_size): more is refused before anything is allocated
    max_tokens: int = 262144


EVAL_METRICS = ("vloss", "class", "cond", "res")


@dataclass
class EvalConfig:
    """What ``jitrope.evaluate`` measures and where it writes (it samples as ``sample.*`` says)."""

    metrics: Tuple[str, ...] = EVAL_METRICS  # groups: vloss, class, cond, res
    split: str = "val"  # val | train | all
    out: Optional[str] = None  # JSON file; null: <run>/eval/step_<N>.json
    t_grid: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # t values of the v-loss
    max_images: int = 512  # held-out images in the v-loss
    n_per_class: int = 8  # class-conditional samples per class
    n_cond: int = 32  # condition-image samples
    batch_size: int = 64
    seed: int = 0
    featnet: Optional[str] = "auto"  # auto (cached, trained once if missing) | a .safetensors file | none
    res_px: Tuple[int, ...] = ()  # square image sizes of the resolution study; empty: none
    res_hw: Tuple[str, ...] = ()  # and sizes "HxW" (non-square ones, e.g. "32x48": 32 rows, 48 columns)
    res_scalings: Tuple[str, ...] = SCALING_MODES  # pos_scaling modes tried at each size (where they apply)
    res_vloss: bool = True  # the resolution study also measures the held-out v-loss at each size and mode
    res_n_per_class: int = 4  # samples per class at each size of res_px / res_hw
    grids: Optional[str] = None  # folder for sample grid PNGs
    fid_inception: Optional[str] = None  # Inception weights file: adds the standard FID (torch-fidelity)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: Optional[int] = None


_SECTIONS = {
    "train": TrainConfig,
    "data": DataConfig,
    "diffusion": DiffusionConfig,
    "sample": SampleConfig,
    "eval": EvalConfig,
}
_CHOICES = {
    ("data", "name"): ("emoji", "folder", "synthetic"),
    ("data", "cond"): ("none", "downsample", "other_vendor"),
    ("train", "amp"): ("auto", "bf16", "none"),
    ("train", "compile_mode"): ("none", "default", "reduce-overhead", "max-autotune"),
    ("train", "parallel"): ("ddp", "fsdp"),
    ("sample", "sampler"): tuple(SAMPLERS),
    ("eval", "split"): ("val", "train", "all"),
}


def model_fields() -> Dict[str, Any]:
    """``{name: type}`` of the fields of ``JiTConfig`` (the valid ``model.*`` keys)."""
    hints = typing.get_type_hints(JiTConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(JiTConfig)}


@dataclass
class Config:
    model: Dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def model_config(self) -> JiTConfig:
        """The ``JiTConfig`` this config describes (``model.preset`` first, then the other keys)."""
        kw = dict(self.model)
        preset = kw.pop("preset", None)
        return JiTConfig.preset(preset, **kw) if preset else JiTConfig.from_dict(kw)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"model": copy.deepcopy(self.model)}
        for name in _SECTIONS:
            d = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path) -> None:
        atomic_write_text(path, self.to_yaml())


# ----------------------------------------------------------------------------------- parsing
def _unknown(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"{key} (did you mean {close[0]}?)" if close else key


def _omega_error(e: OmegaConfBaseException, prefix: str = "", where: Optional[Tuple[str, Any]] = None) -> ConfigError:
    """OmegaConf's message without its reference_type / object_type lines, naming the full key."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    key = getattr(e, "full_key", None)
    if key:
        return ConfigError(f"config key {prefix}{key}: {msg}")
    if where is not None:  # OmegaConf names no key for some errors inside tuples: say which value it was
        msg = msg.replace("Value '$VALUE' of type '$VALUE_TYPE'", "a value")
        return ConfigError(f"config key {where[0]}: {msg} (got {where[1]!r})")
    return ConfigError(f"config: {msg}")


def _failing_key(d: Mapping[str, Any]) -> Optional[Tuple[str, Any]]:
    """The first ``(section.key, value)`` of ``d`` that does not merge onto the schema alone."""
    for sec, vals in d.items():
        for k, v in (vals or {}).items() if sec in _SECTIONS else ():
            try:
                OmegaConf.merge(OmegaConf.structured(_SECTIONS[sec]), {k: v})
            except OmegaConfBaseException:
                return f"{sec}.{k}", v
    return None


# YAML 1.1 reads 0x8 as the hex number 8, so a size HEIGHTxWIDTH of height 0 used to arrive as "8";
# such a value, alone or in a [flow, list], is quoted so that it is read as the text it is
_HEX = r"0x\d+"
_FLOW = re.compile(r"\[[^\[\]]*\]")
_IN_FLOW = re.compile(rf"(?<=[\[,])(\s*)({_HEX})(?=\s*[,\]])")
_ALONE = re.compile(rf"^(\s*(?:-\s+|[^\s:#'\"]+:\s+)?)({_HEX})(\s*(?:#.*)?)$", re.M)


def _hex_as_text(text: str) -> str:
    """YAML ``text`` with each value spelt like ``0x8`` quoted: a size, not a hex number."""
    return _ALONE.sub(r"\1'\2'\3", _FLOW.sub(lambda m: _IN_FLOW.sub(r"\1'\2'", m.group(0)), text))


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """``["train.steps=10", "model.pos_embed=rope2d"]`` -> nested dict (values parsed by
    ``OmegaConf.from_dotlist``: YAML-like scalars and ``[a, b]`` lists)."""
    items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r}: the key must be section.key (e.g. train.steps=100)")
        items.append(f"{key}={_hex_as_text(raw)}")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items), resolve=False)
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides {list(overrides)}: cannot parse a value: {str(e).splitlines()[0]}") from None


def _read_yaml(path: Path, seen: Tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file with its ``base:`` files (relative to it) merged below it, unvalidated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: 'base:' includes itself")
    try:
        raw = OmegaConf.load(io.StringIO(_hex_as_text(path.read_text())))
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    bases = raw.pop("base", None) or []
    bases = [bases] if isinstance(bases, str) else bases
    layers = [_read_yaml(path.parent / b, seen + (path.resolve(),)) for b in bases]
    for sec, vals in raw.items():
        if vals is not None and not isinstance(vals, DictConfig):
            raise ConfigError(f"{path}: section {sec!r} must be a mapping of keys, got {vals!r}")
    return OmegaConf.merge(*layers, raw) if layers else raw


def _check_keys(d: Mapping[str, Any], where: str) -> None:
    """Every unknown section and key at once, each with the closest known one."""
    bad: List[str] = []
    known_sections = ["model", *_SECTIONS]
    mkeys = [*model_fields(), "preset"]
    for sec, vals in d.items():
        if sec not in known_sections:
            bad.append(_unknown(sec, known_sections))
            continue
        if vals is not None and not isinstance(vals, Mapping):
            raise ConfigError(f"{where}: section {sec!r} must be a mapping of keys, got {vals!r}")
        known = mkeys if sec == "model" else [f.name for f in dataclasses.fields(_SECTIONS[sec])]
        bad += [_unknown(f"{sec}.{k}", [f"{sec}.{m}" for m in known]) for k in (vals or {}) if k not in known]
    if bad:
        raise ConfigError(f"{where}: unknown config key(s): {', '.join(bad)}")


def _typed_model(model: Mapping[str, Any]) -> Dict[str, Any]:
    """The given ``model.*`` keys, typed against the JiTConfig fields (the others stay unset, so a
    preset fills them in)."""
    model = dict(model)
    preset = model.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"config key model.preset: expected a preset name, got {preset!r}")
    try:
        typed = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(JiTConfig), model))
    except OmegaConfBaseException as e:
        raise _omega_error(e, "model.") from None
    out = {k: typed[k] for k in model}
    return {"preset": preset, **out} if preset is not None else out


def config_from_dict(d: Mapping[str, Any], *, where: str = "config", stored: bool = False) -> Config:
    """Validate a nested ``{section: {key: value}}`` dict (unknown keys -> ConfigError) into a Config:
    merged onto the dataclass schema with OmegaConf (types checked, ``${...}`` interpolations resolved).
    ``stored``: the config of a checkpoint, which may hold values of older versions."""
    d = _translated(d, stored)
    _check_keys(d, where)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), {k: v for k, v in d.items() if v is not None})
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _omega_error(e, where=_failing_key(d)) from None
    cfg.model = _typed_model(cfg.model)
    _expand_paths(cfg)
    for (sec, k), choices in _CHOICES.items():
        v = getattr(getattr(cfg, sec), k)
        if v not in choices:
            raise ConfigError(f"config key {sec}.{k}: {v!r} is not one of {list(choices)}")
    _check(cfg)
    _check_sample_eval(cfg)
    return cfg


def _translated(d: Mapping[str, Any], stored: bool) -> Dict[str, Any]:
    """A plain ``{section: {key: value}}`` dict with the legacy keys and values of each section
    translated (:func:`_legacy`; ``stored``: the config of a checkpoint)."""
    if isinstance(d, DictConfig):
        d = OmegaConf.to_container(d, resolve=False)
    return {
        sec: (_legacy(sec, dict(v), stored) if sec in _SECTIONS and isinstance(v, Mapping) else v)
        for sec, v in d.items()
    }


def _legacy(section: str, d: Dict[str, Any], stored: bool) -> Dict[str, Any]:
    """Keys and values of older versions, still found in the configs stored in checkpoints."""
    if section == "train" and "compile" in d:
        old = d.pop("compile")
        if "compile_mode" not in d and isinstance(old, bool):
            d["compile_mode"] = "default" if old else "none"
        elif not isinstance(old, bool):
            raise ConfigError(
                f"config key train.compile: expected true/false, got {old!r} (it is now train.compile_mode)"
            )
    if stored and section == "train" and d.get("num_threads") == 0:  # 0 used to mean "torch's default"
        d["num_threads"] = None
    return d


def _expand_paths(cfg: Config) -> None:
    """``~`` in the folders of a config, expanded once here, so every reader (the writability check,
    the run, the data cache) sees the same folder and none writes to a literal ``./~``."""
    cfg.train.out_dir = str(Path(cfg.train.out_dir).expanduser())
    if cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser())


def _positive(key: str, value, minimum=1) -> None:
    if value < minimum:
        raise ConfigError(f"config key {key} must be >= {minimum}, got {value}")


def _check(cfg: Config) -> None:
    t = cfg.train
    # 0 never silently means "the default": every count must be a real one
    for k in ("steps", "batch_size", "log_every", "ckpt_every", "sample_steps", "grad_accum_steps"):
        _positive(f"train.{k}", getattr(t, k))
    for k in ("keep_last", "sample_every", "warmup_steps"):
        _positive(f"train.{k}", getattr(t, k), 0)
    if t.num_threads is not None:
        _positive("train.num_threads", t.num_threads)
    for k in ("blr", "lr"):
        v = getattr(t, k)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ConfigError(f"config key train.{k} must be a positive number, got {v}")
    if not (math.isfinite(t.grad_clip) and t.grad_clip >= 0):
        raise ConfigError(f"config key train.grad_clip must be >= 0 (0 disables clipping), got {t.grad_clip}")
    _positive("data.img_size", cfg.data.img_size)
    _positive("data.num_images", cfg.data.num_images)
    if not cfg.data.vendors:
        raise ConfigError("config key data.vendors is empty")
    _positive("sample.steps", cfg.sample.steps)
    if not (math.isfinite(cfg.sample.cfg) and cfg.sample.cfg >= 0):
        raise ConfigError(f"config key sample.cfg (guidance scale) must be a finite number >= 0, got {cfg.sample.cfg}")
    if not t.ema_decays or not all(0.0 <= e < 1.0 for e in t.ema_decays):
        raise ConfigError(f"train.ema_decays must be a non-empty list of decays in [0, 1), got {list(t.ema_decays)}")
    for k in ("label_drop", "cond_drop"):
        if not 0.0 <= getattr(t, k) < 1.0:
            raise ConfigError(f"train.{k} must be in [0, 1), got {getattr(t, k)}")
    lo, hi = cfg.sample.cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"sample.cfg_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got {[lo, hi]}")
    if cfg.sample.ema not in ("none",) + tuple(str(i) for i in range(len(t.ema_decays))):
        raise ConfigError(
            f"sample.ema must be 'none' or an index into train.ema_decays (0..{len(t.ema_decays) - 1}), "
            f"got {cfg.sample.ema!r}"
        )
    _check_data(cfg.data)
    _check_diffusion(cfg.diffusion)
    try:  # model.* errors (an unknown pos_embed, a bad size) now, not as a traceback at model build
        mcfg = cfg.model_config()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model config: {e}") from None
    _check_sizes(cfg, mcfg.patch_size)
    if not cfg.data.sizes and t.batch_size % t.grad_accum_steps:  # packed batches: the budget is per micro-batch
        raise ConfigError(
            f"config key train.grad_accum_steps={t.grad_accum_steps} does not divide train.batch_size="
            f"{t.batch_size}: every micro-batch takes the same whole number of images"
        )
    if cfg.data.sizes and mcfg.cond_img_size is not None and mcfg.null_cond == "absent":
        raise ConfigError(
            "config key model.null_cond=absent does not train packed batches (data.sizes): a packed batch "
            "drops a condition through the null condition token; use model.null_cond=learned or zeros"
        )


def _check_sizes(cfg: Config, patch: int) -> None:
    """data.sizes / sample.sizes parse as HEIGHTxWIDTH multiples of the patch, each within its token
    budget (checked here, before any data set or model is built at the largest size); a budget goes
    with data.sizes. A size given twice is refused for sampling and warned about for training."""
    budget = cfg.train.tokens_per_batch
    if budget is not None:
        _positive("train.tokens_per_batch", budget)
    _positive("sample.max_tokens", cfg.sample.max_tokens)
    limits = {
        "data.sizes": (budget, "the budget train.tokens_per_batch"),
        "sample.sizes": (cfg.sample.max_tokens, "the sampler's limit sample.max_tokens"),
    }
    for key, spec in (("data.sizes", cfg.data.sizes), ("sample.sizes", cfg.sample.sizes)):
        if spec is None or (key == "data.sizes" and len(spec) == 0):
            continue
        try:
            sizes = parse_sizes(spec, f"config key {key}")
            check_patch_multiple(sizes, patch, f"config key {key}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        limit, what = limits[key]
        for h, w in sizes:
            if limit is not None and (h // patch) * (w // patch) > limit:
                raise ConfigError(
                    f"config key {key}: {h}x{w} takes {(h // patch) * (w // patch)} image tokens at patch {patch}, "
                    f"over {what}={limit}"
                )
        _check_twice(key, sizes)
    if cfg.data.sizes and budget is None:
        raise ConfigError(
            "config key data.sizes (packed mixed-size batches) needs train.tokens_per_batch, the "
            "token budget of a batch"
        )
    if budget is not None and not cfg.data.sizes:
        raise ConfigError(
            f"config key train.tokens_per_batch={budget} is set but data.sizes is empty: it is the "
            "budget of packed mixed-size batches only (set data.sizes, or drop it)"
        )


def _check_twice(key: str, sizes: Sequence[Tuple[int, int]]) -> None:
    twice = {f"{h}x{w}": sizes.count((h, w)) for (h, w) in dict.fromkeys(sizes) if sizes.count((h, w)) > 1}
    if not twice:
        return
    named = ", ".join(f"{hw} {n} times" for hw, n in twice.items())
    if key == "sample.sizes":
        raise ConfigError(f"config key sample.sizes gives {named}; give each size once")
    # training: a run's stored config may hold it, so a warning, not an error
    print(
        f"warning: config key data.sizes gives {named}: packed batches draw a size once per time it is given, "
        "so more often than the others; give each size once for equal shares",
        file=sys.stderr,
    )


def _check_data(d: DataConfig) -> None:
    if not (math.isfinite(d.holdout) and 0.0 <= d.holdout < 1.0):
        raise ConfigError(
            f"config key data.holdout (the fraction of images held out) must be in [0, 1), got {d.holdout}"
        )


def _check_diffusion(d: DiffusionConfig) -> None:
    """Every number finite (a nan or inf trains on garbage, or fails many steps later), and the
    spread, the clamp and the noise scale positive; t_eps clamps 1 - t in (0, 1]."""
    for k in ("P_mean", "P_std", "t_eps", "noise_scale"):
        v = getattr(d, k)
        if not math.isfinite(v):
            raise ConfigError(f"config key diffusion.{k} must be a finite number, got {v}")
    for k in ("P_std", "noise_scale"):
        if getattr(d, k) <= 0:
            raise ConfigError(f"config key diffusion.{k} must be > 0, got {getattr(d, k)}")
    if not 0.0 < d.t_eps <= 1.0:
        raise ConfigError(f"config key diffusion.t_eps must be in (0, 1], got {d.t_eps}")
    if d.shift not in SHIFTS:
        raise ConfigError(f"config key diffusion.shift must be one of {list(SHIFTS)}, got {d.shift!r}")
    _positive("diffusion.shift_ref_tokens", d.shift_ref_tokens)


def _check_device(key: str, name: str) -> None:
    """The spelling of a device; whether this machine has it is the job's to check when it starts."""
    if name != "auto":
        try:
            torch.device(name)
        except RuntimeError:
            raise ConfigError(f"config key {key}: {name!r} is not a device (auto | cpu | cuda | cuda:N)") from None


def _check_sample_eval(cfg: Config) -> None:
    """The settings of jitrope.sample / jitrope.evaluate (sample.* beyond the run's defaults, eval.*)."""
    s, e = cfg.sample, cfg.eval
    for k in ("n", "batch_size", "img_size", "scale", "num_threads"):
        if getattr(s, k) is not None:
            _positive(f"sample.{k}", getattr(s, k))
    for k in ("max_images", "n_per_class", "n_cond", "batch_size", "res_n_per_class", "num_threads"):
        if getattr(e, k) is not None:
            _positive(f"eval.{k}", getattr(e, k))
    _check_device("train.device", cfg.train.device)
    _check_device("sample.device", s.device)
    _check_device("eval.device", e.device)
    if not s.out:
        raise ConfigError("config key sample.out is empty: give the grid image's file name (e.g. samples.png)")
    if e.out is not None and not e.out:
        raise ConfigError("config key eval.out is empty: give a JSON file name, or null for <run>/eval/step_<N>.json")
    if not e.t_grid or not all(0.0 <= t < 1.0 for t in e.t_grid):
        raise ConfigError(f"config key eval.t_grid wants values in [0, 1), got {list(e.t_grid)}")
    bad = [m for m in e.metrics if m not in EVAL_METRICS]
    if not e.metrics or bad or len(set(e.metrics)) != len(e.metrics):
        raise ConfigError(f"config key eval.metrics wants a subset of {list(EVAL_METRICS)}, got {list(e.metrics)}")
    if any(px < 1 for px in e.res_px):
        raise ConfigError(f"config key eval.res_px wants positive image sizes, got {list(e.res_px)}")
    for hw in e.res_hw:
        parse_hw(hw, "eval.res_hw")
    bad = [m for m in e.res_scalings if m not in SCALING_MODES]
    if not e.res_scalings or bad or len(set(e.res_scalings)) != len(e.res_scalings):
        raise ConfigError(
            f"config key eval.res_scalings wants a subset of {list(SCALING_MODES)}, got {list(e.res_scalings)}"
        )
    if (e.res_px or e.res_hw) and "res" in e.metrics and e.featnet in (None, "none"):
        raise ConfigError(
            "config key eval.res_px: the resolution study needs the feature network "
            "(eval.featnet auto or a file), not none"
        )


def parse_hw(text, key: str = "size") -> Tuple[int, int]:
    """``"32x48"`` (rows x columns) or ``"32"`` (square) -> ``(32, 48)``, read by
    :func:`jitrope.data.parse_size`; a ConfigError names ``key``."""
    t = str(text).strip()
    try:
        return parse_size(f"{t}x{t}" if t.isdigit() else t, key)
    except ValueError:
        raise ConfigError(f"config key {key} wants sizes HxW of positive integers (e.g. 32x48), got {text!r}") from None


def load_config(
    path=None,
    overrides: Sequence[str] = (),
    *,
    base: Optional[Mapping[str, Any]] = None,
    flags: Optional[Mapping[str, Any]] = None,
) -> Config:
    """Read ``path`` (YAML; may name ``base:`` files relative to it), apply dotted overrides, validate.

    ``base``: a nested dict below the file, e.g. the config stored in a checkpoint (values of older
    versions are translated); ``flags``: a nested dict of already typed values over the overrides
    (what command-line flags such as ``--steps 10`` set; never re-parsed as YAML, so a flag value
    ``null`` stays a string)."""
    layers = [OmegaConf.create(_translated(base, stored=True))] if base is not None else []
    if path is not None:
        layers.append(_read_yaml(Path(path)))
    layers.append(OmegaConf.create(parse_overrides(overrides)))
    if flags:
        layers.append(OmegaConf.create(dict(flags)))
    return config_from_dict(OmegaConf.merge(*layers), where=str(path) if path is not None else "config")
