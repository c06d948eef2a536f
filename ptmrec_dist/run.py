"""The run-directory contract: ``OUT/config.yaml``, ``OUT/log.jsonl``, ``OUT/metrics.json``.

Every command that trains or evaluates writes the resolved config when it starts, one JSON object
per epoch or evaluation to ``log.jsonl`` while it runs, and its final metrics (e.g.
``{"valid": {"recall@20": ...}, "test": {...}}``) to ``metrics.json`` at the end. Only the main
rank writes; all writes are atomic or single-line appends, so a killed run leaves whole records.
With ``log.tensorboard: true`` each epoch record's numeric fields also go to ``OUT/tensorboard/``
as TensorBoard scalars (tag: the key path, ``valid/recall@20``; step: the record's ``epoch``),
flushed after every record.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from functools import lru_cache
from pathlib import Path

from ptmrec_dist.config import Config, save_config
from ptmrec_dist.io import append_jsonl, atomic_write_json

CONFIG, LOG, METRICS, TENSORBOARD = "config.yaml", "log.jsonl", "metrics.json", "tensorboard"


def _keep_earlier(path: Path) -> None:
    """An earlier run's ``path`` becomes ``path.1`` (``.2``, ...)."""
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    path.rename(path.with_name(f"{path.name}.{n}"))


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric fields of a record by key path (``{"valid": {"recall@20": x}}`` ->
    ``{"valid/recall@20": x}``); booleans, strings and lists are left out."""
    out = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{tag}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


class RunDir:
    def __init__(self, path: str | Path, cfg: Config, is_main: bool = True):
        self.path = Path(path)
        self.cfg = cfg
        self.is_main = is_main
        self._t0 = time.time()
        self._tb = None                 # tensorboardX EventsWriter, opened at the 1st epoch record
        self._resumed = False

    def start(self, resume_lines: int | None = None) -> "RunDir":
        """Create the folder and write the config; the log of an earlier run in the same folder
        is kept as ``log.jsonl.1`` (``.2``, ...), not appended to. A resumed run
        (``resume_lines``) continues the log from its first ``resume_lines`` records (those
        written before the checkpoint it resumes from)."""
        self.lines = 0
        self._resumed = resume_lines is not None
        if self.is_main and getattr(self.cfg, "log", None) and self.cfg.log.tensorboard:
            from importlib.util import find_spec
            if find_spec("tensorboardX") is None:   # said before training, not at its 1st epoch
                from ptmrec_dist.errors import ConfigError
                raise ConfigError("config key 'log.tensorboard' needs the tensorboardX package "
                                  "(pip install tensorboardX)")
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            log = self.path / LOG
            if resume_lines is not None:
                kept = log.read_text(encoding="utf-8").splitlines(keepends=True)[:resume_lines] \
                    if log.exists() else []
                from ptmrec_dist.io import atomic_write_text
                atomic_write_text(log, "".join(kept))
                self.lines = len(kept)
            elif log.exists():
                _keep_earlier(log)
            if resume_lines is None and (self.path / TENSORBOARD).exists():
                _keep_earlier(self.path / TENSORBOARD)
            save_config(self.cfg, self.path)
        return self

    def log(self, **record) -> None:
        """Append one record; ``elapsed_s`` (since start) is added."""
        if self.is_main:
            record = {**record, "elapsed_s": round(time.time() - self._t0, 3)}
            append_jsonl(self.path / LOG, record)
            self.lines += 1
            self._tensorboard(record)

    def _tensorboard(self, record: dict) -> None:
        """The record's scalars at step ``epoch`` (records without an epoch are skipped),
        flushed now: a killed run keeps every epoch it logged."""
        log_cfg = getattr(self.cfg, "log", None)
        epoch = record.get("epoch")
        if not (log_cfg and log_cfg.tensorboard) or not isinstance(epoch, int):
            return
        # tensorboardX's synchronous writer: its SummaryWriter/FileWriter queue events to a
        # thread (a flush does not wait for it), and add_scalar renames `recall@20` `recall_20`
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary

        if self._tb is None:
            folder = self.path / TENSORBOARD
            folder.mkdir(parents=True, exist_ok=True)
            # its own file: the name has the time in seconds, and a second writer of the same
            # second (a quick resume) would otherwise write over the first one's file
            n = len(list(folder.glob("events.out.tfevents.*")))
            self._tb = EventsWriter(str(folder / "events"), filename_suffix=f".{n}")
            if self._resumed:    # TensorBoard drops the earlier run's events from this epoch on
                #                  (logged again, as were the log.jsonl lines after the checkpoint)
                self._tb.write_event(Event(wall_time=time.time(), step=epoch,
                                           session_log=SessionLog(status=SessionLog.START)))
        values = scalars({k: v for k, v in record.items() if k != "epoch"})
        self._tb.write_event(Event(wall_time=time.time(), step=epoch, summary=Summary(
            value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])))
        self._tb.flush()

    def write_metrics(self, metrics: dict) -> None:
        """The run's final metrics; the run is over, so the TensorBoard writer closes."""
        if self.is_main:
            atomic_write_json(self.path / METRICS, metrics)
        self.close()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


@lru_cache(maxsize=1)
def _commit() -> dict:
    """The package's git commit and whether its tree had changes (None outside a checkout), as
    they were when this module was imported (it asks then, below, and keeps the answer): the
    code a process runs is the code it loaded, so a commit made while it trains (a long bench)
    must not be recorded as its runs'."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


_commit()        # at import: the commit of the code this process loaded


def machine_provenance() -> dict:
    """Commit, torch threads, CPUs (count, model, torch's kernel capability) and library
    versions: what any figure records (runs through :func:`provenance`, benchmarks through
    ``bench/_util.write_result``)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {"python": platform.python_version()}
    for name in ("ptmrec_dist", "torch", "deepspeed", "transformers", "peft", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {**_commit(), "torch_threads": torch.get_num_threads(), "cpus": cpus,
            "cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "versions": versions}


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere):
    with ``cpu_capability`` (the kernels torch picks, e.g. AVX512) it tells whether two runs'
    floating-point results can be compared bit for bit."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(cfg: Config) -> dict:
    """What a figure needs to be reproduced: commit, seeds, torch threads, library versions."""
    d = cfg.data
    m = machine_provenance()
    m.pop("cpus")
    return {**m, "seeds": {"seed": cfg.seed, "data.split_seed": d.split_seed,
                           "data.subsample_seed": d.subsample_seed if d.subsample < 1 else None}}
