"""The online trainer: rollout group -> reward -> advantages -> loss -> update -> EMA.

One loop, three methods; they differ only in the rollout sampler and the loss:

    gdpo   onestep rollouts; dsm re-noised at t_noise, queried at t_diff; ``gdpo_loss``
    dgpo   ode rollouts; group-shared t ~ U[t_min, t_max] (or a few discrete high-noise levels
           of the rollout schedule shared by the batch) and ε; ``dgpo_loss`` (+ DSM clip, KL)
    grpo   sde rollouts with log-probs; PPO-clip over the first int(S·timestep_fraction) steps;
           KL to π_ref; ``minibatches`` optimizer updates per rollout batch; ``grpo_loss``

Micro-batching (``micro_batch`` > 0) gives the one-shot gradient: for gdpo / dgpo every
sample's denoising loss (policy, reference, EMA) is computed first without grad, the group terms
give each sample a weight (``gdpo_grad_weights`` / ``dgpo_grad_weights``), and each micro-batch
then back-propagates Σ weight·d over its own samples; grpo's per-transition terms simply
accumulate, each micro-batch weighted by its share of the batch.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import save_config, validate
from ..losses import (
    dgpo_grad_weights, dgpo_loss, discrete_shared_timesteps, gdpo_grad_weights, gdpo_loss, group_advantages,
    group_shared_noise, group_shared_timesteps, grpo_loss, transition_kl,
)
from ..policies.base import condition_captioned, dsm_noise_shape
from ..policies.tiny import TinyPolicy
from ..rewards.attribute import AttributeReward
from ..rewards.base import MetricError
from ..rewards.hybrid import HybridReward
from ..data.lrset import LRSet
from .accel import Accel
from .checkpoint import check_resume, has_checkpoint, load_training_state, save_rank_generators, save_training_state
from .ema import ParamEMA, trainable_named_parameters
from .logging_utils import MetricLogger
from .offline import warmup_lr
from .online_config import OnlineConfig, gdpo_beta

log = logging.getLogger(__name__)


class NonFiniteRewardError(RuntimeError):
    pass


def build_reward(cfg: OnlineConfig):
    if cfg.reward == "attribute":
        return AttributeReward.from_names(cfg.nr_metrics, rule=cfg.texture_rule)
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
        self.data = LRSet(cfg.lr_set)  # items made on demand: the set is never stacked on the device
        self.ids = [self.data.lr_id(i) for i in range(len(self.data))]
        policy.freeze_reference()
        self.accel = Accel()
        opt = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.opt = self.accel.prepare(policy, opt)
        # what trains (LoRA adapters on a diffusers backend): checkpointed, and averaged for rollouts
        self.trained = trainable_named_parameters(policy.model, policy.trainable_parameters())
        self.ema = ParamEMA(self.trained)
        # each rank rolls out its own LR batch; one process reproduces the seed exactly
        self.gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * self.accel.rank)
        self.step = 0
        self.reward_evals = 0
        self.elapsed = 0.0
        self.beta = gdpo_beta(cfg, policy) if cfg.method == "gdpo" else float(cfg.beta)
        dsm_args = inspect.signature(policy.dsm).parameters
        # GDPO's ε-prediction DSM: policies whose dsm has no ``target`` measure ε already (OneStepSD)
        self._dsm_kw = {"target": "eps"} if cfg.method == "gdpo" and getattr(cfg, "dsm_target", "policy") == "eps" and "target" in dsm_args else {}
        if cfg.method == "dgpo" and cfg.kl_beta > 0 and "return_prediction" not in dsm_args:
            raise ValueError(f"kl_beta > 0 needs the network's prediction from dsm(..., return_prediction=True), which "
                             f"{type(policy).__name__} does not offer: set kl_beta=0")
        log.info("%s: beta %g, preset %s", cfg.method, self.beta, cfg.preset)

    # ------------------------------------------------------------------ pieces
    def _rollout_ctx(self):
        src = self.cfg.rollout_from
        if src == "ema" and self.cfg.switch_ema_ref and self.step <= self.cfg.switch_ema_ref:
            return contextlib.nullcontext()  # DGPO's code: the policy rolls out until step > switch_ema_ref
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
            traj = c.method == "dgpo" and c.train_timesteps == "discrete"  # the schedule's sigmas are needed
            return self.policy.sample(cond, noise, sampler=c.sampler, steps=c.steps, **({"return_trajectory": True} if traj else {}))

    def score(self, images: torch.Tensor, idx: list[int], hr: torch.Tensor):
        n, G = len(idx), self.cfg.group
        sr = images.reshape(n, G, *images.shape[1:])
        try:
            out = self.reward(sr, hr)
        except MetricError as e:
            raise NonFiniteRewardError(f"{e} — LR ids in this batch: {', '.join(self.ids[i] for i in idx)}") from None
        bad = ~torch.isfinite(out.total)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise NonFiniteRewardError(f"non-finite reward for LR {self.ids[idx[i]]}")
        self.reward_evals += n * G
        return out

    def advantages(self, r: torch.Tensor) -> torch.Tensor:
        """Group advantages [n,G] with the configured std (per group / global over every rank's
        batch, Bessel or population), eps and clamp."""
        c = self.cfg
        pool = None
        if c.adv_global_std and self.accel.world > 1:
            parts = [torch.empty_like(r) for _ in range(self.accel.world)]
            torch.distributed.all_gather(parts, r.contiguous())
            pool = torch.cat(parts)
        return group_advantages(r, eps=c.adv_eps, unbiased=c.adv_unbiased, clip=c.adv_clip,
                                global_std=c.adv_global_std, all_rewards=pool)

    def _chunks(self, count: int, rows: torch.Tensor | None = None) -> list:
        """Row selections of at most ``micro_batch`` samples covering ``rows`` (default all
        ``count``); one ``slice(None)`` when everything fits at once."""
        mb = self.cfg.micro_batch
        n = count if rows is None else len(rows)
        if not mb or mb >= n:
            return [slice(None) if rows is None else rows]
        return list((torch.arange(count) if rows is None else rows).split(mb))

    def loss(self, cond, samples, adv: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Back-propagate the method's loss on the rollout batch (``rows``: GRPO's mini-batch of
        samples) into the trainable parameters' ``.grad``; returns (loss value, stats)."""
        if self.cfg.method == "gdpo":
            return self._gdpo(cond, samples, adv)
        if self.cfg.method == "dgpo":
            return self._dgpo(cond, samples, adv)
        return self._grpo(cond, samples, adv, rows)

    def _gdpo(self, cond, samples, adv):
        p, kw = self.policy, self._dsm_kw
        n, G = adv.shape
        x = samples.images
        t = torch.full((n * G,), p.config.t_noise)
        tm = torch.tensor(p.config.t_diff)
        eps = torch.randn(dsm_noise_shape(p, x), generator=self.gen).to(x.device)  # fresh noise for the DSM term
        chunks = self._chunks(n * G)
        if len(chunks) == 1:
            d = p.dsm(x, cond, t, eps, t_model=tm, **kw)
            with torch.no_grad(), p.reference():
                d_ref = p.dsm(x, cond, t, eps, t_model=tm, **kw)
            loss, st = gdpo_loss(d.view(n, G), d_ref.view(n, G), adv, self.beta)
            self.accel.backward(loss)
            return loss, st
        cf = cond.repeat(G)
        dsm = lambda r: p.dsm(x[r], cf.index(r), t[r], eps[r], t_model=tm, **kw)  # noqa: E731
        with torch.no_grad():
            d = torch.cat([dsm(r) for r in chunks])
            with p.reference():
                d_ref = torch.cat([dsm(r) for r in chunks])
        coef, loss, st = gdpo_grad_weights(d.view(n, G), d_ref.view(n, G), adv, self.beta)
        coef = coef.reshape(-1)
        for r in chunks:
            self.accel.backward((coef[r] * dsm(r)).sum())
        return loss, st

    def _dgpo(self, cond, samples, adv):
        c, p = self.cfg, self.policy
        n, G = adv.shape
        x = samples.images
        if c.train_timesteps == "discrete":
            levels = discrete_shared_timesteps(samples.sigmas, c.trunc_steps, c.n_train_timesteps, self.gen).tolist()
        else:
            levels = [None]
        kl_on = c.kl_beta > 0
        ref_ctx = (lambda: self.ema.swapped_in()) if c.ref_model == "ema" else p.reference
        chunks = self._chunks(n * G)
        cf = cond.repeat(G) if len(chunks) > 1 else cond
        total, agg = 0.0, {}
        for lvl in levels:
            if lvl is None:
                t = group_shared_timesteps(n, G, self.gen, c.t_min, c.t_max).to(x.device)
            else:
                t = torch.full((n * G,), float(lvl), device=x.device)
            eps = group_shared_noise(n, G, dsm_noise_shape(p, x)[1:], self.gen).to(x.device)

            def dsm(r, pred=False):
                if len(chunks) == 1:
                    return p.dsm(x, cond, t, eps, **({"return_prediction": True} if pred else {}))
                return p.dsm(x[r], cf.index(r), t[r], eps[r], **({"return_prediction": True} if pred else {}))

            def run(fn):  # no-grad values over every chunk
                outs = [fn(r) for r in chunks]
                return torch.cat(outs) if not isinstance(outs[0], tuple) else tuple(torch.cat(o) for o in zip(*outs))

            with torch.no_grad():
                v_ref = None
                if kl_on and c.ref_model == "frozen":
                    with p.reference():
                        d_ref, v_ref = run(lambda r: dsm(r, True))
                else:
                    with ref_ctx():
                        d_ref = run(dsm)
                    if kl_on:
                        with p.reference():
                            _, v_ref = run(lambda r: dsm(r, True))
                d_old = None
                if c.clip_dsm:
                    with self.ema.swapped_in():
                        d_old = run(dsm).view(n, G)
            clip = c.dsm_clip_range if c.clip_dsm else None
            if len(chunks) == 1:
                out = dsm(None, kl_on)
                d, v = out if kl_on else (out, None)
                kl = ((v - v_ref) ** 2).flatten(1).mean(1) if kl_on else None
                loss, st = dgpo_loss(d.view(n, G), d_ref.view(n, G), adv, self.beta, form=c.loss_form,
                                     d_old=d_old, clip_range=clip, kl=kl, kl_beta=c.kl_beta)
                self.accel.backward(loss / len(levels) if len(levels) > 1 else loss)
            else:
                with torch.no_grad():
                    out = run(lambda r: dsm(r, kl_on))
                d = out[0] if kl_on else out
                coef, loss, st = dgpo_grad_weights(d.view(n, G), d_ref.view(n, G), adv, self.beta, form=c.loss_form,
                                                   d_old=d_old, clip_range=clip)
                coef = coef.reshape(-1)
                if kl_on:
                    kl_all = ((out[1] - v_ref) ** 2).flatten(1).mean(1)
                    loss = loss + c.kl_beta * kl_all.mean()
                    st["kl"] = kl_all.mean()
                for r in chunks:
                    o = dsm(r, kl_on)
                    dm, vm = o if kl_on else (o, None)
                    sur = (coef[r] * dm).sum()
                    if kl_on:
                        sur = sur + c.kl_beta * ((vm - v_ref[r]) ** 2).flatten(1).mean(1).sum() / (n * G)
                    self.accel.backward(sur / len(levels))
            total += float(loss.detach()) / len(levels)
            for k, v in st.items():
                agg[k] = agg.get(k, 0.0) + float(v) / len(levels)
        if len(levels) == 1 and len(chunks) == 1:
            return loss, st
        return torch.tensor(total), agg

    def _grpo(self, cond, samples, adv, rows=None):
        c, p = self.cfg, self.policy
        traj, old_lp, sig = samples.trajectory, samples.log_probs, samples.sigmas
        G = adv.shape[1]
        cf = cond.repeat(G)
        S = max(1, int((traj.shape[1] - 1) * c.timestep_fraction))  # Flow-GRPO: int(0.99·10) = 9
        a = adv.reshape(-1)
        total_rows = a.numel() if rows is None else len(rows)
        chunks = self._chunks(a.numel(), rows)
        total, agg = 0.0, {}
        for i in range(S):
            for r in chunks:
                frac = 1.0 if isinstance(r, slice) else len(r) / total_rows
                cr = cf if isinstance(r, slice) else cf.index(r)
                _, lp, mean, std = p.sde_step(cr, traj[r, i], sig, i, prev_sample=traj[r, i + 1], noise_level=c.noise_level)
                with torch.no_grad(), p.reference():
                    _, _, mean_ref, _ = p.sde_step(cr, traj[r, i], sig, i, prev_sample=traj[r, i + 1], noise_level=c.noise_level)
                kl = transition_kl(mean, mean_ref, std, sig[i + 1] - sig[i], c.kl_form)
                loss, st = grpo_loss(lp, old_lp[r, i], a[r], c.clip_range, kl=kl, kl_beta=c.kl_beta, adv_clip=c.adv_clip)
                self.accel.backward(loss / S if frac == 1.0 else loss * frac / S)
                total += float(loss.detach()) * frac / S
                for k, v in st.items():
                    agg[k] = agg.get(k, 0.0) + float(v) * frac / S
        return torch.tensor(total), agg

    def update(self, cond, samples, adv: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The optimizer updates of one rollout batch: one for gdpo / dgpo; for grpo
        ``inner_epochs`` × ``minibatches`` (samples shuffled when split). Returns (loss, stats,
        grad norm), loss and stats averaged over the updates, the last update's grad norm."""
        c = self.cfg
        n_mb = getattr(c, "minibatches", 1)
        plans = [[None]]
        if c.method == "grpo":
            plans = []
            for _ in range(c.inner_epochs):
                plans.append(list(torch.randperm(adv.numel(), generator=self.gen).tensor_split(n_mb)) if n_mb > 1 else [None])
        losses, agg, count = [], {}, 0
        for plan in plans:
            for rows in plan:
                self.opt.zero_grad(set_to_none=True)
                loss, st = self.loss(cond, samples, adv, rows)
                gn = self.accel.sync_and_clip(self.policy.trainable_parameters(), c.grad_clip)
                self.opt.step()
                losses.append(float(loss.detach()))
                for k, v in st.items():
                    agg[k] = agg.get(k, 0.0) + float(v)
                count += 1
        if count == 1:
            return loss, st, gn
        return torch.tensor(sum(losses) / count), {k: v / count for k, v in agg.items()}, gn

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
            _, lr, hr, prompts = self.data.batch(idx)
            cond = condition_captioned(self.policy, lr.to(self.accel.device), prompts)
            samples = self.rollout(cond, len(idx))
            try:
                rw = self.score(samples.images, idx, hr.to(self.accel.device))
            except NonFiniteRewardError:
                self._save(ck)
                if logger is not None:
                    logger.close()
                raise
            adv = self.advantages(rw.total)
            loss, st, gn = self.update(cond, samples, adv)
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
