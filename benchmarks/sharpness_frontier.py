"""How sharp can the tiny policy's samples be without losing fidelity? (measured on the training crops)

Issue 16 asks aligned policies for a sharpness of 0.9–1.1× the HR's *and* no fidelity loss
against their reference. This script measures what the reference's own samples offer, on the
demo's *training* crops (never a reporting set): for each ODE start noise level (and the
one-step mode), over ``--m`` seeds per crop,

* sharp/HR (mean Sobel gradient magnitude over the HR's, pooled over crops and seeds as the
  report computes it) and PSNR-Y / SSIM-Y of the samples,
* the share of samples at sharp/HR ≥ 0.9 (per sample) and their PSNR against the other samples
  of the same crop (crops with both kinds only: what preference learning could pick from),
* the PSNR of the seed average (an estimate of the posterior mean: the fidelity bound of this
  policy's knowledge) — a sample that adds detail the HR has at the HR's level but uncorrelated
  with it costs ≈ 3 dB against that mean (MSE doubles).

    python benchmarks/sharpness_frontier.py [--policy DIR] [--starts 0.5,0.7,1.0] [--m 16]
"""

from __future__ import annotations

import argparse

import torch

from sralign.eval.hacking import sharpness_ratio
from sralign.eval.policy_check import check_policy
from sralign.policies import load_policy
from sralign.rewards.builtin import ssim_y
from sralign.rewards.functional import mean_gradient, psnr_y
from sralign.train.candidates import LRSetConfig, make_lr_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None, help="tiny-policy checkpoint folder (default: the shipped one)")
    ap.add_argument("--starts", default="0.5,0.7,1.0")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    items = make_lr_set(LRSetConfig(split="train", n=a.n, patch=64, seed=0))  # the demo's training crops
    lr, hr = torch.stack([it.lr for it in items]), torch.stack([it.hr for it in items])
    policy = load_policy(a.policy)
    border = policy.scale
    print(f"the demo's training crops: {a.n} of 64², simple degradation, M = {a.m}, {a.steps} ODE steps")
    print(f"{'sampler':>14s} {'sharp/HR':>8s} {'PSNR':>7s} {'SSIM':>7s} {'≥0.9 share':>10s} "
          f"{'their ΔPSNR vs the crop':>23s} {'seed-mean PSNR':>14s} {'seed-mean sharp':>15s}")
    bic, g_hr = None, mean_gradient(hr).mean()
    for k, s in enumerate([float(v) for v in a.starts.split(",")]):
        policy.config.ode_start = s
        _, out = check_policy(policy, hr, lr, seeds=a.m, steps=a.steps)
        if bic is None:
            bic = psnr_y(out["bicubic"], hr, border)  # [n]
            print(f"{'bicubic':>14s} {float(mean_gradient(out['bicubic']).mean() / g_hr):8.3f} {float(bic.mean()):7.3f} "
                  f"{float(ssim_y(out['bicubic'], hr, border).mean()):7.4f}")
        rows = [(f"ode start {s:g}", out["ode"])] + ([("onestep", out["onestep"])] if k == len(a.starts.split(",")) - 1 else [])
        for name, x in rows:
            n, m = x.shape[:2]
            flat, hr_rep = x.flatten(0, 1), hr.repeat_interleave(m, 0)
            sharp = sharpness_ratio(flat, hr_rep).reshape(n, m)
            ps = psnr_y(flat, hr_rep, border).reshape(n, m)
            ss = ssim_y(flat, hr_rep, border).reshape(n, m)
            sharp_ok = sharp >= 0.9
            others = torch.where(~sharp_ok, ps, torch.nan).nanmean(1, keepdim=True).expand_as(ps)
            both = sharp_ok & torch.isfinite(others)
            d_oth = f"{float((ps - others)[both].mean()):+23.3f}" if both.any() else f"{'—':>23s}"
            mean_img = x.mean(1)
            print(f"{name:>14s} {float(mean_gradient(flat).mean() / g_hr):8.3f} {float(ps.mean()):7.3f} {float(ss.mean()):7.4f} "
                  f"{float(sharp_ok.float().mean()):10.3f} {d_oth} {float(psnr_y(mean_img, hr, border).mean()):14.3f} "
                  f"{float(mean_gradient(mean_img).mean() / g_hr):15.3f}", flush=True)


if __name__ == "__main__":
    main()
