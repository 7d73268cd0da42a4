"""The candidate store: an SQLite index plus content-addressed PNG files.

Layout of a store folder::

    index.sqlite             tables lr, candidates, scores (WAL mode: concurrent writers)
    images/ab/abcdef….png    every image (LR, HR, candidates) named by its sha256

Writes are crash-safe: an image is written to a temp file and renamed into place *before* its
row is committed, so a row never lacks its file; ``repair()`` (run when a store is opened for
writing by a single process or by rank 0) removes temp files and files no row references. A run
killed at any point therefore loses at most the images in flight.

Concurrency: several processes (``torchrun`` ranks) may add rows to one store at once; SQLite
WAL plus a busy timeout serialises the short transactions, and identical content maps to one
file. Ranks take disjoint LR ids, so they never write the same row.
"""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .images import to_uint8

SCHEMA = """
CREATE TABLE IF NOT EXISTS lr (
    lr_id TEXT PRIMARY KEY, lr_sha TEXT NOT NULL, hr_sha TEXT, split TEXT DEFAULT 'train');
CREATE TABLE IF NOT EXISTS candidates (
    cid INTEGER PRIMARY KEY AUTOINCREMENT,
    lr_id TEXT NOT NULL, seed INTEGER NOT NULL, sampler TEXT NOT NULL, steps INTEGER NOT NULL,
    policy TEXT NOT NULL, sha256 TEXT NOT NULL, path TEXT NOT NULL,
    UNIQUE (lr_id, seed, sampler, steps, policy));
CREATE TABLE IF NOT EXISTS scores (
    cid INTEGER NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (cid, metric));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS prompts (lr_id TEXT PRIMARY KEY, text TEXT NOT NULL);
"""


def png_bytes(img: Tensor) -> bytes:
    """[3,H,W] in [0,1] -> PNG bytes (deterministic: no timestamps)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_png(data: bytes) -> Tensor:
    a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


@dataclass
class Candidate:
    cid: int
    lr_id: str
    seed: int
    sampler: str
    steps: int
    policy: str
    sha256: str
    path: str


class CandidateStore:
    def __init__(self, root: str | os.PathLike, repair: bool = True, timeout: float = 60.0):
        self.root = Path(root)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.root / "index.sqlite"), timeout=timeout, isolation_level=None)
        # Switching a new database to WAL takes an exclusive lock that SQLite's busy
        # timeout does not wait for: two ranks opening the same fresh store at once
        # (torchrun) see "database is locked" here, so these retry like writes do.
        self._retry(lambda: self.db.execute("PRAGMA journal_mode=WAL"), tries=100)
        self._retry(lambda: self.db.execute("PRAGMA synchronous=NORMAL"), tries=100)
        self._retry(lambda: self.db.executescript(SCHEMA), tries=100)
        if repair:
            self.repair()

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ low level
    def _retry(self, fn, tries: int = 20):
        for i in range(tries):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or i == tries - 1:
                    raise
                time.sleep(min(0.05 * (i + 1), 0.5))

    def _write_blob(self, data: bytes) -> tuple[str, str]:
        sha = hashlib.sha256(data).hexdigest()
        rel = f"images/{sha[:2]}/{sha}.png"
        path = self.root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha, rel

    def read_image(self, rel_or_sha: str) -> Tensor:
        rel = rel_or_sha if "/" in rel_or_sha else f"images/{rel_or_sha[:2]}/{rel_or_sha}.png"
        return decode_png((self.root / rel).read_bytes())

    def repair(self) -> dict[str, int]:
        """Remove temp files and image files that no row references. Returns the counts."""
        referenced = {r[0] for r in self.db.execute("SELECT sha256 FROM candidates")}
        for a, b in self.db.execute("SELECT lr_sha, hr_sha FROM lr"):
            referenced.add(a)
            if b:
                referenced.add(b)
        tmp = orphans = 0
        for p in (self.root / "images").rglob("*"):
            if not p.is_file():
                continue
            if p.name.startswith(".tmp-"):
                p.unlink()
                tmp += 1
            elif p.stem not in referenced:
                p.unlink()
                orphans += 1
        return {"temp_files": tmp, "orphans": orphans}

    # ------------------------------------------------------------------ LR images
    def add_lr(self, lr_id: str, lr: Tensor, hr: Tensor | None = None, split: str = "train", prompt: str | None = None) -> None:
        """Add an LR image (and its HR, and its caption for text-conditioned policies) once."""
        lr_sha, _ = self._write_blob(png_bytes(lr))
        hr_sha = self._write_blob(png_bytes(hr))[0] if hr is not None else None
        self._retry(lambda: self.db.execute("INSERT OR IGNORE INTO lr VALUES (?,?,?,?)", (lr_id, lr_sha, hr_sha, split)))
        if prompt is not None:
            self._retry(lambda: self.db.execute("INSERT OR IGNORE INTO prompts VALUES (?,?)", (lr_id, prompt)))

    def prompt(self, lr_id: str) -> str | None:
        """The caption stored with an LR image, or None."""
        row = self.db.execute("SELECT text FROM prompts WHERE lr_id=?", (lr_id,)).fetchone()
        return None if row is None else row[0]

    def lr_ids(self, split: str | None = None) -> list[str]:
        q = "SELECT lr_id FROM lr" + (" WHERE split=?" if split else "") + " ORDER BY lr_id"
        return [r[0] for r in self.db.execute(q, (split,) if split else ())]

    def load_lr(self, lr_id: str) -> tuple[Tensor, Tensor | None]:
        row = self.db.execute("SELECT lr_sha, hr_sha FROM lr WHERE lr_id=?", (lr_id,)).fetchone()
        if row is None:
            raise KeyError(f"no LR image {lr_id!r} in store {self.root}")
        return self.read_image(row[0]), (self.read_image(row[1]) if row[1] else None)

    # ------------------------------------------------------------------ candidates
    def add_candidate(self, lr_id: str, seed: int, sampler: str, steps: int, policy: str, img: Tensor) -> int:
        sha, rel = self._write_blob(png_bytes(img))
        cur = self._retry(lambda: self.db.execute(
            "INSERT OR IGNORE INTO candidates (lr_id, seed, sampler, steps, policy, sha256, path) VALUES (?,?,?,?,?,?,?)",
            (lr_id, seed, sampler, steps, policy, sha, rel)))
        return int(cur.lastrowid)

    def done_seeds(self, lr_id: str, sampler: str, steps: int, policy: str) -> set[int]:
        q = "SELECT seed FROM candidates WHERE lr_id=? AND sampler=? AND steps=? AND policy=?"
        return {r[0] for r in self.db.execute(q, (lr_id, sampler, steps, policy))}

    def candidates(self, lr_id: str | None = None) -> list[Candidate]:
        q = "SELECT cid, lr_id, seed, sampler, steps, policy, sha256, path FROM candidates"
        args: tuple = ()
        if lr_id is not None:
            q += " WHERE lr_id=?"
            args = (lr_id,)
        return [Candidate(*r) for r in self.db.execute(q + " ORDER BY lr_id, seed", args)]

    def rows(self) -> list[tuple]:
        """(lr_id, seed, sampler, steps, policy, sha256) of every candidate, sorted — the
        store's content, independent of insertion order."""
        return sorted(self.db.execute("SELECT lr_id, seed, sampler, steps, policy, sha256 FROM candidates"))

    # ------------------------------------------------------------------ scores
    def set_scores(self, values: list[tuple[int, str, float]]) -> None:
        def tx():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?,?,?)", values)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        self._retry(tx)

    def scored(self, metric: str) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT cid FROM scores WHERE metric=?", (metric,))}

    def scores(self, metric: str) -> dict[int, float]:
        return dict(self.db.execute("SELECT cid, value FROM scores WHERE metric=?", (metric,)))

    def set_meta(self, key: str, value: str) -> None:
        self._retry(lambda: self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value)))

    def get_meta(self, key: str) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return r[0] if r else None
