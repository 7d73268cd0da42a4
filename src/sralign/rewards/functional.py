"""Tensor functions behind the built-in metrics (pure; batched over [B,3,H,W] in [0,1])."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rgb_to_y(x: Tensor) -> Tensor:
    """ITU-R BT.601 luma as in MATLAB's rgb2ycbcr (and pyiqa/basicsr ``test_y_channel``):
    [B,3,H,W] in [0,1] -> [B,1,H,W] in [16/255, 235/255]."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) / 255.0 + 16.0 / 255.0


def crop_border(x: Tensor, border: int) -> Tensor:
    return x[..., border:-border, border:-border] if border > 0 else x


def _psnr(sr: Tensor, hr: Tensor, border: int, eps: float, to_y: bool) -> Tensor:
    """PSNR (dB, data range 1) over Y (``to_y``) or all channels, computed in float64. [B]"""
    if sr.shape != hr.shape:
        raise ValueError(f"sr {tuple(sr.shape)} and hr {tuple(hr.shape)} differ in shape")
    a, b = sr.double(), hr.double()
    if to_y:
        a, b = rgb_to_y(a), rgb_to_y(b)
    mse = ((crop_border(a, border) - crop_border(b, border)) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / (mse + eps))).to(sr.dtype)


def psnr_y(sr: Tensor, hr: Tensor, border: int = 0, eps: float = 1e-10) -> Tensor:
    """PSNR (dB) on the Y channel, data range 1. [B]"""
    return _psnr(sr, hr, border, eps, to_y=True)


def psnr_rgb(sr: Tensor, hr: Tensor, border: int = 0, eps: float = 1e-10) -> Tensor:
    """PSNR (dB) over the three RGB channels, data range 1. [B] (Y-channel metrics do not see a
    shift of the colour balance that keeps luma; this one does.)"""
    return _psnr(sr, hr, border, eps, to_y=False)


def sobel_magnitude(gray: Tensor) -> Tensor:
    """Sobel gradient magnitude of [B,1,H,W] (replicate padding)."""
    kx = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=gray.dtype, device=gray.device)
    k = torch.stack([kx, kx.t()])[:, None]
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k)
    return torch.sqrt((g**2).sum(1, keepdim=True) + 1e-12)


def mean_gradient(x: Tensor) -> Tensor:
    """Mean Sobel gradient magnitude of the Y channel [B] (a sharpness / texture measure)."""
    return sobel_magnitude(rgb_to_y(x)).flatten(1).mean(1)
