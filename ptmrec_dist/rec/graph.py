"""Sparse graphs of the graph-based recommenders, built vectorised and without dense n x n
matrices: the item-item kNN graph is computed a chunk of rows at a time (memory O(chunk x items)),
the user-item graph straight from the training CSR."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from ptmrec_dist.errors import ConfigError

KNN_CHUNK_BYTES = 256 * 2**20     # similarity rows scored at once


KNN_EXACT_MAX = 100_000           # knn "auto": exact up to this many items, faiss above
FAISS_LIST_SIZE = 256             # items per inverted list (nlist = n / this, at least 1)
FAISS_TRAIN_PER_LIST = 64         # k-means training points per list (faiss warns below 39)

_log = logging.getLogger(__name__)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def knn_method(method: str, n: int) -> str:
    """``exact`` or ``faiss`` for ``n`` items (``auto``: exact up to KNN_EXACT_MAX, faiss above
    where it is installed, else exact with a warning: its work grows as n^2)."""
    if method == "faiss" and not faiss_available():
        raise ConfigError("recommender.freedom.knn is faiss, but faiss is not installed: "
                          "pip install faiss-cpu (the `scale` extra), or knn=exact")
    if method != "auto":
        return method
    if n <= KNN_EXACT_MAX:
        return "exact"
    if faiss_available():
        return "faiss"
    _log.warning("the item-item kNN graph of %d items is built exactly (n^2 similarities: "
                 "about 50 minutes at 1M items on 2 cores); pip install faiss-cpu for the "
                 "approximate one", n)
    return "exact"


def knn_indices_faiss(normed: torch.Tensor, k: int, nprobe: int) -> torch.Tensor:
    """Approximate ``[n, k]`` cosine kNN from a faiss inverted-file index (exact inner products
    within the ``nprobe`` lists nearest each item, out of ``n / FAISS_LIST_SIZE``). The item
    itself is in its own list, so it is found first, as in the exact graph. k-means is seeded
    (faiss's default seed) on an evenly spaced sample of the items: the same graph every run
    at the same thread count."""
    import faiss

    x = np.ascontiguousarray(normed.detach().cpu().numpy(), dtype=np.float32)   # faiss-cpu
    n, d = x.shape
    nlist = max(1, n // FAISS_LIST_SIZE)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    step = max(1, n // (nlist * FAISS_TRAIN_PER_LIST))
    index.train(x[::step])
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    out = np.empty((n, k), np.int64)
    chunk = 65536
    for start in range(0, n, chunk):
        _, idx = index.search(x[start:start + chunk], k)
        out[start:start + chunk] = idx
    # fewer than k candidates in the probed lists: -1 in faiss; pad with the item itself
    missing = out < 0
    if missing.any():
        out[missing] = np.broadcast_to(np.arange(n)[:, None], out.shape)[missing]
    return torch.from_numpy(out).to(normed.device)     # where the exact graph would be


def knn_indices(features: torch.Tensor, k: int, chunk: int | None = None,
                method: str = "exact", nprobe: int = 16) -> torch.Tensor:
    """``[n, k]`` indices of each item's k most cosine-similar items (itself included, as in
    MMRec). Exact: rows are scored ``chunk`` at a time; ``faiss`` (or ``auto`` above
    KNN_EXACT_MAX items): approximate, :func:`knn_indices_faiss`."""
    n = features.shape[0]
    k = min(k, n)
    normed = F.normalize(features.float(), dim=1)
    if knn_method(method, n) == "faiss":
        return knn_indices_faiss(normed, k, nprobe)
    chunk = chunk or max(1, KNN_CHUNK_BYTES // (4 * n))
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, chunk):
        sim = normed[start:start + chunk] @ normed.T
        out[start:start + chunk] = torch.topk(sim, k, dim=1).indices
    return out


def sym_normalize(rows: torch.Tensor, cols: torch.Tensor, n: int) -> torch.Tensor:
    """Values of D^-1/2 A D^-1/2 for the 0/1 matrix with entries (rows, cols), D from row sums
    (MMRec's ``compute_normalized_laplacian``)."""
    deg = torch.bincount(rows, minlength=n).float() + 1e-7
    inv = deg.pow(-0.5)
    return inv[rows] * inv[cols]


def knn_graph(features: torch.Tensor, k: int, chunk: int | None = None, method: str = "exact",
              nprobe: int = 16) -> torch.Tensor:
    """Sparse ``[n, n]`` normalised kNN adjacency of the items (FREEDOM's frozen graph)."""
    return knn_adjacency(knn_indices(features, k, chunk, method=method, nprobe=nprobe))


def knn_adjacency(idx: torch.Tensor) -> torch.Tensor:
    """The normalised sparse adjacency of :func:`knn_graph` from its ``[n, k]`` neighbours."""
    n, k = idx.shape
    rows = torch.arange(n).repeat_interleave(k)
    cols = idx.reshape(-1)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), sym_normalize(rows, cols, n),
                                   (n, n), check_invariants=False).coalesce()


def train_edges(train: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    coo = train.tocoo()
    return (torch.from_numpy(coo.row.astype(np.int64)),
            torch.from_numpy(coo.col.astype(np.int64)))


def edge_weights(users: torch.Tensor, items: torch.Tensor, n_users: int,
                 n_items: int) -> torch.Tensor:
    """1 / sqrt(deg(u) deg(i)) per edge: the symmetric normalisation of the bipartite graph."""
    du = torch.bincount(users, minlength=n_users).float() + 1e-7
    di = torch.bincount(items, minlength=n_items).float() + 1e-7
    return du.pow(-0.5)[users] * di.pow(-0.5)[items]


def bipartite_adj(users: torch.Tensor, items: torch.Tensor, n_users: int,
                  n_items: int) -> torch.Tensor:
    """Sparse ``[(U+I), (U+I)]`` normalised adjacency ``[[0, R], [R^T, 0]]`` (LightGCN)."""
    w = edge_weights(users, items, n_users, n_items)
    rows = torch.cat([users, items + n_users])
    cols = torch.cat([items + n_users, users])
    n = n_users + n_items
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.cat([w, w]),
                                   (n, n), check_invariants=False).coalesce()


def degree_sensitive_sample(weights: torch.Tensor, n_keep: int,
                            generator: torch.Generator) -> torch.Tensor:
    """Indices of ``n_keep`` edges drawn without replacement with probability proportional to
    ``weights`` (FREEDOM's pruning; MMRec uses torch.multinomial, which stops at 2^24 categories).
    Exponential keys E/w, smallest first, give the same distribution for any number of edges."""
    u = torch.rand(weights.shape, generator=generator).to(weights.device)
    keys = -torch.log(u.clamp_min(1e-12)) / weights
    return torch.topk(keys, n_keep, largest=False).indices


class _SpMM(torch.autograd.Function):
    """``A @ X`` with a CSR ``A`` whose transpose is given: the backward is ``A^T @ G``, one more
    sparse product, where torch's generic sparse backward rebuilds and coalesces a transpose
    every step (about 3x slower end to end on FREEDOM, measured)."""

    @staticmethod
    def forward(ctx, a, a_t, x):
        ctx.a_t = a_t
        return a @ x

    @staticmethod
    def backward(ctx, grad):
        return None, None, ctx.a_t @ grad


def propagation_dtype(a: torch.Tensor) -> torch.dtype:
    """The dtype sparse products run in: the graph's, at least fp32 (torch's sparse kernels
    have no bf16 on CPU, and sums over many neighbours lose too much in bf16)."""
    return torch.promote_types(a.dtype, torch.float32)


def _in(dtype: torch.dtype, t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def spmm(a: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse (CSR) @ dense with a cheap backward; ``a_t`` defaults to ``a`` (symmetric).

    The product runs in :func:`propagation_dtype` (fp32) and comes back in ``x``'s dtype: under
    bf16 / fp16 (DeepSpeed casts the parameters, the graphs stay fp32) autograd carries the
    gradient through both casts. For fp32 inputs every cast is a no-op."""
    dtype = propagation_dtype(a)
    a, a_t = _in(dtype, a), _in(dtype, a if a_t is None else a_t)
    return _SpMM.apply(a, a_t, _in(dtype, x)).to(x.dtype)


def csr(adj: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():     # "CSR support is in beta": the parts used here are not
        warnings.simplefilter("ignore", UserWarning)
        return adj.coalesce().to_sparse_csr()


def to_csr(adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, A^T)`` as CSR tensors, for :func:`spmm`."""
    return csr(adj), csr(adj.coalesce().t())


def propagate(a: torch.Tensor, x: torch.Tensor, n_layers: int,
              a_t: torch.Tensor | None = None) -> torch.Tensor:
    """``A^n_layers x`` (CSR ``a``, transpose ``a_t``), every layer in :func:`propagation_dtype`,
    returned in ``x``'s dtype (FREEDOM's item-item propagation)."""
    h = _in(propagation_dtype(a), x)
    for _ in range(n_layers):
        h = spmm(a, h, a_t)
    return h.to(x.dtype)


def lightgcn(adj: torch.Tensor, ego: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Mean of the layer outputs ``[ego, A ego, A^2 ego, ...]`` for a symmetric ``adj`` (CSR
    or COO). Layers and mean run in :func:`propagation_dtype`; the result is in ``ego``'s
    dtype."""
    dtype = propagation_dtype(adj)
    adj, h = _in(dtype, adj), _in(dtype, ego)
    layers = [h]
    for _ in range(n_layers):
        h = spmm(adj, h) if adj.layout == torch.sparse_csr else torch.sparse.mm(adj, h)
        layers.append(h)
    return torch.stack(layers, dim=1).mean(dim=1).to(ego.dtype)
