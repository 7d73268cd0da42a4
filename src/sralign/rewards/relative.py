"""No-reference metrics read against the HR: ``gap:NAME`` = −|NAME(SR) − NAME(HR)|.

A raw no-reference score (BRISQUE, NIQE, sharpness) has its optimum wherever its model is
happiest — often at images *more* textured than the truth, so a reward built on it pays for
grain. Its gap to the HR's own score is maximal (0) when the SR looks, to that metric, exactly
like the HR: the optimum is the truth, and over- and under-shooting are punished alike.

The gap needs the HR, so its ``kind`` is "FR" (every caller passes ``hr`` to it), while
``side = "NR"`` tells the hybrid reward that it belongs to the perceptual half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .base import Metric, MetricError


def _consecutive_runs(x: Tensor) -> list[tuple[int, int]]:
    """[(start, stop)] runs of identical consecutive rows of x [B,...] (the HR repeated per group)."""
    if x.shape[0] == 0:
        return []
    same = (x[1:] == x[:-1]).flatten(1).all(1).tolist()
    runs, start = [], 0
    for i, s in enumerate(same, start=1):
        if not s:
            runs.append((start, i))
            start = i
    runs.append((start, x.shape[0]))
    return runs


@dataclass
class HRRelativeMetric:
    """−|base(sr) − base(hr)| (higher is better, 0 at the HR's own score); [B].

    ``base`` is any no-reference metric. Consecutive identical HR rows (a group's HR repeated
    G times) are scored once."""

    base: Metric
    kind: Literal["FR", "NR"] = "FR"
    side: Literal["FR", "NR"] = "NR"
    higher_is_better: bool = True

    def __post_init__(self):
        if self.base.kind != "NR":
            raise MetricError(f"gap:{self.base.name}: {self.base.name} is full-reference already; gap: takes a no-reference metric")

    @property
    def name(self) -> str:
        return f"gap:{self.base.name}"

    @property
    def description(self) -> str:
        return f"-|{self.base.name}(SR) - {self.base.name}(HR)|"

    def hr_scores(self, hr: Tensor) -> Tensor:
        """base(hr) [B], each run of identical rows scored once."""
        out = torch.empty(hr.shape[0])
        for a, b in _consecutive_runs(hr):
            out[a:b] = self.base(hr[a : a + 1]).float().reshape(-1)[0]
        return out

    def __call__(self, sr: Tensor, hr: Tensor | None = None) -> Tensor:
        if hr is None:
            raise MetricError(f"metric {self.name} reads {self.base.name} against the HR: pass hr (e.g. `sralign score SR --hr HR_DIR`)")
        if hr.shape != sr.shape:
            raise MetricError(f"metric {self.name}: sr {tuple(sr.shape)} and hr {tuple(hr.shape)} differ in shape")
        s = self.base(sr).float().reshape(-1)
        return -(s - self.hr_scores(hr).to(s.device)).abs()


def needs_hr(metric: Metric) -> bool:
    return metric.kind == "FR"


def side_of(metric: Metric) -> str:
    """Which half of a hybrid reward the metric belongs to: "FR" (fidelity) or "NR" (perception)."""
    return getattr(metric, "side", metric.kind)
