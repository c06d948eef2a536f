"""A Ray Tune sweep on the demo benchmark: ``tuning/demo.yaml`` (random search over prompt
length, KT weight and PEFT method, ASHA on valid Recall@20) on the ``make demo`` run.

    .venv/bin/python bench/tune_demo.py [--demo out/demo] [--sweep tuning/demo.yaml]
        [--out bench/results] [k=v ...]

If ``DEMO/stage2/config.yaml`` is missing, the demo is built first (``ptmrec demo``, the default
size; timed separately). The sweep runs as ``ptmrec tune`` in a child process (local Ray on this
machine's CPUs). Reports the sweep's wall time, the time lost to Ray start-up, the whole-process
time (imports and Ray shutdown included), every trial (status, searched values, epochs, best
valid and its test metrics) and the best configuration (chosen on valid only). Writes
``OUT/tune_demo.json``; the sweep's own outputs stay in ``OUT/tune_demo/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import write_result  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default=str(ROOT / "out" / "demo"))
    ap.add_argument("--sweep", default=str(ROOT / "tuning" / "demo.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    demo, out = Path(args.demo), Path(args.out)
    result: dict = {"sweep": args.sweep, "demo": str(demo)}
    if not (demo / "stage2" / "config.yaml").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ptmrec_dist", "demo", "--out", str(demo)],
                       check=True)
        result["demo_build_s"] = round(time.perf_counter() - t0, 1)
    dest = out / "tune_demo"
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ptmrec_dist", "tune", args.sweep, "--base",
                           str(demo / "stage2" / "config.yaml"), "--out", str(dest),
                           *args.overrides], text=True, capture_output=True)
    result["process_s"] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
        return proc.returncode
    summary = json.loads((dest / "summary.json").read_text())
    with open(dest / "results.csv", newline="") as f:
        trials = list(csv.DictReader(f))
    metric = summary["metric"]
    test_metric = metric.replace("valid/", "test/")
    keys = list(summary["best"]["params"]) if summary["best"] else []
    result.update({k: summary[k] for k in ("trials", "completed", "stopped_early", "errors",
                                             "wall_s", "ray_start_s", "trial_s_total",
                                             "best")})
    result["trial_rows"] = [{k: t[k] for k in ["trial", "status", *keys, "epochs_run",
                                               "best_epoch", metric, test_metric, "wall_s"]}
                            for t in trials]
    demo_metrics = demo / "stage2" / "metrics.json"
    if demo_metrics.is_file():                     # the demo's own PTMRec run, for reference
        m = json.loads(demo_metrics.read_text())
        result["demo_stage2"] = {metric: m["valid"][metric.split("/", 1)[1]],
                                 test_metric: m["test"][metric.split("/", 1)[1]],
                                 "epochs_run": m["epochs_run"]}
    path = write_result(out, "tune_demo", result)
    print(proc.stdout.strip().splitlines()[-1])
    print(f"| trial | status | {' | '.join(keys)} | epochs | {metric} | {test_metric} | s |")
    print("|" + "---|" * (len(keys) + 6))
    for t in result["trial_rows"]:
        print(f"| {t['trial']} | {t['status']} | " + " | ".join(t[k] for k in keys)
              + f" | {t['epochs_run']} | {float(t[metric]):.4f} | {float(t[test_metric]):.4f}"
                f" | {t['wall_s']} |")
    print(f"sweep {result['wall_s']} s (Ray start-up {result['ray_start_s']} s), whole process "
          f"{result['process_s']} s -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
