"""Group-relative advantages."""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(r: Tensor, eps: float = 1e-8, unbiased: bool = True, clip: float | None = None) -> Tensor:
    """Z-score rewards within each group.

    A[i,g] = (r[i,g] − mean_g r[i]) / (std_g r[i] + eps)

    Args:
        r: [n,G] rewards, one row per LR image (group).
        eps: added to the std (GDPO-SR's code: 1e-8; Flow-GRPO/DGPO: 1e-4).
        unbiased: std with Bessel's correction (GDPO-SR's ``torch.std``) or without.
        clip: clamp advantages to ±clip (Flow-GRPO: 5), or None.

    Returns:
        [n,G] advantages, detached. Rows with zero spread (all rewards equal, or G = 1) are
        exactly 0, so they contribute no gradient, never NaN. Non-finite rewards raise.
    """
    if r.dim() != 2:
        raise ValueError(f"rewards must be [n,G], got shape {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        bad = (~torch.isfinite(r)).nonzero()[0].tolist()
        raise ValueError(f"non-finite reward at group {bad[0]}, member {bad[1]}: {float(r[bad[0], bad[1]])}")
    r = r.detach()
    G = r.shape[1]
    if G < 2:
        return torch.zeros_like(r)
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=unbiased)
    spread = centred.abs().amax(dim=1, keepdim=True)
    scale = r.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    flat = spread <= 1e-12 * scale  # all equal up to rounding
    a = torch.where(flat, torch.zeros_like(centred), centred / (std + eps))
    if clip is not None:
        a = a.clamp(-clip, clip)
    return a
