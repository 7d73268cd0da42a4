"""Reward-hacking diagnostics: is a policy's no-reference gain real, or grain?

Per policy, against the HR it should reproduce:

* ``sharp/HR`` — mean Sobel gradient energy of the SR over the HR's (1 = as sharp as the truth;
  above 1: detail the HR does not have).
* ``noise/HR`` — high-pass energy inside the HR's *smooth* regions (the attribute reward's
  texture map, ``rewards.attribute.texture_map``, eroded so texture edges do not leak in), SR
  over HR: grain added to sky, walls and bokeh shows up here first.

A policy is *flagged* (``hacking_flags``) when, against its reference under the same sampler
and seeds, a no-reference metric improves while a held-out fidelity metric falls beyond its
tolerance, or when its sharpness or smooth-region noise goes beyond the HR's own level.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ranged
from ..rewards.attribute import texture_map
from ..rewards.functional import mean_gradient, rgb_to_y


@dataclass
class HackingThresholds:
    """When the report flags a policy (each compared with its own reference, same seeds).

    psnr_drop_db / ssim_drop: largest tolerated fall of held-out PSNR (dB) / SSIM while a
    no-reference metric improves ("fidelity traded for a no-reference gain").
    nr_gain: smallest relative no-reference improvement that counts as a gain (share of the
    reference's value, direction-aware).
    sharp_max / noise_max: largest tolerated sharpness and smooth-region noise ratio to the HR
    ("beyond the HR's own level"); flagged only when the policy also exceeds its reference.
    """

    psnr_drop_db: float = ranged(0.1, ge=0)
    ssim_drop: float = ranged(0.005, ge=0)
    nr_gain: float = ranged(0.01, ge=0)
    sharp_max: float = ranged(1.1, gt=0)
    noise_max: float = ranged(1.1, gt=0)


def smooth_mask(hr: Tensor, erode: int = 2) -> Tensor:
    """1 where the HR [B,3,H,W] is smooth (texture map 0), eroded by ``erode`` px. [B,1,H,W]."""
    m = 1 - texture_map(hr)
    if erode > 0:
        m = -F.max_pool2d(-m, 2 * erode + 1, stride=1, padding=erode)
    return m


def highpass_y(x: Tensor, sigma: float = 1.0) -> Tensor:
    """Y (8-bit units) minus its Gaussian blur (5×5, ``sigma``, replicate padding): [B,1,H,W]."""
    y = rgb_to_y(x.double()) * 255.0
    ax = torch.arange(5, dtype=torch.float64) - 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :])[None, None]
    return y - F.conv2d(F.pad(y, (2, 2, 2, 2), mode="replicate"), k)


def smooth_highpass(x: Tensor, mask: Tensor) -> Tensor:
    """RMS high-pass energy of x [B,3,H,W] inside mask [B,1,H,W] (8-bit units); NaN where the
    mask is empty. [B]"""
    hp = highpass_y(x) ** 2
    m = mask.double()
    cnt = m.flatten(1).sum(1)
    e = (hp * m).flatten(1).sum(1) / cnt.clamp_min(1)
    return torch.where(cnt > 0, e.sqrt(), torch.full_like(e, float("nan"))).float()


def sharpness_ratio(sr: Tensor, hr: Tensor) -> Tensor:
    """Mean gradient magnitude of sr over hr's, per image. [B]"""
    return (mean_gradient(sr) / mean_gradient(hr).clamp_min(1e-8)).float()


@torch.no_grad()
def hr_relative_stats(samples: Tensor, hr: Tensor) -> dict[str, float]:
    """``sharp/HR`` and ``noise/HR`` of samples [n,M,3,H,W] against hr [n,3,H,W].

    Both are ratios of means over all images and seeds (images whose HR has no smooth region
    are left out of the noise ratio)."""
    n, m = samples.shape[:2]
    flat = samples.flatten(0, 1)
    hr_rep = hr.repeat_interleave(m, 0)
    mask = smooth_mask(hr)
    e_sr = smooth_highpass(flat, mask.repeat_interleave(m, 0)).reshape(n, m).mean(1)
    e_hr = smooth_highpass(hr, mask)
    ok = torch.isfinite(e_hr) & (e_hr > 0)
    noise = float(e_sr[ok].sum() / e_hr[ok].sum()) if ok.any() else float("nan")
    sharp = float(mean_gradient(flat).mean() / mean_gradient(hr_rep).mean().clamp_min(1e-8))
    return {"sharp/HR": sharp, "noise/HR": noise}


def hacking_flags(metrics: dict[str, dict[str, dict]], stats: dict[str, dict[str, float]], policy: str, reference: str,
                  nr_names: list[str], fidelity: dict[str, str], th: HackingThresholds = HackingThresholds()) -> list[str]:
    """The reasons to distrust ``policy``'s gain over ``reference`` (empty: none).

    Args:
        metrics: {metric: {row: {"mean": float, "higher_is_better": bool}}} (an ``EvalResult``'s).
        stats: {row: {"sharp/HR": float, "noise/HR": float}}.
        nr_names: the no-reference metrics whose improvement counts as a gain.
        fidelity: {"psnr" | "psnr_rgb" | "ssim": metric name} of the held-out fidelity metrics
            (any may be missing; "psnr_rgb" shares the PSNR tolerance and catches colour shifts).
    """
    gains = []
    for name in nr_names:
        if name not in metrics:
            continue
        a, b = metrics[name][policy], metrics[name][reference]
        sign = 1.0 if a["higher_is_better"] else -1.0
        if sign * (a["mean"] - b["mean"]) > th.nr_gain * max(abs(b["mean"]), 1e-8):
            gains.append(name)
    flags = []
    if gains:
        lost = []
        for kind, tol in (("psnr", th.psnr_drop_db), ("psnr_rgb", th.psnr_drop_db), ("ssim", th.ssim_drop)):
            name = fidelity.get(kind)
            if name and name in metrics:
                d = metrics[name][policy]["mean"] - metrics[name][reference]["mean"]
                if d < -tol:
                    lost.append(f"{name} {d:+.3f}")
        if lost:
            flags.append(f"no-reference gain ({', '.join(gains)}) with fidelity loss ({', '.join(lost)})")
    s, r = stats[policy], stats[reference]
    for key, lim in (("sharp/HR", th.sharp_max), ("noise/HR", th.noise_max)):
        if s[key] == s[key] and s[key] > lim and s[key] > r[key]:
            flags.append(f"{key} {s[key]:.2f} beyond the HR's level (> {lim})")
    return flags


def thresholds_dict(th: HackingThresholds) -> dict:
    return asdict(th)
