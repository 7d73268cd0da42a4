"""Flow-GRPO's PPO-clipped policy gradient with a KL penalty to the reference."""

from __future__ import annotations

import torch
from torch import Tensor


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
        kl: per-sample KL to π_ref (Flow-GRPO: ‖μ_θ − μ_ref‖² / (2σ_t²)), or None.

    Returns:
        (loss, stats) with ``clip_frac``, ``approx_kl``, ``policy_loss``, ``kl``.
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
