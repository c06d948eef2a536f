"""What both training stages keep the same way: the resume preamble, the best epoch and patience
(early stopping decided here only), the stop message, and the tail of ``metrics.json``.

A stage run (:class:`~ptmrec_dist.train.stage1.Stage1Run`,
:class:`~ptmrec_dist.train.stage2.Stage2Run`) owns its loop; this module owns the bookkeeping
around it, so the two loops read alike and a checkpoint of either stage stores the same fields
under the same names (``best``, ``bad``, ``times``).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ptmrec_dist import dist
from ptmrec_dist.errors import Interrupted
from ptmrec_dist.run import RunDir
from ptmrec_dist.train.checkpoint import Checkpointer, StopSignals, latest_checkpoint


def main_rank_log(log: Callable, env: dist.DistEnv) -> Callable:
    """``log`` on the main rank, a no-op elsewhere: messages are printed once per job."""
    return log if env.is_main else (lambda *_: None)


class Resume:
    """Where a run starts: its checkpointer, and (``--resume`` with a checkpoint in
    ``OUT/checkpoints``) the newest checkpoint and its checked ``state.json``.

    A run started without ``--resume`` removes an earlier run's resumable checkpoints (a later
    ``--resume`` must not find them); ``--resume`` without a checkpoint starts from scratch.
    The checkpoint is checked against this run (ranks, configuration except ``allowed`` keys,
    backbone weights) before anything is built from it."""

    def __init__(self, out: Path, cfg, env: dist.DistEnv, resume: bool, say: Callable,
                 allowed: tuple[str, ...], keep: int = 2, backbone_hash: str | None = None):
        root = out / "checkpoints"
        self.checkpointer = Checkpointer(root, env, keep)
        self.path: Path | None = latest_checkpoint(root) if resume else None
        if resume and self.path is None:
            say(f"--resume: no checkpoint in {root}; starting from scratch")
        if self.path is None and self.checkpointer.clear():
            say(f"removed the resumable checkpoints of an earlier run in {root}")
        self.state: dict | None = None if self.path is None else self.checkpointer.read(
            self.path, cfg, allowed, backbone_hash)

    def run_dir(self, out: Path, cfg, env: dist.DistEnv) -> RunDir:
        """The run folder, its log continued from the checkpoint's log lines when resuming."""
        return RunDir(out, cfg, env.is_main).start(
            self.state["log_lines"] if self.state else None)


class RunState:
    """The best evaluation so far, evaluations since it (patience), epochs run, per-phase
    times, and the early-stopping decision.

    ``best`` is ``{"epoch", "valid", "test"}``: test metrics are computed only when valid
    improves, so they are those of the best-valid epoch and never influence a choice."""

    def __init__(self, metric: str, patience: int, phases: tuple[str, ...], say: Callable,
                 unit: str, best_epoch: int | None = None):
        self.metric, self.patience, self.say, self.unit = metric, patience, say, unit
        self.best: dict = {"epoch": best_epoch, "valid": None, "test": None}
        self.evals_since_best = 0
        self.epochs_run = 0
        self.stopped_early = False
        self.interrupt: Interrupted | None = None
        self.times: dict[str, list[float]] = {p: [] for p in phases}

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """The fields a checkpoint stores (the names are the on-disk format)."""
        return {"best": self.best, "bad": self.evals_since_best, "times": self.times,
                "epochs_run": self.epochs_run}

    def restore(self, state: dict, epochs_run: int) -> None:
        self.best, self.evals_since_best = state["best"], state["bad"]
        self.times, self.epochs_run = state["times"], epochs_run

    # ------------------------------------------------------------------ evaluation
    def record(self, epoch: int, valid: dict, test: Callable[[], dict],
               cold: Callable[[], dict] | None = None) -> bool:
        """Valid metrics of ``epoch``; True (and ``test()`` taken, and ``cold()``: the held-out
        items' metrics, when given) when they beat the best."""
        improved = self.best["valid"] is None or valid[self.metric] > self.best["valid"][self.metric]
        if improved:
            self.best = {"epoch": epoch, "valid": valid, "test": test()}
            if cold is not None:
                self.best["cold"] = cold()
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        return improved

    def epochs(self, start: int, end: int) -> Iterator[int]:
        """The epochs to train, ``start`` .. ``end - 1``, ended early once ``patience``
        evaluations in a row did not improve: the only place that decides early stopping.
        A stop already reached before ``start`` (a run resumed after its stopping evaluation)
        ends it silently. A stop signal handled during an epoch (:meth:`stop_after_epoch`)
        ends the run after it, unless the run stopped early there anyway (then it is done, and
        a requeue would have nothing left to do)."""
        for epoch in range(start, end):
            if self.evals_since_best >= self.patience:
                self.stopped_early = True
                return
            yield epoch
            if self.evals_since_best >= self.patience:
                self.stopped_early = True
                self.say(f"early stop: no better valid {self.metric} in {self.patience} "
                         f"{self.unit}")
                return
            if self.interrupt is not None:
                raise self.interrupt

    def stop_after_epoch(self, stop: StopSignals, epoch: int, checkpoint: Path | None) -> None:
        """A stop signal arrived during ``epoch`` and its checkpoint is written: end the run
        with exit 3 once the epoch is over (see :meth:`epochs`)."""
        self.interrupt = interrupted(stop, f"after epoch {epoch}", checkpoint)

    def mean_time(self, phase: str, digits: int) -> float:
        xs = self.times[phase]
        return round(float(np.mean(xs)), digits) if xs else 0.0

    # ------------------------------------------------------------------ the end
    def summary(self, t_start: float) -> dict:
        """The tail every ``metrics.json`` ends with."""
        return {"seconds": round(time.perf_counter() - t_start, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}

    def finish(self, run_dir: RunDir, metrics: dict, out: Path) -> dict:
        """Write ``metrics.json`` and say which epoch was kept (every rank calls it)."""
        run_dir.write_metrics(metrics)
        best, metric = self.best, self.metric
        self.say(f"best epoch {best['epoch']}: valid {metric} {best['valid'][metric]:.4f}, "
                 f"test {metric} {best['test'][metric]:.4f} -> {out}")
        dist.barrier()
        return metrics


def interrupted(stop: StopSignals, where: str, checkpoint: Path | None) -> Interrupted:
    """The error a stop signal ends a run with (exit 3: the job script requeues)."""
    saved = f"checkpoint {checkpoint}" if checkpoint else "no new checkpoint"
    return Interrupted(f"stopped by {stop.sender} {where}; {saved}; continue with --resume")
