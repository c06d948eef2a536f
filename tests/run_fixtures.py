"""Running ``ptmrec`` in child processes (plain, under torchrun, as a SLURM job) and reading what
a run folder holds; shared by the stage-1, stage-2, SLURM and tuning tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ptmrec_dist.dist import free_port

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ child processes

def child_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def ptmrec(*args, ranks: int = 1, cwd=None) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(free_port())] if ranks > 1 else [sys.executable])
    return subprocess.run([*launch, "-m", "ptmrec_dist", *map(str, args)], env=child_env(),
                          cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


# ------------------------------------------------------------------------------ SLURM jobs

def job_env() -> dict:
    """What the jobs inherit (sbatch exports the environment): this interpreter, CPU, offline."""
    return {**child_env(), "PYTHON": sys.executable}


def sbatch(*args, wait: bool = False, timeout: float = 300) -> tuple[int, subprocess.CompletedProcess]:
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *map(str, args)]
    proc = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    m = re.match(r"(\d+)", proc.stdout)
    assert m, f"sbatch printed no job id: {proc.stdout}\n{proc.stderr}"
    return int(m.group(1)), proc


def job(job_id: int) -> dict:
    """``scontrol show job`` as a dict (kept for MinJobAge after the end)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                         text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


# ------------------------------------------------------------------------------ run folders

def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def checkpoint_states(run):
    from ptmrec_dist.train.checkpoint import checkpoint_dirs
    return [(p, json.loads((p / "state.json").read_text()))
            for p in checkpoint_dirs(run / "checkpoints")]


def assert_same_run(a, b):
    """Same metrics and the same per-epoch log (losses, valid metrics), exactly."""
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["valid"] == mb["valid"] and ma["test"] == mb["test"]
    assert ma["best_epoch"] == mb["best_epoch"] and ma["epochs_run"] == mb["epochs_run"]
    keys = ("epoch", "loss", "bpr", "kt", "items", "valid", "best", "backbone_shift")
    assert [{k: r.get(k) for k in keys} for r in read_log(a)] == \
        [{k: r.get(k) for k in keys} for r in read_log(b)]
