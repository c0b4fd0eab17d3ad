"""Evaluate a checkpoint without any downloaded network: prints and writes JSON metrics.

    python -m jitrope.evaluate --ckpt runs/emoji32 --data emoji
    python -m jitrope.evaluate --ckpt runs/emoji32/checkpoints/step_00002000 --out eval.json --n-per-class 16

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

``--metrics`` picks the groups (``vloss,class,cond,res``; default all).

Settings are config keys, read as in training: the run's stored config, then ``--config FILE``,
then ``section.key=value`` overrides, then the flags, each of which sets one key. ``eval.*``
(:class:`jitrope.config.EvalConfig`) says what to measure and where to write; the samples are
drawn as ``sample.*`` says (``--steps``, ``--sampler``, ``--cfg``, ``--ema`` set those);
``--data`` and ``--data-root`` set ``data.*``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..checkpoint import CheckpointError, load_checkpoint, model_from_weights, run_config
from ..cli import Flag, add_flags, check_file_out, fail, flag_layer
from ..config import EVAL_METRICS, Config, ConfigError, parse_hw
from ..data import BatchMaker, DataError, build_dataset, resize_images, to_float
from ..diffusion import SAMPLERS, Diffusion
from ..fileio import atomic_write_text, check_writable_dir
from ..grids import make_grid
from ..posenc import POS_EMBEDS, SCALINGS
from ..rope import FREQ_SCALINGS
from ..runtime import cpu_setup, resolve_device
from ..sampling import generate
from .metrics import frechet_distance, gaussian_stats, inception_fid, psnr, ssim

__all__ = [
    "evaluate",
    "main",
    "resolution_scalings",
    "scaling_same_as",
    "resolution_study",
    "heldout_vloss",
    "METRICS",
    "FLAGS",
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

    ``cfg``: the config to evaluate with (:func:`jitrope.sample.run_config`); default: the run's own
    with the dotted ``overrides`` (e.g. ``["eval.metrics=[vloss]", "sample.steps=10"]``)."""
    w = load_checkpoint(ckpt, allow_unverified=allow_unverified)
    if cfg is None:
        cfg = run_config(w, overrides=overrides)
    return _evaluate(w, cfg, resolve_device(cfg.eval.device, "eval.device"), log=log)


def _evaluate(w: Mapping[str, Any], cfg: Config, device: torch.device, *, log=print) -> Dict[str, Any]:
    t0 = time.perf_counter()
    e, s = cfg.eval, cfg.sample
    metrics = list(e.metrics)
    model, info = model_from_weights(w, cfg, ema=s.ema, device=device)
    dcfg = cfg.data
    eval_set = build_dataset(dcfg, e.split, seed=cfg.train.seed, log=log)
    train_set = build_dataset(dcfg, "train", seed=cfg.train.seed, log=log)
    if eval_set.num_classes != model.cfg.num_classes:
        raise DataError(f"data {dcfg.name} has {eval_set.num_classes} classes, the model {model.cfg.num_classes}")
    mc = model.cfg
    sizes = [*e.res_px, *(parse_hw(hw, "eval.res_hw") for hw in e.res_hw)]
    bad_px = [px for px in sizes if any(v % mc.patch_size for v in _hw(px))]
    if bad_px and "res" in metrics:  # before any sampling, so no work is lost
        key = "eval.res_px" if any(isinstance(px, int) for px in bad_px) else "eval.res_hw"
        raise ConfigError(f"config key {key}: {bad_px} not a multiple of the model's patch_size={mc.patch_size}")
    if sizes and "res" in metrics and e.featnet in (None, "none"):  # a Config built by hand skips its checks
        raise ConfigError(
            "config key eval.res_px: the resolution study needs the feature network (eval.featnet auto or a file)"
        )
    cond_mode = "none" if mc.cond_img_size is None else (dcfg.cond if dcfg.cond != "none" else "downsample")
    maker = BatchMaker(eval_set, cond=cond_mode, cond_size=mc.cond_img_size, device=device)
    diffusion = Diffusion.from_config(cfg.diffusion)
    kw = dict(
        steps=s.steps,
        sampler=s.sampler,
        cfg=s.cfg,
        cfg_interval=tuple(s.cfg_interval),
        batch_size=e.batch_size,
        device=device,
    )
    out: Dict[str, Any] = {
        "checkpoint": str(info["path"]),
        "step": info["step"],
        "weights": info["weights"],
        "data": dcfg.name,
        "split": e.split,
        "pos_embed": mc.pos_embed,
        "sampling": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items() if k != "device"},
        "params": sum(p.numel() for p in model.parameters()),
    }
    log(f"{info['path']} (step {info['step']}, {info['weights']}); {len(eval_set)} {e.split} images")
    fnet = fextra = None
    if e.featnet not in (None, "none") and ({"class", "res"} & set(metrics)):
        from .featnet import load_or_train_featnet

        path = None if e.featnet == "auto" else e.featnet
        fnet, fextra = load_or_train_featnet(dcfg, device=device, path=path, log=log)
        out["featnet"] = {"path": fextra["path"], **fextra["info"]}

    def judge(samples: Tensor, asked: Tensor) -> Dict[str, float]:
        f, pred = fnet.embed(samples)
        return {
            "fd_emoji": frechet_distance(*gaussian_stats(f), fextra["train_mu"], fextra["train_sigma"]),
            "class_acc": float((pred == asked).float().mean()),
        }

    if "vloss" in metrics:
        _vloss_metrics(
            out,
            model,
            diffusion,
            maker,
            e.t_grid,
            max_images=e.max_images,
            batch_size=e.batch_size,
            seed=e.seed,
            device=device,
            log=log,
        )
    if "class" in metrics:
        _class_metrics(
            out,
            model,
            diffusion,
            kw,
            train_set,
            eval_set,
            n_per_class=e.n_per_class,
            seed=e.seed,
            judge=judge if fnet is not None else None,
            fnet=fnet,
            fextra=fextra,
            fid_inception=e.fid_inception,
            grids=e.grids,
            log=log,
        )
    if "cond" in metrics and mc.cond_img_size is not None:
        _cond_metrics(
            out,
            model,
            diffusion,
            kw,
            maker,
            eval_set,
            n_cond=e.n_cond,
            seed=e.seed,
            log=log,
            judge=judge if fnet is not None else None,
        )
    if "res" in metrics and sizes:

        def vloss_at(hw):  # the record's pos_scaling is the model's while this runs
            return heldout_vloss(
                model,
                diffusion,
                maker,
                e.t_grid,
                max_images=e.max_images,
                batch_size=e.batch_size,
                seed=e.seed,
                device=device,
                img_size=hw,
            )

        out["resolution"] = resolution_study(
            model,
            diffusion,
            kw,
            sizes,
            n_per_class=e.res_n_per_class,
            seed=e.seed,
            judge=judge,
            grids=e.grids,
            log=log,
            scalings=e.res_scalings,
            vloss=vloss_at if e.res_vloss else None,
        )
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _vloss_metrics(out, model, diffusion, maker, t_grid, *, max_images, batch_size, seed, device, log) -> None:
    out["vloss"] = heldout_vloss(
        model, diffusion, maker, t_grid, max_images=max_images, batch_size=batch_size, seed=seed, device=device
    )
    vl = out["vloss"]
    per_t = " ".join(f"{v:.3f}" for v in vl["per_t"])
    log(f"  held-out v-loss {vl['mean']:.4f} (x-mse {vl['x_mse_mean']:.4f}); per t: {per_t}")
    if model.cfg.cond_img_size is not None:  # the same with the null condition: class-only denoising
        out["vloss_null_cond"] = heldout_vloss(
            model,
            diffusion,
            maker,
            t_grid,
            max_images=max_images,
            batch_size=batch_size,
            seed=seed,
            device=device,
            drop_cond=True,
        )
        vl = out["vloss_null_cond"]
        log(f"  ... with the null condition {vl['mean']:.4f} (x-mse {vl['x_mse_mean']:.4f})")


def _class_metrics(
    out, model, diffusion, kw, train_set, eval_set, *, n_per_class, seed, judge, fnet, fextra, fid_inception, grids, log
) -> None:
    """Class-conditional samples: nearest-neighbour class match, pixel statistics and, with the
    feature network, FD-emoji and class accuracy (real held-out images beside both)."""
    k = model.cfg.num_classes
    labels = torch.arange(k).repeat_interleave(n_per_class)
    x = generate(model, diffusion, labels, None, seed=seed, **kw)
    ref = to_float(train_set.images)
    nn_i, nn_d = _nearest(x, ref)
    acc = (train_set.labels[nn_i] == labels).float()
    held = to_float(eval_set.images)
    counts = torch.bincount(train_set.labels, minlength=k).float()
    real_i, _ = _nearest(held, ref)  # the same nearest-neighbour classifier on real held-out images: its ceiling
    real_acc = float((train_set.labels[real_i] == eval_set.labels).float().mean())
    out["class_samples"] = {
        "n": len(labels),
        "nn_class_acc": float(acc.mean()),
        "nn_class_acc_chance": float(counts.max() / counts.sum()),
        "nn_class_acc_real": real_acc,
        "nn_class_acc_per_class": [float(acc[labels == c].mean()) for c in range(k)],
        "nn_rms": float(nn_d.mean()),
        "pixel_mean": x.mean((0, 2, 3)).tolist(),
        "pixel_std": x.std((0, 2, 3)).tolist(),
        "data_pixel_mean": held.mean((0, 2, 3)).tolist(),
        "data_pixel_std": held.std((0, 2, 3)).tolist(),
    }
    cs = out["class_samples"]
    log(
        f"  class samples: nn-class acc {cs['nn_class_acc']:.3f} (chance {cs['nn_class_acc_chance']:.3f}, "
        f"real held-out images {cs['nn_class_acc_real']:.3f}), "
        f"nn rms {cs['nn_rms']:.3f}, pixel mean {sum(cs['pixel_mean']) / 3:.3f} "
        f"vs data {sum(cs['data_pixel_mean']) / 3:.3f}, "
        f"std {sum(cs['pixel_std']) / 3:.3f} vs {sum(cs['data_pixel_std']) / 3:.3f}"
    )
    if judge is not None:
        cs.update(judge(x, labels))
        # The real held-out images through the same judge, as many as there are samples (FD grows as
        # the sample count falls, so this is the floor at this count).
        pick = torch.randperm(len(eval_set), generator=torch.Generator().manual_seed(seed))[: len(labels)]
        real = judge(held[pick], eval_set.labels[pick])
        _, real_pred = fnet.embed(held)
        cs["fd_emoji_real"], cs["n_real"] = real["fd_emoji"], len(pick)
        cs["class_acc_real"] = float((real_pred == eval_set.labels).float().mean())
        log(
            f"  FD-emoji {cs['fd_emoji']:.3f} (real held-out: {cs['fd_emoji_real']:.3f}), class accuracy "
            f"{cs['class_acc']:.3f} (real held-out: {cs['class_acc_real']:.3f})"
        )
    if fid_inception is not None:
        cs["fid_inception"] = inception_fid(held, x, fid_inception)
        log(f"  FID (Inception, {len(x)} samples vs {len(held)} held-out images) {cs['fid_inception']:.2f}")
    if grids is not None:
        _save_grid(x, labels, k, Path(grids) / f"px{model.cfg.img_size}_train.png")


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
    k = model.cfg.num_classes
    p = model.cfg.patch_size
    labels = torch.arange(k).repeat_interleave(n_per_class)
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
                if why is not None:
                    rows.append({**row, "skipped": why})
                    continue
                same = scaling_same_as(model, (H, W), scaling, list(done))
                if same is not None:
                    measured = {m: v for m, v in done[same].items() if m not in row and m != "same_as"}
                    rows.append({**row, **measured, "same_as": same})
                    continue
                model.cfg.pos_scaling = scaling
                x = generate(model, diffusion, labels, None, img_size=(H, W), seed=seed, **kw)
                row.update(judge(x, labels))
                row["n"] = len(labels)
                if vloss is not None:
                    vl = vloss((H, W))
                    row["vloss"], row["vloss_per_t"] = vl["mean"], vl["per_t"]
                rows.append(row)
                done[scaling] = row
                extra = f", v-loss {row['vloss']:.4f}" if "vloss" in row else ""
                log(
                    f"  {H}x{W} ({H // p}x{W // p} grid, {scaling}): FD-emoji {row['fd_emoji']:.3f}, "
                    f"class accuracy {row['class_acc']:.3f}{extra}"
                )
                if grids is not None:
                    name = f"px{H}" if H == W else f"px{H}x{W}"
                    _save_grid(x, labels, k, Path(grids) / f"{name}_{scaling}.png")
    finally:
        model.cfg.pos_scaling = old
    return rows


def _cond_metrics(out, model, diffusion, kw, maker, eval_set, *, n_cond, seed, log, judge=None) -> None:
    """Samples given held-out condition images (and their class): fidelity to the condition and the target
    (PSNR/SSIM) and, with the feature network, FD-emoji and class accuracy, the same measures as the class
    samples' (which have no condition) for a with/without comparison."""
    mc = model.cfg
    m = min(n_cond, len(eval_set))
    idx = torch.linspace(0, len(eval_set) - 1, m).round().long()
    u = torch.rand(m, 2, generator=torch.Generator().manual_seed(seed + 1))
    xt, y, cond = maker(idx, u)
    xs = generate(model, diffusion, y.cpu(), cond.cpu(), seed=seed + 2, **kw)
    cond_rms = (resize_images(xs, mc.cond_img_size) - cond.cpu()).pow(2).flatten(1).mean(1).sqrt()
    target_rms = (xs - xt.cpu()).pow(2).flatten(1).mean(1).sqrt()
    out["cond_samples"] = {
        "n": m,
        "cond_rms": float(cond_rms.mean()),
        "target_rms": float(target_rms.mean()),
        "psnr": float(psnr(xs, xt.cpu()).mean()),
        "ssim": float(ssim(xs, xt.cpu()).mean()),
        "cond_mode": maker.cond,
    }
    cd = out["cond_samples"]
    if judge is not None:
        cd.update(judge(xs, y.cpu()))
    log(
        f"  condition samples ({maker.cond}): cond rms {cd['cond_rms']:.3f}, target rms {cd['target_rms']:.3f}, "
        f"PSNR {cd['psnr']:.2f} dB, SSIM {cd['ssim']:.3f}"
        + (f", FD-emoji {cd['fd_emoji']:.3f}, class accuracy {cd['class_acc']:.3f}" if judge is not None else "")
    )


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # flags may come between the overrides
    layer, names = flag_layer(args, FLAGS)
    if args.data is not None:
        data = layer.setdefault("data", {})
        if args.data in _DATA_NAMES:
            data["name"] = args.data
        else:  # a folder of images
            data["name"], data["root"] = "folder", args.data
        names.update({"data.name": "--data", **({} if args.data in _DATA_NAMES else {"data.root": "--data"})})
    try:
        w = load_checkpoint(args.ckpt, allow_unverified=args.allow_unverified)
        cfg = run_config(w, args.config, args.overrides, layer)
        e = cfg.eval
        device = resolve_device(e.device, "eval.device")
        # every output and input file before the evaluation, so that no work is lost (issue 18)
        out = _out_path(cfg, w)
        if e.grids is not None:
            check_writable_dir(e.grids, "eval.grids")
        if e.fid_inception is not None and not Path(e.fid_inception).expanduser().is_file():
            raise ConfigError(f"config key eval.fid_inception: no Inception weights file at {e.fid_inception}")
        if e.featnet not in (None, "none", "auto") and not Path(e.featnet).expanduser().is_file():
            raise ConfigError(f"config key eval.featnet: no feature network file at {e.featnet} (auto, none or a file)")
        cpu_setup(e.num_threads)
        res = _evaluate(w, cfg, device)
        atomic_write_text(out, json.dumps(res, indent=2))
    except (CheckpointError, DataError, ConfigError, OSError, ImportError) as err:
        return fail(err, names)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
