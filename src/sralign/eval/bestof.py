"""Best@M / Mean@M / Worst@M of a reward and of metrics, reference vs aligned policy.

Both policies sample the same M noises per LR (equal seeds), so "win rate at equal seed" is
well defined. An aligned policy's change against its reference (ΔMean@M, ΔWorst@M, Δstd/img, win
rate, and the same under the reward it trained on) uses the reward normalised per LR over the
pooled 2M samples of those two rows only, so it does not depend on which other rows an evaluation
holds. The table's Mean@M / Best@M / Worst@M columns put every row on one scale instead
(normalised per LR over all rows' samples): with per-term min-max, adding a row rescales each term,
so differences of those columns can change size and even sign from one evaluation to another.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..policies.base import STOCHASTIC_SAMPLERS, SRPolicy, condition_captioned
from ..rewards.attribute import AttributeReward
from ..rewards.hybrid import HybridReward, score_group
from ..rewards.registry import get_metric
from ..rewards.relative import side_of
from ..train.candidates import candidate_noise
from .hacking import HackingThresholds, hacking_flags, hr_relative_stats


@torch.no_grad()
def sample_groups(policy: SRPolicy, lr: Tensor, m: int, *, sampler: str = "ode", steps: int = 10, seed: int = 0, chunk: int = 16,
                  ids: list[str] | None = None, prompts: list[str | None] | None = None, progress: bool = False, desc: str = "sample") -> Tensor:
    """[n,M,3,H,W]: M seeded samples per LR (noise depends only on seed, LR id and sample index).
    ``prompts``: each LR's caption (or None) for text-conditioned policies."""
    ids = ids or [f"eval{i:04d}" for i in range(lr.shape[0])]
    out = []
    for i in tqdm(range(lr.shape[0]), desc=desc, disable=not progress):
        cond = condition_captioned(policy, lr[i : i + 1], [prompts[i]] if prompts else None)
        shape = policy.noise_shape(cond)[1:]
        imgs = []
        for s0 in range(0, m, chunk):
            seeds = list(range(s0, min(m, s0 + chunk)))
            noise = candidate_noise(shape, seed, ids[i], seeds)
            extra = {"generator": torch.Generator().manual_seed(seed * 7919 + i * 104729 + s0)} if sampler in STOCHASTIC_SAMPLERS else {}
            imgs.append(policy.sample(cond, noise, sampler=sampler, steps=steps, **extra).images.cpu())
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


def seed_std(r: Tensor) -> float:
    """Mean over images of the std over seeds of r [n,M] (Bessel-corrected; 0 for M = 1)."""
    return float(r.std(1).mean()) if r.shape[1] > 1 else 0.0


@dataclass
class EvalResult:
    m: int
    reward_names: list[str]
    heldout_metrics: list[str]
    reward: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # policy -> curves
    reward_std: dict[str, float] = field(default_factory=dict)  # mean per-image std
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # metric -> policy -> stats
    win_rate: dict[str, float] = field(default_factory=dict)
    samplers: dict[str, str] = field(default_factory=dict)
    # reward-hacking diagnostics (eval.hacking): per row incl. "bicubic"
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # row -> {"sharp/HR", "noise/HR"}
    hr_values: dict[str, float] = field(default_factory=dict)  # no-reference metric -> the HR's own mean score
    bicubic: dict[str, float] = field(default_factory=dict)  # metric -> bicubic upsampling's mean score
    flags: dict[str, list[str]] = field(default_factory=dict)  # aligned row -> reasons (empty: none)
    thresholds: dict[str, float] = field(default_factory=dict)
    reward_kind: str = "hybrid"  # "hybrid" (DP²O-SR) or "attribute" (GDPO-SR)
    # aligned row -> {"reward": the reward it trained on, in words; "ΔMean@M", "ΔWorst@M": its change
    # against its reference under that reward, normalised over the two rows (``paired_deltas``)}
    trained: dict[str, dict] = field(default_factory=dict)
    # aligned row -> {"ΔMean@M", "ΔWorst@M", "Δstd/img", "win rate"} against its reference under the
    # table's reward, normalised per LR over the two rows' samples only (``paired_deltas``)
    paired: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def reward_name(reward: HybridReward | AttributeReward) -> str:
    """A reward in a few words, e.g. "attribute (psnr | gap:brisque, gap:niqe_s)" or
    "hybrid, NR ¼ (ms_ssim, gmsd | gap:brisque)"."""
    if isinstance(reward, AttributeReward):
        return f"attribute (psnr | {', '.join(x.name for x in reward.nr)})"
    share = reward.nr_weight / (reward.fr_weight + reward.nr_weight) if reward.fr_weight + reward.nr_weight else 0.0
    return f"hybrid, NR {share:g} ({', '.join(x.name for x in reward.fr)} | {', '.join(x.name for x in reward.nr)})"


def pooled_total(reward: HybridReward | AttributeReward, raw: dict[str, dict[str, Tensor]], names: list[str], hr: Tensor) -> Tensor:
    """``reward`` [n, M·len(names)] over every row's samples pooled (normalised per LR across all
    rows, so rows share one scale); raw {row: {metric: [n,M]}} holds the reward's metrics."""
    return reward.ranks({mn: torch.cat([raw[k][mn] for k in names], dim=1) for mn in reward.names}, hr).total


def row_block(total: Tensor, names: list[str], m: int, row: str) -> Tensor:
    """Row ``row``'s [n,M] block of a reward over every row's samples pooled (``total`` [n, M·len(names)],
    rows in ``names`` order)."""
    i = names.index(row)
    return total[:, i * m : (i + 1) * m]


def paired_deltas(reward: HybridReward | AttributeReward, raw: dict[str, dict[str, Tensor]], hr: Tensor, m: int,
                  row: str, baseline: str) -> dict[str, float]:
    """``row`` against ``baseline`` (same seeds) under ``reward`` normalised per LR over these two
    rows' 2M samples only, so the result does not depend on which other rows are evaluated.

    ``raw``: {row: {metric: [n,M]}} holding the reward's metrics. Returns ΔMean@M, ΔWorst@M and
    Δstd/img (reward units, each term min-max normalised to [0, 1] per LR over the pair) and the win
    rate (share of (LR, seed) where ``row`` scores higher than ``baseline``; ties count ½)."""
    total = pooled_total(reward, raw, [row, baseline], hr)
    cur, base = total[:, :m], total[:, m:]
    c, b = best_mean_worst(cur), best_mean_worst(base)
    return {"ΔMean@M": c["mean"][-1] - b["mean"][-1], "ΔWorst@M": c["worst"][-1] - b["worst"][-1],
            "Δstd/img": seed_std(cur) - seed_std(base),
            "win rate": float((cur > base).float().mean() + 0.5 * (cur == base).float().mean())}


def trained_deltas(reward: HybridReward | AttributeReward, raw: dict[str, dict[str, Tensor]], samples: dict[str, Tensor],
                   hr: Tensor, m: int, row: str, baseline: str) -> dict:
    """``row``'s ΔMean@M and ΔWorst@M against ``baseline`` under ``reward`` (``paired_deltas``:
    normalised per LR over the two rows' samples). ``raw``: {row: {metric: [n,M]}}, extended in
    place with the scores ``reward`` needs and the table lacks; samples {row: [n,M,3,H,W]}."""
    need = [x for x in reward.metrics if x.name not in raw[row]]
    if need:
        for k in (row, baseline):
            raw[k].update(score_group(need, samples[k], hr))
    d = paired_deltas(reward, raw, hr, m, row, baseline)
    return {"reward": reward_name(reward), "ΔMean@M": d["ΔMean@M"], "ΔWorst@M": d["ΔWorst@M"]}


@dataclass
class PolicySpec:
    """One row of an evaluation: a policy (or its frozen reference) with its sampler."""

    policy: SRPolicy
    use_reference: bool = False
    sampler: str = "ode"
    steps: int = 10
    baseline: str | None = None  # label to compute the win rate against (same seeds)


def evaluate_policies(
    specs: dict[str, PolicySpec],
    hr: Tensor,
    lr: Tensor,
    reward: HybridReward | AttributeReward,
    heldout_metrics: list[str],
    m: int = 16,
    seed: int = 1000,
    progress: bool = False,
    prompts: list[str | None] | None = None,
    thresholds: HackingThresholds | None = None,
    trained: dict[str, HybridReward | AttributeReward] | None = None,
) -> tuple[EvalResult, dict[str, Tensor]]:
    """Sample M seeds per held-out LR for every spec; reward curves and per-metric statistics.

    The table's reward (DP²O-SR's hybrid or GDPO-SR's attribute-aware one) is normalised per LR
    over all specs' samples pooled, so rows share one scale; each aligned row's change against its
    baseline and its win rate (``EvalResult.paired``) over those two rows' samples only.
    Beside the policies: the HR's own no-reference scores, bicubic upsampling's scores, each
    row's sharpness and smooth-region noise relative to the HR, and the hacking flags of every
    row that has a baseline (``eval.hacking``).
    ``trained``: {aligned label: the reward it trained on}; each such row's ΔMean@M and ΔWorst@M
    against its baseline under that reward too (``EvalResult.trained``), so a policy trained on
    another reward than the one that ranks the table is also judged by its own.
    Returns the result and the samples ({label: [n,M,3,H,W]}).
    """
    samples = {}
    for name, sp in specs.items():
        ctx = sp.policy.reference() if sp.use_reference else contextlib.nullcontext()
        with ctx:
            samples[name] = sample_groups(sp.policy, lr, m, sampler=sp.sampler, steps=sp.steps, seed=seed, prompts=prompts,
                                          progress=progress, desc=f"eval {name}")
    names = list(samples)
    extra = [get_metric(n) for n in heldout_metrics if n not in reward.names]
    raw = {k: score_group([*reward.metrics, *extra], v, hr) for k, v in samples.items()}
    total = pooled_total(reward, raw, names, hr)
    res = EvalResult(m=m, reward_names=reward.names, heldout_metrics=[x.name for x in extra],
                     reward_kind="attribute" if isinstance(reward, AttributeReward) else "hybrid")
    for k in names:
        r = row_block(total, names, m, k)
        res.reward[k] = best_mean_worst(r)
        res.reward_std[k] = seed_std(r)
    for k, sp in specs.items():
        if sp.baseline is not None:
            res.paired[k] = paired_deltas(reward, raw, hr, m, k, sp.baseline)
            res.win_rate[k] = res.paired[k]["win rate"]
    for k, tr in (trained or {}).items():
        if k not in specs or specs[k].baseline is None:
            raise ValueError(f"trained reward for {k!r}: no aligned row of that name with a reference")
        res.trained[k] = trained_deltas(tr, raw, samples, hr, m, k, specs[k].baseline)
    for metric in [*reward.metrics, *extra]:
        res.metrics[metric.name] = {}
        for k in names:
            v = raw[k][metric.name]
            curves = best_mean_worst(v, metric.higher_is_better)
            res.metrics[metric.name][k] = {
                "mean": float(v.mean()), "std_per_image": seed_std(v),
                "best@M": curves["best"][-1], "worst@M": curves["worst"][-1],
                "higher_is_better": metric.higher_is_better, "in_reward": metric.name in reward.names,
            }
    res.samplers = {k: sp.sampler for k, sp in specs.items()}
    all_metrics = [*reward.metrics, *extra]
    # the truth's own no-reference scores (a gap: metric is 0 there by construction)
    nr = [mt for mt in all_metrics if mt.kind == "NR"]
    hr_raw = score_group(nr, hr[:, None], None) if nr else {}
    res.hr_values = {k: float(v.mean()) for k, v in hr_raw.items()}
    res.hr_values.update({mt.name: 0.0 for mt in all_metrics if mt.kind == "FR" and side_of(mt) == "NR"})
    # bicubic upsampling of the same LR: the floor a generative policy must beat in fidelity
    scale = hr.shape[-1] // lr.shape[-1]
    bic = F.interpolate(lr.float(), scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)[:, None]
    res.bicubic = {k: float(v.mean()) for k, v in score_group(all_metrics, bic, hr).items()}
    for k in names:
        res.stats[k] = hr_relative_stats(samples[k], hr)
    res.stats["bicubic"] = hr_relative_stats(bic, hr)
    th = thresholds or HackingThresholds()
    res.thresholds = asdict(th)
    nr_names = [mt.name for mt in all_metrics if side_of(mt) == "NR"]
    fidelity = {f: f for f in ("psnr", "psnr_rgb", "ssim") if f in res.metrics}
    for k, sp in specs.items():
        if sp.baseline is not None:
            res.flags[k] = hacking_flags(res.metrics, res.stats, k, sp.baseline, nr_names, fidelity, th)
    return res, samples
