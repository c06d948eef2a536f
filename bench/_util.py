"""Helpers shared by the benchmarks (not a benchmark: run_all.py skips files starting with _)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(script: str, *args: str) -> dict:
    """Run ``script --child ARGS`` in a fresh process (its own peak RSS) and return the JSON
    object it prints last; also echoed."""
    res = subprocess.run([sys.executable, script, "--child", *args], capture_output=True,
                         text=True, check=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def write_result(out_dir: str | Path, name: str, result: dict) -> Path:
    """``OUT/<name>.json``, the file `make bench` collects."""
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
