"""Our evaluator (``eval.metrics.evaluate``) against MMRec's protocol re-implemented as the
reference (``eval.reference.mmrec_evaluate``: batch scoring, dense masking, ``topk``, per-user
membership, its NumPy formulas), side by side on the same inputs: time, peak memory and the
largest metric difference.

    .venv/bin/python bench/eval_reference.py [--sizes baby,1m --threads 2]

Sizes (random 64-d user and item representations, the product's score function for ours, MMRec's
full_sort_predict for the reference, each held-out item nudged towards its user):
``baby`` is Amazon Baby's shape (19,445 users x 7,050 items, 7 training and 1-2 held-out items
per user); ``1m`` is 1,000,000 items x 2,000 users. The reference scores MMRec's default 4,096
users per batch at Baby size; at 1M items that batch would be a 16 GB score matrix, so it gets
``--ref-batch-1m`` (256: 1 GB); ours ranks such a catalog in cache-sized tiles of users x
items (``eval.metrics.chunk_topk_blocked``), at Baby size its default ``eval.memory_mb``
512. Each evaluator runs in a fresh process (its own peak RSS), ``--repeats`` times alternating
(default 3): the times are the medians, every run's time is in the JSON (timings here vary by
up to 1.5x from run to run). Goal (issue 21): ours at least 3x faster, metrics equal to 1e-6.
Prints JSON, writes OUT/eval_reference.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import peak_rss_mb, run_child, timed, write_result  # noqa: E402

SIZES = {"baby": (19_445, 7_050), "1m": (2_000, 1_000_000)}
KS = [5, 10, 20, 50]


def problem(users: int, items: int, dim: int = 64):
    import numpy as np
    import scipy.sparse as sp
    import torch

    rng = np.random.default_rng(0)
    u_rep = torch.from_numpy(rng.standard_normal((users, dim), dtype=np.float32))
    i_rep = torch.from_numpy(rng.standard_normal((items, dim), dtype=np.float32))
    # 7 training items, then 1-2 held-out items (drawn without clashing with them)
    picks = rng.integers(0, items, size=(users, 9))
    n_target = rng.integers(1, 3, size=users)
    rows = np.repeat(np.arange(users), 7)
    train = sp.csr_matrix((np.ones(users * 7, np.float32), (rows, picks[:, :7].ravel())),
                          shape=(users, items))
    train.data[:] = 1.0
    t_rows = np.concatenate([np.full(n, u) for u, n in enumerate(n_target)])
    t_cols = np.concatenate([picks[u, 7:7 + n] for u, n in enumerate(n_target)])
    target = sp.csr_matrix((np.ones(len(t_rows), np.float32), (t_rows, t_cols)),
                           shape=(users, items))
    target.data[:] = 1.0
    target = target - target.multiply(train)
    target.eliminate_zeros()
    # a signal to find: each held-out item leans towards its user (non-zero recall)
    t = target.tocoo()
    i_rep.index_add_(0, torch.from_numpy(t.col.astype(np.int64)),
                     0.5 * u_rep[torch.from_numpy(t.row.astype(np.int64))])
    return (u_rep, i_rep), train.tocsr(), target.tocsr()


def child(size: str, which: str, ref_batch: int, threads: int) -> dict:
    import torch

    from ptmrec_dist.eval.evaluate import score_function
    from ptmrec_dist.eval.metrics import USER_TILE, chunk_size, evaluate, item_block
    from ptmrec_dist.eval.reference import mmrec_evaluate

    torch.set_num_threads(threads)
    users, items = SIZES[size]
    (u_rep, i_rep), train, target = problem(users, items)
    before = peak_rss_mb()
    if which == "ours":      # the product's scoring (eval.evaluate.score_function)
        fn = score_function((u_rep, i_rep))
        metrics, seconds = timed(evaluate, fn, train, target, KS, memory_mb=512)
        tile = item_block(fn, items)     # large catalogs: tiles of USER_TILE users x tile items
        batch = (f"{min(users, USER_TILE)} x {tile} items" if tile
                 else chunk_size(items, 0, 512))
    else:
        # MMRec's full_sort_predict: a fresh score matrix per batch
        metrics, seconds = timed(mmrec_evaluate, lambda u: u_rep[u] @ i_rep.T, train, target,
                                 KS, batch_users=ref_batch)
        batch = ref_batch
    metrics = {k: v for k, v in metrics.items() if k.split("@")[0] in
               ("recall", "precision", "ndcg", "map")}
    return {"size": size, "evaluator": which, "users": users, "items": items,
            "users_per_batch": batch, "seconds": round(seconds, 2),
            "eval_peak_increase_mb": round(peak_rss_mb() - before), "metrics": metrics}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="baby,1m")
    ap.add_argument("--ref-batch-1m", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each evaluator (alternating); times are their medians")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "WHICH"), help=argparse.SUPPRESS)
    ap.add_argument("--ref-batch", type=int, default=4096, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.ref_batch, args.threads)))
        return 0
    rows = []
    for size in args.sizes.split(","):
        ref_batch = args.ref_batch_1m if size == "1m" else 4096
        times: dict[str, list[float]] = {"ours": [], "mmrec": []}
        for _ in range(args.repeats):      # alternating, each a fresh process: the median
            ours = run_child(__file__, size, "ours", "--threads", str(args.threads))
            ref = run_child(__file__, size, "mmrec", "--threads", str(args.threads),
                            "--ref-batch", str(ref_batch))
            times["ours"].append(ours["seconds"])
            times["mmrec"].append(ref["seconds"])
        med = {k: float(np.median(v)) for k, v in times.items()}
        diff = max(abs(ours["metrics"][k] - ref["metrics"][k]) for k in ref["metrics"])
        rows.append({"size": size, "users": ours["users"], "items": ours["items"],
                     "ours_s": med["ours"], "mmrec_s": med["mmrec"],
                     "ours_runs_s": times["ours"], "mmrec_runs_s": times["mmrec"],
                     "speedup": round(med["mmrec"] / med["ours"], 2),
                     "ours_users_per_batch": ours["users_per_batch"],
                     "mmrec_users_per_batch": ref["users_per_batch"],
                     "ours_peak_increase_mb": ours["eval_peak_increase_mb"],
                     "mmrec_peak_increase_mb": ref["eval_peak_increase_mb"],
                     "max_abs_metric_diff": diff,
                     "recall@20": round(ours["metrics"]["recall@20"], 6)})
        print(json.dumps(rows[-1]), flush=True)
    write_result(args.out, "eval_reference", {
        "threads": args.threads, "repeats": args.repeats,
        "goal": {"speedup_min": 3.0, "max_abs_metric_diff": 1e-6}, "runs": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
