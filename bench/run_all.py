"""`make bench`: run every bench/*.py (not gpu_*.py, which need the GPU machine, nor the _*.py
helpers), each writing OUT/<name>.json; then the heavy tests."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    failed = []
    scripts = sorted(p for p in HERE.glob("*.py")
                     if p.name != "run_all.py" and not p.name.startswith(("gpu_", "_")))
    for script in scripts:
        print(f"== {script.name}", flush=True)
        if subprocess.call([sys.executable, str(script), "--out", args.out]) != 0:
            failed.append(script.name)
    print("== heavy tests", flush=True)
    if subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "heavy",
                        str(HERE.parent / "tests")]) != 0:
        failed.append("heavy tests")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
