"""`make bench`: every benchmark (bench/*.py, not gpu.py and the gpu_* scripts for the GPU
machine nor the _*.py helpers) at its `make bench` size, each writing OUT/<name>.json; then
``bench/README.md`` (``_readme.py``) from the results. The tests marked heavy run with
``--heavy-tests`` or ``--full`` (and in `make test-all`).

    .venv/bin/python bench/run_all.py [--out bench/results] [--full] [--only a,b] [--skip a,b]

``QUICK`` below holds the `make bench` size of each script: the whole run finishes in under 30
minutes on a 2-core machine (15 measured). Those sizes show that every benchmark runs and
give the speed and memory figures at a small scale; the quality benchmarks (ablation, claims,
cold start, ML-100k, tuning) at these sizes have one or two seeds and a few hundred users (the
tiny demo), so their metric figures are smoke numbers, not results: the docs quote the full
runs. ``--full`` runs each script at its own defaults, the sizes the docs quote
(hours for the quality benchmarks; each resumes run by run). Each script gets ``--timeout``
seconds (a timed-out script is reported, its partial output kept, the rest go on).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMOKE = str(ROOT / "out" / "bench-smoke")     # work folders of the quality benches' small runs

QUICK: dict[str, list[str]] = {
    "data.py": ["--items", "1000", "--users", "1000", "--parse-rows", "500000"],
    "graph_scale.py": ["--items", "20000", "--edges", "2000000"],
    "eval_scale.py": ["--items", "200000", "--users", "20000"],
    "eval_reference.py": [],
    "extract.py": ["--items", "512", "--vitb-items", "32"],
    "stage2_cost.py": ["--preset", "tiny", "--steps", "2"],
    "stage1.py": ["--epochs", "1", "--skip-quality"],
    "scaling.py": ["--sizes", "2000,20000", "--work", f"{SMOKE}/scaling"],
    "sparse_embeddings.py": ["--seeds", "0", "--work", f"{SMOKE}/sparse_embeddings",
                             "stage1.epochs=3"],
    "ablation.py": ["--items", "200", "--users", "200", "--seeds", "0", "--models", "vbpr",
                    "--ablations", "frozen", "ptmrec", "--work", f"{SMOKE}/ablation",
                    "stage2.epochs=1"],
    "claims.py": ["--items", "200", "--users", "300", "--data-seeds", "0", "--inits", "0", "1",
                  "--control-inits", "0", "--models", "vbpr", "--arms", "frozen", "ptmrec",
                  "frozen-backbone-kt", "oracle", "--work", f"{SMOKE}/claims-v2",
                  "demo_backbone.corpus_items=300", "stage2.epochs=1"],
    "probe_adapt.py": ["--items", "200", "--users", "300", "--data-seeds", "0", "--epochs", "2",
                       "--work", f"{SMOKE}/claims-v2",           # claims.py's inputs, same size
                       "demo_backbone.corpus_items=300"],
    "redesign.py": ["--knob", "synthetic.caption_mention_prob", "--values", "0", "0.3",
                    "--items", "200", "--users", "300", "--inits", "0", "--probe-epochs", "2",
                    "--work", f"{SMOKE}/redesign", "stage2.epochs=1"],
    # these two read a finished demo: the tiny one, built first (`ptmrec demo --size tiny`)
    "cold_start.py": ["--demo", f"{SMOKE}/demo", "--seeds", "0", "1",
                      "--work", f"{SMOKE}/cold_start"],
    "tune_demo.py": ["--demo", f"{SMOKE}/demo", "tune.num_samples=2", "stage2.epochs=2"],
    # builds the ML-100k inputs (catalog, shards, MiniLM and poster features): 2-6 minutes
    "ml100k.py": ["--part", "stage1", "--variants", "sparse", "--models", "pop", "vbpr",
                  "--modalities", "text", "--seeds", "0", "--work", f"{SMOKE}/ml100k"],
}
NEEDS_DEMO = ("cold_start.py", "tune_demo.py")
# data sets beside the checkout (not in a user's clone): the script is skipped without them
NEEDS_DATA = {"ml100k.py": ROOT.parent / "shared" / "data" / "ml100k-posters",
              "sparse_embeddings.py": ROOT.parent / "shared" / "data" / "amazon-baby"}


def scripts() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py")
                  if p.name not in ("run_all.py", "gpu.py")
                  and not p.name.startswith(("gpu_", "_")))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--full", action="store_true", help="each script at its own defaults")
    ap.add_argument("--only", default="", help="comma-separated script names (no .py)")
    ap.add_argument("--skip", default="", help="comma-separated script names (no .py)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per script")
    ap.add_argument("--heavy-tests", action="store_true",
                    help="also the tests marked heavy (always with --full; `make test-all` "
                         "runs them too)")
    args = ap.parse_args()
    only = {f"{n}.py" for n in args.only.split(",") if n}
    skip = {f"{n}.py" for n in args.skip.split(",") if n}
    failed, skipped, times = [], [], {}
    chosen = [p for p in scripts()
              if not ((only and p.name not in only) or p.name in skip)]
    if not args.full:
        # `make bench` figures come from this commit: no earlier small run is resumed
        shutil.rmtree(SMOKE, ignore_errors=True)
        if any(p.name in NEEDS_DEMO for p in chosen):
            print("== tiny demo for cold_start.py and tune_demo.py", flush=True)
            t0 = time.perf_counter()
            if subprocess.call([sys.executable, "-m", "ptmrec_dist", "demo", "--size", "tiny",
                                "--out", f"{SMOKE}/demo", "--quiet"]) != 0:
                failed.append("tiny demo")
            times["tiny demo"] = round(time.perf_counter() - t0)
    for script in chosen:
        name = script.name
        if not args.full and name not in QUICK:
            skipped.append(f"{name} (no `make bench` size)")
            continue
        if name in NEEDS_DATA and not NEEDS_DATA[name].is_dir():
            skipped.append(f"{name} ({NEEDS_DATA[name]} is missing)")
            continue
        extra = [] if args.full else QUICK[name]
        print(f"== {name} {' '.join(extra)}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.call([sys.executable, str(script), "--out", args.out, *extra],
                                 timeout=None if args.full else args.timeout)
        except subprocess.TimeoutExpired:
            rc = f"timed out after {args.timeout} s"
        times[name] = round(time.perf_counter() - t0)
        print(f"== {name}: {'ok' if rc == 0 else rc} in {times[name]} s", flush=True)
        if rc != 0:
            failed.append(f"{name} ({rc})")
    if (args.heavy_tests or args.full) and not only:
        print("== heavy tests", flush=True)
        if subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "heavy",
                            str(ROOT / "tests")]) != 0:
            failed.append("heavy tests")
    subprocess.call([sys.executable, str(HERE / "_readme.py"), "--results", args.out])
    if skipped:
        print(f"not run: {', '.join(skipped)}")
    print("seconds per script: " + ", ".join(f"{k} {v}" for k, v in times.items()))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
