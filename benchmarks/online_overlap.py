"""Seconds per online step with step k+1's rollouts overlapped with step k's reward scoring,
against the sequential loop, in one process (GDPO-SR on the shipped tiny policy: rollouts from
the frozen reference, the attribute reward).

    python benchmarks/online_overlap.py                     # 6 steps per run, 3 rounds
    python benchmarks/online_overlap.py --steps 10 --patch 64 --group 6

Runs alternate (sequential, overlapped, sequential, ...) so that a change in the machine's load
hits both alike; each run starts from the same weights and seed and ends with the same
parameters (checked). Also printed: the sequential loop's time split into rollout, reward and
update, since the overlap can save at most min(rollout, reward) per step — and only where a
free core runs the second thread (torch ops release the GIL).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from sralign.policies import load_policy  # noqa: E402
from sralign.train.candidates import LRSetConfig  # noqa: E402
from sralign.train.online import OnlineTrainer  # noqa: E402
from sralign.train.online_config import GDPOConfig  # noqa: E402


def run(overlap: bool, a, tmp: str, split: dict | None = None):
    cfg = GDPOConfig(steps_total=a.steps, batch_lr=a.batch_lr, group=a.group, checkpoint_every=10_000,
                     overlap_rollouts=overlap, lr_set=LRSetConfig(n=16, patch=a.patch))
    tr = OnlineTrainer(load_policy(), cfg, tempfile.mkdtemp(dir=tmp))
    if split is not None:  # time the pieces of the sequential loop
        for name in ("_prepare", "score", "update"):
            fn = getattr(tr, name)

            def timed(*x, _fn=fn, _name=name, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*x, **k)
                finally:
                    split[_name] = split.get(_name, 0.0) + time.perf_counter() - t0
            setattr(tr, name, timed)
    t0 = time.perf_counter()
    tr.train(progress=False)
    wall = time.perf_counter() - t0
    return wall / a.steps, torch.cat([p.detach().flatten() for p in tr.policy.trainable_parameters()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-lr", type=int, default=2)
    ap.add_argument("--group", type=int, default=6)
    ap.add_argument("--patch", type=int, default=64, help="LR crop side; the output is 4x")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seq, ovl, split = [], [], {}
    with tempfile.TemporaryDirectory(prefix="online-overlap-") as tmp:
        run(False, a, tmp)  # warm-up (first-call costs of the metrics and the policy)
        ref = None
        for r in range(a.rounds):
            s, ps = run(False, a, tmp, split)
            o, po = run(True, a, tmp)
            assert torch.equal(ps, po), "overlapped and sequential runs ended with different parameters"
            ref = ps if ref is None else ref
            seq.append(s)
            ovl.append(o)
            print(f"round {r + 1}: sequential {s:.3f} s/step, overlapped {o:.3f} s/step", flush=True)
    n = a.rounds * a.steps
    print(f"GDPO-SR tiny policy, batch_lr {a.batch_lr} x group {a.group}, LR {a.patch}² -> {4 * a.patch}², "
          f"{a.steps} steps x {a.rounds} rounds, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    print("sequential split per step: " + ", ".join(f"{k.strip('_')} {v / n:.3f} s" for k, v in split.items()))
    ms, mo = statistics.median(seq), statistics.median(ovl)
    p, r, u = (split.get(k, 0.0) / n for k in ("_prepare", "score", "update"))
    print(f"median s/step: sequential {ms:.3f}, overlapped {mo:.3f}  (x{ms / mo:.2f}; identical parameters)")
    print(f"bound from the split (the rollout hidden behind scoring + update, a free core assumed): "
          f"x{(p + r + u) / max(p, r + u):.2f}; a measured ratio beyond it is the machine's load changing between runs")


if __name__ == "__main__":
    main()
