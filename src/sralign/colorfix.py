"""Colour correction of SR outputs towards the (upsampled) LR input: AdaIN or wavelet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COLOR_FIXES = ("none", "adain", "wavelet")


def adain_fix(sr: Tensor, ref: Tensor, eps: float = 1e-5) -> Tensor:
    """Match each channel's mean and std of ``sr`` [B,3,H,W] to ``ref`` (same size)."""
    ms, ss = sr.mean((2, 3), keepdim=True), sr.std((2, 3), keepdim=True)
    mr, sref = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    return ((sr - ms) / (ss + eps) * sref + mr).clamp(0, 1)


def _wavelet_blur(x: Tensor, radius: int) -> Tensor:
    k = torch.tensor([[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]], dtype=x.dtype, device=x.device)
    k = k[None, None].repeat(x.shape[1], 1, 1, 1)
    xp = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(xp, k, groups=x.shape[1], dilation=radius)


def _wavelet_split(x: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = _wavelet_blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_fix(sr: Tensor, ref: Tensor, levels: int = 5) -> Tensor:
    """Keep the high frequencies of ``sr`` and the low frequencies of ``ref``."""
    high, _ = _wavelet_split(sr, levels)
    _, low = _wavelet_split(ref, levels)
    return (high + low).clamp(0, 1)


def color_fix(sr: Tensor, ref: Tensor, method: str = "adain") -> Tensor:
    if method == "none":
        return sr
    if method == "adain":
        return adain_fix(sr, ref)
    if method == "wavelet":
        return wavelet_fix(sr, ref)
    raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOR_FIXES)}")
