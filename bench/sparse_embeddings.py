"""What ``stage1.sparse_embeddings`` (lazy row-wise Adam over sparse ID-table gradients) costs in
quality and gives in speed, against the default dense Adam: bpr on Amazon Baby (the interactions
of ../shared/data/amazon-baby, its own split), trained to early stopping on valid Recall@20 with
the same settings for both arms, over ``--seeds`` (model initialisation and sampling). Test
Recall@20 / NDCG@20 at the best-valid epoch, mean epoch time, and the paired difference sparse -
dense per seed with a 95 % t interval.

    .venv/bin/python bench/sparse_embeddings.py [--seeds 0 1 2] [--work out/sparse_embeddings]

Resumable run by run (``WORK/<arm>/seed<S>/bench.json``). Prints JSON, writes
OUT/sparse_embeddings.json. The catalog-scale timing (1M items) is bench/scaling.py's
``stage1-epoch-sparse``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import resumable, t_interval, write_result  # noqa: E402
from stage1 import BABY, stage1  # noqa: E402

ARMS = {"dense": [], "sparse": ["stage1.sparse_embeddings=true"]}
METRICS = ("recall@20", "ndcg@20")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default=str(ROOT / "out" / "sparse_embeddings"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("overrides", nargs="*", help="key=value for both arms (e.g. stage1.epochs=5)")
    args = ap.parse_args()
    if not BABY.is_file():
        raise SystemExit(f"{BABY} is missing (the shared data sets are beside the checkout)")
    runs: dict = {arm: {} for arm in ARMS}
    for seed in args.seeds:
        for arm, extra in ARMS.items():
            out = Path(args.work) / arm / f"seed{seed}"

            def run(out=out, extra=extra, seed=seed):
                m = stage1(out / "run", str(BABY), "bpr", None, f"seed={seed}",
                           "stage1.patience=10", *extra, *args.overrides)
                return {k: m[k] for k in ("best_epoch", "epochs_run", "valid", "test",
                                          "epoch_s_mean", "eval_s_mean", "peak_rss_mb")}
            runs[arm][seed] = resumable(out, f"{arm} seed {seed}", run)
    table = {}
    for arm in ARMS:
        rs = [runs[arm][s] for s in args.seeds]
        table[arm] = {**{k: [r["test"][k] for r in rs] for k in METRICS},
                      "best_epochs": [r["best_epoch"] for r in rs],
                      "epoch_s_mean": round(sum(r["epoch_s_mean"] for r in rs) / len(rs), 4)}
    paired = {k: t_interval([runs["sparse"][s]["test"][k] - runs["dense"][s]["test"][k]
                             for s in args.seeds]) for k in METRICS}
    result = {"data": "amazon-baby", "model": "bpr", "seeds": args.seeds,
              "overrides": args.overrides, "table": table, "sparse_minus_dense": paired}
    print(json.dumps(result, indent=1))
    write_result(args.out, "sparse_embeddings", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
