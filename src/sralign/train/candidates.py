"""Offline data: LR sets, candidate generation (M seeds per LR), scoring, and pairs."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ..data.degradation import RealESRGANConfig, RealESRGANDegradation, SimpleDegradationConfig, simple_degradation
from ..data.images import ImageError, ImageFolder, load_bundled, random_crops_with_source
from ..config import ranged, validate
from ..data.store import CandidateStore
from ..losses import dp2o_pairs, hpo_weights
from ..policies.base import SAMPLERS, STOCHASTIC_SAMPLERS, condition_captioned
from ..policies.tiny import TinyPolicy
from ..rewards.hybrid import HybridReward
from ..rewards.registry import get_metric
from .distributed import barrier, init_if_needed, rank_world

log = logging.getLogger(__name__)


@dataclass
class LRSetConfig:
    """A deterministic set of (HR, LR) crops: from the bundled photographs of ``split``, or from
    your own HR images in ``hr_dir`` (a folder; ``IMG.txt`` beside ``IMG.png`` is its caption,
    used by text-conditioned policies). ``split`` labels the set in a candidate store."""

    split: str = ranged("train", nonempty=True)
    n: int = ranged(24, ge=1)
    patch: int = ranged(64, ge=8)  # HR size
    scale: int = ranged(4, ge=1)
    seed: int = ranged(0, ge=0)
    degradation: str = ranged("simple", choices=("simple", "realesrgan"))
    hr_dir: str = ""

    def cross_check(self) -> str | None:
        if self.patch % self.scale:
            return f"patch ({self.patch}) must be a multiple of scale ({self.scale})"
        if not self.hr_dir and self.split not in ("train", "heldout"):
            return f"split {self.split!r} names no bundled set (train | heldout); set hr_dir to use your own HR images"
        if self.hr_dir and not Path(self.hr_dir).expanduser().is_dir():
            return f"hr_dir {self.hr_dir!r} is not a folder"
        return None


class LRItem(NamedTuple):
    lr_id: str
    lr: torch.Tensor  # [3,h,w] in [0,1]
    hr: torch.Tensor  # [3,H,W] in [0,1]
    prompt: str | None  # the source image's caption, if any


def _hr_sources(cfg: LRSetConfig) -> tuple[list[torch.Tensor], list[str | None]]:
    if not cfg.hr_dir:
        return [img for _, img in load_bundled(cfg.split)], []
    folder = ImageFolder(Path(cfg.hr_dir).expanduser())
    imgs, prompts = [], []
    for i in range(len(folder)):
        img = folder[i]
        if min(img.shape[-2:]) < cfg.patch:
            log.warning("skipping %s: %dx%d px is smaller than lr_set.patch=%d", folder.paths[i], img.shape[2], img.shape[1], cfg.patch)
            continue
        imgs.append(img)
        prompts.append(folder.prompt(i))
    if not imgs:
        raise ImageError(f"{cfg.hr_dir}: no readable image of at least {cfg.patch}x{cfg.patch} px "
                         f"(lr_set.patch); add larger HR images or lower lr_set.patch")
    return imgs, prompts


def make_lr_set(cfg: LRSetConfig) -> list[LRItem]:
    """[(lr_id, lr [3,h,w], hr [3,H,W], prompt)] — same config, same crops and LR bytes."""
    g = torch.Generator().manual_seed(cfg.seed)
    imgs, prompts = _hr_sources(cfg)
    hr, source = random_crops_with_source(imgs, cfg.n, cfg.patch, g)
    if cfg.degradation == "realesrgan":
        lr = RealESRGANDegradation(RealESRGANConfig(scale=cfg.scale))(hr, g)
    elif cfg.degradation == "simple":
        lr = simple_degradation(hr, cfg.scale, g, SimpleDegradationConfig())
    else:
        raise ValueError(f"degradation must be 'simple' or 'realesrgan', got {cfg.degradation!r}")
    lr = (lr * 255).round() / 255  # what a PNG round trip keeps
    return [LRItem(f"{cfg.split}{i:04d}", lr[i], hr[i], prompts[source[i]] if prompts else None) for i in range(cfg.n)]


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
    chunk: int = ranged(8, ge=1)  # samples per policy call (seeds 0..M-1 are cut into fixed chunks)
    seed: int = ranged(0, ge=0)
    lr_set: LRSetConfig = field(default_factory=LRSetConfig)


@torch.no_grad()
def generate(store: CandidateStore, policy: TinyPolicy, cfg: GenerateConfig, progress: bool = True) -> int:
    """Fill ``store`` with M candidates per LR from ``policy`` (the reference). Resumable and
    idempotent; under torchrun each rank takes LR ids rank, rank+K, …. Returns #new images."""
    validate(cfg)
    init_if_needed()
    rank, world = rank_world()
    if rank == 0:
        for item in make_lr_set(cfg.lr_set):
            store.add_lr(item.lr_id, item.lr, item.hr, split=cfg.lr_set.split, prompt=item.prompt)
        store.set_meta("policy", policy.fingerprint())
    barrier()
    fp = policy.fingerprint()
    ids = store.lr_ids(cfg.lr_set.split)[rank::world]
    chunks = [list(range(i, min(i + cfg.chunk, cfg.m))) for i in range(0, cfg.m, cfg.chunk)]
    new = 0
    for lr_id in tqdm(ids, desc=f"generate[{rank}]", disable=not progress):
        done = store.done_seeds(lr_id, cfg.sampler, cfg.steps, fp)
        todo = [c for c in chunks if not set(c) <= done]
        if not todo:
            continue
        lr, _ = store.load_lr(lr_id)
        # once per LR, reused by every chunk
        cond = condition_captioned(policy, lr[None], [store.prompt(lr_id)])
        shape = policy.noise_shape(cond)[1:]
        for seeds in todo:
            noise = candidate_noise(shape, cfg.seed, lr_id, seeds)
            # per-step noise of sde / ddpm: seeded by the chunk, so a seed always gives the same image
            extra = {"generator": torch.Generator().manual_seed(noise_seed(cfg.seed + 1, lr_id, seeds[0]))} if cfg.sampler in STOCHASTIC_SAMPLERS else {}
            imgs = policy.sample(cond, noise, sampler=cfg.sampler, steps=cfg.steps, **extra).images
            for s, img in zip(seeds, imgs):
                if s not in done:
                    store.add_candidate(lr_id, s, cfg.sampler, cfg.steps, fp, img)
                    new += 1
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
