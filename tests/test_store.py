import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sralign.data.store import BlobError, CandidateStore, StoreError, blob_rel, png_bytes
from sralign.train.candidates import (GenerateConfig, LRSetConfig, build_pairs, candidate_noise, generate, make_lr_set,
                                      score_store)
from sralign.rewards.hybrid import HybridReward

GEN_ARGS = ["--quiet", "m=8", "steps=2", "lr_set.n=4", "chunk=4", "lr_set.patch=32"]
SMALL = dict(m=4, steps=1, chunk=4, lr_set=LRSetConfig(n=2, patch=16))


def _cli(*args):
    return [sys.executable, "-m", "sralign.cli", *args]


def _run(*args, **kw):
    return subprocess.run(_cli(*args), capture_output=True, text=True, **kw)


def _files(store: Path) -> set[str]:
    return {p.stem for p in (store / "images").rglob("*.png")}


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (symlinks not followed) with its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def _user_folder(root: Path) -> Path:
    """The folder from the issue: images/cat.png, notes.txt, sub/dog.jpg."""
    (root / "images").mkdir(parents=True)
    (root / "sub").mkdir()
    (root / "images" / "cat.png").write_bytes(png_bytes(torch.rand(3, 8, 8)))
    (root / "notes.txt").write_text("my notes")
    (root / "sub" / "dog.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _small_store(tmp_path, policy_dir, name="s", **kw):
    from sralign.policies import load_policy

    st = CandidateStore(tmp_path / name, create=True)
    generate(st, load_policy(str(policy_dir)), GenerateConfig(**{**SMALL, **kw}), progress=False)
    return st


def _all_files_verify(st: CandidateStore) -> None:
    for c in st.candidates():
        data = (st.root / c.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == c.sha256, c


# --------------------------------------------------------------------------- what was there (updated)
def test_store_roundtrip_and_idempotent_generation(tmp_path, policy_dir):
    from sralign.policies import load_policy

    p = load_policy(str(policy_dir))
    st = CandidateStore(tmp_path / "s", create=True)
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
    st2 = CandidateStore(tmp_path / "s2", create=True)
    generate(st2, p, GenerateConfig(m=6, steps=2, chunk=6, lr_set=LRSetConfig(n=3, patch=32)), progress=False)
    same = sum(a == b for a, b in zip(st.rows(), st2.rows()))
    assert same >= 16  # float differences between batch sizes may flip a PNG level rarely


def test_candidates_are_the_seeded_samples(tmp_path, policy_dir):
    """generate stores exactly what the policy samples from ``candidate_noise`` (the noise
    seeding of earlier versions), so stored images do not change with the store's format."""
    from sralign.policies import load_policy
    from sralign.policies.base import condition_captioned

    p = load_policy(str(policy_dir))
    st = _small_store(tmp_path, policy_dir)
    item = make_lr_set(SMALL["lr_set"])[1]
    cond = condition_captioned(p, item.lr[None], [None])
    imgs = p.sample(cond, candidate_noise(p.noise_shape(cond)[1:], 0, item.lr_id, [0, 1, 2, 3]), sampler="ode", steps=1).images
    want = [hashlib.sha256(png_bytes(i)).hexdigest() for i in imgs]
    assert [c.sha256 for c in st.candidates(item.lr_id)] == want


def test_full_repair_removes_orphans_and_temp_files_only(tmp_path):
    """Changed: clean-up deletes only files named like the store's own blobs and temp files,
    in its own 2-hex folders; a listing of all blobs happens only with ``full=True``."""
    st = CandidateStore(tmp_path / "s", create=True)
    st.add_lr("a", torch.rand(3, 8, 8), torch.rand(3, 32, 32))
    key = st.register_key({"k": 1}, "", "test key")
    st.add_candidate(key, "a", 0, torch.rand(3, 32, 32))
    d = tmp_path / "s" / "images" / "ff"
    d.mkdir()
    orphan = d / ("f" * 64 + ".png")
    orphan.write_bytes(b"x")
    (d / ".tmp-123").write_bytes(b"y")
    (d / "notes.txt").write_text("mine")  # not the store's name pattern: kept
    (tmp_path / "s" / "images" / "zz").mkdir()
    (tmp_path / "s" / "images" / "zz" / ("e" * 64 + ".png")).write_bytes(b"z")  # not a 2-hex folder: kept
    assert st.repair() == {"temp_files": 0, "orphans": 0, "journals": 0}  # incremental: no listing
    assert orphan.exists()
    assert st.repair(full=True) == {"temp_files": 1, "orphans": 1, "journals": 0}
    assert (d / "notes.txt").read_text() == "mine" and (tmp_path / "s" / "images" / "zz" / ("e" * 64 + ".png")).exists()
    assert len(_files(tmp_path / "s")) == 3 + 1


def test_scoring_resumable_and_pairs(tmp_path, policy_dir):
    from sralign.policies import load_policy

    st = CandidateStore(tmp_path / "s", create=True)
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


def _reference_pairs(st, reward, n):
    """build_pairs as it was (all candidates in memory, one query per LR), for one key."""
    from sralign.losses import dp2o_pairs, hpo_weights

    raw = {m.name: st.scores(m.name) for m in reward.metrics}
    groups = []
    for lr_id in st.lr_ids():
        cands = st.candidates(lr_id)
        if len(cands) < 2:
            continue
        r = reward.from_scores({k: torch.tensor([[v[c.cid] for c in cands]]) for k, v in raw.items()}).total[0]
        groups.append((cands, r))
    stds = torch.stack([r.std(unbiased=False) for _, r in groups])
    ws, ls, gid, out = [], [], [], []
    for g, (cands, r) in enumerate(groups):
        iw, il = dp2o_pairs(r, n)
        ws.append(r[iw]), ls.append(r[il]), gid.append(torch.full((len(iw),), g))
        out += [(cands[a].cid, cands[b].cid) for a, b in zip(iw.tolist(), il.tolist())]
    w = hpo_weights(torch.cat(ws), torch.cat(ls), torch.cat(gid), stds)
    dpo = [(cands[int(r.argmax())].cid, cands[int(r.argmin())].cid) for cands, r in groups if int(r.argmax()) != int(r.argmin())]
    return [(a, b, float(x)) for (a, b), x in zip(out, w)], dpo


def test_streamed_pairs_equal_the_in_memory_reference(tmp_path, policy_dir):
    st = _small_store(tmp_path, policy_dir, m=8, lr_set=LRSetConfig(n=5, patch=16))
    score_store(st, ["psnr", "sharpness"], progress=False)
    st.add_candidate(st.keys()[0].key_id, "train0003", 8, torch.rand(3, 16, 16))  # one group of another size
    score_store(st, ["psnr", "sharpness"], progress=False)
    rw = HybridReward.from_names(["psnr"], ["sharpness"])
    got = [(p.cid_w, p.cid_l, p.weight) for p in build_pairs(st, rw, n=2)]
    want, want_dpo = _reference_pairs(st, rw, 2)
    assert got == want and len(got) == 5 * 4
    assert [(p.cid_w, p.cid_l) for p in build_pairs(st, rw, n=2, method="dpo")] == want_dpo and len(want_dpo) == 5


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
    referenced = {r[3] for r in st.rows()} | {r[0] for r in st.db.execute("SELECT lr_sha FROM lr")} | {r[0] for r in st.db.execute("SELECT hr_sha FROM lr")}
    assert _files(store) == referenced  # the killed writers' uncommitted blobs were cleaned from their journals
    assert not list((store / "journal").glob("*.log"))  # every journal replayed or removed


def _open_after(args):
    root, start = args
    start.wait()
    CandidateStore(root, repair=False, create=True).close()
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
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli("generate", "--store", str(one), "--policy", str(policy_dir), *GEN_ARGS), check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"], "-m", "sralign.cli",
                    "generate", "--store", str(two), "--policy", str(policy_dir), *GEN_ARGS], check=True, env=env, timeout=300)
    assert CandidateStore(one, repair=False).rows() == CandidateStore(two, repair=False).rows()


# --------------------------------------------------------------------------- the store touches only what it owns
def test_score_and_train_refuse_a_folder_that_is_not_a_store(tmp_path):
    user = _user_folder(tmp_path / "mydata")
    before = _tree(user)
    for args in (["score", "--store", str(user)], ["train", "--method", "dp2o", "--store", str(user), "--out", str(tmp_path / "run")]):
        r = _run(*args)
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip().splitlines()[-1]
        assert "not a candidate store" in line and str(user) in line and "generate" in line
    assert _tree(user) == before and sorted(os.listdir(user)) == ["images", "notes.txt", "sub"]


def test_a_mistyped_store_path_is_an_error_not_a_new_store(tmp_path):
    typo = tmp_path / "stroe"
    for args in (["score", "--store", str(typo)], ["train", "--method", "dpo", "--store", str(typo), "--out", str(tmp_path / "run")]):
        r = _run(*args)
        assert r.returncode == 2 and "no such candidate store" in r.stderr and str(typo) in r.stderr
    assert not typo.exists()


def test_generate_creates_stores_only_in_new_or_empty_folders(tmp_path, policy_dir):
    user = _user_folder(tmp_path / "mydata")
    before = _tree(user)
    r = _run("generate", "--store", str(user), "--policy", str(policy_dir), "--quiet", "m=2", "steps=1", "lr_set.n=1", "lr_set.patch=16")
    assert r.returncode == 2
    assert "not a candidate store" in r.stderr and "new or empty folder" in r.stderr and "notes.txt" in r.stderr
    assert _tree(user) == before and not (user / "index.sqlite").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    st = CandidateStore(empty, create=True)
    assert (empty / "index.sqlite").is_file() and st.keys() == []


def test_an_images_symlink_is_refused_and_its_target_untouched(tmp_path, policy_dir):
    user = _user_folder(tmp_path / "user")
    before = _tree(user)
    st = _small_store(tmp_path, policy_dir)
    st.close()
    shutil.rmtree(tmp_path / "s" / "images")
    os.symlink(user / "images", tmp_path / "s" / "images")
    for args in (["score", "--store", str(tmp_path / "s")], ["generate", "--store", str(tmp_path / "s"), "--policy", str(policy_dir), "--quiet"]):
        r = _run(*args)
        assert r.returncode == 2 and "symbolic link" in r.stderr and "images" in r.stderr
    with pytest.raises(StoreError, match="symbolic link"):
        CandidateStore(tmp_path / "s")
    assert _tree(user) == before


def test_symlinked_blobs_and_folders_are_never_followed_or_deleted_through(tmp_path, policy_dir):
    user = _user_folder(tmp_path / "user")
    before = _tree(user)
    st = _small_store(tmp_path, policy_dir)
    c = st.candidates()[0]
    blob = st.root / c.path
    blob.unlink()
    os.symlink(user / "images" / "cat.png", blob)  # a crafted store: a blob pointing outside
    fresh = CandidateStore(st.root)
    with pytest.raises(BlobError, match="symbolic link") as e:
        fresh.read_candidate(c.cid)
    assert str(blob) in str(e.value)
    # a dead writer's journal naming that blob (uncommitted elsewhere) must not delete through it
    hx = next(f"{i:02x}" for i in range(256) if not (st.root / "images" / f"{i:02x}").exists())
    os.symlink(user / "sub", st.root / "images" / hx)  # a symlinked 2-hex folder
    (user / "sub" / (hx + "0" * 62 + ".png")).write_bytes(b"user's file named like a blob")
    before = _tree(user)
    (st.root / "journal").mkdir(exist_ok=True)
    (st.root / "journal" / "w-1-00.log").write_text(f"{hx + '0' * 62} .tmp-1-00.png\n{c.sha256} .tmp-1-01.png\n")
    fresh.repair(full=True)
    assert blob.is_symlink() and _tree(user) == before
    with pytest.raises(BlobError, match="symbolic link"):
        CandidateStore(st.root).read_blob(hx + "0" * 62)


@pytest.mark.parametrize("bad", ["/etc/hostname", "../../outside.png", "images/ab/../../../x.png"])
def test_index_paths_are_confined_to_the_store(tmp_path, policy_dir, bad):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(torch.rand(3, 16, 16)))
    st = _small_store(tmp_path, policy_dir)
    score_store(st, ["psnr", "sharpness"], progress=False)
    cid = st.candidates()[0].cid
    db = sqlite3.connect(st.root / "index.sqlite")
    db.execute("UPDATE candidates SET path=? WHERE cid=?", (bad, cid))
    db.commit()
    with pytest.raises(BlobError, match="refused") as e:
        CandidateStore(st.root).read_candidate(cid)
    assert repr(bad) in str(e.value)
    r = _run("train", "--method", "dpo", "--store", str(st.root), "--out", str(tmp_path / "run"), "--quiet",
             "steps=1", "fr_metrics=[psnr]", "nr_metrics=[sharpness]", "n=1")
    assert r.returncode == 2 and "not an image of this store" in r.stderr and bad in r.stderr
    db.execute("UPDATE lr SET lr_sha='../../outside'")
    db.commit()
    with pytest.raises(BlobError, match="refused"):
        CandidateStore(st.root).load_lr("train0000")
    assert outside.exists()


# --------------------------------------------------------------------------- concurrency
def test_repair_never_deletes_a_live_writers_blob(tmp_path, caplog):
    """A writer between blob and row holds the shared lock: repair skips; a dead writer's
    journal is replayed: its uncommitted blob and temp file go, nothing else."""
    import logging

    st = CandidateStore(tmp_path / "s", create=True)
    key = st.register_key({"k": 1}, "", "test key")
    seen = {}

    def commit_with_a_repair_in_between(shas):
        other = CandidateStore(tmp_path / "s", repair=False)
        with caplog.at_level(logging.DEBUG, logger="sralign.data.store"):
            seen["repair"] = other.repair()
        other.close()
        seen["exists"] = (st.root / blob_rel(shas[0])).exists()
        return shas[0]

    sha = st._write_blobs([png_bytes(torch.rand(3, 8, 8))], commit_with_a_repair_in_between)
    assert seen == {"repair": {"temp_files": 0, "orphans": 0, "journals": 0}, "exists": True}
    assert "clean-up skipped" in caplog.text
    assert (st.root / blob_rel(sha)).exists()  # never committed, but its writer is alive
    # a live writer's journal is left alone even when no write is in flight
    cid = st.add_candidate(key, "a", 0, torch.rand(3, 8, 8))
    assert CandidateStore(tmp_path / "s", repair=False).repair()["journals"] == 0
    # a dead writer: a journal nobody holds, naming an uncommitted blob, a committed one and a temp file
    committed = st.candidate(cid).sha256
    d = st.root / "images" / sha[:2]
    (d / ".tmp-999-ab.png").write_bytes(b"half")
    (d / "keep.txt").write_text("not the store's")
    (st.root / "journal" / "w-999-ab.log").write_text(f"{sha} .tmp-999-ab.png\n{committed} .tmp-999-cd.png\n{sha[:10]}")
    counts = CandidateStore(tmp_path / "s", repair=False).repair()
    assert counts == {"temp_files": 1, "orphans": 1, "journals": 1}
    assert not (st.root / blob_rel(sha)).exists() and (st.root / blob_rel(committed)).exists() and (d / "keep.txt").exists()


def test_generate_and_score_at_once_lose_no_file(tmp_path, policy_dir):
    """Two real processes on one store, plus repeated opens (each attempting a repair)."""
    store = tmp_path / "s"
    gen = subprocess.Popen(_cli("generate", "--store", str(store), "--policy", str(policy_dir), *GEN_ARGS),
                           stderr=subprocess.PIPE, text=True)
    scores, opens = 0, 0
    t0 = time.time()
    while gen.poll() is None and time.time() - t0 < 120:
        if (store / "index.sqlite").exists():
            r = _run("score", "--store", str(store), "--metrics", "psnr", "--quiet")
            assert r.returncode == 0, r.stderr
            scores += 1
            try:
                CandidateStore(store).close()  # repair attempt while generate writes
                opens += 1
            except StoreError:
                pass  # the index exists but is still being created
        time.sleep(0.05)
    assert gen.wait() == 0, gen.stderr.read()
    assert scores >= 1 and opens >= 1
    r = _run("score", "--store", str(store), "--metrics", "psnr", "--quiet")
    assert r.returncode == 0
    st = CandidateStore(store)
    assert len(st.rows()) == 32
    _all_files_verify(st)
    assert len(st.scores("psnr")) == 32


# --------------------------------------------------------------------------- keys
def test_candidates_are_keyed_by_their_generation_settings(tmp_path, policy_dir):
    from sralign.policies import load_policy

    p = load_policy(str(policy_dir))
    st = _small_store(tmp_path, policy_dir)
    base = GenerateConfig(**SMALL)
    for change in (dict(seed=1), dict(steps=2), dict(sampler="sde"), dict(lr_set=LRSetConfig(n=2, patch=16, seed=3))):
        assert generate(st, p, GenerateConfig(**{**SMALL, **change}), progress=False) == 8, change
    start = p.config.ode_start
    p.config.ode_start = 0.9
    assert generate(st, p, base, progress=False) == 8  # another start: another key
    p.config.ode_start = start
    assert generate(st, p, base, progress=False) == 0
    keys = st.keys()
    assert len(keys) == 6 and all(k.n == 8 for k in keys)
    assert any("seed 1" in k.description for k in keys) and any("ode_start=0.9" in k.description for k in keys)
    lrsets = {k.lrset for k in keys}
    assert len(lrsets) == 2  # the LR-set seed changed the LR images, kept apart
    assert {(r[0]) for r in st.db.execute("SELECT count(*) FROM lr")} == {4}


def test_train_refuses_a_store_of_several_keys_and_lists_them(tmp_path, policy_dir):
    from sralign.policies import load_policy

    st = _small_store(tmp_path, policy_dir)
    generate(st, load_policy(str(policy_dir)), GenerateConfig(**{**SMALL, "seed": 7}), progress=False)
    score_store(st, ["psnr", "sharpness"], progress=False)
    rw = HybridReward.from_names(["psnr"], ["sharpness"])
    with pytest.raises(StoreError, match="2 generation keys") as e:
        build_pairs(st, rw, n=1)
    msg = str(e.value)
    keys = st.keys()
    assert "store_key=" in msg and all(k.key_id[:12] in msg and k.description in msg and "(8 candidates)" in msg for k in keys)
    for k in keys:
        pairs = build_pairs(st, rw, n=1, key=k.key_id[:8])
        own = {c.cid for c in st.candidates(key=k.key_id)}
        assert pairs and all(p.cid_w in own and p.cid_l in own and p.key_id == k.key_id for p in pairs)
    with pytest.raises(StoreError, match="matches no key"):
        build_pairs(st, rw, n=1, key="zzzz")
    args = ["train", "--method", "dpo", "--store", str(st.root), "--out", str(tmp_path / "run"), "--quiet",
            "steps=1", "fr_metrics=[psnr]", "nr_metrics=[sharpness]", "batch_pairs=1"]
    r = _run(*args)
    assert r.returncode == 2 and "2 generation keys" in r.stderr and "store_key=" in r.stderr
    r = _run(*args, f"store_key={keys[1].key_id[:10]}")
    assert r.returncode == 0, r.stderr
    assert {p["key_id"] for p in json.loads((tmp_path / "run" / "pairs.json").read_text())} == {keys[1].key_id}


# --------------------------------------------------------------------------- checksums
def test_altered_and_missing_files_are_named_reported_and_regenerated(tmp_path, policy_dir):
    st = _small_store(tmp_path, policy_dir)
    rows = st.rows()
    a, b = st.candidates()[:2]
    other = (st.root / st.candidates()[3].path).read_bytes()  # another valid PNG
    (st.root / a.path).write_bytes(other)
    (st.root / b.path).unlink()
    fresh = CandidateStore(st.root)
    with pytest.raises(BlobError, match="altered") as e:
        fresh.read_candidate(a.cid)
    assert str(st.root / a.path) in str(e.value) and f"seed {a.seed}" in str(e.value)
    with pytest.raises(BlobError, match="missing") as e:
        fresh.read_candidate(b.cid)
    assert str(st.root / b.path) in str(e.value)
    r = _run("score", "--store", str(st.root), "--metrics", "psnr", "--quiet")
    assert r.returncode == 2 and "2 candidate file(s) missing or altered" in r.stderr and a.path in r.stderr
    assert len(fresh.scores("psnr")) == len(rows) - 2  # the others are scored
    r = _run("generate", "--store", str(st.root), "--policy", str(policy_dir), "--quiet", "m=4", "steps=1", "chunk=4",
             "lr_set.n=2", "lr_set.patch=16")
    assert r.returncode == 0 and "2 new" in r.stdout
    again = CandidateStore(st.root)
    assert again.rows() == rows  # regenerated bit-identical: same rows, same checksums
    _all_files_verify(again)
    r = _run("score", "--store", str(st.root), "--metrics", "psnr", "--quiet")
    assert r.returncode == 0 and "scored 2 new" in r.stdout


def test_a_regenerated_candidate_that_differs_gets_a_new_row_and_no_old_scores(tmp_path):
    st = CandidateStore(tmp_path / "s", create=True)
    key = st.register_key({"k": 1}, "", "test")
    cid = st.add_candidate(key, "a", 0, torch.zeros(3, 8, 8))
    st.set_scores([(cid, "psnr", 1.0)])
    assert st.add_candidate(key, "a", 0, torch.zeros(3, 8, 8)) == cid  # same image: same row
    new = st.add_candidate(key, "a", 0, torch.ones(3, 8, 8))
    assert new > cid and st.scores("psnr") == {} and [c.cid for c in st.candidates()] == [new]
    st.set_scores([(cid, "psnr", 2.0)])  # a late score of the replaced row is dropped
    assert st.scores("psnr") == {}


# --------------------------------------------------------------------------- schema 1
V1_SCHEMA = """
CREATE TABLE lr (lr_id TEXT PRIMARY KEY, lr_sha TEXT NOT NULL, hr_sha TEXT, split TEXT DEFAULT 'train');
CREATE TABLE candidates (cid INTEGER PRIMARY KEY AUTOINCREMENT, lr_id TEXT NOT NULL, seed INTEGER NOT NULL,
    sampler TEXT NOT NULL, steps INTEGER NOT NULL, policy TEXT NOT NULL, sha256 TEXT NOT NULL, path TEXT NOT NULL,
    UNIQUE (lr_id, seed, sampler, steps, policy));
CREATE TABLE scores (cid INTEGER NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (cid, metric));
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE prompts (lr_id TEXT PRIMARY KEY, text TEXT NOT NULL);
"""


def _v1_store(root: Path, policies=("p1",)) -> Path:
    """A store as the previous version wrote it (its schema, its blob layout)."""
    root.mkdir()
    db = sqlite3.connect(root / "index.sqlite")
    db.executescript(V1_SCHEMA)

    def blob(t):
        data = png_bytes(t)
        sha = hashlib.sha256(data).hexdigest()
        (root / "images" / sha[:2]).mkdir(parents=True, exist_ok=True)
        (root / blob_rel(sha)).write_bytes(data)
        return sha

    g = torch.Generator().manual_seed(0)
    for i in range(2):
        db.execute("INSERT INTO lr VALUES (?,?,?,?)", (f"train000{i}", blob(torch.rand(3, 4, 4, generator=g)), blob(torch.rand(3, 16, 16, generator=g)), "train"))
    db.execute("INSERT INTO prompts VALUES ('train0000', 'a cat')")
    for pol in policies:
        for i in range(2):
            for s in range(4):
                sha = blob(torch.rand(3, 16, 16, generator=g))
                cur = db.execute("INSERT INTO candidates (lr_id, seed, sampler, steps, policy, sha256, path) VALUES (?,?,?,?,?,?,?)",
                                 (f"train000{i}", s, "ode", 2, pol, sha, blob_rel(sha)))
                db.execute("INSERT INTO scores VALUES (?, 'psnr', ?)", (cur.lastrowid, float(s + i)))
                db.execute("INSERT INTO scores VALUES (?, 'sharpness', ?)", (cur.lastrowid, float(s * i)))
    db.commit()
    db.close()
    return root


def test_schema1_stores_are_migrated_on_open_deterministically(tmp_path):
    a = _v1_store(tmp_path / "a", policies=("p1", "p2"))
    b = _v1_store(tmp_path / "b", policies=("p1", "p2"))
    before = {r[0]: r[1] for r in sqlite3.connect(a / "index.sqlite").execute("SELECT cid, sha256 FROM candidates")}
    files = _tree(a / "images")
    sa, sb = CandidateStore(a), CandidateStore(b)
    assert sa.get_meta("schema") == "2"
    assert [(k.key_id, k.n) for k in sa.keys()] == [(k.key_id, k.n) for k in sb.keys()] and len(sa.keys()) == 2
    assert all("older sralign" in k.description for k in sa.keys())
    assert {c.cid: c.sha256 for c in sa.candidates()} == before  # ids kept, so scores stay linked
    assert len(sa.scores("psnr")) == 16 and sa.prompt("train0000") == "a cat"
    assert _tree(a / "images") == files  # nothing deleted or rewritten
    rw = HybridReward.from_names(["psnr"], ["sharpness"])
    with pytest.raises(StoreError, match="2 generation keys"):
        build_pairs(sa, rw, n=1)
    pairs = build_pairs(sa, rw, n=1, key=sa.keys()[0].key_id[:6])
    assert len(pairs) == 2
    sa.close()
    assert CandidateStore(a).keys() == CandidateStore(b).keys()  # reopening: no second migration


def test_a_malformed_index_is_refused_with_a_message(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "index.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a readable sralign index"):
        CandidateStore(d)
    assert (d / "index.sqlite").read_bytes() == b"this is not sqlite" * 100 and not (d / "images").exists()


# --------------------------------------------------------------------------- scale: the queries use indexes
def _plan(st, q, args):
    return " | ".join(r[-1] for r in st.db.execute("EXPLAIN QUERY PLAN " + q, args))


def test_store_queries_use_indexes_not_table_scans(tmp_path):
    st = CandidateStore(tmp_path / "s", create=True)
    plan = _plan(st, st._grouped_sql(2), ("psnr", "niqe", "k"))
    assert "INDEX sqlite_autoindex_candidates_1 (key_id=?)" in plan and "SCAN" not in plan and "TEMP B-TREE" not in plan
    plan = _plan(st, st._unscored_sql(2), ("psnr", "niqe", 5))
    assert "SEARCH c USING INTEGER PRIMARY KEY (rowid>?)" in plan and "SCAN" not in plan
    assert "INDEX candidates_by_sha" in _plan(st, "SELECT 1 FROM candidates WHERE sha256=?", ("x",))
    assert "SCAN" not in _plan(st, "SELECT seed FROM candidates WHERE key_id=? AND lr_id=?", ("k", "a"))
    assert "SCAN" not in _plan(st, "SELECT cid FROM candidates WHERE lr_id=?", ("a",))
    assert "SCAN" not in _plan(st, "SELECT lr_sha FROM lr WHERE lr_id=? LIMIT 2", ("a",))


def test_a_noop_score_reads_only_rows_added_since_the_last_scoring(tmp_path):
    st = CandidateStore(tmp_path / "s", create=True)
    st.add_lr("a", torch.rand(3, 4, 4), torch.rand(3, 16, 16))
    key = st.register_key({"k": 1}, "", "t")
    for s in range(3):
        st.add_candidate(key, "a", s, torch.rand(3, 16, 16))
    assert score_store(st, ["psnr"], progress=False) == 3
    top, rows = st.unscored(["psnr"])
    assert top == 3 and list(rows) == []
    assert st.db.execute("SELECT cid FROM score_marks WHERE metric='psnr'").fetchone() == (3,)
    st.add_candidate(key, "a", 3, torch.rand(3, 16, 16))
    assert [c.seed for c, _ in st.unscored(["psnr"])[1]] == [3]
    assert score_store(st, ["psnr"], progress=False) == 1


def test_an_lr_image_that_changed_on_disk_is_refused_and_its_blob_cleaned(tmp_path):
    st = CandidateStore(tmp_path / "s", create=True)
    x, y = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    st.add_lr("a", x, lrset="set1")
    st.add_lr("a", x, lrset="set1")  # the same image again: fine
    with pytest.raises(StoreError, match="LR image a differs"):
        st.add_lr("a", y, lrset="set1")
    st.add_lr("b", x, lrset="set1")  # a later successful write keeps the failed one in the journal
    y_sha = hashlib.sha256(png_bytes(y)).hexdigest()
    assert (st.root / blob_rel(y_sha)).exists()
    st.close()
    assert CandidateStore(tmp_path / "s", repair=False).repair()["orphans"] == 1
    assert not (st.root / blob_rel(y_sha)).exists()
    assert CandidateStore(tmp_path / "s").load_lr("a", lrset="set1")[0].sum() == 0
