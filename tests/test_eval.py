import json
import re
from pathlib import Path

import torch

from sralign.eval.bestof import best_mean_worst
from sralign.eval.run import EvalConfig, run_eval
from sralign.data.images import center_crop, load_bundled
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
    # the hacking view: HR's own NR scores, bicubic, sharp/noise ratios, flags of the aligned row
    assert set(ev["stats"]) == {"reference (ode)", "aligned", "bicubic"} and set(ev["flags"]) == {"aligned"}
    assert set(ev["hr_values"]) >= {"brisque", "niqe_s", "gap:brisque"} and ev["hr_values"]["gap:brisque"] == 0.0
    assert ev["bicubic"]["psnr"] > 0 and ev["thresholds"]["psnr_drop_db"] == 0.1
    table = md.split("## ")[0]
    assert "| HR |" in table and "| bicubic |" in table and "sharp/HR" in table and "hacking flags" in table
    assert "psnr↑ (held-out)" in table and "brisque↓ (gap in reward)" in table and "gmsd↓ |" in table
    assert "Each aligned policy against its reference" in md
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


# ------------------------------------------------------------------ reward-hacking diagnostics
from sralign.eval.hacking import HackingThresholds, hacking_flags, hr_relative_stats, smooth_highpass, smooth_mask  # noqa: E402


def _m(policy, reference, higher=True):
    return {"aligned": {"mean": policy, "higher_is_better": higher}, "ref": {"mean": reference, "higher_is_better": higher}}


def _stats(sharp=1.0, noise=1.0, ref_sharp=0.9, ref_noise=0.9):
    return {"aligned": {"sharp/HR": sharp, "noise/HR": noise}, "ref": {"sharp/HR": ref_sharp, "noise/HR": ref_noise}}


FID = {"psnr": "psnr", "ssim": "ssim"}


def test_flags_nr_gain_with_fidelity_loss():
    m = {"brisque": _m(30.0, 40.0, higher=False), "psnr": _m(27.5, 28.0), "ssim": _m(0.71, 0.71)}
    flags = hacking_flags(m, _stats(), "aligned", "ref", ["brisque"], FID)
    assert len(flags) == 1 and "no-reference gain (brisque)" in flags[0] and "psnr -0.500" in flags[0]
    # same fidelity loss, but no NR gain (brisque got worse): not the hacking pattern
    m["brisque"] = _m(45.0, 40.0, higher=False)
    assert hacking_flags(m, _stats(), "aligned", "ref", ["brisque"], FID) == []
    # NR gain, fidelity within tolerance (PSNR −0.09 dB, SSIM −0.004): no flag
    m = {"brisque": _m(30.0, 40.0, higher=False), "psnr": _m(27.91, 28.0), "ssim": _m(0.706, 0.71)}
    assert hacking_flags(m, _stats(), "aligned", "ref", ["brisque"], FID) == []
    # SSIM alone beyond its tolerance
    m["ssim"] = _m(0.70, 0.71)
    assert "ssim -0.010" in hacking_flags(m, _stats(), "aligned", "ref", ["brisque"], FID)[0]
    # a gap: metric (higher is better) counts as an NR gain too; gains below 1 % do not
    m = {"gap:brisque": _m(-2.0, -5.0), "psnr": _m(27.0, 28.0)}
    assert hacking_flags(m, _stats(), "aligned", "ref", ["gap:brisque"], FID)
    m = {"gap:brisque": _m(-4.96, -5.0), "psnr": _m(27.0, 28.0)}
    assert hacking_flags(m, _stats(), "aligned", "ref", ["gap:brisque"], FID) == []


def test_flags_sharpness_and_noise_beyond_the_hr():
    m = {"psnr": _m(28.0, 28.0)}
    assert hacking_flags(m, _stats(sharp=1.09, noise=1.1), "aligned", "ref", [], FID) == []
    f = hacking_flags(m, _stats(sharp=1.2, noise=1.5), "aligned", "ref", [], FID)
    assert len(f) == 2 and f[0].startswith("sharp/HR 1.20") and f[1].startswith("noise/HR 1.50")
    # beyond the HR but *less* than its reference: alignment did not cause it
    assert hacking_flags(m, _stats(sharp=1.2, ref_sharp=1.3), "aligned", "ref", [], FID) == []
    strict = HackingThresholds(sharp_max=1.05)
    assert hacking_flags(m, _stats(sharp=1.07), "aligned", "ref", [], FID, strict)


def test_smooth_noise_sees_grain_in_flat_regions_only():
    g = torch.Generator().manual_seed(0)
    hr = torch.full((1, 3, 40, 40), 0.5)
    hr[..., :, 20:] = torch.rand(1, 3, 40, 20, generator=g)  # left smooth, right textured
    mask = smooth_mask(hr)
    assert mask[0, 0, :, :17].min() == 1 and mask[0, 0, :, 18:].max() == 0  # eroded by 2 px
    grain_left = hr.clone()
    grain_left[..., :, :16] += 0.03 * torch.randn(1, 3, 40, 16, generator=g)
    grain_right = hr.clone()
    grain_right[..., :, 24:] += 0.03 * torch.randn(1, 3, 40, 16, generator=g)
    assert float(smooth_highpass(hr, mask)) < 1e-6
    assert float(smooth_highpass(grain_left, mask)) > 3.0  # 8-bit units
    assert float(smooth_highpass(grain_right, mask)) < 1e-6
    assert torch.isnan(smooth_highpass(hr, torch.zeros_like(mask))).all()
    # stats against the HR: the truth is 1 / 1, a blurred copy is below, a noised copy above
    photo = torch.stack([center_crop(img, 64) for _, img in load_bundled("heldout")])
    st = hr_relative_stats(photo[:, None], photo)
    assert abs(st["sharp/HR"] - 1) < 1e-6 and abs(st["noise/HR"] - 1) < 1e-6
    noisy = (photo + 0.03 * torch.randn(photo.shape, generator=g)).clamp(0, 1)
    st = hr_relative_stats(torch.stack([photo, noisy], 1), photo)
    assert st["noise/HR"] > 2.0 and st["sharp/HR"] > 1.01  # grain moves the smooth-region noise far more than sharpness


def test_delta_rows_against_the_reference_of_the_same_sampler():
    from types import SimpleNamespace

    from sralign.eval.report import delta_rows, format_deltas

    cur = lambda mean, worst: {"mean": [mean], "best": [1.0], "worst": [worst]}  # noqa: E731
    res = SimpleNamespace(
        reward={"reference (ode)": cur(0.3, 0.2), "a": cur(0.5, 0.45), "reference (onestep)": cur(0.4, 0.3), "b": cur(0.45, 0.32)},
        samplers={"reference (ode)": "ode", "a": "ode", "reference (onestep)": "onestep", "b": "onestep"},
        reward_std={"reference (ode)": 0.05, "a": 0.03, "reference (onestep)": 0.02, "b": 0.025},
        metrics={"psnr": {"reference (ode)": {"mean": 28.0}, "a": {"mean": 28.05}, "reference (onestep)": {"mean": 29.0}, "b": {"mean": 28.5}}},
        stats={k: {"sharp/HR": 0.7, "noise/HR": 0.8} for k in ("reference (ode)", "a", "reference (onestep)", "b")},
        flags={"a": [], "b": ["x"]},
    )
    rows = {r["policy"]: r for r in delta_rows(res)}
    assert rows["a"]["vs"] == "reference (ode)" and rows["b"]["vs"] == "reference (onestep)"
    assert abs(rows["a"]["ΔMean@M"] - 0.2) < 1e-9 and abs(rows["a"]["ΔWorst@M"] - 0.25) < 1e-9 and abs(rows["a"]["Δstd/img"] + 0.02) < 1e-9
    assert abs(rows["b"]["Δpsnr"] + 0.5) < 1e-9 and rows["a"]["hacking flags"] == "none" and rows["b"]["hacking flags"] == "x"
    assert "| a | reference (ode) | +0.2000 | +0.2500 | -0.0200 | +0.0500 | 0.700 | 0.800 | none |" in format_deltas(res)


def test_run_sampler_reads_the_run_config(tmp_path):
    from sralign.eval.run import run_sampler

    assert run_sampler(tmp_path) == "ode"
    (tmp_path / "config.yaml").write_text("method: gdpo\nsampler: onestep\n")
    assert run_sampler(tmp_path) == "onestep"
