"""Atomic file writes with normal file modes (the one helper every writer of user-facing files uses)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

TEMP_PREFIX = ".tmp-"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str | None = None) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a new temp file beside it (named
    ``.tmp-<random><suffix>``, default suffix: the target's), which is then renamed over ``path``.

    The file is created like any other tool's: mode 0666 minus the umask (0644 under the usual
    umask 022), not mkstemp's 0600. A failed ``write`` leaves neither a partial target nor the
    temp file. Returns ``Path(path)``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sfx = p.suffix if suffix is None else suffix
    while True:
        tmp = p.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}{sfx}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
            break
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
        except PermissionError as e:  # name the file the user asked for, not the temp name
            raise PermissionError(e.errno, e.strerror, str(p)) from None
    os.close(fd)
    try:
        write(str(tmp))
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``atomic_write`` of ``data`` as the whole file."""
    return atomic_write(path, lambda t: Path(t).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """``atomic_write`` of ``text`` as the whole file (newlines as written)."""
    def w(t: str) -> None:
        with open(t, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
    return atomic_write(path, w)
