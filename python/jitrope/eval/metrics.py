"""Sample-quality metrics that need no download: Fréchet distance of feature sets, PSNR, SSIM;
and, as an option, the standard FID when the user supplies the Inception weights file.

    mu, sigma = gaussian_stats(features)               # float64
    frechet_distance(mu1, sigma1, mu2, sigma2)         # ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)
    psnr(x, y), ssim(x, y)                             # per image, images in [-1, 1]
    inception_fid(real, fake, weights="pt_inception-2015-12-05.pth")   # needs torch-fidelity

The Fréchet distance in the features of :mod:`jitrope.eval.featnet` is what this project reports as
**FD-emoji**: the same formula as FID, in another network's features, so its values are not
comparable with published FIDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_stats", "frechet_distance", "fd_from_features", "psnr", "ssim", "inception_fid"]


def gaussian_stats(features: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``features`` ``[N, D]`` (N >= 2), in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {tuple(features.shape)}")
    f = features.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.t() @ d / (f.shape[0] - 1)


def _sqrt_psd(a: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((a + a.t()) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.t()


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``Tr((S1 S2)^1/2)`` is taken as ``Tr((S1^1/2 S2 S1^1/2)^1/2)``, a symmetric PSD matrix, so the
    result is real and >= 0 without the complex ``sqrtm`` of FID code (float64 throughout).
    """
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)} (want [D], [D, D] twice)"
        )
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((m + m.t()) / 2).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt
    return max(float(fd), 0.0)


def fd_from_features(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets ``[N, D]``, ``[M, D]``."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"x and y must be image batches [N, C, H, W] of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB of ``x`` against ``y`` ([N, C, H, W]; data_range 2 for [-1, 1] images).
    Identical images give +inf."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gauss_window(size: int, sigma: float) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0, *, win_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian window 11 / 1.5, K1 0.01, K2 0.03, valid
    positions only, averaged over channels) of ``x`` against ``y`` ([N, C, H, W]). Images smaller
    than the window use the largest odd window that fits."""
    _check_pair(x, y)
    win = min(win_size, x.shape[-1], x.shape[-2])
    win -= 1 - win % 2
    g = _gauss_window(win, sigma)
    c = x.shape[1]
    k2 = (g[:, None] * g[None, :]).expand(c, 1, win, win).contiguous()
    xd, yd = x.double(), y.double()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, k2, groups=c)

    mx, my = blur(xd), blur(yd)
    sxx = blur(xd * xd) - mx * mx
    syy = blur(yd * yd) - my * my
    sxy = blur(xd * yd) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.flatten(1).mean(1)


def inception_fid(real: Tensor, fake: Tensor, weights) -> float:
    """Standard FID (Inception-v3 pool features, torch-fidelity's port of the TF graph) between two
    float [-1, 1] image batches, with the weights loaded from the user's file ``weights``
    (``pt_inception-2015-12-05-6726825d.pth``); nothing is downloaded. Needs ``pip install torch-fidelity``.
    Only meaningful with thousands of images per set."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--fid-inception: no Inception weights file at {path}")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError(
            f"--fid-inception needs torch-fidelity (pip install torch-fidelity); it is optional and not installed: {e}"
        ) from e
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    net.eval()

    @torch.no_grad()
    def feats(x: Tensor) -> Tensor:
        u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return torch.cat([net(u8[s : s + 64])[0] for s in range(0, u8.shape[0], 64)])

    return fd_from_features(feats(real), feats(fake))
