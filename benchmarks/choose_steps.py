"""How long should the demo train each method? (chosen on selection sets, never on a reporting set)

An aligned policy keeps raising its training reward long after its images stop getting better:
past some step the offline methods buy reward with grain and lost PSNR (issue 16). This script
trains each of the demo's methods exactly as ``sralign demo`` does (same candidates, reward,
seeds), stops at every step count of a grid (one run, resumed: the same trajectory), and
evaluates each stop against the reference on two *selection* sets:

* ``train``: the demo's own training crops (the LRs it generated candidates for), and
* ``select``: crops of the selection photographs (``--select-dir``, e.g. /tmp/photos/stage2/val, the
  folder the shipped ``ode_start`` was chosen on; neither reporting set uses them).

The rule, fixed before looking (issue 16's targets): per method, the largest step count at which,
on *both* selection sets and against the reference, the demo's reward's Mean@M and Worst@M rise,
so do those of the reward the method trained on (``ΔMean(own)`` / ``ΔWorst(own)``), PSNR-Y falls
by no more than 0.1 dB and SSIM by no more than 0.005, and the evaluation raises no hacking flag
(``sralign.eval.hacking``: no-reference gain with a fidelity loss, sharpness or smooth-region
noise beyond the HR's). Before 2026-11-25 the rule was the first and last conditions only.
``--eval-only`` re-evaluates the stops an earlier run saved. The demo's held-out crops and the second set (the
reporting sets) are never loaded here.

The same runs compare reward variants and offline β (``--fr``, ``--nr``, ``--nr-weight``, ``--beta``, ``--set
METHOD.KEY=VALUE``; ``--grid 'dp2o:60;dgpo:60'`` for one stop per method); README, "How the
demo's reward, β and step counts were chosen", has the table and the rule.

    python benchmarks/choose_steps.py --out /tmp/choose-steps --select-dir /tmp/photos/stage2/val
    python benchmarks/choose_steps.py --out /tmp/v1 --select-dir /tmp/photos/stage2/val --grid 'dp2o:60;dgpo:60' \
        --fr ms_ssim,gmsd,local_grad_fidelity --beta 100000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from sralign.config import ConfigError, load_config, validate
from sralign.data.store import CandidateStore
from sralign.demo import DemoConfig, offline_metric_names
from sralign.eval.report import delta_rows
from sralign.eval.run import run_eval
from sralign.policies import load_policy
from sralign.train.candidates import LRSetConfig, generate, generation_key_id, score_store
from sralign.train.offline import OfflineTrainer
from sralign.train.online import OnlineTrainer

GRID = {"dp2o": (20, 40, 60, 90, 120), "dpo": (20, 40, 60, 90, 120), "gdpo": (15, 30, 45, 60), "dgpo": (15, 30, 45, 60)}


def train_stops(method: str, cfg: DemoConfig, store: CandidateStore, base, out: Path, stops_at: tuple[int, ...]) -> dict[int, Path]:
    """Train ``method`` as the demo does, saving the policy at each step count of ``grid``."""
    run, stops = out / "runs" / method, {}
    for k in stops_at:
        torch.manual_seed(0)
        pol = load_policy()
        if method in ("dp2o", "dpo"):
            ocfg = replace(getattr(cfg, method), steps=k, store_key=generation_key_id(base, cfg.generate))
            OfflineTrainer(pol, store, ocfg, run).train(resume=True, progress=False)
        else:
            ocfg = replace(getattr(cfg, method), steps_total=k)
            OnlineTrainer(pol, ocfg, run).train(resume=True, progress=False)
        dst = out / "stops" / f"{method}@{k}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(run / "policy", dst)
        stops[k] = dst
    return stops


def passes(r: dict, th) -> bool:
    """One stop on one set, by the issue's targets: the demo's reward and the method's own training
    reward rise in Mean@M and Worst@M, and PSNR-Y / SSIM fall by no more than the hacking
    thresholds (0.1 dB, 0.005). The hacking flag is checked beside it."""
    return (r["ΔMean@M"] > 0 and r["ΔWorst@M"] > 0 and r["ΔMean@M (trained)"] > 0 and r["ΔWorst@M (trained)"] > 0
            and r["Δpsnr"] >= -th.psnr_drop_db and r["Δssim"] >= -th.ssim_drop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="work folder (candidates, runs, stops, evaluations)")
    ap.add_argument("--select-dir", required=True, help="selection photographs (not a reporting set)")
    ap.add_argument("--methods", default="dp2o,dpo,gdpo,dgpo")
    ap.add_argument("--m", type=int, default=4, help="seeds per crop in the evaluations")
    ap.add_argument("--n", type=int, default=24, help="crops of the selection photographs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", default="", help="e.g. 'dp2o:60;dgpo:60' (default: every method at its grid)")
    ap.add_argument("--fr", default="", help="reward variant: full-reference metrics (default: the demo's)")
    ap.add_argument("--nr", default="", help="reward variant: no-reference metrics (default: the demo's)")
    ap.add_argument("--nr-weight", type=float, default=None, help="reward variant: the hybrid's NR share in [0, 1] (default: the demo's)")
    ap.add_argument("--beta", type=float, default=0.0, help="offline methods' β (default: the demo's)")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE", help="another training setting, e.g. dp2o.t_max=0.5")
    ap.add_argument("--store", default="", help="an existing candidate folder of this version (default: OUT/store)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the stops an earlier run left in OUT/stops (no training)")
    a = ap.parse_args()
    asked = {m: tuple(int(k) for k in ks.split(",")) for m, ks in (p.split(":") for p in filter(None, a.grid.split(";")))}
    grid = {**GRID, **asked}
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    cfg = DemoConfig()
    if a.fr or a.nr:  # one reward for every method, the evaluation included (GDPO-SR keeps its attribute split)
        for c in (cfg.dp2o, cfg.dpo, cfg.gdpo, cfg.dgpo, cfg.eval):
            c.fr_metrics = a.fr.split(",") if a.fr else c.fr_metrics
            c.nr_metrics = a.nr.split(",") if a.nr else c.nr_metrics
    settings = [f"{m}.beta={a.beta}" for m in ("dp2o", "dpo")] if a.beta else []
    if a.nr_weight is not None:  # every hybrid, the evaluation's included
        settings += [f"{m}.nr_weight={a.nr_weight}" for m in ("dp2o", "dpo", "gdpo", "dgpo", "eval")]
    for kv in settings + a.set:  # through the configs' own override path: typed and range-checked
        sect, override = kv.split(".", 1)
        c = getattr(cfg, sect)
        setattr(cfg, sect, load_config(type(c), None, [override], base=c))
    select = LRSetConfig(split="select", n=a.n, patch=cfg.generate.lr_set.patch, seed=11, hr_dir=a.select_dir)
    try:
        validate(select)  # a missing --select-dir stops here, not after the training
    except ConfigError as e:
        raise SystemExit(f"--select-dir: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = load_policy()
    store = CandidateStore(Path(a.store) if a.store else out / "store", create=True)
    generate(store, base, cfg.generate, progress=False)
    score_store(store, offline_metric_names(cfg), progress=False)  # only what is missing
    print(f"candidates: {time.time() - t0:.0f} s", flush=True)
    methods = [m for m in a.methods.split(",") if m and (not asked or m in asked)]
    policies, samplers = {}, {}
    for m in methods:
        t1 = time.time()
        if a.eval_only:
            missing = [f"{m}@{k}" for k in grid[m] if not (out / "stops" / f"{m}@{k}" / "config.json").is_file()]
            if missing:
                raise SystemExit(f"--eval-only: {out / 'stops'} lacks {', '.join(missing)}; run once without --eval-only")
        stops = {k: out / "stops" / f"{m}@{k}" for k in grid[m]} if a.eval_only else train_stops(m, cfg, store, base, out, grid[m])
        for k, p in stops.items():
            policies[f"{m}@{k}"] = p
            samplers[f"{m}@{k}"] = cfg.generate.sampler if m in ("dp2o", "dpo") else getattr(cfg, m).sampler
        print(f"train {m} {grid[m]}: {time.time() - t1:.0f} s", flush=True)
    sets = {
        "train": cfg.generate.lr_set,  # the demo's training crops
        "select": select,
    }
    rows: dict[str, dict[str, dict]] = {}
    for name, lrs in sets.items():
        t1 = time.time()
        res = run_eval(policies, replace(cfg.eval, m=a.m, lr_set=lrs, grid_images=1, grid_seeds=1), out / f"eval_{name}",
                       samplers=samplers, progress=False, trained={p: getattr(cfg, p.split("@")[0]) for p in policies})
        rows[name] = {r["policy"]: r for r in delta_rows(res)}
        print(f"eval on {name}: {time.time() - t1:.0f} s", flush=True)
    print(f"\n{'stop':>10s} " + " ".join(f"{s + ':' + c:>16s}" for s in sets for c in ("ΔMean", "ΔWorst", "Δpsnr", "Δpsnr_rgb", "Δssim", "noise/HR", "flag", "ΔMean(own)", "ΔWorst(own)")))
    choice, th = {}, cfg.eval.hacking
    for m in methods:
        ok_k = []
        for k in grid[m]:
            label, cells, ok = f"{m}@{k}", [], True
            for s in sets:
                r = rows[s][label]
                flag = r["hacking flags"] != "none"
                ok &= passes(r, th) and not flag
                cells += [f"{r['ΔMean@M']:+.4f}", f"{r['ΔWorst@M']:+.4f}", f"{r['Δpsnr']:+.3f}", f"{r.get('Δpsnr_rgb', float('nan')):+.3f}", f"{r['Δssim']:+.4f}",
                          f"{r['noise/HR']:.3f}", "FLAG" if flag else "-",
                          f"{r['ΔMean@M (trained)']:+.4f}", f"{r['ΔWorst@M (trained)']:+.4f}"]  # under its own training reward
            if ok:
                ok_k.append(k)
            print(f"{label:>10s} " + " ".join(f"{c:>16s}" for c in cells), flush=True)
        choice[m] = max(ok_k) if ok_k else None
    print("\nrule (most steps with both rewards up, fidelity kept and no flag on both selection sets):",
          ", ".join(f"{m} {choice[m] if choice[m] is not None else 'none'}" for m in methods))
    (out / "choice.json").write_text(json.dumps({"choice": choice, "rows": rows}, indent=1, default=str))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
