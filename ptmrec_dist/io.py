"""Atomic file writes, JSON lines, hashing. Every output file goes through here (temp + rename)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ptmrec_dist.errors import InputError


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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
