"""DP²O-SR: many pairs per LR from top-N × bottom-N, weighted by hierarchical preference weights."""

from __future__ import annotations

import torch
from torch import Tensor


def dp2o_pairs(r: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """All N² (winner, loser) pairs between the top-N and the bottom-N of M ranked candidates.

    Args:
        r: [M] rewards of one LR's candidates.
        n: N, with 2N ≤ M (paper: N/M = 8/32 for C-SD2, 4/64 for C-FLUX).

    Returns:
        (idx_w, idx_l): [N²] indices into r; every winner is ranked above every loser. Ties are
        broken by candidate index (stable sort), so the result is deterministic.
    """
    if r.dim() != 1:
        raise ValueError(f"rewards must be [M], got {tuple(r.shape)}")
    m = r.shape[0]
    if n < 1 or 2 * n > m:
        raise ValueError(f"need 1 <= N and 2N <= M, got N={n}, M={m}")
    order = torch.sort(r, descending=True, stable=True).indices
    top, bottom = order[:n], order[m - n :]
    idx_w = top.repeat_interleave(n)
    idx_l = bottom.repeat(n)
    return idx_w, idx_l


def hpo_weights(r_w: Tensor, r_l: Tensor, group_of_pair: Tensor, group_std: Tensor) -> Tensor:
    """Hierarchical preference weights w = w_intra · w_inter for P pairs over K groups.

        w_intra(p) = |r_w − r_l| + (1 − μ_gap(g)),  μ_gap(g) = mean gap over group g's pairs
        w_inter(g) = σ_g + (1 − μ_σ),               μ_σ = mean of σ_g over the K groups

    Rewards are expected in [0,1] (the hybrid reward is), which keeps both factors ≥ 0; for
    other scales the factors are clamped at 0.

    Args:
        r_w, r_l: [P] rewards of each pair's winner and loser.
        group_of_pair: [P] int group index (0…K−1) of each pair.
        group_std: [K] reward std of each group (over all M candidates).

    Returns:
        [P] weights ≥ 0 (detached). Equal gaps and equal stds give exactly 1.
    """
    gap = (r_w - r_l).abs().detach()
    k = group_std.shape[0]
    gsum = torch.zeros(k, dtype=gap.dtype, device=gap.device).index_add_(0, group_of_pair, gap)
    gcnt = torch.zeros(k, dtype=gap.dtype, device=gap.device).index_add_(0, group_of_pair, torch.ones_like(gap))
    mu_gap = gsum / gcnt.clamp_min(1)
    w_intra = (gap + (1 - mu_gap[group_of_pair])).clamp_min(0)
    std = group_std.detach().to(gap.dtype)
    w_inter = (std + (1 - std.mean())).clamp_min(0)
    return w_intra * w_inter[group_of_pair]
