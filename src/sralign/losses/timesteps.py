"""Timestep and noise samplers the trainers share, and the λ_t weighting.

Timesteps are noise levels t in [0,1] (``t = step/1000``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def uniform_timesteps(n: int, generator: torch.Generator | None = None, t_min: float = 0.0, t_max: float = 1.0) -> Tensor:
    """[n] timesteps ~ U[t_min, t_max] (DGPO's timestep clip: t_min > 0 keeps out the
    low-noise steps where few-step rollouts carry artifacts)."""
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
    lo = max(t_min, 1e-3)
    return lo + (t_max - lo) * torch.rand(n, generator=generator)


def group_shared_timesteps(n_groups: int, group: int, generator: torch.Generator | None = None, t_min: float = 0.0, t_max: float = 1.0) -> Tensor:
    """[n_groups·group] timesteps, one draw per group repeated for its members (rows grouped)."""
    return uniform_timesteps(n_groups, generator, t_min, t_max).repeat_interleave(group)


def group_shared_noise(n_groups: int, group: int, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """[n_groups·group, *shape] noise, identical within a group (DGPO's shared noise)."""
    eps = torch.randn((n_groups, *shape), generator=generator)
    return eps.repeat_interleave(group, dim=0)


def timestep_weight(t: Tensor, kind: str = "constant") -> Tensor:
    """λ_t for the DGPO / Diffusion-DPO objectives.

    kind:
        constant   λ_t = 1 (the reference implementations)
        snr        λ_t = ((1 − t)/t)² (signal-to-noise ratio of rectified flow)
        inverse_t  λ_t = 1/t
    """
    t = t.clamp_min(1e-4)
    if kind == "constant":
        return torch.ones_like(t)
    if kind == "snr":
        return ((1 - t) / t) ** 2
    if kind == "inverse_t":
        return 1.0 / t
    raise ValueError(f"unknown timestep weight {kind!r}: choose constant, snr or inverse_t")


def discrete_shared_timesteps(sigmas: Tensor, trunc_steps: int, m: int, generator: torch.Generator | None = None) -> Tensor:
    """DGPO's training timesteps: ``m`` distinct noise levels drawn (without replacement) from the
    rollout schedule's ``trunc_steps + 1`` noisiest ones, ``sigmas[0..trunc_steps]``; every
    sample of the batch trains on all ``m`` of them (the authors draw once per rollout batch and
    share the draw across ranks).

    Args:
        sigmas: [S+1] the rollout sampler's noise levels, from noisy to clean.
        trunc_steps: highest schedule index allowed (authors: 6 with 10 steps; 4 for GenEval).
        m: how many (authors' ``num_train_timesteps``: 4).

    Returns:
        [m] noise levels in [0,1], in draw order.
    """
    if not 0 <= trunc_steps < sigmas.numel() - 1:
        raise ValueError(f"trunc_steps must be in 0..{sigmas.numel() - 2} for a {sigmas.numel() - 1}-step schedule, got {trunc_steps}")
    if not 1 <= m <= trunc_steps + 1:
        raise ValueError(f"need 1 <= n_train_timesteps <= trunc_steps + 1 = {trunc_steps + 1}, got {m}")
    idx = torch.randperm(trunc_steps + 1, generator=generator)[:m]
    return sigmas.detach().cpu()[idx]
