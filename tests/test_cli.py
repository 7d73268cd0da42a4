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


# ---------------------------------------------------------------------------- issue 17: inputs checked, outputs safe
import os  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def _snapshot(*roots):
    """{path: bytes} of every file under ``roots`` (the user's files, to prove them intact)."""
    out = {}
    for r in roots:
        r = Path(r)
        for p in ([r] if r.is_file() else sorted(r.rglob("*"))):
            if p.is_file():
                out[p] = p.read_bytes()
    return out


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def pics(tmp_path):
    d = tmp_path / "pics"
    d.mkdir()
    _img(d / "a.png", (16, 16, 3), seed=1)
    _img(d / "b.jpg", (16, 16, 3), seed=2)
    return d


@pytest.mark.parametrize("cmd", ["sr", "degrade"])
def test_out_equal_to_in_is_refused(pics, cmd, capsys):
    before = _snapshot(pics)
    extra = ["--steps", "1"] if cmd == "sr" else []
    assert main([cmd, str(pics), str(pics), "--quiet", *extra]) == 2  # folder = folder
    _one_line_error(capsys, "is the input folder")
    assert main([cmd, str(pics), str(pics / "." / ".." / pics.name), "--quiet", *extra]) == 2  # the same folder, spelled otherwise
    _one_line_error(capsys, "is the input folder")
    assert main([cmd, str(pics / "a.png"), str(pics / "a.png"), "--quiet", *extra]) == 2  # file = file
    _one_line_error(capsys, "would overwrite the input", "a.png")
    assert main([cmd, str(pics / "a.png"), str(pics), "--quiet", *extra]) == 2  # into its own folder -> a.png
    _one_line_error(capsys, "would overwrite the input", "a.png")
    assert _snapshot(pics) == before


def test_output_that_is_a_link_to_an_input_is_refused(pics, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    os.link(pics / "a.png", out / "a.png")  # a hard link: writing out/a.png in place would change pics/a.png
    (out / "b.png").symlink_to(pics / "a.png")
    before = _snapshot(pics)
    assert main(["degrade", str(pics), str(out), "--quiet"]) == 2
    _one_line_error(capsys, "would overwrite the input", "a.png")
    assert _snapshot(pics) == before


@pytest.mark.parametrize("cmd", ["sr", "degrade"])
def test_colliding_output_names_are_refused_naming_both(pics, tmp_path, cmd, capsys):
    _img(pics / "b.png", (16, 16, 3), seed=3)  # b.jpg and b.png -> b.png
    before = _snapshot(pics)
    out = tmp_path / "out"
    assert main([cmd, str(pics), str(out), "--quiet", *(["--steps", "1"] if cmd == "sr" else [])]) == 2
    line = _one_line_error(capsys, "b.jpg", "b.png", "would both be written to")
    assert str(out / "b.png") in line
    assert not out.exists() and _snapshot(pics) == before  # refused before any work


def test_distinct_stems_still_work_and_caption_sidecars_are_not_outputs(pics, tmp_path):
    (pics / "a.txt").write_text("a caption of a.png")
    out = tmp_path / "lr"
    assert main(["degrade", str(pics), str(out), "--quiet", "--scale", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


@pytest.mark.parametrize("argv,needle", [
    (["sr", "{a}", "{o}", "--steps", "0"], "--steps must be in [1, 1000], got 0"),
    (["sr", "{a}", "{o}", "--start", "5"], "--start must be in (0, 1], got 5.0"),
    (["sr", "{a}", "{o}", "--start", "0"], "--start must be in (0, 1], got 0.0"),
    (["sr", "{a}", "{o}", "--tile", "-1"], "--tile and --overlap must be >= 0"),
    (["degrade", "{a}", "{o}", "--scale", "0"], "config key scale must be in [1, inf), got 0"),
    (["generate", "--store", "{s}", "--m", "0"], "config key m must be in [2, inf), got 0"),
    (["generate", "--store", "{s}", "--steps", "0"], "config key steps must be in [1, 1000], got 0"),
    (["eval", "{d}", "m=0"], "config key m must be in [1, inf), got 0"),
    (["pretrain", "--out", "{r}", "steps=0"], "config key steps must be in [1, inf), got 0"),
])
def test_bad_flag_values_fail_before_work(pics, tmp_path, argv, needle, capsys):
    before = _snapshot(pics)
    fill = {"a": str(pics / "a.png"), "o": str(tmp_path / "o.png"), "s": str(tmp_path / "store"), "d": str(pics),
            "r": str(tmp_path / "run")}
    assert main([x.format(**fill) for x in argv]) == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "store").exists() and not (tmp_path / "run").exists()
    assert _snapshot(pics) == before


TRAIN_CASES = [
    ("dp2o", ["beta=-1"], "beta must be in (0, inf), got -1.0"),
    ("dp2o", ["beta=0"], "beta must be in (0, inf), got 0.0"),
    ("dpo", ["lr=0"], "lr must be in (0, inf), got 0.0"),
    ("dp2o", ["t_min=0.9", "t_max=0.1"], "t_min (0.9) must not exceed t_max (0.1)"),
    ("dgpo", ["t_max=5"], "t_max must be in (0, 1], got 5.0"),
    ("dgpo", ["ema_max=5"], "ema_max must be in [0, 1], got 5.0"),
    ("dgpo", ["steps=0"], "steps must be in [1, 1000], got 0"),
    ("dp2o", ["steps=0"], "steps must be in [1, inf), got 0"),
    ("gdpo", ["group=1"], "group must be in [2, inf), got 1"),
    ("dp2o", ["batch_pairs=0"], "batch_pairs must be in [1, inf), got 0"),
    ("dp2o", ["grad_accum=0"], "grad_accum must be in [1, inf), got 0"),
    ("grpo", ["checkpoint_every=0"], "checkpoint_every must be in [1, inf), got 0"),
    ("dp2o", ["steps=1.5"], "steps must be an integer, got 1.5"),
    ("dgpo", ["fr_metrics=[]", "nr_metrics=[]"], "fr_metrics and nr_metrics are both empty"),
    ("dp2o", ["fr_metrics=psnr"], "fr_metrics must be a list"),
    ("dgpo", ["nr_metrics=[brisquee]"], "nr_metrics names unknown metric 'brisquee'; valid: brisque, gmsd, grad_fidelity"),
    ("dp2o", ["method=dpo"], "--method dp2o but the config sets method=dpo"),
    ("dgpo", ["lr_set.n=0"], "lr_set.n must be in [1, inf), got 0"),
]


@pytest.mark.parametrize("method,ov,needle", TRAIN_CASES, ids=[f"{m} {' '.join(o)}" for m, o, _ in TRAIN_CASES])
def test_train_config_errors_fail_before_the_lr_set_and_leave_no_run_folder(tmp_path, method, ov, needle, capsys, monkeypatch):
    import sralign.data.store
    import sralign.policies

    def no_work(*a, **k):
        raise AssertionError("work started before the config was checked")

    # the policy loads before the LR set is built or the store is read
    monkeypatch.setattr(sralign.policies, "load_policy", no_work)
    monkeypatch.setattr(sralign.train.candidates, "make_lr_set", no_work)
    monkeypatch.setattr(sralign.train.online, "make_lr_set", no_work, raising=False)
    monkeypatch.setattr(sralign.train.online, "LRSet", no_work)  # the online trainer's LR set
    monkeypatch.setattr(sralign.data.store.CandidateStore, "__init__", no_work)
    run = tmp_path / "run"
    store = ["--store", str(tmp_path / "store")] if method in ("dp2o", "dpo") else []
    assert main(["train", "--method", method, *store, "--out", str(run), "--quiet", *ov]) == 2
    _one_line_error(capsys, needle)
    assert not run.exists() and not (tmp_path / "store").exists()


@pytest.mark.parametrize("text,needle", [("- beta: 1\n- lr: 2\n", "must hold a mapping"), ("beta: [1\n", "is not valid YAML")])
def test_bad_yaml_config_on_the_cli(tmp_path, text, needle, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert main(["train", "--method", "dgpo", "--out", str(tmp_path / "run"), "--config", str(f), "--quiet"]) == 2
    _one_line_error(capsys, str(f), needle)
    assert f.read_text() == text and not (tmp_path / "run").exists()


def test_output_path_that_is_an_existing_file(pics, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    for argv, needle in [(["train", "--method", "dgpo", "--out", str(f)], "is an existing file, not a folder"),
                         (["sr", str(pics), str(f), "--steps", "1"], "is an existing file, not a folder"),
                         (["degrade", str(pics), str(f)], "is an existing file, not a folder"),
                         (["sr", str(pics / "a.png"), str(f / "x.png")], "is an existing file, not a folder"),
                         (["pretrain", "--out", str(f), "steps=1"], "is an existing file"),
                         (["score", str(pics), "--metrics", "brisque", "--out", str(tmp_path)], "is a folder; pass a .csv")]:
        assert main([*argv, "--quiet"]) == 2, argv
        _one_line_error(capsys, needle)
    assert f.read_text() == "mine"


@pytest.fixture
def read_only(monkeypatch):
    """``make(folder)`` chmods a folder to 0555. Root may write there anyway, so for root the
    kernel's refusal for an ordinary user is emulated: ``os.access`` and creating a file follow
    the mode bits."""
    made = []

    def denied(p) -> bool:
        p = Path(p)
        return p.is_dir() and not p.stat().st_mode & stat.S_IWUSR

    if os.geteuid() == 0:
        real_access, real_open = os.access, os.open
        monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if m & os.W_OK and denied(p) else real_access(p, m, *a, **k))

        def fake_open(p, flags, *a, **k):
            if flags & os.O_CREAT and denied(Path(p).parent):
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(p, flags, *a, **k)

        monkeypatch.setattr(os, "open", fake_open)

    def make(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o555)
        made.append(d)
        return d

    yield make
    for d in made:
        d.chmod(0o755)


def test_read_only_output_folder_is_a_one_line_error(pics, tmp_path, read_only, capsys):
    ro = read_only(tmp_path / "ro")
    before = _snapshot(pics)
    for argv in (["sr", str(pics), str(ro), "--steps", "1"], ["degrade", str(pics / "a.png"), str(ro / "a.png")],
                 ["score", str(pics), "--metrics", "brisque", "--out", str(ro / "s.csv")],
                 ["train", "--method", "dgpo", "--out", str(ro / "run"), "steps_total=1"]):
        assert main([*argv, "--quiet"]) == 2, argv
        _one_line_error(capsys, str(ro), "not writable")
    assert list(ro.iterdir()) == [] and _snapshot(pics) == before


def test_write_failure_after_the_checks_is_a_one_line_error(pics, tmp_path, monkeypatch, capsys):
    """A folder that turns unwritable after the early check (or a disk full): the failed write
    is named, no traceback, no partial file."""
    import sralign.data.atomic as atomic

    def refuse(p, flags, *a, **k):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(atomic.os, "open", refuse)
    out = tmp_path / "lr"
    assert main(["degrade", str(pics / "a.png"), str(out / "a.png"), "--quiet"]) == 2
    _one_line_error(capsys, str(out / "a.png"), "permission denied")
    assert not out.exists() or list(out.iterdir()) == []


def test_score_matches_exact_stems_not_glob_patterns(tmp_path, capsys):
    sr, hr = tmp_path / "sr", tmp_path / "hr"
    g = torch.Generator().manual_seed(0)
    h = torch.rand(3, 32, 32, generator=g)
    save_image(h, sr / "img[1].png")
    save_image(h, hr / "img1.png")  # the glob img[1].* matches this file
    rc = main(["score", str(sr), "--hr", str(hr), "--metrics", "psnr", "--out", str(tmp_path / "s.csv"), "--quiet"])
    assert rc == 1
    assert "no HR image named img[1]" in capsys.readouterr().err
    assert list(csv.DictReader(open(tmp_path / "s.csv"))) == []
    save_image((h + 0.1).clamp(0, 1), hr / "img[1].png")
    assert main(["score", str(sr), "--hr", str(hr), "--metrics", "psnr", "--out", str(tmp_path / "s.csv"), "--quiet"]) == 0
    (row,) = csv.DictReader(open(tmp_path / "s.csv"))
    assert row["image"] == "img[1].png" and float(row["psnr"]) < 30  # against img[1].png, not the identical img1.png


def test_score_missing_hr_folder_is_an_error_not_an_empty_csv(tmp_path, capsys):
    save_image(torch.rand(3, 32, 32), tmp_path / "sr" / "a.png")
    out = tmp_path / "s.csv"
    assert main(["score", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"), "--metrics", "psnr", "--out", str(out)]) == 2
    _one_line_error(capsys, "--hr", "no such folder")
    assert not out.exists()


def test_score_size_errors_name_the_file(tmp_path, capsys):
    sr, hr = tmp_path / "sr", tmp_path / "hr"
    save_image(torch.rand(3, 32, 32), sr / "big.png")
    save_image(torch.rand(3, 32, 32), hr / "big.png")
    save_image(torch.rand(3, 12, 12), sr / "small.png")  # too small for brisque (16 px)
    save_image(torch.rand(3, 12, 12), hr / "small.png")
    save_image(torch.rand(3, 32, 32), sr / "odd.png")
    save_image(torch.rand(3, 24, 32), hr / "odd.png")
    rc = main(["score", str(sr), "--hr", str(hr), "--metrics", "psnr,brisque", "--out", str(tmp_path / "s.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    (small,) = [l for l in err.splitlines() if "small.png" in l]
    assert "at least 16x16" in small and str(sr / "small.png") in small
    (odd,) = [l for l in err.splitlines() if "odd.png" in l and "skipped" in l]
    assert str(sr / "odd.png") in odd and str(hr / "odd.png") in odd and "32x32" in odd and "32x24" in odd
    assert [r["image"] for r in csv.DictReader(open(tmp_path / "s.csv"))] == ["big.png"]


def test_score_out_inside_the_sr_folder_or_onto_an_input_is_refused(tmp_path, capsys):
    sr, hr = tmp_path / "sr", tmp_path / "hr"
    save_image(torch.rand(3, 32, 32), sr / "a.png")
    save_image(torch.rand(3, 32, 32), hr / "a.png")
    before = _snapshot(sr, hr)
    assert main(["score", str(sr), "--metrics", "brisque", "--out", str(sr / "scores.csv")]) == 2
    _one_line_error(capsys, "inside the SR folder")
    assert main(["score", str(sr), "--hr", str(hr), "--metrics", "psnr", "--out", str(hr / "a.png")]) == 2
    _one_line_error(capsys, "would overwrite the input", str(hr / "a.png"))
    assert _snapshot(sr, hr) == before


def test_outputs_have_normal_file_modes(pics, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["degrade", str(pics), str(tmp_path / "lr"), "--quiet", "--scale", "2"]) == 0
        assert main(["sr", str(pics / "a.png"), str(tmp_path / "sr.png"), "--steps", "1", "--quiet"]) == 0
        assert main(["score", str(pics), "--metrics", "brisque", "--out", str(tmp_path / "s.csv"), "--quiet"]) == 0
        os.umask(0o027)
        save_image(torch.rand(3, 8, 8), tmp_path / "g.png")
    finally:
        os.umask(old)
    for p in [*(tmp_path / "lr").iterdir(), tmp_path / "sr.png", tmp_path / "s.csv"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert stat.S_IMODE((tmp_path / "g.png").stat().st_mode) == 0o640  # the umask is respected, not forced
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_malformed_store_index_is_a_one_line_error(tmp_path, policy_dir):
    store = tmp_path / "store"
    (store / "images").mkdir(parents=True)
    (store / "index.sqlite").write_bytes(b"this is not an SQLite database, just bytes " * 40)
    before = _snapshot(store)
    for argv in (["score", "--store", str(store), "--metrics", "psnr"],
                 ["generate", "--store", str(store), "--policy", str(policy_dir), "--m", "2", "--n-lr", "1"],
                 ["train", "--method", "dp2o", "--store", str(store), "--policy", str(policy_dir), "--out", str(tmp_path / "run")]):
        r = subprocess.run([sys.executable, "-m", "sralign.cli", *argv, "--quiet"], capture_output=True, text=True, timeout=300)
        assert r.returncode != 0, argv
        assert "Traceback" not in r.stderr, r.stderr
        (line,) = [l for l in r.stderr.splitlines() if "error" in l]
        assert "index.sqlite" in line, line
    assert _snapshot(store) == before and not (tmp_path / "run").exists()


def test_score_store_checks_metric_names_before_opening_the_store(tmp_path, capsys):
    d = tmp_path / "mydata"
    d.mkdir()
    (d / "cat.txt").write_text("mine")
    assert main(["score", "--store", str(d), "--metrics", "psnr,brisqe"]) == 2
    _one_line_error(capsys, "unknown metric 'brisqe'", "valid: brisque")
    assert sorted(p.name for p in d.iterdir()) == ["cat.txt"]  # nothing created or removed
