"""Candidate generation: candidates/s batched per LR (condition once, M noises in chunks) vs a
naive loop (one condition + one sample call per candidate). Same policy, same seeds.

    python benchmarks/generate_speed.py [--m 16] [--n-lr 4] [--steps 10]
"""

import argparse
import time

import torch

from sralign.policies import load_policy
from sralign.train.candidates import LRSetConfig, candidate_noise, make_lr_set


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--n-lr", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = load_policy()
    data = make_lr_set(LRSetConfig(n=a.n_lr, patch=64))
    with torch.no_grad():
        t = time.perf_counter()
        for lr_id, lr, *_ in data:
            cond = p.condition(lr[None])
            for s0 in range(0, a.m, a.chunk):
                seeds = list(range(s0, min(a.m, s0 + a.chunk)))
                p.sample(cond, candidate_noise((3, 64, 64), 0, lr_id, seeds), steps=a.steps)
        tb = time.perf_counter() - t
        t = time.perf_counter()
        for lr_id, lr, *_ in data:
            for s in range(a.m):
                cond = p.condition(lr[None])
                p.sample(cond, candidate_noise((3, 64, 64), 0, lr_id, [s]), steps=a.steps)
        tn = time.perf_counter() - t
    n = a.n_lr * a.m
    print(f"threads={a.threads}, {a.n_lr} LR x M={a.m}, ode {a.steps} steps, 64x64 outputs")
    print(f"  batched per LR : {n / tb:7.2f} candidates/s")
    print(f"  naive per call : {n / tn:7.2f} candidates/s")
    print(f"  ratio          : x{tn / tb:.2f}")


if __name__ == "__main__":
    main()
