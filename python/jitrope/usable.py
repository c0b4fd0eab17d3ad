"""Whether a set of weights can be used: a fixed small probe batch through it gives a finite loss.

Finite weights are not enough: a run that diverged can hold weights of about 1e30, every one of
them finite, whose every sample is nan. :func:`probe_loss` runs the v-loss of one fixed batch
(images, noise and times drawn from a fixed seed; a class, and the null class; a condition image
where the model takes one) through the model, or through other parameters of it (an EMA) without
copying the model. The trainer probes the raw weights and the sampled EMA before it writes a
checkpoint (:func:`unusable_state`), so that a checkpoint that cannot be used never replaces or
prunes one that can; ``jitrope-convert`` probes what it writes, and sample and evaluate what they
load (:func:`jitrope.checkpoint.model_from_weights`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor
from torch.func import functional_call

from .diffusion import Diffusion

__all__ = ["probe_batch", "probe_loss", "unusable_state"]

PROBE_SEED = 20240917
PROBE_IMAGES = 4


def probe_batch(cfg, n: int = PROBE_IMAGES) -> Dict[str, Optional[Tensor]]:
    """The fixed probe batch of a model of ``cfg`` (a JiTConfig) at its own size, on the CPU:
    ``x`` (images in [-1, 1]), ``y`` (classes, the last one the null class), ``t`` (spread over
    (0, 1)), ``noise``, and ``cond`` / ``cond_drop`` (None without a condition image)."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.rand(n, cfg.in_channels, cfg.img_size, cfg.img_size, generator=g) * 2 - 1
    y = torch.arange(n) % max(cfg.num_classes, 1)
    y[-1] = cfg.num_classes  # the null class: the unconditional branch of guidance
    batch: Dict[str, Optional[Tensor]] = {
        "x": x,
        "y": y,
        "t": torch.linspace(0.1, 0.9, n),
        "noise": torch.randn(x.shape, generator=g),
        "cond": None,
        "cond_drop": None,
    }
    if cfg.cond_img_size is not None:
        c = cfg.cond_img_size
        batch["cond"] = torch.rand(n, cfg.cond_in_channels, c, c, generator=g) * 2 - 1
        batch["cond_drop"] = torch.arange(n) % 2 == 1
    return batch


@torch.no_grad()
def probe_loss(model, diffusion: Diffusion, params: Optional[Mapping[str, Tensor]] = None) -> float:
    """The v-loss of the probe batch (:func:`probe_batch`) through ``model`` in eval mode (no
    dropout, no draw from torch's global generator), with ``params`` (e.g. an EMA's parameters)
    in place of its own where given; bf16 autocast on CUDA, as sampling has it."""
    device = next(model.parameters()).device
    b = {k: (v.to(device) if v is not None else None) for k, v in probe_batch(model.cfg).items()}
    net = model if params is None else (lambda *a, **kw: functional_call(model, dict(params), a, kw))
    was_training = model.training
    model.eval()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = diffusion.loss(net, b["x"], b["y"], b["cond"], b["cond_drop"], t=b["t"], noise=b["noise"])
    finally:
        model.train(was_training)
    return float(loss)


def unusable_state(
    model, ema_params: Optional[Mapping[str, Tensor]], sampled: str, diffusion: Diffusion, train_loss: float
) -> List[str]:
    """What makes the training state of a step unusable, one phrase each (empty: usable): the
    training loss since the last log line, and the probe loss of the raw weights and of the EMA that
    sampling uses (``sampled``: ``sample.ema``, an EMA index or "none"; ``ema_params``: its
    parameters by name, None when it is "none")."""
    bad = [] if math.isfinite(train_loss) else [f"the training loss is {train_loss}"]
    probed = {"the model weights": probe_loss(model, diffusion)}
    if ema_params is not None:
        probed[f"EMA {sampled} (the one sampled)"] = probe_loss(model, diffusion, ema_params)
    failed = {name: loss for name, loss in probed.items() if not math.isfinite(loss)}
    if failed:
        names = list(failed)
        who = names[0] if len(names) == 1 else " and ".join(names)
        bad.append(
            f"{who} give{'s' if len(names) == 1 else ''} a loss of "
            f"{' and '.join(dict.fromkeys(map(str, failed.values())))} on the probe batch"
        )
    return bad
