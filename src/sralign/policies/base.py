"""The contract every SR policy implements (see DESIGN.md, "The contracts between parts").

A policy maps a low-resolution image plus noise to an SR image. It knows nothing of
preferences: trainers call ``sample`` for rollouts, ``dsm`` for the per-sample denoising loss
and ``reference()`` for the frozen copy.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

from torch import Tensor
from torch.nn import Parameter

SAMPLERS = ("ode", "sde", "onestep", "ddpm")
STOCHASTIC_SAMPLERS = ("sde", "ddpm")  # draw noise at every step: callers seed them with a generator


@dataclass
class Cond:
    """An encoded LR batch, computed once by ``SRPolicy.condition`` and reused by every sample.

    Attributes:
        lr: [B,3,h,w] the LR images in [0,1].
        lr_up: [B,3,sh,sw] the LR upsampled to the output size, in [0,1].
        features: policy-specific encodings (tensors with batch dimension B), or empty.
    """

    lr: Tensor
    lr_up: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.lr.shape[0]

    def repeat(self, group: int) -> "Cond":
        """Each item repeated ``group`` times in a row ([B] -> [B*group]): item i's copies are
        rows i*group … i*group+group-1. No re-encoding happens."""
        if group == 1:
            return self
        rep = lambda x: x.repeat_interleave(group, dim=0)  # noqa: E731
        return Cond(rep(self.lr), rep(self.lr_up), {k: rep(v) for k, v in self.features.items()})

    def index(self, idx: Tensor | slice) -> "Cond":
        """A sub-batch (rows ``idx``)."""
        return Cond(self.lr[idx], self.lr_up[idx], {k: v[idx] for k, v in self.features.items()})


@dataclass
class Samples:
    """What ``SRPolicy.sample`` returns.

    Attributes:
        images: [B,3,sH,sW] float in [0,1].
        trajectory: [B,S+1,...] the sampler's states in the policy's own space, first = start
            noise, last = final state (``sde``/``ode`` with ``return_trajectory``), else None.
        log_probs: [B,S] Gaussian log-probability of every stochastic step (``sde``), else None.
        sigmas: [S+1] the noise levels of the trajectory's states, else None.
    """

    images: Tensor
    trajectory: Tensor | None = None
    log_probs: Tensor | None = None
    sigmas: Tensor | None = None


@runtime_checkable
class SRPolicy(Protocol):
    """An SR model the trainers can align.

    Timesteps ``t`` are noise levels in [0, 1] (``t = step / 1000`` on the usual 1000-step
    scale); ``t = 1`` is pure noise.
    """

    scale: int

    def condition(self, lr: Tensor) -> Cond:
        """Encode a batch of LR images [B,3,h,w] in [0,1] once."""
        ...

    def sample(
        self,
        cond: Cond,
        noise: Tensor,
        *,
        sampler: str = "ode",
        steps: int = 20,
        return_trajectory: bool = False,
    ) -> Samples:
        """Sample one output per row of ``noise`` ([B*G, C, sH, sW]; B*G a multiple of
        ``cond.batch_size``, rows grouped per LR). ``noise`` fixes the sample: same noise, same
        output (``ode``/``onestep``); for ``sde`` the per-step noise is drawn from a generator
        seeded by the caller's global RNG state."""
        ...

    def dsm(self, x0: Tensor, cond: Cond, t: Tensor, noise: Tensor) -> Tensor:
        """Per-sample denoising loss [B] of clean images ``x0`` [B,3,sH,sW] in [0,1],
        re-noised at ``t`` [B] with ``noise`` (same shape as the policy's space)."""
        ...

    def reference(self) -> AbstractContextManager[Any]:
        """Inside this context, ``sample`` and ``dsm`` answer with the frozen π_ref."""
        ...

    def trainable_parameters(self) -> Iterator[Parameter]:
        ...

    def save(self, path: str | Path) -> None:
        ...

    def load(self, path: str | Path) -> None:
        ...


def dsm_noise_shape(policy: SRPolicy, x0: Tensor) -> tuple[int, ...]:
    """Shape of the noise ``policy.dsm`` expects for images ``x0``: the image shape for pixel-space
    policies, the latent shape for latent ones (which define ``dsm_noise_shape``)."""
    fn = getattr(policy, "dsm_noise_shape", None)
    return tuple(fn(x0)) if fn is not None else tuple(x0.shape)


def noise_layout(policy: SRPolicy) -> tuple[int, int, int]:
    """(channels, factor, multiple) of a policy's sampling noise laid out spatially: an output of
    H×W pixels takes noise [channels, H/factor, W/factor], and H, W must be multiples of
    ``multiple``. Pixel-space policies: (3, 1, 1); latent ones define ``noise_layout()``."""
    fn = getattr(policy, "noise_layout", None)
    return tuple(fn()) if fn is not None else (3, 1, 1)


def policy_noise(policy: SRPolicy, spatial: Tensor) -> Tensor:
    """Spatial noise [B,C,h,w] (see ``noise_layout``) in the policy's own noise space (FLUX packs
    2×2 latent patches into tokens; others take it as is)."""
    fn = getattr(policy, "pack_noise", None)
    return fn(spatial) if fn is not None else spatial


def condition_with_prompts(policy: SRPolicy, lr: Tensor, prompts: list[str] | None) -> Cond:
    """``policy.condition(lr)``, passing per-image ``prompts`` to text-conditioned policies.
    A policy without text conditioning given prompts raises a ValueError that says so."""
    if prompts is None:
        return policy.condition(lr)
    if getattr(policy, "prompt_encoder", None) is None:
        raise ValueError(f"{type(policy).__name__} has no text encoder, so it cannot take prompts "
                         "(use a diffusers model folder with tokenizer/ + text_encoder/, or drop the prompts)")
    return policy.condition(lr, prompts=prompts)


def condition_captioned(policy: SRPolicy, lr: Tensor, captions: list[str | None] | None) -> Cond:
    """``policy.condition(lr)`` for a batch whose images may carry captions (one per row of ``lr``,
    or None): text-conditioned policies get the captions, with their own configured prompt where
    an image has none; other policies, and batches without any caption, are conditioned as usual."""
    if captions is None or getattr(policy, "prompt_encoder", None) is None or all(t is None for t in captions):
        return policy.condition(lr)
    default = getattr(getattr(policy, "config", None), "prompt", "")
    return policy.condition(lr, prompts=[default if t is None else t for t in captions])
