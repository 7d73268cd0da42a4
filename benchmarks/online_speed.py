"""How much faster are DGPO and GDPO-SR than the Flow-GRPO baseline? (issue: the speed claim)

All three methods start from the shipped tiny policy, use the same hybrid reward (built-in
metrics) and the same training LR crops. GRPO runs for a fixed budget of steps; then DGPO and
GDPO run until they reach the reward *gain* GRPO ended at (or their own budget runs out).
Every ``--eval-every`` steps the current policy is scored on fixed held-out LR crops with fixed
noise (outside the timed region), with the trained reward pooled with the reference's samples
(see ``Level``); DGPO and GRPO are evaluated with the deterministic ``ode`` sampler, GDPO with
its ``onestep`` mode, each against the reference under the same sampler.

    python benchmarks/online_speed.py [--grpo-steps 40] [--max-steps 80] [--threads 2]

Prints wall time (training only) and reward evaluations to reach GRPO's final gain, and the
ratios GRPO / method.
"""

import argparse
import json

import torch

from sralign.config import load_config
from sralign.eval.bestof import sample_groups
from sralign.policies import load_policy
from sralign.rewards.hybrid import score_group
from sralign.train.candidates import LRSetConfig, make_lr_set
from sralign.train.online import OnlineTrainer, build_reward
from sralign.train.online_config import DGPOConfig, GDPOConfig, GRPOConfig


class Level:
    """The trained reward on fixed eval LR crops with fixed noise: the current policy's samples
    are pooled with the reference's (same sampler, same seeds) and normalised per LR exactly as
    in training; gain = mean reward of the policy's half − mean of the reference's half
    (0 at the start, at most 1)."""

    def __init__(self, reward, lr, hr, sampler, steps, m=4):
        self.reward, self.lr, self.hr, self.sampler, self.steps, self.m = reward, lr, hr, sampler, steps, m
        self.ref_raw = self._raw(load_policy())

    def _raw(self, policy):
        with torch.no_grad():
            x = sample_groups(policy, self.lr, self.m, sampler=self.sampler, steps=self.steps, seed=777)
        return score_group(self.reward.metrics, x, self.hr)

    def gain(self, policy) -> float:
        raw = self._raw(policy)
        pooled = {k: torch.cat([self.ref_raw[k], raw[k]], dim=1) for k in raw}
        total = self.reward.from_scores(pooled).total
        return float(total[:, self.m :].mean() - total[:, : self.m].mean())


def run(method_cfg, level: Level, eval_every: int, target: float | None, tag: str):
    trainer = OnlineTrainer(load_policy(), method_cfg, f"runs/bench_online/{tag}")
    curve = [(0, 0.0, 0, 0.0)]
    hit = {}

    def cb(tr):
        if tr.step % eval_every == 0 or tr.step == method_cfg.steps_total:
            g = level.gain(tr.policy)
            curve.append((tr.step, tr.elapsed, tr.reward_evals, g))
            print(f"  {tag:5s} step {tr.step:4d}  train {tr.elapsed:7.1f} s  reward evals {tr.reward_evals:6d}  gain {g:+.4f}", flush=True)
            if target is not None and g >= target and not hit:
                hit.update(step=tr.step, seconds=tr.elapsed, evals=tr.reward_evals)
                return True  # stop here

    trainer.train(progress=False, callback=cb)
    return curve, hit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grpo-steps", type=int, default=40)
    ap.add_argument("--max-steps", type=int, default=80)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_online/result.json")
    ap.add_argument("--dgpo", nargs="*", default=[], help="DGPOConfig key=value overrides")
    ap.add_argument("--gdpo", nargs="*", default=[], help="GDPOConfig key=value overrides")
    ap.add_argument("--grpo", nargs="*", default=[], help="GRPOConfig key=value overrides")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = make_lr_set(LRSetConfig(split="heldout", n=6, patch=64, seed=99))
    lr, hr = torch.stack([d[1] for d in data]), torch.stack([d[2] for d in data])
    common = dict(batch_lr=2, checkpoint_every=10**6)
    grpo = load_config(GRPOConfig, None, a.grpo, base=GRPOConfig(steps_total=a.grpo_steps, **common))
    dgpo = load_config(DGPOConfig, None, a.dgpo, base=DGPOConfig(steps_total=a.max_steps, **common))
    gdpo = load_config(GDPOConfig, None, a.gdpo, base=GDPOConfig(steps_total=a.max_steps, reward="hybrid", **common))
    reward = build_reward(grpo)
    lv_ode = Level(reward, lr, hr, "ode", grpo.steps)
    lv_one = Level(reward, lr, hr, "onestep", 1)
    print(f"GRPO for {a.grpo_steps} steps (fixed budget)")
    g_curve, _ = run(grpo, lv_ode, a.eval_every, None, "grpo")
    target = max(g_curve[-1][3], 1e-3)
    t_grpo, e_grpo = g_curve[-1][1], g_curve[-1][2]
    hit_g = next(((s, t, e) for s, t, e, g in g_curve if g >= target), (g_curve[-1][0], t_grpo, e_grpo))
    print(f"GRPO final gain {g_curve[-1][3]:+.4f}; first reached at step {hit_g[0]} ({hit_g[1]:.1f} s, {hit_g[2]} reward evals)")
    results = {"grpo": {"curve": g_curve, "target_gain": target, "seconds": hit_g[1], "evals": hit_g[2]}}
    for tag, cfg, lv in (("dgpo", dgpo, lv_ode), ("gdpo", gdpo, lv_one)):
        print(f"{tag.upper()} until gain >= {target:+.4f} (at most {a.max_steps} steps)")
        curve, hit = run(cfg, lv, a.eval_every, target, tag)
        results[tag] = {"curve": curve, "hit": hit}
    print("\nsummary (training wall time and reward evaluations to reach GRPO's final gain)")
    print(f"  grpo: {hit_g[1]:8.1f} s  {hit_g[2]:6d} evals")
    for tag in ("dgpo", "gdpo"):
        hit = results[tag]["hit"]
        if hit:
            print(f"  {tag}: {hit['seconds']:8.1f} s  {hit['evals']:6d} evals   speed-up x{hit_g[1] / hit['seconds']:.1f} (time), x{hit_g[2] / hit['evals']:.1f} (reward evals)")
        else:
            best = max(g for *_, g in results[tag]["curve"])
            print(f"  {tag}: did not reach the target within {a.max_steps} steps (best gain {best:+.4f})")
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
