"""Real-ESRGAN degradation throughput: 256×256 HR patches per second, batched vs one-by-one.

    python benchmarks/degradation_speed.py [--n 32] [--threads 2]
"""

import argparse
import time

import torch

from sralign.data.degradation import RealESRGANDegradation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    deg = RealESRGANDegradation()
    hr = torch.rand(a.n, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    deg(hr[:2], torch.Generator().manual_seed(0))
    t = time.perf_counter()
    deg(hr, torch.Generator().manual_seed(1))
    tb = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(a.n):
        deg(hr[i : i + 1], torch.Generator().manual_seed(i))
    ts = time.perf_counter() - t
    print(f"threads={a.threads}, {a.n} patches of 256x256 -> 64x64")
    print(f"  batched   : {a.n / tb:7.1f} patches/s")
    print(f"  one-by-one: {a.n / ts:7.1f} patches/s")
    print(f"  ratio     : x{ts / tb:.2f}")


if __name__ == "__main__":
    main()
