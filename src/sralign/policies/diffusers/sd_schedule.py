"""Discrete-time (SD 1.x/2.x) sampling schedules taken from a model folder's scheduler config.

The timestep grids and ᾱ tables come from diffusers' own ``DDIMScheduler`` / ``DDPMScheduler``
built from ``scheduler/scheduler_config.json`` (spacing ``leading`` / ``trailing`` / ``linspace``,
``steps_offset``, beta schedule, ``prediction_type``, ``set_alpha_to_one``, ``clip_sample``); the
step arithmetic is sralign's own, so every stochastic step has a Gaussian log-probability.

A schedule is a tensor ``[S+1, 3]`` (stored as ``Samples.sigmas``, so a trajectory can be
re-scored step by step): row ``i < S`` is (model timestep tᵢ, the timestep the step lands on
(−1 = the clean end), kind); the last row repeats the end. kind 0 = DDIM (η from the caller),
kind 1 = DDPM ancestral. The two follow diffusers' conventions exactly:

- DDIM steps from tᵢ to tᵢ − N // S (N = ``num_train_timesteps``) and, past 0, to
  ``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else ᾱ₀);
  σᵢ = η·√((1−ᾱ')/(1−ᾱ)·(1−ᾱ/ᾱ')), mean = √ᾱ'·x̂₀ + √(1−ᾱ'−σᵢ²)·ε̂.
- DDPM steps from tᵢ to tᵢ₊₁ (the last one to ᾱ = 1) with the posterior mean
  √ᾱ'·β/(1−ᾱ)·x̂₀ + √(ᾱ/ᾱ')·(1−ᾱ')/(1−ᾱ)·x_t and variance (1−ᾱ')/(1−ᾱ)·β (``fixed_small``) or
  β (``fixed_large``), β = 1 − ᾱ/ᾱ'. A step of variance 0 is deterministic (log-prob 0).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import Tensor

from ..tiny import PolicyLoadError

# Stable Diffusion 2 (base)'s scheduler_config.json: what a folder without scheduler/ gets
SD2_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                     timestep_spacing="leading")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DDIM, DDPM = 0, 1


def read_scheduler_config(folder: str | Path) -> dict:
    """The folder's ``scheduler/scheduler_config.json`` (any scheduler class), or SD 2's."""
    f = Path(folder) / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        return dict(SD2_SCHEDULER)
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise PolicyLoadError(f"{f} is not valid JSON ({e})") from None


def quiet_from_config(cls, config: dict):
    """``cls.from_config`` without the warnings about keys of other scheduler classes."""
    lg = logging.getLogger("diffusers.configuration_utils")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    finally:
        lg.setLevel(level)


class SDSchedule:
    """Grids, ᾱ and the step rule of one scheduler config (see the module docstring)."""

    def __init__(self, config: dict, device: str | torch.device = "cpu"):
        from diffusers import DDIMScheduler, DDPMScheduler

        self.config = dict(config)
        self.ddim = quiet_from_config(DDIMScheduler, config)
        self.ddpm = quiet_from_config(DDPMScheduler, config)
        c = self.ddim.config
        if c.prediction_type not in PREDICTION_TYPES:
            raise PolicyLoadError(f"scheduler prediction_type {c.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        if c.thresholding:
            raise PolicyLoadError("scheduler config sets thresholding=true, which sralign does not implement (latent models "
                                  "do not use it): set it to false in scheduler/scheduler_config.json")
        if self.ddpm.config.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            raise PolicyLoadError(f"scheduler variance_type {self.ddpm.config.variance_type!r} is not supported "
                                  "(fixed_small | fixed_small_log | fixed_large)")
        self.prediction_type = c.prediction_type
        self.num_train_timesteps = int(c.num_train_timesteps)
        self.clip = float(c.clip_sample_range) if c.clip_sample else None
        self.fixed_large = self.ddpm.config.variance_type == "fixed_large"
        self.alphas_cumprod = self.ddim.alphas_cumprod.to(device, torch.float32)
        self.final_alpha = float(self.ddim.final_alpha_cumprod)

    def to(self, device) -> "SDSchedule":
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    # ------------------------------------------------------------------ grids
    def table(self, kind: int, steps: int) -> Tensor:
        """The ``[steps+1, 3]`` schedule of a DDIM (kind 0) or DDPM (kind 1) sampler."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be in 1..{self.num_train_timesteps}, got {steps}")
        sch = self.ddim if kind == DDIM else self.ddpm
        sch.set_timesteps(steps)
        ts = [int(t) for t in sch.timesteps]
        if kind == DDIM:
            prev = [t - self.num_train_timesteps // steps for t in ts]
        else:
            prev = ts[1:] + [-1]
        prev = [p if p >= 0 else -1 for p in prev]
        rows = [(t, p, kind) for t, p in zip(ts, prev)] + [(prev[-1], -1, kind)]
        return torch.tensor(rows, dtype=torch.float32, device=self.alphas_cumprod.device)

    def _alpha(self, t: int, kind: int) -> Tensor:
        if t >= 0:
            return self.alphas_cumprod[t]
        return self.alphas_cumprod.new_tensor(1.0 if kind == DDPM else self.final_alpha)

    # ------------------------------------------------------------------ arithmetic
    def split(self, out: Tensor, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂₀, ε̂) from the model output ``out`` at ᾱ = ``a`` (scalar or broadcastable)."""
        if self.prediction_type == "epsilon":
            x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
        elif self.prediction_type == "v_prediction":
            x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
        else:
            x0, eps = out, (x - a.sqrt() * out) / (1 - a).sqrt()
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return x0, eps

    def target(self, z0: Tensor, eps: Tensor, a: Tensor) -> Tensor:
        """What the model is trained to output at ᾱ = ``a`` for x_t = √ᾱ·z0 + √(1−ᾱ)·eps."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * z0
        return z0

    def step(self, out: Tensor, x: Tensor, row: Tensor, eta: float) -> tuple[Tensor, Tensor]:
        """(mean, std) of the step of schedule row ``row`` given the model output ``out`` at x."""
        t, p, kind = int(row[0]), int(row[1]), int(row[2])
        a, a_prev = self.alphas_cumprod[t], self._alpha(p, kind)
        x0, eps = self.split(out, x, a)
        if kind == DDIM:
            std = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt()
            mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * eps
            return mean, std
        beta = 1 - a / a_prev
        mean = a_prev.sqrt() * beta / (1 - a) * x0 + (a / a_prev).sqrt() * (1 - a_prev) / (1 - a) * x
        var = beta if self.fixed_large else (1 - a_prev) / (1 - a) * beta
        if t == 0 or (p < 0 and not self.fixed_large):
            var = var * 0  # diffusers adds no noise at t = 0; the fixed_small step onto ᾱ = 1 has none
        return mean, var.clamp_min(0).sqrt()


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-sample mean log N(sample; mean, std²) over all but the batch dimension, [B]."""
    lp = -((sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)
