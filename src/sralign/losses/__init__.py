"""Preference losses as pure tensor functions (no models, no images). See docs/losses.md."""

from .advantages import group_advantages
from .dgpo import dgpo_grad_weights, dgpo_loss, dsm_clip_mask
from .dpo import dpo_loss
from .dp2o import dp2o_pairs, hpo_weights
from .gdpo import gdpo_grad_weights, gdpo_loss
from .grpo import grpo_loss, transition_kl
from .timesteps import discrete_shared_timesteps, group_shared_noise, group_shared_timesteps, timestep_weight, uniform_timesteps

__all__ = [
    "group_advantages", "dpo_loss", "dp2o_pairs", "hpo_weights", "gdpo_loss", "dgpo_loss", "grpo_loss",
    "gdpo_grad_weights", "dgpo_grad_weights", "dsm_clip_mask", "transition_kl",
    "uniform_timesteps", "discrete_shared_timesteps", "group_shared_timesteps", "group_shared_noise", "timestep_weight",
]
