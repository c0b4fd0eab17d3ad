"""A small feature network for emoji (or any labelled image set), trained once on the training
split and cached, so that sample quality can be measured without downloading Inception.

A 6-convolution CNN (GroupNorm, SiLU, three 2x poolings) ending in a ``feat_dim``-wide global
average pool; two linear heads read that vector: the category (the data's class label) and the
vendor (emoji "domain"). Its pooled features define **FD-emoji** (:mod:`jitrope.eval.metrics`), its
category head the class accuracy of class-conditional samples.

    net = load_or_train_featnet(cfg.data)          # trains (minutes on one CPU core) or loads from the cache
    f = net.features(images)                        # float [-1, 1] images of any size -> [N, feat_dim]
    cat_logits, vendor_logits = net(images)

The cache file is ``<data cache>/featnet/featnet-<hash>.safetensors`` where the hash covers the
data that defines the images (name, size, vendors, held-out split) and every training
hyper-parameter of :class:`FeatNetConfig`; it also stores the training split's feature mean and
covariance (the FD-emoji reference) and the held-out accuracies. Written atomically (temporary
file, then rename), so concurrent evaluations never read half a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..data import ImageSet, build_dataset, data_root, resize_images, to_float
from .metrics import gaussian_stats

__all__ = ["FeatNetConfig", "FeatNet", "train_featnet", "load_or_train_featnet", "featnet_path"]

# Bump when the architecture or the training procedure changes: old cache files are then ignored.
FEATNET_VERSION = 1


@dataclass(frozen=True)  # a shared default argument: nothing may change it
class FeatNetConfig:
    widths: Tuple[int, ...] = (16, 32, 64)
    feat_dim: int = 64
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    vendor_weight: float = 0.5  # loss weight of the vendor head
    seed: int = 0


class FeatNet(nn.Module):
    """CNN with category and vendor heads; inputs float [-1, 1] ``[N, 3, H, W]``, resized to ``img_size``."""

    def __init__(self, img_size: int, num_classes: int, num_domains: int, cfg: FeatNetConfig = FeatNetConfig()):
        super().__init__()
        self.img_size, self.cfg = img_size, cfg
        layers, c_in = [], 3
        for c in cfg.widths:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
                nn.Conv2d(c, c, 3, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
                nn.AvgPool2d(2),
            ]
            c_in = c
        layers += [nn.Conv2d(c_in, cfg.feat_dim, 1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.cat_head = nn.Linear(cfg.feat_dim, num_classes)
        self.vendor_head = nn.Linear(cfg.feat_dim, num_domains)

    def features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(x.shape)}")
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = resize_images(x.float(), self.img_size)  # other sampling resolutions: judged at the net's size
        return self.body(x.float()).mean((2, 3))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.cat_head(f), self.vendor_head(f)

    @torch.no_grad()
    def embed(self, x: Tensor, batch_size: int = 256) -> Tuple[Tensor, Tensor]:
        """Features and category predictions of a float [-1, 1] (or uint8) batch, in chunks, eval mode."""
        self.eval()
        dev = next(self.parameters()).device
        feats, preds = [], []
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size]
            xb = to_float(xb) if xb.dtype == torch.uint8 else xb
            f = self.features(xb.to(dev))
            feats.append(f.double().cpu())
            preds.append(self.cat_head(f).argmax(1).cpu())
        d = self.cfg.feat_dim
        return (
            torch.cat(feats) if feats else torch.zeros(0, d, dtype=torch.float64),
            torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
        )


def _config_hash(data_cfg, cfg: FeatNetConfig) -> str:
    key = {
        "version": FEATNET_VERSION,
        "featnet": dataclasses.asdict(cfg),
        "data": {
            k: getattr(data_cfg, k) for k in ("name", "img_size", "vendors", "holdout", "skin_tones", "num_images")
        },
    }
    if data_cfg.name == "folder":
        key["data"]["root"] = str(Path(data_cfg.root).resolve())
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:16]


def featnet_path(data_cfg, cfg: FeatNetConfig = FeatNetConfig()) -> Path:
    """Where the feature network of ``data_cfg`` is cached."""
    root = data_root(data_cfg.root if data_cfg.name == "emoji" else None)
    return root / "featnet" / f"featnet-{_config_hash(data_cfg, cfg)}.safetensors"


def _shift(x: Tensor, g: torch.Generator, max_shift: int) -> Tensor:
    """Random translation by up to ``max_shift`` pixels, padding with white (the emoji background)."""
    n, _, h, w = x.shape
    p = F.pad(x, (max_shift,) * 4, value=1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=g).tolist()
    return p[:, :, dy : dy + h, dx : dx + w]


def train_featnet(
    train: ImageSet,
    val: Optional[ImageSet],
    cfg: FeatNetConfig = FeatNetConfig(),
    *,
    device="cpu",
    log: Callable[[str], None] = print,
) -> Tuple[FeatNet, Dict]:
    """Train on ``train`` (random shifts and flips), report accuracy on ``val``; returns (net, info)."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    n_dom = max(1, len(train.domain_names))
    net = FeatNet(train.img_size, train.num_classes, n_dom, cfg).to(device)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    t0 = time.perf_counter()
    net.train()
    for ep in range(cfg.epochs):
        perm = torch.randperm(len(train), generator=g)
        tot = 0.0
        for k in range(steps_per_epoch):
            idx = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            x = to_float(train.images[idx])
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x = _shift(x, g, max(1, train.img_size // 16)).to(device)
            cat, ven = net(x)
            loss = F.cross_entropy(cat, train.labels[idx].to(device))
            loss = loss + cfg.vendor_weight * F.cross_entropy(ven, train.domains[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
        log(f"featnet epoch {ep + 1}/{cfg.epochs}: loss {tot / steps_per_epoch:.3f} ({time.perf_counter() - t0:.0f} s)")
    net.eval()
    info: Dict = {"train_seconds": round(time.perf_counter() - t0, 1), "n_train": len(train)}
    feats, pred = net.embed(train.images)
    info["train_cat_acc"] = float((pred == train.labels).float().mean())
    mu, sigma = gaussian_stats(feats)
    if val is not None and len(val) > 0:
        vf, vp = net.embed(val.images)
        info["val_cat_acc"] = float((vp == val.labels).float().mean())
        with torch.no_grad():
            vv = torch.cat(
                [net(to_float(val.images[s : s + 256]).to(device))[1].argmax(1).cpu() for s in range(0, len(val), 256)]
            )
        info["val_vendor_acc"] = float((vv == val.domains).float().mean())
        info["n_val"] = len(val)
    info["chance_cat_acc"] = float(torch.bincount(train.labels).max() / len(train))
    log("featnet: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    return net, {"info": info, "train_mu": mu, "train_sigma": sigma}


def _save(path: Path, net: FeatNet, extra: Dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors["train_mu"], tensors["train_sigma"] = extra["train_mu"], extra["train_sigma"]
    meta = {
        "info": json.dumps(extra["info"]),
        "img_size": str(net.img_size),
        "num_classes": str(net.cat_head.out_features),
        "num_domains": str(net.vendor_head.out_features),
        "featnet": json.dumps(dataclasses.asdict(net.cfg)),
        "version": str(FEATNET_VERSION),
    }
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load(path: Path, device) -> Tuple[FeatNet, Dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cfg = FeatNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta["featnet"]).items()})
    net = FeatNet(int(meta["img_size"]), int(meta["num_classes"]), int(meta["num_domains"]), cfg)
    t = load_file(str(path))
    net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")})
    net.to(device).eval()
    return net, {
        "info": json.loads(meta["info"]),
        "train_mu": t["train_mu"],
        "train_sigma": t["train_sigma"],
        "path": str(path),
    }


def load_or_train_featnet(
    data_cfg, cfg: FeatNetConfig = FeatNetConfig(), *, device="cpu", path=None, log: Callable[[str], None] = print
) -> Tuple[FeatNet, Dict]:
    """The feature network of ``data_cfg``'s images: from ``path`` or the cache, else trained on
    the training split (held-out accuracy measured) and cached. Returns ``(net, extra)``; extra has
    ``info`` (accuracies), ``train_mu`` / ``train_sigma`` (FD reference) and ``path``."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--featnet: no feature network file at {p}")
        return _load(p, device)
    p = featnet_path(data_cfg, cfg)
    if p.is_file():
        return _load(p, device)
    log(f"training the feature network for FD-emoji (once; cached as {p})")
    train = build_dataset(data_cfg, "train", log=log)
    try:
        val = build_dataset(data_cfg, "val", log=log)
    except Exception:  # noqa: BLE001 - a data set without a held-out split still gets a feature net
        val = None
    net, extra = train_featnet(train, val, cfg, device=device, log=log)
    _save(p, net, extra)
    extra["path"] = str(p)
    return net, extra
