"""GDPO-SR: a group generalisation of Diffusion-DPO with z-scored advantages (Joyies/GDPO)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._stats import implicit_accuracy


def gdpo_loss(d: Tensor, d_ref: Tensor, adv: Tensor, beta: float, scale: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
    """GDPO-SR loss on n groups of G online samples.

        inside_i = −scale·β·Σ_g A_ig·(d_ig − d_ref_ig)
        loss     = mean_i −log σ(inside_i)

    Samples with A > 0 act as winners, A < 0 as losers. Because Σ_g A_ig = 0, adding a
    constant to every Δ of a group leaves the loss unchanged.

    Args:
        d, d_ref: [n,G] per-sample denoising losses of policy / reference (same t, ε).
        adv: [n,G] group advantages (``group_advantages``; detached).
        beta: β (reference code: 5000 with scale 0.5, on the ε-MSE of SD latents).

    Returns:
        (loss, stats) with ``implicit_acc`` (share of groups with inside > 0; zero-variance
        groups count ½) and ``mean_abs_delta``.
    """
    delta = d - d_ref
    inside = -scale * beta * (adv.detach() * delta).sum(dim=1)
    loss = (-F.logsigmoid(inside)).mean()
    return loss, {
        "implicit_acc": implicit_accuracy(inside.detach()),
        "mean_abs_delta": delta.detach().abs().mean(),
    }


def gdpo_grad_weights(d: Tensor, d_ref: Tensor, adv: Tensor, beta: float, scale: float = 0.5) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per-sample weights c [n,G] with ∇(Σ c·d_θ) = ∇ ``gdpo_loss``, from no-grad values (for
    micro-batches): c_ig = σ(−inside_i)·scale·β·A_ig / n. Returns (c, loss value, stats)."""
    d, d_ref, a = d.detach(), d_ref.detach(), adv.detach()
    loss, stats = gdpo_loss(d, d_ref, a, beta, scale)
    inside = -scale * beta * (a * (d - d_ref)).sum(dim=1)
    c = torch.sigmoid(-inside)[:, None] * scale * beta * a / d.shape[0]
    return c, loss, stats
