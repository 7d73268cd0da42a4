"""SR policies behind the ``SRPolicy`` protocol."""

from .base import SAMPLERS, Cond, Samples, SRPolicy
from .tiny import PolicyLoadError, TinyPolicy, TinyPolicyConfig


def load_policy(spec: str | None = None, device: str = "cpu") -> TinyPolicy:
    """Load a policy by spec: ``None``/``"tiny"`` = the shipped tiny checkpoint, else a folder."""
    if spec in (None, "", "tiny"):
        return TinyPolicy.from_pretrained(None, device=device)
    return TinyPolicy.from_pretrained(spec, device=device)


__all__ = ["SAMPLERS", "Cond", "Samples", "SRPolicy", "TinyPolicy", "TinyPolicyConfig", "PolicyLoadError", "load_policy"]
