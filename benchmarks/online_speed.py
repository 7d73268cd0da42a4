"""How much faster are DGPO and GDPO-SR than the Flow-GRPO baseline? (issue: the speed claim)

All three methods start from the shipped tiny policy, use the same hybrid reward (built-in
metrics) and the same training LR crops. GRPO runs for a fixed budget of steps; then DGPO and
GDPO run until they reach the reward *gain* GRPO ended at (or their own budget runs out).
Every ``--eval-every`` steps the current policy is scored on fixed held-out LR crops with fixed
noise (outside the timed region), with the trained reward pooled with the reference's samples
(see ``Level``); DGPO and GRPO are evaluated with the deterministic ``ode`` sampler, GDPO with
its ``onestep`` mode, each against the reference under the same sampler.

    python benchmarks/online_speed.py [--settings today|papers|both] [--grpo-steps 40] [--max-steps 80] [--threads 2]

Two settings:
    today   sralign's defaults: 4-step rollouts; GRPO trains all 4 SDE transitions with one update
            per rollout batch; DGPO one t ~ U[0.3, 1] per group, exact-form loss, β 5000; GDPO-SR
            as well.
    papers  ``preset=authors``: Flow-GRPO with 10-step SDE rollouts, trained on int(0.99·10) = 9
            transitions, 2 PPO updates per rollout batch, KL divided by σ_t²; DGPO with 10-step
            ODE rollouts and 4 discrete high-noise timesteps (of the schedule's 7 noisiest) shared
            by the batch, weighted loss at β 100, DSM clip 1e-2, KL 0.02. Both evaluated with the
            10-step ODE.

Prints wall time (training only) and reward evaluations to reach GRPO's final gain, the ratios
GRPO / method, and the split of the time ratio into (seconds per step) × (steps).
"""

import argparse
import json
import time
from pathlib import Path

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


def run(method_cfg, level: Level, eval_every: int, target: float | None, tag: str, folder: str = "runs/bench_online"):
    trainer = OnlineTrainer(load_policy(), method_cfg, f"{folder}/{tag}")
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


def configs(setting: str, a) -> dict:
    common = dict(batch_lr=2, checkpoint_every=10**6)
    if setting == "today":
        return {
            "grpo": load_config(GRPOConfig, None, a.grpo, base=GRPOConfig(steps_total=a.grpo_steps, **common)),
            "dgpo": load_config(DGPOConfig, None, a.dgpo, base=DGPOConfig(steps_total=a.max_steps, **common)),
            "gdpo": load_config(GDPOConfig, None, a.gdpo, base=GDPOConfig(steps_total=a.max_steps, reward="hybrid", **common)),
        }
    return {  # the authors' conventions (see the AUTHORS tables in train/online_config.py)
        "grpo": load_config(GRPOConfig, None, a.grpo, base=GRPOConfig.with_preset("authors", steps_total=a.grpo_steps, **common)),
        "dgpo": load_config(DGPOConfig, None, a.dgpo, base=DGPOConfig.with_preset("authors", steps_total=a.max_steps, **common)),
    }


def bench(setting: str, a, lr, hr, folder: str) -> dict:
    cfgs = configs(setting, a)
    grpo = cfgs["grpo"]
    reward = build_reward(grpo)
    lv_ode = Level(reward, lr, hr, "ode", grpo.steps)
    lv_one = Level(reward, lr, hr, "onestep", 1) if "gdpo" in cfgs else None
    print(f"== {setting}: GRPO for {grpo.steps_total} steps (fixed budget), {grpo.steps}-step SDE rollouts, "
          f"{max(1, int(grpo.steps * grpo.timestep_fraction))} trained, {grpo.minibatches} update(s) per batch", flush=True)
    g_curve, _ = run(grpo, lv_ode, a.eval_every, None, "grpo", folder)
    final = g_curve[-1][3]
    gained = final > 1e-3
    # GRPO's final gain is the target; when GRPO did not raise the reward at all within its budget
    # the target becomes the smallest positive gain (1e-3), and every speed-up printed is a lower
    # bound: GRPO did not reach that level in its whole budget, which is what it is divided by
    target = final if gained else 1e-3
    t_grpo, e_grpo = g_curve[-1][1], g_curve[-1][2]
    reached = any(g >= target for *_, g in g_curve[1:])  # GRPO got there within its budget (maybe only for a while)
    hit_g = next(((s, t, e) for s, t, e, g in g_curve[1:] if g >= target), (g_curve[-1][0], t_grpo, e_grpo))
    if gained:
        print(f"GRPO final gain {final:+.4f}; first reached at step {hit_g[0]} ({hit_g[1]:.1f} s, {hit_g[2]} reward evals)")
    else:
        s_best, _, _, g_best = max(g_curve[1:], key=lambda r: r[3])
        print(f"GRPO did NOT raise the reward in {g_curve[-1][0]} steps (final gain {final:+.4f}, best {g_best:+.4f} at step {s_best}); "
              f"target: the first positive gain (+0.001)" + (f", which GRPO reached at step {hit_g[0]}" if reached else
              "; GRPO never reached it, so the speed-ups below are lower bounds (GRPO's whole budget / the method's time)"))
    results = {"grpo": {"curve": g_curve, "target_gain": target, "grpo_gained": gained, "step": hit_g[0], "seconds": hit_g[1], "evals": hit_g[2],
                        "s_per_step": t_grpo / max(1, g_curve[-1][0])}}
    for tag in [k for k in ("dgpo", "gdpo") if k in cfgs]:
        cfg = cfgs[tag]
        lv = lv_one if cfg.sampler == "onestep" else lv_ode
        print(f"{tag.upper()} until gain >= {target:+.4f} (at most {cfg.steps_total} steps)", flush=True)
        curve, hit = run(cfg, lv, a.eval_every, target, tag, folder)
        last = curve[-1]
        results[tag] = {"curve": curve, "hit": hit, "s_per_step": last[1] / max(1, last[0])}
    print(f"\nsummary [{setting}] (training wall time and reward evaluations to reach GRPO's final gain {target:+.4f})")
    print(f"  grpo: {hit_g[1]:8.1f} s  {hit_g[2]:6d} evals  step {hit_g[0]:3d}  {results['grpo']['s_per_step']:.2f} s/step")
    for tag in [k for k in ("dgpo", "gdpo") if k in cfgs]:
        hit, sps = results[tag]["hit"], results[tag]["s_per_step"]
        if hit:
            ratio = hit_g[1] / hit["seconds"]
            ge = "x" if reached else ">= x"
            print(f"  {tag}: {hit['seconds']:8.1f} s  {hit['evals']:6d} evals  step {hit['step']:3d}  {sps:.2f} s/step   "
                  f"speed-up {ge}{ratio:.1f} (time), {ge}{hit_g[2] / hit['evals']:.1f} (reward evals) = "
                  f"x{results['grpo']['s_per_step'] / sps:.1f} (s/step) · x{hit_g[0] / hit['step']:.1f} (steps)")
            results[tag]["speedup_time"] = ratio
            results[tag]["speedup_is_lower_bound"] = not reached
        else:
            best = max(g for *_, g in results[tag]["curve"])
            print(f"  {tag}: did not reach the target within {cfgs[tag].steps_total} steps (best gain {best:+.4f}); "
                  f"s/step ratio x{results['grpo']['s_per_step'] / sps:.1f}")
    return results


def cost(a) -> dict:
    """Seconds per training step and reward evaluations per step of GRPO and DGPO under both
    settings (no evaluation runs): the structural part of the speed-up, cheap enough for a loaded
    CPU. Methods alternate step by step so that they share the machine's load."""
    out = {}
    for setting in ("today", "papers"):
        cfgs = configs(setting, a)
        trainers = {}
        for tag in ("grpo", "dgpo"):
            c = cfgs[tag]
            c.steps_total, c.batch_lr, c.lr_set = a.cost_steps, a.cost_batch, LRSetConfig(n=8, patch=a.cost_patch)
            trainers[tag] = OnlineTrainer(load_policy(), c, f"{Path(a.out).parent}/cost_{setting}_{tag}")
        cpu = {tag: 0.0 for tag in trainers}
        for k in range(1, a.cost_steps + 1):
            for tag, tr in trainers.items():
                tr.cfg.steps_total = k
                c0 = time.process_time()
                tr.train(resume=k > 1, progress=False)
                cpu[tag] += time.process_time() - c0
        row = {tag: {"s_per_step": tr.elapsed / a.cost_steps, "cpu_s_per_step": cpu[tag] / a.cost_steps,
                     "evals_per_step": tr.reward_evals / a.cost_steps} for tag, tr in trainers.items()}
        row["ratio"] = row["grpo"]["s_per_step"] / row["dgpo"]["s_per_step"]
        row["cpu_ratio"] = row["grpo"]["cpu_s_per_step"] / row["dgpo"]["cpu_s_per_step"]
        out[setting] = row
        print(f"[cost {setting}] wall: grpo {row['grpo']['s_per_step']:.2f} s/step, dgpo {row['dgpo']['s_per_step']:.2f} s/step (x{row['ratio']:.1f}); "
              f"CPU time: grpo {row['grpo']['cpu_s_per_step']:.2f}, dgpo {row['dgpo']['cpu_s_per_step']:.2f} (x{row['cpu_ratio']:.1f}) "
              f"({a.cost_batch}×G LR crops of {a.cost_patch}², {a.cost_steps} step(s); CPU time includes checkpoint writes)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", choices=("today", "papers", "both"), default="both")
    ap.add_argument("--grpo-steps", type=int, default=40)
    ap.add_argument("--max-steps", type=int, default=80)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_online/result.json")
    ap.add_argument("--dgpo", nargs="*", default=[], help="DGPOConfig key=value overrides")
    ap.add_argument("--gdpo", nargs="*", default=[], help="GDPOConfig key=value overrides")
    ap.add_argument("--grpo", nargs="*", default=[], help="GRPOConfig key=value overrides")
    ap.add_argument("--cost-only", action="store_true", help="only seconds per step of GRPO and DGPO in both settings")
    ap.add_argument("--cost-steps", type=int, default=2)
    ap.add_argument("--cost-batch", type=int, default=1)
    ap.add_argument("--cost-patch", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.cost_only:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        res = cost(a)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    data = make_lr_set(LRSetConfig(split="heldout", n=6, patch=64, seed=99))
    lr, hr = torch.stack([d[1] for d in data]), torch.stack([d[2] for d in data])
    folder = str(Path(a.out).parent)
    Path(folder).mkdir(parents=True, exist_ok=True)
    results = {}
    for setting in (("today", "papers") if a.settings == "both" else (a.settings,)):
        results[setting] = bench(setting, a, lr, hr, f"{folder}/{setting}")
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
