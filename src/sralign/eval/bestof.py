"""Best@M / Mean@M / Worst@M of a reward and of metrics, reference vs aligned policy.

Both policies sample the same M noises per LR (equal seeds), so "win rate at equal seed" is
well defined. The reward is normalised per LR over the pooled 2M samples (reference and
aligned), so the two policies are ranked on one scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..policies.base import SRPolicy
from ..rewards.hybrid import HybridReward, score_group
from ..rewards.registry import get_metric
from ..train.candidates import candidate_noise


@torch.no_grad()
def sample_groups(policy: SRPolicy, lr: Tensor, m: int, *, sampler: str = "ode", steps: int = 10, seed: int = 0, chunk: int = 16, ids: list[str] | None = None, progress: bool = False, desc: str = "sample") -> Tensor:
    """[n,M,3,H,W]: M seeded samples per LR (noise depends only on seed, LR id and sample index)."""
    ids = ids or [f"eval{i:04d}" for i in range(lr.shape[0])]
    out = []
    for i in tqdm(range(lr.shape[0]), desc=desc, disable=not progress):
        cond = policy.condition(lr[i : i + 1])
        shape = policy.noise_shape(cond)[1:]
        imgs = []
        for s0 in range(0, m, chunk):
            seeds = list(range(s0, min(m, s0 + chunk)))
            noise = candidate_noise(shape, seed, ids[i], seeds)
            imgs.append(policy.sample(cond, noise, sampler=sampler, steps=steps).images.cpu())
        out.append(torch.cat(imgs))
    return torch.stack(out)


def best_mean_worst(r: Tensor, higher_is_better: bool = True) -> dict[str, list[float]]:
    """Curves over M' = 1…M of r [n,M] (first M' seeds), averaged over images."""
    a = r if higher_is_better else -r
    best, mean, worst = [], [], []
    for k in range(1, r.shape[1] + 1):
        sub = a[:, :k]
        sgn = 1 if higher_is_better else -1
        best.append(float(sgn * sub.max(1).values.mean()))
        mean.append(float(sgn * sub.mean(1).mean()))
        worst.append(float(sgn * sub.min(1).values.mean()))
    return {"best": best, "mean": mean, "worst": worst}


@dataclass
class EvalResult:
    m: int
    reward_names: list[str]
    heldout_metrics: list[str]
    reward: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # policy -> curves
    reward_std: dict[str, float] = field(default_factory=dict)  # mean per-image std
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # metric -> policy -> stats
    win_rate: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_policies(
    policies: dict[str, SRPolicy | tuple[SRPolicy, bool]],
    hr: Tensor,
    lr: Tensor,
    reward: HybridReward,
    heldout_metrics: list[str],
    m: int = 16,
    sampler: str = "ode",
    steps: int = 10,
    seed: int = 1000,
    progress: bool = False,
) -> tuple[EvalResult, dict[str, Tensor]]:
    """Sample M seeds per held-out LR from each policy; curves and per-metric statistics.

    ``policies`` maps a label to a policy, or to (policy, use_reference) to evaluate its frozen
    reference. The first label is the baseline for win rates. Returns the result and samples.
    """
    samples = {}
    for name, spec in policies.items():
        pol, use_ref = spec if isinstance(spec, tuple) else (spec, False)
        if use_ref:
            with pol.reference():
                samples[name] = sample_groups(pol, lr, m, sampler=sampler, steps=steps, seed=seed, progress=progress, desc=f"eval {name}")
        else:
            samples[name] = sample_groups(pol, lr, m, sampler=sampler, steps=steps, seed=seed, progress=progress, desc=f"eval {name}")
    names = list(samples)
    extra = [get_metric(n) for n in heldout_metrics]
    raw = {k: score_group([*reward.metrics, *extra], v, hr) for k, v in samples.items()}
    pooled = {mn: torch.cat([raw[k][mn] for k in names], dim=1) for mn in reward.names}
    total = reward.from_scores(pooled).total
    res = EvalResult(m=m, reward_names=reward.names, heldout_metrics=[x.name for x in extra])
    per = {}
    for i, k in enumerate(names):
        r = total[:, i * m : (i + 1) * m]
        per[k] = r
        res.reward[k] = best_mean_worst(r)
        res.reward_std[k] = float(r.std(1).mean())
    base = names[0]
    for k in names[1:]:
        res.win_rate[k] = float((per[k] > per[base]).float().mean() + 0.5 * (per[k] == per[base]).float().mean())
    for metric in [*reward.metrics, *extra]:
        res.metrics[metric.name] = {}
        for k in names:
            v = raw[k][metric.name]
            curves = best_mean_worst(v, metric.higher_is_better)
            res.metrics[metric.name][k] = {
                "mean": float(v.mean()), "std_per_image": float(v.std(1).mean()),
                "best@M": curves["best"][-1], "worst@M": curves["worst"][-1],
                "higher_is_better": metric.higher_is_better, "in_reward": metric.name in reward.names,
            }
    return res, samples
