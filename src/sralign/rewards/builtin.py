"""Built-in metrics that need no downloads (registered by name in ``registry``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import crop_border, mean_gradient, rgb_to_y, sobel_magnitude


def gauss1d(dtype, device) -> Tensor:
    """The 11-tap Gaussian (σ = 1.5, sums to 1) of SSIM's window. [11]"""
    ax = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(ax**2) / (2 * 1.5**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _gauss11(dtype, device) -> Tensor:
    g = gauss1d(torch.float64, "cpu")
    return (g[:, None] * g[None, :]).to(dtype=dtype, device=device)[None, None]


def ssim_maps(x: Tensor, y: Tensor, blur, clamp_var: bool = False) -> tuple[Tensor, Tensor]:
    """SSIM's luminance and contrast-structure maps of x, y [B,1,H,W] in [0,1] (K1 = 0.01,
    K2 = 0.03, data range 1), local moments taken with ``blur`` (the window); ``clamp_var``
    clamps the variances at 0 (torchmetrics' convention). SSIM's map is their product."""
    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    if clamp_var:
        sxx, syy = sxx.clamp_min(0), syy.clamp_min(0)
    sxy = blur(x * y) - mx * my
    return (2 * mx * my + c1) / (mx * mx + my * my + c1), (2 * sxy + c2) / (sxx + syy + c2)


def ssim_y(sr: Tensor, hr: Tensor, border: int = 0) -> Tensor:
    """SSIM on the Y channel (Wang et al.; 11×11 Gaussian σ=1.5, K1=0.01, K2=0.03, data range 1,
    mean over the valid region) — skimage's ``structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=1)`` convention. [B]"""
    x = crop_border(rgb_to_y(sr.double()), border)
    y = crop_border(rgb_to_y(hr.double()), border)
    w = _gauss11(x.dtype, x.device)
    lum, cs = ssim_maps(x, y, lambda t: F.conv2d(t, w))
    return (lum * cs).flatten(1).mean(1).to(sr.dtype)


def local_gradient_fidelity(sr: Tensor, hr: Tensor, patch: int = 8, floor: float = 2.0 / 255) -> Tensor:
    """−mean over ``patch``×``patch`` patches of |log((G(sr) + c) / (G(hr) + c))|, with G the
    patch's mean Sobel magnitude of Y (Y in [16/255, 235/255]) and c = ``floor`` (≈ the gradient
    of 8-bit quantisation noise, so flat patches compare noise levels, not round-off). 0 when
    every patch of SR is as sharp as the HR's; grain in a flat patch costs as much as blur in a
    textured one, where ``gradient_fidelity`` (one ratio per image) lets one pay for the other.
    Higher is better. [B]"""
    g_sr = F.avg_pool2d(sobel_magnitude(rgb_to_y(sr.double())), patch, ceil_mode=True)
    g_hr = F.avg_pool2d(sobel_magnitude(rgb_to_y(hr.double())), patch, ceil_mode=True)
    return -(torch.log(g_sr + floor) - torch.log(g_hr + floor)).abs().flatten(1).mean(1).to(sr.dtype)


def sharpness(sr: Tensor) -> Tensor:
    """Mean Sobel gradient magnitude of Y (×10): a texture / detail measure. Higher = more
    detail; it also rises with noise, so use it beside a fidelity metric."""
    return 10 * mean_gradient(sr)


def gradient_fidelity(sr: Tensor, hr: Tensor) -> Tensor:
    """−|log(G(sr)/G(hr))| with G the mean gradient magnitude: 0 when SR is exactly as sharp
    as HR, negative when over-smoothed or over-sharpened. Higher is better."""
    return -(torch.log(mean_gradient(sr) + 1e-6) - torch.log(mean_gradient(hr) + 1e-6)).abs()
