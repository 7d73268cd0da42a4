"""DP²O-SR on the tiny policy: does alignment shrink the per-image spread over seeds?

Runs the demo's offline pipeline (generate M=16 candidates per LR with the frozen reference,
score, train DP²O and Diffusion-DPO) for one sampler setting and prints, on the held-out crops,
Mean@M / Worst@M / per-image reward std (M = 16) of the reference and both aligned policies.

    python benchmarks/dp2o_spread.py --start 1.0 --out runs/spread_s10

``--start`` is the noise level the tiny policy's ODE starts from (the shipped default 0.5
starts from a half-noised bicubic residual; 1.0 is pure noise, as the paper's models sample).
A long run (minutes on 2 CPU cores), not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sralign.data.store import CandidateStore
from sralign.eval.run import EvalConfig, run_eval
from sralign.policies import load_policy
from sralign.train.candidates import GenerateConfig, LRSetConfig, generate, score_store
from sralign.train.offline import OfflineTrainer
from sralign.train.offline_config import DP2OConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--n-lr", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=5000.0)
    ap.add_argument("--t-max", type=float, default=1.0)
    ap.add_argument("--methods", default="dp2o,dpo")
    ap.add_argument("--out", default="runs/spread")
    ap.add_argument("--store", default=None, help="reuse this candidate store (default OUT/store)")
    a = ap.parse_args()
    out = Path(a.out)
    t0 = time.time()

    def policy():
        p = load_policy()
        p.config.ode_start = a.start
        return p

    gen = GenerateConfig(m=a.m, steps=10, lr_set=LRSetConfig(n=a.n_lr, patch=64))
    store = CandidateStore(a.store or out / "store", create=True)
    generate(store, policy(), gen, progress=False)
    base = DP2OConfig()
    score_store(store, sorted(set(base.fr_metrics + base.nr_metrics)), progress=False)
    pols, samplers = {}, {}
    for method in a.methods.split(","):
        torch.manual_seed(0)
        pol = policy()
        cfg = DP2OConfig(method=method, steps=a.steps, n=a.n, lr=a.lr, beta=a.beta, t_max=a.t_max)
        OfflineTrainer(pol, store, cfg, out / "runs" / method).train(resume=True, progress=False)
        pols[method], samplers[method] = pol, "ode"
    res = run_eval(pols, EvalConfig(m=16), out / "eval", samplers=samplers, progress=False)
    held = {m: {k: round(v["mean"], 4) for k, v in d.items()} for m, d in res.metrics.items()}
    rows = {label: {"mean@M": round(c["mean"][-1], 4), "worst@M": round(c["worst"][-1], 4),
                    "std/img": round(res.reward_std[label], 4),
                    **{f"{k}_std/img": round(v[label]["std_per_image"], 4) for k, v in res.metrics.items()}}
            for label, c in res.reward.items()}
    print(json.dumps({"args": vars(a), "rows": rows, "metric_means": held, "win_rate": res.win_rate, "wall_s": round(time.time() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
