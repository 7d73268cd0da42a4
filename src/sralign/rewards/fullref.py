"""Download-free full-reference perceptual metrics: GMSD and MS-SSIM (own, batched in torch;
MS-SSIM is tested against torchmetrics).

Both are maximal (GMSD minimal) at SR = HR and penalise blur *and* added grain: GMSD compares
local gradient magnitudes pixel by pixel, so texture that the HR lacks counts as an error just
like texture the SR lost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MetricError
from .builtin import gauss1d, ssim_maps
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


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli, Bovik 2003, scales 1…5


def _gauss_blur_reflect(x: Tensor) -> Tensor:
    """11-tap Gaussian (σ = 1.5) of x [B,1,H,W], reflect-padded to the same size; separable, so
    the im2col buffer is 11 (not 121) copies of the batch."""
    g = gauss1d(x.dtype, x.device)
    x = F.pad(x, (5, 5, 5, 5), mode="reflect")
    return F.conv2d(F.conv2d(x, g.view(1, 1, 1, 11)), g.view(1, 1, 11, 1))


def ms_ssim_y(sr: Tensor, hr: Tensor, scales: int | None = None, chunk: int = 64) -> Tensor:
    """MS-SSIM on Y (Wang, Simoncelli, Bovik 2003): 11×11 Gaussian window σ = 1.5 (reflect-padded
    borders), K1 = 0.01, K2 = 0.03, data range 1, 2×2 average pooling between scales; the product
    of the mean contrast-structure terms of scales 1…S−1 (over the window positions inside the
    image) and the mean SSIM of scale S (over the whole reflect-padded map), each
    clamped at 0 and raised to the published scale weights renormalised over the first S scales
    — torchmetrics' ``normalize="relu"`` convention (tested against it; its version needs
    ~20 MB per 64² image, this one a few maps per image, ``chunk`` images at a time).
    ``scales=None`` takes as many scales as the image fits, at most 3 (3 from 41 px, 2 from
    21 px, 1 — SSIM — from 11 px): scale S needs 10·2^(S−1)+1 px. Candidates of one LR share a
    size, so a reward compares them at one setting. [B] in [0,1], higher is better."""
    side = min(sr.shape[-2:])
    if scales is None:
        scales = max(1, min(3, ((side - 1) // 10).bit_length()))
    if not 1 <= scales <= len(MS_SSIM_WEIGHTS):
        raise MetricError(f"metric ms_ssim: scales must be 1..{len(MS_SSIM_WEIGHTS)}, got {scales}")
    need = 10 * 2 ** (scales - 1) + 1
    if side < need:
        raise MetricError(f"metric ms_ssim with {scales} scales needs images of at least {need}x{need} px, got {sr.shape[-1]}x{sr.shape[-2]}")
    w = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64, device=sr.device)
    w = w / w.sum()
    outs = []
    for i in range(0, sr.shape[0], chunk):
        x, y = rgb_to_y(sr[i:i + chunk].double()), rgb_to_y(hr[i:i + chunk].double())
        out = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        for s in range(scales):
            if s:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            lum, cs = ssim_maps(x, y, _gauss_blur_reflect, clamp_var=True)
            if s == scales - 1:  # the last scale's full SSIM, averaged over the whole (padded) map
                term = (lum * cs).flatten(1).mean(1)
            else:  # contrast-structure, averaged where the window lies inside the image
                term = cs[..., 5:-5, 5:-5].flatten(1).mean(1)
            out = out * term.clamp_min(0) ** w[s]
        outs.append(out)
    return torch.cat(outs).to(sr.dtype)
