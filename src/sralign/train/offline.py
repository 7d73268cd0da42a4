"""Offline preference training: a scored candidate store -> pairs -> Diffusion-DPO / DP²O-SR.

Each step draws ``batch_pairs`` pairs, re-noises winner and loser with the *same* t and ε,
evaluates the policy and the frozen reference (``policy.reference()``) and applies ``dpo_loss``
(weighted by HPO weights for DP²O). Checkpoints are atomic; ``resume=True`` continues to the
same final weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import save_config, validate
from ..data.store import CandidateStore
from ..losses import dpo_loss
from ..policies.base import condition_captioned, dsm_noise_shape
from ..policies.tiny import TinyPolicy
from ..rewards.hybrid import HybridReward
from .candidates import Pair, build_pairs
from .accel import Accel
from .checkpoint import check_resume, has_checkpoint, load_training_state, save_rank_generators, save_training_state
from .ema import trainable_named_parameters
from .logging_utils import MetricLogger
from .offline_config import DP2OConfig

log = logging.getLogger(__name__)


def warmup_lr(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / max(1, warmup))


class OfflineTrainer:
    """DP²O-SR / Diffusion-DPO trainer (reads ``DP2OConfig``)."""

    def __init__(self, policy: TinyPolicy, store: CandidateStore, cfg: DP2OConfig, out: str | Path):
        validate(cfg)
        self.policy, self.store, self.cfg, self.out = policy, store, cfg, Path(out)
        self.reward = HybridReward.from_names(cfg.fr_metrics, cfg.nr_metrics)
        self.pairs: list[Pair] = build_pairs(store, self.reward, cfg.n, cfg.method)
        if not self.pairs:
            raise ValueError("no preference pairs: every group's candidates scored equal, or the store is empty")
        self._img: dict[int, torch.Tensor] = {}
        self._lr: dict[str, torch.Tensor] = {}
        self._prompt: dict[str, str | None] = {}
        by_cid = {c.cid: c for c in store.candidates()}
        for p in self.pairs:
            for cid in (p.cid_w, p.cid_l):
                if cid not in self._img:
                    self._img[cid] = store.read_image(by_cid[cid].path)
            if p.lr_id not in self._lr:
                self._lr[p.lr_id] = store.load_lr(p.lr_id)[0]
                self._prompt[p.lr_id] = store.prompt(p.lr_id)
        policy.freeze_reference()
        self.accel = Accel(cfg.mixed_precision)
        opt = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.opt = self.accel.prepare(policy, opt)
        # checkpoints hold what trains (LoRA adapters on a diffusers backend), not the frozen base
        self.trained = trainable_named_parameters(policy.model, policy.trainable_parameters())
        # each rank draws its own pairs; one process reproduces the seed exactly
        self.gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * self.accel.rank)
        self.step = 0

    def loss_on(self, batch: list[Pair]) -> tuple[torch.Tensor, dict]:
        p = self.policy
        dev = self.accel.device
        lr = torch.stack([self._lr[b.lr_id] for b in batch]).to(dev)
        xw = torch.stack([self._img[b.cid_w] for b in batch]).to(dev)
        xl = torch.stack([self._img[b.cid_l] for b in batch]).to(dev)
        k = len(batch)
        captions = [self._prompt[b.lr_id] for b in batch]
        cond = condition_captioned(p, torch.cat([lr, lr]), captions * 2)
        t = self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * torch.rand(k, generator=self.gen)
        t = t.clamp_min(1e-3)
        eps = torch.randn(dsm_noise_shape(p, xw), generator=self.gen).to(dev)
        x = torch.cat([xw, xl])
        tt, ee = torch.cat([t, t]), torch.cat([eps, eps])  # the pair shares t and ε
        with self.accel.autocast():
            d = p.dsm(x, cond, tt, ee).float()
            with torch.no_grad(), p.reference():
                d_ref = p.dsm(x, cond, tt, ee).float()
        weight = torch.tensor([b.weight for b in batch], device=dev) if self.cfg.method == "dp2o" else None
        return dpo_loss(d[:k], d_ref[:k], d[k:], d_ref[k:], self.cfg.beta, weight=weight)

    def train(self, resume: bool = False, progress: bool = True) -> TinyPolicy:
        cfg, out = self.cfg, self.out
        if resume:
            check_resume(out, cfg)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        ck = out / "checkpoint"
        acc = self.accel
        if resume and has_checkpoint(ck):
            meta = load_training_state(ck, {"trained": self.trained}, self.opt, {"data": self.gen}, acc.rank)
            self.step = meta["step"]
            log.info("resumed at step %d", self.step)
        logger = MetricLogger(out, resume_step=self.step if resume else None) if acc.is_main else None
        if acc.is_main:
            (out / "pairs.json").write_text(json.dumps([p.__dict__ for p in self.pairs]))
        pbar = tqdm(range(self.step, cfg.steps), initial=self.step, total=cfg.steps, desc=f"train {cfg.method}", disable=not (progress and acc.is_main))
        t0 = time.time()
        for step in pbar:
            for g in self.opt.param_groups:
                g["lr"] = warmup_lr(step, cfg.lr, cfg.warmup)
            self.opt.zero_grad(set_to_none=True)
            agg: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                idx = torch.randint(len(self.pairs), (cfg.batch_pairs,), generator=self.gen).tolist()
                loss, stats = self.loss_on([self.pairs[i] for i in idx])
                acc.backward(loss / cfg.grad_accum)
                for k, v in {"loss": loss, **stats}.items():
                    agg[k] = agg.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            gn = acc.sync_and_clip(self.policy.trainable_parameters(), cfg.grad_clip)
            self.opt.step()
            self.step = step + 1
            if logger is not None and step % cfg.log_every == 0:
                logger.log(step, **agg, grad_norm=float(gn), lr=warmup_lr(step, cfg.lr, cfg.warmup), elapsed=time.time() - t0)
            pbar.set_postfix(loss=f"{agg['loss']:.4f}", acc=f"{agg['implicit_acc']:.2f}")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                save_rank_generators(ck, self.step, acc.rank, {"data": self.gen})  # each rank draws its own pairs
                acc.wait()
                if acc.is_main:
                    save_training_state(ck, self.step, {"trained": self.trained}, self.opt, generators={"data": self.gen})
        acc.wait()
        if acc.is_main:
            logger.close()
            self.policy.save(out / "policy")
        return self.policy
