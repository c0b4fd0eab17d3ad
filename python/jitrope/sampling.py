"""Sampling a model: many images in batches, or images of different sizes in one packed batch.

:func:`generate` draws the noise of every image from one generator, so the samples do not depend
on the batch size; :func:`generate_sizes` samples images of several sizes and aspect ratios with
one packed forward per network evaluation. Both integrate with :meth:`jitrope.diffusion.Diffusion.sample`
(bf16 autocast on CUDA) and return float images in [-1, 1] on the CPU; samples that come out nan or
inf raise :class:`NonFiniteSamples` instead.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .diffusion import Diffusion
from .packing import pack_images, unpack_images

__all__ = ["generate", "generate_sizes", "NonFiniteSamples"]


class NonFiniteSamples(RuntimeError):
    """Samples came out nan or inf: the weights do not give usable images (a run that diverged).
    Raised instead of returning them, so that no nan ever becomes a black image."""


def _check_finite(images: Sequence[Tensor], first: int, total: int) -> None:
    bad = [first + i for i, x in enumerate(images) if not bool(torch.isfinite(x).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteSamples(
            f"sampling gave nan or inf values (image {bad[0]}{more} of {total}): these weights do not give usable "
            "images (did the run diverge?); no image was written"
        )


@torch.no_grad()
def generate(
    model,
    diffusion: Diffusion,
    labels: Tensor,
    cond: Optional[Tensor] = None,
    *,
    img_size=None,
    steps: int = 50,
    sampler: str = "heun",
    cfg: float = 1.0,
    cfg_interval: Sequence[float] = (0.1, 1.0),
    seed: int = 0,
    batch_size: int = 64,
    device="cpu",
    progress: Optional[Callable[[int], None]] = None,
) -> Tensor:
    """Samples (float in [-1, 1], on the CPU) for ``labels`` ([N] long) and optional ``cond`` ([N, 3, h, w]).

    ``img_size``: the model's (None), another square size, or ``(H, W)``.

    The noise of all N images comes from one generator seeded with ``seed``, so the result does not
    depend on ``batch_size``. ``progress(k)`` gets the number of sampler steps done in each batch.
    """
    n = labels.shape[0]
    size = img_size or model.cfg.img_size
    h, w = (size, size) if isinstance(size, int) else size
    noise = torch.randn(n, model.cfg.in_channels, h, w, generator=torch.Generator().manual_seed(seed))
    out = []
    autocast = torch.device(device).type == "cuda"
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        c = cond[sl].to(device) if cond is not None else None
        last = [0]

        def step_cb(k, last=last):
            if progress is not None:
                progress(k - last[0])
            last[0] = k

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            z = diffusion.sample(
                model,
                labels[sl].to(device),
                c,
                noise=noise[sl].to(device),
                steps=steps,
                sampler=sampler,
                cfg=cfg,
                cfg_interval=cfg_interval,
                null_class=model.null_class,
                progress=step_cb,
            )
        out.append(z.float().cpu())
        _check_finite(out[-1], s, n)  # at once: a nan batch makes the rest not worth sampling
    return torch.cat(out) if out else noise


@torch.no_grad()
def generate_sizes(
    model,
    diffusion: Diffusion,
    labels: Tensor,
    sizes: Sequence[Tuple[int, int]],
    *,
    steps: int = 50,
    sampler: str = "heun",
    cfg: float = 1.0,
    cfg_interval: Sequence[float] = (0.1, 1.0),
    seed: int = 0,
    device="cpu",
    progress: Optional[Callable[[int], None]] = None,
) -> List[Tensor]:
    """One sample per ``(labels[s], sizes[s])`` (images of different sizes and aspect ratios), all in one
    packed batch: one forward per network evaluation (:meth:`Diffusion.sample` with ``layout=``). A
    model with a condition image gets the null condition. Returns float ``[C, h, w]`` images on the CPU.

    The noise of image s is drawn after that of images 0..s-1 from one generator seeded with ``seed``."""
    if len(sizes) != labels.shape[0]:
        raise ValueError(f"generate_sizes: {labels.shape[0]} labels for {len(sizes)} sizes")
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(model.cfg.in_channels, h, w, generator=g) for h, w in sizes]
    layout = model.packed_layout(list(sizes), device=device)
    p = model.cfg.patch_size
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
        z = diffusion.sample(
            model.forward_tokens,
            labels.to(device),
            None,
            noise=pack_images(noise, p).to(device),
            steps=steps,
            sampler=sampler,
            cfg=cfg,
            cfg_interval=cfg_interval,
            null_class=model.null_class,
            progress=progress,
            layout=layout,
        )
    images = unpack_images(z.float().cpu(), layout, p)
    _check_finite(images, 0, len(images))
    return images
