"""Candidate-store operations at scale: open, candidates(), one-LR lookup, build_pairs, no-op score.

Builds a store of N candidate rows (M = 16 per LR, one tiny fake PNG blob per row, every row
scored) by inserting rows directly, then times the operations every command runs. With
``--baseline-src DIR`` it runs the same measurements, each in a fresh process, once with the
sralign found in DIR (e.g. main's ``src``) and once with this checkout's, and prints both tables
with the ratio baseline / this.

    python benchmarks/store_scale.py --n 200000 --baseline-src /work/main/src

Not a test: a few minutes (most of it writing N small files).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

M = 16


def _blob(root: Path, data: bytes) -> tuple[str, str]:
    sha = hashlib.sha256(data).hexdigest()
    rel = f"images/{sha[:2]}/{sha}.png"
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return sha, rel


def build(root: Path, n: int) -> list[str]:
    """A store of n candidate rows in the schema of the sralign on sys.path; returns LR ids."""
    import sralign.data.store as S

    n_lr = n // M
    v2 = hasattr(S, "SCHEMA_VERSION")
    st = S.CandidateStore(root, create=True) if v2 else S.CandidateStore(root)
    lr_rows, cand_rows = [], []
    lr_ids = [f"train{i:07d}" for i in range(n_lr)]
    key = lrset = ""
    if v2:
        lrset = "bench-lrset"
        key = st.register_key({"bench": 1}, lrset, "benchmark key")
    for i, lr_id in enumerate(lr_ids):
        a, _ = _blob(root, b"lr%d" % i)
        b, _ = _blob(root, b"hr%d" % i)
        lr_rows.append((lrset, lr_id, a, b, "train", None) if v2 else (lr_id, a, b, "train"))
        for s in range(M):
            sha, rel = _blob(root, b"c%d-%d" % (i, s))
            cand_rows.append((key, lr_id, s, sha, rel) if v2 else (lr_id, s, "ode", 10, "bench", sha, rel))
    db = st.db
    db.execute("BEGIN")
    if v2:
        db.executemany("INSERT INTO lr VALUES (?,?,?,?,?,?)", lr_rows)
        db.executemany("INSERT INTO candidates (key_id, lr_id, seed, sha256, path) VALUES (?,?,?,?,?)", cand_rows)
    else:
        db.executemany("INSERT INTO lr VALUES (?,?,?,?)", lr_rows)
        db.executemany("INSERT INTO candidates (lr_id, seed, sampler, steps, policy, sha256, path) VALUES (?,?,?,?,?,?,?)", cand_rows)
    rng = random.Random(0)
    db.execute("INSERT INTO scores SELECT cid, 'psnr', 0 FROM candidates")
    db.executemany("UPDATE scores SET value=? WHERE cid=?", [(rng.random(), c) for c in range(1, len(cand_rows) + 1)])
    db.execute("COMMIT")
    st.close() if hasattr(st, "close") else None
    return lr_ids


def measure(n: int, work: Path) -> dict:
    import sralign
    from sralign.data.store import CandidateStore
    from sralign.rewards.hybrid import HybridReward
    from sralign.train.candidates import build_pairs, score_store

    root = work / "store"
    t = time.perf_counter()
    lr_ids = build(root, n)
    out = {"src": str(Path(sralign.__file__).parents[1]), "rows": n, "build_s": time.perf_counter() - t}

    def timed(name, fn):
        t = time.perf_counter()
        r = fn()
        out[name] = time.perf_counter() - t
        return r

    st = timed("open_s", lambda: CandidateStore(root))  # what score / generate do on open
    cands = timed("candidates_s", lambda: st.candidates())
    assert len(cands) == n
    rng = random.Random(0)
    pick = [rng.choice(lr_ids) for _ in range(1000)]
    t = time.perf_counter()
    for lr_id in pick:
        assert len(st.candidates(lr_id)) == M
    out["one_lr_ms"] = (time.perf_counter() - t) / len(pick) * 1e3
    reward = HybridReward.from_names(["psnr"], [])
    pairs = timed("build_pairs_s", lambda: build_pairs(st, reward, 4, "dp2o"))
    assert len(pairs) == (n // M) * 16
    assert timed("score_noop_first_s", lambda: score_store(st, ["psnr"], progress=False)) == 0
    assert timed("score_noop_s", lambda: score_store(st, ["psnr"], progress=False)) == 0
    return out


ROWS = [("open (score/generate)", "open_s", "s"), ("candidates() all rows", "candidates_s", "s"),
        ("candidates(one LR)", "one_lr_ms", "ms"), ("build_pairs", "build_pairs_s", "s"),
        ("no-op score --store, first", "score_noop_first_s", "s"), ("no-op score --store, again", "score_noop_s", "s")]


def _child(src: str, n: int) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    r = subprocess.run([sys.executable, __file__, "--n", str(n), "--json"], env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="candidate rows (default 200000)")
    ap.add_argument("--baseline-src", default=None, help="a src/ folder holding the sralign to compare against")
    ap.add_argument("--json", action="store_true", help="measure the importable sralign once, print JSON")
    a = ap.parse_args()
    if a.json:
        work = Path(tempfile.mkdtemp(prefix="store-scale-"))
        try:
            print(json.dumps(measure(a.n, work)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    this = str(Path(__file__).resolve().parents[1] / "src")
    runs = ([("baseline", _child(a.baseline_src, a.n))] if a.baseline_src else []) + [("this", _child(this, a.n))]
    print(f"candidate store, {a.n} rows (M={M}, {a.n // M} LR), one process per column")
    for name, r in runs:
        print(f"  {name}: {r['src']} (build {r['build_s']:.1f} s)")
    head = f"{'operation':30s}" + "".join(f"{name:>12s}" for name, _ in runs) + ("     ratio" if len(runs) == 2 else "")
    print(head)
    for label, k, unit in ROWS:
        vals = [r[k] for _, r in runs]
        line = f"{label:30s}" + "".join(f"{v:10.3f} {unit:>1s}" if unit == "s" else f"{v:9.3f} {unit}" for v in vals)
        if len(vals) == 2:
            line += f"  {vals[0] / max(vals[1], 1e-9):7.1f}x"
        print(line)


if __name__ == "__main__":
    main()
