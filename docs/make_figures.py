"""Regenerate the figures in docs/ (and print the numbers quoted next to them).

    python docs/make_figures.py
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from sralign.data.degradation import RealESRGANDegradation
from sralign.data.images import center_crop, load_bundled
from sralign.eval.grid import save_grid
from sralign.eval.policy_check import check_policy, heldout_pairs
from sralign.policies import load_policy
from sralign.rewards.attribute import texture_map

DOCS = Path(__file__).parent


def policy_figure():
    p = load_policy()
    names, hr, lr = heldout_pairs()
    fig, out = check_policy(p, hr, lr, seeds=8, steps=20)
    print("shipped policy on held-out crops (x4, 128x128 HR):", fig)
    fig10, _ = check_policy(p, hr, lr, seeds=8, steps=10)
    start = p.config.ode_start
    p.config.ode_start = 1.0
    fig1, _ = check_policy(p, hr, lr, seeds=8, steps=10)
    p.config.ode_start = start
    print("| | PSNR-Y (dB) | SSIM-Y | sharpness / HR | noise in smooth regions / HR | per-pixel std over 8 seeds |")
    print("|---|---|---|---|---|---|")
    f = fig
    print(f"| bicubic | {f.psnr_bicubic:.2f} | {f.ssim_bicubic:.4f} | {f.grad_ratio_bicubic:.2f} | {f.noise_ratio_bicubic:.2f} | 0 |")
    for label, g in ((f"`ode`, 20 steps (start {start:g})", fig), (f"`ode`, 10 steps (start {start:g})", fig10), ("`ode`, 10 steps from pure noise (`--start 1`)", fig1)):
        print(f"| {label} | {g.psnr_ode:.2f} | {g.ssim_ode:.4f} | {g.grad_ratio_ode:.2f} | {g.noise_ratio_ode:.2f} | {g.seed_std_ode:.4f} |")
    print(f"| `onestep` (t_noise 250, t_diff 100) | {f.psnr_onestep:.2f} | {f.ssim_onestep:.4f} | {f.grad_ratio_onestep:.2f} | {f.noise_ratio_onestep:.2f} | {f.seed_std_onestep:.4f} |")
    rows = [[out["bicubic"][i], *out["ode"][i, :4], hr[i]] for i in range(len(names))]
    save_grid(rows, DOCS / "policy_seeds.png", ["LR (bicubic)", "seed 0", "seed 1", "seed 2", "seed 3", "HR"])
    rows = [[out["bicubic"][i], *out["onestep"][i, :4], hr[i]] for i in range(len(names))]
    save_grid(rows, DOCS / "policy_onestep_seeds.png", ["LR (bicubic)", "noise 0", "noise 1", "noise 2", "noise 3", "HR"])


def degradation_figure():
    img = load_bundled("heldout")[0][1]
    hr = center_crop(img, 128)[None].repeat(6, 1, 1, 1)
    deg = RealESRGANDegradation()
    lrs = [deg(hr[:1], torch.Generator().manual_seed(s))[0] for s in range(6)]
    ups = [F.interpolate(x[None], scale_factor=4, mode="nearest")[0] for x in lrs]
    save_grid([[hr[0], *ups[:3]], [hr[0], *ups[3:]]], DOCS / "degradations.png", ["HR", "LR (seeds 0, 3)", "LR (seeds 1, 4)", "LR (seeds 2, 5)"])


def texture_figure():
    imgs = [center_crop(img, 128) for _, img in load_bundled("heldout")]
    hr = torch.stack(imgs)
    m = texture_map(hr)
    overlay = hr * 0.5 + 0.5 * torch.cat([m, torch.zeros_like(m), 1 - m], 1)
    rows = [[hr[i], m[i].repeat(3, 1, 1), overlay[i]] for i in range(len(imgs))]
    print("texture fraction per held-out crop:", [round(float(x), 3) for x in m.flatten(1).mean(1)])
    save_grid(rows, DOCS / "texture_map.png", ["HR", "texture map", "red=texture blue=smooth"])


if __name__ == "__main__":
    torch.set_num_threads(2)
    policy_figure()
    degradation_figure()
    texture_figure()
