"""Configuration of offline preference training (DP²O-SR and Diffusion-DPO)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..rewards.hybrid import DEFAULT_FR, DEFAULT_NR


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

    > Optimisation
    beta, lr, steps, batch_pairs (pairs per micro-batch), grad_accum, warmup, grad_clip,
    weight_decay, t_min / t_max (timestep range of the DSM terms), mixed_precision ("no"|"bf16").

    > Bookkeeping
    seed, checkpoint_every, log_every.
    """

    method: str = "dp2o"
    n: int = 4
    fr_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_FR))
    nr_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_NR))
    beta: float = 5000.0
    lr: float = 1e-4
    steps: int = 150
    batch_pairs: int = 16
    grad_accum: int = 1
    warmup: int = 10
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 1
