"""Group-relative advantages."""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(
    r: Tensor,
    eps: float = 1e-8,
    unbiased: bool = True,
    clip: float | None = None,
    global_std: bool = False,
    all_rewards: Tensor | None = None,
) -> Tensor:
    """Z-score rewards within each group.

    A[i,g] = (r[i,g] − mean_g r[i]) / (s + eps),  then clamped to ±clip

    with s the std of group i's rewards (``global_std=False``) or of every reward in the batch
    (``global_std=True``: Flow-GRPO's and DGPO's ``global_std`` — mean per group, spread of
    the whole batch).

    Conventions (see docs/losses.md):
        GDPO-SR's code:        unbiased=True (Bessel), eps=1e-8, no clip, per group.
        Flow-GRPO / DGPO code: unbiased=False (population std), eps=1e-4, clip=5, and in most
                               shipped configs global_std=True.

    Args:
        r: [n,G] rewards, one row per LR image (group).
        eps: added to the std.
        unbiased: std with Bessel's correction or without (population std).
        clip: clamp advantages to ±clip, or None.
        global_std: one std over the whole batch instead of one per group.
        all_rewards: with ``global_std``, the rewards the std is taken over (e.g. gathered from
            every rank); default ``r``.

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
    if global_std:
        pool = (r if all_rewards is None else all_rewards.detach().to(r)).reshape(-1)
        std = pool.std(unbiased=unbiased) if pool.numel() > 1 else torch.zeros((), dtype=r.dtype)
    else:
        std = r.std(dim=1, keepdim=True, unbiased=unbiased)
    spread = centred.abs().amax(dim=1, keepdim=True)
    scale = r.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    flat = spread <= 1e-12 * scale  # all equal up to rounding
    a = torch.where(flat, torch.zeros_like(centred), centred / (std + eps))
    if clip is not None:
        a = a.clamp(-clip, clip)
    return a
