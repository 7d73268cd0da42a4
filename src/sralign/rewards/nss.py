"""Natural-scene-statistics features (MSCN + asymmetric generalised Gaussian fits), batched in torch.

Shared by BRISQUE and the NIQE-style metric. Follows the formulation of Mittal et al. (BRISQUE,
2012) as implemented by the ``brisque`` package: 7×7 Gaussian window (σ = 7/6, zero padding),
C = 1/255, MSCN + four pair products, AGGD moment-matching fit.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from scipy import special
from torch import Tensor


def rgb_to_gray(x: Tensor) -> Tensor:
    """skimage's rgb2gray weights: [B,3,H,W] -> [B,1,H,W]."""
    w = torch.tensor([0.2125, 0.7154, 0.0721], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _window(dtype, device, size: int = 7, sigma: float = 7 / 6) -> Tensor:
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    k = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return (k / k.sum()).to(dtype=dtype, device=device)[None, None]


def mscn(gray: Tensor, c: float = 1 / 255) -> Tensor:
    """Mean-subtracted contrast-normalised coefficients of [B,1,H,W]."""
    k = _window(gray.dtype, gray.device)
    mu = F.conv2d(gray, k, padding=3)
    var = F.conv2d(gray * gray, k, padding=3)
    sd = torch.sqrt((mu * mu - var).abs())
    return (gray - mu) / (sd + c)


def pair_products(m: Tensor) -> list[Tensor]:
    """MSCN and its horizontal, vertical, main- and secondary-diagonal neighbour products."""
    return [
        m,
        m[..., :, :-1] * m[..., :, 1:],
        m[..., :-1, :] * m[..., 1:, :],
        m[..., :-1, :-1] * m[..., 1:, 1:],
        m[..., 1:, :-1] * m[..., :-1, 1:],
    ]


@lru_cache(maxsize=4)
def _phi_table(dtype_name: str) -> tuple[Tensor, Tensor]:
    alphas = torch.arange(0.2, 10.0, 0.0005, dtype=torch.float64)
    a = alphas.numpy()
    phi = special.gamma(2 / a) ** 2 / (special.gamma(1 / a) * special.gamma(3 / a))
    return alphas.to(getattr(torch, dtype_name)), torch.from_numpy(phi).to(getattr(torch, dtype_name))


def aggd_fit(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit an AGGD to each row of x [B,N]: returns (alpha, mean, sigma_l², sigma_r²), each [B]."""
    x = x.double()
    neg, pos = x < 0, x >= 0
    left = (x * x * neg).sum(1) / neg.sum(1).clamp_min(1)
    right = (x * x * pos).sum(1) / pos.sum(1).clamp_min(1)
    gamma = torch.sqrt(left) / torch.sqrt(right).clamp_min(1e-12)
    r_hat = x.abs().mean(1) ** 2 / (x * x).mean(1).clamp_min(1e-12)
    big_r = r_hat * (gamma**3 + 1) * (gamma + 1) / (gamma**2 + 1) ** 2
    alphas, phi = _phi_table("float64")
    idx = torch.searchsorted(phi, big_r.clamp(float(phi[0]), float(phi[-1]))).clamp(1, len(phi) - 1)
    p0, p1 = phi[idx - 1], phi[idx]
    a0, a1 = alphas[idx - 1], alphas[idx]
    alpha = a0 + (a1 - a0) * (big_r - p0) / (p1 - p0).clamp_min(1e-15)
    lg = torch.lgamma
    const = torch.exp(0.5 * (lg(1 / alpha) - lg(3 / alpha)))
    mean = (torch.sqrt(right) - torch.sqrt(left)) * const * torch.exp(lg(2 / alpha) - lg(1 / alpha))
    return alpha, mean, left, right


def nss_features(gray: Tensor) -> Tensor:
    """18 features per image of [B,1,H,W] in [0,1]: (α, σ²) of MSCN, (α, mean, σl², σr²) of
    each of the four pair products."""
    feats = []
    for i, coeff in enumerate(pair_products(mscn(gray.double()))):
        a, m, l, r = aggd_fit(coeff.flatten(1))
        feats.extend([a, (l + r) / 2] if i == 0 else [a, m, l, r])
    return torch.stack(feats, dim=1)


def half_scale(gray: Tensor) -> Tensor:
    """Bicubic ×½ (OpenCV-style INTER_CUBIC, no antialiasing)."""
    h, w = gray.shape[-2:]
    return F.interpolate(gray, size=(max(1, round(h / 2)), max(1, round(w / 2))), mode="bicubic", align_corners=False)


def two_scale_features(gray: Tensor) -> Tensor:
    """36 features: ``nss_features`` at full and half scale. [B,36] float64."""
    return torch.cat([nss_features(gray), nss_features(half_scale(gray))], dim=1)
