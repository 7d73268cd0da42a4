"""Download-free full-reference perceptual metrics: GMSD (own, batched in torch) and MS-SSIM
(torchmetrics, imported only when used).

Both are maximal (GMSD minimal) at SR = HR and penalise blur *and* added grain: GMSD compares
local gradient magnitudes pixel by pixel, so texture that the HR lacks counts as an error just
like texture the SR lost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MetricError
from .functional import crop_border, rgb_to_y

GMSD_C = 170.0  # Xue et al.'s constant for 8-bit intensities


def gmsd_y(sr: Tensor, hr: Tensor, border: int = 0, c: float = GMSD_C) -> Tensor:
    """Gradient Magnitude Similarity Deviation (Xue, Zhang, Mou, Bovik, IEEE TIP 2014) on Y.

    The published recipe: Y in [0,255] (BT.601 luma), a 2×2 mean filter then keep every second
    row and column, Prewitt gradients (±1/3 kernels) with zero padding, gradient magnitudes
    m_r (HR) and m_d (SR), similarity map GMS = (2·m_r·m_d + c) / (m_r² + m_d² + c), c = 170,
    GMSD = standard deviation of the map (N−1 normaliser, MATLAB's ``std2``).
    sr, hr [B,3,H,W] in [0,1] -> [B] in [0, 1); 0 means identical gradients. Lower is better.
    """
    if sr.shape != hr.shape:
        raise MetricError(f"gmsd: sr {tuple(sr.shape)} and hr {tuple(hr.shape)} differ in shape")
    ys = [crop_border(rgb_to_y(x.double()), border) * 255.0 for x in (sr, hr)]
    avg = torch.full((1, 1, 2, 2), 0.25, dtype=torch.float64, device=sr.device)
    # MATLAB conv2(Y, ones(2)/4, 'same') pads one zero row/column after the image
    ys = [F.conv2d(F.pad(y, (0, 1, 0, 1)), avg)[..., ::2, ::2] for y in ys]
    px = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=torch.float64, device=sr.device) / 3.0
    k = torch.stack([px, px.t()])[:, None]  # conv2 flips; magnitudes are sign-free
    mags = [torch.sqrt((F.conv2d(y, k, padding=1) ** 2).sum(1)) for y in ys]
    md, mr = mags
    gms = (2 * mr * md + c) / (mr * mr + md * md + c)
    return gms.flatten(1).std(1, unbiased=True).to(sr.dtype)


def ms_ssim_y(sr: Tensor, hr: Tensor, scales: int | None = None) -> Tensor:
    """MS-SSIM on Y (Wang, Simoncelli, Bovik 2003) via torchmetrics, 11×11 Gaussian σ = 1.5,
    data range 1, the published scale weights renormalised over the first ``scales`` scales.
    ``scales=None`` takes as many as the image fits, at most 3 (3 from 41 px, 2 from 21 px, 1 —
    plain SSIM — from 11 px): the image must be at least 10·2^(scales−1)+1 px. Candidates of one
    LR share a size, so a reward compares them at one setting. [B] in [0,1], higher is better."""
    try:
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim
    except ImportError:
        raise MetricError("metric ms_ssim needs torchmetrics: `pip install torchmetrics` (it does not need torchvision)") from None
    side = min(sr.shape[-2:])
    if scales is None:
        scales = max(1, min(3, ((side - 1) // 10).bit_length()))
    need = 10 * 2 ** (scales - 1) + 1
    if side < need:
        raise MetricError(f"metric ms_ssim with {scales} scales needs images of at least {need}x{need} px, got {sr.shape[-1]}x{sr.shape[-2]}")
    w = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:scales], dtype=torch.float64)
    w = tuple((w / w.sum()).tolist())
    x, y = rgb_to_y(sr.double()), rgb_to_y(hr.double())
    out = msssim(x, y, gaussian_kernel=True, kernel_size=11, sigma=1.5, data_range=1.0, betas=w, normalize="relu", reduction="none")
    return out.reshape(-1).to(sr.dtype)
