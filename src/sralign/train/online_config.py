"""Configurations of the online trainer: one dataclass per method (TRL-style config/trainer pair).

``preset=authors`` sets every training convention of a method to its authors' code (the tables
in each class's ``AUTHORS`` and docs/losses.md say which value comes from where); fields you set
yourself (YAML or ``key=value``) win over the preset. ``preset=sralign`` (default) is sralign's own
CPU-scale defaults; where they differ from the authors', the class docstring says how and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import ranged
from ..losses.grpo import KL_FORMS
from ..rewards.attribute import DEFAULT_NR_ATTRIBUTE, TEXTURE_RULES
from ..rewards.build import check_reward_settings
from ..policies.base import SAMPLERS
from ..rewards.hybrid import DEFAULT_FR, DEFAULT_NR, DEFAULT_NR_WEIGHT
from .candidates import LRSetConfig

PRESETS = ("sralign", "authors")


@dataclass
class OnlineConfig:
    """Settings shared by the online methods.

    > Data: ``lr_set`` (the pool of training LR crops), ``batch_lr`` LR images per step,
      ``group`` G rollouts per LR.
    > Reward: ``reward`` "attribute" (GDPO-SR) or "hybrid" (DP²O-SR); ``fr_metrics`` /
      ``nr_metrics`` name the metrics (built-in or pyiqa:NAME); ``nr_weight`` the hybrid's NR
      share in [0, 1] (FR: 1 − nr_weight; the attribute reward ignores it); ``texture_rule`` the attribute
      reward's texture map ("sralign" or "authors": their gray conversion and edge-block rule).
    > Advantages: z-score per group with ``adv_eps`` added to the std; ``adv_unbiased`` Bessel's
      std (GDPO-SR) or the population std (Flow-GRPO, DGPO); ``adv_global_std`` one std over
      the whole batch (gathered over ranks); ``adv_clip`` clamps to ±value (None: off).
    > Rollouts: ``rollout_from`` "reference" | "ema" | "policy"; ``sampler``, ``steps``;
      ``switch_ema_ref`` > 0 with ``rollout_from=ema``: the current policy rolls out until that
      many steps are done, the EMA after (DGPO's code: 200, 500 for GenEval).
    > Optimisation: ``lr``, ``beta``, ``grad_clip``, ``warmup``, ``steps_total``.
    > Memory: ``micro_batch`` > 0 pushes at most that many samples through a forward/backward
      at once; the gradient is the same as in one shot (group terms are computed without grad
      first, then each micro-batch back-propagates its weighted share). 0: all at once.
    > EMA: θ⁻ ← μθ⁻ + (1−μ)θ with μ = min(ema_max, ema_ramp·step) (DGPO's reference code:
      0.3 and 0.001).
    > Speed: ``overlap_rollouts`` (default True) makes step k+1's rollouts in a background
      thread while step k's rewards are scored, where the method allows it: only with
      ``rollout_from=reference`` (the frozen π_ref; GDPO-SR's default). Rollouts from the
      policy or the EMA depend on the update and stay sequential (the run logs which path it
      takes). Both paths give the same parameters. ``mixed_precision`` "no" | "bf16" | "fp16":
      network forwards under autocast, losses, trainable parameters and gradients in float32.
    """

    AUTHORS: ClassVar[dict[str, Any]] = {}

    def cross_check(self) -> str | None:
        own = type(self).__dataclass_fields__["method"].default
        if type(self) is not OnlineConfig and self.method != own:
            return f"method {self.method!r} does not fit {type(self).__name__} (method {own!r}); pass --method {self.method} instead"
        if self.t_min > self.t_max:
            return f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})"
        return check_reward_settings(self)

    method: str = ranged("dgpo", choices=("gdpo", "dgpo", "grpo"))
    steps_total: int = ranged(60, ge=1)
    batch_lr: int = ranged(2, ge=1)
    group: int = ranged(8, ge=2)
    lr: float = ranged(1e-4, gt=0)
    beta: float = ranged(5000.0, gt=0)
    grad_clip: float = ranged(1.0, gt=0)
    warmup: int = ranged(5, ge=0)
    weight_decay: float = ranged(0.0, ge=0)
    reward: str = ranged("hybrid", choices=("hybrid", "attribute"))
    fr_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_FR))
    nr_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_NR))
    nr_weight: float = ranged(DEFAULT_NR_WEIGHT, ge=0, le=1)
    rollout_from: str = ranged("ema", choices=("reference", "ema", "policy"))
    sampler: str = ranged("ode", choices=SAMPLERS)
    steps: int = ranged(4, ge=1, le=1000)
    t_min: float = ranged(0.0, ge=0, lt=1)
    t_max: float = ranged(1.0, gt=0, le=1)
    ema_max: float = ranged(0.3, ge=0, le=1)
    ema_ramp: float = ranged(0.001, ge=0)
    adv_eps: float = ranged(1e-8, gt=0)
    seed: int = ranged(0, ge=0)
    checkpoint_every: int = ranged(20, ge=1)
    lr_set: LRSetConfig = field(default_factory=lambda: LRSetConfig(n=32))
    preset: str = ranged("sralign", choices=PRESETS)
    adv_unbiased: bool = True
    adv_global_std: bool = False
    adv_clip: float | None = ranged(None, gt=0)
    switch_ema_ref: int = ranged(0, ge=0)
    micro_batch: int = ranged(0, ge=0)
    texture_rule: str = ranged("sralign", choices=TEXTURE_RULES)
    overlap_rollouts: bool = True
    mixed_precision: str = ranged("no", choices=("no", "bf16", "fp16"))

    @classmethod
    def preset_values(cls, name: str | None, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """The values preset ``name`` sets (``data``: what the user set, for values that depend
        on another choice). Unknown names are left to ``validate`` to report."""
        return dict(cls.AUTHORS) if name == "authors" else {}

    @classmethod
    def with_preset(cls, name: str, **kw: Any):
        """``cls(**{**preset_values(name, kw), **kw, preset=name})``."""
        return cls(**{**cls.preset_values(name, kw), **kw, "preset": name})


@dataclass
class GDPOConfig(OnlineConfig):
    """GDPO-SR: one-step noise-aware rollouts from the reference, attribute-aware reward,
    G = 6, the −½ factor; DSM re-noises at t_noise and queries at t_diff.

    ``beta`` None (default) picks β per backend: 5000 on OneStepSD (the authors' value, on the
    ε-MSE of SD latents) and 100 on the tiny policy. The tiny policy's DSM (``dsm_target=policy``)
    is the error of its one-step output x̂0 divided by t_diff² (100× larger than an ε-MSE), and
    β = 5000 saturates the sigmoid within a few steps there (measured: loss ≈ 17–19, no gain).
    ``dsm_target=eps`` measures the ε-prediction error as the authors' code does (OneStepSD's DSM
    always does); sralign keeps x̂0 on the tiny policy because that is the quantity its one-step
    sampler outputs.

    preset=authors (Joyies/GDPO, GDPOSR/train/train_GDPOSR.py and GDPOSR/losses/grpo.py):

    | field | value | where |
    |---|---|---|
    | adv_unbiased, adv_eps, adv_clip | True, 1e-8, None | AdaptiveReward.forward: ``reward_i.std(unbiased=True)``, ``+1e-8``, no clamp |
    | adv_global_std | False | per LR image (loop over the batch) |
    | beta | 5000 (scale ½) | train_GDPOSR.py: ``scale_term = -0.5 * 5000`` |
    | dsm_target | eps | train_GDPOSR.py: ``(model_pred - noise).pow(2).mean``, UNet at t_diff |
    | rollout_from | reference | ``GDPOReference`` samples the group |
    | group | 6 | training_utils_realsr.py ``--groupsize`` default 6 |
    | grad_clip | 1.0 | ``--max_grad_norm`` default 1.0 |
    | texture_rule | authors | training_utils_realsr.py: ``cv2.cvtColor(..., COLOR_BGR2GRAY)`` on RGB; mask.py: entropy·h·w > 50 |
    | warmup | 0 | ``--lr_scheduler constant`` (diffusers' constant schedule has no warmup) |

    The preset leaves ``nr_metrics`` alone: the authors' texture side scores raw MANIQA and MUSIQ
    (pyiqa, learned, downloaded weights); sralign's default reads BRISQUE and NIQE-s against the
    HR (``gap:brisque``, ``gap:niqe_s``) so that the reward's optimum is the HR. For the authors'
    metrics pass ``nr_metrics=[pyiqa:maniqa,pyiqa:musiq]`` (or ``[gap:pyiqa:maniqa,gap:pyiqa:musiq]``
    to read them against the HR).
    """

    AUTHORS: ClassVar[dict[str, Any]] = {
        "adv_unbiased": True, "adv_eps": 1e-8, "adv_clip": None, "adv_global_std": False,
        "beta": 5000.0, "dsm_target": "eps", "rollout_from": "reference", "group": 6, "grad_clip": 1.0,
        "texture_rule": "authors", "warmup": 0,
    }

    method: str = "gdpo"
    group: int = 6
    beta: float | None = ranged(None, gt=0)
    reward: str = "attribute"
    # the attribute reward's texture side: the default hybrid's NR half, read against the HR
    # (gap:brisque, gap:niqe_s), so the reward's optimum is the HR; raw NR metrics work too
    nr_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_NR_ATTRIBUTE))
    rollout_from: str = "reference"
    sampler: str = "onestep"
    steps: int = 1
    dsm_target: str = ranged("policy", choices=("policy", "eps"))


#: β of GDPO-SR per backend (``policy.kind``) when ``GDPOConfig.beta`` is None.
GDPO_BETA = {"onestep_sd": 5000.0}
GDPO_BETA_DEFAULT = 100.0  # the tiny policy's x̂0 DSM


def gdpo_beta(cfg: GDPOConfig, policy: Any) -> float:
    """β for GDPO-SR: the configured one, else the backend's (``GDPO_BETA``)."""
    if cfg.beta is not None:
        return float(cfg.beta)
    return GDPO_BETA.get(getattr(policy, "kind", ""), GDPO_BETA_DEFAULT)


@dataclass
class DGPOConfig(OnlineConfig):
    """DGPO: deterministic ODE rollouts (few steps) from the EMA model, shared t and ε per group,
    t ~ U[t_min, T], |A|-weighted group loss.

    sralign's defaults: ``loss_form=exact`` (−log σ of the group sum; its gradient is β·λ_t
    times the authors' weighted form, so β = 5000 with grad clip 1.0 clips more often than
    theirs), one t ~ U[t_min, 1] per group, no DSM clip, no KL, 4-step rollouts — the settings
    the demo and README tables were measured with.

    Options (all from the authors' trainer): ``loss_form=weighted``; ``ref_model=ema`` (the
    DGPO reference is the EMA, β 2000); ``clip_dsm`` with ``dsm_clip_range`` (PPO-style: a sample
    whose exp(d_old − d) left [1−ε, 1+ε] in its advantage's direction gets no gradient; d_old
    from the EMA); ``kl_beta`` > 0 adds β_KL·mean‖v_θ − v_ref‖² against the frozen reference;
    ``train_timesteps=discrete``: ``n_train_timesteps`` distinct noise levels from the rollout
    schedule's indices 0…``trunc_steps`` (the noisiest), drawn once per step and shared by the
    batch, each trained with fresh group-shared ε (gradients averaged).

    preset=authors (Luo-Yihong/DGPO, scripts/train_sd3_dgpo.py and config/dgpo.py
    ``general_ocr_sd3_4gpu``):

    | field | value | where |
    |---|---|---|
    | adv_unbiased, adv_eps, adv_clip | False, 1e-4, 5 | flow_grpo/stat_tracking.py ``np.std(...) + 1e-4``; trainer ``torch.clamp(..., adv_clip_max)``, base.py ``adv_clip_max = 5`` |
    | adv_global_std | True | config ``sample.global_std = True`` (OCR, PickScore; GenEval: False) |
    | loss_form | weighted | ``compute_group_dgpo_loss_allreduce``: sigmoid(Σ A·β·Δ/G) detached × A·dsm |
    | beta | 100 (2000 with ref_model=ema) | config ``train.beta_dpo = 100``; dgpo_wocfg_emaref.py ``beta_dpo = 2000`` |
    | clip_dsm, dsm_clip_range | True, 1e-2 | config ``clip_dsm = True``, ``clip_range = 1e-2`` |
    | kl_beta | 0.02 | config ``train.beta = 0.02`` (PickScore 0.001) |
    | steps, sampler | 10, ode | ``sample.num_steps = 10``, DPM-Solver with ``noise_level = 0`` |
    | train_timesteps, n_train_timesteps, trunc_steps | discrete, 4, 6 | ``num_train_timesteps = 4``, ``trunc_steps = 6`` (GenEval 4), ``generate_shared_sampled_timesteps`` |
    | switch_ema_ref, rollout_from | 200, ema | ``switch_ema_ref = 200`` (GenEval 500); ``ema_ref`` decay min(0.3, 0.001·step) |
    | grad_clip | 1.0 | base.py ``max_grad_norm = 1.0`` |
    | warmup | 0 | constant learning rate (no scheduler in train_sd3_dgpo.py) |

    Not set by the preset: G (theirs 16 per prompt on 4 GPUs), lr (3e-4 for SD3 LoRA), CFG and
    the flow shift of SD3's scheduler (the tiny policy has neither).
    """

    AUTHORS: ClassVar[dict[str, Any]] = {
        "adv_unbiased": False, "adv_eps": 1e-4, "adv_clip": 5.0, "adv_global_std": True,
        "loss_form": "weighted", "beta": 100.0, "clip_dsm": True, "dsm_clip_range": 1e-2, "kl_beta": 0.02,
        "steps": 10, "sampler": "ode", "train_timesteps": "discrete", "n_train_timesteps": 4, "trunc_steps": 6,
        "switch_ema_ref": 200, "rollout_from": "ema", "grad_clip": 1.0, "warmup": 0,
    }

    method: str = "dgpo"
    group: int = 8
    rollout_from: str = "ema"
    sampler: str = "ode"
    steps: int = 4
    t_min: float = 0.3
    loss_form: str = ranged("exact", choices=("exact", "weighted"))
    ref_model: str = ranged("frozen", choices=("frozen", "ema"))
    clip_dsm: bool = False
    dsm_clip_range: float = ranged(1e-2, gt=0)
    kl_beta: float = ranged(0.0, ge=0)
    train_timesteps: str = ranged("uniform", choices=("uniform", "discrete"))
    n_train_timesteps: int = ranged(4, ge=1)
    trunc_steps: int = ranged(6, ge=0)

    @classmethod
    def preset_values(cls, name, data=None):
        v = super().preset_values(name, data)
        if name == "authors" and (data or {}).get("ref_model") == "ema":
            v["beta"] = 2000.0  # config/dgpo_wocfg_emaref.py
        return v

    def cross_check(self) -> str | None:
        if self.train_timesteps == "discrete":
            if self.trunc_steps >= self.steps:
                return f"trunc_steps ({self.trunc_steps}) must be below the rollout's steps ({self.steps}) for train_timesteps=discrete"
            if self.n_train_timesteps > self.trunc_steps + 1:
                return f"n_train_timesteps ({self.n_train_timesteps}) must be at most trunc_steps + 1 = {self.trunc_steps + 1}"
            if self.sampler == "onestep":
                return "train_timesteps=discrete draws from the rollout schedule: use the ode sampler"
        return super().cross_check()


@dataclass
class GRPOConfig(OnlineConfig):
    """Flow-GRPO on our policy: SDE rollouts (η = noise_level) with per-step log-probs, PPO clip
    1e-4, advantages clamped to ±5, KL to π_ref with weight kl_beta.

    sralign's defaults: one update per rollout batch on every step of the trajectory
    (``minibatches=1``, ``timestep_fraction=1``) — the PPO ratio is then exactly 1, so the clip
    never acts (clip_frac = approx_kl = 0) and this is plain REINFORCE with a KL; and
    ``kl_form=transition``, the KL of the two Gaussian transitions (divides by σ_t²·|dt|).
    ``minibatches`` > 1 splits each rollout batch (shuffled) into that many optimizer updates,
    ``inner_epochs`` passes over it; ``timestep_fraction`` trains the first int(S·fraction)
    transitions; ``kl_form=flow_grpo`` divides by σ_t² like Flow-GRPO (|dt| times weaker).

    preset=authors (yifan123/flow_grpo, scripts/train_sd3.py and config/grpo.py ``general_ocr_sd3``):

    | field | value | where |
    |---|---|---|
    | adv_unbiased, adv_eps, adv_clip | False, 1e-4, 5 | flow_grpo/stat_tracking.py ``np.std + 1e-4``; train_sd3.py ``torch.clamp(advantages, ±adv_clip_max)``, base.py 5 |
    | adv_global_std | True | config ``sample.global_std = True`` |
    | clip_range | 1e-4 | base.py ``train.clip_range = 1e-4`` |
    | kl_beta, kl_form | 0.04, flow_grpo | config ``train.beta = 0.04`` (PickScore 0.01); train_sd3.py ``kl_loss = mean((μ−μ_ref)²)/(2·std_dev_t²)`` |
    | steps, noise_level | 10, 0.7 | ``sample.num_steps = 10``; base.py ``noise_level = 0.7`` |
    | timestep_fraction | 0.99 | ``train.timestep_fraction = 0.99`` → int(0.99·10) = 9 trained steps |
    | minibatches, inner_epochs | 2, 1 | ``gradient_accumulation_steps = num_batches_per_epoch // 2`` ("updated twice per epoch"), ``num_inner_epochs = 1``; samples shuffled (``torch.randperm``) |
    | rollout_from | policy | samples with the current transformer |
    | grad_clip | 1.0 | base.py ``max_grad_norm = 1.0`` |
    | warmup | 0 | constant learning rate (no scheduler in train_sd3.py) |

    Not set by the preset: G (24 per prompt, 48 groups per epoch on 32 GPUs), lr, CFG, the SD3
    flow shift.
    """

    AUTHORS: ClassVar[dict[str, Any]] = {
        "adv_unbiased": False, "adv_eps": 1e-4, "adv_clip": 5.0, "adv_global_std": True,
        "clip_range": 1e-4, "kl_beta": 0.04, "kl_form": "flow_grpo", "steps": 10, "noise_level": 0.7,
        "timestep_fraction": 0.99, "minibatches": 2, "inner_epochs": 1, "rollout_from": "policy", "grad_clip": 1.0, "warmup": 0,
    }

    method: str = "grpo"
    group: int = 8
    rollout_from: str = "policy"
    sampler: str = "sde"
    steps: int = 4
    lr: float = 1e-4
    clip_range: float = ranged(1e-4, gt=0)
    adv_clip: float = ranged(5.0, gt=0)
    kl_beta: float = ranged(0.04, ge=0)
    noise_level: float = ranged(0.7, gt=0)
    minibatches: int = ranged(1, ge=1)
    inner_epochs: int = ranged(1, ge=1)
    timestep_fraction: float = ranged(1.0, gt=0, le=1)
    kl_form: str = ranged("transition", choices=KL_FORMS)

    def cross_check(self) -> str | None:
        if self.minibatches > self.batch_lr * self.group:
            return f"minibatches ({self.minibatches}) exceeds the rollout batch batch_lr·group = {self.batch_lr * self.group}"
        if not self.noise_level > 0:
            return f"noise_level must be > 0 for SDE rollouts (got {self.noise_level}): with no noise a step has no log-probability"
        return super().cross_check()


METHOD_CONFIGS = {"gdpo": GDPOConfig, "dgpo": DGPOConfig, "grpo": GRPOConfig}
