"""Full-ranking evaluation at catalog scale: time and peak memory of ``eval.metrics.evaluate``
for U users x I items (random 64-d representations, 10 training and 2 target items per user).

    .venv/bin/python bench/eval_scale.py [--items 1000000 --users 100000 --memory-mb 512]

Each size runs in a fresh process that reports its peak RSS (VmHWM) before and after the
evaluation; the evaluation's own share stays bounded whatever the number of users, because
scores exist for one chunk of users at a time (above ``eval.metrics.BLOCK_ABOVE`` items, one
tile of users x items and each user's running top k). Scoring is the product's
(``eval.evaluate.score_function``, as ``Evaluator``). Prints JSON, writes OUT/eval_scale.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import peak_rss_mb, run_child, timed, write_result  # noqa: E402


def child(items: int, users: int, dim: int, memory_mb: int) -> dict:
    import numpy as np
    import scipy.sparse as sp
    import torch

    from ptmrec_dist.eval.evaluate import score_function
    from ptmrec_dist.eval.metrics import USER_TILE, chunk_size, evaluate, item_block

    rng = np.random.default_rng(0)
    u_rep = torch.from_numpy(rng.standard_normal((users, dim), dtype=np.float32))
    i_rep = torch.from_numpy(rng.standard_normal((items, dim), dtype=np.float32))
    picks = rng.integers(0, items, size=(users, 12))
    rows = np.repeat(np.arange(users), 10)
    train = sp.csr_matrix((np.ones(users * 10, np.float32), (rows, picks[:, :10].ravel())),
                          shape=(users, items))
    rows = np.repeat(np.arange(users), 2)
    target = sp.csr_matrix((np.ones(users * 2, np.float32), (rows, picks[:, 10:].ravel())),
                           shape=(users, items))
    target = target - target.multiply(train)     # no target item is also a training item
    target.eliminate_zeros()
    before = peak_rss_mb()
    fn = score_function((u_rep, i_rep))          # the product's scoring (Evaluator's)
    metrics, seconds = timed(evaluate, fn, train, target, [5, 10, 20, 50], memory_mb=memory_mb)
    after = peak_rss_mb()
    tile = item_block(fn, items)
    return {"items": items, "users": users, "dim": dim, "memory_mb": memory_mb,
            "chunk_users": (f"tiles of {min(users, USER_TILE)} x {tile} items" if tile
                            else chunk_size(items, 0, memory_mb)),
            "seconds": round(seconds, 1),
            "users_per_s": round(users / seconds, 1),
            "peak_rss_before_eval_mb": round(before), "peak_rss_after_eval_mb": round(after),
            "eval_peak_increase_mb": round(after - before),
            "recall@20": round(metrics["recall@20"], 6)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--memory-mb", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.items, args.users, args.dim, args.memory_mb)))
        return 0
    runs = [run_child(__file__, "--items", str(args.items), "--users", str(users), "--dim",
                      str(args.dim), "--memory-mb", str(args.memory_mb))
            for users in sorted({max(1, args.users // 20), args.users})]
    write_result(args.out, "eval_scale", {"runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
