"""Cold start (issue 20): Recall/NDCG@20 on items held out of training entirely
(``data.cold_items``), frozen features (stage 1) against PTMRec (stage 2), paired over seeds.

    .venv/bin/python bench/cold_start.py [--demo out/demo] [--seeds 0 1 2 3 4]
        [--fraction 0.2] [--control] [--work out/cold_start] [--out bench/results]

Inputs: a finished ``ptmrec demo`` folder (default size: 3,000 items x 3,000 users, the demo
backbone; ``make demo``): its data, shards, features and the configs of its stage-1 (vbpr) and
stage-2 (PTMRec) runs, which every run here reuses with

* ``data.cold_items=F data.cold_seed=s``: a seeded fraction of the items held out with all
  their interactions;
* ``seed=s data.split=random data.split_seed=2026+s``: seed ``s`` also sets the split and the
  initialisation (data, split and initialisation vary together).

Per seed: ``stage1`` (vbpr on the frozen features: the frozen reference and the teacher),
``ptmrec`` (stage 2), and with ``--control`` ``frozen-backbone-kt`` (stage 2 with nothing in the
backbone trained: does a cold-start gain come from the encoders?). Every run chooses its epoch on
the warm valid split; test (warm items) and cold metrics are read at that epoch. Reported: mean
and std per arm, and per-seed paired differences against stage 1 (and PTMRec minus the control)
with a 95 % t interval. Runs are fresh processes, resumable one by one
(``WORK/seed<s>/<arm>/bench.json``). Writes ``OUT/cold_start.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _util import resumable, t_interval, write_result  # noqa: E402
from ml100k import ptmrec  # noqa: E402

METRICS = ("recall@20", "ndcg@20")
SPLITS = ("test", "cold")


def run_arm(work: Path, demo: Path, seed: int, arm: str, fraction: float) -> dict:
    out = work / f"seed{seed}" / arm
    common = [f"seed={seed}", "data.split=random", f"data.split_seed={2026 + seed}",
              f"data.cold_items={fraction}", f"data.cold_seed={seed}"]

    def run() -> dict:
        if arm == "stage1":
            ptmrec("stage1", "--config", demo / "stage1" / "config.yaml", "--out", out,
                   *common, log=out.with_suffix(".log"))
        else:
            extra = ["peft.method=frozen"] if arm == "frozen-backbone-kt" else []
            ptmrec("stage2", "--config", demo / "stage2" / "config.yaml", "--teacher",
                   work / f"seed{seed}" / "stage1", "--out", out, *common, *extra,
                   log=out.with_suffix(".log"))
        return json.loads((out / "metrics.json").read_text())
    return resumable(out, f"seed {seed} {arm}", run)


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    rows = {}
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        row = {"seeds": seeds, "best_epochs": [by_seed[s]["best_epoch"] for s in seeds],
               "wall_s": float(np.mean([by_seed[s]["wall_s"] for s in seeds]))}
        for split in SPLITS:
            for m in METRICS:
                vals = [by_seed[s][split][m] for s in seeds]
                row[f"{split}/{m}"] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
                                       "runs": vals}
        for ref in ("stage1", "frozen-backbone-kt"):
            if arm == ref or ref not in runs:
                continue
            both = [s for s in seeds if s in runs[ref]]
            row[f"minus {ref}"] = {f"{split}/{m}": t_interval(
                [by_seed[s][split][m] - runs[ref][s][split][m] for s in both])
                for split in SPLITS for m in METRICS}
        rows[arm] = row
    return rows


def markdown(rows: dict) -> str:
    def ci(d):
        if d["lo"] is None:
            return f"{d['mean']:+.4f} (n={d['n']})"
        return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] (n={d['n']})"
    cols = [f"{split} {m}" for split in SPLITS for m in METRICS]
    lines = ["| arm | " + " | ".join(cols) + " | seeds | best epochs | time |",
             "|---" * (len(cols) + 4) + "|"]
    for arm, r in rows.items():
        cells = [f"{r[f'{s}/{m}']['mean']:.4f} ± {r[f'{s}/{m}']['std']:.4f}"
                 for s in SPLITS for m in METRICS]
        lines.append(f"| {arm} | " + " | ".join(cells) +
                     f" | {len(r['seeds'])} | {r['best_epochs']} | {r['wall_s']:.0f} s |")
        for key in ("minus stage1", "minus frozen-backbone-kt"):
            if key in r:
                lines.append(f"| {arm} **{key}** | " + " | ".join(
                    ci(r[key][f"{s}/{m}"]) for s in SPLITS for m in METRICS) + " | | | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default=str(ROOT / "out" / "demo"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--control", action="store_true", help="also frozen-backbone-kt")
    ap.add_argument("--work", default=str(ROOT / "out" / "cold_start"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    demo, work = Path(args.demo), Path(args.work)
    for name in ("stage1", "stage2"):
        if not (demo / name / "config.yaml").is_file():
            raise SystemExit(f"{demo / name / 'config.yaml'} is missing: run `make demo` first")
    t0 = time.perf_counter()
    arms = ["stage1", "ptmrec"] + (["frozen-backbone-kt"] if args.control else [])
    runs: dict[str, dict[int, dict]] = {a: {} for a in arms}
    for seed in args.seeds:
        for arm in arms:
            runs[arm][seed] = run_arm(work, demo, seed, arm, args.fraction)
    rows = summarise(runs)
    result = {"demo": str(demo), "fraction": args.fraction, "seeds": args.seeds, "rows": rows,
              "markdown": markdown(rows), "seconds": round(time.perf_counter() - t0, 1)}
    write_result(args.out, "cold_start", result)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
