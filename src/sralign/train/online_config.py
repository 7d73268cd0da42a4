"""Configurations of the online trainer: one dataclass per method (TRL-style config/trainer pair)."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    method: str = "dgpo"
    steps_total: int = 60
    batch_lr: int = 2
    group: int = 8
    lr: float = 1e-4
    beta: float = 5000.0
    grad_clip: float = 1.0
    warmup: int = 5
    weight_decay: float = 0.0
    reward: str = "hybrid"
    fr_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_FR))
    nr_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_NR))
    rollout_from: str = "ema"
    sampler: str = "ode"
    steps: int = 4
    t_min: float = 0.0
    t_max: float = 1.0
    ema_max: float = 0.3
    ema_ramp: float = 0.001
    adv_eps: float = 1e-8
    seed: int = 0
    checkpoint_every: int = 20
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
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    kl_beta: float = 0.04
    noise_level: float = 0.7


METHOD_CONFIGS = {"gdpo": GDPOConfig, "dgpo": DGPOConfig, "grpo": GRPOConfig}
