"""``sralign demo``: the main job on the embedded default, end to end.

Shipped tiny policy -> bundled photographs, degraded -> M candidates per LR (reference) ->
scored with the built-in hybrid reward (every term optimal at the HR: MS-SSIM, GMSD, patch-wise gradient-energy
ratio; BRISQUE and NIQE-s gaps to the HR at a quarter of the weight) -> DP²O-SR and Diffusion-DPO (offline) -> GDPO-SR and
DGPO (online) -> Best@M / Mean@M / Worst@M evaluation on held-out photographs, with held-out
PSNR / SSIM, the HR's own no-reference scores, bicubic, sharpness and smooth-region noise
relative to the HR and reward-hacking flags -> report.html.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .data.store import CandidateStore
from .eval.report import format_deltas, format_table
from .eval.run import EvalConfig, run_eval
from .policies import load_policy
from .rewards.build import build_reward
from .train.candidates import GenerateConfig, LRSetConfig, generate, generation_key_id, score_store
from .train.offline import OfflineTrainer
from .train.offline_config import DP2OConfig
from .train.online import OnlineTrainer
from .train.online_config import DGPOConfig, GDPOConfig, GRPOConfig

log = logging.getLogger(__name__)


#: the NR side's share of the demo's hybrid reward (training and evaluation alike)
NR_WEIGHT = 0.25


@dataclass
class DemoConfig:
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(m=16, steps=10, lr_set=LRSetConfig(n=24, patch=64)))
    # Every setting below that differs from the library's defaults was chosen for the tiny policy
    # by benchmarks/choose_steps.py on two selection sets (the demo's training crops and the
    # selection photographs, never a reporting set), by a rule fixed before the runs: a setting
    # passes only if each of three training seeds passes on both sets — the demo's reward and the
    # method's own training reward rise in Mean@M and Worst@M, PSNR-Y falls by at most 0.1 dB and
    # SSIM by at most 0.005, and no hacking flag is raised. A method with no passing setting takes
    # the one meeting the most of those conditions within the demo's 10-minute budget (README, "The
    # three-seed rule on the re-made checkpoint" and "Changes measured on the pair"). The hybrid's
    # NR half gets a quarter of the weight (NR_WEIGHT; the library default is half): at half, DGPO
    # and DP²O-SR bought the NR gap terms' texture with PSNR on the selection photographs (−1.87
    # and −0.17 dB, stage-3 checkpoint).
    # DP²O-SR ranks its candidates with GDPO-SR's attribute-aware reward (PSNR-Y on the HR's smooth
    # share, the NR gaps on its texture): ranked by the hybrid it added grain to flat crops. With the
    # re-made checkpoint lr 1e-5 × 90 steps passes the rule (measured with each change normalised
    # over the policy and its reference only; README, "Changes measured on the pair").
    dp2o: DP2OConfig = field(default_factory=lambda: DP2OConfig(method="dp2o", steps=90, n=4, beta=1e5, lr=1e-5, nr_weight=NR_WEIGHT,
                                                                  reward="attribute"))
    # Diffusion-DPO (best vs worst) ranks with the same attribute-aware reward as DP²O-SR, so the
    # baseline differs from DP²O-SR only in its pairs. No setting passed; lr 1e-5 × 90 met the most
    # (tied with 60 steps, broken by the larger selection ΔMean).
    dpo: DP2OConfig = field(default_factory=lambda: DP2OConfig(method="dpo", steps=90, beta=1e5, lr=1e-5, nr_weight=NR_WEIGHT,
                                                                 reward="attribute"))
    # GDPO-SR trains on its own attribute-aware reward (PSNR-Y on the HR's smooth area, the
    # hybrid's HR-relative NR terms on its texture); the evaluation ranks every method with the
    # demo's hybrid and with the reward it trained on. No GDPO-SR setting passed; of those within
    # the time budget this one met the most conditions: 8 LRs × G 6 (the authors' group size) per
    # step from a pool of 96 crops, lr 1e-5, 30 steps — the same 48 rollouts per step as 4 × G 12.
    gdpo: GDPOConfig = field(default_factory=lambda: GDPOConfig(steps_total=30, lr=1e-5, batch_lr=8, group=6,
                                                                lr_set=LRSetConfig(n=96)))
    # DGPO ranks its groups with the attribute-aware reward too (with the hybrid, lr 1e-4 or 3e-5,
    # one of three training seeds lost 0.4–2.2 dB on the selection photographs); lr 1e-5 × 90
    # steps passes the rule for all three seeds with the re-made checkpoint.
    dgpo: DGPOConfig = field(default_factory=lambda: DGPOConfig(steps_total=90, lr=1e-5, reward="attribute", nr_weight=NR_WEIGHT))
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(steps_total=60, nr_weight=NR_WEIGHT))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(m=16, nr_weight=NR_WEIGHT, lr_set=LRSetConfig(split="heldout", n=16, patch=64, seed=123)))
    methods: tuple[str, ...] = ("dp2o", "dpo", "gdpo", "dgpo")


def offline_metric_names(cfg: DemoConfig) -> list[str]:
    """The metrics the offline methods' rewards read (what the candidate store is scored with)."""
    return sorted({*build_reward(cfg.dp2o).names, *build_reward(cfg.dpo).names})


def quick_config() -> DemoConfig:
    """The ≤ 2 min variant (used by the tests)."""
    c = DemoConfig()
    c.generate = GenerateConfig(m=8, steps=4, lr_set=LRSetConfig(n=6, patch=48))
    c.dp2o.steps = c.dpo.steps = 12
    c.dp2o.batch_pairs = c.dpo.batch_pairs = 8
    c.dp2o.n = 2
    c.gdpo.steps_total = c.dgpo.steps_total = 6
    for oc in (c.gdpo, c.dgpo):
        oc.lr_set = LRSetConfig(n=6, patch=48)
        oc.batch_lr = 2
    c.gdpo.group = 6
    c.eval = EvalConfig(m=4, steps=4, lr_set=LRSetConfig(split="heldout", n=3, patch=48, seed=123), grid_images=2, grid_seeds=2)
    return c


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_demo(out: str | Path, quick: bool = False, progress: bool = True, config: DemoConfig | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config or (quick_config() if quick else DemoConfig())
    timing: dict[str, float] = {}
    t_all = time.time()

    def phase(name):
        timing[name] = round(time.time() - t0, 1)
        if progress:
            print(f"[demo] {name}: {timing[name]} s", flush=True)

    # 1. candidates from the frozen reference
    t0 = time.time()
    base = load_policy()
    store = CandidateStore(out / "store", create=True)
    generate(store, base, cfg.generate, progress=progress)
    phase("generate")
    t0 = time.time()
    score_store(store, offline_metric_names(cfg), progress=progress)
    phase("score")

    runs: dict[str, Path] = {}
    policies: dict[str, object] = {}
    samplers: dict[str, str] = {}
    for method in cfg.methods:
        t0 = time.time()
        torch.manual_seed(0)
        pol = load_policy()
        run = out / "runs" / method
        if method in ("dp2o", "dpo"):
            ocfg = replace(getattr(cfg, method), store_key=generation_key_id(base, cfg.generate))  # this run's candidates
            OfflineTrainer(pol, store, ocfg, run).train(resume=True, progress=progress)
            samplers[method] = cfg.generate.sampler
        else:
            ocfg = getattr(cfg, method)
            OnlineTrainer(pol, ocfg, run).train(resume=True, progress=progress)
            samplers[method] = ocfg.sampler
        runs[method], policies[method] = run, pol
        phase(f"train {method}")

    t0 = time.time()
    meta = {"timing_s": timing, "demo_config": asdict(cfg)}
    result = run_eval(policies, cfg.eval, out, samplers=samplers, run_dirs=runs, meta=meta, progress=False)
    phase("eval + report")
    timing["total"] = round(time.time() - t_all, 1)
    summary = {"timing_s": timing, "peak_rss_mb": round(peak_rss_mb(), 1), "report": str(out / "report.html"),
               "table": format_table(result), "vs_reference": format_deltas(result)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if progress:
        print()
        print(summary["table"])
        print()
        print(summary["vs_reference"])
        print(f"\n[demo] total {timing['total']} s, peak RSS {summary['peak_rss_mb']} MB")
        print(f"[demo] report: {out / 'report.html'}")
    return summary
