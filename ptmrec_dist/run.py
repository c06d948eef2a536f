"""The run-directory contract: ``OUT/config.yaml``, ``OUT/log.jsonl``, ``OUT/metrics.json``.

Every command that trains or evaluates writes the resolved config when it starts, one JSON object
per epoch or evaluation to ``log.jsonl`` while it runs, and its final metrics (e.g.
``{"valid": {"recall@20": ...}, "test": {...}}``) to ``metrics.json`` at the end. Only the main
rank writes; all writes are atomic or single-line appends, so a killed run leaves whole records.
"""

from __future__ import annotations

import platform
import subprocess
import time
from functools import lru_cache
from pathlib import Path

from ptmrec_dist.config import Config, save_config
from ptmrec_dist.io import append_jsonl, atomic_write_json

CONFIG, LOG, METRICS = "config.yaml", "log.jsonl", "metrics.json"


class RunDir:
    def __init__(self, path: str | Path, cfg: Config, is_main: bool = True):
        self.path = Path(path)
        self.cfg = cfg
        self.is_main = is_main
        self._t0 = time.time()

    def start(self, resume_lines: int | None = None) -> "RunDir":
        """Create the folder and write the config; the log of an earlier run in the same folder
        is kept as ``log.jsonl.1`` (``.2``, ...), not appended to. A resumed run
        (``resume_lines``) continues the log from its first ``resume_lines`` records (those
        written before the checkpoint it resumes from)."""
        self.lines = 0
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
                n = 1
                while log.with_name(f"{LOG}.{n}").exists():
                    n += 1
                log.rename(log.with_name(f"{LOG}.{n}"))
            save_config(self.cfg, self.path)
        return self

    def log(self, **record) -> None:
        """Append one record; ``elapsed_s`` (since start) is added."""
        if self.is_main:
            append_jsonl(self.path / LOG, {**record,
                                           "elapsed_s": round(time.time() - self._t0, 3)})
            self.lines += 1

    def write_metrics(self, metrics: dict) -> None:
        if self.is_main:
            atomic_write_json(self.path / METRICS, metrics)


@lru_cache(maxsize=1)
def _commit() -> dict:
    """The package's git commit and whether its tree had changes (None outside a checkout)."""
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


def provenance(cfg: Config) -> dict:
    """What a figure needs to be reproduced: commit, seeds, torch threads, library versions."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {"python": platform.python_version()}
    for name in ("ptmrec_dist", "torch", "deepspeed", "transformers", "peft", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    d = cfg.data
    return {**_commit(), "torch_threads": torch.get_num_threads(),
            "seeds": {"seed": cfg.seed, "data.split_seed": d.split_seed,
                      "data.subsample_seed": d.subsample_seed if d.subsample < 1 else None},
            "versions": versions}
