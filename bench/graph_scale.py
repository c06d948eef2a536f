"""FREEDOM's graphs at catalog scale: time and peak memory of the chunked item-item kNN graph
(``rec.graph.knn_graph``: exact, chunked, and the approximate faiss build) with its recall@10
against the exact neighbours on 2,000 random items, and of one degree-sensitive pruning of a
user-item graph, for ``--items`` items with ``--dim``-d random features (the dense items x items similarity matrix
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

from _util import peak_rss_mb, run_child, write_result  # noqa: E402


RECALL_QUERIES = 2000


def features(items: int, dim: int, clusters: int, g):
    """Random features: pure Gaussian (``clusters`` 0: the hardest case for an inverted file,
    no structure) or a mixture of ``clusters`` Gaussian centres with noise of half their scale
    (items that resemble groups of others, as content features do)."""
    import torch
    if not clusters:
        return torch.randn(items, dim, generator=g)
    centres = torch.randn(clusters, dim, generator=g)
    return centres[torch.randint(0, clusters, (items,), generator=g)] + \
        0.5 * torch.randn(items, dim, generator=g)


def recall(feats, idx, k: int, g) -> float:
    """Mean overlap of the graph's neighbour sets with the exact k nearest (cosine), on
    RECALL_QUERIES random items: the approximate graph's quality (1.0 for the exact one)."""
    import torch
    import torch.nn.functional as F
    q = torch.randperm(len(feats), generator=g)[:RECALL_QUERIES]
    normed = F.normalize(feats.float(), dim=1)
    step = max(1, 2**27 // len(feats))          # queries per 512 MB of similarities
    exact = torch.cat([torch.topk(normed[q[s:s + step]] @ normed.T, k, dim=1).indices
                       for s in range(0, len(q), step)])
    return float((idx[q].unsqueeze(2) == exact.unsqueeze(1)).any(2).float().mean())


def child(items: int, dim: int, edges: int, method: str, clusters: int) -> dict:
    import torch

    from ptmrec_dist.rec import graph

    g = torch.Generator().manual_seed(0)
    feats = features(items, dim, clusters, g)
    base = peak_rss_mb()
    t0 = time.perf_counter()                # knn_graph's two halves
    idx = graph.knn_indices(feats, k=10, method=method)
    adj = graph.knn_adjacency(idx)
    knn_s = time.perf_counter() - t0
    knn_peak = peak_rss_mb()
    knn_recall = recall(feats, idx, 10, g)
    n_users = max(1, edges // 20)
    users = torch.randint(0, n_users, (edges,), generator=g)
    its = torch.randint(0, items, (edges,), generator=g)
    w = graph.edge_weights(users, its, n_users, items)
    t0 = time.perf_counter()
    keep = graph.degree_sensitive_sample(w, int(edges * 0.2), g)
    pruned = graph.bipartite_adj(users[keep], its[keep], n_users, items)
    prune_s = time.perf_counter() - t0
    return {"items": items, "dim": dim, "clusters": clusters, "knn_k": 10,
            "knn_method": graph.knn_method(method, items), "knn_nnz": int(adj._nnz()),
            "knn_seconds": round(knn_s, 1), "knn_recall_at_10": round(knn_recall, 4),
            "rss_before_mb": round(base),
            "knn_peak_rss_mb": round(knn_peak),
            "dense_similarity_would_need_mb": round(items * items * 4 / 2**20),
            "edges": edges, "prune_keep": int(edges * 0.2), "prune_seconds": round(prune_s, 2),
            "pruned_nnz": int(pruned._nnz()), "peak_rss_mb": round(peak_rss_mb())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--edges", type=int, default=10_000_000)
    ap.add_argument("--methods", default="exact,faiss",
                    help="kNN builds, comma-separated: exact, faiss, auto")
    ap.add_argument("--clusters", default="0,1000",
                    help="feature structures, comma-separated (0: pure Gaussian)")
    ap.add_argument("--exact-max", type=int, default=100_000,
                    help="largest catalog the exact build runs on (n^2 work)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:      # one size, one method, one structure (--methods, --clusters: one each)
        print(json.dumps(child(args.items, args.dim, args.edges, args.methods,
                               int(args.clusters))))
        return 0
    runs = [run_child(__file__, "--items", str(items), "--dim", str(args.dim), "--edges",
                      str(args.edges), "--methods", method, "--clusters", clusters)
            for items in sorted({max(100, args.items // 10), args.items})
            for method in args.methods.split(",") for clusters in args.clusters.split(",")
            if method != "exact" or items <= args.exact_max]
    for r in runs:
        print(f"{r['items']} items, {r['knn_method']}, clusters {r['clusters']}: "
              f"{r['knn_seconds']} s, recall@10 {r['knn_recall_at_10']}, "
              f"peak {r['knn_peak_rss_mb']} MB", flush=True)
    write_result(args.out, "graph_scale", {"runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
