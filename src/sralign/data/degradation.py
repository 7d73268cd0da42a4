"""Degradations that turn HR patches into LR inputs.

``simple_degradation`` (Gaussian blur + bicubic downscale + Gaussian noise + JPEG-free) is what
the shipped tiny checkpoint was trained on; the Real-ESRGAN second-order pipeline is planned
(issue 4) and will sit beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SimpleDegradationConfig:
    blur_sigma: tuple[float, float] = (0.2, 1.2)  # Gaussian blur σ (HR pixels), uniform
    noise_sigma: tuple[float, float] = (0.0, 5.0)  # Gaussian noise σ on the 0–255 scale, uniform
    kernel_size: int = 9


def gaussian_kernels(sigmas: Tensor, size: int) -> Tensor:
    """Isotropic Gaussian kernels [B,size,size] (sum 1) for σ [B]."""
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(ax[None, :] ** 2) / (2 * sigmas[:, None] ** 2))
    k = g[:, :, None] * g[:, None, :]
    return k / k.sum(dim=(1, 2), keepdim=True)


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Per-sample blur of x [B,C,H,W] by kernels [B,k,k] (reflect padding), one grouped conv."""
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    xp = F.pad(x, (k // 2,) * 4, mode="reflect").reshape(1, b * c, h + k - 1, w + k - 1)
    weight = kernels[:, None].repeat_interleave(c, dim=0)
    return F.conv2d(xp, weight.to(x), groups=b * c).reshape(b, c, h, w)


def simple_degradation(
    hr: Tensor, scale: int, generator: torch.Generator, config: SimpleDegradationConfig | None = None
) -> Tensor:
    """Blur, bicubic-downscale by ``scale`` and add noise: hr [B,3,H,W] in [0,1] -> [B,3,H/s,W/s]."""
    cfg = config or SimpleDegradationConfig()
    b, _, h, w = hr.shape
    if h % scale or w % scale:
        raise ValueError(f"HR size {w}x{h} is not divisible by scale {scale}")
    lo, hi = cfg.blur_sigma
    sig = lo + (hi - lo) * torch.rand(b, generator=generator)
    x = blur(hr, gaussian_kernels(sig, cfg.kernel_size))
    x = F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", align_corners=False, antialias=True)
    lo, hi = cfg.noise_sigma
    ns = (lo + (hi - lo) * torch.rand(b, generator=generator)) / 255.0
    x = x + ns[:, None, None, None] * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)
