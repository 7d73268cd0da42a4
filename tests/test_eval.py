import json
import re
from pathlib import Path

import pytest
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


def _aligned(policy_dir, scale: float):
    """The policy with its reference frozen and its trainable weights moved by scale·N(0, 1)."""
    p = load_policy(str(policy_dir))
    p.freeze_reference()
    with torch.no_grad():
        for q in p.trainable_parameters():
            q.add_(scale * torch.randn_like(q))
    return p


def test_report_files_exist_and_numbers_follow_the_policy(tmp_path, policy_dir):
    p = _aligned(policy_dir, 0.02)
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


def test_flags_a_colour_shift_through_psnr_rgb():
    """Every reward term reads luma: a drift of the colour balance shows only in PSNR-RGB."""
    fid = {"psnr": "psnr", "psnr_rgb": "psnr_rgb", "ssim": "ssim"}
    m = {"brisque": _m(30.0, 40.0, higher=False), "psnr": _m(28.1, 28.0), "psnr_rgb": _m(25.6, 26.0), "ssim": _m(0.71, 0.71)}
    flags = hacking_flags(m, _stats(), "aligned", "ref", ["brisque"], fid)
    assert len(flags) == 1 and "psnr_rgb -0.400" in flags[0] and "psnr -" not in flags[0]
    m["psnr_rgb"] = _m(25.95, 26.0)  # within the PSNR tolerance
    assert hacking_flags(m, _stats(), "aligned", "ref", ["brisque"], fid) == []


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
        paired={"a": {"ΔMean@M": 0.2, "ΔWorst@M": 0.25, "Δstd/img": -0.02}, "b": {"ΔMean@M": 0.05, "ΔWorst@M": 0.02, "Δstd/img": 0.005}},
        metrics={"psnr": {"reference (ode)": {"mean": 28.0}, "a": {"mean": 28.05}, "reference (onestep)": {"mean": 29.0}, "b": {"mean": 28.5}}},
        stats={k: {"sharp/HR": 0.7, "noise/HR": 0.8} for k in ("reference (ode)", "a", "reference (onestep)", "b")},
        flags={"a": [], "b": ["x"]},
    )
    rows = {r["policy"]: r for r in delta_rows(res)}
    assert rows["a"]["vs"] == "reference (ode)" and rows["b"]["vs"] == "reference (onestep)"
    assert abs(rows["a"]["ΔMean@M"] - 0.2) < 1e-9 and abs(rows["a"]["ΔWorst@M"] - 0.25) < 1e-9 and abs(rows["a"]["Δstd/img"] + 0.02) < 1e-9
    assert abs(rows["b"]["Δpsnr"] + 0.5) < 1e-9 and rows["a"]["hacking flags"] == "none" and rows["b"]["hacking flags"] == "x"
    assert "| a | reference (ode) | +0.2000 | +0.2500 | -0.0200 | +0.0500 | yes | +0.0500 | 0.700 | 0.800 | none |" in format_deltas(res)
    # b: Worst@M +0.02 < Mean@M +0.05, std up: the claim does not hold
    assert abs(rows["b"]["ΔWorst−ΔMean"] + 0.03) < 1e-9 and rows["b"]["spread claim"] == "no"
    assert "holds for a; does not hold for b." in format_deltas(res)


@pytest.mark.parametrize("d_mean, d_worst, d_std, holds", [
    (0.10, 0.15, -0.01, True),    # Worst rises more than Mean, spread falls
    (0.10, 0.15, +0.01, False),   # spread grows
    (0.10, 0.15, 0.0, False),     # spread unchanged
    (0.10, 0.05, -0.01, False),   # Worst rises less than Mean
    (0.10, 0.10, -0.01, False),   # equal rise is not "more"
    (-0.10, -0.05, -0.01, False), # Worst falls (less than Mean): it does not rise
    (-0.02, 0.01, -0.003, True),  # Mean falls a little, Worst rises: holds
])
def test_spread_claim_hand_made(d_mean, d_worst, d_std, holds):
    from sralign.eval.report import spread_claim

    assert spread_claim(d_mean, d_worst, d_std) is holds


def test_spread_claim_column_and_line_from_hand_made_results(tmp_path):
    """The shipped demo's DP²O numbers (issue 16): Worst@M +0.2693 vs Mean@M +0.2773, std/img
    0.0589 → 0.0586 — the claim does not hold; a made-up run where it does."""
    from types import SimpleNamespace

    from sralign.eval.report import delta_rows, format_deltas, write_report

    cur = lambda mean, worst: {"mean": [mean - 0.1, mean], "best": [1.0, 1.0], "worst": [worst + 0.1, worst]}  # noqa: E731
    res = SimpleNamespace(
        m=2, reward_names=["gmsd"], heldout_metrics=["psnr"],
        reward={"reference (ode)": cur(0.30, 0.20), "dp2o": cur(0.5773, 0.4693), "good": cur(0.40, 0.35)},
        samplers={"reference (ode)": "ode", "dp2o": "ode", "good": "ode"},
        reward_std={"reference (ode)": 0.0589, "dp2o": 0.0586, "good": 0.0400},
        paired={"dp2o": {"ΔMean@M": 0.2773, "ΔWorst@M": 0.2693, "Δstd/img": -0.0003}, "good": {"ΔMean@M": 0.10, "ΔWorst@M": 0.15, "Δstd/img": -0.0189}},
        win_rate={"dp2o": 0.9, "good": 0.8},
        metrics={"psnr": {k: {"mean": 28.0, "higher_is_better": True} for k in ("reference (ode)", "dp2o", "good")}},
        stats={k: {"sharp/HR": 0.9, "noise/HR": 1.0} for k in ("reference (ode)", "dp2o", "good", "bicubic")},
        hr_values={}, bicubic={"psnr": 27.0}, thresholds={}, flags={"dp2o": [], "good": []},
    )
    rows = {r["policy"]: r for r in delta_rows(res)}
    assert abs(rows["dp2o"]["ΔWorst−ΔMean"] - (0.2693 - 0.2773)) < 1e-9 and rows["dp2o"]["spread claim"] == "no"
    assert abs(rows["good"]["ΔWorst−ΔMean"] - 0.05) < 1e-9 and rows["good"]["spread claim"] == "yes"
    table = format_deltas(res)
    assert "| ΔWorst−ΔMean | spread claim |" in table
    assert "| dp2o | reference (ode) | +0.2773 | +0.2693 | -0.0003 | -0.0080 | no |" in table
    assert table.endswith("Worst@M rises more than Mean@M and per-image std falls, against the reference at equal seeds): "
                          "holds for good; does not hold for dp2o.")
    html_path, md_path = write_report(tmp_path, res, {}, {})
    page = html_path.read_text()
    assert "<th>ΔWorst−ΔMean</th><th>spread claim</th>" in page and "<p>DP²O-SR&#x27;s claim (" in page
    assert "holds for good; does not hold for dp2o." in md_path.read_text()


def test_run_sampler_reads_the_run_config(tmp_path):
    from sralign.eval.run import run_sampler

    assert run_sampler(tmp_path) == "ode"
    (tmp_path / "config.yaml").write_text("method: gdpo\nsampler: onestep\n")
    assert run_sampler(tmp_path) == "onestep"


def test_eval_cli_on_your_own_photos_reports_like_the_demo(tmp_path, policy_dir, capsys):
    """`sralign eval RUN lr_set.hr_dir=DIR` on a folder of PNG photographs: the printed tables,
    eval.json and report.html carry the HR and bicubic rows, every no-reference metric with the
    HR's own value, held-out PSNR/SSIM, sharp/HR and noise/HR, the hacking flags and the change
    table against the reference of the same sampler (GDPO-SR: onestep)."""
    from sralign.cli import main
    from sralign.data.images import save_image
    from sralign.rewards.registry import get_metric

    photos = tmp_path / "photos"
    photos.mkdir()
    crops = [center_crop(img, 72) for _, img in load_bundled("heldout")[:3]]
    for i, c in enumerate(crops):
        save_image(c, photos / f"p{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--method", "gdpo", "--policy", str(policy_dir), "--out", str(run), "--quiet",
                 "steps_total=1", "batch_lr=1", "group=2", "lr_set.n=1", "lr_set.patch=32"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "m=2", "steps=2", f"lr_set.hr_dir={photos}", "lr_set.n=3", "lr_set.patch=64", "grid_images=1", "grid_seeds=1"]) == 0
    printed = capsys.readouterr().out
    out = run / "eval"
    ev = json.loads((out / "eval.json").read_text())
    # the aligned GDPO-SR policy is compared with the one-step reference at equal seeds, ranked
    # with the reward it trained on (the attribute-aware one; PSNR is in it, SSIM held out)
    assert ev["samplers"] == {"reference (onestep)": "onestep", "run": "onestep"}
    assert ev["reward_kind"] == "attribute" and ev["reward_names"] == ["psnr", "gap:brisque", "gap:niqe_s"]
    assert ev["heldout_metrics"] == ["psnr_rgb", "ssim", "brisque", "niqe_s"]
    rows = {r["policy"]: r for r in ev["table"]}
    assert set(rows) == {"reference (onestep)", "run", "bicubic", "HR"}
    nr = ["brisque", "niqe_s", "gap:brisque", "gap:niqe_s"]
    for name in nr:  # every no-reference metric with the HR's own value
        assert name in rows["HR"] and name in rows["run"] and name in rows["bicubic"]
    hr_imgs = torch.stack([d for d in _eval_crops(photos)])
    assert abs(rows["HR"]["brisque"] - float(get_metric("brisque")(hr_imgs).mean())) < 1e-3  # the HR's own BRISQUE
    assert rows["HR"]["gap:brisque"] == 0.0 and rows["HR"]["sharp/HR"] == 1.0
    for col in ("psnr", "ssim", "sharp/HR", "noise/HR"):
        assert isinstance(rows["run"][col], float) and isinstance(rows["bicubic"][col], float)
    assert rows["bicubic"]["psnr"] > 10 and "hacking flags" in rows["run"]
    (ch,) = ev["vs_reference"]
    assert ch["policy"] == "run" and ch["vs"] == "reference (onestep)"
    assert {"ΔMean@M", "ΔWorst@M", "Δstd/img", "ΔWorst−ΔMean", "spread claim", "Δpsnr", "Δssim", "sharp/HR", "noise/HR", "hacking flags"} <= set(ch)
    assert abs(ch["Δpsnr"] - (rows["run"]["psnr"] - rows["reference (onestep)"]["psnr"])) < 1e-9
    # printed and in the report: the same rows and columns
    html = (out / "report.html").read_text()
    for text in (printed, html, (out / "report.md").read_text()):
        for token in ("HR", "bicubic", "psnr↑", "ssim↑ (held-out)", "brisque↓ (gap in reward)", "niqe_s↓ (gap in reward)",
                      "gap:brisque↑", "sharp/HR", "noise/HR", "hacking flags", "ΔWorst−ΔMean", "spread claim", "reference (onestep)"):
            assert token in text, token
    assert "| HR |" in printed and "| bicubic |" in printed and "| run | reference (onestep) |" in printed
    assert "<td>HR</td>" in html and "<td>bicubic</td>" in html and f"your HR images in {photos}" in html
    assert "attribute-aware reward (PSNR-Y on the HR&#x27;s smooth area, gap:brisque, gap:niqe_s on its texture)" in html
    # naming a reward yourself wins over the run's: DP²O-SR's hybrid with PSNR held out again
    assert main(["eval", str(run), "--quiet", "m=1", "steps=1", f"lr_set.hr_dir={photos}", "lr_set.n=1", "lr_set.patch=64",
                 "nr_metrics=[gap:brisque]", "--out", str(tmp_path / "ev2")]) == 0
    ev2 = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert ev2["reward_kind"] == "hybrid" and ev2["reward_names"] == ["ms_ssim", "gmsd", "local_grad_fidelity", "gap:brisque"]
    assert "psnr" in ev2["heldout_metrics"]


def test_run_reward_reads_the_trained_reward(tmp_path):
    from sralign.eval.run import run_reward

    assert run_reward(tmp_path) == {}
    (tmp_path / "config.yaml").write_text("method: gdpo\nreward: attribute\nnr_metrics: [brisque]\ntexture_rule: authors\nbeta: 5\n")
    assert run_reward(tmp_path) == {"reward": "attribute", "nr_metrics": ["brisque"], "texture_rule": "authors"}
    (tmp_path / "config.yaml").write_text("method: dp2o\nfr_metrics: [psnr]\nnr_metrics: [gap:brisque]\n")  # offline runs: hybrid
    assert run_reward(tmp_path) == {"reward": "hybrid", "fr_metrics": ["psnr"], "nr_metrics": ["gap:brisque"]}
    (tmp_path / "config.yaml").write_text("method: dp2o\nfr_metrics: [psnr]\nnr_metrics: [gap:brisque]\nnr_weight: 0.25\n")
    assert run_reward(tmp_path)["nr_weight"] == 0.25


def _eval_crops(photos):
    """The HR crops `sralign eval` draws from ``photos`` with the test's settings."""
    from sralign.data.lrset import make_lr_set

    return [d.hr for d in make_lr_set(LRSetConfig(split="heldout", n=3, patch=64, seed=123, hr_dir=str(photos)))]


def test_lr_set_overrides_keep_the_held_out_split():
    """`sralign eval RUN lr_set.n=48` (or lr_set.hr_dir=DIR) changes only what it names: the
    crops stay the held-out split's, seed 123 — not LRSetConfig()'s training split."""
    from sralign.config import load_config

    c = load_config(EvalConfig, None, ["lr_set.n=3", "lr_set.patch=32"])
    assert (c.lr_set.split, c.lr_set.seed, c.lr_set.n, c.lr_set.patch) == ("heldout", 123, 3, 32)
    c = load_config(EvalConfig, None, ["lr_set.hr_dir=."])
    assert (c.lr_set.split, c.lr_set.seed, c.lr_set.n) == ("heldout", 123, 8)


# ------------------------------------------------------------------ judged by the reward it trained on
def test_trained_deltas_hand_computed_under_the_attribute_reward():
    from sralign.eval.bestof import trained_deltas
    from sralign.rewards.attribute import AttributeReward

    g = torch.Generator().manual_seed(0)
    hr = torch.stack([torch.full((3, 40, 40), 0.5), torch.rand(3, 40, 40, generator=g)])  # flat, then all texture
    rw = AttributeReward.from_names(["gap:brisque"])
    f_smooth, f_tex = rw.areas(hr)
    assert f_tex.flatten().tolist() == [0.0, 1.0]  # the premise of the hand computation
    # raw scores of M = 2 samples per row; the flat HR reads PSNR only, the textured one the NR gap only
    raw = {"ref": {"psnr": torch.tensor([[30.0, 32.0], [20.0, 21.0]]), "gap:brisque": torch.tensor([[-5.0, -1.0], [-8.0, -6.0]])},
           "a": {"psnr": torch.tensor([[34.0, 31.0], [19.0, 22.0]]), "gap:brisque": torch.tensor([[-2.0, -9.0], [-4.0, -10.0]])}}
    d = trained_deltas(rw, raw, {}, hr, 2, "a", "ref")
    # image 0 (smooth): minmax psnr over [30, 32, 34, 31] -> ref [0, .5], a [1, .25]
    # image 1 (texture): minmax gap over [-8, -6, -4, -10] -> ref [1/3, 2/3], a [1, 0]
    ref_mean, a_mean = (0.25 + 0.5) / 2, (0.625 + 0.5) / 2
    ref_worst, a_worst = (0.0 + 1 / 3) / 2, (0.25 + 0.0) / 2
    assert abs(d["ΔMean@M"] - (a_mean - ref_mean)) < 1e-6 and abs(d["ΔWorst@M"] - (a_worst - ref_worst)) < 1e-6
    assert d["reward"] == "attribute (psnr | gap:brisque)"


def test_paired_deltas_do_not_depend_on_the_other_rows():
    """A change against the reference is normalised over the two rows only: a third row that widens
    one term's range rescales that term in a pooled normalisation — widening PSNR's changes the
    pooled ΔMean@M's size, widening the gap term's flips its sign — but leaves the paired change as
    computed by hand."""
    from sralign.eval.bestof import best_mean_worst, paired_deltas, pooled_total, row_block
    from sralign.rewards.hybrid import HybridReward

    hr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rw = HybridReward.from_names(["psnr"], ["gap:brisque"], nr_weight=0.5)
    raw = {"ref": {"psnr": torch.tensor([[30.0, 31.0]]), "gap:brisque": torch.tensor([[-6.0, -4.0]])},
           "a": {"psnr": torch.tensor([[29.0, 30.0]]), "gap:brisque": torch.tensor([[-2.0, -3.0]])},
           "far": {"psnr": torch.tensor([[20.0, 40.0]]), "gap:brisque": torch.tensor([[-5.0, -5.0]])}}
    d = paired_deltas(rw, raw, hr, 2, "a", "ref")
    # over the pair: psnr [29, 31] -> ref [.5, 1], a [0, .5]; gap [-6, -2] -> ref [0, .5], a [1, .75]
    # total = ½·psnr + ½·gap -> ref [.25, .75], a [.5, .625]
    assert abs(d["ΔMean@M"] - (0.5625 - 0.5)) < 1e-6 and abs(d["ΔWorst@M"] - (0.5 - 0.25)) < 1e-6
    assert abs(d["Δstd/img"] - (torch.tensor([0.5, 0.625]).std() - torch.tensor([0.25, 0.75]).std()).item()) < 1e-6
    assert d["win rate"] == 0.5  # seed 0: .5 > .25; seed 1: .625 < .75
    # pooled with "far": psnr's range is [20, 40], so the gap term decides and the sign is kept here,
    # but the size changes; with the gap term's range widened instead the sign flips
    names = ["ref", "a", "far"]

    def pooled_d():  # ΔMean@M of "a" against "ref" with all three rows normalised together
        pooled = pooled_total(rw, raw, names, hr)
        return best_mean_worst(row_block(pooled, names, 2, "a"))["mean"][-1] - best_mean_worst(row_block(pooled, names, 2, "ref"))["mean"][-1]

    assert abs(pooled_d() - d["ΔMean@M"]) > 0.05
    raw["far"] = {"psnr": torch.tensor([[30.0, 30.0]]), "gap:brisque": torch.tensor([[-40.0, 0.0]])}
    assert pooled_d() < 0 < d["ΔMean@M"]  # the pooled change flips sign; the paired one is unchanged:
    assert paired_deltas(rw, raw, hr, 2, "a", "ref") == d


def test_eval_reports_each_policy_under_its_own_training_reward(tmp_path, policy_dir):
    from dataclasses import replace

    from sralign.eval.report import delta_rows

    p = _aligned(policy_dir, 0.03)
    cfg = _small_cfg()
    # trained on the reward that ranks the table: the trained columns equal the common ones
    res = run_eval({"aligned": p}, cfg, tmp_path / "same", progress=False, trained={"aligned": cfg})
    row = delta_rows(res)[0]
    assert row["trained reward"].startswith("hybrid, NR 0.5 (ms_ssim")
    assert row["ΔMean@M (trained)"] == row["ΔMean@M"] and row["ΔWorst@M (trained)"] == row["ΔWorst@M"]
    # trained on the attribute reward: judged by it too, in eval.json and the report
    res = run_eval({"aligned": p}, cfg, tmp_path / "attr", progress=False, trained={"aligned": replace(cfg, reward="attribute")})
    row = delta_rows(res)[0]
    assert row["trained reward"] == "attribute (psnr | gap:brisque, gap:niqe_s)" and row["ΔMean@M (trained)"] != row["ΔMean@M"]
    ev = json.loads((tmp_path / "attr" / "eval.json").read_text())
    assert ev["vs_reference"][0]["ΔMean@M (trained)"] == row["ΔMean@M (trained)"]
    md = (tmp_path / "attr" / "report.md").read_text()
    assert "ΔWorst@M (trained)" in md and "attribute (psnr | gap:brisque, gap:niqe_s)" in md
    # without a trained reward the columns are absent
    res = run_eval({"aligned": p}, cfg, tmp_path / "none", progress=False)
    assert "trained reward" not in delta_rows(res)[0]
