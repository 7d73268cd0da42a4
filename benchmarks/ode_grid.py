"""Does the tiny policy's `ode` sampler depend on its step grid meeting the one-step timestep?

The tiny policy is one network for three samplers. Its one-step mode (GDPO-SR's noise-aware
mode) is trained at a single timestep, ``t_diff`` (0.1), on inputs noised to ``t_noise`` (0.25)
and asked for the clean residual in one jump. An ODE grid from ``start`` in ``steps`` uniform
steps evaluates the network exactly at ``t_diff`` only for some (start, steps) pairs — the
shipped 0.5 / 10 does (0.5, 0.45, …, 0.1, 0.05). This script prints, per pair, whether the
grid meets ``t_diff`` and what the samples score on a selection set (PSNR-Y / SSIM-Y beside
bicubic, sharpness and smooth-region noise relative to the HR, mean over ``--m`` seeds).

    python benchmarks/ode_grid.py [--policy DIR] [--hr-dir DIR] [--pairs 0.5:10,0.5:9,...]
"""

from __future__ import annotations

import argparse

import torch

from sralign.eval.policy_check import check_policy
from sralign.policies import load_policy
from sralign.policies.tiny import sigma_schedule
from sralign.train.candidates import LRSetConfig, make_lr_set

PAIRS = "0.5:10,0.5:9,0.5:11,0.5:5,0.3:6,0.3:10,0.2:10,0.2:7"


def meets(start: float, steps: int, t: float) -> bool:
    """True when the grid's evaluated noise levels (all but the final 0) include ``t``."""
    return bool((sigma_schedule(steps, start=start)[:-1] - t).abs().min() < 1e-6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None, help="tiny-policy checkpoint folder (default: the shipped one)")
    ap.add_argument("--hr-dir", default="", help="selection photographs ('' = the bundled *training* split)")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--pairs", default=PAIRS, help="start:steps,…")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = LRSetConfig(split="select", n=a.n, patch=a.patch, seed=11, hr_dir=a.hr_dir) if a.hr_dir else LRSetConfig(split="train", n=a.n, patch=a.patch, seed=11)
    items = make_lr_set(cfg)
    lr, hr = torch.stack([it.lr for it in items]), torch.stack([it.hr for it in items])
    policy = load_policy(a.policy)
    td = policy.config.t_diff
    print(f"selection set: {a.hr_dir or 'bundled training split'}, {a.n} crops of {a.patch}², M = {a.m}; t_diff = {td:g}")
    print(f"{'start':>5s} {'steps':>5s} {'meets t_diff':>12s} {'PSNR':>7s} {'SSIM':>7s} {'sharp/HR':>8s} {'noise/HR':>8s}")
    for k, pair in enumerate(a.pairs.split(",")):
        s, n = pair.split(":")
        start, steps = float(s), int(n)
        policy.config.ode_start = start
        f, _ = check_policy(policy, hr, lr, seeds=a.m, steps=steps)
        if k == 0:
            print(f"{'bicubic':>11s} {'':>12s} {f.psnr_bicubic:7.3f} {f.ssim_bicubic:7.4f} {f.grad_ratio_bicubic:8.3f} {f.noise_ratio_bicubic:8.3f}")
            print(f"{'onestep':>11s} {'':>12s} {f.psnr_onestep:7.3f} {f.ssim_onestep:7.4f} {f.grad_ratio_onestep:8.3f} {f.noise_ratio_onestep:8.3f}")
        print(f"{start:5g} {steps:5d} {'yes' if meets(start, steps, td) else 'no':>12s} {f.psnr_ode:7.3f} {f.ssim_ode:7.4f} {f.grad_ratio_ode:8.3f} {f.noise_ratio_ode:8.3f}", flush=True)


if __name__ == "__main__":
    main()
