"""FREEDOM's graphs at catalog scale: time and peak memory of the chunked item-item kNN graph
(``rec.graph.knn_graph``) and of one degree-sensitive pruning of a user-item graph, for
``--items`` items with ``--dim``-d random features (the dense items x items similarity matrix
would need items^2 x 4 bytes: 40 GB at 100k items; the chunked build holds 256 MB of it).

    .venv/bin/python bench/graph_scale.py [--items 100000 --dim 128 --edges 10000000]

Each size runs in a fresh process reporting its peak RSS. Prints JSON, writes
OUT/graph_scale.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import peak_rss_mb, run_child, timed, write_result  # noqa: E402


def child(items: int, dim: int, edges: int) -> dict:
    import torch

    from ptmrec_dist.rec import graph

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(items, dim, generator=g)
    base = peak_rss_mb()
    adj, knn_s = timed(graph.knn_graph, feats, k=10)
    knn_peak = peak_rss_mb()
    n_users = max(1, edges // 20)
    users = torch.randint(0, n_users, (edges,), generator=g)
    its = torch.randint(0, items, (edges,), generator=g)
    w = graph.edge_weights(users, its, n_users, items)
    t0 = time.perf_counter()
    keep = graph.degree_sensitive_sample(w, int(edges * 0.2), g)
    pruned = graph.bipartite_adj(users[keep], its[keep], n_users, items)
    prune_s = time.perf_counter() - t0
    return {"items": items, "dim": dim, "knn_k": 10, "knn_nnz": int(adj._nnz()),
            "knn_seconds": round(knn_s, 1), "rss_before_mb": round(base),
            "knn_peak_rss_mb": round(knn_peak),
            "dense_similarity_would_need_mb": round(items * items * 4 / 2**20),
            "edges": edges, "prune_keep": int(edges * 0.2), "prune_seconds": round(prune_s, 2),
            "pruned_nnz": int(pruned._nnz()), "peak_rss_mb": round(peak_rss_mb())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--edges", type=int, default=10_000_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.items, args.dim, args.edges)))
        return 0
    runs = [run_child(__file__, "--items", str(items), "--dim", str(args.dim), "--edges",
                      str(args.edges))
            for items in sorted({max(100, args.items // 10), args.items})]
    write_result(args.out, "graph_scale", {"runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
