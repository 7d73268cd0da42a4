import csv

import numpy as np
import pytest
import torch
from PIL import Image

from sralign.cli import main
from sralign.data.images import load_image, save_image


def _img(path, shape=(16, 20, 3), dtype=np.uint8, mode=None, seed=0):
    rng = np.random.default_rng(seed)
    hi = 65535 if dtype == np.uint16 else 255
    Image.fromarray(rng.integers(0, hi, shape, dtype=dtype), mode).save(path)


@pytest.fixture
def bad_folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _img(d / "rgb.png")
    _img(d / "gray.png", (16, 20))
    _img(d / "rgba.png", (16, 20, 4), mode="RGBA")
    _img(d / "deep.png", (16, 20), dtype=np.uint16)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    (d / "readme.txt").write_text("hello")
    _img(d / "tiny.png", (5, 6, 3))
    return d


def test_sr_folder_with_bad_inputs(bad_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sr", str(bad_folder), str(out), "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    written = sorted(p.name for p in out.iterdir())
    assert written == ["deep.png", "gray.png", "rgb.png", "rgba.png"]  # accepted and converted
    for name in ("corrupt.png", "readme.txt", "tiny.png"):
        lines = [l for l in err.splitlines() if name in l]
        assert len(lines) == 1, err
    assert "at least 8x8" in err and "3 failed" in err
    assert load_image(out / "rgb.png").shape == (3, 64, 80)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_sr_missing_path(tmp_path, capsys):
    rc = main(["sr", str(tmp_path / "nope.png"), str(tmp_path / "o.png")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_sr_single_file_seed_and_tiling(tmp_path):
    _img(tmp_path / "a.png", (24, 40, 3))
    assert main(["sr", str(tmp_path / "a.png"), str(tmp_path / "s0.png"), "--steps", "2", "--seed", "0", "--quiet", "--tile", "0"]) == 0
    assert main(["sr", str(tmp_path / "a.png"), str(tmp_path / "s1.png"), "--steps", "2", "--seed", "1", "--quiet", "--tile", "0"]) == 0
    assert main(["sr", str(tmp_path / "a.png"), str(tmp_path / "t0.png"), "--steps", "2", "--seed", "0", "--quiet", "--tile", "16", "--overlap", "4", "--colorfix", "adain"]) == 0
    a, b, t = (load_image(tmp_path / n) for n in ("s0.png", "s1.png", "t0.png"))
    assert a.shape == t.shape == (3, 96, 160)
    assert (a - b).abs().mean() > 1e-3
    assert (a - t).abs().mean() < 0.1  # tiles blend into nearly the same image


def test_score_cli_writes_csv_and_reports_bad_files(tmp_path, capsys):
    sr, hr = tmp_path / "sr", tmp_path / "hr"
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        h = torch.rand(3, 48, 48, generator=g)
        save_image(h, hr / f"im{i}.png")
        save_image((h + 0.05 * torch.randn(h.shape, generator=g)).clamp(0, 1), sr / f"im{i}.png")
    (sr / "notes.txt").write_text("x")
    rc = main(["score", str(sr), "--hr", str(hr), "--metrics", "psnr,ssim,brisque", "--out", str(tmp_path / "s.csv"), "--quiet"])
    assert rc == 1 and "notes.txt" in capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["image"] for r in rows] == ["im0.png", "im1.png", "im2.png"]
    assert all(20 < float(r["psnr"]) < 40 for r in rows)


def test_score_cli_fr_needs_hr(tmp_path, capsys):
    save_image(torch.rand(3, 32, 32), tmp_path / "sr" / "a.png")
    assert main(["score", str(tmp_path / "sr"), "--metrics", "psnr"]) == 2
    assert "need --hr" in capsys.readouterr().err


def test_degrade_cli(bad_folder, tmp_path, capsys):
    _img(bad_folder / "big.png", (64, 72, 3))
    rc = main(["degrade", str(bad_folder), str(tmp_path / "lr"), "--scale", "4", "--seed", "3", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "corrupt.png" in err and "readme.txt" in err
    assert load_image(tmp_path / "lr" / "big.png").shape == (3, 16, 18)
    a = (tmp_path / "lr" / "big.png").read_bytes()
    main(["degrade", str(bad_folder), str(tmp_path / "lr2"), "--scale", "4", "--seed", "3", "--quiet"])
    assert (tmp_path / "lr2" / "big.png").read_bytes() == a


def test_train_and_eval_cli(tmp_path, policy_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", "dgpo", "--policy", str(policy_dir), "--out", str(run), "--quiet",
                 "steps_total=1", "batch_lr=1", "group=3", "lr_set.n=2", "lr_set.patch=32"]) == 0
    assert main(["eval", str(run), "--quiet", "m=2", "steps=2", "lr_set.n=2", "lr_set.patch=32"]) == 0
    out = capsys.readouterr().out
    assert (run / "eval" / "report.html").is_file() and "report.html" in out
    assert main(["train", "--method", "dp2o", "--out", str(tmp_path / "x")]) == 2
    assert "needs" not in out  # the store error goes to stderr
    assert "--store" in capsys.readouterr().err


def test_start_flag_is_saved_with_the_aligned_policy(tmp_path, policy_dir, capsys):
    from sralign.policies import load_policy

    run = tmp_path / "run"
    assert main(["train", "--method", "dgpo", "--policy", str(policy_dir), "--start", "0.75", "--out", str(run), "--quiet",
                 "steps_total=1", "batch_lr=1", "group=3", "lr_set.n=2", "lr_set.patch=32"]) == 0
    assert load_policy(str(run / "policy")).config.ode_start == 0.75
    assert main(["generate", "--store", str(tmp_path / "s"), "--policy", str(policy_dir), "--start", "1.5", "--quiet"]) == 2
    assert "--start must be in (0, 1]" in capsys.readouterr().err
