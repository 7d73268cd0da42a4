"""Real diffusion backbones behind ``SRPolicy`` (optional extra ``[diffusers]``)."""

from .controlnet_sd import ControlNetSD, ControlNetSDConfig
from .flux_controlnet import FluxControlNet, FluxControlNetConfig
from .onestep_sd import OneStepSD, OneStepSDConfig

__all__ = ["ControlNetSD", "ControlNetSDConfig", "FluxControlNet", "FluxControlNetConfig", "OneStepSD", "OneStepSDConfig"]
