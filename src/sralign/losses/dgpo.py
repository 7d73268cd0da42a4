"""DGPO: direct group preference optimisation (Luo et al.), |A|-weighted group DPO."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._stats import implicit_accuracy


def dsm_clip_mask(d: Tensor, d_old: Tensor, adv: Tensor, clip_range: float) -> Tensor:
    """DGPO's PPO-style clip of the denoising loss (their ``clip_dsm``).

    The "ratio" of a sample is exp(d_old − d): how much likelier the current policy finds it
    than the rollout (EMA) model, read through the denoising loss as a log-likelihood. A sample
    is *clipped* — its d enters the loss detached, so it gets no gradient — when the policy has
    already moved past the trust region in the direction its advantage pushes: ratio > 1 + ε
    for A > 0, ratio < 1 − ε for A ≤ 0. All tensors [n,G]; returns a bool mask [n,G].
    """
    ratio = torch.exp(d_old.detach() - d.detach())
    return torch.where(adv > 0, ratio > 1.0 + clip_range, ratio < 1.0 - clip_range)


def _logits(delta: Tensor, a: Tensor, beta: float, lambda_t: Tensor | float) -> Tensor:
    n, G = delta.shape
    lam = torch.as_tensor(lambda_t, dtype=delta.dtype, device=delta.device).reshape(-1)  # [1] or [n]
    return lam * beta * (a * delta).sum(dim=1) / G


def dgpo_loss(
    d: Tensor,
    d_ref: Tensor,
    adv: Tensor,
    beta: float,
    lambda_t: Tensor | float = 1.0,
    form: str = "exact",
    d_old: Tensor | None = None,
    clip_range: float | None = None,
    kl: Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DGPO loss on n groups of G samples that share t and ε inside a group.

    With Δ = d − d_ref and the group split G+ = {A > 0}, G− = {A ≤ 0}:

        R_i    = Σ_{G+}|A|·Δ − Σ_{G−}|A|·Δ  (= Σ_g A_g·Δ_g)
        exact:    loss = mean_i −log σ(−λ_t·β·R_i / G)
        weighted: loss = mean_{i,g} sg[σ(λ_t·β·R_i / G)]·A_ig·d_ig   (the authors' form: their
                  weight is the sigmoid of the detached group sum, their loss the weighted mean
                  of A·d; its gradient is the exact form's divided by β·λ_t)

    |A| weights make Σ_{G+}|A| = Σ_{G−}|A| (advantages sum to 0), which cancels the partition
    function: adding a constant to every Δ of a group leaves the loss unchanged.

    Options of the authors' trainer:
        d_old, clip_range: their ``clip_dsm`` — samples selected by ``dsm_clip_mask`` enter
            with d detached (no gradient); stats gain ``clip_frac``.
        kl, kl_beta: adds kl_beta·mean(kl); their KL is mean‖v_θ − v_ref‖² per sample against
            the frozen reference (β_KL 0.02 GenEval, 0.001 OCR / PickScore).

    Args:
        d, d_ref: [n,G] per-sample denoising losses (policy / reference).
        adv: [n,G] advantages (``group_advantages``), detached.
        beta: β (authors: 100 with a frozen reference, 10 for PickScore, 2000 with an EMA one).
        lambda_t: scalar or [n] timestep weight λ_t (including the factor T of the ELBO).
        form: "exact" or "weighted".
    """
    a = adv.detach()
    clipped = None
    if d_old is not None and clip_range is not None:
        clipped = dsm_clip_mask(d, d_old, a, clip_range)
        d = torch.where(clipped, d.detach(), d)
    delta = d - d_ref
    if form == "exact":
        logits = _logits(delta, a, beta, lambda_t)
        loss = (-F.logsigmoid(-logits)).mean()
    elif form == "weighted":
        logits = _logits(delta.detach(), a, beta, lambda_t)
        w = torch.sigmoid(logits).detach()
        loss = (w[:, None] * a * d).mean()
    else:
        raise ValueError(f"form must be 'exact' or 'weighted', got {form!r}")
    stats = {"implicit_acc": implicit_accuracy(-logits.detach()), "mean_abs_delta": delta.detach().abs().mean()}
    if clipped is not None:
        stats["clip_frac"] = clipped.float().mean()
    if kl is not None:
        stats["kl"] = kl.detach().mean()
        if kl_beta:
            loss = loss + kl_beta * kl.mean()
    return loss, stats


def dgpo_grad_weights(
    d: Tensor,
    d_ref: Tensor,
    adv: Tensor,
    beta: float,
    lambda_t: Tensor | float = 1.0,
    form: str = "exact",
    d_old: Tensor | None = None,
    clip_range: float | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The per-sample weights c [n,G] with ∇(Σ c·d_θ) = ∇ ``dgpo_loss`` (KL term excluded),
    from values computed without grad — what a micro-batched trainer needs: the group terms
    first, then each micro-batch back-propagates Σ c·d over its own samples.

        exact:    c_ig = σ(λ_t·β·R_i/G)·λ_t·β·A_ig / (G·n)
        weighted: c_ig = σ(λ_t·β·R_i/G)·A_ig / (G·n)
    and c = 0 for samples the DSM clip selects. Returns (c, loss value, stats).
    """
    d, d_ref, a = d.detach(), d_ref.detach(), adv.detach()
    loss, stats = dgpo_loss(d, d_ref, a, beta, lambda_t, form, d_old=d_old, clip_range=clip_range)
    n, G = d.shape
    logits = _logits(d - d_ref, a, beta, lambda_t)
    w = torch.sigmoid(logits)
    lam = torch.as_tensor(lambda_t, dtype=d.dtype, device=d.device).reshape(-1)
    scale = lam * beta if form == "exact" else torch.ones_like(lam)
    c = (w * scale)[:, None] * a / (G * n)
    if d_old is not None and clip_range is not None:
        c = torch.where(dsm_clip_mask(d, d_old, a, clip_range), torch.zeros_like(c), c)
    return c, loss, stats
