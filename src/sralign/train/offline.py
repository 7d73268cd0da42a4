"""Offline preference training: a scored candidate store -> pairs -> Diffusion-DPO / DP²O-SR.

Each step draws ``batch_pairs`` pairs, re-noises winner and loser with the *same* t and ε,
evaluates the policy and the frozen reference (``policy.reference()``) and applies ``dpo_loss``
(weighted by HPO weights for DP²O). A batch goes through ``micro_batch`` pairs at a time with
exact gradients (DP²O's batch of 1024 fits any device); pair images are read from the store per
micro-batch, never cached as float. Checkpoints are atomic; ``resume=True`` continues to the
same final weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import save_config, validate
from ..data.store import Candidate, CandidateStore
from ..losses import dpo_loss
from ..policies.base import condition_captioned, dsm_noise_shape
from ..policies.tiny import TinyPolicy
from ..rewards.build import build_reward
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
        self.reward = build_reward(cfg)
        files: dict[int, Candidate] = {}  # every paired candidate's file, from the pair query itself
        self.pairs: list[Pair] = build_pairs(store, self.reward, cfg.n, cfg.method, key=cfg.store_key or None, files=files)
        if not self.pairs:
            raise ValueError("no preference pairs: every group's candidates scored equal, or the store is empty")
        if cfg.micro_batch < 0:
            raise ValueError(f"micro_batch must be 0 (the whole batch at once) or a number of pairs ≥ 1, got {cfg.micro_batch}")
        # images are read from the store per micro-batch (8-bit PNGs): nothing is cached as float
        # (sha256-checked reads, once per file per process; all pairs share one generation key)
        self._key = self.pairs[0].key_id
        for cid in sorted(files):
            store.check_candidate(files[cid])  # every pair's file present and inside the store before the first step
        del files
        self._lr_cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # recent LR images, uint8
        policy.freeze_reference()
        self.accel = Accel(cfg.mixed_precision)
        opt = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.opt = self.accel.prepare(policy, opt)
        # checkpoints hold what trains (LoRA adapters on a diffusers backend), not the frozen base
        self.trained = trainable_named_parameters(policy.model, policy.trainable_parameters())
        # each rank draws its own pairs; one process reproduces the seed exactly
        self.gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * self.accel.rank)
        self.step = 0

    LR_CACHE = 4096  # LR images kept (uint8) between micro-batches

    def _lr_image(self, lr_id: str) -> torch.Tensor:
        """LR image [3,h,w] in [0,1] (exact: the store keeps 8-bit PNGs)."""
        u8 = self._lr_cache.get(lr_id)
        if u8 is None:
            u8 = (self.store.load_lr(lr_id, key=self._key)[0] * 255).round().to(torch.uint8)
            self._lr_cache[lr_id] = u8
            if len(self._lr_cache) > self.LR_CACHE:
                self._lr_cache.popitem(last=False)
        else:
            self._lr_cache.move_to_end(lr_id)
        return u8.float() / 255

    def _condition(self, batch: list[Pair]):
        """The condition of the rows [winners; losers] of ``batch`` [2k]: each distinct LR image is
        encoded once and shared by all its pairs' rows."""
        ids = list(dict.fromkeys(b.lr_id for b in batch))
        lr = torch.stack([self._lr_image(i) for i in ids]).to(self.accel.device)
        cond = condition_captioned(self.policy, lr, [self.store.prompt(i, key=self._key) for i in ids])
        row = {i: k for k, i in enumerate(ids)}
        return cond.index(torch.tensor([row[b.lr_id] for b in batch] * 2, device=cond.lr.device))

    def _images(self, batch: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(winners [k,3,H,W], losers [k,3,H,W]) read from the store, on the device."""
        dev = self.accel.device
        xw = torch.stack([self.store.read_candidate(b.cid_w) for b in batch]).to(dev)
        xl = torch.stack([self.store.read_candidate(b.cid_l) for b in batch]).to(dev)
        return xw, xl

    def loss_on(self, batch: list[Pair], t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The DPO / DP²O loss of ``batch`` (its weighted mean over these pairs). ``t`` [k] and
        ``eps`` (the policy's noise shape, [k,…]) are drawn from the trainer's generator when not given."""
        p = self.policy
        dev = self.accel.device
        xw, xl = self._images(batch)
        k = len(batch)
        cond = self._condition(batch)
        if t is None:
            t, eps = self._draw(k, xw)
        t, eps = t.to(dev), eps.to(dev)
        x = torch.cat([xw, xl])
        tt, ee = torch.cat([t, t]), torch.cat([eps, eps])  # the pair shares t and ε
        with self.accel.autocast():
            d = p.dsm(x, cond, tt, ee).float()
            with torch.no_grad(), p.reference():
                d_ref = p.dsm(x, cond, tt, ee).float()
        weight = torch.tensor([b.weight for b in batch], device=dev) if self.cfg.method == "dp2o" else None
        return dpo_loss(d[:k], d_ref[:k], d[k:], d_ref[k:], self.cfg.beta, weight=weight)

    def _draw(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [k] in [t_min, t_max] and ε [k,…] for ``k`` pairs whose images look like ``x`` [·,3,H,W]."""
        t = self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * torch.rand(k, generator=self.gen)
        t = t.clamp_min(1e-3)
        eps = torch.randn(dsm_noise_shape(self.policy, x[:1].expand(k, *x.shape[1:])), generator=self.gen)
        return t, eps

    def accumulate(self, batch: list[Pair], scale: float = 1.0) -> dict[str, float]:
        """Back-propagate ``scale`` × the loss of ``batch`` (its weighted mean over *all* its pairs),
        ``micro_batch`` pairs per forward/backward. t and ε are drawn for the whole batch first, and
        micro-batch c's loss (its own weighted mean) is scaled by W_c / W (its share of the batch's
        weight), so the accumulated gradient equals the one-shot gradient. Returns the batch's
        loss and stats (pair-count-weighted means of the micro-batches')."""
        k = len(batch)
        m = self.cfg.micro_batch or k
        w = torch.tensor([b.weight for b in batch], dtype=torch.float64) if self.cfg.method == "dp2o" else torch.ones(k, dtype=torch.float64)
        total = float(w.sum())
        t, eps = self._draw(k, self.store.read_candidate(batch[0].cid_w)[None])
        agg: dict[str, float] = {}
        for s in range(0, k, m):
            part = batch[s : s + m]
            loss, stats = self.loss_on(part, t[s : s + m], eps[s : s + m])
            share = float(w[s : s + m].sum()) / total if total > 0 else len(part) / k
            self.accel.backward(loss * (share * scale))
            agg["loss"] = agg.get("loss", 0.0) + float(loss.detach()) * share
            for name, v in stats.items():
                agg[name] = agg.get(name, 0.0) + float(v.detach()) * len(part) / k
        return agg

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
                for k, v in self.accumulate([self.pairs[i] for i in idx], 1.0 / cfg.grad_accum).items():
                    agg[k] = agg.get(k, 0.0) + v / cfg.grad_accum
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
