import json
import re
from pathlib import Path

import torch

from sralign.eval.bestof import best_mean_worst
from sralign.eval.run import EvalConfig, run_eval
from sralign.policies import load_policy
from sralign.train.candidates import LRSetConfig


def test_best_mean_worst_hand_computed():
    r = torch.tensor([[0.2, 0.8, 0.5], [0.4, 0.1, 0.9]])
    c = best_mean_worst(r)
    assert torch.allclose(torch.tensor(c["best"]), torch.tensor([0.3, 0.6, 0.85]))
    assert torch.allclose(torch.tensor(c["mean"]), torch.tensor([0.3, 0.375, (1.5 / 3 + 1.4 / 3) / 2]))
    assert torch.allclose(torch.tensor(c["worst"]), torch.tensor([0.3, 0.15, 0.15]))
    low = best_mean_worst(r, higher_is_better=False)
    assert torch.allclose(torch.tensor(low["best"]), torch.tensor([0.3, 0.15, 0.15]))


def _small_cfg():
    return EvalConfig(m=3, steps=2, lr_set=LRSetConfig(split="heldout", n=2, patch=48, seed=5), grid_images=1, grid_seeds=2)


def _report_numbers(out: Path) -> list[str]:
    md = (out / "report.md").read_text()
    return re.findall(r"-?\d+\.\d{4}", md.split("## ")[0])


def test_report_files_exist_and_numbers_follow_the_policy(tmp_path, policy_dir):
    p = load_policy(str(policy_dir))
    p.freeze_reference()
    with torch.no_grad():
        for q in p.trainable_parameters():
            q.add_(0.02 * torch.randn_like(q))
    run_eval({"aligned": p}, _small_cfg(), tmp_path / "a", progress=False)
    html = (tmp_path / "a" / "report.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith("data:image/png;base64,") or (tmp_path / "a" / r).exists() for r in refs)
    md = (tmp_path / "a" / "report.md").read_text()
    for img in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (tmp_path / "a" / img).is_file()
    ev = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert set(ev["reward"]) == {"reference (ode)", "aligned"} and len(ev["reward"]["aligned"]["mean"]) == 3
    # perturb the aligned weights: the report's numbers must change
    with torch.no_grad():
        for q in p.trainable_parameters():
            q.add_(0.05 * torch.randn_like(q))
    run_eval({"aligned": p}, _small_cfg(), tmp_path / "b", progress=False)
    a, b = _report_numbers(tmp_path / "a"), _report_numbers(tmp_path / "b")
    assert len(a) == len(b) and a != b
    ref_a = json.loads((tmp_path / "a" / "eval.json").read_text())["metrics"]["psnr"]["reference (ode)"]["mean"]
    ref_b = json.loads((tmp_path / "b" / "eval.json").read_text())["metrics"]["psnr"]["reference (ode)"]["mean"]
    assert ref_a == ref_b  # the reference did not move
