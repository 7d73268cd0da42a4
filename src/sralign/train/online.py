"""The online trainer: rollout group -> reward -> advantages -> loss -> update -> EMA.

One loop, three methods; they differ only in the rollout sampler and the loss:

    gdpo   onestep rollouts; dsm re-noised at t_noise, queried at t_diff; ``gdpo_loss``
    dgpo   ode rollouts; group-shared t ~ U[t_min, t_max] and ε; ``dgpo_loss``
    grpo   sde rollouts with log-probs; PPO-clip over every step; KL to π_ref; ``grpo_loss``
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import save_config, validate
from ..losses import dgpo_loss, gdpo_loss, group_advantages, group_shared_noise, group_shared_timesteps, grpo_loss
from ..policies.base import condition_captioned, dsm_noise_shape
from ..policies.tiny import TinyPolicy
from ..rewards.attribute import AttributeReward
from ..rewards.base import MetricError
from ..rewards.hybrid import HybridReward
from .candidates import make_lr_set
from .accel import Accel
from .checkpoint import check_resume, has_checkpoint, load_training_state, save_rank_generators, save_training_state
from .ema import ParamEMA, trainable_named_parameters
from .logging_utils import MetricLogger
from .offline import warmup_lr
from .online_config import OnlineConfig

log = logging.getLogger(__name__)


class NonFiniteRewardError(RuntimeError):
    pass


def build_reward(cfg: OnlineConfig):
    if cfg.reward == "attribute":
        return AttributeReward.from_names(cfg.nr_metrics)
    if cfg.reward == "hybrid":
        return HybridReward.from_names(cfg.fr_metrics, cfg.nr_metrics)
    raise ValueError(f"reward must be 'attribute' or 'hybrid', got {cfg.reward!r}")


class OnlineTrainer:
    """GDPO-SR, DGPO and Flow-GRPO on any ``TinyPolicy``-like policy (reads an ``OnlineConfig``)."""

    def __init__(self, policy: TinyPolicy, cfg: OnlineConfig, out: str | Path, reward=None):
        validate(cfg)
        if cfg.method not in ("gdpo", "dgpo", "grpo"):
            raise ValueError(f"unknown online method {cfg.method!r}")
        self.policy, self.cfg, self.out = policy, cfg, Path(out)
        self.reward = reward or build_reward(cfg)
        data = make_lr_set(cfg.lr_set)
        self.ids = [d.lr_id for d in data]
        self.prompts = [d.prompt for d in data]
        self.lr = torch.stack([d.lr for d in data])
        self.hr = torch.stack([d.hr for d in data])
        policy.freeze_reference()
        self.accel = Accel()
        opt = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.opt = self.accel.prepare(policy, opt)
        # what trains (LoRA adapters on a diffusers backend): checkpointed, and averaged for rollouts
        self.trained = trainable_named_parameters(policy.model, policy.trainable_parameters())
        self.ema = ParamEMA(self.trained)
        self.lr, self.hr = self.lr.to(self.accel.device), self.hr.to(self.accel.device)
        # each rank rolls out its own LR batch; one process reproduces the seed exactly
        self.gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * self.accel.rank)
        self.step = 0
        self.reward_evals = 0
        self.elapsed = 0.0

    # ------------------------------------------------------------------ pieces
    def _rollout_ctx(self):
        src = self.cfg.rollout_from
        if src == "reference":
            return self.policy.reference()
        if src == "ema":
            return self.ema.swapped_in()
        if src == "policy":
            return contextlib.nullcontext()
        raise ValueError(f"rollout_from must be reference, ema or policy, got {src!r}")

    def rollout(self, cond, n: int):
        c, G = self.cfg, self.cfg.group
        noise = torch.randn((n * G, *self.policy.noise_shape(cond)[1:]), generator=self.gen).to(self.accel.device)
        with torch.no_grad(), self._rollout_ctx():
            if c.method == "grpo":
                sampler = "ddpm" if c.sampler == "ddpm" else "sde"  # ControlNetSD's ancestral DDPM, or the policy's SDE
                return self.policy.sample(cond, noise, sampler=sampler, steps=c.steps, generator=self.gen, noise_level=c.noise_level)
            return self.policy.sample(cond, noise, sampler=c.sampler, steps=c.steps)

    def score(self, images: torch.Tensor, idx: list[int]):
        n, G = len(idx), self.cfg.group
        sr = images.reshape(n, G, *images.shape[1:])
        try:
            out = self.reward(sr, self.hr[idx])
        except MetricError as e:
            raise NonFiniteRewardError(f"{e} — LR ids in this batch: {', '.join(self.ids[i] for i in idx)}") from None
        bad = ~torch.isfinite(out.total)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise NonFiniteRewardError(f"non-finite reward for LR {self.ids[idx[i]]}")
        self.reward_evals += n * G
        return out

    def loss(self, cond, samples, adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        c, p = self.cfg, self.policy
        n, G = adv.shape
        x = samples.images
        if c.method == "gdpo":
            t = torch.full((n * G,), p.config.t_noise)
            tm = torch.tensor(p.config.t_diff)
            eps = torch.randn(dsm_noise_shape(p, x), generator=self.gen).to(x.device)  # fresh noise for the DSM term
            d = p.dsm(x, cond, t, eps, t_model=tm)
            with torch.no_grad(), p.reference():
                d_ref = p.dsm(x, cond, t, eps, t_model=tm)
            loss, st = gdpo_loss(d.view(n, G), d_ref.view(n, G), adv, c.beta)
            self.accel.backward(loss)
            return loss, st
        if c.method == "dgpo":
            t = group_shared_timesteps(n, G, self.gen, c.t_min, c.t_max).to(x.device)
            eps = group_shared_noise(n, G, dsm_noise_shape(p, x)[1:], self.gen).to(x.device)
            d = p.dsm(x, cond, t, eps)
            with torch.no_grad(), p.reference():
                d_ref = p.dsm(x, cond, t, eps)
            loss, st = dgpo_loss(d.view(n, G), d_ref.view(n, G), adv, c.beta)
            self.accel.backward(loss)
            return loss, st
        # grpo: every step of the SDE trajectory, gradients accumulated
        traj, old_lp, sig = samples.trajectory, samples.log_probs, samples.sigmas
        cond = cond.repeat(G)
        S = traj.shape[1] - 1
        a = adv.reshape(-1)
        total, agg = 0.0, {}
        for i in range(S):
            _, lp, mean, std = p.sde_step(cond, traj[:, i], sig, i, prev_sample=traj[:, i + 1], noise_level=c.noise_level)
            if float(std) <= 0:  # a deterministic transition carries no policy gradient
                continue
            with torch.no_grad(), p.reference():
                _, _, mean_ref, _ = p.sde_step(cond, traj[:, i], sig, i, prev_sample=traj[:, i + 1], noise_level=c.noise_level)
            kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std**2)
            loss, st = grpo_loss(lp, old_lp[:, i], a, c.clip_range, kl=kl, kl_beta=c.kl_beta, adv_clip=c.adv_clip)
            self.accel.backward(loss / S)
            total += float(loss.detach()) / S
            for k, v in st.items():
                agg[k] = agg.get(k, 0.0) + float(v) / S
        return torch.tensor(total), agg

    def _update_ema(self) -> None:
        self.ema.update(min(self.cfg.ema_max, self.cfg.ema_ramp * self.step))

    def _save(self, ck: Path, sync: bool = False) -> None:
        """Checkpoint. Every rank writes its own generator state first; ``sync`` (the periodic
        checkpoints, which every rank reaches) waits for all of them before the json lands."""
        save_rank_generators(ck, self.step, self.accel.rank, {"data": self.gen})
        if sync:
            self.accel.wait()
        if not self.accel.is_main:
            return
        save_training_state(ck, self.step, {"trained": self.trained, "ema": self.ema.state}, self.opt,
                            extra={"reward_evals": self.reward_evals, "elapsed": self.elapsed}, generators={"data": self.gen})

    # ------------------------------------------------------------------ loop
    def train(self, resume: bool = False, progress: bool = True, max_seconds: float | None = None, callback=None) -> TinyPolicy:
        """Run to ``steps_total`` (or ``max_seconds`` of training time). ``callback(trainer)`` runs
        after every step, outside the timed region (benchmarks evaluate there); returning
        True stops the run after a checkpoint."""
        c, out = self.cfg, self.out
        if resume:
            check_resume(out, c)
        out.mkdir(parents=True, exist_ok=True)
        save_config(c, out / "config.yaml")
        ck = out / "checkpoint"
        if resume and has_checkpoint(ck):
            meta = load_training_state(ck, {"trained": self.trained, "ema": self.ema.state}, self.opt, {"data": self.gen}, self.accel.rank)
            self.step = meta["step"]
            self.reward_evals = meta["extra"]["reward_evals"]
            self.elapsed = meta["extra"]["elapsed"]
        main = self.accel.is_main
        logger = MetricLogger(out, resume_step=self.step if resume else None) if main else None
        pbar = tqdm(range(self.step, c.steps_total), initial=self.step, total=c.steps_total, desc=f"train {c.method}", disable=not (progress and main))
        for step in pbar:
            t0 = time.time()
            for g in self.opt.param_groups:
                g["lr"] = warmup_lr(step, c.lr, c.warmup)
            idx = torch.randint(len(self.ids), (c.batch_lr,), generator=self.gen).tolist()
            cond = condition_captioned(self.policy, self.lr[idx], [self.prompts[i] for i in idx])
            samples = self.rollout(cond, len(idx))
            try:
                rw = self.score(samples.images, idx)
            except NonFiniteRewardError:
                self._save(ck)
                if logger is not None:
                    logger.close()
                raise
            adv = group_advantages(rw.total, eps=c.adv_eps)
            self.opt.zero_grad(set_to_none=True)
            loss, st = self.loss(cond, samples, adv)
            gn = self.accel.sync_and_clip(self.policy.trainable_parameters(), c.grad_clip)
            self.opt.step()
            self.step = step + 1
            self._update_ema()
            self.elapsed += time.time() - t0
            zero = float((adv.abs().sum(1) == 0).float().mean())
            rec = {"loss": float(loss.detach()), "reward_mean": float(rw.total.mean()), "reward_std": float(rw.total.std(1).mean()),
                   "grad_norm": float(gn), "zero_std_ratio": zero, "reward_evals": self.reward_evals, "elapsed": self.elapsed,
                   **{f"raw_{k}": float(v.mean()) for k, v in rw.per_metric.items()}, **{k: float(v) for k, v in st.items()}}
            if logger is not None:
                logger.log(step, **rec)
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", r=f"{rec['reward_mean']:.3f}")
            if self.step % c.checkpoint_every == 0 or self.step == c.steps_total:
                self._save(ck, sync=True)
            if callback is not None and callback(self) is True:  # the callback asks to stop
                self._save(ck)
                break
            if max_seconds is not None and self.elapsed >= max_seconds:
                self._save(ck)
                break
        self.accel.wait()
        if main:
            logger.close()
            self.policy.save(out / "policy")
        return self.policy
