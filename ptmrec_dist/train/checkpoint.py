"""Resumable training checkpoints: ``OUT/checkpoints/step-NNNNNNNN/``, written atomically.

A checkpoint is one folder holding

* the DeepSpeed checkpoint of the engine (``engine.save_checkpoint``, trainable parameters only:
  ``exclude_frozen_parameters``), i.e. the trainable weights, the optimizer states (partitioned
  under ZeRO, one file per rank) and the LR scheduler;
* ``state.json`` (main rank): where the run is (epoch, micro steps done in it, optimizer steps),
  the trainer's bookkeeping (best epoch and metrics, epochs without improvement, log lines), the
  world size and the sha256 of the frozen backbone's pretrained weights;
* ``rank<R>.pt`` (every rank): python / numpy / torch (and CUDA) RNG states and the trainer's
  per-rank state (partial loss sums of the epoch, rows it wrote to the feature bank);
* any arrays the trainer adds (stage 2: the feature bank as it was at the epoch's start, hard
  linked from the previous checkpoint of the same epoch).

Every rank writes into ``.tmp-step-N/``; after a barrier the main rank renames it to
``step-N/`` (a rename is atomic), so a folder named ``step-*`` is always complete and a run killed
while saving leaves only a ``.tmp-*`` folder, removed by the next save. Older checkpoints beyond
``keep`` are deleted after a newer one is complete. Checkpoints live on storage every rank sees.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ptmrec_dist import dist
from ptmrec_dist.errors import InputError
from ptmrec_dist.io import atomic_write_json

PREFIX = "step-"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():   # this rank's device only: a requeued job may see fewer
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):   # older checkpoints: every visible device's state
            here = torch.cuda.current_device()
            cuda = cuda[here] if here < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints in ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


class Checkpointer:
    def __init__(self, root: Path, env: dist.DistEnv, keep: int = 2):
        self.root, self.env, self.keep = Path(root), env, max(1, keep)

    def clear(self) -> int:
        """Remove the resumable checkpoints of an earlier run in this folder (a run started
        without ``--resume`` replaces it: a later ``--resume`` must not find them). Main rank;
        returns how many were removed."""
        old = checkpoint_dirs(self.root) + sorted(self.root.glob(".tmp-*"))
        if self.env.is_main:
            for path in old:
                shutil.rmtree(path, ignore_errors=True)
        return len(old)

    def save(self, engine, step: int, state: dict, rank_state: dict,
             arrays: dict[str, np.ndarray] | None = None,
             link_from: Path | None = None) -> Path:
        """Collective. ``state`` (JSON, main rank's), ``rank_state`` (this rank's, torch.save),
        ``arrays`` (main rank, ``.npy`` each; with ``link_from``, hard-linked from that checkpoint
        when it has them, since they did not change)."""
        name = f"{PREFIX}{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.env.is_main:
            for old in self.root.glob(".tmp-*"):       # left by a run killed while saving
                shutil.rmtree(old, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp.name, exclude_frozen_parameters=True,
                               save_latest=False)
        torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank{self.env.rank}.pt")
        if self.env.is_main:
            for key, array in (arrays or {}).items():
                target = tmp / f"{key}.npy"
                source = (link_from / f"{key}.npy") if link_from is not None else None
                if source is not None and source.is_file():
                    try:
                        os.link(source, target)
                        continue
                    except OSError:                     # another file system: copy
                        pass
                np.save(target, array)
            atomic_write_json(tmp / "state.json", {**state, "step": step,
                                                   "world_size": self.env.world_size})
        dist.barrier()
        if self.env.is_main:
            if final.exists():                           # the same step saved twice: replace
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoint_dirs(self.root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def read(self, path: Path, cfg, allowed: tuple[str, ...],
             backbone_hash: str | None = None) -> dict:
        """``state.json`` of the checkpoint ``path``, checked against this run before anything
        is built from it: the same number of ranks, the same configuration except for keys
        starting with one of ``allowed``, and (when given) the backbone weight hash recorded at
        save time."""
        import json

        from ptmrec_dist.config import to_dict
        state_file = path / "state.json"
        if not state_file.is_file():
            raise InputError(path, "not a checkpoint: state.json is missing")
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state["world_size"] != self.env.world_size:
            raise InputError(path, f"saved by {state['world_size']} ranks, resumed with "
                                   f"{self.env.world_size}: the data position and the "
                                   "partitioned optimizer states need the same number of ranks")
        if backbone_hash is not None and state.get("backbone_sha256") != backbone_hash:
            raise InputError(path, f"the backbone {cfg.backbone.name_or_path} does not have the "
                                   "pretrained weights this run was trained on (weight hash "
                                   f"{backbone_hash[:12]}..., checkpoint "
                                   f"{str(state.get('backbone_sha256'))[:12]}...)")

        def flat(d: dict, pre: str = "") -> dict:
            out = {}
            for k, v in d.items():
                out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
            return out

        mine, theirs = flat(to_dict(cfg)), flat(state["config"])
        changed = sorted(k for k in set(mine) | set(theirs)
                         if mine.get(k) != theirs.get(k) and not k.startswith(allowed))
        if changed:
            raise InputError(path, "cannot resume with another configuration: " + ", ".join(
                f"{k} is {mine.get(k)!r} here, {theirs.get(k)!r} in the checkpoint"
                for k in changed[:5]))
        return state

    def load(self, engine, path: Path) -> dict:
        """Restore the engine (weights, optimizer, scheduler) and this rank's RNG states from
        ``path`` (checked first with :meth:`read`); returns this rank's state. Collective."""
        rank_file = path / f"rank{self.env.rank}.pt"
        if not rank_file.is_file():
            raise InputError(rank_file, "missing: the checkpoint is incomplete")
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                           load_module_strict=False,
                                           load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise InputError(path, "DeepSpeed could not load this checkpoint")
        rank_state = torch.load(rank_file, weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        return rank_state

    def array(self, path: Path, key: str) -> np.ndarray:
        return np.load(path / f"{key}.npy")


class StopSignals:
    """SIGTERM / SIGUSR1 (what SLURM and schedulers send before preemption) set a flag instead
    of killing the process; the trainer checks :meth:`requested` after each optimizer step,
    checkpoints and stops (:class:`~ptmrec_dist.errors.Interrupted`). The check agrees over all
    ranks (a max all-reduce), since a signal may reach only some of them. A second SIGTERM
    while stopping is left to the default handler."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal
        self.received = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def __exit__(self, *exc) -> None:
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    @property
    def sender(self) -> str:
        """Who asked to stop, for messages: this rank's signal, or another rank's."""
        return self.received or "a signal on another rank"

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], dtype=torch.float64)
        return bool(dist.allreduce_tensor(flag, op="max")[0] > 0)
