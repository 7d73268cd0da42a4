"""Does a policy beat bicubic, and how stochastic is it? (held-out bundled photographs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.degradation import SimpleDegradationConfig, simple_degradation
from ..data.images import center_crop, load_bundled
from ..policies.base import SRPolicy
from ..rewards.builtin import ssim_y
from ..rewards.functional import mean_gradient, psnr_y
from .hacking import hr_relative_stats


def heldout_pairs(scale: int = 4, size: int = 128, seed: int = 1234) -> tuple[list[str], Tensor, Tensor]:
    """Centre crops of the held-out photographs (HR [n,3,size,size]) and their LR (seeded)."""
    held = load_bundled("heldout")
    hr = torch.stack([center_crop(img, size) for _, img in held])
    lr = simple_degradation(hr, scale, torch.Generator().manual_seed(seed), SimpleDegradationConfig())
    return [n for n, _ in held], hr, lr


@dataclass
class PolicyCheck:
    psnr_bicubic: float
    psnr_ode: float
    psnr_onestep: float
    grad_ratio_bicubic: float  # mean gradient magnitude / HR's (1 = as sharp as HR)
    grad_ratio_ode: float
    grad_ratio_onestep: float
    seed_std_ode: float  # mean per-pixel std across seeds (0–1 scale)
    seed_std_onestep: float
    seeds: int
    steps: int
    ssim_bicubic: float = float("nan")
    ssim_ode: float = float("nan")
    ssim_onestep: float = float("nan")
    noise_ratio_bicubic: float = float("nan")  # high-pass energy in the HR's smooth regions / HR's (eval.hacking)
    noise_ratio_ode: float = float("nan")
    noise_ratio_onestep: float = float("nan")


@torch.no_grad()
def check_policy(policy: SRPolicy, hr: Tensor, lr: Tensor, seeds: int = 8, steps: int = 20) -> tuple[PolicyCheck, dict[str, Tensor]]:
    """Sample ``seeds`` outputs per LR with ``ode`` and ``onestep``; PSNR-Y, sharpness, spread.

    Returns the figures and the samples ({"ode": [n,S,3,H,W], "onestep": …, "bicubic": [n,3,H,W]}).
    """
    n = lr.shape[0]
    cond = policy.condition(lr)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((n * seeds, 3, *hr.shape[-2:]), generator=g)
    out = {}
    for sampler in ("ode", "onestep"):
        imgs = policy.sample(cond, noise, sampler=sampler, steps=steps).images.cpu()
        out[sampler] = imgs.reshape(n, seeds, *imgs.shape[1:])
    out["bicubic"] = cond.lr_up.cpu()
    border = policy.scale
    hr_rep = hr.repeat_interleave(seeds, 0)
    g_hr = mean_gradient(hr).mean()

    def ps(x, ref):
        return float(psnr_y(x, ref, border).mean())

    fig = PolicyCheck(
        psnr_bicubic=ps(out["bicubic"], hr),
        psnr_ode=ps(out["ode"].flatten(0, 1), hr_rep),
        psnr_onestep=ps(out["onestep"].flatten(0, 1), hr_rep),
        grad_ratio_bicubic=float(mean_gradient(out["bicubic"]).mean() / g_hr),
        grad_ratio_ode=float(mean_gradient(out["ode"].flatten(0, 1)).mean() / g_hr),
        grad_ratio_onestep=float(mean_gradient(out["onestep"].flatten(0, 1)).mean() / g_hr),
        seed_std_ode=float(out["ode"].std(dim=1).mean()),
        seed_std_onestep=float(out["onestep"].std(dim=1).mean()),
        seeds=seeds,
        steps=steps,
        ssim_bicubic=float(ssim_y(out["bicubic"], hr, border).mean()),
        ssim_ode=float(ssim_y(out["ode"].flatten(0, 1), hr_rep, border).mean()),
        ssim_onestep=float(ssim_y(out["onestep"].flatten(0, 1), hr_rep, border).mean()),
        noise_ratio_bicubic=hr_relative_stats(out["bicubic"][:, None], hr)["noise/HR"],
        noise_ratio_ode=hr_relative_stats(out["ode"], hr)["noise/HR"],
        noise_ratio_onestep=hr_relative_stats(out["onestep"], hr)["noise/HR"],
    )
    return fig, out
