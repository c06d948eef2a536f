"""Atomic file writes, JSON lines, hashing. Every output file goes through here (temp + rename)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ptmrec_dist.errors import InputError
from ptmrec_dist.logs import get_logger

_log = get_logger(__name__)


def _tmp_near(path: Path) -> tuple[int, str]:
    """A temp file beside ``path``, readable like a normally created file (mkstemp's 0600 would
    hide outputs from the other users of shared cluster storage)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return fd, tmp


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# what a directory fsync may answer on file systems that do not support it (some network and
# FUSE file systems): the entry is then as durable as that file system makes it
_NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM}


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to the disk (a file another call or library wrote and closed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` durable (a file created, renamed or removed in
    it): without this, a crash soon after a rename may find the old name, or none."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _NO_DIR_FSYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` into ``path`` through a temp file beside it: written, fsynced, renamed over
    ``path``, and the rename made durable (the folder fsynced)."""
    path = Path(path)
    fd, tmp = _tmp_near(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """``tensors`` (name -> CPU tensor) as a safetensors file, written atomically."""
    from safetensors.torch import save
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=_json_default, sort_keys=False)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj) + "\n")


def temp_file_near(path: str | Path) -> tuple[int, str]:
    return _tmp_near(Path(path))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    path = Path(path)
    fd, tmp = _tmp_near(path)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def append_jsonl(path: str | Path, record: dict) -> None:
    """One JSON object per line; a single write() so a crash never leaves half a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps_json(record, indent=None) + "\n")


def iter_jsonl(path: str | Path):
    """``(line_no, object)`` for each non-blank line of a JSON-lines file; a line that is not a
    JSON object raises InputError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, f"invalid JSON: {exc.msg} (column {exc.colno})",
                                 line=line_no) from None
            if not isinstance(obj, dict):
                raise InputError(path, "expected a JSON object per line", line=line_no)
            yield line_no, obj


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(folder: str | Path, what: str):
    """Hold ``FOLDER/.lock`` (an advisory ``fcntl.flock``) while the body runs, so that only one
    writer (``what``: ``"ptmrec shard"``, ...) works in ``folder`` at a time. A second process is
    refused at once with an :class:`InputError` naming the folder and the holder (what, pid, host,
    since when), never left waiting. The kernel drops the lock when its holder exits, however it
    exits, so the lock file of a killed process blocks nothing; a holder that ends normally also
    removes the file. Where the file system has no ``flock`` the body runs unlocked, with a
    warning. Yields the lock file's path."""
    import fcntl
    import socket
    import time

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise InputError(folder, f"in use by {holder}: wait for it to end or write to "
                                     f"another folder (lock file {lock})") from None
        except OSError as exc:          # e.g. ENOLCK on a file system without locks
            os.close(fd)
            _log.warning("%s: cannot lock (%s); make sure no other %s writes into this folder",
                         lock, exc.strerror, what)
            yield lock
            return
        # a holder that ends removes the file: ours must still be the one at the path
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        yield lock
    finally:
        try:
            lock.unlink()                 # while still holding it (see the samestat check)
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """Who holds a lock, from its file: ``ptmrec shard (pid 123 on node7, since ...)``."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"{info['what']} (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"
