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


def check_reward_settings(cfg: RewardSettings) -> str | None:
    """The configs' cross-check of their reward: a problem (one line) or None. The attribute
    reward needs NR metrics; the hybrid needs any metric; every name must exist on its side."""
    from ..config import check_metric_names

    if cfg.reward == "attribute":
        if not cfg.nr_metrics:
            return "nr_metrics is empty; the attribute reward's texture side needs at least one NR metric"
        return check_metric_names("nr_metrics", cfg.nr_metrics, "NR")
    if not cfg.fr_metrics and not cfg.nr_metrics:
        return "fr_metrics and nr_metrics are both empty; the reward needs at least one metric (e.g. fr_metrics=[psnr])"
    return check_metric_names("fr_metrics", cfg.fr_metrics, "FR") or check_metric_names("nr_metrics", cfg.nr_metrics, "NR")


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
