"""Real diffusion backbones behind ``SRPolicy`` (optional extra ``[diffusers]``)."""

from .onestep_sd import OneStepSD, OneStepSDConfig

__all__ = ["OneStepSD", "OneStepSDConfig"]
