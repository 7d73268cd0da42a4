"""Flow-GRPO's PPO-clipped policy gradient with a KL penalty to the reference."""

from __future__ import annotations

import torch
from torch import Tensor

KL_FORMS = ("transition", "flow_grpo")


def transition_kl(mean: Tensor, mean_ref: Tensor, std: Tensor, dt: Tensor | float, form: str = "transition") -> Tensor:
    """Per-sample KL [B] between the policy's and the reference's Gaussian SDE transitions
    N(μ_θ, s²) and N(μ_ref, s²) that share the std s = σ_t·√|dt| (σ_t = √(σ/(1−σ))·η).

        transition: mean_dims (μ_θ − μ_ref)² / (2·s²)       the KL of the two transitions
                    (per dimension) — sralign's default
        flow_grpo:  mean_dims (μ_θ − μ_ref)² / (2·σ_t²)     Flow-GRPO's ``kl_loss``: it divides
                    by σ_t², not the transition variance, so it is |dt| times the KL
                    (10× weaker at 10 steps for the same β_KL)

    Args:
        mean, mean_ref: [B,...] transition means of policy and reference.
        std: the transition std s (scalar tensor, as ``flow_sde_step`` returns it).
        dt: σ_{i+1} − σ_i (negative) of the step.
    """
    if form not in KL_FORMS:
        raise ValueError(f"kl form must be one of {', '.join(KL_FORMS)}, got {form!r}")
    var = std**2
    if form == "flow_grpo":
        var = var / abs(float(dt))
    return ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * var)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    clip_range: float = 1e-4,
    kl: Tensor | None = None,
    kl_beta: float = 0.04,
    adv_clip: float | None = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip loss on per-step log-probs.

        ratio  = exp(logp − old_logp)
        policy = mean max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε))
        loss   = policy + kl_beta·mean(kl)

    Args:
        logp: [B] (or [B,S]) log-probs of the stored transitions under the current policy.
        old_logp: same shape, at rollout time (detached).
        adv: [B] advantages, broadcast over steps; clamped to ±adv_clip (Flow-GRPO: 5).
        clip_range: ε (Flow-GRPO: 1e-4).
        kl: [B] per-sample KL to π_ref (``transition_kl``: the transitions' KL by default,
            Flow-GRPO's σ_t² divisor with form="flow_grpo"), or None.

    Returns:
        (loss, stats) with ``clip_frac`` (share of |ratio − 1| > ε), ``approx_kl``
        (½·mean (logp − old_logp)², as Flow-GRPO logs it), ``policy_loss``, ``kl``. With one
        update per rollout batch the ratio is exactly 1 and both are 0.
    """
    a = adv.detach()
    if adv_clip is not None:
        a = a.clamp(-adv_clip, adv_clip)
    while a.dim() < logp.dim():
        a = a.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1 - clip_range, 1 + clip_range)
    policy = torch.maximum(unclipped, clipped).mean()
    loss = policy
    kl_mean = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if kl is not None:
        kl_mean = kl.mean()
        loss = loss + kl_beta * kl_mean
    return loss, {
        "policy_loss": policy.detach(),
        "kl": kl_mean.detach(),
        "clip_frac": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * ((logp.detach() - old_logp.detach()) ** 2).mean(),
    }
