"""Rectified-flow sampling steps shared by the flow policies (tiny, FLUX).

Convention: x_t = (1 − σ)·x0 + σ·ε, velocity v = ε − x0, σ from 1 (noise) to 0 (clean).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def flow_sde_step(
    x: Tensor,
    v: Tensor,
    sigmas: Tensor,
    i: int,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flow-GRPO's SDE step from ``sigmas[i]`` to ``sigmas[i+1]`` given the velocity ``v``.

    With σ = sigmas[i], dt = sigmas[i+1] − σ < 0 and η = ``eta``:

        σ_t  = √(σ / (1 − σ')) · η,   σ' = σ except at σ = 1, where σ' = sigmas[1]
               (the numerator keeps σ = 1; only the division by 1 − σ = 0 is avoided)
        mean = x·(1 + σ_t²·dt/(2σ)) + v·(1 + σ_t²·(1 − σ)/(2σ))·dt
        std  = σ_t·√(−dt)

    A one-step schedule [1, 0] gives σ_t = η (σ' = 0), a finite std. Returns
    (x_next, log_prob [B] (mean over dims), mean, std). With ``prev_sample`` given it scores
    that transition instead of drawing one.
    """
    if not eta > 0:
        raise ValueError(f"the SDE sampler needs noise_level (eta) > 0, got {eta}: with no noise the "
                         f"transition is deterministic and has no log-probability (use the ode sampler)")
    s, s_next = sigmas[i], sigmas[i + 1]
    if not float(s) > float(s_next):
        raise ValueError(f"noise levels must decrease: sigmas[{i}] = {float(s)}, sigmas[{i + 1}] = {float(s_next)}")
    denom = sigmas[1] if float(s) >= 1.0 else s
    dt = s_next - s
    std_t = torch.sqrt(s / (1 - denom)) * eta
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        prev_sample = mean + std * eps
    logp = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return prev_sample, logp.flatten(1).mean(1), mean, std
