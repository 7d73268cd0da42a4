"""SR policies behind the ``SRPolicy`` protocol."""

from .base import SAMPLERS, Cond, Samples, SRPolicy
from .tiny import PolicyLoadError, TinyPolicy, TinyPolicyConfig


def load_policy(spec: str | None = None, device: str = "cpu"):
    """Load a policy by spec: ``None``/``"tiny"`` = the shipped tiny checkpoint; a tiny-policy
    folder; a diffusers SD folder (``vae/`` + ``unet/``; with ``controlnet/`` -> ``ControlNetSD``,
    else ``OneStepSD``) or an sralign LoRA folder of one (``sralign_policy.json``); extra
    ``[diffusers]``."""
    from pathlib import Path

    if spec in (None, "", "tiny"):
        return TinyPolicy.from_pretrained(None, device=device)
    kinds = {"osediff": "OneStepSD", "naosd": "OneStepSD", "controlnet-sd": "ControlNetSD", "flux": "FluxControlNet"}
    kind, _, rest = str(spec).partition(":")
    if rest and kind in kinds:
        from . import diffusers as backends

        return getattr(backends, kinds[kind]).from_pretrained(rest, device=device)
    import json

    folder = Path(spec)
    meta = folder / "sralign_policy.json"
    if meta.is_file() or ((folder / "vae").is_dir() and ((folder / "unet").is_dir() or (folder / "transformer").is_dir())):
        try:
            from .diffusers import ControlNetSD, FluxControlNet, OneStepSD
        except ImportError as e:
            raise PolicyLoadError(f"{folder} is a diffusers model: install the extra with pip install 'sralign[diffusers]' ({e})") from None
        if meta.is_file():
            kind = json.loads(meta.read_text()).get("type")
        elif (folder / "transformer").is_dir():
            kind = "flux_controlnet"
        else:
            kind = "controlnet_sd" if (folder / "controlnet").is_dir() else "onestep_sd"
        cls = {"controlnet_sd": ControlNetSD, "flux_controlnet": FluxControlNet}.get(kind, OneStepSD)
        return cls.from_pretrained(folder, device=device)
    return TinyPolicy.from_pretrained(spec, device=device)


__all__ = ["SAMPLERS", "Cond", "Samples", "SRPolicy", "TinyPolicy", "TinyPolicyConfig", "PolicyLoadError", "load_policy"]
