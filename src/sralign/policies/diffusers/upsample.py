"""Upsampling the LR to the output size, as the backends' control / latent input.

``bicubic``: torch's bicubic (Keys kernel, A = −0.75), in float. ``pil-bicubic``: PIL's bicubic
(A = −0.5) on the 8-bit image, as the authors of C-SD2, C-FLUX, OSEDiff and GDPO-SR prepare their
input (``Image.resize`` of the uint8 LR; the result is 8-bit again).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

UPSAMPLERS = ("bicubic", "pil-bicubic")


def pil_bicubic(lr: Tensor, scale: int) -> Tensor:
    """[B,3,h,w] in [0,1] -> [B,3,s·h,s·w] in [0,1]: each image rounded to 8 bits and resized by
    PIL's bicubic filter."""
    from PIL import Image

    out = []
    for img in lr.detach().float().clamp(0, 1).cpu():
        arr = (img.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
        h, w = arr.shape[:2]
        up = Image.fromarray(arr).resize((w * scale, h * scale), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(up).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out).to(lr.device)


def upsample(lr: Tensor, scale: int, method: str = "bicubic") -> Tensor:
    """LR [B,3,h,w] in [0,1] upsampled ``scale``× by ``method`` (one of ``UPSAMPLERS``), in [0,1]."""
    if method == "bicubic":
        return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
    if method == "pil-bicubic":
        return pil_bicubic(lr, scale)
    raise ValueError(f"unknown upsampling {method!r}; choose one of {', '.join(UPSAMPLERS)}")
