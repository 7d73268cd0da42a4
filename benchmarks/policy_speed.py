"""Tiny-policy sampling speed on this machine: ms per 64×64 output per sampler, and the group
speed-up from encoding the LR once (``condition``) for G = 8 samples.

    python benchmarks/policy_speed.py [--threads 2]
"""

import argparse
import time

import torch

from sralign.policies import load_policy


def bench(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = load_policy()
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(1, 3, 16, 16, generator=g)
    G = 8
    noise = torch.randn(G, 3, 64, 64, generator=g)
    print(f"threads={a.threads}, output 64x64, batch of G={G} per call")
    with torch.no_grad():
        cond = p.condition(lr)
        for sampler, steps in (("ode", 20), ("ode", 10), ("sde", 10), ("onestep", 1)):
            s = bench(lambda: p.sample(cond, noise, sampler=sampler, steps=steps), a.reps)
            print(f"  {sampler:8s} steps={steps:2d}: {1000 * s / G:7.2f} ms per output")
        # group speed-up: condition once for the whole group vs once per sample
        def grouped():
            c = p.condition(lr)
            p.sample(c, noise, sampler="onestep")

        def per_sample():
            for i in range(G):
                c = p.condition(lr)
                p.sample(c, noise[i : i + 1], sampler="onestep")

        def grouped_ode():
            c = p.condition(lr)
            p.sample(c, noise, sampler="ode", steps=10)

        def per_sample_ode():
            for i in range(G):
                c = p.condition(lr)
                p.sample(c, noise[i : i + 1], sampler="ode", steps=10)

        for name, a_fn, b_fn in (("onestep", grouped, per_sample), ("ode-10", grouped_ode, per_sample_ode)):
            ta, tb = bench(a_fn, a.reps), bench(b_fn, a.reps)
            print(f"  group of {G} ({name}): condition once + one batched call {1000 * ta:.1f} ms; "
                  f"per-sample condition + call {1000 * tb:.1f} ms; speed-up x{tb / ta:.2f}")


if __name__ == "__main__":
    main()
