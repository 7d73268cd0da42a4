"""Configurations of the online trainer: one dataclass per method (TRL-style config/trainer pair)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_metric_names, ranged
from ..policies.base import SAMPLERS
from ..rewards.hybrid import DEFAULT_FR, DEFAULT_NR
from .candidates import LRSetConfig


@dataclass
class OnlineConfig:
    """Settings shared by the online methods.

    > Data: ``lr_set`` (the pool of training LR crops), ``batch_lr`` LR images per step,
      ``group`` G rollouts per LR.
    > Reward: ``reward`` "attribute" (GDPO-SR) or "hybrid" (DP²O-SR); ``fr_metrics`` /
      ``nr_metrics`` name the metrics (built-in or pyiqa:NAME).
    > Rollouts: ``rollout_from`` "reference" | "ema" | "policy"; ``sampler``, ``steps``.
    > Optimisation: ``lr``, ``beta``, ``grad_clip``, ``warmup``, ``steps_total``.
    > EMA: θ⁻ ← μθ⁻ + (1−μ)θ with μ = min(ema_max, ema_ramp·step) (DGPO's reference code:
      0.3 and 0.001).
    """

    def cross_check(self) -> str | None:
        own = type(self).__dataclass_fields__["method"].default
        if type(self) is not OnlineConfig and self.method != own:
            return f"method {self.method!r} does not fit {type(self).__name__} (method {own!r}); pass --method {self.method} instead"
        if self.t_min > self.t_max:
            return f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})"
        if self.reward == "attribute":
            if not self.nr_metrics:
                return "nr_metrics is empty; the attribute reward's texture side needs at least one NR metric"
            return check_metric_names("nr_metrics", self.nr_metrics, "NR")
        if not self.fr_metrics and not self.nr_metrics:
            return "fr_metrics and nr_metrics are both empty; the reward needs at least one metric (e.g. fr_metrics=[psnr])"
        return (check_metric_names("fr_metrics", self.fr_metrics, "FR")
                or check_metric_names("nr_metrics", self.nr_metrics, "NR"))

    method: str = ranged("dgpo", choices=("gdpo", "dgpo", "grpo"))
    steps_total: int = ranged(60, ge=1)
    batch_lr: int = ranged(2, ge=1)
    group: int = ranged(8, ge=2)
    lr: float = ranged(1e-4, gt=0)
    beta: float = ranged(5000.0, gt=0)
    grad_clip: float = ranged(1.0, gt=0)
    warmup: int = ranged(5, ge=0)
    weight_decay: float = ranged(0.0, ge=0)
    reward: str = ranged("hybrid", choices=("hybrid", "attribute"))
    fr_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_FR))
    nr_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_NR))
    rollout_from: str = ranged("ema", choices=("reference", "ema", "policy"))
    sampler: str = ranged("ode", choices=SAMPLERS)
    steps: int = ranged(4, ge=1, le=1000)
    t_min: float = ranged(0.0, ge=0, lt=1)
    t_max: float = ranged(1.0, gt=0, le=1)
    ema_max: float = ranged(0.3, ge=0, le=1)
    ema_ramp: float = ranged(0.001, ge=0)
    adv_eps: float = ranged(1e-8, gt=0)
    seed: int = ranged(0, ge=0)
    checkpoint_every: int = ranged(20, ge=1)
    lr_set: LRSetConfig = field(default_factory=lambda: LRSetConfig(n=32))


@dataclass
class GDPOConfig(OnlineConfig):
    """GDPO-SR: one-step noise-aware rollouts from the reference, attribute-aware reward,
    G = 6, the −½ factor; DSM re-noises at t_noise and queries at t_diff.

    The reference code uses β = 5000 on the ε-MSE of SD latents. The tiny policy's DSM at the
    unequal timestep is the x̂0 error divided by t_diff² (100× larger), and β = 5000 saturates
    the sigmoid within a few steps here (measured: loss ≈ 17–19, no gain); β = 100 is the
    CPU-scale default."""

    method: str = "gdpo"
    group: int = 6
    beta: float = 100.0
    reward: str = "attribute"
    # the attribute reward's texture side scores raw NR metrics (no HR passed to them)
    nr_metrics: list[str] = field(default_factory=lambda: ["brisque", "niqe_s"])
    rollout_from: str = "reference"
    sampler: str = "onestep"
    steps: int = 1


@dataclass
class DGPOConfig(OnlineConfig):
    """DGPO: deterministic ODE rollouts (few steps) from the EMA model, shared t and ε per group,
    t ~ U[t_min, T], |A|-weighted group loss."""

    method: str = "dgpo"
    group: int = 8
    rollout_from: str = "ema"
    sampler: str = "ode"
    steps: int = 4
    t_min: float = 0.3


@dataclass
class GRPOConfig(OnlineConfig):
    """Flow-GRPO on our policy: SDE rollouts (η = noise_level) with per-step log-probs, PPO clip
    1e-4, advantages clamped to ±5, KL to π_ref with weight kl_beta; trains on every step of the
    trajectory (gradients accumulated, one update per rollout batch)."""

    method: str = "grpo"
    group: int = 8
    rollout_from: str = "policy"
    sampler: str = "sde"
    steps: int = 4
    lr: float = 1e-4
    clip_range: float = ranged(1e-4, gt=0)
    adv_clip: float = ranged(5.0, gt=0)
    kl_beta: float = ranged(0.04, ge=0)
    noise_level: float = ranged(0.7, gt=0)


METHOD_CONFIGS = {"gdpo": GDPOConfig, "dgpo": DGPOConfig, "grpo": GRPOConfig}
