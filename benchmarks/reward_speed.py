"""Default hybrid reward throughput: 64 images of 128×128 scored as 8 groups of 8, batched vs a
per-image loop, same process.

    python benchmarks/reward_speed.py [--threads 2]
"""

import argparse
import time

import torch

from sralign.rewards.hybrid import HybridReward, score_group


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(8, 3, 128, 128, generator=g)
    sr = (hr[:, None] + 0.05 * torch.randn(8, 8, 3, 128, 128, generator=g)).clamp(0, 1)
    rw = HybridReward.from_names(["psnr", "grad_fidelity"], ["brisque", "sharpness"])
    rw(sr[:1, :2], hr[:1])  # warm-up (loads the BRISQUE model)
    t = time.perf_counter()
    rw(sr, hr)
    tb = time.perf_counter() - t
    t = time.perf_counter()
    raw = {m: torch.empty(8, 8) for m in rw.names}
    for i in range(8):
        for j in range(8):
            s = score_group(rw.metrics, sr[i : i + 1, j : j + 1], hr[i : i + 1])
            for m in rw.names:
                raw[m][i, j] = s[m][0, 0]
    rw.from_scores(raw)
    tl = time.perf_counter() - t
    print(f"threads={a.threads}, 64 images 128x128, reward = {', '.join(rw.names)}")
    print(f"  batched   : {64 / tb:7.1f} images/s")
    print(f"  per-image : {64 / tl:7.1f} images/s")
    print(f"  ratio     : x{tl / tb:.2f}")
    for m in rw.metrics:
        t = time.perf_counter()
        m(sr.flatten(0, 1), hr.repeat_interleave(8, 0) if m.kind == "FR" else None)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        for k in range(64):
            m(sr.flatten(0, 1)[k : k + 1], hr[k // 8 : k // 8 + 1] if m.kind == "FR" else None)
        t2 = time.perf_counter() - t
        print(f"    {m.name:14s} batched {64 / t1:8.1f} img/s, loop {64 / t2:8.1f} img/s, x{t2 / t1:.1f}")


if __name__ == "__main__":
    main()
