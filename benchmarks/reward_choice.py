"""Which candidates does a reward prefer? (choosing the default reward on the training split only)

Samples the demo's training crops (bundled *training* photographs, 24 LR crops of 64², the
demo's degradation) ``--m`` times each with the shipped policy's ``ode`` sampler — the
candidates DP²O-SR and Diffusion-DPO learn from — and, for each reward variant, compares the
top-N with the bottom-N candidates of every LR (N = 4, DP²O's split) on what the reward does not
see: PSNR-Y and SSIM-Y, sharpness relative to the HR and high-pass noise inside the HR's smooth
regions relative to the HR (the report's noise/HR). A reward that preferred grain shows a
positive Δnoise/HR; one that preferred blur a negative Δsharp/HR.

    python benchmarks/reward_choice.py [--m 16] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from sralign.eval.bestof import sample_groups
from sralign.eval.hacking import smooth_highpass, smooth_mask
from sralign.policies import load_policy
from sralign.rewards.builtin import ssim_y
from sralign.rewards.functional import mean_gradient, psnr_y
from sralign.rewards.hybrid import HybridReward, score_group
from sralign.train.candidates import LRSetConfig, make_lr_set

VARIANTS = {
    "gmsd + grad_fidelity | gap:brisque + gap:niqe_s": (["gmsd", "grad_fidelity"], ["gap:brisque", "gap:niqe_s"]),
    "gmsd + local_grad_fidelity | gap:brisque + gap:niqe_s": (["gmsd", "local_grad_fidelity"], ["gap:brisque", "gap:niqe_s"]),
    "gmsd + local_grad_fidelity (FR only)": (["gmsd", "local_grad_fidelity"], []),
    "gmsd (FR only)": (["gmsd"], []),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    items = make_lr_set(LRSetConfig(n=24, patch=64))  # the demo's training crops
    lr, hr = torch.stack([it.lr for it in items]), torch.stack([it.hr for it in items])
    with torch.no_grad():
        x = sample_groups(load_policy(), lr, a.m, sampler="ode", steps=10, seed=0)  # [B,M,3,H,W]
    b, m = x.shape[:2]
    flat, hr_rep = x.flatten(0, 1), hr.repeat_interleave(m, 0)
    mask = smooth_mask(hr)
    e_hr = smooth_highpass(hr, mask)
    ok = torch.isfinite(e_hr) & (e_hr > 0)
    side = {"psnr": psnr_y(flat, hr_rep, 4).reshape(b, m), "ssim": ssim_y(flat, hr_rep, 4).reshape(b, m),
            "sharp/HR": (mean_gradient(flat).reshape(b, m) / mean_gradient(hr)[:, None]),
            "noise/HR": smooth_highpass(flat, mask.repeat_interleave(m, 0)).reshape(b, m) / e_hr[:, None]}
    print(f"{b} training LR crops × {m} candidates (shipped policy, ode 10 steps); top-{a.n} minus bottom-{a.n} per LR, mean over LRs"
          f" (noise/HR over the {int(ok.sum())} crops with a smooth region)")
    print(f"{'reward':58s} {'Δpsnr':>8s} {'Δssim':>8s} {'Δsharp/HR':>10s} {'Δnoise/HR':>10s}")
    for name, (fr, nr) in VARIANTS.items():
        rw = HybridReward.from_names(fr, nr)
        total = rw.from_scores(score_group(rw.metrics, x, hr)).total  # [B,M]
        order = total.argsort(dim=1, descending=True)
        top, bot = order[:, : a.n], order[:, -a.n :]
        row = []
        for k, v in side.items():
            d = v.gather(1, top).mean(1) - v.gather(1, bot).mean(1)
            row.append(float(d[ok].mean() if k == "noise/HR" else d.mean()))
        print(f"{name:58s} {row[0]:+8.3f} {row[1]:+8.4f} {row[2]:+10.3f} {row[3]:+10.3f}", flush=True)


if __name__ == "__main__":
    main()
