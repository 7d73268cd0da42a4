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

Overlap (``overlap_rollouts``, where the method allows it): when step k+1's rollouts do not
depend on step k's update — ``rollout_from=reference``, the frozen π_ref (GDPO-SR's default) —
a background thread draws step k+1's LR batch and rolls it out while the main thread scores
step k's rewards (torch ops release the GIL; rewards never touch the model) and runs its update.
The thread samples through the policy's ``reference_policy()`` view, which shares the networks
but not the switch to π_ref; a backend without one (LoRA adapters are disabled module-wide by
``reference()``) overlaps the scoring only: its update waits for the rollout. Every random draw
comes from the trainer's seeded generator in one fixed order (LR batch, rollout noise, then the
step's loss noise, drawn before the next rollout starts), so both paths give the same
parameters; checkpoints hold the generator as it was at the end of the step.
Rollouts from the policy or the EMA (which the update moves), GRPO's default, stay sequential.

Mixed precision (``mixed_precision`` bf16 / fp16): every network forward (rollouts, DSM terms,
SDE transitions) runs under ``Accel.autocast``; losses are computed in float32 from the
float32-cast outputs, trainable parameters and their gradients stay float32.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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
from ..rewards.base import MetricError
from ..rewards.build import build_reward
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


@dataclass
class _Batch:
    """One step's rollout batch: LR indices, HR crops [n,3,H,W], the condition and the samples."""

    idx: list[int]
    hr: torch.Tensor
    cond: object
    samples: object


def _f32(out):
    """A forward's output (a tensor or a tuple of them) as float32 (autocast may give bf16/fp16)."""
    if isinstance(out, tuple):
        return tuple(o.float() if torch.is_tensor(o) else o for o in out)
    return out.float()


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
        self.accel = Accel(cfg.mixed_precision)
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
        # the overlapped path rolls out through a view whose reference() touches no shared state
        # (the tiny policy's); without one (LoRA backends switch adapters module-wide) the update
        # waits for the background rollout
        view = getattr(policy, "reference_policy", None)
        self._roll_policy = view() if view is not None and cfg.rollout_from == "reference" else policy
        self.overlap, self.rollout_path = self._overlap_plan()

    def _overlap_plan(self) -> tuple[bool, str]:
        """(overlap?, the sentence logged once): whether step k+1's rollouts may be made while
        step k's rewards are scored — only when the rolling-out model is the frozen reference."""
        c = self.cfg
        if not c.overlap_rollouts:
            return False, "sequential (overlap_rollouts=false)"
        if c.rollout_from != "reference":
            return False, (f"sequential: rollouts come from the {c.rollout_from} (rollout_from={c.rollout_from}), "
                           f"which each update moves, so step k+1's rollouts must wait for step k's update")
        if self._roll_policy is not self.policy:
            return True, "overlapped: step k+1's rollouts (frozen reference) run while step k's rewards are scored and its update runs"
        return True, (f"overlapped: step k+1's rollouts (frozen reference) run while step k's rewards are scored; the update "
                      f"waits for them ({type(self.policy).__name__}.reference() switches modules the update uses)")

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

    def rollout(self, cond, n: int, policy=None):
        """G samples per LR of ``cond`` from the configured model (``policy``: the policy object
        to sample with, default the trainer's; the overlapped path passes its reference view)."""
        c, G = self.cfg, self.cfg.group
        pol = policy or self.policy
        noise = torch.randn((n * G, *pol.noise_shape(cond)[1:]), generator=self.gen).to(self.accel.device)
        ctx = pol.reference() if pol is not self.policy else self._rollout_ctx()
        with torch.no_grad(), ctx, self.accel.autocast():
            if c.method == "grpo":
                sampler = "ddpm" if c.sampler == "ddpm" else "sde"  # ControlNetSD's ancestral DDPM, or the policy's SDE
                out = pol.sample(cond, noise, sampler=sampler, steps=c.steps, generator=self.gen, noise_level=c.noise_level)
            else:
                traj = c.method == "dgpo" and c.train_timesteps == "discrete"  # the schedule's sigmas are needed
                out = pol.sample(cond, noise, sampler=c.sampler, steps=c.steps, **({"return_trajectory": True} if traj else {}))
        if self.accel.mixed_precision != "no":  # rewards and losses see float32 samples
            for f in ("images", "trajectory", "log_probs", "sigmas"):
                v = getattr(out, f, None)
                if v is not None and v.is_floating_point():
                    setattr(out, f, v.float())
        return out

    def _prepare(self) -> _Batch:
        """Draw the next LR batch (trainer generator), condition it and roll it out. Touches only
        the data, the frozen conditioning networks, the rolling-out model and ``self.gen``."""
        pol = self._roll_policy if self.overlap else self.policy
        idx = torch.randint(len(self.ids), (self.cfg.batch_lr,), generator=self.gen).tolist()
        _, lr, hr, prompts = self.data.batch(idx)
        with self.accel.autocast():
            cond = condition_captioned(pol, lr.to(self.accel.device), prompts)
        return _Batch(idx, hr, cond, self.rollout(cond, len(idx), pol))

    def loss_noise(self, samples, n: int) -> dict:
        """Every random draw of one step's update, in the order the update uses them: gdpo the
        DSM's ε; dgpo the shared levels (discrete), then (t, ε) per level; grpo the shuffles of
        its mini-batches. Drawn before the next rollout starts, so that both paths draw alike."""
        c, p, G = self.cfg, self.policy, self.cfg.group
        x = samples.images
        if c.method == "gdpo":
            return {"eps": torch.randn(dsm_noise_shape(p, x), generator=self.gen).to(x.device)}
        if c.method == "dgpo":
            if c.train_timesteps == "discrete":
                levels = discrete_shared_timesteps(samples.sigmas, c.trunc_steps, c.n_train_timesteps, self.gen).tolist()
            else:
                levels = [None]
            draws = []
            for lvl in levels:
                if lvl is None:
                    t = group_shared_timesteps(n, G, self.gen, c.t_min, c.t_max).to(x.device)
                else:
                    t = torch.full((n * G,), float(lvl), device=x.device)
                draws.append((t, group_shared_noise(n, G, dsm_noise_shape(p, x)[1:], self.gen).to(x.device)))
            return {"draws": draws}
        n_mb = getattr(c, "minibatches", 1)
        plans = [list(torch.randperm(n * G, generator=self.gen).tensor_split(n_mb)) if n_mb > 1 else [None]
                 for _ in range(getattr(c, "inner_epochs", 1))]
        return {"plans": plans}

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

    def loss(self, cond, samples, adv: torch.Tensor, rows: torch.Tensor | None = None, noise: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Back-propagate the method's loss on the rollout batch (``rows``: GRPO's mini-batch of
        samples) into the trainable parameters' ``.grad``; returns (loss value, stats).
        ``noise``: the step's ``loss_noise`` (drawn here from the trainer's generator when None)."""
        if self.cfg.method == "grpo":
            return self._grpo(cond, samples, adv, rows)
        noise = noise or self.loss_noise(samples, adv.shape[0])
        if self.cfg.method == "gdpo":
            return self._gdpo(cond, samples, adv, noise["eps"])
        return self._dgpo(cond, samples, adv, noise["draws"])

    def _fwd(self, fn, *a, **k):
        """``fn(*a, **k)`` under autocast (mixed_precision), its output as float32."""
        with self.accel.autocast():
            return _f32(fn(*a, **k))

    def _gdpo(self, cond, samples, adv, eps):
        p, kw = self.policy, self._dsm_kw
        n, G = adv.shape
        x = samples.images
        t = torch.full((n * G,), p.config.t_noise)
        tm = torch.tensor(p.config.t_diff)
        chunks = self._chunks(n * G)
        if len(chunks) == 1:
            d = self._fwd(p.dsm, x, cond, t, eps, t_model=tm, **kw)
            with torch.no_grad(), p.reference():
                d_ref = self._fwd(p.dsm, x, cond, t, eps, t_model=tm, **kw)
            loss, st = gdpo_loss(d.view(n, G), d_ref.view(n, G), adv, self.beta)
            self.accel.backward(loss)
            return loss, st
        cf = cond.repeat(G)
        dsm = lambda r: self._fwd(p.dsm, x[r], cf.index(r), t[r], eps[r], t_model=tm, **kw)  # noqa: E731
        with torch.no_grad():
            d = torch.cat([dsm(r) for r in chunks])
            with p.reference():
                d_ref = torch.cat([dsm(r) for r in chunks])
        coef, loss, st = gdpo_grad_weights(d.view(n, G), d_ref.view(n, G), adv, self.beta)
        coef = coef.reshape(-1)
        for r in chunks:
            self.accel.backward((coef[r] * dsm(r)).sum())
        return loss, st

    def _dgpo(self, cond, samples, adv, draws):
        c, p = self.cfg, self.policy
        n, G = adv.shape
        x = samples.images
        n_levels = len(draws)  # one (t, ε) per trained noise level
        kl_on = c.kl_beta > 0
        ref_ctx = (lambda: self.ema.swapped_in()) if c.ref_model == "ema" else p.reference
        chunks = self._chunks(n * G)
        cf = cond.repeat(G) if len(chunks) > 1 else cond
        total, agg = 0.0, {}
        for t, eps in draws:

            def dsm(r, pred=False, t=t, eps=eps):
                if len(chunks) == 1:
                    return self._fwd(p.dsm, x, cond, t, eps, **({"return_prediction": True} if pred else {}))
                return self._fwd(p.dsm, x[r], cf.index(r), t[r], eps[r], **({"return_prediction": True} if pred else {}))

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
                self.accel.backward(loss / n_levels if n_levels > 1 else loss)
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
                    self.accel.backward(sur / n_levels)
            total += float(loss.detach()) / n_levels
            for k, v in st.items():
                agg[k] = agg.get(k, 0.0) + float(v) / n_levels
        if n_levels == 1 and len(chunks) == 1:
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
                _, lp, mean, std = self._fwd(p.sde_step, cr, traj[r, i], sig, i, prev_sample=traj[r, i + 1], noise_level=c.noise_level)
                with torch.no_grad(), p.reference():
                    _, _, mean_ref, _ = self._fwd(p.sde_step, cr, traj[r, i], sig, i, prev_sample=traj[r, i + 1], noise_level=c.noise_level)
                kl = transition_kl(mean, mean_ref, std, sig[i + 1] - sig[i], c.kl_form)
                loss, st = grpo_loss(lp, old_lp[r, i], a[r], c.clip_range, kl=kl, kl_beta=c.kl_beta, adv_clip=c.adv_clip)
                self.accel.backward(loss / S if frac == 1.0 else loss * frac / S)
                total += float(loss.detach()) * frac / S
                for k, v in st.items():
                    agg[k] = agg.get(k, 0.0) + float(v) * frac / S
        return torch.tensor(total), agg

    def update(self, cond, samples, adv: torch.Tensor, noise: dict | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The optimizer updates of one rollout batch: one for gdpo / dgpo; for grpo
        ``inner_epochs`` × ``minibatches`` (samples shuffled when split). ``noise``: the step's
        ``loss_noise`` (drawn now when None). Returns (loss, stats, grad norm), loss and stats
        averaged over the updates, the last update's grad norm."""
        noise = noise or self.loss_noise(samples, adv.shape[0])
        plans = noise["plans"] if self.cfg.method == "grpo" else [[None]]
        losses, agg, count = [], {}, 0
        for plan in plans:
            for rows in plan:
                self.opt.zero_grad(set_to_none=True)
                loss, st = self.loss(cond, samples, adv, rows, noise)
                gn = self.accel.sync_and_clip(self.policy.trainable_parameters(), self.cfg.grad_clip)
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

    def _save(self, ck: Path, sync: bool = False, gen_state: torch.Tensor | None = None) -> None:
        """Checkpoint. Every rank writes its own generator state first; ``sync`` (the periodic
        checkpoints, which every rank reaches) waits for all of them before the json lands.
        ``gen_state``: the generator as of the end of the step (the overlapped path has already
        drawn the next batch from it); None: its current state."""
        gen = self.gen
        if gen_state is not None:
            gen = torch.Generator()
            gen.set_state(gen_state)
        save_rank_generators(ck, self.step, self.accel.rank, {"data": gen})
        if sync:
            self.accel.wait()
        if not self.accel.is_main:
            return
        save_training_state(ck, self.step, {"trained": self.trained, "ema": self.ema.state}, self.opt,
                            extra={"reward_evals": self.reward_evals, "elapsed": self.elapsed}, generators={"data": gen})

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
        log.info("%s rollouts: %s", c.method, self.rollout_path)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sralign-rollout") if self.overlap else None
        pending: Future | None = None
        end_state = None
        pbar = tqdm(range(self.step, c.steps_total), initial=self.step, total=c.steps_total, desc=f"train {c.method}", disable=not (progress and main))
        try:
            for step in pbar:
                t0 = time.time()
                for g in self.opt.param_groups:
                    g["lr"] = warmup_lr(step, c.lr, c.warmup)
                b = pending.result() if pending is not None else self._prepare()
                pending = None
                n = len(b.idx)
                rolled = self.gen.get_state()  # before the step's loss noise (kept by a reward-error checkpoint)
                noise = self.loss_noise(b.samples, n)
                end_state = self.gen.get_state()  # the generator at the end of this step, in both paths
                if pool is not None and step + 1 < c.steps_total:
                    pending = pool.submit(self._prepare)  # step k+1's batch and rollouts, while step k scores
                try:
                    rw = self.score(b.samples.images, b.idx, b.hr.to(self.accel.device))
                except NonFiniteRewardError:
                    self._settle(pending)
                    pending = None
                    self._save(ck, gen_state=rolled)
                    if logger is not None:
                        logger.close()
                    raise
                adv = self.advantages(rw.total)
                if pending is not None and self._roll_policy is self.policy:
                    pending.exception()  # the rollout switches modules the update uses (reference()): wait for it
                loss, st, gn = self.update(b.cond, b.samples, adv, noise)
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
                    self._save(ck, sync=True, gen_state=end_state)
                if callback is not None:
                    self._settle(pending)  # the callback sees the trainer at rest
                if callback is not None and callback(self) is True:  # the callback asks to stop
                    self._save(ck, gen_state=end_state)
                    break
                if max_seconds is not None and self.elapsed >= max_seconds:
                    self._save(ck, gen_state=end_state)
                    break
        finally:
            self._settle(pending)
            if pool is not None:
                pool.shutdown(wait=True)
        if end_state is not None:  # a stop after a prefetch: the generator as the step left it
            self.gen.set_state(end_state)
        self.accel.wait()
        if main:
            logger.close()
            self.policy.save(out / "policy")
        return self.policy

    @staticmethod
    def _settle(pending: Future | None) -> None:
        """Wait until an outstanding prefetch has finished (its result, or error, stays in it)."""
        if pending is not None:
            pending.exception()
