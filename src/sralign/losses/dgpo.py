"""DGPO: direct group preference optimisation (Luo et al.), |A|-weighted group DPO."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._stats import implicit_accuracy


def dgpo_loss(
    d: Tensor,
    d_ref: Tensor,
    adv: Tensor,
    beta: float,
    lambda_t: Tensor | float = 1.0,
    form: str = "exact",
) -> tuple[Tensor, dict[str, Tensor]]:
    """DGPO loss on n groups of G samples that share t and ε inside a group.

    With Δ = d − d_ref and the group split G+ = {A > 0}, G− = {A ≤ 0}:

        R_i    = Σ_{G+}|A|·Δ − Σ_{G−}|A|·Δ  (= Σ_g A_g·Δ_g)
        exact:    loss = mean_i −log σ(−λ_t·β·R_i / G)
        weighted: loss = mean_{i,g} sg[σ(λ_t·β·R_i / G)]·A_ig·d_ig   (the reference code's form;
                  its gradient equals the exact form's times G/(β·λ_t) per group, up to the mean)

    |A| weights make Σ_{G+}|A| = Σ_{G−}|A| (advantages sum to 0), which cancels the partition
    function: adding a constant to every Δ of a group leaves the loss unchanged.

    Args:
        d, d_ref: [n,G] per-sample denoising losses (policy / reference).
        adv: [n,G] advantages (``group_advantages``), detached.
        beta: β (DGPO configs: 10–100 with a frozen reference, 2000–5000 with an EMA one).
        lambda_t: scalar or [n] timestep weight λ_t (including the factor T of the ELBO).
        form: "exact" or "weighted".
    """
    n, G = d.shape
    delta = d - d_ref
    a = adv.detach()
    lam = torch.as_tensor(lambda_t, dtype=d.dtype, device=d.device).reshape(-1)  # [1] or [n]
    if form == "exact":
        logits = lam * beta * (a * delta).sum(dim=1) / G
        loss = (-F.logsigmoid(-logits)).mean()
    elif form == "weighted":
        logits = lam * beta * (a * delta.detach()).sum(dim=1) / G
        w = torch.sigmoid(logits).detach()
        loss = (w[:, None] * a * d).mean()
    else:
        raise ValueError(f"form must be 'exact' or 'weighted', got {form!r}")
    return loss, {
        "implicit_acc": implicit_accuracy(-logits.detach()),
        "mean_abs_delta": delta.detach().abs().mean(),
    }
