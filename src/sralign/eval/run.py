"""``sralign eval``: held-out evaluation of aligned policies against their reference."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..config import check_metric_names, ranged, validate
from ..policies import load_policy
from ..rewards.attribute import TEXTURE_RULES
from ..rewards.build import RewardSettings, build_reward, check_reward_settings
from ..rewards.hybrid import DEFAULT_FR, DEFAULT_NR, DEFAULT_NR_WEIGHT
from ..train.candidates import LRSetConfig, make_lr_set
from .bestof import PolicySpec, evaluate_policies
from .grid import save_grid
from .hacking import HackingThresholds
from .plots import plot_bestof, plot_training
from .report import delta_rows, format_deltas, format_table, summary_rows, write_report


@dataclass
class EvalConfig:
    """``sralign eval``: M seeds per held-out LR, the reward the methods trained on (``reward``
    "hybrid" with ``fr_metrics`` / ``nr_metrics``, or GDPO-SR's "attribute" reward: PSNR-Y and
    ``nr_metrics`` weighted by the HR's smooth / textured area under ``texture_rule``; the hybrid
    gives its NR side the share ``nr_weight``;
    ``sralign eval RUN`` reads them from the run's config.yaml unless told), ``heldout_metrics``
    (PSNR-Y, PSNR-RGB and SSIM: fidelity, held out where no method trained on them — every reward
    term reads luma only, so PSNR-RGB is what sees a drift of the colour balance; raw BRISQUE / NIQE-s
    shown beside the HR's own values), and the ``hacking`` thresholds that flag a policy."""

    m: int = ranged(16, ge=1)
    steps: int = ranged(10, ge=1, le=1000)
    seed: int = ranged(1000, ge=0)
    reward: str = ranged("hybrid", choices=("hybrid", "attribute"))
    fr_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_FR))
    nr_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_NR))
    nr_weight: float = ranged(DEFAULT_NR_WEIGHT, ge=0, le=1)
    texture_rule: str = ranged("sralign", choices=TEXTURE_RULES)
    heldout_metrics: list[str] = field(default_factory=lambda: ["psnr", "psnr_rgb", "ssim", "brisque", "niqe_s"])
    hacking: HackingThresholds = field(default_factory=HackingThresholds)
    lr_set: LRSetConfig = field(default_factory=lambda: LRSetConfig(split="heldout", n=8, patch=64, seed=123))
    grid_images: int = ranged(3, ge=1)
    grid_seeds: int = ranged(3, ge=1)

    def cross_check(self) -> str | None:
        return check_reward_settings(self) or check_metric_names("heldout_metrics", self.heldout_metrics)


#: the reward settings ``sralign eval RUN`` takes from the run's config.yaml
REWARD_KEYS = ("reward", "fr_metrics", "nr_metrics", "nr_weight", "texture_rule")


def run_reward(run_dir: str | Path) -> dict:
    """The reward a training run trained on ({key: value} of ``REWARD_KEYS`` in its
    ``config.yaml``; {} without one). Offline runs (DP²O-SR, Diffusion-DPO) have no ``reward``
    key: their metrics make a hybrid reward."""
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        return {}
    import yaml

    cfg = yaml.safe_load(p.read_text()) or {}
    if not isinstance(cfg, dict):
        return {}
    out = {k: cfg[k] for k in REWARD_KEYS if k in cfg}
    if "reward" not in out and ("fr_metrics" in out or "nr_metrics" in out):
        out["reward"] = "hybrid"
    return out


def trained_settings(run_dirs: dict[str, str | Path], cfg: EvalConfig) -> dict[str, RewardSettings]:
    """{label: the reward settings run_dirs[label] trained with} (its config.yaml's
    ``REWARD_KEYS`` over ``cfg``'s); runs without a config.yaml are left out."""
    return {label: replace(cfg, **s) for label, d in run_dirs.items() if (s := run_reward(d))}


def run_sampler(run_dir: str | Path) -> str:
    """The sampler a training run aligned (its ``config.yaml``; ``ode`` for offline runs)."""
    p = Path(run_dir) / "config.yaml"
    if p.is_file():
        import yaml

        cfg = yaml.safe_load(p.read_text()) or {}
        if isinstance(cfg, dict) and isinstance(cfg.get("sampler"), str):
            return cfg["sampler"]
    return "ode"


def heldout_set(cfg: EvalConfig) -> tuple[list[str], torch.Tensor, torch.Tensor, list[str | None]]:
    """(ids, lr [n,3,h,w], hr [n,3,H,W], captions) of the held-out set."""
    data = make_lr_set(cfg.lr_set)
    return [d.lr_id for d in data], torch.stack([d.lr for d in data]), torch.stack([d.hr for d in data]), [d.prompt for d in data]


def run_eval(
    policies: dict[str, str | Path | object],
    cfg: EvalConfig,
    out: str | Path,
    *,
    samplers: dict[str, str] | None = None,
    run_dirs: dict[str, Path] | None = None,
    meta: dict | None = None,
    progress: bool = True,
    trained: dict[str, RewardSettings] | None = None,
):
    """Evaluate aligned ``policies`` (label -> folder or policy object) and their references.

    Every policy is compared with its own frozen reference under the same sampler; all rows are
    ranked with one pooled reward; a policy is also judged by the reward it trained on
    (``trained``: {label: its training config}; default: read from ``run_dirs``' config.yaml), the
    ``ΔMean@M (trained)`` / ``ΔWorst@M (trained)`` columns. Writes eval.json, bestof.png, grid_<policy>.png, training.png,
    report.html and report.md into ``out``.
    """
    validate(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    samplers = samplers or {}
    reward = build_reward(cfg)  # ranks every row (the attribute reward ignores fr_metrics)
    ids, lr, hr, prompts = heldout_set(cfg)
    specs: dict[str, PolicySpec] = {}
    for label, pol in policies.items():
        policy = load_policy(str(pol)) if isinstance(pol, (str, Path)) else pol
        sampler = samplers.get(label, "ode")
        steps = 1 if sampler == "onestep" else cfg.steps
        ref_label = f"reference ({sampler})"
        if ref_label not in specs:
            specs[ref_label] = PolicySpec(policy, use_reference=True, sampler=sampler, steps=steps)
        specs[label] = PolicySpec(policy, sampler=sampler, steps=steps, baseline=ref_label)
    own = {k: build_reward(c) for k, c in (trained if trained is not None else trained_settings(run_dirs or {}, cfg)).items()}
    result, samples = evaluate_policies(specs, hr, lr, reward, cfg.heldout_metrics, m=cfg.m, seed=cfg.seed, progress=progress,
                                        prompts=prompts, thresholds=cfg.hacking, trained=own)
    # the result, plus the report's two tables as rows (the summary with its HR and bicubic rows,
    # and each aligned policy against its reference)
    (out / "eval.json").write_text(json.dumps({**result.to_dict(), "table": summary_rows(result), "vs_reference": delta_rows(result)}, indent=1))
    figures = {"Best@M / Mean@M / Worst@M": plot_bestof(result, out / "bestof.png")}
    # image grids: LR | reference seeds | aligned seeds | HR, per image, one grid per aligned policy
    k = min(cfg.grid_seeds, cfg.m)
    up = torch.nn.functional.interpolate(lr, scale_factor=hr.shape[-1] // lr.shape[-1], mode="nearest")
    for a in [name for name, sp in specs.items() if sp.baseline is not None]:
        ref = specs[a].baseline
        rows = [[up[i], *samples[ref][i, :k], *samples[a][i, :k], hr[i]] for i in range(min(cfg.grid_images, lr.shape[0]))]
        figures[f"Samples: LR | {ref} ×{k} | {a} ×{k} | HR"] = save_grid(
            rows, out / f"grid_{a}.png", ["LR", *(["ref"] * k), *([a] * k), "HR"], zoom=2 if hr.shape[-1] <= 96 else 1)
    if run_dirs:
        tp = plot_training(run_dirs, out / "training.png")
        if tp is not None:
            figures["Training curves"] = tp
    full_meta = {"images": image_source(cfg, len(ids)), "eval_config": asdict(cfg), "eval_seconds": round(time.time() - t0, 1), **(meta or {})}
    write_report(out, result, figures, full_meta)
    if progress:
        print(format_table(result))
        print()
        print(format_deltas(result))
    return result


def image_source(cfg: EvalConfig, n: int) -> str:
    """Where the evaluated crops come from, in words (for the report's header)."""
    ls = cfg.lr_set
    src = f"your HR images in {ls.hr_dir}" if ls.hr_dir else f"the bundled {ls.split} photographs"
    return f"{n} crops of {ls.patch}² px from {src} (seed {ls.seed}), degraded ({ls.degradation}, ×{ls.scale})"
