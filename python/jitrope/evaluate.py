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
  and cached, see :mod:`jitrope.featnet`): ``class_samples.fd_emoji``, the Fréchet distance of the
  samples' features to the training split's (FD-emoji; the FID formula in this network's
  features, not comparable with FID); ``fd_emoji_real``, the same for as many real held-out
  images (the floor at this sample count); ``class_acc``, the share of samples that the
  network's category head assigns to the asked class, and ``class_acc_real`` its accuracy on the
  real held-out images.
- ``resolution`` (``--res-px``): class-conditional samples at image sizes the model never saw,
  under every applicable ``pos_scaling`` (``learned1d`` only ``interpolate``; ``factorized2d``
  ``extrapolate`` only while the grid fits its tables), with FD-emoji and class accuracy after
  resizing to the feature network's size; ``--grids`` saves their sample grids.
- ``fid`` (``--fid-inception FILE``): standard FID of the class samples against the held-out
  images through torch-fidelity, with the user's Inception weights file (optional dependency).

``--metrics`` picks the groups (``vloss,class,cond,res``; default all).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .checkpoint import CheckpointError, resolve_checkpoint
from .config import ConfigError
from .data import BatchMaker, DataError, build_dataset, resize_images, to_float
from .diffusion import Diffusion
from .fileio import atomic_write_text, check_writable_dir
from .metrics import frechet_distance, gaussian_stats, inception_fid, psnr, ssim
from .sample import SampleError, _device, generate, load_model, make_grid

__all__ = ["evaluate", "main", "resolution_scalings", "METRICS"]

METRICS = ("vloss", "class", "cond", "res")


def resolution_scalings(model, img_size: int) -> Dict[str, Optional[str]]:
    """``pos_scaling`` values that can place an ``img_size`` image on ``model``: name -> None if
    usable, else why not. ``learned1d`` has slots only for training tokens (interpolation only);
    the factorized table extrapolates only while the grid fits it."""
    mc = model.cfg
    out: Dict[str, Optional[str]] = {}
    for scaling in ("extrapolate", "interpolate"):
        why = None
        if mc.pos_embed == "learned1d" and scaling == "extrapolate":
            why = "learned1d has no slots beyond its training grid"
        elif mc.pos_embed == "factorized2d" and scaling == "extrapolate":
            g = img_size // mc.patch_size
            table = model.pos.parts["factorized2d"]  # the real table size, whatever default made it
            mh, mw = table.pos_h.shape[0], table.pos_w.shape[0]
            if g > mh or g > mw:
                why = f"grid {g}x{g} exceeds the factorized table ({mh}x{mw})"
        if why is None:
            try:  # e.g. the null condition needs an integer grid in the training ratio
                model.sequence_layout((img_size, img_size), None, scaling=scaling)
            except ValueError as e:
                why = str(e)
        out[scaling] = why
    return out


@torch.no_grad()
def heldout_vloss(model, diffusion: Diffusion, maker: BatchMaker, t_grid: Sequence[float], *, max_images: int,
                  batch_size: int, seed: int, device, drop_cond: bool = False) -> Dict[str, Any]:
    n = min(len(maker.ds), max_images)
    idx = torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, model.cfg.in_channels, model.cfg.img_size, model.cfg.img_size, generator=g)
    u = torch.rand(n, 2, generator=g)
    per_t = []
    for tv in t_grid:
        tot = 0.0
        for s in range(0, n, batch_size):
            sl = slice(s, s + batch_size)
            x, y, cond = maker(idx[sl], u[sl])
            tt = torch.full((x.shape[0],), float(tv), device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
                drop = torch.ones(x.shape[0], dtype=torch.bool, device=device) if (drop_cond and cond is not None) else None
                loss = diffusion.loss(model, x, y, cond, drop, t=tt, noise=noise[sl].to(device))
            tot += float(loss) * x.shape[0]
        per_t.append(tot / n)
    # v - v_pred = (x - x_pred) / max(1 - t, t_eps): the same error in x space, where large t is not amplified
    per_t_x = [v * max(1.0 - t, diffusion.t_eps) ** 2 for v, t in zip(per_t, t_grid)]
    return {"t": [float(t) for t in t_grid], "per_t": per_t, "mean": sum(per_t) / len(per_t),
            "x_mse_per_t": per_t_x, "x_mse_mean": sum(per_t_x) / len(per_t_x), "n_images": n}


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
    ckpt,
    *,
    data: Optional[str] = None,
    data_root: Optional[str] = None,
    split: str = "val",
    ema: Optional[str] = None,
    t_grid: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    max_images: int = 512,
    n_per_class: int = 8,
    n_cond: int = 32,
    steps: Optional[int] = None,
    sampler: Optional[str] = None,
    cfg_scale: Optional[float] = None,
    batch_size: int = 64,
    seed: int = 0,
    device="cpu",
    metrics: Sequence[str] = METRICS,
    featnet: Optional[str] = "auto",
    res_px: Sequence[int] = (),
    res_n_per_class: int = 4,
    grids: Optional[str] = None,
    fid_inception: Optional[str] = None,
    log=print,
) -> Dict[str, Any]:
    """Compute the metrics of the module docstring; returns them as a dict.

    ``featnet``: "auto" (the cached feature network of the run's data, trained if missing), a
    file, or None / "none" (no FD-emoji or class accuracy)."""
    t0 = time.perf_counter()
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"metrics: unknown {bad}; choose from {list(METRICS)}")
    model, cfg, info = load_model(ckpt, ema=ema if ema is not None else cfg_ema(ckpt), device=device)
    dcfg = cfg.data
    if data is not None:
        if data in ("emoji", "synthetic", "folder"):
            dcfg.name = data
        else:  # a folder of images
            dcfg.name, dcfg.root = "folder", data
    if data_root is not None:
        dcfg.root = data_root
    eval_set = build_dataset(dcfg, split, seed=cfg.train.seed, log=log)
    train_set = build_dataset(dcfg, "train", seed=cfg.train.seed, log=log)
    if eval_set.num_classes != model.cfg.num_classes:
        raise DataError(f"data {dcfg.name} has {eval_set.num_classes} classes, the model {model.cfg.num_classes}")
    mc = model.cfg
    bad_px = [px for px in res_px if px % mc.patch_size] if "res" in metrics else []
    if bad_px:  # before any sampling, so no work is lost
        raise DataError(f"res_px: {bad_px} not a multiple of the model's patch_size={mc.patch_size}")
    maker = BatchMaker(eval_set, cond="none" if mc.cond_img_size is None else (dcfg.cond if dcfg.cond != "none" else "downsample"),
                       cond_size=mc.cond_img_size, device=device)
    diffusion = Diffusion.from_config(cfg.diffusion)
    s = cfg.sample
    kw = dict(steps=steps or s.steps, sampler=sampler or s.sampler, cfg=s.cfg if cfg_scale is None else cfg_scale,
              cfg_interval=tuple(s.cfg_interval), batch_size=batch_size, device=device)
    out: Dict[str, Any] = {
        "checkpoint": str(info["path"]),
        "step": info["step"],
        "weights": info["weights"],
        "data": dcfg.name,
        "split": split,
        "pos_embed": mc.pos_embed,
        "sampling": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items() if k != "device"},
        "params": sum(p.numel() for p in model.parameters()),
    }
    log(f"{info['path']} (step {info['step']}, {info['weights']}); {len(eval_set)} {split} images")
    fnet = fextra = None
    if featnet not in (None, "none") and ({"class", "res"} & set(metrics)):
        from .featnet import load_or_train_featnet

        fnet, fextra = load_or_train_featnet(dcfg, device=device, path=None if featnet == "auto" else featnet, log=log)
        out["featnet"] = {"path": fextra["path"], **fextra["info"]}

    def judge(samples: Tensor, asked: Tensor) -> Dict[str, float]:
        f, pred = fnet.embed(samples)
        return {"fd_emoji": frechet_distance(*gaussian_stats(f), fextra["train_mu"], fextra["train_sigma"]),
                "class_acc": float((pred == asked).float().mean())}

    if "vloss" in metrics:
        _vloss_metrics(out, model, diffusion, maker, t_grid, max_images=max_images, batch_size=batch_size, seed=seed,
                       device=device, log=log)
    if "class" in metrics:
        _class_metrics(out, model, diffusion, kw, train_set, eval_set, n_per_class=n_per_class, seed=seed,
                       judge=judge if fnet is not None else None, fnet=fnet, fextra=fextra,
                       fid_inception=fid_inception, grids=grids, log=log)
    if "cond" in metrics and mc.cond_img_size is not None:
        _cond_metrics(out, model, diffusion, kw, maker, eval_set, n_cond=n_cond, seed=seed, log=log)
    if "res" in metrics and res_px:
        if fnet is None:
            raise ValueError("the resolution study (res_px) needs the feature network (featnet='auto' or a file)")
        out["resolution"] = resolution_study(model, diffusion, kw, res_px, n_per_class=res_n_per_class, seed=seed,
                                             judge=judge, grids=grids, log=log)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _vloss_metrics(out, model, diffusion, maker, t_grid, *, max_images, batch_size, seed, device, log) -> None:
    out["vloss"] = heldout_vloss(model, diffusion, maker, t_grid, max_images=max_images, batch_size=batch_size,
                                 seed=seed, device=device)
    vl = out["vloss"]
    log(f"  held-out v-loss {vl['mean']:.4f} (x-mse {vl['x_mse_mean']:.4f}); per t: " + " ".join(f"{v:.3f}" for v in vl["per_t"]))
    if model.cfg.cond_img_size is not None:  # the same with the null condition: class-only denoising
        out["vloss_null_cond"] = heldout_vloss(model, diffusion, maker, t_grid, max_images=max_images,
                                               batch_size=batch_size, seed=seed, device=device, drop_cond=True)
        vl = out["vloss_null_cond"]
        log(f"  ... with the null condition {vl['mean']:.4f} (x-mse {vl['x_mse_mean']:.4f})")


def _class_metrics(out, model, diffusion, kw, train_set, eval_set, *, n_per_class, seed, judge, fnet, fextra,
                   fid_inception, grids, log) -> None:
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
    log(f"  class samples: nn-class acc {cs['nn_class_acc']:.3f} (chance {cs['nn_class_acc_chance']:.3f}, "
        f"real held-out images {cs['nn_class_acc_real']:.3f}), "
        f"nn rms {cs['nn_rms']:.3f}, pixel mean {sum(cs['pixel_mean']) / 3:.3f} vs data {sum(cs['data_pixel_mean']) / 3:.3f}, "
        f"std {sum(cs['pixel_std']) / 3:.3f} vs {sum(cs['data_pixel_std']) / 3:.3f}")
    if judge is not None:
        cs.update(judge(x, labels))
        # The real held-out images through the same judge, as many as there are samples (FD grows as
        # the sample count falls, so this is the floor at this count).
        pick = torch.randperm(len(eval_set), generator=torch.Generator().manual_seed(seed))[: len(labels)]
        real = judge(held[pick], eval_set.labels[pick])
        _, real_pred = fnet.embed(held)
        cs["fd_emoji_real"], cs["n_real"] = real["fd_emoji"], len(pick)
        cs["class_acc_real"] = float((real_pred == eval_set.labels).float().mean())
        log(f"  FD-emoji {cs['fd_emoji']:.3f} (real held-out: {cs['fd_emoji_real']:.3f}), class accuracy "
            f"{cs['class_acc']:.3f} (real held-out: {cs['class_acc_real']:.3f})")
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
def resolution_study(model, diffusion, kw, res_px: Sequence[int], *, n_per_class: int, seed: int, judge,
                     grids: Optional[str] = None, log=print) -> List[Dict[str, Any]]:
    """Class-conditional samples at each image size of ``res_px`` under every ``pos_scaling`` that
    applies (:func:`resolution_scalings`); one record per (size, scaling) with FD-emoji and class
    accuracy, or the reason it does not apply. The same noise seed for every model."""
    k = model.cfg.num_classes
    labels = torch.arange(k).repeat_interleave(n_per_class)
    rows: List[Dict[str, Any]] = []
    old = model.cfg.pos_scaling
    try:
        for px in res_px:
            p = model.cfg.patch_size
            if px % p:
                raise ValueError(f"res_px: {px} is not a multiple of patch_size={p}")
            for scaling, why in resolution_scalings(model, px).items():
                row: Dict[str, Any] = {"px": px, "grid": px // p, "scaling": scaling}
                if why is not None:
                    rows.append({**row, "skipped": why})
                    continue
                model.cfg.pos_scaling = scaling
                x = generate(model, diffusion, labels, None, img_size=px, seed=seed + px, **kw)
                row.update(judge(x, labels))
                row["n"] = len(labels)
                rows.append(row)
                log(f"  {px}x{px} ({px // p}x{px // p} grid, {scaling}): FD-emoji {row['fd_emoji']:.3f}, "
                    f"class accuracy {row['class_acc']:.3f}")
                if grids is not None:
                    _save_grid(x, labels, k, Path(grids) / f"px{px}_{scaling}.png")
    finally:
        model.cfg.pos_scaling = old
    return rows


def _cond_metrics(out, model, diffusion, kw, maker, eval_set, *, n_cond, seed, log) -> None:
    mc = model.cfg
    m = min(n_cond, len(eval_set))
    idx = torch.linspace(0, len(eval_set) - 1, m).round().long()
    u = torch.rand(m, 2, generator=torch.Generator().manual_seed(seed + 1))
    xt, y, cond = maker(idx, u)
    xs = generate(model, diffusion, y.cpu(), cond.cpu(), seed=seed + 2, **kw)
    cond_rms = (resize_images(xs, mc.cond_img_size) - cond.cpu()).pow(2).flatten(1).mean(1).sqrt()
    target_rms = (xs - xt.cpu()).pow(2).flatten(1).mean(1).sqrt()
    out["cond_samples"] = {"n": m, "cond_rms": float(cond_rms.mean()), "target_rms": float(target_rms.mean()),
                           "psnr": float(psnr(xs, xt.cpu()).mean()), "ssim": float(ssim(xs, xt.cpu()).mean()),
                           "cond_mode": maker.cond}
    cd = out["cond_samples"]
    log(f"  condition samples ({maker.cond}): cond rms {cd['cond_rms']:.3f}, target rms {cd['target_rms']:.3f}, "
        f"PSNR {cd['psnr']:.2f} dB, SSIM {cd['ssim']:.3f}")


def cfg_ema(ckpt) -> str:
    from .checkpoint import load_weights

    return str((load_weights(ckpt)["config"].get("sample") or {}).get("ema", "0"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jitrope.evaluate",
        description="Evaluate a JiT checkpoint on held-out data: v-loss on a fixed t grid with fixed noise, "
        "class-following of samples by nearest training image, pixel statistics, and (with a condition "
        "image) how closely samples follow their condition. Prints a summary and writes JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="run folder (newest checkpoint), checkpoints/step_* folder or weights file")
    p.add_argument("--data", default=None, help="emoji | synthetic | a folder of class subfolders (default: the run's data)")
    p.add_argument("--data-root", default=None, help="override data.root (emoji cache folder)")
    p.add_argument("--split", choices=("val", "train", "all"), default="val")
    p.add_argument("--out", default=None, help="JSON file (default: <run>/eval/step_<N>.json)")
    p.add_argument("--ema", default=None, help="EMA index 0 / 1 or none (default: the run's sample.ema)")
    p.add_argument("--t-grid", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="comma-separated t values of the v-loss")
    p.add_argument("--max-images", type=int, default=512, help="held-out images in the v-loss")
    p.add_argument("--n-per-class", type=int, default=8, help="class-conditional samples per class")
    p.add_argument("--n-cond", type=int, default=32, help="condition-image samples")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default sample.steps)")
    p.add_argument("--sampler", choices=("heun", "euler"), default=None)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default sample.cfg)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated metric groups: vloss, class, cond, res")
    p.add_argument("--featnet", default="auto", help="feature network of FD-emoji / class accuracy: auto (cached, "
                   "trained once on the training split if missing), a .safetensors file, or none")
    p.add_argument("--res-px", default="", help="comma-separated image sizes of the resolution study (e.g. 24,40,48 "
                   "for a model trained at 32x32); empty: none")
    p.add_argument("--res-n-per-class", type=int, default=4, help="samples per class at each size of --res-px")
    p.add_argument("--grids", default=None, help="folder for sample grid PNGs (training size and every --res-px size)")
    p.add_argument("--fid-inception", default=None, help="Inception weights file (torch-fidelity's "
                   "pt_inception-2015-12-05-6726825d.pth): adds the standard FID; needs pip install torch-fidelity")
    p.add_argument("--num-threads", type=int, default=None, help="CPU threads (default: torch's; 1 is fastest on a busy machine)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_flush_denormal(True)
    # numbers that make no sense are refused up front; a given 0 never means "the default"
    for name in ("max_images", "n_per_class", "n_cond", "steps", "batch_size", "num_threads", "res_n_per_class"):
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {v}", file=sys.stderr)
            return 2
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        print(f"error: --cfg (guidance scale) must be a finite number >= 0, got {args.cfg}", file=sys.stderr)
        return 2
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    try:
        t_grid = [float(v) for v in args.t_grid.split(",")]
        if not all(0.0 <= t < 1.0 for t in t_grid):
            raise ValueError
    except ValueError:
        print(f"error: --t-grid wants comma-separated values in [0, 1), got {args.t_grid!r}", file=sys.stderr)
        return 2
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        res_px = [int(v) for v in args.res_px.split(",") if v.strip()]
    except ValueError:
        print(f"error: --res-px wants comma-separated image sizes, got {args.res_px!r}", file=sys.stderr)
        return 2
    if any(px < 1 for px in res_px):
        print(f"error: --res-px wants positive image sizes, got {args.res_px!r}", file=sys.stderr)
        return 2
    if res_px and "res" in metrics and args.featnet == "none":
        print("error: --res-px: the resolution study needs the feature network (--featnet auto or a file), "
              "not --featnet none", file=sys.stderr)
        return 2
    if not metrics or any(m not in METRICS for m in metrics):
        print(f"error: --metrics wants a comma-separated subset of {','.join(METRICS)}, got {args.metrics!r}", file=sys.stderr)
        return 2
    if args.fid_inception is not None and not Path(args.fid_inception).is_file():
        print(f"error: --fid-inception: no Inception weights file at {args.fid_inception}", file=sys.stderr)
        return 2
    try:
        device = str(_device(args.device))
        ckpt = resolve_checkpoint(args.ckpt)  # verified once; a run folder falls back past damaged ones
        p = ckpt.parent  # .../checkpoints/step_N
        run = p.parent.parent if p.parent.name == "checkpoints" else p
        out_dir = Path(args.out).parent if args.out else run / "eval"
        check_writable_dir(out_dir, "the folder of --out")  # before the evaluation, so no work is lost
        res = evaluate(ckpt, data=args.data, data_root=args.data_root, split=args.split, ema=args.ema, t_grid=t_grid,
                       max_images=args.max_images, n_per_class=args.n_per_class, n_cond=args.n_cond, steps=args.steps,
                       sampler=args.sampler, cfg_scale=args.cfg, batch_size=args.batch_size, seed=args.seed, device=device,
                       metrics=metrics, featnet=args.featnet, res_px=res_px, res_n_per_class=args.res_n_per_class,
                       grids=args.grids, fid_inception=args.fid_inception)
        out = Path(args.out) if args.out else out_dir / f"step_{res['step']:08d}.json"
        atomic_write_text(out, json.dumps(res, indent=2))
    except (CheckpointError, DataError, ConfigError, SampleError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
