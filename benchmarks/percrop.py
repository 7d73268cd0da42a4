"""Where does an aligned policy lose fidelity? Per-crop ΔPSNR-Y against its reference.

Samples the policy and its frozen reference with the same seeds (``ode``, 10 steps, M seeds, as
the evaluation does) on one LR set and prints, per crop, the change of PSNR-Y, the HR's texture
share (the attribute reward's texture map: 0 = flat, 1 = textured), the reference's PSNR and
noise/HR before → after. A loss concentrated in flat crops is grain where the HR has none.

    python benchmarks/percrop.py --policy out/demo/runs/dp2o/policy --set demo
    python benchmarks/percrop.py --policy out/demo/runs/dp2o/policy --set second --hr-dir /tmp/sralign-second-set/hr
    python benchmarks/percrop.py --policy out/demo/runs/dp2o/policy --set select --hr-dir /tmp/photos/val
"""

from __future__ import annotations

import argparse

import torch

from sralign.data.lrset import make_lr_set
from sralign.demo import DemoConfig
from sralign.eval.bestof import sample_groups
from sralign.eval.hacking import hr_relative_stats
from sralign.policies import load_policy
from sralign.rewards.attribute import texture_map
from sralign.rewards.functional import psnr_y
from sralign.train.candidates import LRSetConfig


def lr_set(name: str, hr_dir: str) -> LRSetConfig:
    """The crops each script draws: the demo's held-out and training crops, second_set.py's and
    choose_steps.py's."""
    cfg = DemoConfig()
    if name == "demo":
        return cfg.eval.lr_set
    if name == "train":
        return cfg.generate.lr_set
    if not hr_dir:
        raise SystemExit(f"--set {name} needs --hr-dir")
    return LRSetConfig(split=name, n=24, patch=64, seed={"second": 7, "select": 11}[name], hr_dir=hr_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="an aligned policy folder (e.g. out/demo/runs/dp2o/policy)")
    ap.add_argument("--set", choices=("demo", "train", "second", "select"), default="demo")
    ap.add_argument("--hr-dir", default="", help="the photographs of --set second / select")
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--show", type=int, default=5, help="worst and best crops to list")
    a = ap.parse_args()
    torch.set_num_threads(2)
    data = make_lr_set(lr_set(a.set, a.hr_dir))
    lr, hr, ids = torch.stack([d.lr for d in data]), torch.stack([d.hr for d in data]), [d.lr_id for d in data]
    pol = load_policy(a.policy)
    with pol.reference():
        base = sample_groups(pol, lr, a.m, sampler="ode", steps=10, seed=1000, ids=ids).float().clamp(0, 1)
    new = sample_groups(pol, lr, a.m, sampler="ode", steps=10, seed=1000, ids=ids).float().clamp(0, 1)
    tex = texture_map(hr).flatten(1).mean(1)
    rows = []
    for i in range(len(ids)):
        h = hr[i : i + 1].expand_as(base[i])
        p0, p1 = psnr_y(base[i], h).mean().item(), psnr_y(new[i], h).mean().item()
        n0 = hr_relative_stats(base[i : i + 1], hr[i : i + 1])["noise/HR"]
        n1 = hr_relative_stats(new[i : i + 1], hr[i : i + 1])["noise/HR"]
        rows.append((p1 - p0, tex[i].item(), p0, n0, n1))
    rows.sort()
    d, t = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    print(f"{a.set}: {len(rows)} crops, M = {a.m}: ΔPSNR-Y mean {d.mean():+.3f} dB, median {d.median():+.3f}, "
          f"below 0: {int((d < 0).sum())}; corr(ΔPSNR, texture share) {torch.corrcoef(torch.stack([d, t]))[0, 1]:+.2f}")
    k = min(a.show, len(rows) // 2)
    for r in rows[:k] + [None] + rows[-k:]:
        if r is None:
            print("  ...")
        else:
            print(f"  ΔPSNR {r[0]:+.3f}  texture share {r[1]:.2f}  reference {r[2]:.2f} dB  noise/HR {r[3]:.2f} -> {r[4]:.2f}")


if __name__ == "__main__":
    main()
