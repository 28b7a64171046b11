"""Files that are never half-written, locks between processes, and file digests: one home each."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader sees the old file or the new one, never a part; a failed write leaves no temporary."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(path: Path | str) -> Iterator[None]:
    """Exclusive advisory lock (``flock``) on ``path``, created if missing, for read-modify-write
    between processes (two ranks downloading or building the same thing do it once).

    Where the file system cannot lock (``ENOLCK`` on NFS without lockd) the block runs unlocked
    with a warning: every writer under such a lock also writes through :func:`atomic_write_text` or
    an atomic rename, so the worst case is work done twice, never a torn file.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process holding %s", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            log.warning("cannot lock %s (%s); relying on atomic renames", path, exc.strerror)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def file_digests(path: Path | str, *algorithms: str) -> tuple[str, ...]:
    """Hex digests of ``path`` for each of ``algorithms`` (e.g. "md5", "sha256"), in one read."""
    hashes = [hashlib.new(a) for a in algorithms]
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            for h in hashes:
                h.update(block)
    return tuple(h.hexdigest() for h in hashes)


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of ``path``."""
    return file_digests(path, "sha256")[0]
