"""Offline data: LR sets, candidate generation (M seeds per LR), scoring, and pairs."""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ranged, validate
from ..data.lrset import LRItem, LRSet, LRSetConfig, make_lr_set  # noqa: F401  (LRSetConfig, make_lr_set: public here too)
from ..data.store import BlobError, Candidate, CandidateStore, StoreError, spec_hash
from ..losses import hpo_weights
from ..policies.base import SAMPLERS, STOCHASTIC_SAMPLERS, condition_captioned
from ..policies.tiny import TinyPolicy
from ..rewards.attribute import AttributeReward
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
    verify: bool = True  # resuming: check every stored candidate's sha256 (false: only that its file exists)
    lr_set: LRSetConfig = field(default_factory=LRSetConfig)


def lr_set_spec(cfg: LRSetConfig) -> dict:
    """The LR-set definition as stored in a key (``hr_dir`` made absolute)."""
    spec = asdict(cfg)
    if spec.get("hr_dir"):
        spec["hr_dir"] = str(Path(spec["hr_dir"]).expanduser().resolve())
    return spec


def policy_spec(policy: TinyPolicy) -> dict:
    """What identifies a policy's samples: its class, weights fingerprint, config dataclass (ODE
    start, guidance, prompt, preset…), base model folder and parameter dtypes per component."""
    spec: dict = {"type": type(policy).__name__, "fingerprint": policy.fingerprint()}
    cfg = getattr(policy, "config", None)
    if is_dataclass(cfg):
        spec["config"] = asdict(cfg)
    base = getattr(policy, "base_path", None)
    if base:
        spec["base_path"] = str(Path(base).expanduser().resolve())
    for attr in ("preset", "dtype"):
        v = getattr(policy, attr, None)
        if v is not None:
            spec[attr] = str(v)
    extra = getattr(policy, "generation_settings", None)
    if callable(extra):
        spec["settings"] = extra()
    model = getattr(policy, "model", None)
    if isinstance(model, torch.nn.Module):
        spec["dtypes"] = {name: sorted({str(p.dtype) for p in child.parameters()}) for name, child in model.named_children()} \
            or sorted({str(p.dtype) for p in model.parameters()})
    return spec


def generation_key(policy: TinyPolicy, cfg: GenerateConfig) -> tuple[dict, dict, str]:
    """(key spec, LR-set spec, description) of the candidates ``generate`` makes: everything
    that determines a candidate's image except the LR id and seed (M and chunk are left out:
    more seeds extend a key; chunking changes no noise)."""
    pol = policy_spec(policy)
    lrs = lr_set_spec(cfg.lr_set)
    spec = {"version": 1, "policy": pol, "sampler": cfg.sampler, "steps": cfg.steps, "seed": cfg.seed, "lr_set": lrs}
    pcfg = pol.get("config", {})
    knobs = [f"{k}={pcfg[k]}" for k in ("ode_start", "guidance_scale", "prompt") if k in pcfg]
    knobs += [f"{k}={pol[k]}" for k in ("preset", "dtype") if k in pol]
    src = lrs["hr_dir"] or "bundled"
    desc = (f"{pol['type']} {pol['fingerprint'][:8]}, {cfg.sampler} {cfg.steps} steps, seed {cfg.seed}"
            + (", " + ", ".join(knobs) if knobs else "")
            + f"; LR set {lrs['split']} ({src}) n={lrs['n']} patch={lrs['patch']} x{lrs['scale']} {lrs['degradation']} seed {lrs['seed']}")
    return spec, lrs, desc


def generation_key_id(policy: TinyPolicy, cfg: GenerateConfig) -> str:
    """The store key (64 hex) under which ``generate(store, policy, cfg)`` stores candidates."""
    return spec_hash(generation_key(policy, cfg)[0])


def _intact_seeds(store: CandidateStore, key: str, lr_id: str, verify: bool) -> set[int]:
    """Seeds of ``lr_id``'s stored candidates under ``key`` whose files are intact (sha256 checked
    when ``verify``); the others are logged and will be regenerated."""
    done = set()
    for c in store.candidates(lr_id, key=key):
        if store.blob_ok(c.sha256, check_hash=verify):
            done.add(c.seed)
        else:
            log.warning("regenerating candidate %d (LR %s, seed %d): %s is missing or altered", c.cid, lr_id, c.seed, store.root / c.path)
    return done


@torch.no_grad()
def generate(store: CandidateStore, policy: TinyPolicy, cfg: GenerateConfig, progress: bool = True) -> int:
    """Fill ``store`` with M candidates per LR from ``policy`` (the reference), under this run's
    generation key (``generation_key``). Resumable and idempotent; stored candidates whose files
    are missing or altered are regenerated. Under torchrun each rank takes LR ids rank,
    rank+K, …. Each policy call samples one chunk of seeds for up to ``lr_batch`` LR images of
    equal size; a candidate's noise depends only on (seed, LR id, candidate seed), so the batching
    does not change it. Returns #new images (regenerated ones included)."""
    validate(cfg)
    init_if_needed()
    rank, world = rank_world()
    spec, lrs, desc = generation_key(policy, cfg)
    lrset = spec_hash(lrs)
    if rank == 0:
        for item in LRSet(cfg.lr_set):  # made block by block, written as it comes
            store.add_lr(item.lr_id, item.lr, item.hr, split=cfg.lr_set.split, prompt=item.prompt, lrset=lrset)
        store.register_key(spec, lrset, desc)
    barrier()
    key = spec_hash(spec)
    ids = store.lr_ids(cfg.lr_set.split, lrset=lrset)[rank::world]
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
            done[lr_id] = _intact_seeds(store, key, lr_id, cfg.verify)
            todo[lr_id] = [k for k, c in enumerate(chunks) if not set(c) <= done[lr_id]]
        lrs = {lr_id: store.load_lr(lr_id, lrset=lrset)[0] for lr_id in group if todo[lr_id]}
        by_size: dict[tuple[int, ...], list[str]] = {}
        for lr_id, lr in lrs.items():
            by_size.setdefault(tuple(lr.shape), []).append(lr_id)
        for same in by_size.values():
            # once per LR, reused by every chunk
            cond = condition_captioned(policy, torch.stack([lrs[i] for i in same]), [store.prompt(i, lrset=lrset) for i in same])
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
                            store.add_candidate(key, lr_id, s, img)
                            new += 1
    pbar.close()
    barrier()
    return new


def score_store(store: CandidateStore, metric_names: list[str], progress: bool = True) -> int:
    """Score every candidate that lacks a metric (batched per LR group). Resumable; a no-op
    looks only at candidates added since the last complete scoring (an indexed range query).
    Candidates whose files are missing or altered are skipped and then reported in one
    ``StoreError`` (after the others are scored)."""
    metrics = [get_metric(n) for n in metric_names]
    names = [m.name for m in metrics]
    top, stream = store.unscored(names)
    n_new = 0
    bad: list[BlobError] = []
    bad_cids: list[int] = []
    groups = itertools.groupby(stream, key=lambda t: (t[0].key_id, t[0].lr_id))
    for (key, lr_id), items in tqdm(groups, desc="score", disable=not progress):
        need, lack, imgs = [], [], []
        for c, missing in items:
            try:
                imgs.append(store.read_candidate(c))
            except BlobError as e:
                bad.append(e)
                bad_cids.append(c.cid)
                continue
            need.append(c)
            lack.append(missing)
        if not need:
            continue
        _, hr = store.load_lr(lr_id, key=key)
        x_all = torch.stack(imgs)
        rows = []
        for m in metrics:
            sel = [i for i, ms in enumerate(lack) if m.name in ms]
            if not sel:
                continue
            x = x_all[sel]
            vals = m(x, hr[None].expand_as(x) if m.kind == "FR" else None)
            for i, v in zip(sel, vals.tolist()):
                if v != v or v in (float("inf"), float("-inf")):
                    raise ValueError(f"metric {m.name} returned {v} for candidate {need[i].cid} (LR {lr_id}, seed {need[i].seed})")
                rows.append((need[i].cid, m.name, float(v)))
        store.set_scores(rows)
        n_new += len(rows)
    store.mark_scored(names, min([top, *(c - 1 for c in bad_cids)]))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise StoreError(f"scored {n_new} new values; {len(bad)} candidate file(s) missing or altered, not scored: "
                         f"{bad[0]}{more}")
    return n_new


@dataclass
class Pair:
    lr_id: str
    cid_w: int
    cid_l: int
    weight: float
    r_w: float
    r_l: float
    key_id: str = ""  # the generation key both candidates belong to


def _hr_areas(store: CandidateStore, reward: AttributeReward, lr_ids: list[str], key_id: str) -> torch.Tensor:
    """The textured share [len(lr_ids)] of each LR's HR under the attribute reward's texture map."""
    out = []
    for lr_id in lr_ids:
        _, hr = store.load_lr(lr_id, key=key_id)
        if hr is None:
            raise ValueError(f"LR {lr_id} has no HR in the store; the attribute-aware reward needs it (reward=hybrid does not)")
        out.append(reward.areas(hr[None].float())[1].reshape(()))
    return torch.stack(out) if out else torch.zeros(0)


def build_pairs(store: CandidateStore, reward: HybridReward | AttributeReward, n: int, method: str = "dp2o", key: str | None = None,
                files: dict[int, Candidate] | None = None) -> list[Pair]:
    """DP²O: top-N × bottom-N pairs per LR with HPO weights; DPO: best vs worst, weight 1.

    Pairs come from one generation key: ``key`` (a hash prefix), or the store's only key
    (several keys and none chosen: ``StoreError`` listing them). The scores stream in per LR
    group (one indexed query); rewards are computed for all groups of one size at once (row-wise,
    so each group's values are those of a per-group computation). ``files`` (a dict to fill):
    the ``Candidate`` row (file name and checksum) of every candidate in a pair, read by the
    same query, so that the files can be checked without one lookup per candidate.
    ``reward`` an ``AttributeReward``: each LR's HR (from the store) gives its smooth / textured
    area shares, which weight PSNR-Y against the NR metrics (GDPO-SR's attribute-aware ranking)."""
    if method not in ("dp2o", "dpo"):
        raise ValueError(f"method must be dp2o or dpo, got {method!r}")
    key_id = store.resolve_key(key)
    names = [m.name for m in reward.metrics]
    lr_ids: list[str] = []
    cids: list[list[int]] = []
    vals: list[list[tuple]] = []
    blobs: list[list[tuple]] = []  # (seed, sha256, path) per row, when ``files`` is asked for
    m = len(names)
    for lr_id, rows in store.grouped(key_id, names, files=files is not None):
        missing = [name for j, name in enumerate(names) if any(r[2 + j] is None for r in rows)]
        if missing:
            raise ValueError(f"LR {lr_id} has unscored candidates for {missing}; run `sralign score --store` first")
        if len(rows) < 2:
            continue
        lr_ids.append(lr_id)
        cids.append([r[0] for r in rows])
        vals.append([r[2 : 2 + m] for r in rows])
        if files is not None:
            blobs.append([(r[1], r[2 + m], r[3 + m]) for r in rows])
    # per group size: rewards [B, G], and for dp2o the N² (winner, loser) indices per row,
    # exactly what ``dp2o_pairs`` gives each row (stable sort)
    per_group: list[tuple] = [()] * len(lr_ids)
    by_size: dict[int, list[int]] = {}
    for g, c in enumerate(cids):
        by_size.setdefault(len(c), []).append(g)
    areas = _hr_areas(store, reward, lr_ids, key_id) if isinstance(reward, AttributeReward) else None
    for size, gs in by_size.items():
        v = torch.tensor([vals[g] for g in gs])  # [B, G, metrics], float32 as before
        raw = {m: v[:, :, j].contiguous() for j, m in enumerate(names)}
        if areas is None:
            total = reward.from_scores(raw).total
        else:
            f_tex = areas[gs][:, None]
            total = reward.from_scores(raw, 1 - f_tex, f_tex).total
        if method == "dpo":
            iw, il = total.argmax(dim=1, keepdim=True), total.argmin(dim=1, keepdim=True)
        else:
            if n < 1 or 2 * n > size:
                raise ValueError(f"need 1 <= N and 2N <= M, got N={n}, M={size} (LR {lr_ids[gs[0]]})")
            order = torch.sort(total, dim=1, descending=True, stable=True).indices
            iw, il = order[:, :n].repeat_interleave(n, dim=1), order[:, size - n:].repeat(1, n)
        std = total.std(dim=1, unbiased=False)
        rw, rl = total.gather(1, iw), total.gather(1, il)
        for i, g in enumerate(gs):
            per_group[g] = (iw[i].tolist(), il[i].tolist(), rw[i], rl[i], std[i])
    if files is not None:
        for g, (lr_id, c) in enumerate(zip(lr_ids, cids)):
            iw, il = per_group[g][0], per_group[g][1]
            if method == "dpo" and iw[0] == il[0]:
                continue  # all equal: no pair
            for i in set(iw) | set(il):
                files[c[i]] = Candidate(c[i], key_id, lr_id, *blobs[g][i])
        blobs.clear()
    pairs: list[Pair] = []
    if method == "dpo":
        for lr_id, c, (iw, il, rw, rl, _) in zip(lr_ids, cids, per_group):
            if iw[0] != il[0]:
                pairs.append(Pair(lr_id, c[iw[0]], c[il[0]], 1.0, float(rw[0]), float(rl[0]), key_id))
        return pairs
    if not lr_ids:
        return pairs
    rw = torch.cat([t[2] for t in per_group])
    rl = torch.cat([t[3] for t in per_group])
    gid = torch.arange(len(per_group)).repeat_interleave(torch.tensor([len(t[0]) for t in per_group]))
    w = hpo_weights(rw, rl, gid, torch.stack([t[4] for t in per_group])).tolist()
    rw, rl = rw.tolist(), rl.tolist()
    k = 0
    for lr_id, c, (iw, il, *_) in zip(lr_ids, cids, per_group):
        for a, b in zip(iw, il):
            pairs.append(Pair(lr_id, c[a], c[b], w[k], rw[k], rl[k], key_id))
            k += 1
    return pairs
