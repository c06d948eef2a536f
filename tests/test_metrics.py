"""Full-ranking metrics (ptmrec_dist/eval/metrics.py) against hand-computed numbers and a
straightforward per-user reference implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ptmrec_dist.eval.metrics import evaluate, hits_matrix, metric_sums, topk_items

L2 = math.log2


def csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(len(rows), n_items))


def fixed_scores(matrix) -> callable:
    s = torch.tensor(matrix, dtype=torch.float32)
    return lambda u: s[u].clone()


# ---------------------------------------------------------------- topk_items: ties and masks

def test_topk_ties_at_boundary_take_lowest_index():
    s = torch.tensor([[1.0, 3, 3, 3, 0]])
    assert topk_items(s, 2).tolist() == [[1, 2]]
    assert topk_items(s, 3).tolist() == [[1, 2, 3]]
    assert topk_items(s, 4).tolist() == [[1, 2, 3, 0]]


def test_topk_mixed_rows_and_ties_inside_topk():
    s = torch.tensor([[1.0, 3, 3, 3, 0],     # tie cut at the boundary -> 1, 2
                      [5.0, 4, 3, 2, 1],     # no tie
                      [0.0, 0, 0, 0, 0],     # everything tied -> 0, 1
                      [0.0, 1, 1, 0, 1],     # three tied at the top -> 1, 2
                      [2.0, 5, 2, 5, 1]])    # tie inside (1, 3) and at the boundary (0, 2)
    assert topk_items(s, 2).tolist() == [[1, 2], [0, 1], [0, 1], [1, 2], [1, 3]]
    assert topk_items(s, 3).tolist() == [[1, 2, 3], [0, 1, 2], [0, 1, 2], [1, 2, 4], [1, 3, 0]]


def test_topk_masked_entries_and_k_beyond_items():
    s = torch.tensor([[-torch.inf, 1.0, -torch.inf, 1.0]])
    assert topk_items(s, 2).tolist() == [[1, 3]]
    assert topk_items(s, 3).tolist() == [[1, 3, -1]]         # masked (-inf) places are -1
    assert topk_items(s, 10).tolist() == [[1, 3, -1, -1]]    # k clipped to the item count


def test_topk_random_ties_match_stable_sort():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(50, 13)).astype(np.float32)
    for k in (1, 3, 6, 13):
        got = topk_items(torch.from_numpy(s), k).numpy()
        want = [sorted(range(13), key=lambda i: (-row[i], i))[:k] for row in s]
        np.testing.assert_array_equal(got, np.array(want))


# ---------------------------------------------------------------- hits_matrix / metric_sums

def test_hits_matrix():
    # 4 items; user 0 positives {2}, user 1 positives {1, 3}: keys 0*4+2, 1*4+1, 1*4+3
    keys = np.array([2, 5, 7])
    users = np.array([0, 1, 2])
    topk = np.array([[0, 2], [1, 3], [0, 3]])                # user 2: key 8 > every key
    assert hits_matrix(users, topk, keys, 4).tolist() == [[False, True], [True, True],
                                                          [False, False]]


def test_metric_sums_one_user_three_positives():
    # ranked relevance 0 1 0 1 1 (max K = 5 columns), P = 3
    hits = np.array([[0, 1, 0, 1, 1]], bool)
    m = metric_sums(hits, np.array([3]), [1, 3, 5])
    idcg3 = 1 + 1 / L2(3) + 1 / L2(4)                        # min(P, K) = 3 positions
    assert m["recall@1"] == m["precision@1"] == m["hit@1"] == m["ndcg@1"] == m["map@1"] == 0
    assert m["recall@3"] == pytest.approx(1 / 3)             # 1 hit / 3 positives
    assert m["precision@3"] == pytest.approx(1 / 3)          # 1 hit / K=3
    assert m["hit@3"] == 1
    assert m["ndcg@3"] == pytest.approx((1 / L2(3)) / idcg3)  # hit at rank 2
    assert m["map@3"] == pytest.approx((1 / 2) / 3)           # P@2 * 1 / min(3, 3)
    assert m["recall@5"] == pytest.approx(1.0)                # 3 hits / 3
    assert m["precision@5"] == pytest.approx(3 / 5)
    assert m["ndcg@5"] == pytest.approx((1 / L2(3) + 1 / L2(5) + 1 / L2(6)) / idcg3)
    assert m["map@5"] == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)   # P@2 + P@4 + P@5


def test_metric_sums_single_positive_and_sum_over_users():
    # user a: only positive at rank 3; user b: positive at rank 1 (P = 1 both), K = 5
    hits = np.array([[0, 0, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
    m = metric_sums(hits, np.array([1, 1]), [5])
    assert m["recall@5"] == pytest.approx(1 + 1)
    assert m["precision@5"] == pytest.approx(1 / 5 + 1 / 5)
    assert m["hit@5"] == 2
    assert m["ndcg@5"] == pytest.approx(1 / L2(4) + 1.0)      # ideal DCG = 1 (one position)
    assert m["map@5"] == pytest.approx(1 / 3 + 1.0)           # P@3 / min(1, 5)


# ---------------------------------------------------------------- evaluate

def test_evaluate_hand_computed():
    scores = [[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]]                # ranking 0 1 2 3 4 5
    target = csr([[1, 3, 4]], 6)
    m = evaluate(fixed_scores(scores), csr([[]], 6), target, [3, 5])
    assert m["recall@3"] == pytest.approx(1 / 3)
    assert m["ndcg@5"] == pytest.approx((1 / L2(3) + 1 / L2(5) + 1 / L2(6))
                                        / (1 + 1 / L2(3) + 1 / L2(4)))
    assert m["map@5"] == pytest.approx(1.6 / 3)
    assert set(m) == {f"{n}@{k}" for n in ("recall", "ndcg", "precision", "map", "hit")
                      for k in (3, 5)}


def test_evaluate_ties_in_scores():
    # scores tie 1,2,3 at 3.0: ranking 1 2 3 0 4; positives {3}, so rank 3 at K >= 3 only
    m = evaluate(fixed_scores([[1.0, 3, 3, 3, 0]]), csr([[]], 5), csr([[3]], 5), [2, 3])
    assert m["hit@2"] == 0 and m["recall@2"] == 0
    assert m["hit@3"] == 1
    assert m["ndcg@3"] == pytest.approx(1 / L2(4))           # 1/log2(3+1) / 1
    assert m["map@3"] == pytest.approx(1 / 3)


def test_k_larger_than_item_count_counts_misses():
    # 3 items, scores rank 2 1 0, positives {0, 2}: relevance 1 0 1 then 2 missing slots
    sink = []
    m = evaluate(fixed_scores([[1.0, 2, 3]]), csr([[]], 3), csr([[0, 2]], 3), [5],
                 topk_sink=lambda u, t: sink.append(t))
    assert sink[0].tolist() == [[2, 1, 0]]
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["precision@5"] == pytest.approx(2 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / L2(4)) / (1 + 1 / L2(3)))   # ideal: 2 slots
    assert m["map@5"] == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_training_items_masked():
    # item 0 is a training item with the top score; after masking the ranking is 1 3 2
    sink = []
    m = evaluate(fixed_scores([[10.0, 5, 1, 3]]), csr([[0]], 4), csr([[1]], 4), [1, 3],
                 topk_sink=lambda u, t: sink.append(t))
    assert sink[0].tolist() == [[1, 3, 2]]
    assert m["hit@1"] == 1 and m["ndcg@1"] == pytest.approx(1.0)
    # the same with item 1 in training too: positive 2 now ranks after 3
    m = evaluate(fixed_scores([[10.0, 5, 1, 3]]), csr([[0, 1]], 4), csr([[2]], 4), [1, 2])
    assert m["hit@1"] == 0 and m["recall@2"] == 1 and m["ndcg@2"] == pytest.approx(1 / L2(3))


def test_also_mask():
    score = fixed_scores([[10.0, 9, 8, 7]])
    train, target = csr([[]], 4), csr([[1, 2]], 4)
    plain = evaluate(score, train, target, [2])
    assert plain["recall@2"] == pytest.approx(1 / 2)         # ranking 0 1: one hit of two
    masked = evaluate(score, train, target, [2], also_mask=csr([[0]], 4))
    assert masked["recall@2"] == pytest.approx(1.0)          # ranking 1 2
    assert masked["map@2"] == pytest.approx(1.0)


def test_users_without_positive_excluded():
    scores = [[3.0, 2, 1], [3.0, 2, 1], [3.0, 2, 1]]
    target = csr([[0], [], [2]], 3)                          # user 1 has nothing to find
    seen = []
    m = evaluate(fixed_scores(scores), csr([[], [], []], 3), target, [1, 3],
                 topk_sink=lambda u, t: seen.extend(u.tolist()))
    assert seen == [0, 2]
    assert m["hit@1"] == pytest.approx(1 / 2)                # (1 + 0) / 2 users
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / L2(4)) / 2)
    assert m["precision@3"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- random vs reference

def random_problem(seed=7, n_users=40, n_items=30, ties=True, train=(0, 6), target_max=6,
                   no_target_every=7):
    """Scores (integers with many ties, or standard normal without), each user's train items
    (``train`` range) and held-out items (1 to ``target_max - 1``; none for one user in
    ``no_target_every``)."""
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, 5, size=(n_users, n_items)) if ties
              else rng.standard_normal((n_users, n_items))).astype(np.float32)
    train_items, target = [], []
    for u in range(n_users):
        perm = rng.permutation(n_items)
        n_tr = rng.integers(*train)
        n_te = 0 if u % no_target_every == no_target_every // 2 else rng.integers(1, target_max)
        train_items.append(sorted(perm[:n_tr].tolist()))
        target.append(sorted(perm[n_tr:n_tr + n_te].tolist()))
    return scores, csr(train_items, n_items), csr(target, n_items), train_items, target


def reference(scores, train, target, ks):
    n_items = scores.shape[1]
    sums, ranked, n = {}, {}, 0
    for u, pos in enumerate(target):
        if not pos:
            continue
        n += 1
        masked = set(train[u])
        order = sorted((i for i in range(n_items) if i not in masked),
                       key=lambda i: (-scores[u, i], i))
        order += [-1] * (n_items - len(order))        # masked places are reported as -1
        ranked[u] = order[:max(ks)]
        for k in ks:
            rel = [1 if (r < len(order) and order[r] in pos) else 0 for r in range(k)]
            hits, m = sum(rel), min(len(pos), k)
            dcg = sum(x / math.log2(r + 2) for r, x in enumerate(rel))
            idcg = sum(1 / math.log2(r + 2) for r in range(m))
            ap = sum(sum(rel[:r + 1]) / (r + 1) * rel[r] for r in range(k))
            for name, v in (("recall", hits / len(pos)), ("precision", hits / k),
                            ("hit", float(hits > 0)), ("ndcg", dcg / idcg), ("map", ap / m)):
                sums[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0.0) + v
    return {key: v / n for key, v in sums.items()}, ranked


KS = [1, 5, 10, 20, 35]     # 35 > 30 items


def test_random_against_reference_and_chunking():
    scores, tr, te, train, target = random_problem()
    want, ranked = reference(scores, train, target, KS)
    results = {}
    for chunk in (0, 1, 2, 3):
        sink = {}

        def collect(u, t):
            for user, row in zip(u.tolist(), t.tolist()):
                assert user not in sink                      # every user exactly once
                sink[user] = row
        results[chunk] = evaluate(fixed_scores(scores), tr, te, KS, chunk=chunk,
                                  topk_sink=collect)
        assert sink == ranked
        for key, v in want.items():
            assert results[chunk][key] == pytest.approx(v, rel=1e-12, abs=1e-12), (chunk, key)
    for chunk in (1, 2, 3):
        for key in want:
            assert results[chunk][key] == pytest.approx(results[0][key], rel=1e-12, abs=1e-15)


def test_memory_mb_chunking_matches():
    scores, tr, te, *_ = random_problem(seed=3)
    a = evaluate(fixed_scores(scores), tr, te, KS)
    b = evaluate(fixed_scores(scores), tr, te, KS, memory_mb=0)   # 1 user per chunk
    assert a == pytest.approx(b, rel=1e-12)


def test_reduce_over_two_halves_equals_all():
    scores, tr, te, *_ = random_problem(seed=11)
    users = np.flatnonzero(np.diff(te.indptr) > 0)
    first, second = users[:len(users) // 2], users[len(users) // 2:]
    captured = []
    evaluate(fixed_scores(scores), tr, te, KS, users=second, chunk=4,
             reduce=lambda v: captured.append(v.copy()) or v)
    assert captured[0][-1] == len(second)                    # the last entry is the count
    halves = evaluate(fixed_scores(scores), tr, te, KS, users=first, chunk=3,
                      reduce=lambda v: v + captured[0])
    whole = evaluate(fixed_scores(scores), tr, te, KS)
    assert set(halves) == set(whole)
    for key in whole:
        assert halves[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-15), key


def test_per_user_rows_average_to_the_metrics():
    """row_sink gets each chunk's per-user values (for paired statistics); their means are the
    reported metrics, whatever the chunking."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(7, 12)).tolist()
    target = csr([[1, 3], [0], [5, 6, 7], [2], [], [11], [4, 9]], 12)
    rows: dict = {}
    users = []

    def sink(u, values):
        users.extend(u.tolist())
        for name, v in values.items():
            rows.setdefault(name, []).extend(v.tolist())
    m = evaluate(fixed_scores(scores), csr([[0]] * 7, 12), target, [2, 5], chunk=3,
                 row_sink=sink)
    assert users == [0, 1, 2, 3, 5, 6]                      # user 4 has no positive
    for name, value in m.items():
        assert np.mean(rows[name]) == pytest.approx(value, abs=1e-12), name


# ---------------------------------------------------------------- MMRec's protocol (reference)

def continuous_problem(seed: int):
    """Scores without ties (MMRec's topk does not break them), train and held-out items."""
    return random_problem(seed, 60, 80, ties=False, train=(1, 10), target_max=25,
                          no_target_every=9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmrec_reference_equals_the_evaluator(seed):
    """eval/reference.py (MMRec's protocol: batches, dense -1e10 masking, topk, per-user
    membership, its NumPy metric formulas) gives what evaluate() gives, and both equal the
    straightforward per-user reference; several users per target, some with more positives than
    K (the capped ideal DCG and MAP denominators), one batch or many."""
    from ptmrec_dist.eval.reference import mmrec_evaluate

    scores, tr, te, train, target = continuous_problem(seed)
    ks = [1, 5, 10, 20]
    ours = evaluate(fixed_scores(scores), tr, te, ks)
    hand, _ = reference(scores, train, target, ks)
    for batch in (4096, 7):
        ref = mmrec_evaluate(fixed_scores(scores), tr, te, ks, batch_users=batch)
        assert set(ref) == {f"{m}@{k}" for m in ("recall", "precision", "ndcg", "map")
                            for k in ks}
        for key, value in ref.items():
            assert value == pytest.approx(ours[key], abs=1e-9), (batch, key)
            assert value == pytest.approx(hand[key], abs=1e-9), (batch, key)
    assert ours["recall@20"] > 0.1                       # not trivially zero


def test_mmrec_reference_detects_a_wrong_ranking():
    """The comparison can fail: the reference on negated scores disagrees with the evaluator."""
    from ptmrec_dist.eval.reference import mmrec_evaluate

    scores, tr, te, *_ = continuous_problem(5)
    ours = evaluate(fixed_scores(scores), tr, te, [10])
    flipped = mmrec_evaluate(fixed_scores(-scores), tr, te, [10])
    assert abs(flipped["ndcg@10"] - ours["ndcg@10"]) > 1e-3


# ---------------------------------------------------------------- item blocks (large catalogs)

def blocked_scores(matrix):
    """fixed_scores with the ``.block`` of eval.evaluate.score_function."""
    s = torch.tensor(matrix, dtype=torch.float32)
    fn = lambda u: s[u].clone()                                        # noqa: E731
    fn.block = lambda u, start, stop: s[u, start:stop].clone()
    return fn


@pytest.mark.parametrize("block,user_tile,merge_at", [(1, 1024, 1.0), (4, 2, 0.0), (7, 5, 1.0),
                                                      (29, 1, 100.0), (12, 4, 0.1),
                                                      (30, 1, 1.0)])
def test_item_blocks_give_the_same_lists_ties_included(monkeypatch, block, user_tile, merge_at):
    """Scoring tiles of users x items (catalogs above metrics.BLOCK_ABOVE), keeping of each tile
    only the items that can still enter a user's running top k, gives exactly the unblocked
    top-k lists, ties by the lower index across tile borders, masked places -1, whenever the
    candidates are merged."""
    import ptmrec_dist.eval.metrics as metrics

    scores, tr, te, train, target = random_problem(seed=11)        # integer scores: many ties
    want, ranked = reference(scores, train, target, KS)
    monkeypatch.setattr(metrics, "ITEM_BLOCK", block)
    monkeypatch.setattr(metrics, "BLOCK_ABOVE", 29)
    monkeypatch.setattr(metrics, "USER_TILE", user_tile)
    monkeypatch.setattr(metrics, "MERGE_AT", merge_at)
    fn = blocked_scores(scores)
    assert metrics.item_block(fn, scores.shape[1]) == block
    assert metrics.item_block(fn, 29) == 0 and metrics.item_block(lambda u: u, 30) == 0
    sink = {}
    got = evaluate(fn, tr, te, KS, chunk=3,
                   topk_sink=lambda u, t: sink.update(zip(u.tolist(), t.tolist())))
    assert sink == ranked
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_blocked_topk_matches_whole_rows_on_a_larger_catalog(monkeypatch):
    """chunk_topk_blocked against chunk_topk on continuous scores, 600 items in tiles of 16
    (the running k-th best prunes most tiles), rows with many masked items included."""
    import ptmrec_dist.eval.metrics as metrics

    rng = np.random.default_rng(3)
    scores = torch.from_numpy(rng.standard_normal((37, 600)).astype(np.float32))
    masked = [sorted(rng.choice(600, size=int(rng.integers(0, 590)), replace=False).tolist())
              for _ in range(37)]
    mask = csr(masked, 600)
    fn = blocked_scores(scores.numpy())
    users = np.arange(37)[::-1].copy()
    monkeypatch.setattr(metrics, "USER_TILE", 8)
    for k in (1, 20, 50):
        want = metrics.chunk_topk(fn, users, mask, k)
        got = metrics.chunk_topk_blocked(fn.block, users, mask, k, 600, 16)
        assert torch.equal(got, want), k


def test_score_function_blocks_and_exclusions():
    """eval.evaluate.score_function: .block scores items start:stop (excluded ones -inf) from
    the same reused buffer; whole rows and blocks agree."""
    from ptmrec_dist.eval.evaluate import score_function

    g = torch.Generator().manual_seed(0)
    users_r, items_r = torch.randn(5, 4, generator=g), torch.randn(9, 4, generator=g)
    exclude = torch.zeros(9, dtype=torch.bool)
    exclude[[2, 7]] = True
    fn = score_function((users_r, items_r), exclude)
    u = torch.tensor([4, 0, 2])
    full = fn(u).clone()
    want = (users_r[u] @ items_r.T).masked_fill(exclude, -torch.inf)
    assert torch.allclose(full, want)
    blocks = torch.cat([fn.block(u, 0, 4).clone(), fn.block(u, 4, 9).clone()], 1)
    assert torch.equal(torch.isinf(blocks), torch.isinf(full))
    assert torch.allclose(blocks[~torch.isinf(full)], full[~torch.isinf(full)], rtol=1e-6)
