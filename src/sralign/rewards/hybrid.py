"""Group rewards: DP²O-SR's hybrid FR+NR reward and per-group normalisation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import Metric, MetricError, RewardOut
from .registry import get_metric
from .relative import needs_hr, side_of


def check_finite(name: str, scores: Tensor) -> Tensor:
    """Raise ``MetricError`` naming the metric (and the first bad group/member) on NaN/inf."""
    bad = ~torch.isfinite(scores)
    if bad.any():
        pos = bad.nonzero()[0].tolist()
        raise MetricError(f"metric {name} returned {float(scores[tuple(pos)])} at position {pos} (group, member); "
                          f"check the image for constant or empty content, or drop the metric")
    return scores


def group_minmax(x: Tensor, higher_is_better: bool = True) -> Tensor:
    """Direction-align and min-max normalise each row of x [n,G] to [0,1] (zero range -> 0.5)."""
    a = x if higher_is_better else -x
    lo = a.amin(dim=1, keepdim=True)
    hi = a.amax(dim=1, keepdim=True)
    rng = hi - lo
    flat = rng <= 1e-12 * hi.abs().clamp_min(1.0)
    return torch.where(flat, torch.full_like(a, 0.5), (a - lo) / torch.where(flat, torch.ones_like(rng), rng))


def score_group(metrics: list[Metric], sr: Tensor, hr: Tensor | None) -> dict[str, Tensor]:
    """Raw scores [n,G] of every metric on sr [n,G,3,H,W] (hr [n,3,H,W] repeated for FR)."""
    n, g = sr.shape[:2]
    flat = sr.reshape(n * g, *sr.shape[2:])
    hr_rep = hr.repeat_interleave(g, dim=0) if hr is not None else None
    out = {}
    for m in metrics:
        s = m(flat, hr_rep if m.kind == "FR" else None).reshape(n, g)
        out[m.name] = check_finite(m.name, s)
    return out


# The built-in default reward (no downloads). Every term is optimal at SR = HR: MS-SSIM, GMSD and
# the patch-wise gradient-energy ratio are full-reference, BRISQUE and NIQE-s are read as the gap
# to the HR's own score. PSNR stays out of it, so an evaluation can hold it out as the fidelity
# check (SSIM is MS-SSIM's finest scale: only partly held out). The gradient term is patch-wise
# (8×8) so that grain in flat areas cannot pay for blur elsewhere (benchmarks/reward_choice.py,
# the demo's training crops: the one-ratio ``grad_fidelity`` hybrid preferred noisier candidates,
# Δnoise/HR +0.021; this one +0.003). MS-SSIM was added because what a policy *trained* on the
# hybrid does differs from what the hybrid prefers among candidates: without it, DP²O-SR trained
# on GMSD + gradient term + NR gaps lost PSNR on both selection sets (benchmarks/choose_steps.py:
# the demo's training crops and the selection photographs, never a reporting set).
DEFAULT_FR = ("ms_ssim", "gmsd", "local_grad_fidelity")
DEFAULT_NR = ("gap:brisque", "gap:niqe_s")
#: the NR side's share of the default hybrid (the FR side gets the rest)
DEFAULT_NR_WEIGHT = 0.5


@dataclass
class HybridReward:
    """DP²O-SR's hybrid reward: R = w_fr·mean(norm FR) + w_nr·mean(norm NR).

    Each metric is direction-aligned and min-max normalised *within each LR's group*. With only
    FR (or only NR) metrics the reward is that side's mean. ``metric_weights`` weight metrics
    inside their side (default 1 each). Paper: FR = LPIPS, TOPIQ-FR, A-FINE-FR; NR = MANIQA,
    MUSIQ, CLIPIQA+, TOPIQ-NR, A-FINE-NR, Q-Align. The built-in default (``DEFAULT_FR`` /
    ``DEFAULT_NR``) needs no downloads and has its optimum at the HR: every term is best at
    SR = HR (the NR half reads BRISQUE and NIQE-s against the HR's own scores, ``gap:``).
    """

    fr: list[Metric] = field(default_factory=list)
    nr: list[Metric] = field(default_factory=list)
    fr_weight: float = 0.5
    nr_weight: float = 0.5
    metric_weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_names(cls, fr: list[str], nr: list[str], nr_share: float | None = None, **kw) -> "HybridReward":
        """The hybrid of registered metrics by name; ``nr_share`` in [0, 1] sets
        ``nr_weight = nr_share`` and ``fr_weight = 1 − nr_share`` (None: the given weights)."""
        if nr_share is not None:
            if not 0.0 <= nr_share <= 1.0:
                raise MetricError(f"nr_share must lie in [0, 1], got {nr_share}")
            kw.update(fr_weight=1.0 - nr_share, nr_weight=nr_share)
        fm, nm = [get_metric(n) for n in fr], [get_metric(n) for n in nr]
        for m in fm:
            if side_of(m) != "FR":
                raise MetricError(f"{m.name} is a no-reference metric; list it under the NR set")
        for m in nm:
            if side_of(m) != "NR":
                raise MetricError(f"{m.name} is a full-reference metric; list it under the FR set")
        return cls(fm, nm, **kw)

    @property
    def metrics(self) -> list[Metric]:
        return [*self.fr, *self.nr]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.metrics]

    def __call__(self, sr: Tensor, hr: Tensor | None = None) -> RewardOut:
        if hr is None and any(needs_hr(m) for m in self.metrics):
            raise MetricError("the hybrid reward has FR (or gap:) metrics: pass hr, or use raw NR metrics only")
        return self.from_scores(score_group(self.metrics, sr, hr))

    def ranks(self, raw: dict[str, Tensor], hr: Tensor | None = None) -> RewardOut:
        """``from_scores`` (the HR is not needed once the scores exist; the signature matches
        ``AttributeReward.ranks``)."""
        return self.from_scores(raw)

    def from_scores(self, raw: dict[str, Tensor]) -> RewardOut:
        """The reward from stored raw scores {metric name: [n,G]} (e.g. from a candidate store)."""
        norm = {}
        for m in self.metrics:
            if m.name not in raw:
                raise MetricError(f"no scores for metric {m.name}")
            norm[m.name] = group_minmax(check_finite(m.name, raw[m.name]), m.higher_is_better)

        def side(ms):
            if not ms:
                return None
            w = torch.tensor([self.metric_weights.get(m.name, 1.0) for m in ms])
            stack = torch.stack([norm[m.name] for m in ms])
            return (w[:, None, None] * stack).sum(0) / w.sum()

        f, n = side(self.fr), side(self.nr)
        if f is not None and n is not None:
            total = (self.fr_weight * f + self.nr_weight * n) / (self.fr_weight + self.nr_weight)
        else:
            total = f if f is not None else n
        return RewardOut(total=total, per_metric={k: raw[k] for k in self.names}, normalized=norm)
