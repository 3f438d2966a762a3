"""Image similarity: PSNR and SSIM (Wang et al. 2004) in torch, for images in [0, 1].

Both take (C, H, W) or (B, C, H, W) tensors on any device and compute in float64, so that the figures do not
depend on the dtype the images were made in. SSIM follows the paper's reference setting, which is also
scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False): an 11x11
Gaussian window (sigma 1.5), C1 = (0.01 L)^2, C2 = (0.03 L)^2, averaged over the positions where the whole
window fits inside the image, then over channels (and images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11 taps: scikit-image's truncate=3.5 at sigma 1.5 gives int(3.5 * 1.5 + 0.5) = 5


BAND = 256  # rows per slice: float64 copies of a whole 4096x4096 image and its SSIM maps would take ~6 GB


def _check(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Both as (B, C, H, W), in their own dtype, after checking that they match."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (B, C, H, W) images, got shape {tuple(a.shape)}")
    return (a[None], b[None]) if a.ndim == 3 else (a, b)


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels; inf for identical images."""
    a, b = _check(a, b)
    h = a.shape[2]
    total = sum(
        torch.sum((a[:, :, r : r + BAND].double() - b[:, :, r : r + BAND].double()) ** 2).item()
        for r in range(0, h, BAND)
    )
    mse = total / a.numel()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian(device: torch.device) -> Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _ssim_map(a: Tensor, b: Tensor, g: Tensor, c1: float, c2: float) -> Tensor:
    """SSIM at every position where the window fits, for float64 (N, C, H, W) inputs."""
    n, c, h, w = a.shape
    size = g.numel()
    # The five local statistics of every channel in one separable depthwise "valid" filtering: no padding,
    # so the output is exactly the positions scikit-image keeps after cropping its reflect-padded borders.
    stack = torch.cat([a, b, a * a, b * b, a * b], dim=1).reshape(n * 5 * c, 1, h, w)
    stack = F.conv2d(stack, g.view(1, 1, 1, size))
    stack = F.conv2d(stack, g.view(1, 1, size, 1)).reshape(n, 5, c, h - size + 1, w - size + 1)
    mu_a, mu_b, aa, bb, ab = stack.unbind(1)
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b  # population (biased) moments
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> float:
    """Mean structural similarity with an 11x11 Gaussian window (sigma 1.5); both sides at least 11 pixels."""
    a, b = _check(a, b)
    h, w = a.shape[2:]
    size = 2 * SSIM_RADIUS + 1
    if h < size or w < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {w}x{h}")
    g = _gaussian(a.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out_h = h - size + 1
    total = 0.0
    # Bands of output rows, each read with its 2 * radius rows of context: memory stays bounded by the band.
    for r in range(0, out_h, BAND):
        rows = slice(r, min(r + BAND, out_h) + size - 1)
        total += _ssim_map(a[:, :, rows].double(), b[:, :, rows].double(), g, c1, c2).sum().item()
    return total / (a.shape[0] * a.shape[1] * out_h * (w - size + 1))
