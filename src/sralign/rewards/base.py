"""The contracts of the reward side: ``Metric`` (one IQA measure) and ``RewardOut``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Metric(Protocol):
    name: str
    kind: Literal["FR", "NR"]
    higher_is_better: bool

    def __call__(self, sr: Tensor, hr: Tensor | None = None) -> Tensor:
        """sr (and hr for FR) [B,3,H,W] in [0,1] -> scores [B]."""
        ...


class MetricError(ValueError):
    """A metric produced NaN/inf or was called wrongly; the message names the metric."""


@dataclass
class FunctionMetric:
    """A ``Metric`` made from a batched function ``fn(sr, hr) -> [B]`` (FR) or ``fn(sr) -> [B]`` (NR)."""

    name: str
    kind: Literal["FR", "NR"]
    higher_is_better: bool
    fn: Callable[..., Tensor]
    min_size: int = 8
    description: str = ""

    def __call__(self, sr: Tensor, hr: Tensor | None = None) -> Tensor:
        if sr.dim() != 4 or sr.shape[1] != 3:
            raise MetricError(f"metric {self.name}: sr must be [B,3,H,W], got {tuple(sr.shape)}")
        if min(sr.shape[-2:]) < self.min_size:
            raise MetricError(f"metric {self.name}: needs images of at least {self.min_size}x{self.min_size} px, got {sr.shape[-1]}x{sr.shape[-2]}")
        if self.kind == "FR":
            if hr is None:
                raise MetricError(f"metric {self.name} is full-reference: pass hr (e.g. `sralign score SR --hr HR_DIR`)")
            if hr.shape != sr.shape:
                raise MetricError(f"metric {self.name}: sr {tuple(sr.shape)} and hr {tuple(hr.shape)} differ in shape")
            out = self.fn(sr, hr)
        else:
            out = self.fn(sr)
        return out.reshape(-1).float()


@dataclass
class RewardOut:
    """A group reward.

    Attributes:
        total: [n,G] the reward that ranks the group.
        per_metric: raw scores per metric name, [n,G] each.
        normalized: direction-aligned, group-min-max-normalised scores per metric, [n,G] in [0,1].
    """

    total: Tensor
    per_metric: dict[str, Tensor] = field(default_factory=dict)
    normalized: dict[str, Tensor] = field(default_factory=dict)
