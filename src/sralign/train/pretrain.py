"""Pretraining the tiny policy (how the shipped checkpoint is made).

Each step: random HR crops of the training photographs (the bundled training split, plus the
photographs in ``hr_dir``) -> degraded on the fly (``degradation_mix`` of each batch with
Real-ESRGAN's second-order degradation, the rest with the simple blur + bicubic + noise one) -> a
batch split between the flow-matching objective (``dsm`` at t ~ U[0,1]) and the noise-aware
one-step objective (x̂0 from ``onestep`` regressed to the HR residual, as NAOSD trains it).
The saved weights are an EMA of the trained ones. ``init`` starts from a checkpoint folder
(fine-tuning) instead of random weights.

Progress is measured on ``val_dir`` (photographs never trained on; default: the bundled held-out
split's centre crops) with both degradations: PSNR and SSIM of the ``ode`` and ``onestep``
samplers and of bicubic.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ranged, save_config, validate
from ..data.degradation import RealESRGANConfig, RealESRGANDegradation, SimpleDegradationConfig, quantize_8bit, simple_degradation
from ..data.images import ImageError, ImageFolder, center_crop, load_bundled, random_crops
from ..policies.tiny import TinyPolicy, TinyPolicyConfig
from ..rewards.builtin import ssim_y
from ..rewards.functional import psnr_y
from .checkpoint import check_resume, has_checkpoint, load_training_state, save_training_state
from .logging_utils import MetricLogger

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Settings of ``sralign pretrain`` (CPU-scale defaults)."""

    steps: int = ranged(3000, ge=1)
    batch_size: int = ranged(16, ge=1)
    patch: int = ranged(64, ge=8)  # HR patch size
    lr: float = ranged(1e-3, gt=0)
    lr_min: float = ranged(1e-4, ge=0)  # cosine decay target
    warmup: int = ranged(100, ge=0)
    weight_decay: float = ranged(0.0, ge=0)
    grad_clip: float = ranged(1.0, gt=0)
    ema_decay: float = ranged(0.999, ge=0, lt=1)
    ema_warmup: bool = True  # decay at update k = min(ema_decay, (1 + k) / (10 + k)), diffusers' EMAModel default
    onestep_fraction: float = ranged(0.25, ge=0, le=1)  # share of each batch trained on the one-step objective
    onestep_weight: float = ranged(2.0, ge=0)  # weight of the one-step x̂0 regression loss
    seed: int = ranged(0, ge=0)
    checkpoint_every: int = ranged(250, ge=1)
    eval_every: int = ranged(250, ge=1)
    hr_dir: str = ""  # a folder of extra HR photographs (each at least ``patch`` px), added to the bundled training split
    val_dir: str = ""  # photographs for the progress figures (never trained on); "" = the bundled held-out split
    degradation_mix: float = ranged(0.0, ge=0, le=1)  # share of each batch degraded with Real-ESRGAN's recipe
    init: str = ""  # a tiny-policy checkpoint folder to fine-tune ("" = random weights)
    policy: TinyPolicyConfig = field(default_factory=TinyPolicyConfig)
    degradation: SimpleDegradationConfig = field(default_factory=SimpleDegradationConfig)

    def cross_check(self) -> str | None:
        for key in ("hr_dir", "val_dir", "init"):
            v = getattr(self, key)
            if v and not Path(v).expanduser().is_dir():
                return f"{key} {v!r} is not a folder"
        if self.init and not (Path(self.init).expanduser() / "config.json").is_file():
            return f"init {self.init!r} holds no config.json: name a tiny-policy checkpoint folder (e.g. one written by `sralign pretrain`)"
        if self.patch % self.policy.scale:
            return f"patch ({self.patch}) must be a multiple of policy.scale ({self.policy.scale})"
        if self.lr_min > self.lr:
            return f"lr_min ({self.lr_min}) must not exceed lr ({self.lr})"
        return None


def lr_at(step: int, cfg: PretrainConfig) -> float:
    import math

    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * min(1.0, p)))


def ema_decay_at(step: int, cfg: PretrainConfig) -> float:
    """The EMA decay of the update after optimizer step ``step`` (0-based).

    With ``ema_warmup`` it is ``min(ema_decay, (1 + step) / (10 + step))`` — diffusers'
    ``EMAModel`` default — so the average forgets its starting weights within the run (0.1 at
    step 0, 0.99 at step 890). Without it the average keeps ``ema_decay ** steps`` of the initial
    weights: 47 % after 750 steps at 0.999, which for a fine-tuning run (``init``) means the saved
    model is half the checkpoint it started from.
    """
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


def degrade_mixed(hr: torch.Tensor, cfg: PretrainConfig, gen: torch.Generator) -> torch.Tensor:
    """LR [B,3,H/s,W/s] of HR crops [B,3,H,W]: the first round(B·degradation_mix) crops with
    Real-ESRGAN's degradation (BasicSR's x4plus settings), the rest with the simple one; 8-bit."""
    b = hr.shape[0]
    n_real = int(round(b * cfg.degradation_mix))
    parts = []
    if n_real:
        parts.append(RealESRGANDegradation(RealESRGANConfig(scale=cfg.policy.scale))(hr[:n_real], gen))  # 8-bit already
    if b - n_real:
        parts.append(quantize_8bit(simple_degradation(hr[n_real:], cfg.policy.scale, gen, cfg.degradation)))
    return torch.cat(parts)


def pretrain_loss(policy: TinyPolicy, hr: torch.Tensor, lr_img: torch.Tensor, gen: torch.Generator, onestep_fraction: float, onestep_weight: float = 2.0) -> tuple[torch.Tensor, dict]:
    b = hr.shape[0]
    cond = policy.condition(lr_img)
    n_one = int(round(b * onestep_fraction))
    eps = torch.randn(hr.shape, generator=gen)
    losses = {}
    total = hr.new_zeros(())
    if b - n_one > 0:
        idx = slice(n_one, b)
        t = torch.rand(b - n_one, generator=gen).clamp(1e-3, 1.0)
        l_fm = policy.dsm(hr[idx], cond.index(idx), t, eps[idx]).mean()
        total = total + l_fm
        losses["loss_fm"] = float(l_fm.detach())
    if n_one > 0:
        idx = slice(0, n_one)
        c1 = cond.index(idx)
        r_hat = policy.onestep(eps[idx], c1)
        r = policy.to_residual(hr[idx], c1)
        l_one = onestep_weight * ((r_hat - r) ** 2).mean()
        total = total + l_one
        losses["loss_onestep"] = float(l_one.detach())
    return total, losses


@torch.no_grad()
def evaluate_psnr(policy: TinyPolicy, hr: torch.Tensor, lr_img: torch.Tensor, steps: int = 10, seed: int = 0, tag: str = "") -> dict:
    """PSNR-Y and SSIM-Y (dB, [0,1]) of the ode (``steps``) and onestep samplers and of bicubic
    on HR [B,3,H,W] / LR [B,3,h,w]; keys ``psnr_ode{tag}`` etc."""
    cond = policy.condition(lr_img)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(policy.noise_shape(cond), generator=g)
    ode = policy.sample(cond, noise, sampler="ode", steps=steps).images
    one = policy.sample(cond, noise, sampler="onestep").images
    border = policy.scale
    out = {}
    for name, x in (("ode", ode), ("onestep", one), ("bicubic", cond.lr_up)):
        out[f"psnr_{name}{tag}"] = float(psnr_y(x, hr, border).mean())
        out[f"ssim_{name}{tag}"] = float(ssim_y(x, hr, border).mean())
    return out


def pretrain(cfg: PretrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> TinyPolicy:
    """Train the tiny policy; writes ``out/model`` (the EMA checkpoint) and ``out/checkpoint``."""
    validate(cfg)
    out = Path(out)
    if resume:
        check_resume(out, cfg)
    train_imgs = [img for _, img in load_bundled("train")]
    if cfg.hr_dir:
        folder = ImageFolder(Path(cfg.hr_dir).expanduser(), min_size=cfg.patch)
        if len(folder) == 0:
            raise ImageError(f"hr_dir {cfg.hr_dir}: no readable image of at least {cfg.patch}x{cfg.patch} px (patch); "
                             f"add larger photographs or lower patch")
        train_imgs += [folder[i] for i in range(len(folder))]
        log.info("training photographs: %d bundled + %d from %s", len(train_imgs) - len(folder), len(folder), cfg.hr_dir)
    small = [i for i, im in enumerate(train_imgs) if min(im.shape[1:]) < cfg.patch]
    if small:
        raise ValueError(f"{len(small)} training photograph(s) are smaller than patch={cfg.patch}; lower patch or remove them")
    if cfg.val_dir:
        val = ImageFolder(Path(cfg.val_dir).expanduser(), min_size=128)
        val_imgs = [val[i] for i in range(len(val))]
        if not val_imgs:
            raise ImageError(f"val_dir {cfg.val_dir}: no readable image of at least 128x128 px; add larger photographs")
    else:
        val_imgs = [img for _, img in load_bundled("heldout")]
    eval_gen = torch.Generator().manual_seed(1234)
    hr_eval = torch.cat([random_crops([im], 4, 128, eval_gen) for im in val_imgs]) if cfg.val_dir else torch.stack([center_crop(im, 128) for im in val_imgs])
    lr_eval = quantize_8bit(simple_degradation(hr_eval, cfg.policy.scale, eval_gen, cfg.degradation))
    lr_eval_real = RealESRGANDegradation(RealESRGANConfig(scale=cfg.policy.scale))(hr_eval, eval_gen) if cfg.degradation_mix > 0 else None

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    policy = TinyPolicy(cfg.policy)
    if cfg.init:
        policy.load(Path(cfg.init).expanduser())  # fine-tune: the architecture is this config's
    ema = copy.deepcopy(policy.model).requires_grad_(False)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    ckpt_dir = out / "checkpoint"
    if resume and has_checkpoint(ckpt_dir):
        meta = load_training_state(ckpt_dir, {"model": policy.model, "ema": ema}, opt, {"data": gen})
        start = meta["step"]
        log.info("resumed from step %d", start)
    logger = MetricLogger(out, resume_step=start if resume else None)
    pbar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="pretrain", disable=not progress)
    t0 = time.time()
    for step in pbar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        hr = random_crops(train_imgs, cfg.batch_size, cfg.patch, gen)
        lr_img = degrade_mixed(hr, cfg, gen)
        loss, parts = pretrain_loss(policy, hr, lr_img, gen, cfg.onestep_fraction, cfg.onestep_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(policy.model.parameters(), cfg.grad_clip)
        opt.step()
        decay = ema_decay_at(step, cfg)
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), policy.model.parameters()):
                pe.lerp_(pm, 1 - decay)
        pbar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        rec = {"loss": float(loss.detach()), "grad_norm": float(gn), "lr": lr_at(step, cfg), **parts}
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            live = policy.model
            policy.model, policy._active = ema, ema
            rec.update(evaluate_psnr(policy, hr_eval, lr_eval))
            if lr_eval_real is not None:
                rec.update(evaluate_psnr(policy, hr_eval, lr_eval_real, tag="_realesrgan"))
            policy.model, policy._active = live, live
            log.info("step %d %s", done, {k: round(v, 4) for k, v in rec.items()})
        logger.log(step, **rec)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_training_state(ckpt_dir, done, {"model": policy.model, "ema": ema}, opt, generators={"data": gen})
    logger.close()
    final = TinyPolicy(cfg.policy)
    final.model.load_state_dict(ema.state_dict())
    final.save(out / "model")
    log.info("pretrain done in %.1f min; model at %s", (time.time() - t0) / 60, out / "model")
    return final
