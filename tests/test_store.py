import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sralign.data.store import CandidateStore
from sralign.train.candidates import GenerateConfig, LRSetConfig, build_pairs, generate, score_store
from sralign.rewards.hybrid import HybridReward

GEN_ARGS = ["--quiet", "m=8", "steps=2", "lr_set.n=4", "chunk=4", "lr_set.patch=32"]


def _cli(*args):
    return [sys.executable, "-m", "sralign.cli", *args]


def _files(store: Path) -> set[str]:
    return {p.stem for p in (store / "images").rglob("*.png")}


def test_store_roundtrip_and_idempotent_generation(tmp_path, policy_dir):
    from sralign.policies import load_policy

    p = load_policy(str(policy_dir))
    st = CandidateStore(tmp_path / "s")
    cfg = GenerateConfig(m=6, steps=2, chunk=4, lr_set=LRSetConfig(n=3, patch=32))
    assert generate(st, p, cfg, progress=False) == 18
    assert generate(st, p, cfg, progress=False) == 0
    rows = st.rows()
    assert len(rows) == 18 and len({r[:2] for r in rows}) == 18
    c = st.candidates("train0001")[0]
    img = st.read_image(c.path)
    assert img.shape == (3, 32, 32)
    lr, hr = st.load_lr("train0001")
    assert lr.shape == (3, 8, 8) and hr.shape == (3, 32, 32)
    # the same seed gives the same image whatever the chunking
    st2 = CandidateStore(tmp_path / "s2")
    generate(st2, p, GenerateConfig(m=6, steps=2, chunk=6, lr_set=LRSetConfig(n=3, patch=32)), progress=False)
    same = sum(a == b for a, b in zip(st.rows(), st2.rows()))
    assert same >= 16  # float differences between batch sizes may flip a PNG level rarely


def test_repair_removes_orphans_and_temp_files(tmp_path):
    st = CandidateStore(tmp_path / "s")
    st.add_lr("a", torch.rand(3, 8, 8), torch.rand(3, 32, 32))
    st.add_candidate("a", 0, "ode", 2, "p", torch.rand(3, 32, 32))
    orphan = tmp_path / "s" / "images" / "zz" / ("f" * 64 + ".png")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x")
    (orphan.parent / ".tmp-123").write_bytes(b"y")
    assert st.repair() == {"temp_files": 1, "orphans": 1}
    assert len(_files(tmp_path / "s")) == 3


def test_scoring_resumable_and_pairs(tmp_path, policy_dir):
    from sralign.policies import load_policy

    st = CandidateStore(tmp_path / "s")
    generate(st, load_policy(str(policy_dir)), GenerateConfig(m=8, steps=2, lr_set=LRSetConfig(n=2, patch=32)), progress=False)
    n1 = score_store(st, ["psnr", "sharpness"], progress=False)
    assert n1 == 32 and score_store(st, ["psnr", "sharpness"], progress=False) == 0
    assert score_store(st, ["psnr", "sharpness", "brisque"], progress=False) == 16
    rw = HybridReward.from_names(["psnr"], ["sharpness", "brisque"])
    pairs = build_pairs(st, rw, n=2, method="dp2o")
    assert len(pairs) == 2 * 4
    assert all(p.r_w > p.r_l and p.weight >= 0 for p in pairs)
    dpo = build_pairs(st, rw, n=2, method="dpo")
    assert len(dpo) == 2 and all(p.weight == 1.0 for p in dpo)
    assert {p.r_w for p in dpo} == {max(q.r_w for q in pairs if q.lr_id == p.lr_id) for p in dpo}


def test_generation_survives_kill_minus_9(tmp_path, policy_dir):
    ref = tmp_path / "ref"
    subprocess.run(_cli("generate", "--store", str(ref), "--policy", str(policy_dir), *GEN_ARGS), check=True)
    target = CandidateStore(ref, repair=False).rows()
    assert len(target) == 32
    store = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(3):
        proc = subprocess.Popen(_cli("generate", "--store", str(store), "--policy", str(policy_dir), *GEN_ARGS))
        goal = rng.randint(2, 30)
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < 60:
            if (store / "images").exists() and len(_files(store)) >= goal + 8 * attempt:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    subprocess.run(_cli("generate", "--store", str(store), "--policy", str(policy_dir), *GEN_ARGS), check=True)
    st = CandidateStore(store)  # repairs
    assert kills >= 1
    assert st.rows() == target  # same rows, same checksums: 0 lost, 0 duplicated
    referenced = {r[5] for r in st.rows()} | {r[0] for r in st.db.execute("SELECT lr_sha FROM lr")} | {r[0] for r in st.db.execute("SELECT hr_sha FROM lr")}
    assert _files(store) == referenced


def _open_after(args):
    root, start = args
    start.wait()
    CandidateStore(root, repair=False).close()
    return True


def test_many_processes_open_a_fresh_store_at_once(tmp_path):
    """Switching a new database to WAL is not covered by SQLite's busy timeout; without
    retries, 4 processes opening one fresh store together failed 18 times in 30 here."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(4) as pool:
        for trial in range(6):
            start = manager.Barrier(4)
            root = str(tmp_path / f"s{trial}")
            assert pool.map(_open_after, [(root, start)] * 4) == [True] * 4
    assert CandidateStore(tmp_path / "s0").db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_torchrun_two_processes_equal_one(tmp_path, policy_dir):
    if shutil.which("torchrun") is None:
        pytest.fail("torchrun not found next to the installed torch")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli("generate", "--store", str(one), "--policy", str(policy_dir), *GEN_ARGS), check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"], "-m", "sralign.cli",
                    "generate", "--store", str(two), "--policy", str(policy_dir), *GEN_ARGS], check=True, env=env, timeout=300)
    assert CandidateStore(one, repair=False).rows() == CandidateStore(two, repair=False).rows()
