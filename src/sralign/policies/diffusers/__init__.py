"""Real diffusion backbones behind ``SRPolicy`` (optional extra ``[diffusers]``)."""

from .controlnet_sd import ControlNetSD, ControlNetSDConfig
from .onestep_sd import OneStepSD, OneStepSDConfig

__all__ = ["ControlNetSD", "ControlNetSDConfig", "OneStepSD", "OneStepSDConfig"]
