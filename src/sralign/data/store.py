"""The candidate store: an SQLite index plus content-addressed PNG files.

Layout of a store folder (the store owns these names and nothing else in the folder)::

    index.sqlite (+ -wal, -shm)  tables meta, keys, lr, candidates, scores, score_marks
    index.lock                   flock: shared while a blob is written and its row committed
    journal/w-PID-HEX.log        per writer: blobs written but not yet committed
    images/ab/abcdef….png        every image (LR, HR, candidates) named by its sha256

A folder is a store when it holds ``index.sqlite`` with sralign's tables; any other folder is
refused unless the caller creates a store (``create=True``, what ``sralign generate`` does), and
only a new or empty folder is turned into one.

Keys: every candidate row carries a *key* — the sha256 of a canonical JSON of everything that
determines its image (policy weights and settings, sampler, steps, base seed, LR-set definition;
see ``train.candidates.generation_key``). Candidates of different keys are never compared.

Writes are crash-safe and never race the clean-up: a writer takes a shared ``flock`` on
``index.lock``, notes the blob in its own journal (which it holds an exclusive ``flock`` on for
its lifetime), writes ``.tmp-PID-HEX.png`` and renames it to the blob name, commits the row, then
clears its journal and drops the shared lock. ``repair()`` runs only under a non-blocking
exclusive lock on ``index.lock`` (so no writer is between blob and row) and reads only the journals
of dead writers: it touches the few files they name, never lists all blobs. ``repair(full=True)``
lists every blob (an explicit, linear operation). Only files named like the store's own blobs and
temp files are ever deleted; symlinks are never followed, read or deleted through.

Reads check the sha256 of each file once per process; a missing or altered file raises
``BlobError`` naming it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import itertools
import json
import logging
import os
import re
import secrets
import sqlite3
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .images import to_uint8

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
INDEX = "index.sqlite"
LOCK = "index.lock"
JOURNAL = "journal"
IMAGES = "images"
OWN_NAMES = {INDEX, INDEX + "-wal", INDEX + "-shm", INDEX + "-journal", LOCK, JOURNAL, IMAGES}

_HEX2 = re.compile(r"^[0-9a-f]{2}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_BLOB = re.compile(r"^[0-9a-f]{64}\.png$")
_TMP = re.compile(r"^\.tmp-[A-Za-z0-9_-]+(\.png)?$")  # ours: .tmp-PID-HEX.png; schema 1: .tmp-XXXXXXXX
_JOURNAL_FILE = re.compile(r"^w-\d+-[0-9a-f]+\.log$")
_JOURNAL_LINE = re.compile(r"^([0-9a-f]{64}) (\.tmp-\d+-[0-9a-f]+\.png)$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, lrset TEXT NOT NULL, spec TEXT NOT NULL, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS lr (
    lrset TEXT NOT NULL, lr_id TEXT NOT NULL, lr_sha TEXT NOT NULL, hr_sha TEXT,
    split TEXT DEFAULT 'train', prompt TEXT, PRIMARY KEY (lrset, lr_id));
CREATE TABLE IF NOT EXISTS candidates (
    cid INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL, lr_id TEXT NOT NULL, seed INTEGER NOT NULL,
    sha256 TEXT NOT NULL, path TEXT NOT NULL, UNIQUE (key_id, lr_id, seed));
CREATE TABLE IF NOT EXISTS scores (
    cid INTEGER NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (cid, metric)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS score_marks (metric TEXT PRIMARY KEY, cid INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS candidates_by_lr ON candidates (lr_id, seed);
CREATE INDEX IF NOT EXISTS candidates_by_sha ON candidates (sha256);
CREATE INDEX IF NOT EXISTS lr_by_lr_sha ON lr (lr_sha);
CREATE INDEX IF NOT EXISTS lr_by_hr_sha ON lr (hr_sha);
CREATE INDEX IF NOT EXISTS lr_by_split ON lr (split, lr_id);
CREATE INDEX IF NOT EXISTS lr_by_id ON lr (lr_id);
"""


class StoreError(ValueError):
    """A store problem a user can fix; the message names the folder or file and the fix."""


class BlobError(StoreError):
    """An image file of the store is missing, altered, a symlink or outside the store."""

    def __init__(self, msg: str, sha: str = ""):
        super().__init__(msg)
        self.sha = sha


def png_bytes(img: Tensor) -> bytes:
    """[3,H,W] in [0,1] -> PNG bytes (deterministic: no timestamps)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_png(data: bytes) -> Tensor:
    a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal content, equal text (hence equal hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def spec_hash(obj: Any) -> str:
    """sha256 (64 hex) of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def blob_rel(sha: str) -> str:
    """The one path (relative to the store) a blob with this sha256 may have."""
    return f"{IMAGES}/{sha[:2]}/{sha}.png"


@dataclass
class Candidate:
    cid: int
    key_id: str
    lr_id: str
    seed: int
    sha256: str
    path: str

    def where(self) -> str:
        """How error messages name this candidate."""
        return f"candidate {self.cid}: LR {self.lr_id}, seed {self.seed}"


def _symlink_error(path: Path, where: str, sha: str) -> "BlobError":
    return BlobError(f"{path} ({where}) is a symbolic link; a store holds only its own files (refusing to follow it)", sha)


def _missing_error(path: Path, where: str, sha: str) -> "BlobError":
    return BlobError(f"{path} ({where}) is missing; `sralign generate` with the same settings regenerates it", sha)


@dataclass
class StoreKey:
    """One generation key: ``spec`` is what determined the candidates, ``n`` their count."""

    key_id: str
    lrset: str
    spec: dict
    description: str
    n: int

    def line(self) -> str:
        return f"{self.key_id[:12]}  {self.description}  ({self.n} candidates)"


class CandidateStore:
    """Open the store in ``root``.

    Args:
        root: the store folder.
        repair: clean up after writers that died (incremental; skipped when another process
            is writing).
        timeout: SQLite busy timeout in seconds.
        create: make a new store if ``root`` does not exist or is empty; without it a folder
            lacking ``index.sqlite`` is refused (``StoreError``).
    """

    def __init__(self, root: str | os.PathLike, repair: bool = True, timeout: float = 60.0, *, create: bool = False):
        self.root = Path(root)
        self._timeout = timeout
        self._verified: set[str] = set()
        self._dirs_ok: set[str] = set()
        self._journal_fd: int | None = None
        self._journal_name = ""
        self._journal_pending = False
        self._journal_keep: list[str] = []
        self._lock_fd: int | None = None
        self.db: sqlite3.Connection | None = None
        index = self.root / INDEX
        if create:
            self._check_creatable()
        elif not self.root.is_dir():
            raise StoreError(f"{self.root}: no such candidate store (the folder does not exist); "
                             f"`sralign generate --store {self.root}` creates one")
        elif not os.path.lexists(index):
            raise StoreError(f"{self.root}: not a candidate store (no {INDEX}); "
                             f"`sralign generate --store DIR` creates stores, in a new or empty folder")
        for name in (INDEX, IMAGES, LOCK, JOURNAL):
            if (self.root / name).is_symlink():
                raise StoreError(f"{self.root / name} is a symbolic link; a store's own files must be real files "
                                 f"inside it (refusing to follow it)")
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(index), timeout=timeout, isolation_level=None)
            tables = self._retry(self._tables, tries=100)  # a damaged file fails here, before anything is written
            if not create and tables and not {"meta", "candidates"} <= tables:
                raise StoreError(f"{index}: an SQLite file without sralign's tables; not a candidate store "
                                 f"(`sralign generate --store DIR` creates stores)")
            self._lock_fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            self._open_schema(create)
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(f"{index}: not a readable sralign index ({e}); restore it from a backup "
                             f"or make a new store with `sralign generate`") from None
        except BaseException:
            self.close()
            raise
        self._real_dir(IMAGES, make=True)  # only once the index is known to be sralign's
        if repair:
            self.repair()

    # ------------------------------------------------------------------ open / create
    def _check_creatable(self) -> None:
        r = self.root
        if os.path.lexists(r) and not r.is_dir():
            raise StoreError(f"{r} exists and is not a folder; give --store a new or empty folder")
        if not r.is_dir() or (r / INDEX).is_file():
            return
        other = sorted(n for n in os.listdir(r) if n not in OWN_NAMES)
        img = r / IMAGES
        if img.is_dir() and not img.is_symlink():
            other += sorted(f"{IMAGES}/{n}" for n in os.listdir(img) if not _HEX2.match(n) or not (img / n).is_dir())
        if other:
            shown = ", ".join(other[:3]) + (", …" if len(other) > 3 else "")
            raise StoreError(f"{r}: not a candidate store (no {INDEX}) and not empty (holds {shown}); "
                             f"`sralign generate` creates a store only in a new or empty folder")

    def _tables(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def _schema_version(self) -> int | None:
        if "meta" not in self._tables():
            return None
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        return int(row[0]) if row else None

    def _open_schema(self, create: bool) -> None:
        self._retry(lambda: self.db.execute("PRAGMA synchronous=NORMAL"), tries=100)
        version = self._retry(self._schema_version, tries=100)
        if version == SCHEMA_VERSION:
            return
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(f"{self.root}: written by a newer sralign (index schema {version}, this one reads "
                             f"{SCHEMA_VERSION}); upgrade sralign")
        with self._exclusive(blocking=True):
            version = self._retry(self._schema_version, tries=100)
            if version == SCHEMA_VERSION:
                return
            tables = self._tables()
            if "candidates" in tables and version is None:
                self._migrate_v1()
            elif create or not tables:
                if not create:
                    raise StoreError(f"{self.root}: not a candidate store ({INDEX} is empty); "
                                     f"`sralign generate --store DIR` creates stores")
                # Switching a new database to WAL takes an exclusive lock that SQLite's busy
                # timeout does not wait for: retry like writes do.
                self._retry(lambda: self.db.execute("PRAGMA journal_mode=WAL"), tries=100)
                self._retry(lambda: self.db.executescript(
                    "BEGIN IMMEDIATE;" + SCHEMA + f"INSERT OR REPLACE INTO meta VALUES ('schema', '{SCHEMA_VERSION}'); COMMIT;"),
                    tries=100)
            else:
                raise StoreError(f"{self.root / INDEX}: an SQLite file without sralign's tables; "
                                 f"not a candidate store (`sralign generate --store DIR` creates stores)")

    def _migrate_v1(self) -> None:
        """Schema 1 (no key column) -> 2, deterministically: each distinct (policy, sampler,
        steps) of the old rows becomes one key marked as migrated (its seed, start and LR set
        were not recorded); LR rows go to the LR set ``schema1``; candidate ids, and so their
        scores, are kept."""
        db = self.db
        self._retry(lambda: db.execute("PRAGMA journal_mode=WAL"), tries=100)
        db.execute("BEGIN IMMEDIATE")
        try:
            has_prompts = "prompts" in self._tables()
            db.execute("ALTER TABLE lr RENAME TO lr_v1")
            db.execute("ALTER TABLE candidates RENAME TO candidates_v1")
            db.execute("ALTER TABLE scores RENAME TO scores_v1")
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            prompt = "(SELECT text FROM prompts p WHERE p.lr_id = l.lr_id)" if has_prompts else "NULL"
            db.execute(f"INSERT INTO lr SELECT 'schema1', lr_id, lr_sha, hr_sha, split, {prompt} FROM lr_v1 l")
            combos = db.execute("SELECT DISTINCT policy, sampler, steps FROM candidates_v1 ORDER BY policy, sampler, steps").fetchall()
            for policy, sampler, steps in combos:
                spec = {"migrated_from_schema": 1, "policy": {"fingerprint": policy}, "sampler": sampler, "steps": steps,
                        "lr_set": "schema1"}
                key = spec_hash(spec)
                desc = (f"policy {policy[:8]}, {sampler} {steps} steps — written by an older sralign "
                        f"(start, seed and LR set not recorded)")
                db.execute("INSERT OR IGNORE INTO keys VALUES (?,?,?,?)", (key, "schema1", canonical_json(spec), desc))
                db.execute("INSERT INTO candidates (cid, key_id, lr_id, seed, sha256, path) SELECT cid, ?, lr_id, seed, "
                           "sha256, path FROM candidates_v1 WHERE policy=? AND sampler=? AND steps=? ORDER BY cid",
                           (key, policy, sampler, steps))
            db.execute("INSERT INTO scores SELECT cid, metric, value FROM scores_v1")
            db.execute("DROP TABLE scores_v1")
            db.execute("DROP TABLE candidates_v1")
            db.execute("DROP TABLE lr_v1")
            if has_prompts:
                db.execute("DROP TABLE prompts")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        log.info("%s: index migrated from schema 1 to %d (%d keys)", self.root, SCHEMA_VERSION, len(combos))

    def close(self) -> None:
        """Close the index; a journal with nothing pending is removed."""
        if self._journal_fd is not None:
            if not self._journal_pending:
                try:
                    os.unlink(self.root / JOURNAL / self._journal_name)
                except FileNotFoundError:
                    pass
            os.close(self._journal_fd)
            self._journal_fd = None
        if self.db is not None:
            self.db.close()
            self.db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "CandidateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ low level
    def _retry(self, fn: Callable[[], Any], tries: int = 20) -> Any:
        for i in range(tries):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or i == tries - 1:
                    raise
                time.sleep(min(0.05 * (i + 1), 0.5))

    def _tx(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """``body`` inside BEGIN IMMEDIATE … COMMIT, retried while the database is busy."""
        def run():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = body(self.db)
                self.db.execute("COMMIT")
                return out
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self._retry(run)

    @contextmanager
    def _exclusive(self, blocking: bool) -> Iterator[bool]:
        """Hold ``index.lock`` exclusively (no writer between a blob and its row). Yields
        False (and holds nothing) when ``blocking`` is False and a writer is active."""
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _real_dir(self, rel: str, make: bool) -> Path:
        """``root/rel`` as a real folder (not a symlink), created when ``make``."""
        p = self.root / rel
        if rel in self._dirs_ok:
            return p
        if make:
            try:
                os.mkdir(p)
            except FileExistsError:
                pass
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return p
        if not stat.S_ISDIR(st.st_mode):
            raise BlobError(f"{p} is a symbolic link or not a folder; a store's image folders must be real "
                            f"folders inside it (refusing to follow it)")
        self._dirs_ok.add(rel)
        return p

    def _journal(self) -> int:
        if self._journal_fd is None:
            jdir = self._real_dir(JOURNAL, make=True)
            self._journal_name = f"w-{os.getpid()}-{secrets.token_hex(4)}.log"
            fd = os.open(jdir / self._journal_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for this store object's lifetime: "writer alive"
            self._journal_fd = fd
        return self._journal_fd

    @staticmethod
    def _read_own(path: Path, sha: str, where: str) -> bytes | None:
        """The bytes of ``path`` without following a symlink (``BlobError`` naming it), or None
        when it is missing."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _symlink_error(path, where, sha) from None
            raise
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def _blob_ok(self, sha: str, path: Path, where: str) -> bool:
        """True when ``path`` is a regular file holding bytes with this sha256; False when it
        is missing or altered. A symlink raises."""
        data = self._read_own(path, sha, where)
        ok = data is not None and hashlib.sha256(data).hexdigest() == sha
        if ok:
            self._verified.add(sha)
        return ok

    def _write_blobs(self, datas: list[bytes], commit: Callable[[list[str]], Any]) -> Any:
        """Write each blob (unless a verified copy is there) and run ``commit(shas)``, all under
        the shared lock, with the blobs in this writer's journal until the commit returns."""
        shas = [hashlib.sha256(d).hexdigest() for d in datas]
        lines: list[str] = []
        with self._writing():
            jfd = self._journal()
            for data, sha in zip(datas, shas):
                d = self._real_dir(f"{IMAGES}/{sha[:2]}", make=True)
                path = d / f"{sha}.png"
                if sha in self._verified and os.path.isfile(path) and not os.path.islink(path):
                    continue
                if self._blob_ok(sha, path, "new image"):
                    continue
                tmp = f".tmp-{os.getpid()}-{secrets.token_hex(6)}.png"
                line = f"{sha} {tmp}\n"
                os.write(jfd, line.encode())
                lines.append(line)
                self._journal_pending = True
                fd = os.open(d / tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(d / tmp, path)
                self._verified.add(sha)
            try:
                out = commit(shas)
            except BaseException:
                self._journal_keep += lines  # never committed: left for the repair after this writer
                raise
            if self._journal_pending:
                os.ftruncate(jfd, 0)
                if self._journal_keep:
                    os.write(jfd, "".join(self._journal_keep).encode())
                self._journal_pending = bool(self._journal_keep)
        return out

    def _blob_path(self, sha: str, rel: str | None, where: str) -> Path:
        """The checked path of a blob named in the index: confined to ``images/``."""
        if not isinstance(sha, str) or not _SHA.match(sha) or (rel is not None and rel != blob_rel(sha)):
            shown = rel if rel is not None else sha
            raise BlobError(f"{self.root / INDEX}: {where} names {shown!r}, which is not an image of this store "
                            f"(absolute, '..' or foreign paths are refused); the index was edited or is damaged")
        self._real_dir(IMAGES, make=False)
        self._real_dir(f"{IMAGES}/{sha[:2]}", make=False)
        return self.root / blob_rel(sha)

    def read_blob(self, sha: str, rel: str | None = None, where: str = "image") -> bytes:
        """The bytes of a blob, its sha256 checked (once per process). Raises ``BlobError``
        naming the file when it is missing, altered, a symlink or outside the store."""
        path = self._blob_path(sha, rel, where)
        data = self._read_own(path, sha, where)
        if data is None:
            raise _missing_error(path, where, sha)
        if sha not in self._verified:
            if hashlib.sha256(data).hexdigest() != sha:
                raise BlobError(f"{path} ({where}) was altered (its sha256 differs from the index); "
                                f"`sralign generate` with the same settings regenerates it", sha)
            self._verified.add(sha)
        return data

    def blob_ok(self, sha: str, check_hash: bool = True) -> bool:
        """Whether the blob is present (and, with ``check_hash``, unaltered); cached per process."""
        path = self._blob_path(sha, None, "image")
        if sha in self._verified or not check_hash:
            return os.path.isfile(path) and not os.path.islink(path)
        return self._blob_ok(sha, path, "image")

    def read_image(self, rel_or_sha: str, where: str = "image") -> Tensor:
        """[3,H,W] in [0,1] from a blob's sha256 or its ``images/ab/<sha>.png`` path (checked)."""
        if "/" in rel_or_sha:
            sha = Path(rel_or_sha).stem
            return decode_png(self.read_blob(sha, rel_or_sha, where))
        return decode_png(self.read_blob(rel_or_sha, None, where))

    # ------------------------------------------------------------------ repair
    def _referenced(self, sha: str) -> bool:
        q = ("SELECT EXISTS (SELECT 1 FROM candidates WHERE sha256=?) OR EXISTS (SELECT 1 FROM lr WHERE lr_sha=?) "
             "OR EXISTS (SELECT 1 FROM lr WHERE hr_sha=?)")
        return bool(self.db.execute(q, (sha, sha, sha)).fetchone()[0])

    def _unlink_own(self, path: Path, pattern: re.Pattern) -> bool:
        """Delete ``path`` only if it is a regular file named like one of the store's own."""
        if not pattern.match(path.name):
            return False
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False

    def repair(self, full: bool = False) -> dict[str, int]:
        """Clean up after writers that died. Incremental: reads only the journals of dead
        writers (a few lines each) and deletes the temp files and uncommitted blobs they name.
        ``full=True`` also lists every image folder and deletes temp files and blobs that no row
        references (linear in the store's size; raises when another process is writing).
        Skipped, with a debug log, while another process is writing. Returns counts."""
        counts = {"temp_files": 0, "orphans": 0, "journals": 0}
        with self._exclusive(blocking=False) as got:
            if not got:
                if full:
                    raise StoreError(f"{self.root}: another sralign process is writing to this store; "
                                     f"run the full repair when it has finished")
                log.debug("%s: a writer is active; clean-up skipped", self.root)
                return counts
            jdir = self.root / JOURNAL
            if os.path.isdir(jdir) and not os.path.islink(jdir):
                for name in sorted(os.listdir(jdir)):
                    if _JOURNAL_FILE.match(name) and name != self._journal_name:
                        self._replay_journal(jdir / name, counts)
            if full:
                self._full_sweep(counts)
        if any(counts.values()):
            log.info("%s: removed %d temp files and %d uncommitted images left by interrupted writers",
                     self.root, counts["temp_files"], counts["orphans"])
        return counts

    def _replay_journal(self, path: Path, counts: dict[str, int]) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # its writer is alive (and not mid-write: we hold index.lock)
            with os.fdopen(os.dup(fd), "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
            for line in lines:
                m = _JOURNAL_LINE.match(line)
                if not m:
                    continue  # a line cut short by the kill: its blob was never written
                sha, tmp = m.groups()
                d = self.root / IMAGES / sha[:2]
                if os.path.isdir(d) and not os.path.islink(d):
                    counts["temp_files"] += self._unlink_own(d / tmp, _TMP)
                    if not self._referenced(sha):
                        counts["orphans"] += self._unlink_own(d / f"{sha}.png", _BLOB)
                        self._verified.discard(sha)
            os.unlink(path)
            counts["journals"] += 1
        finally:
            os.close(fd)

    def _full_sweep(self, counts: dict[str, int]) -> None:
        img = self.root / IMAGES
        referenced = {r[0] for r in self.db.execute("SELECT sha256 FROM candidates")}
        for a, b in self.db.execute("SELECT lr_sha, hr_sha FROM lr"):
            referenced.update(x for x in (a, b) if x)
        for sub in sorted(os.listdir(img)):
            d = img / sub
            if not _HEX2.match(sub) or not stat.S_ISDIR(os.lstat(d).st_mode):
                continue
            for name in os.listdir(d):
                if _TMP.match(name):
                    counts["temp_files"] += self._unlink_own(d / name, _TMP)
                elif _BLOB.match(name) and name[:-4] not in referenced:
                    counts["orphans"] += self._unlink_own(d / name, _BLOB)

    # ------------------------------------------------------------------ keys
    def register_key(self, spec: dict, lrset: str, description: str) -> str:
        """Record a generation key (idempotent); returns its id, ``spec_hash(spec)``."""
        key = spec_hash(spec)
        self._tx(lambda db: db.execute("INSERT OR IGNORE INTO keys VALUES (?,?,?,?)", (key, lrset, canonical_json(spec), description)))
        return key

    def keys(self, with_candidates: bool = False) -> list[StoreKey]:
        """Every key with its candidate count (an index count per key), oldest id order."""
        out = []
        for key, lrset, spec, desc in self.db.execute("SELECT key_id, lrset, spec, description FROM keys ORDER BY key_id").fetchall():
            n = self.db.execute("SELECT count(*) FROM candidates WHERE key_id=?", (key,)).fetchone()[0]
            if n or not with_candidates:
                out.append(StoreKey(key, lrset, json.loads(spec), desc, n))
        return out

    def key(self, key_id: str) -> StoreKey:
        row = self.db.execute("SELECT key_id, lrset, spec, description FROM keys WHERE key_id=?", (key_id,)).fetchone()
        if row is None:
            raise StoreError(f"{self.root}: no generation key {key_id[:12]}")
        return StoreKey(row[0], row[1], json.loads(row[2]), row[3], -1)

    def resolve_key(self, prefix: str | None = None) -> str:
        """The key to build pairs from: the one matching ``prefix`` (a hash prefix), or the only
        key holding candidates. Several and no prefix: ``StoreError`` listing them."""
        if prefix:
            rows = [r[0] for r in self.db.execute("SELECT key_id FROM keys WHERE key_id LIKE ? ORDER BY key_id",
                                                  (prefix.lower().replace("%", "") + "%",))]
            if len(rows) == 1:
                return rows[0]
            listing = "; ".join(k.line() for k in self.keys(with_candidates=True))
            what = "matches no key" if not rows else f"is ambiguous ({len(rows)} keys)"
            raise StoreError(f"store_key={prefix} {what} in {self.root}; its keys: {listing or 'none'}")
        rows = [r[0] for r in self.db.execute(
            "SELECT key_id FROM keys k WHERE EXISTS (SELECT 1 FROM candidates c WHERE c.key_id = k.key_id) ORDER BY key_id")]
        if len(rows) == 1:
            return rows[0]
        if not rows:
            raise StoreError(f"{self.root} holds no candidates; run `sralign generate --store {self.root}` first")
        listing = "\n".join("  " + k.line() for k in self.keys(with_candidates=True))
        raise StoreError(f"{self.root} holds candidates of {len(rows)} generation keys (different policy or "
                         f"generation settings); pairs are built within one key — pick one with "
                         f"store_key=<hash prefix>:\n{listing}")

    def _lrset_of(self, key: str | None, lrset: str | None) -> str | None:
        if lrset is not None or key is None:
            return lrset
        row = self.db.execute("SELECT lrset FROM keys WHERE key_id=?", (key,)).fetchone()
        if row is None:
            raise StoreError(f"{self.root}: no generation key {key[:12]}")
        return row[0]

    # ------------------------------------------------------------------ LR images
    def add_lr(self, lr_id: str, lr: Tensor, hr: Tensor | None = None, split: str = "train", prompt: str | None = None,
               *, lrset: str = "") -> None:
        """Add an LR image (and its HR, and its caption for text-conditioned policies) of LR set
        ``lrset`` once; a different image under the same (lrset, lr_id) raises ``StoreError``."""
        datas = [png_bytes(lr)] + ([png_bytes(hr)] if hr is not None else [])

        def commit(shas: list[str]) -> None:
            hr_sha = shas[1] if len(shas) > 1 else None

            def body(db):
                row = db.execute("SELECT lr_sha, hr_sha FROM lr WHERE lrset=? AND lr_id=?", (lrset, lr_id)).fetchone()
                if row is None:
                    db.execute("INSERT INTO lr VALUES (?,?,?,?,?,?)", (lrset, lr_id, shas[0], hr_sha, split, prompt))
                elif tuple(row) != (shas[0], hr_sha):
                    raise StoreError(f"{self.root}: LR image {lr_id} differs from the one stored for this LR-set "
                                     f"definition (its HR images changed on disk?); use a new store, or restore "
                                     f"the HR images")
            self._tx(body)
        self._write_blobs(datas, commit)

    def prompt(self, lr_id: str, key: str | None = None, lrset: str | None = None) -> str | None:
        """The caption stored with an LR image, or None."""
        row = self._lr_row(lr_id, key, lrset, "prompt")
        return None if row is None else row[0]

    def _lr_row(self, lr_id: str, key: str | None, lrset: str | None, cols: str):
        ls = self._lrset_of(key, lrset)
        if ls is not None:
            return self.db.execute(f"SELECT {cols} FROM lr WHERE lrset=? AND lr_id=?", (ls, lr_id)).fetchone()
        rows = self.db.execute(f"SELECT {cols} FROM lr WHERE lr_id=? LIMIT 2", (lr_id,)).fetchall()
        if len(rows) > 1:
            raise StoreError(f"{self.root}: LR id {lr_id} belongs to several LR sets; pass the key")
        return rows[0] if rows else None

    def lr_ids(self, split: str | None = None, lrset: str | None = None) -> list[str]:
        conds, args = [], []
        if split:
            conds.append("split=?")
            args.append(split)
        if lrset is not None:
            conds.append("lrset=?")
            args.append(lrset)
        q = "SELECT DISTINCT lr_id FROM lr" + (" WHERE " + " AND ".join(conds) if conds else "") + " ORDER BY lr_id"
        return [r[0] for r in self.db.execute(q, args)]

    def load_lr(self, lr_id: str, key: str | None = None, lrset: str | None = None) -> tuple[Tensor, Tensor | None]:
        row = self._lr_row(lr_id, key, lrset, "lr_sha, hr_sha")
        if row is None:
            raise KeyError(f"no LR image {lr_id!r} in store {self.root}")
        lr = self.read_image(row[0], where=f"LR image {lr_id}")
        return lr, (self.read_image(row[1], where=f"HR image {lr_id}") if row[1] else None)

    # ------------------------------------------------------------------ candidates
    def add_candidate(self, key: str, lr_id: str, seed: int, img: Tensor) -> int:
        """Store one candidate of generation key ``key``; returns its id. A row of the same
        (key, lr_id, seed) with another image (regenerated after its file went missing or was
        altered) is replaced by a new row (new id, no scores)."""

        def commit(shas: list[str]) -> int:
            sha = shas[0]

            def body(db):
                row = db.execute("SELECT cid, sha256 FROM candidates WHERE key_id=? AND lr_id=? AND seed=?", (key, lr_id, seed)).fetchone()
                if row is not None and row[1] == sha:
                    return int(row[0])
                if row is not None:
                    db.execute("DELETE FROM scores WHERE cid=?", (row[0],))
                    db.execute("DELETE FROM candidates WHERE cid=?", (row[0],))
                cur = db.execute("INSERT INTO candidates (key_id, lr_id, seed, sha256, path) VALUES (?,?,?,?,?)",
                                 (key, lr_id, seed, sha, blob_rel(sha)))
                return int(cur.lastrowid)
            return self._tx(body)
        return self._write_blobs([png_bytes(img)], commit)

    def done_seeds(self, key: str, lr_id: str) -> set[int]:
        q = "SELECT seed FROM candidates WHERE key_id=? AND lr_id=?"
        return {r[0] for r in self.db.execute(q, (key, lr_id))}

    _COLS = "cid, key_id, lr_id, seed, sha256, path"

    def candidates(self, lr_id: str | None = None, key: str | None = None) -> list[Candidate]:
        conds, args = [], []
        if key is not None:
            conds.append("key_id=?")
            args.append(key)
        if lr_id is not None:
            conds.append("lr_id=?")
            args.append(lr_id)
        q = f"SELECT {self._COLS} FROM candidates" + (" WHERE " + " AND ".join(conds) if conds else "")
        return [Candidate(*r) for r in self.db.execute(q + " ORDER BY lr_id, seed, key_id", args)]

    def candidate(self, cid: int) -> Candidate:
        row = self.db.execute(f"SELECT {self._COLS} FROM candidates WHERE cid=?", (cid,)).fetchone()
        if row is None:
            raise StoreError(f"{self.root}: no candidate {cid} (the store changed since the pairs were built?)")
        return Candidate(*row)

    def check_candidate(self, c: Candidate | int) -> None:
        """Cheap check before work: the candidate's file is named like this store's own, inside
        it, present and not a symlink (its sha256 is checked when it is read). ``BlobError``
        names it otherwise."""
        if not isinstance(c, Candidate):
            c = self.candidate(c)
        where = c.where()
        path = self._blob_path(c.sha256, c.path, where)
        if os.path.islink(path):
            raise _symlink_error(path, where, c.sha256)
        if not os.path.isfile(path):
            raise _missing_error(path, where, c.sha256)

    def read_candidate(self, c: Candidate | int) -> Tensor:
        """A candidate's image [3,H,W] in [0,1], its file checked (``BlobError`` names it)."""
        if not isinstance(c, Candidate):
            c = self.candidate(c)
        return decode_png(self.read_blob(c.sha256, c.path, c.where()))

    def rows(self) -> list[tuple]:
        """(lr_id, seed, key_id, sha256) of every candidate, sorted — the store's content,
        independent of insertion order."""
        return sorted(self.db.execute("SELECT lr_id, seed, key_id, sha256 FROM candidates"))

    @staticmethod
    def _grouped_sql(n_metrics: int, files: bool = False) -> str:
        joins = "".join(f" LEFT JOIN scores s{i} ON s{i}.cid = c.cid AND s{i}.metric = ?" for i in range(n_metrics))
        vals = "".join(f", s{i}.value" for i in range(n_metrics)) + (", c.sha256, c.path" if files else "")
        return f"SELECT c.lr_id, c.cid, c.seed{vals} FROM candidates c{joins} WHERE c.key_id = ? ORDER BY c.key_id, c.lr_id, c.seed"

    @classmethod
    def _unscored_sql(cls, n_metrics: int) -> str:
        has = ", ".join("EXISTS (SELECT 1 FROM scores s WHERE s.cid = c.cid AND s.metric = ?)" for _ in range(n_metrics))
        cols = ", ".join("c." + x.strip() for x in cls._COLS.split(","))
        # NOT INDEXED: the rowid range (cid > mark), never a walk of the whole (key, lr) index
        return f"SELECT {cols}, {has} FROM candidates c NOT INDEXED WHERE c.cid > ? ORDER BY c.key_id, c.lr_id, c.seed"

    def grouped(self, key: str, metrics: list[str], files: bool = False) -> Iterator[tuple[str, list[tuple]]]:
        """Stream (lr_id, [(cid, seed, value of each metric or None, …), …]) per LR of one key, in
        lr_id then seed order (one indexed query; memory: one group). ``files``: each row also
        ends with the candidate's (sha256, path), for ``check_candidate`` without a lookup."""
        cur = self.db.execute(self._grouped_sql(len(metrics), files), (*metrics, key))
        for lr_id, rows in itertools.groupby(cur, key=lambda r: r[0]):
            yield lr_id, [r[1:] for r in rows]

    # ------------------------------------------------------------------ scores
    def unscored(self, metrics: list[str]) -> tuple[int, Iterator[tuple[Candidate, list[str]]]]:
        """(max cid now, stream of (candidate, metrics it lacks)) in key, lr_id order. Only rows
        above each metric's mark are looked at: a no-op is one indexed range query."""
        if not metrics:
            return 0, iter(())
        top = self.db.execute("SELECT coalesce(max(cid), 0) FROM candidates").fetchone()[0]
        marks = dict(self.db.execute("SELECT metric, cid FROM score_marks"))
        low = min(marks.get(m, 0) for m in metrics)
        q = self._unscored_sql(len(metrics))
        # a second connection: the caller writes scores while this cursor streams
        reader = sqlite3.connect(str(self.root / INDEX), timeout=self._timeout, isolation_level=None)
        cur = reader.execute(q, (*metrics, low))

        def gen():
            for r in cur:
                c = Candidate(*r[:6])
                lack = [m for m, h in zip(metrics, r[6:]) if not h and c.cid > marks.get(m, 0)]
                if lack:
                    yield c, lack
            reader.close()
        return top, gen()

    def mark_scored(self, metrics: list[str], upto: int) -> None:
        """Record that every candidate with cid ≤ ``upto`` has a score for each metric."""
        self._tx(lambda db: db.executemany(
            "INSERT INTO score_marks VALUES (?, ?) ON CONFLICT(metric) DO UPDATE SET cid = max(cid, excluded.cid)",
            [(m, upto) for m in metrics]))

    def set_scores(self, values: list[tuple[int, str, float]]) -> None:
        """Insert (cid, metric, value) rows; rows of candidates replaced meanwhile are dropped."""
        self._tx(lambda db: db.executemany(
            "INSERT OR REPLACE INTO scores SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM candidates WHERE cid = ?)",
            [(c, m, v, c) for c, m, v in values]))

    def scored(self, metric: str) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT cid FROM scores WHERE metric=?", (metric,))}

    def scores(self, metric: str) -> dict[int, float]:
        return dict(self.db.execute("SELECT cid, value FROM scores WHERE metric=?", (metric,)))

    def set_meta(self, key: str, value: str) -> None:
        self._tx(lambda db: db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value)))

    def get_meta(self, key: str) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return r[0] if r else None
