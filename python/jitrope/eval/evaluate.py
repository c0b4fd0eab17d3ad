"""The metrics of a checkpoint, without any downloaded network (``python -m jitrope.evaluate`` runs them:
:mod:`jitrope.evaluate`).

    metrics = evaluate("runs/emoji32", overrides=["eval.metrics=[vloss,class]", "sample.steps=10"])

Metrics (all on the held-out split unless ``--split`` says otherwise):

- ``vloss``: the training loss (velocity MSE) at fixed times ``t`` (``--t-grid``) with fixed noise
  (seeded per image), per t and averaged: comparable across runs and encodings; ``x_mse_*`` is the
  same error in x space (``vloss * max(1 - t, t_eps)^2``), which large t does not dominate.
  ``vloss_null_cond`` (models with a condition image): the same with the null condition.
- ``class_samples``: ``--n-per-class`` class-conditional samples per class (guided as in
  ``sample.*``). ``nn_class_acc``: share of samples whose nearest training image (pixel L2 at 16x16)
  has the asked class (chance = the largest class share; ``nn_class_acc_real``, the same
  classifier on the real held-out images, is its ceiling); ``nn_rms``: RMS distance to that nearest
  image (lower = more data-like; near 0 = copying); ``pixel_*``: per-channel mean / std of samples
  against the held-out images.
- ``cond_samples`` (models with a condition image): samples for held-out conditions.
  ``cond_rms``: RMS between the sample downsampled to the condition size and the condition
  (how well samples follow it; for ``downsample`` conditions the target is exactly that);
  ``target_rms``: RMS to the held-out image itself; ``psnr`` / ``ssim``: PSNR (dB) and SSIM of
  the sample against that held-out image.
- With the feature network (``--featnet``, default ``auto``: trained once on the training split
  and cached, see :mod:`jitrope.eval.featnet`): ``class_samples.fd_emoji``, the Fréchet distance of the
  samples' features to the training split's (FD-emoji; the FID formula in this network's
  features, not comparable with FID); ``fd_emoji_real``, the same for as many real held-out
  images (the floor at this sample count); ``class_acc``, the share of samples that the
  network's category head assigns to the asked class, and ``class_acc_real`` its accuracy on the
  real held-out images.
- ``resolution`` (``--res-px`` square sizes, ``--res-hw`` sizes ``HxW`` such as ``32x48``):
  class-conditional samples (null condition) at other image sizes, under every ``pos_scaling`` of
  ``--res-scalings`` that applies (``learned1d`` cannot extrapolate; ``factorized2d`` extrapolates
  only while the grid fits its tables; ``ntk``/``yarn`` need a RoPE part and a grid longer than
  the training one on some axis, else they repeat another mode's numbers, which the record then
  carries with ``same_as``), with FD-emoji and class accuracy after resizing to the feature
  network's size (non-square samples are squeezed to its square), and (``eval.res_vloss``) the
  held-out v-loss with the null condition on the held-out images resized to that size;
  ``--grids`` saves their sample grids.
- ``fid`` (``--fid-inception FILE``): standard FID of the class samples against the held-out
  images through torch-fidelity, with the user's Inception weights file (optional dependency).

``eval.metrics`` picks the groups (``vloss,class,cond,res``; default all); the other ``eval.*`` keys
(:class:`jitrope.config.EvalConfig`) say how much to measure, the samples are drawn as ``sample.*`` says.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..checkpoint import load_checkpoint, model_from_weights, run_config
from ..config import EVAL_METRICS, Config, ConfigError, EvalConfig, parse_hw
from ..data import BatchMaker, DataError, ImageSet, build_dataset, resize_images, to_float
from ..diffusion import Diffusion
from ..grids import make_grid
from ..posenc import POS_EMBEDS, SCALINGS
from ..rope import FREQ_SCALINGS
from ..runtime import resolve_device
from ..sampling import generate
from .featnet import load_or_train_featnet
from .metrics import frechet_distance, gaussian_stats, inception_fid, psnr, ssim

__all__ = [
    "evaluate",
    "evaluate_weights",
    "resolution_scalings",
    "scaling_same_as",
    "resolution_study",
    "heldout_vloss",
    "METRICS",
]

METRICS = EVAL_METRICS  # the metric groups (eval.metrics)


Size = Union[int, Sequence[int]]


def _hw(size: Size) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resolution_scalings(model, img_size: Size, scalings: Sequence[str] = SCALINGS) -> Dict[str, Optional[str]]:
    """``pos_scaling`` values that can place an image of ``img_size`` (an int, or ``(H, W)``) on
    ``model``: name -> None if usable, else why not. ``learned1d`` has slots only for training tokens
    (it interpolates, also under ntk / yarn); the factorized table extrapolates only while the grid fits it."""
    mc = model.cfg
    H, W = _hw(img_size)
    out: Dict[str, Optional[str]] = {}
    for scaling in scalings:
        why = None
        if mc.pos_embed == "learned1d" and scaling == "extrapolate":
            why = "learned1d has no slots beyond its training grid"
        elif mc.pos_embed == "factorized2d" and scaling == "extrapolate":
            gh, gw = H // mc.patch_size, W // mc.patch_size
            table = model.pos.parts["factorized2d"]  # the real table size, whatever default made it
            mh, mw = table.pos_h.shape[0], table.pos_w.shape[0]
            if gh > mh or gw > mw:
                why = f"grid {gh}x{gw} exceeds the factorized table ({mh}x{mw})"
        if why is None:
            try:  # e.g. the null condition needs an integer grid in the training ratio
                model.sequence_layout((H, W), None, scaling=scaling)
            except ValueError as e:
                why = str(e)
        out[scaling] = why
    return out


def _placement(model, hw: Tuple[int, int], scaling: str) -> Tuple:
    """What ``scaling`` does at ``hw``: (table placement, RoPE placement); equal tuples, equal samples."""
    mc = model.cfg
    parts = POS_EMBEDS[mc.pos_embed]
    grid = (hw[0] // mc.patch_size, hw[1] // mc.patch_size)
    if grid == mc.grid:
        return ("train",)
    table = None
    if any(p != "rope2d" and p != "rope2d_mixed" for p in parts):
        table = "interpolate" if scaling in FREQ_SCALINGS else scaling
    rope = None
    if model.pos.rotary is not None:
        longer = grid[0] > mc.grid[0] or grid[1] > mc.grid[1]
        rope = scaling if scaling in ("extrapolate", "interpolate") or longer else "extrapolate"
    return table, rope


def scaling_same_as(model, img_size: Size, scaling: str, before: Sequence[str]) -> Optional[str]:
    """The first mode of ``before`` that gives exactly the samples of ``scaling`` at ``img_size``, or None
    (ntk / yarn on an encoding without RoPE are interpolation; on a grid no longer than the training one
    they change no frequency; at the training grid every mode is the same)."""
    hw = _hw(img_size)
    mine = _placement(model, hw, scaling)
    return next((b for b in before if _placement(model, hw, b) == mine), None)


@torch.no_grad()
def heldout_vloss(
    model,
    diffusion: Diffusion,
    maker: BatchMaker,
    t_grid: Sequence[float],
    *,
    max_images: int,
    batch_size: int,
    seed: int,
    device,
    drop_cond: bool = False,
    img_size: Optional[Size] = None,
) -> Dict[str, Any]:
    """The v-loss on held-out images at fixed t and noise. ``img_size`` (an int or ``(H, W)``): on the
    images resized to it, with the null condition (whose grid follows the image's), under the model's
    ``cfg.pos_scaling``."""
    n = min(len(maker.ds), max_images)
    idx = torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    hw = _hw(img_size) if img_size is not None else (model.cfg.img_size, model.cfg.img_size)
    noise = torch.randn(n, model.cfg.in_channels, *hw, generator=g)
    u = torch.rand(n, 2, generator=g)
    per_t = []
    for tv in t_grid:
        tot = 0.0
        for s in range(0, n, batch_size):
            sl = slice(s, s + batch_size)
            x, y, cond = maker(idx[sl], u[sl])
            if img_size is not None:
                x, cond = resize_images(x, hw), None
            tt = torch.full((x.shape[0],), float(tv), device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
                drop = None
                if drop_cond and cond is not None:
                    drop = torch.ones(x.shape[0], dtype=torch.bool, device=device)
                loss = diffusion.loss(model, x, y, cond, drop, t=tt, noise=noise[sl].to(device))
            tot += float(loss) * x.shape[0]
        per_t.append(tot / n)
    # v - v_pred = (x - x_pred) / max(1 - t, t_eps): the same error in x space, where large t is not amplified
    per_t_x = [v * max(1.0 - t, diffusion.t_eps) ** 2 for v, t in zip(per_t, t_grid)]
    return {
        "t": [float(t) for t in t_grid],
        "per_t": per_t,
        "mean": sum(per_t) / len(per_t),
        "x_mse_per_t": per_t_x,
        "x_mse_mean": sum(per_t_x) / len(per_t_x),
        "n_images": n,
    }


def _nearest(samples: Tensor, ref: Tensor, chunk: int = 256):
    """Index of and RMS distance to the nearest ``ref`` image (both float, flattened at 16x16)."""
    a = resize_images(samples, min(16, samples.shape[-1])).flatten(1)
    b = resize_images(ref, min(16, ref.shape[-1])).flatten(1)
    best_d, best_i = [], []
    for s in range(0, a.shape[0], chunk):
        d = torch.cdist(a[s : s + chunk], b)
        v, i = d.min(1)
        best_d.append(v)
        best_i.append(i)
    d = torch.cat(best_d) / math.sqrt(a.shape[1])
    return torch.cat(best_i), d


def evaluate(
    ckpt, cfg: Optional[Config] = None, *, overrides: Sequence[str] = (), log=print, allow_unverified: bool = False
) -> Dict[str, Any]:
    """Compute the metrics of the module docstring for a checkpoint; returns them as a dict.

    ``cfg``: the config to evaluate with (:func:`jitrope.checkpoint.run_config`); default: the run's own
    with the dotted ``overrides`` (e.g. ``["eval.metrics=[vloss]", "sample.steps=10"]``)."""
    w = load_checkpoint(ckpt, allow_unverified=allow_unverified)
    if cfg is None:
        cfg = run_config(w, overrides=overrides)
    return evaluate_weights(w, cfg, resolve_device(cfg.eval.device, "eval.device"), log=log)


@dataclass
class _Setup:
    """What every metric group reads: the model and how it samples (``kw``: :func:`generate`'s settings),
    the held-out batches (``maker``, with condition images) and both splits, and the feature network
    (``fnet`` with its training statistics ``fextra``; None: no FD-emoji or class accuracy)."""

    model: Any
    diffusion: Diffusion
    kw: Dict[str, Any]
    maker: BatchMaker
    eval_set: ImageSet
    train_set: ImageSet
    e: EvalConfig
    device: torch.device
    log: Callable[[str], None]
    fnet: Any = None
    fextra: Optional[Dict[str, Any]] = None

    @property
    def judge(self) -> Optional[Callable[[Tensor, Tensor], Dict[str, float]]]:
        """FD-emoji and class accuracy of samples asked for classes ``asked``; None without the feature network."""
        return None if self.fnet is None else self._judge

    def _judge(self, samples: Tensor, asked: Tensor) -> Dict[str, float]:
        f, pred = self.fnet.embed(samples)
        return {
            "fd_emoji": frechet_distance(*gaussian_stats(f), self.fextra["train_mu"], self.fextra["train_sigma"]),
            "class_acc": float((pred == asked).float().mean()),
        }

    def vloss(self, **kw) -> Dict[str, Any]:
        """:func:`heldout_vloss` with the eval settings (``kw``: drop_cond, img_size)."""
        e = self.e
        return heldout_vloss(
            self.model,
            self.diffusion,
            self.maker,
            e.t_grid,
            max_images=e.max_images,
            batch_size=e.batch_size,
            seed=e.seed,
            device=self.device,
            **kw,
        )


def evaluate_weights(w: Mapping[str, Any], cfg: Config, device: torch.device, *, log=print) -> Dict[str, Any]:
    """:func:`evaluate` of weights already loaded (:func:`jitrope.checkpoint.load_checkpoint`) with ``cfg``
    on ``device``."""
    t0 = time.perf_counter()
    e = cfg.eval
    metrics = list(e.metrics)
    model, info = model_from_weights(w, cfg, ema=cfg.sample.ema, device=device)
    st, sizes = _setup(model, cfg, device, log)
    out = _header(st, info, cfg)
    log(f"{info['path']} (step {info['step']}, {info['weights']}); {len(st.eval_set)} {e.split} images")
    if e.featnet not in (None, "none") and ({"class", "res"} & set(metrics)):
        path = None if e.featnet == "auto" else e.featnet
        st.fnet, st.fextra = load_or_train_featnet(cfg.data, device=device, path=path, log=log)
        out["featnet"] = {"path": st.fextra["path"], **st.fextra["info"]}
    if "vloss" in metrics:
        _vloss_metrics(out, st)
    if "class" in metrics:
        _class_metrics(out, st)
    if "cond" in metrics and model.cfg.cond_img_size is not None:
        _cond_metrics(out, st)
    if "res" in metrics and sizes:
        out["resolution"] = resolution_study(
            model,
            st.diffusion,
            st.kw,
            sizes,
            n_per_class=e.res_n_per_class,
            seed=e.seed,
            judge=st.judge,
            grids=e.grids,
            log=log,
            scalings=e.res_scalings,
            vloss=(lambda hw: st.vloss(img_size=hw)) if e.res_vloss else None,  # under the record's pos_scaling
        )
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _setup(model, cfg: Config, device: torch.device, log) -> Tuple[_Setup, List[Size]]:
    """The data and sampling settings of an evaluation, and the sizes of its resolution study (checked
    before any sampling, so that no work is lost)."""
    e, s, dcfg, mc = cfg.eval, cfg.sample, cfg.data, model.cfg
    eval_set = build_dataset(dcfg, e.split, seed=cfg.train.seed, log=log)
    train_set = build_dataset(dcfg, "train", seed=cfg.train.seed, log=log)
    if eval_set.num_classes != mc.num_classes:
        raise DataError(f"data {dcfg.name} has {eval_set.num_classes} classes, the model {mc.num_classes}")
    sizes = [*e.res_px, *(parse_hw(hw, "eval.res_hw") for hw in e.res_hw)]
    bad_px = [px for px in sizes if any(v % mc.patch_size for v in _hw(px))]
    if bad_px and "res" in e.metrics:
        key = "eval.res_px" if any(isinstance(px, int) for px in bad_px) else "eval.res_hw"
        raise ConfigError(f"config key {key}: {bad_px} not a multiple of the model's patch_size={mc.patch_size}")
    if sizes and "res" in e.metrics and e.featnet in (None, "none"):  # a Config built by hand skips its checks
        raise ConfigError(
            "config key eval.res_px: the resolution study needs the feature network (eval.featnet auto or a file)"
        )
    cond_mode = "none" if mc.cond_img_size is None else (dcfg.cond if dcfg.cond != "none" else "downsample")
    kw = dict(
        steps=s.steps,
        sampler=s.sampler,
        cfg=s.cfg,
        cfg_interval=tuple(s.cfg_interval),
        batch_size=e.batch_size,
        device=device,
    )
    maker = BatchMaker(eval_set, cond=cond_mode, cond_size=mc.cond_img_size, device=device)
    st = _Setup(model, Diffusion.from_config(cfg.diffusion), kw, maker, eval_set, train_set, e, device, log)
    return st, sizes


def _header(st: _Setup, info: Mapping[str, Any], cfg: Config) -> Dict[str, Any]:
    """The record's first keys: what was evaluated, on which data, sampled how."""
    return {
        "checkpoint": str(info["path"]),
        "step": info["step"],
        "weights": info["weights"],
        "data": cfg.data.name,
        "split": cfg.eval.split,
        "pos_embed": st.model.cfg.pos_embed,
        "sampling": {k: (list(v) if isinstance(v, tuple) else v) for k, v in st.kw.items() if k != "device"},
        "params": sum(p.numel() for p in st.model.parameters()),
    }


def _vloss_metrics(out: Dict[str, Any], st: _Setup) -> None:
    out["vloss"] = vl = st.vloss()
    per_t = " ".join(f"{v:.3f}" for v in vl["per_t"])
    st.log(f"  held-out v-loss {vl['mean']:.4f} (x-mse {vl['x_mse_mean']:.4f}); per t: {per_t}")
    if st.model.cfg.cond_img_size is not None:  # the same with the null condition: class-only denoising
        out["vloss_null_cond"] = vl = st.vloss(drop_cond=True)
        st.log(f"  ... with the null condition {vl['mean']:.4f} (x-mse {vl['x_mse_mean']:.4f})")


def _class_metrics(out: Dict[str, Any], st: _Setup) -> None:
    """Class-conditional samples: nearest-neighbour class match, pixel statistics and, with the
    feature network, FD-emoji and class accuracy (real held-out images beside both)."""
    e, k = st.e, st.model.cfg.num_classes
    labels = torch.arange(k).repeat_interleave(e.n_per_class)
    x = generate(st.model, st.diffusion, labels, None, seed=e.seed, **st.kw)
    held = to_float(st.eval_set.images)
    out["class_samples"] = cs = _nearest_class_match(x, labels, k, st.train_set, st.eval_set)
    cs.update(
        pixel_mean=x.mean((0, 2, 3)).tolist(),
        pixel_std=x.std((0, 2, 3)).tolist(),
        data_pixel_mean=held.mean((0, 2, 3)).tolist(),
        data_pixel_std=held.std((0, 2, 3)).tolist(),
    )
    st.log(
        f"  class samples: nn-class acc {cs['nn_class_acc']:.3f} (chance {cs['nn_class_acc_chance']:.3f}, "
        f"real held-out images {cs['nn_class_acc_real']:.3f}), "
        f"nn rms {cs['nn_rms']:.3f}, pixel mean {sum(cs['pixel_mean']) / 3:.3f} "
        f"vs data {sum(cs['data_pixel_mean']) / 3:.3f}, "
        f"std {sum(cs['pixel_std']) / 3:.3f} vs {sum(cs['data_pixel_std']) / 3:.3f}"
    )
    if st.judge is not None:
        _judge_class_samples(cs, st, x, labels, held)
    if e.fid_inception is not None:
        cs["fid_inception"] = inception_fid(held, x, e.fid_inception)
        st.log(f"  FID (Inception, {len(x)} samples vs {len(held)} held-out images) {cs['fid_inception']:.2f}")
    if e.grids is not None:
        _save_grid(x, labels, k, Path(e.grids) / f"px{st.model.cfg.img_size}_train.png")


def _nearest_class_match(x: Tensor, labels: Tensor, k: int, train_set: ImageSet, eval_set: ImageSet) -> Dict[str, Any]:
    """How often a sample's nearest training image has the asked class (of ``k``), against chance and
    against the same classifier on the real held-out images (its ceiling); the RMS distance to that image."""
    ref = to_float(train_set.images)
    nn_i, nn_d = _nearest(x, ref)
    acc = (train_set.labels[nn_i] == labels).float()
    counts = torch.bincount(train_set.labels, minlength=k).float()
    real_i, _ = _nearest(to_float(eval_set.images), ref)
    return {
        "n": len(labels),
        "nn_class_acc": float(acc.mean()),
        "nn_class_acc_chance": float(counts.max() / counts.sum()),
        "nn_class_acc_real": float((train_set.labels[real_i] == eval_set.labels).float().mean()),
        "nn_class_acc_per_class": [float(acc[labels == c].mean()) for c in range(k)],
        "nn_rms": float(nn_d.mean()),
    }


def _judge_class_samples(cs: Dict[str, Any], st: _Setup, x: Tensor, labels: Tensor, held: Tensor) -> None:
    """FD-emoji and class accuracy of the class samples, and of as many real held-out images (FD grows
    as the sample count falls, so this is the floor at this count)."""
    cs.update(st.judge(x, labels))
    pick = torch.randperm(len(st.eval_set), generator=torch.Generator().manual_seed(st.e.seed))[: len(labels)]
    real = st.judge(held[pick], st.eval_set.labels[pick])
    _, real_pred = st.fnet.embed(held)
    cs["fd_emoji_real"], cs["n_real"] = real["fd_emoji"], len(pick)
    cs["class_acc_real"] = float((real_pred == st.eval_set.labels).float().mean())
    st.log(
        f"  FD-emoji {cs['fd_emoji']:.3f} (real held-out: {cs['fd_emoji_real']:.3f}), class accuracy "
        f"{cs['class_acc']:.3f} (real held-out: {cs['class_acc_real']:.3f})"
    )


def _save_grid(x: Tensor, labels: Tensor, k: int, path: Path, per_class: int = 4) -> None:
    """Rows = classes, ``per_class`` samples each (the first ones of every class)."""
    pick = torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in range(k)])
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(x[pick], per_class).save(path)


@torch.no_grad()
def resolution_study(
    model,
    diffusion,
    kw,
    sizes: Sequence[Size],
    *,
    n_per_class: int,
    seed: int,
    judge,
    grids: Optional[str] = None,
    log=print,
    scalings: Sequence[str] = SCALINGS,
    vloss: Optional[Callable[[Tuple[int, int]], Dict[str, Any]]] = None,
) -> List[Dict[str, Any]]:
    """Class-conditional samples (null condition) at each image size of ``sizes`` (ints: square, or
    ``(H, W)``) under every ``pos_scaling`` of ``scalings`` that applies (:func:`resolution_scalings`);
    one record per (size, scaling) with ``hw``, ``grid_hw`` (and ``px``, ``grid`` for square sizes),
    FD-emoji and class accuracy from ``judge(samples, labels)``, ``vloss(hw)`` (run under the
    record's scaling) when given, or the reason it does not apply (``skipped``). A mode that gives
    exactly the samples of an earlier one (:func:`scaling_same_as`) copies its numbers and says
    ``same_as``. The same noise seed at every size, for every model."""
    p = model.cfg.patch_size
    labels = torch.arange(model.cfg.num_classes).repeat_interleave(n_per_class)
    rows: List[Dict[str, Any]] = []
    old = model.cfg.pos_scaling
    try:
        for size in sizes:
            H, W = _hw(size)
            if H % p or W % p:
                raise ValueError(f"resolution study: size {H}x{W} is not a multiple of patch_size={p}")
            done: Dict[str, Dict[str, Any]] = {}
            for scaling, why in resolution_scalings(model, (H, W), scalings).items():
                row: Dict[str, Any] = {"hw": [H, W], "grid_hw": [H // p, W // p], "scaling": scaling}
                if H == W:
                    row.update(px=H, grid=H // p)
                same = None if why is not None else scaling_same_as(model, (H, W), scaling, list(done))
                if why is not None:
                    rows.append({**row, "skipped": why})
                elif same is not None:
                    measured = {m: v for m, v in done[same].items() if m not in row and m != "same_as"}
                    rows.append({**row, **measured, "same_as": same})
                else:
                    model.cfg.pos_scaling = scaling
                    _measure_at(row, model, diffusion, kw, labels, seed=seed, judge=judge, vloss=vloss, grids=grids)
                    rows.append(row)
                    done[scaling] = row
                    extra = f", v-loss {row['vloss']:.4f}" if "vloss" in row else ""
                    log(
                        f"  {H}x{W} ({H // p}x{W // p} grid, {scaling}): FD-emoji {row['fd_emoji']:.3f}, "
                        f"class accuracy {row['class_acc']:.3f}{extra}"
                    )
    finally:
        model.cfg.pos_scaling = old
    return rows


def _measure_at(row: Dict[str, Any], model, diffusion, kw, labels: Tensor, *, seed: int, judge, vloss, grids) -> None:
    """Fill ``row`` (one size of the resolution study, under the model's ``pos_scaling`` of the moment)
    with its samples' FD-emoji and class accuracy and, with ``vloss``, the held-out v-loss; save their
    grid into ``grids``."""
    H, W = row["hw"]
    x = generate(model, diffusion, labels, None, img_size=(H, W), seed=seed, **kw)
    row.update(judge(x, labels))
    row["n"] = len(labels)
    if vloss is not None:
        vl = vloss((H, W))
        row["vloss"], row["vloss_per_t"] = vl["mean"], vl["per_t"]
    if grids is not None:
        name = f"px{H}" if H == W else f"px{H}x{W}"
        _save_grid(x, labels, model.cfg.num_classes, Path(grids) / f"{name}_{row['scaling']}.png")


def _cond_metrics(out: Dict[str, Any], st: _Setup) -> None:
    """Samples given held-out condition images (and their class): fidelity to the condition and the target
    (PSNR/SSIM) and, with the feature network, FD-emoji and class accuracy, the same measures as the class
    samples' (which have no condition) for a with/without comparison."""
    mc, seed, maker = st.model.cfg, st.e.seed, st.maker
    m = min(st.e.n_cond, len(st.eval_set))
    idx = torch.linspace(0, len(st.eval_set) - 1, m).round().long()
    u = torch.rand(m, 2, generator=torch.Generator().manual_seed(seed + 1))
    xt, y, cond = maker(idx, u)
    xs = generate(st.model, st.diffusion, y.cpu(), cond.cpu(), seed=seed + 2, **st.kw)
    cond_rms = (resize_images(xs, mc.cond_img_size) - cond.cpu()).pow(2).flatten(1).mean(1).sqrt()
    target_rms = (xs - xt.cpu()).pow(2).flatten(1).mean(1).sqrt()
    out["cond_samples"] = cd = {
        "n": m,
        "cond_rms": float(cond_rms.mean()),
        "target_rms": float(target_rms.mean()),
        "psnr": float(psnr(xs, xt.cpu()).mean()),
        "ssim": float(ssim(xs, xt.cpu()).mean()),
        "cond_mode": maker.cond,
    }
    judged = st.judge is not None and m >= 2  # a Fréchet distance needs two samples at least
    if judged:
        cd.update(st.judge(xs, y.cpu()))
    st.log(
        f"  condition samples ({maker.cond}): cond rms {cd['cond_rms']:.3f}, target rms {cd['target_rms']:.3f}, "
        f"PSNR {cd['psnr']:.2f} dB, SSIM {cd['ssim']:.3f}"
        + (f", FD-emoji {cd['fd_emoji']:.3f}, class accuracy {cd['class_acc']:.3f}" if judged else "")
    )
