"""Graph builders of the graph recommenders (ptmrec_dist/rec/graph.py) against dense references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ptmrec_dist.rec import graph
from ptmrec_dist.rec.graph import (bipartite_adj, degree_sensitive_sample, knn_graph,
                                   knn_indices, lightgcn)


@pytest.fixture(scope="module")
def features():
    """23 items x 5 features whose cosine similarities are distinct within every row (checked),
    so the top-k is unique and the reference needs no tie rule."""
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(23, 5)))
    normed = x / x.norm(dim=1, keepdim=True)
    sim = (normed @ normed.T).numpy()
    gaps = np.diff(np.sort(sim, axis=1), axis=1)
    assert gaps.min() > 1e-5
    return x.float(), sim


def reference_knn(sim: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_knn_indices_equal_dense_reference(features, chunk, k):
    x, sim = features
    got = knn_indices(x, k, chunk)
    assert got.shape == (23, k) and got.dtype == torch.long
    np.testing.assert_array_equal(got.numpy(), reference_knn(sim, k))
    assert torch.equal(got[:, 0], torch.arange(23))           # itself first (cosine 1)
    # and the dense torch reference named in MMRec
    normed = torch.nn.functional.normalize(x, dim=1)
    assert torch.equal(got, torch.topk(normed @ normed.T, k, dim=1).indices)


def test_knn_indices_k_beyond_items(features):
    x, sim = features
    got = knn_indices(x, 50, chunk=4)
    assert got.shape == (23, 23)
    np.testing.assert_array_equal(got.numpy(), reference_knn(sim, 23))


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_knn_graph_normalised(features, chunk):
    x, sim = features
    k = 4
    g = knn_graph(x, k, chunk)
    assert g.is_sparse and g.shape == (23, 23)
    dense = g.to_dense().double().numpy()
    assert ((dense != 0).sum(1) == k).all()                  # exactly k entries per row
    a = np.zeros((23, 23))
    a[np.repeat(np.arange(23), k), reference_knn(sim, k).ravel()] = 1
    d = a.sum(1) ** -0.5                                     # D: row sums (all k)
    want = d[:, None] * a * d[None, :]
    np.testing.assert_allclose(dense, want, rtol=1e-6)
    np.testing.assert_allclose(dense[dense != 0], 1 / k, rtol=1e-6)


# 3 users x 4 items: u0 {i0, i1}, u1 {i1, i2, i3}, u2 {i1}
USERS = torch.tensor([0, 0, 1, 1, 1, 2])
ITEMS = torch.tensor([0, 1, 1, 2, 3, 1])


def hand_adjacency() -> np.ndarray:
    # deg(u) = 2, 3, 1; deg(i) = 1, 3, 1, 1; weight 1/sqrt(deg u * deg i)
    w = {(0, 0): 1 / math.sqrt(2 * 1), (0, 1): 1 / math.sqrt(2 * 3),
         (1, 1): 1 / math.sqrt(3 * 3), (1, 2): 1 / math.sqrt(3 * 1), (1, 3): 1 / math.sqrt(3 * 1),
         (2, 1): 1 / math.sqrt(1 * 3)}
    a = np.zeros((7, 7))
    for (u, i), v in w.items():
        a[u, 3 + i] = a[3 + i, u] = v                        # [[0, R], [R^T, 0]]
    return a


def test_bipartite_adj_hand_computed():
    adj = bipartite_adj(USERS, ITEMS, 3, 4)
    assert adj.is_sparse and adj.shape == (7, 7)
    dense = adj.to_dense().double().numpy()
    np.testing.assert_allclose(dense, hand_adjacency(), rtol=1e-6, atol=0)
    assert adj._nnz() == 12                                  # 6 edges, both directions


def test_bipartite_adj_isolated_nodes_get_no_entries():
    # user 3 and item 4 have no interaction: their rows and columns stay empty (and finite)
    dense = bipartite_adj(USERS, ITEMS, 4, 5).to_dense().numpy()
    assert dense.shape == (9, 9) and np.isfinite(dense).all()
    assert not dense[3].any() and not dense[:, 3].any()
    assert not dense[4 + 4].any() and not dense[:, 4 + 4].any()


def test_degree_sensitive_sample_distinct_and_reproducible():
    w = torch.tensor([0.5, 1.0, 2.0, 3.0, 1.5, 0.1, 4.0, 2.5, 0.7, 1.2])
    a = degree_sensitive_sample(w, 4, torch.Generator().manual_seed(5))
    b = degree_sensitive_sample(w, 4, torch.Generator().manual_seed(5))
    assert a.shape == (4,) and a.dtype == torch.long
    assert len(set(a.tolist())) == 4 and all(0 <= i < 10 for i in a.tolist())
    assert torch.equal(a, b)
    draws = {tuple(sorted(degree_sensitive_sample(w, 4, torch.Generator().manual_seed(s))
                          .tolist())) for s in range(20)}
    assert len(draws) > 1                                    # the seed matters
    assert sorted(degree_sensitive_sample(w, 10, torch.Generator().manual_seed(0)).tolist()) \
        == list(range(10))


def test_degree_sensitive_sample_prefers_heavy_edges():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = np.zeros(5)
    for _ in range(n):
        counts[degree_sensitive_sample(w, 2, g).numpy()] += 1
    assert counts.sum() == 2 * n                             # 2 distinct per draw
    assert (np.diff(counts) > 0).all(), counts               # monotone in the weight
    # n_keep=1: P(i) = w_i / sum(w), chi-square 4 dof at 99.9% = 18.47
    g = torch.Generator().manual_seed(1)
    counts = np.zeros(5)
    for _ in range(n):
        counts[degree_sensitive_sample(w, 1, g).item()] += 1
    expected = n * w.numpy() / w.sum().item()
    assert float(((counts - expected) ** 2 / expected).sum()) < 18.47
    np.testing.assert_allclose(counts / n, w.numpy() / 15, atol=0.025)


def test_degree_sensitive_sample_zero_weight_never_kept_while_others_remain():
    w = torch.tensor([0.0, 1.0, 0.0, 2.0, 1.0])
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        assert set(degree_sensitive_sample(w, 3, g).tolist()) == {1, 3, 4}


@pytest.mark.parametrize("n_layers", [0, 1, 2, 3])
def test_lightgcn_mean_of_propagated_layers(n_layers):
    adj = bipartite_adj(USERS, ITEMS, 3, 4)
    a = torch.from_numpy(hand_adjacency())
    ego = torch.from_numpy(np.random.default_rng(2).normal(size=(7, 3)))
    layers, e = [ego], ego
    for _ in range(n_layers):
        e = a @ e
        layers.append(e)
    want = sum(layers) / len(layers)                         # mean of [ego, A ego, A^2 ego..]
    got = lightgcn(adj, ego.float(), n_layers)
    assert got.shape == (7, 3)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_spmm_matches_dense_forward_and_backward():
    """The CSR product with a given transpose has the gradient of the dense product, for a
    non-symmetric matrix (FREEDOM's kNN graph) and a symmetric one (the bipartite graph)."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(30, 6, generator=g)
    for adj in (graph.knn_graph(feats, 4),
                graph.bipartite_adj(torch.tensor([0, 0, 1, 2]), torch.tensor([1, 3, 0, 3]), 3, 4)):
        a, a_t = graph.to_csr(adj)
        dense = adj.to_dense()
        x1 = torch.randn(dense.shape[1], 5, generator=g, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_(True)
        w = torch.randn(dense.shape[0], 5, generator=g)
        (graph.spmm(a, x1, a_t) * w).sum().backward()
        (dense @ x2 * w).sum().backward()
        torch.testing.assert_close(graph.spmm(a, x1, a_t), dense @ x1)
        torch.testing.assert_close(x1.grad, x2.grad)
    sym = graph.csr(adj)                     # symmetric: the transpose defaults to itself
    x = torch.randn(7, 2, generator=g)
    torch.testing.assert_close(graph.lightgcn(sym, x, 2), graph.lightgcn(adj, x, 2))


# --------------------------------------------------------------------------- approximate kNN
def _clustered(n: int, dim: int = 16, clusters: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    return centres[torch.randint(0, clusters, (n,), generator=g)] + \
        0.3 * torch.randn(n, dim, generator=g)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().mean())


def test_faiss_knn_finds_the_exact_neighbours_of_structured_features():
    pytest.importorskip("faiss")
    feats = _clustered(3000)
    exact = knn_indices(feats, 10)
    # 11 inverted lists of ~256 items; probing all is exhaustive, probing 3 is approximate
    full = knn_indices(feats, 10, method="faiss", nprobe=1000)
    assert _overlap(full, exact) > 0.999
    approx = knn_indices(feats, 10, method="faiss", nprobe=3)
    assert approx.shape == (3000, 10) and approx.dtype == torch.long
    assert (approx[:, 0] == torch.arange(3000)).all()        # itself first, as the exact graph
    assert _overlap(approx, exact) > 0.95
    assert torch.equal(approx, knn_indices(feats, 10, method="faiss", nprobe=3))   # repeatable
    adj = knn_graph(feats, 10, method="faiss", nprobe=3)
    assert adj._nnz() == 3000 * 10
    # FREEDOM's tables may require grad (and live on a GPU): faiss gets a detached CPU copy
    again = knn_indices(feats.clone().requires_grad_(), 10, method="faiss", nprobe=3)
    assert torch.equal(again, approx) and again.device == feats.device


def test_knn_method_auto_switches_above_the_exact_limit(monkeypatch, caplog):
    pytest.importorskip("faiss")
    assert graph.knn_method("auto", graph.KNN_EXACT_MAX) == "exact"
    assert graph.knn_method("auto", graph.KNN_EXACT_MAX + 1) == "faiss"
    assert graph.knn_method("exact", 10**7) == "exact"
    monkeypatch.setattr(graph, "KNN_EXACT_MAX", 100)
    feats = _clustered(300)
    assert _overlap(knn_indices(feats, 5, method="auto"), knn_indices(feats, 5)) > 0.95
    monkeypatch.setattr(graph, "faiss_available", lambda: False)
    with caplog.at_level("WARNING", logger="ptmrec_dist.rec.graph"):
        assert graph.knn_method("auto", 1000) == "exact"
    assert "faiss-cpu" in caplog.text
    from ptmrec_dist.errors import ConfigError
    with pytest.raises(ConfigError, match="faiss is not installed"):
        graph.knn_method("faiss", 10)


def test_freedom_knn_settings_are_checked():
    from ptmrec_dist.config import Config
    from ptmrec_dist.errors import ConfigError
    cfg = Config()
    cfg.recommender.freedom.knn = "hnsw"
    with pytest.raises(ConfigError, match="recommender.freedom.knn"):
        cfg.validate()
    cfg.recommender.freedom.knn = "faiss"
    cfg.recommender.freedom.knn_nprobe = 0
    with pytest.raises(ConfigError, match="knn_nprobe"):
        cfg.validate()
