"""Which ODE start noise level should the tiny policy ship with? (chosen on a selection set)

The shipped config's ``ode_start`` (the noise level the ``ode``/``sde`` samplers start from, like
img2img strength) trades fidelity for texture. This script scores a policy on a *selection* set —
photographs that neither the demo's evaluation nor the second set uses — for several starts, and
prints per start: PSNR-Y / SSIM-Y against the HR beside bicubic's, sharpness relative to the HR
(gradient energy) and smooth-region noise relative to the HR (``eval.hacking``), mean over
``--m`` seeds. The rule, fixed before looking: the noisiest start whose PSNR and SSIM both beat
bicubic and whose noise/HR stays ≤ 1.0 (no grain the HR lacks) on the selection set.

    python benchmarks/choose_start.py --policy runs/pretrain/model --hr-dir DIR [--degradation simple]
"""

from __future__ import annotations

import argparse

import torch

from sralign.config import ConfigError, validate
from sralign.data.degradation import SimpleDegradationConfig, quantize_8bit, simple_degradation
from sralign.eval.policy_check import check_policy
from sralign.policies import load_policy
from sralign.train.candidates import LRSetConfig, make_lr_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None, help="tiny-policy checkpoint folder (default: the shipped one)")
    ap.add_argument("--hr-dir", default="", help="selection photographs ('' = the bundled *training* split)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--degradation", default="simple", choices=("simple", "realesrgan"))
    ap.add_argument("--starts", default="0.2,0.3,0.4,0.5,0.6,0.7,1.0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--noise-sigma", default="", metavar="LO,HI",
                    help="simple degradation only: LR noise σ range on the 0–255 scale (default: the demo's 0,5); 0,0 = noise-free LR")
    a = ap.parse_args()
    noise = None
    if a.noise_sigma:  # checked before any work
        if a.degradation != "simple":
            raise SystemExit("--noise-sigma applies to --degradation simple only")
        try:
            noise = validate(SimpleDegradationConfig(noise_sigma=tuple(float(v) for v in a.noise_sigma.split(","))))
        except (ValueError, ConfigError) as e:
            raise SystemExit(f"--noise-sigma {a.noise_sigma!r}: give LO,HI on the 0–255 scale, e.g. 0,0 ({e})") from None
    torch.set_num_threads(a.threads)
    items = make_lr_set(LRSetConfig(split="select", n=a.n, patch=a.patch, seed=11, hr_dir=a.hr_dir, degradation=a.degradation)
                        if a.hr_dir else LRSetConfig(split="train", n=a.n, patch=a.patch, seed=11, degradation=a.degradation))
    lr, hr = torch.stack([it.lr for it in items]), torch.stack([it.hr for it in items])
    if noise is not None:  # the same HR crops, degraded again at that noise level
        lr = quantize_8bit(simple_degradation(hr, hr.shape[-1] // lr.shape[-1], torch.Generator().manual_seed(11), noise))
    policy = load_policy(a.policy)
    print(f"selection set: {a.hr_dir or 'bundled training split'}, {a.n} crops of {a.patch}², {a.degradation} degradation"
          f"{f' (noise σ {a.noise_sigma})' if a.noise_sigma else ''}, M = {a.m}")
    print(f"{'sampler':>16s} {'PSNR':>7s} {'SSIM':>7s} {'sharp/HR':>9s} {'noise/HR':>9s}")
    rows = []
    for k, s in enumerate(float(v) for v in a.starts.split(",")):
        policy.config.ode_start = s  # the ode sampler starts from s·ε
        f, _ = check_policy(policy, hr, lr, seeds=a.m, steps=a.steps)  # also the onestep and bicubic figures
        if k == 0:
            bic = f
            print(f"{'bicubic':>16s} {f.psnr_bicubic:7.3f} {f.ssim_bicubic:7.4f} {f.grad_ratio_bicubic:9.3f} {f.noise_ratio_bicubic:9.3f}")
        rows.append((s, f))
        print(f"{f'ode start {s:g}':>16s} {f.psnr_ode:7.3f} {f.ssim_ode:7.4f} {f.grad_ratio_ode:9.3f} {f.noise_ratio_ode:9.3f}", flush=True)
    print(f"{'onestep':>16s} {f.psnr_onestep:7.3f} {f.ssim_onestep:7.4f} {f.grad_ratio_onestep:9.3f} {f.noise_ratio_onestep:9.3f}")
    ok = [s for s, f in rows if f.psnr_ode > bic.psnr_bicubic and f.ssim_ode > bic.ssim_bicubic and f.noise_ratio_ode <= 1.0]
    print(f"rule (noisiest start beating bicubic in PSNR and SSIM with noise/HR <= 1): {max(ok) if ok else 'none'}")


if __name__ == "__main__":
    main()
