"""Are two run folders the same result? (A tool, not a benchmark: `make bench` skips it.) ``metrics.json`` and ``log.jsonl`` without their timing
fields, and every exported array (``*.npy``, ``*.safetensors`` outside the resumable
``checkpoints/step-*``) byte for byte.

    python bench/_compare_runs.py RUN_A RUN_B        # exit 0: identical, 1: they differ

Used to check that a refactor changes no result (e.g. a stage-1 and a stage-2 run of the tiny
demo before and after, docs/architecture.md). On 2 CPU threads torch's reductions may sum in a
different order from run to run (loss terms then differ in the 6th digit and weights in their
last bits, while the metrics stay equal): compare runs made with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

TIMING = {"seconds", "peak_rss_mb", "elapsed_s", "items_per_s", "epoch_s", "eval_s", "train_s",
          "extract_s", "epoch_s_mean", "eval_s_mean", "train_s_mean", "extract_s_mean"}
# paths that name the run folder itself (a teacher's path differs between two copies)
PATHS = {"teacher"}


def without(node, keys: set[str]):
    if isinstance(node, dict):
        return {k: without(v, keys) for k, v in node.items() if k not in keys}
    if isinstance(node, list):
        return [without(x, keys) for x in node]
    return node


def differences(a: Path, b: Path) -> list[str]:
    found = []
    skip = TIMING | PATHS
    ma = without(json.loads((a / "metrics.json").read_text()), skip)
    mb = without(json.loads((b / "metrics.json").read_text()), skip)
    found += [f"metrics.json: {k}: {ma.get(k)!r} != {mb.get(k)!r}"
              for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
    la = [without(json.loads(x), skip) for x in (a / "log.jsonl").read_text().splitlines()]
    lb = [without(json.loads(x), skip) for x in (b / "log.jsonl").read_text().splitlines()]
    if len(la) != len(lb):
        found.append(f"log.jsonl: {len(la)} != {len(lb)} records")
    found += [f"log.jsonl record {i}: {ra} != {rb}" for i, (ra, rb) in enumerate(zip(la, lb))
              if ra != rb]
    for f in sorted(a.rglob("*")):
        rel = f.relative_to(a)
        if f.suffix not in (".npy", ".safetensors") or any(x.startswith("step-") for x in rel.parts):
            continue
        g = b / rel
        if not g.is_file():
            found.append(f"{rel}: missing in {b}")
        elif hashlib.sha256(f.read_bytes()).digest() != hashlib.sha256(g.read_bytes()).digest():
            found.append(f"{rel}: bytes differ")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args()
    found = differences(args.run_a, args.run_b)
    for line in found:
        print(line)
    print("identical" if not found else f"{len(found)} difference(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
