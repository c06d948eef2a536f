"""Helpers shared by the benchmarks (not a benchmark: run_all.py skips files starting with _)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` size (``VmRSS``, ``VmHWM``, ...) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (VmHWM), in MiB."""
    return status_mb("VmHWM")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn, *args, **kw):
    """``(fn(*args, **kw), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def run_child(script: str, *args: str) -> dict:
    """Run ``script --child ARGS`` in a fresh process (its own peak RSS) and return the JSON
    object it prints last; also echoed."""
    res = subprocess.run([sys.executable, script, "--child", *args], capture_output=True,
                         text=True, check=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def write_result(out_dir: str | Path, name: str, result: dict) -> Path:
    """``OUT/<name>.json`` (indented, written atomically), the file `make bench` collects."""
    from ptmrec_dist.io import atomic_write_json

    path = Path(out_dir) / f"{name}.json"
    atomic_write_json(path, result)
    return path
