"""Diffusion-DPO (Wallace et al.), as in Salesforce's train.py."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._stats import implicit_accuracy, weighted_mean


def dpo_loss(
    d_w: Tensor,
    d_ref_w: Tensor,
    d_l: Tensor,
    d_ref_l: Tensor,
    beta: float,
    weight: Tensor | None = None,
    scale: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss on P pairs (winner w, loser l, same t and ε inside a pair).

        inside_p = −scale·β·[(d_w − d_ref_w) − (d_l − d_ref_l)]
        loss     = Σ_p w_p·(−log σ(inside_p)) / Σ_p w_p       (w_p = 1 without ``weight``)

    Args:
        d_w, d_l: [P] per-sample denoising losses of the policy on winners / losers.
        d_ref_w, d_ref_l: [P] the same for the frozen reference (no grad needed).
        beta: β (Diffusion-DPO and DP²O-SR: 5000). ``scale`` = 0.5 is Salesforce's −½ factor;
            diffusers' example script uses 1.0 (its β is then 2× ours).
        weight: [P] non-negative pair weights (DP²O-SR's HPO weights), or None.

    Returns:
        (loss, stats): stats has ``implicit_acc`` (share of pairs with inside > 0),
        ``reward_margin`` (mean inside/β, the implicit reward gap) and ``mean_abs_delta``
        (mean |Δ| of the policy-minus-reference losses).
    """
    delta_w = d_w - d_ref_w
    delta_l = d_l - d_ref_l
    inside = -scale * beta * (delta_w - delta_l)
    loss = weighted_mean(-F.logsigmoid(inside), weight)
    stats = {
        "implicit_acc": implicit_accuracy(inside.detach()),
        "reward_margin": (inside.detach() / beta).mean() if beta else inside.detach().mean(),
        "mean_abs_delta": 0.5 * (delta_w.detach().abs().mean() + delta_l.detach().abs().mean()),
    }
    return loss, stats
