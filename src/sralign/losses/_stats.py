from __future__ import annotations

import torch
from torch import Tensor


def implicit_accuracy(inside: Tensor) -> Tensor:
    """Share of terms the policy ranks right: inside > 0 counts 1, inside == 0 counts ½."""
    return (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()


def weighted_mean(x: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return x.mean()
    return (weight * x).sum() / weight.sum().clamp_min(torch.finfo(x.dtype).tiny)
