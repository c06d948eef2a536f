"""What a checkpoint's files hold and how they are read and written without unpickling
(:mod:`ptmrec_dist.train.checkpoint` decides when and where): the per-rank state (RNG states and
the trainer's per-rank arrays) as safetensors + JSON, the previous format's ``rank<R>.pt`` read
with ``weights_only=True``, DeepSpeed's own files read and written through a guarded checkpoint
engine (``weights_only=True``, a few allowed classes; every write failure recorded so the ranks
can agree on it), and the disk a failed write was on."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ptmrec_dist.errors import InputError
from ptmrec_dist.io import atomic_save_safetensors, fsync_file

_TENSOR = "__tensor__"       # in a rank file's JSON: "this leaf is the tensor of that name"


# ---------------------------------------------------------------------------- RNG and rank state

def rng_state() -> dict:
    version, internal, gauss_next = random.getstate()
    bit_generator, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
             "numpy": {"bit_generator": bit_generator, "key": key.tolist(), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():   # this rank's device only: a requeued job may see fewer
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """The states of :func:`rng_state` (or of format 1: python's and numpy's as tuples)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(py["state"]), py["gauss_next"])
    if isinstance(npy, dict):
        npy = (npy["bit_generator"], np.asarray(npy["key"], dtype=np.uint32), npy["pos"],
               npy["has_gauss"], npy["gauss"])
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):   # older checkpoints: every visible device's state
            here = torch.cuda.current_device()
            cuda = cuda[here] if here < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


def _split(tree, tensors: dict, key: str):
    """``tree`` as JSON, each tensor replaced by ``{_TENSOR: name}`` and put in ``tensors``."""
    if torch.is_tensor(tree):
        t = tree.detach().cpu().contiguous()
        if any(t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
               for s in tensors.values()):
            t = t.clone()                # safetensors stores no two views of one storage
        tensors[key] = t
        return {_TENSOR: key}
    if isinstance(tree, dict):
        return {str(k): _split(v, tensors, f"{key}/{k}") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split(v, tensors, f"{key}/{i}") for i, v in enumerate(tree)]
    return tree.item() if isinstance(tree, np.generic) else tree


def _join(tree, tensors: dict):
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        return {k: _join(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, tensors) for v in tree]
    return tree


def write_rank_state(path: Path, state: dict) -> None:
    """``state`` (nested dicts/lists of tensors, numbers, strings) as one safetensors file: the
    tensors, and the rest as JSON in its metadata."""
    tensors: dict = {}
    tree = _split(state, tensors, "")
    atomic_save_safetensors(path, tensors, {"ptmrec": json.dumps(tree)})


def read_rank_state(folder: Path, rank: int) -> dict:
    """Rank ``rank``'s state in the checkpoint ``folder`` (its RNG states under ``"rng"``)."""
    path, pickled = folder / f"rank{rank}.safetensors", folder / f"rank{rank}.pt"
    if not path.is_file():
        if pickled.is_file():
            return _read_format1(pickled)
        raise InputError(path, "missing: the checkpoint is incomplete")
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            tree = json.loads((f.metadata() or {})["ptmrec"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:          # safetensors' own error, a bad header, JSON, I/O
        raise InputError(path, f"cannot be read ({first_line(exc)}): the checkpoint is "
                               "damaged; remove its folder to resume from the one before") from None
    return _join(tree, tensors)


def _numpy_globals() -> list:
    """What format 1's numpy RNG state pickles: plain arrays and their dtype."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _read_format1(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(path, "written by an older ptmrec as a pickle, and it holds more than "
                               "tensors, numbers and numpy arrays: it is not loaded (nothing in "
                               f"it ran; {first_line(exc)[:200]}); start the run again without "
                               "--resume") from None
    except (RuntimeError, EOFError) as exc:
        raise InputError(path, f"cannot be read ({first_line(exc)}): the checkpoint is "
                               "damaged; remove its folder to resume from the one before") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


# ---------------------------------------------------------------------------- DeepSpeed's files

def deepspeed_globals() -> list:
    """The classes DeepSpeed's checkpoints pickle besides tensors and containers (0.19: its
    ZeRO/bf16 optimizer states hold the loss scaler, the ZeRO stage and fragment addresses)."""
    import importlib
    found = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler",
                                                                   "DynamicLossScaler")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:       # a release without one: its checkpoints do not hold it either
            found += [getattr(importlib.import_module(module), n) for n in names]
        except (ImportError, AttributeError):
            pass
    return found


class _GuardedIO:
    """Stands in for the engine's checkpoint engine (DeepSpeed's file I/O) while a checkpoint is
    saved or loaded: a file it writes is fsynced, and a failure to write is recorded in
    ``errors`` instead of raised (the rank must still enter DeepSpeed's closing barrier and the
    ranks' agreement); a file it reads is unpickled with ``weights_only=True``."""

    def __init__(self, inner):
        self.inner, self.errors = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def makedirs(self, path, exist_ok=False):
        try:
            self.inner.makedirs(path, exist_ok=exist_ok)
        except Exception as exc:
            self.errors.append((Path(path), exc))

    def save(self, state_dict, path):
        try:
            self.inner.save(state_dict, path)
            fsync_file(path)
        except Exception as exc:      # torch.save says RuntimeError for a full disk
            self.errors.append((Path(path), exc))

    def load(self, path, map_location=None):
        try:
            with torch.serialization.safe_globals(deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise InputError(path, "holds pickled objects other than tensors, numbers and the "
                                   "DeepSpeed classes a checkpoint needs: it is not loaded "
                                   f"(nothing in it ran; {first_line(exc)[:200]})") from None
        except (RuntimeError, EOFError) as exc:
            raise InputError(path, f"cannot be read ({first_line(exc)}): the checkpoint is "
                                   "damaged; remove its folder to resume from the one "
                                   "before") from None


@contextmanager
def guarded_io(engine):
    guard = _GuardedIO(engine.checkpoint_engine)
    engine.checkpoint_engine = guard
    try:
        yield guard
    finally:
        engine.checkpoint_engine = guard.inner


@contextmanager
def recording_errors(errors: list, where: Path):
    """A failure inside is appended to ``errors`` (the ranks agree on it afterwards)."""
    try:
        yield
    except Exception as exc:
        errors.append((Path(where), exc))


def disk_of(path: Path) -> str:
    """The disk ``path`` is on, for messages: its mount point and free space (torch.save
    reports a full disk as a bare stream error)."""
    try:
        usage = shutil.disk_usage(path)
        mount = path.resolve()
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        full = " (full)" if usage.free < max(2**20, usage.total // 100) else ""
        return (f"the disk mounted at {mount} has {usage.free / 2**20:.1f} MiB free of "
                f"{usage.total / 2**20:.1f} MiB{full}")
    except OSError:
        return f"the disk of {path}: free space unknown"
