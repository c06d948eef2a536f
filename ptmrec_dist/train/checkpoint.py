"""Resumable training checkpoints: ``OUT/checkpoints/step-NNNNNNNN/``, complete or absent.

A checkpoint is one folder holding

* the DeepSpeed checkpoint of the engine (``engine.save_checkpoint``, trainable parameters only:
  ``exclude_frozen_parameters``), i.e. the trainable weights, the optimizer states (partitioned
  under ZeRO, one file per rank) and the LR scheduler;
* ``state.json`` (main rank): where the run is (epoch, micro steps done in it, optimizer steps),
  the trainer's bookkeeping (best epoch and metrics, epochs without improvement, log lines), the
  world size, the sha256 of the frozen backbone's pretrained weights and the format (2);
* ``rank<R>.safetensors`` (every rank): python / numpy / torch (and CUDA) RNG states and the
  trainer's per-rank state (partial loss sums of the epoch, rows it wrote to the feature bank):
  the tensors as safetensors, the rest as JSON in its metadata, no pickle (format 1, before,
  wrote ``rank<R>.pt`` pickles: still resumed, read with ``weights_only=True``);
* any arrays the trainer adds (stage 2: the feature bank as it was at the epoch's start, hard
  linked from the previous checkpoint of the same epoch);
* ``manifest.json`` (main rank, written last): every file of the folder and its size.

Saving: every rank writes into ``.tmp-step-N/`` and fsyncs what it wrote; then the ranks agree
(an all-reduce) that every write of every rank succeeded, before anything assumes it: after a
failure anywhere (a full disk) every rank raises :class:`CheckpointWriteError` at once, naming the
folder and the disk, and the partial folder is removed; the checkpoints already there are not
touched. Then the main rank writes the manifest, renames the folder to ``step-N/`` (atomic) and
fsyncs the parent. A checkpoint of the same step already there (an epoch's end at the step of a
mid-epoch checkpoint) is first renamed ``.old-step-N/`` and removed once the new one is in place,
so there is no moment without a complete checkpoint; older checkpoints beyond ``keep`` (and
any of a higher step: a timeline abandoned by a resume from an earlier one) are deleted last.

Resuming (:func:`latest_checkpoint`) takes the newest checkpoint whose files match its manifest
and whose ``state.json`` reads: a newer damaged one (truncated by a crash before its data
reached the disk, say) is skipped with a warning naming it; with none left, exit 2 naming it.

Nothing is unpickled but tensors, numbers and plain containers: the rank files are safetensors,
and DeepSpeed's own files (torch pickles, which its loader reads with ``weights_only=False``,
with no option in 0.19) are read through a checkpoint engine of ours, with
``torch.load(weights_only=True)`` allowing only the few DeepSpeed classes its optimizer states
hold (:func:`ptmrec_dist.train.ckpt_io.deepspeed_globals`). Checkpoints live on storage every rank sees.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ptmrec_dist import dist
from ptmrec_dist.errors import InputError, TrainingError
from ptmrec_dist.io import atomic_save_npy, atomic_write_json, fsync_dir
from ptmrec_dist.train.ckpt_io import (disk_of, first_line, guarded_io, read_rank_state,
                                       recording_errors, rng_state, set_rng_state,
                                       write_rank_state)

PREFIX = "step-"
ASIDE = ".old-"              # a checkpoint being replaced by a new one of the same step
MANIFEST = "manifest.json"
FORMAT = 2

logger = logging.getLogger(__name__)


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written on some rank (a full disk, a failing file system);
    every rank raises it, and the checkpoints written before are kept."""


# ---------------------------------------------------------------------------- finding them

def step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoints in ``root`` (folders ``step-N``), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def problem(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from, or None: a file of its manifest
    missing or not of the size written, an unreadable ``state.json`` (format 1, with no
    manifest: ``state.json`` and the rank files)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "state.json is missing"
    except (OSError, ValueError) as exc:
        return f"state.json cannot be read ({first_line(exc)})"
    if not isinstance(state, dict) or not isinstance(state.get("world_size"), int):
        return "state.json is not a checkpoint's state"
    if not (path / MANIFEST).is_file():
        if state.get("format", 1) >= 2:
            return f"{MANIFEST} is missing"
        missing = [f"rank{r}.pt" for r in range(state["world_size"])
                   if not (path / f"rank{r}.pt").is_file()]
        return f"{missing[0]} is missing" if missing else None
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        for name, size in files.items():
            have = (path / name).stat().st_size if (path / name).is_file() else None
            if have is None:
                return f"{name} is missing"
            if have != size:
                return f"{name} has {have} bytes, {size} when written (truncated?)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST} cannot be read ({first_line(exc)})"
    return None


def latest_checkpoint(root: Path, warn=None) -> Path | None:
    """The newest checkpoint in ``root`` that can be resumed from (see :func:`problem`), or
    None when there is none at all. Newer damaged ones are skipped with ``warn`` (default: a
    logging warning) naming them; when every checkpoint is damaged, an InputError (exit 2)
    names the newest. A checkpoint set aside while being replaced (``.old-step-N``, a crash
    between the two renames) counts when its ``step-N`` is missing."""
    warn = warn or logger.warning
    found = checkpoint_dirs(root)
    steps = {step_of(p) for p in found}
    if root.is_dir():
        found += [p for p in root.iterdir() if p.is_dir() and p.name.startswith(ASIDE + PREFIX)
                  and p.name.rsplit("-", 1)[1].isdigit() and step_of(p) not in steps]
    bad = []
    for path in sorted(found, key=step_of, reverse=True):
        why = problem(path)
        if why is None:
            for skipped, reason in bad:
                warn(f"warning: checkpoint {skipped} cannot be resumed from ({reason}); "
                     f"resuming from an earlier one, {path}")
            return path
        bad.append((path, why))
    if bad:
        newest, reason = bad[0]
        raise InputError(newest, f"cannot resume from this checkpoint ({reason}), and there is "
                                 f"no earlier complete one in {root}: start the run again "
                                 "without --resume")
    return None


# ---------------------------------------------------------------------------- the checkpointer

def check_finite(engine, sums: dict, where: str, advice: str) -> None:
    """Before a checkpoint is written (collective: one all-reduce, only where a checkpoint is
    due, so training has no host sync per step for it): the loss terms summed over the epoch so
    far (``sums``) and the trainable weights must be finite on every rank; else a
    TrainingError naming ``where``, and no checkpoint holds NaN/inf weights."""
    bad = 0
    for p in engine.module.parameters():
        if p.requires_grad:
            t = getattr(p, "ds_tensor", p)       # ZeRO-3: this rank's partition
            if t.numel():
                bad += int((~torch.isfinite(t.detach())).sum())
    names = list(sums)
    total = dist.allreduce_sum(np.array([float(sums[k]) for k in names] + [bad],
                                        dtype=np.float64))
    loss_ok = bool(np.isfinite(total[:-1]).all())
    if loss_ok and total[-1] == 0:
        return
    what = [] if loss_ok else ["the loss summed over the epoch so far is not finite (" + ", ".join(
        f"{k} {v:.6g}" for k, v in zip(names, total[:-1])) + ")"]
    if total[-1]:
        what.append(f"{int(total[-1])} trainable weights are NaN or infinite")
    raise TrainingError(f"{where}: {' and '.join(what)}; no checkpoint was written (the last "
                        f"one is kept); {advice}")


class Checkpointer:
    def __init__(self, root: Path, env: dist.DistEnv, keep: int = 2):
        self.root, self.env, self.keep = Path(root), env, max(1, keep)

    def clear(self) -> int:
        """Remove the resumable checkpoints of an earlier run in this folder (a run started
        without ``--resume`` replaces it: a later ``--resume`` must not find them). Main rank;
        returns how many were removed."""
        old = checkpoint_dirs(self.root) + sorted(self.root.glob(".tmp-*")) + \
            sorted(self.root.glob(ASIDE + "*"))
        if self.env.is_main:
            for path in old:
                shutil.rmtree(path, ignore_errors=True)
        return len(old)

    def save(self, engine, step: int, state: dict, rank_state: dict,
             arrays: dict[str, np.ndarray] | None = None,
             link_from: Path | None = None) -> Path:
        """Collective. ``state`` (JSON, main rank's), ``rank_state`` (this rank's: tensors,
        numbers, strings in dicts/lists), ``arrays`` (main rank, ``.npy`` each; with
        ``link_from``, hard-linked from that checkpoint when it has them, since they did not
        change). Raises :class:`CheckpointWriteError` on every rank when a write failed on any."""
        name = f"{PREFIX}{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        errors: list = []
        if self.env.is_main:
            with recording_errors(errors, tmp):
                for old in self.root.glob(".tmp-*"):   # left by a run killed while saving
                    shutil.rmtree(old, ignore_errors=True)
                tmp.mkdir(parents=True)
        dist.barrier()
        with guarded_io(engine) as guard:
            try:
                engine.save_checkpoint(str(self.root), tag=tmp.name,
                                       exclude_frozen_parameters=True, save_latest=False)
            except Exception as exc:
                # a write outside the checkpoint engine (0.19: the recovery scripts it copies
                # into self.root, after all its collectives but the closing barrier)
                errors.append((self.root, exc))
                dist.barrier()
        errors += guard.errors
        with recording_errors(errors, tmp / f"rank{self.env.rank}.safetensors"):
            write_rank_state(tmp / f"rank{self.env.rank}.safetensors",
                             {"rng": rng_state(), **rank_state})
        if self.env.is_main:
            with recording_errors(errors, tmp):
                self._write_arrays(tmp, arrays or {}, link_from)
                atomic_write_json(tmp / "state.json", {**state, "step": step, "format": FORMAT,
                                                       "world_size": self.env.world_size})
        self._agree(errors, tmp, name)
        if self.env.is_main:
            with recording_errors(errors, tmp):
                self._commit(tmp, final)
        self._agree(errors, tmp, name)
        return final

    @staticmethod
    def _write_arrays(tmp: Path, arrays: dict, link_from: Path | None) -> None:
        for key, array in arrays.items():
            target = tmp / f"{key}.npy"
            source = (link_from / f"{key}.npy") if link_from is not None else None
            if source is not None and source.is_file():
                try:
                    os.link(source, target)         # its data is on the disk already
                    continue
                except OSError:                     # another file system: copy
                    pass
            atomic_save_npy(target, array)

    def _commit(self, tmp: Path, final: Path) -> None:
        """Main rank: the manifest, then ``tmp`` -> ``final`` (a checkpoint of the same step is
        set aside first and removed after), then the rotation."""
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / MANIFEST, {"format": FORMAT, "files": files})  # fsyncs tmp
        aside = self.root / f"{ASIDE}{final.name}"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except OSError:
            if aside.exists() and not final.exists():
                os.replace(aside, final)
            raise
        fsync_dir(self.root)
        for old in sorted(self.root.glob(ASIDE + "*")):
            shutil.rmtree(old, ignore_errors=True)
        for old in checkpoint_dirs(self.root):     # a timeline a resume went back from
            if step_of(old) > step_of(final):
                shutil.rmtree(old, ignore_errors=True)
        for old in checkpoint_dirs(self.root)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _agree(self, errors: list, tmp: Path, name: str) -> None:
        """Collective: whether every rank's writes succeeded. If not, the partial folder is
        removed and every rank raises CheckpointWriteError (none waits at a barrier)."""
        flags = torch.zeros(self.env.world_size, dtype=torch.float64)
        flags[self.env.rank] = float(bool(errors))
        failed = [r for r, f in enumerate(dist.allreduce_tensor(flags, op="max").tolist()) if f]
        if not failed:
            return
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if errors:
            where, exc = errors[0]
            what = f"rank {self.env.rank} could not write {where}: {first_line(exc)}"
        else:
            what = f"rank(s) {', '.join(map(str, failed))} could not write their part (see " \
                   "their error)"
        kept = checkpoint_dirs(self.root)
        raise CheckpointWriteError(
            f"checkpoint {name} was not saved in {self.root}: {what}; {disk_of(self.root)}; "
            f"the checkpoints written before are kept ({kept[-1].name if kept else 'none'}): "
            "free space there (or choose another --out) and continue with --resume")

    def read(self, path: Path, cfg, allowed: tuple[str, ...],
             backbone_hash: str | None = None) -> dict:
        """``state.json`` of the checkpoint ``path``, checked against this run before anything
        is built from it: the same number of ranks, the same configuration except for keys
        starting with one of ``allowed``, and (when given) the backbone weight hash recorded at
        save time."""
        from ptmrec_dist.config import to_dict
        state_file = path / "state.json"
        if not state_file.is_file():
            raise InputError(path, "not a checkpoint: state.json is missing")
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(state_file, f"cannot be read ({first_line(exc)})") from None
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
        ``path`` (checked first with :meth:`read`); returns this rank's state. Collective.
        Nothing is unpickled but tensors, numbers, containers (and :func:`deepspeed_globals`)."""
        rank_state = read_rank_state(path, self.env.rank)
        with guarded_io(engine):
            loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                               load_module_strict=False,
                                               load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        if loaded is None:
            raise InputError(path, "DeepSpeed could not load this checkpoint")
        set_rng_state(rank_state.pop("rng"))
        return rank_state

    def array(self, path: Path, key: str) -> np.ndarray:
        return np.load(path / f"{key}.npy", allow_pickle=False)


class StopSignals:
    """SIGTERM / SIGUSR1 (what SLURM and schedulers send before preemption) and SIGINT
    (Ctrl-C) set a flag instead of killing the process; installed before set-up, so a signal
    during it stops the run too; the trainer checks :meth:`requested` after each optimizer step,
    checkpoints and stops (:class:`~ptmrec_dist.errors.Interrupted`). The check agrees over all
    ranks (a max all-reduce), since a signal may reach only some of them. A second SIGTERM
    while stopping is left to the default handler."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")   # SIGINT: Ctrl-C checkpoints too

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

    def due(self, optimizer_step: int, world_size: int, every: int) -> bool:
        """Whether to ask the ranks now (:meth:`requested` is a collective every rank must
        enter at the same step): after every step on one process, where asking costs
        nothing; every ``every``-th optimizer step on several ranks, where it is an all-reduce
        (and a host sync on GPUs)."""
        return world_size == 1 or optimizer_step % every == 0

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], dtype=torch.float64)
        return bool(dist.allreduce_tensor(flag, op="max")[0] > 0)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A data loader worker's ``worker_init_fn``: the stop signals are the trainer's to handle.
    SLURM (time limit, scancel, preemption; the processes its proctrack plugin tracks) and
    ``kill -- -PGID`` signal the workers too; a worker that died of one would fail the trainer's
    next batch and the checkpoint it is about to write (exit 1 instead of 3, so no requeue).
    The main process ends its workers; use :func:`loader_worker_options`, which also makes sure
    it does at exit."""
    import signal
    for name in StopSignals.SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


_KILL_AT_EXIT = False


def loader_worker_options() -> dict:
    """``DataLoader`` keyword arguments for a loader read while the trainer handles the stop
    signals (the training stream, the re-extraction): its workers ignore them
    (:func:`ignore_stop_signals`), and workers still alive when the process exits are killed
    (:func:`end_daemon_children`, registered once). Without that, a run that failed with a
    loader's iterator still referenced (by the traceback, a persistent loader) hangs at exit:
    multiprocessing's exit handler ends daemonic children with SIGTERM, which these ignore,
    then waits for them forever."""
    global _KILL_AT_EXIT
    if not _KILL_AT_EXIT:
        import atexit
        atexit.register(end_daemon_children)      # runs before multiprocessing's (LIFO)
        _KILL_AT_EXIT = True
    return {"worker_init_fn": ignore_stop_signals}


def end_daemon_children(grace_s: float = 2.0) -> list[int]:
    """What multiprocessing's exit handler does for this process's daemonic children (data
    loader workers among them): SIGTERM, then wait; but those still alive after ``grace_s``
    (loader workers ignore SIGTERM, :func:`ignore_stop_signals`) get SIGKILL instead of an
    endless wait. Returns the pids killed. Non-daemonic children are left alone."""
    import multiprocessing
    import signal
    import threading
    import time

    children = [p for p in multiprocessing.active_children() if p.daemon]
    if children and threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would report each worker ended here as a failure
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for proc in children:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    killed = []
    for proc in children:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
            killed.append(proc.pid)
    return killed


def own_handlers(stop: StopSignals | None):
    """``stop`` as it is (a caller installed the handlers already), else a fresh
    :class:`StopSignals` to enter."""
    import contextlib
    return contextlib.nullcontext(stop) if stop is not None else StopSignals()
