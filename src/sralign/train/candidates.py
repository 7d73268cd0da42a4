"""Offline data: LR sets, candidate generation (M seeds per LR), scoring, and pairs."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import ranged, validate
from ..data.lrset import LRItem, LRSet, LRSetConfig, make_lr_set  # noqa: F401  (LRSetConfig, make_lr_set: public here too)
from ..data.store import CandidateStore
from ..losses import dp2o_pairs, hpo_weights
from ..policies.base import SAMPLERS, STOCHASTIC_SAMPLERS, condition_captioned
from ..policies.tiny import TinyPolicy
from ..rewards.hybrid import HybridReward
from ..rewards.registry import get_metric
from .distributed import barrier, init_if_needed, rank_world

log = logging.getLogger(__name__)


def noise_seed(base: int, lr_id: str, seed: int) -> int:
    return int(hashlib.sha256(f"{base}:{lr_id}:{seed}".encode()).hexdigest()[:15], 16)


def candidate_noise(shape: tuple[int, ...], base: int, lr_id: str, seeds: list[int]) -> torch.Tensor:
    """One noise tensor per seed, independent of how seeds are batched."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(noise_seed(base, lr_id, s))) for s in seeds])


@dataclass
class GenerateConfig:
    m: int = ranged(16, ge=2)  # a group needs two candidates to rank
    sampler: str = ranged("ode", choices=SAMPLERS)
    steps: int = ranged(10, ge=1, le=1000)
    chunk: int = ranged(8, ge=1)  # samples per LR per policy call (seeds 0..M-1 are cut into fixed chunks)
    lr_batch: int = ranged(1, ge=1)  # LR images of equal size per policy call (the noise is per LR and seed: same candidates)
    seed: int = ranged(0, ge=0)
    lr_set: LRSetConfig = field(default_factory=LRSetConfig)


@torch.no_grad()
def generate(store: CandidateStore, policy: TinyPolicy, cfg: GenerateConfig, progress: bool = True) -> int:
    """Fill ``store`` with M candidates per LR from ``policy`` (the reference). Resumable and
    idempotent; under torchrun each rank takes LR ids rank, rank+K, …. Each policy call samples
    one chunk of seeds for up to ``lr_batch`` LR images of equal size; a candidate's noise depends
    only on (seed, LR id, candidate seed), so the batching does not change it. Returns #new images."""
    validate(cfg)
    init_if_needed()
    rank, world = rank_world()
    if rank == 0:
        for item in LRSet(cfg.lr_set):  # made block by block, written as it comes
            store.add_lr(item.lr_id, item.lr, item.hr, split=cfg.lr_set.split, prompt=item.prompt)
        store.set_meta("policy", policy.fingerprint())
    barrier()
    fp = policy.fingerprint()
    ids = store.lr_ids(cfg.lr_set.split)[rank::world]
    chunks = [list(range(i, min(i + cfg.chunk, cfg.m))) for i in range(0, cfg.m, cfg.chunk)]
    new = 0
    pbar = tqdm(total=len(ids), desc=f"generate[{rank}]", disable=not progress)
    # sde / ddpm draw per-step noise from a generator seeded by (LR, chunk): one LR per call for those,
    # so a seed always gives the same image whatever lr_batch is
    per_call = 1 if cfg.sampler in STOCHASTIC_SAMPLERS else cfg.lr_batch
    for b in range(0, len(ids), per_call):
        group = ids[b : b + per_call]
        pbar.update(len(group))
        done, todo = {}, {}
        for lr_id in group:
            done[lr_id] = store.done_seeds(lr_id, cfg.sampler, cfg.steps, fp)
            todo[lr_id] = [k for k, c in enumerate(chunks) if not set(c) <= done[lr_id]]
        lrs = {lr_id: store.load_lr(lr_id)[0] for lr_id in group if todo[lr_id]}
        by_size: dict[tuple[int, ...], list[str]] = {}
        for lr_id, lr in lrs.items():
            by_size.setdefault(tuple(lr.shape), []).append(lr_id)
        for same in by_size.values():
            # once per LR, reused by every chunk
            cond = condition_captioned(policy, torch.stack([lrs[i] for i in same]), [store.prompt(i) for i in same])
            shape = policy.noise_shape(cond)[1:]
            for k, seeds in enumerate(chunks):
                sel = [j for j, lr_id in enumerate(same) if k in todo[lr_id]]
                if not sel:
                    continue
                sub = cond if len(sel) == len(same) else cond.index(torch.tensor(sel))
                noise = torch.cat([candidate_noise(shape, cfg.seed, same[j], seeds) for j in sel])
                extra = ({"generator": torch.Generator().manual_seed(noise_seed(cfg.seed + 1, same[sel[0]], seeds[0]))}
                         if cfg.sampler in STOCHASTIC_SAMPLERS else {})
                imgs = policy.sample(sub, noise, sampler=cfg.sampler, steps=cfg.steps, **extra).images  # rows grouped per LR
                for r, j in enumerate(sel):
                    lr_id = same[j]
                    for s, img in zip(seeds, imgs[r * len(seeds) : (r + 1) * len(seeds)]):
                        if s not in done[lr_id]:
                            store.add_candidate(lr_id, s, cfg.sampler, cfg.steps, fp, img)
                            new += 1
    pbar.close()
    barrier()
    return new


def score_store(store: CandidateStore, metric_names: list[str], progress: bool = True) -> int:
    """Score every candidate that lacks a metric (batched per LR group). Resumable."""
    metrics = [get_metric(n) for n in metric_names]
    todo_ids = {m.name: set(c.cid for c in store.candidates()) - store.scored(m.name) for m in metrics}
    n_new = 0
    for lr_id in tqdm(store.lr_ids(), desc="score", disable=not progress):
        cands = store.candidates(lr_id)
        need = [c for c in cands if any(c.cid in todo_ids[m.name] for m in metrics)]
        if not need:
            continue
        _, hr = store.load_lr(lr_id)
        imgs = torch.stack([store.read_image(c.path) for c in need])
        rows = []
        for m in metrics:
            sel = [i for i, c in enumerate(need) if c.cid in todo_ids[m.name]]
            if not sel:
                continue
            x = imgs[sel]
            vals = m(x, hr[None].expand_as(x) if m.kind == "FR" else None)
            for i, v in zip(sel, vals.tolist()):
                if v != v or v in (float("inf"), float("-inf")):
                    raise ValueError(f"metric {m.name} returned {v} for candidate {need[i].cid} (LR {lr_id}, seed {need[i].seed})")
                rows.append((need[i].cid, m.name, float(v)))
        store.set_scores(rows)
        n_new += len(rows)
    return n_new


@dataclass
class Pair:
    lr_id: str
    cid_w: int
    cid_l: int
    weight: float
    r_w: float
    r_l: float


def build_pairs(store: CandidateStore, reward: HybridReward, n: int, method: str = "dp2o") -> list[Pair]:
    """DP²O: top-N × bottom-N pairs per LR with HPO weights; DPO: best vs worst, weight 1."""
    raw = {m.name: store.scores(m.name) for m in reward.metrics}
    groups = []
    for lr_id in store.lr_ids():
        cands = store.candidates(lr_id)
        missing = [m for m in raw if any(c.cid not in raw[m] for c in cands)]
        if missing:
            raise ValueError(f"LR {lr_id} has unscored candidates for {missing}; run `sralign score --store` first")
        if len(cands) < 2:
            continue
        scores = {k: torch.tensor([[v[c.cid] for c in cands]]) for k, v in raw.items()}
        r = reward.from_scores(scores).total[0]
        groups.append((lr_id, cands, r))
    pairs: list[Pair] = []
    if method == "dpo":
        for lr_id, cands, r in groups:
            iw, il = int(r.argmax()), int(r.argmin())
            if iw != il:
                pairs.append(Pair(lr_id, cands[iw].cid, cands[il].cid, 1.0, float(r[iw]), float(r[il])))
        return pairs
    if method != "dp2o":
        raise ValueError(f"method must be dp2o or dpo, got {method!r}")
    stds = torch.stack([r.std(unbiased=False) for _, _, r in groups])
    all_w, all_l, gid = [], [], []
    idx = []
    for g, (lr_id, cands, r) in enumerate(groups):
        iw, il = dp2o_pairs(r, n)
        all_w.append(r[iw])
        all_l.append(r[il])
        gid.append(torch.full((len(iw),), g))
        idx.append((lr_id, cands, iw, il, r))
    w = hpo_weights(torch.cat(all_w), torch.cat(all_l), torch.cat(gid), stds)
    k = 0
    for lr_id, cands, iw, il, r in idx:
        for a, b in zip(iw.tolist(), il.tolist()):
            pairs.append(Pair(lr_id, cands[a].cid, cands[b].cid, float(w[k]), float(r[a]), float(r[b])))
            k += 1
    return pairs
