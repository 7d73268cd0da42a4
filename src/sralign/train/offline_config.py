"""Configuration of offline preference training (DP²O-SR and Diffusion-DPO)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ranged
from ..rewards.attribute import TEXTURE_RULES
from ..rewards.build import check_reward_settings
from ..rewards.hybrid import DEFAULT_FR, DEFAULT_NR, DEFAULT_NR_WEIGHT


@dataclass
class DP2OConfig:
    """DP²O-SR / Diffusion-DPO training on a scored candidate store.

    Paper settings (DP²O-SR, latent SD backbones): β = 5000, lr = 2e-5, batch 1024, 1000 steps;
    C-SD2 N/M = 8/32, C-FLUX N/M = 4/64. The defaults below are CPU-scale settings for the tiny
    policy (pixel-space residual diffusion, where the same β works with a larger lr).

    > Data
    method: "dp2o" (top-N × bottom-N pairs, HPO weights) or "dpo" (best vs worst, weight 1).
    n: N, the top/bottom count per group (2N ≤ M).
    fr_metrics / nr_metrics: the hybrid reward's sets (built-in names, pyiqa:NAME, gap:NAME).
      Default: GMSD + gradient-energy ratio | BRISQUE and NIQE-s read against the HR (gap:),
      every term optimal at SR = HR (``rewards.hybrid.DEFAULT_FR/NR``).
    nr_weight: the NR side's share of the hybrid, in [0, 1] (the FR side gets 1 − nr_weight).
    reward: "hybrid" (DP²O-SR's) or "attribute" (GDPO-SR's attribute-aware reward ranks the
      candidates: PSNR-Y weighted by the HR's smooth share, ``nr_metrics`` by its textured share
      under ``texture_rule``; ``fr_metrics`` and ``nr_weight`` unused; the store must be scored
      with ``psnr`` and hold the HRs).
    store_key: which generation key of the store to train on (a hash prefix, as `train`
    lists them); empty: the store's only key.

    > Optimisation
    beta, lr, steps, batch_pairs (pairs per batch), micro_batch (pairs per forward/backward; 0 = the
    whole batch at once; gradients are exact either way, so set it from the device memory only),
    grad_accum (batches per optimizer step), warmup, grad_clip,
    weight_decay, t_min / t_max (timestep range of the DSM terms), mixed_precision ("no"|"bf16").

    > Bookkeeping
    seed, checkpoint_every, log_every.
    """

    method: str = ranged("dp2o", choices=("dp2o", "dpo"))
    n: int = ranged(4, ge=1)
    fr_metrics: list[str] = ranged(default_factory=lambda: list(DEFAULT_FR))
    nr_metrics: list[str] = ranged(default_factory=lambda: list(DEFAULT_NR))
    nr_weight: float = ranged(DEFAULT_NR_WEIGHT, ge=0, le=1)
    reward: str = ranged("hybrid", choices=("hybrid", "attribute"))
    texture_rule: str = ranged("sralign", choices=TEXTURE_RULES)
    store_key: str = ""
    beta: float = ranged(5000.0, gt=0)
    lr: float = ranged(1e-4, gt=0)
    steps: int = ranged(150, ge=1)
    batch_pairs: int = ranged(16, ge=1)
    micro_batch: int = ranged(0, ge=0)
    grad_accum: int = ranged(1, ge=1)
    warmup: int = ranged(10, ge=0)
    grad_clip: float = ranged(1.0, gt=0)
    weight_decay: float = ranged(0.0, ge=0)
    t_min: float = ranged(0.0, ge=0, lt=1)
    t_max: float = ranged(1.0, gt=0, le=1)
    mixed_precision: str = ranged("no", choices=("no", "bf16", "fp16"))
    seed: int = ranged(0, ge=0)
    checkpoint_every: int = ranged(50, ge=1)
    log_every: int = ranged(1, ge=1)

    def cross_check(self) -> str | None:
        if self.t_min > self.t_max:
            return f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})"
        return check_reward_settings(self)
