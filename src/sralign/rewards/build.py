"""The reward a training or evaluation config names (``reward``, its metrics and weights)."""

from __future__ import annotations

from typing import Protocol

from .attribute import AttributeReward
from .hybrid import HybridReward


class RewardSettings(Protocol):
    """What a config carries about its reward (``DP2OConfig``, ``OnlineConfig``, ``EvalConfig``)."""

    reward: str
    fr_metrics: list[str]
    nr_metrics: list[str]
    nr_weight: float
    texture_rule: str


def build_reward(cfg: RewardSettings) -> HybridReward | AttributeReward:
    """GDPO-SR's attribute-aware reward (``reward="attribute"``: PSNR-Y on the HR's smooth share,
    ``nr_metrics`` on its textured share under ``texture_rule``; ``fr_metrics`` and ``nr_weight``
    unused) or DP²O-SR's hybrid (``"hybrid"``: ``fr_metrics`` and ``nr_metrics``, the NR side
    weighted ``nr_weight``)."""
    if cfg.reward == "attribute":
        return AttributeReward.from_names(cfg.nr_metrics, rule=cfg.texture_rule)
    if cfg.reward == "hybrid":
        return HybridReward.from_names(cfg.fr_metrics, cfg.nr_metrics, nr_share=cfg.nr_weight)
    raise ValueError(f"reward must be 'attribute' or 'hybrid', got {cfg.reward!r}")
