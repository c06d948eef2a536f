"""BPR sampler (ptmrec_dist/train/sampler.py): coverage, negatives, determinism, rank slicing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ptmrec_dist.errors import InputError
from ptmrec_dist.train.sampler import BPRSampler


def make_train(seed=0, n_users=9, n_items=8) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.random((n_users, n_items)) < 0.4
    dense[:, 0] |= ~dense.any(1)                  # every user has a positive
    dense[:, -1] &= ~dense.all(1)                 # and at least one negative
    return sp.csr_matrix(dense.astype(np.float32))


def pairs(train: sp.csr_matrix) -> Counter:
    coo = train.tocoo()
    return Counter(zip(coo.row.tolist(), coo.col.tolist()))


def run_epoch(sampler: BPRSampler, epoch: int) -> list[dict]:
    return list(sampler.epoch(epoch))


def test_each_interaction_once_per_epoch_one_rank():
    train = make_train()
    s = BPRSampler(train, batch_size=5, seed=1)
    n = train.nnz
    assert len(s) == -(-n // 5)
    for epoch in (0, 1, 2):
        batches = run_epoch(s, epoch)
        assert len(batches) == len(s)
        assert [b["step"] for b in batches] == list(range(len(s)))
        got = Counter()
        for b in batches:
            assert b["users"].dtype == b["pos"].dtype == b["neg"].dtype == torch.int64
            got.update(zip(b["users"].tolist(), b["pos"].tolist()))
        assert got == pairs(train)                # each exactly once (Counter: multiplicity)


def test_each_interaction_once_over_three_ranks():
    train = make_train(seed=2)
    got = Counter()
    for rank in range(3):
        for b in BPRSampler(train, batch_size=7, seed=5, rank=rank, world_size=3).epoch(4):
            got.update(zip(b["users"].tolist(), b["pos"].tolist()))
    assert got == pairs(train)


def test_negatives_in_range_and_never_a_positive():
    train = make_train(seed=3, n_users=30, n_items=6)   # dense: redraws happen often
    positives = {u: set(train[u].indices.tolist()) for u in range(train.shape[0])}
    s = BPRSampler(train, batch_size=8, seed=2)
    for epoch in range(5):
        for b in s.epoch(epoch):
            for u, n in zip(b["users"].tolist(), b["neg"].tolist()):
                assert 0 <= n < train.shape[1]
                assert n not in positives[u]


def flat(batches, key):
    return torch.cat([b[key] for b in batches]).tolist()


def test_deterministic_per_seed_and_epoch_dependent():
    train = make_train(seed=4, n_users=20)
    a = run_epoch(BPRSampler(train, 6, seed=9), 3)
    b = run_epoch(BPRSampler(train, 6, seed=9), 3)
    for x, y in zip(a, b, strict=True):
        for key in ("users", "pos", "neg"):
            assert torch.equal(x[key], y[key])
        assert x["denom"] == y["denom"] and x["step"] == y["step"]
        assert torch.equal(torch.rand(4, generator=x["generator"]),
                           torch.rand(4, generator=y["generator"]))
    other_epoch = run_epoch(BPRSampler(train, 6, seed=9), 4)
    assert list(zip(flat(a, "users"), flat(a, "pos"))) != \
        list(zip(flat(other_epoch, "users"), flat(other_epoch, "pos")))
    assert a[0]["generator"].initial_seed() != other_epoch[0]["generator"].initial_seed()
    other_seed = run_epoch(BPRSampler(train, 6, seed=10), 3)
    assert list(zip(flat(a, "users"), flat(a, "pos"))) != \
        list(zip(flat(other_seed, "users"), flat(other_seed, "pos")))


@pytest.mark.parametrize("batch_size", [4, 5, 64])
def test_two_ranks_concatenate_to_one_rank(batch_size):
    train = make_train(seed=6, n_users=15)
    one = run_epoch(BPRSampler(train, batch_size, seed=3), 2)
    r0 = run_epoch(BPRSampler(train, batch_size, seed=3, rank=0, world_size=2), 2)
    r1 = run_epoch(BPRSampler(train, batch_size, seed=3, rank=1, world_size=2), 2)
    assert len(one) == len(r0) == len(r1)
    for full, a, b in zip(one, r0, r1):
        assert a["step"] == b["step"] == full["step"]
        for key in ("users", "pos", "neg"):
            assert torch.equal(torch.cat([a[key], b[key]]), full[key]), key
        assert abs(len(a["users"]) - len(b["users"])) <= 1    # near-equal slices
        # same model randomness on every rank
        assert a["generator"].initial_seed() == b["generator"].initial_seed() \
            == full["generator"].initial_seed()


def test_denom_is_global_batch_over_world_size():
    # exactly 23 interactions: global batches 5, 5, 5, 5, 3
    dense = np.zeros((6, 10), np.float32)
    dense[:5, 2:6] = 1                             # 5 users x 4 items
    dense[5, [1, 7, 9]] = 1                        # + 3
    train = sp.csr_matrix(dense)
    assert train.nnz == 23
    for ws in (1, 2, 3):
        for rank in range(ws):
            batches = run_epoch(BPRSampler(train, 5, seed=0, rank=rank, world_size=ws), 0)
            assert [b["denom"] for b in batches] == pytest.approx(
                [5 / ws, 5 / ws, 5 / ws, 5 / ws, 3 / ws])
    # 3 ranks on the last batch of 3: one interaction each
    last = [run_epoch(BPRSampler(train, 5, seed=0, rank=r, world_size=3), 0)[-1]
            for r in range(3)]
    assert [len(b["users"]) for b in last] == [1, 1, 1]


def test_user_with_every_item_raises_when_negatives_needed():
    dense = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 0]], np.float32)
    train = sp.csr_matrix(dense)
    with pytest.raises(InputError, match="user index 1"):
        BPRSampler(train, 2, seed=0)
    batches = run_epoch(BPRSampler(train, 2, seed=0, negatives=False), 0)
    assert all("neg" not in b for b in batches)
    assert sum(len(b["users"]) for b in batches) == 6


def test_negatives_uniform_over_non_positive_items():
    # 200 users, all with positives {0, 3} out of 6 items: negatives uniform over {1, 2, 4, 5}
    n_users = 200
    dense = np.zeros((n_users, 6), np.float32)
    dense[:, [0, 3]] = 1
    s = BPRSampler(sp.csr_matrix(dense), batch_size=100, seed=123)
    counts = np.zeros(6)
    for epoch in range(40):
        for b in s.epoch(epoch):
            counts += np.bincount(b["neg"].numpy(), minlength=6)
    n = 40 * 2 * n_users
    assert counts.sum() == n
    assert counts[0] == counts[3] == 0
    expected = n / 4
    chi2 = float((((counts[[1, 2, 4, 5]] - expected) ** 2) / expected).sum())
    assert chi2 < 16.27                            # chi-square 3 dof, 99.9% quantile
    # and the direct entry point, per user: a user with 1 positive of 5 items
    dense = np.zeros((2, 5), np.float32)
    dense[0, 2] = dense[1, [0, 1, 3, 4]] = 1
    s = BPRSampler(sp.csr_matrix(dense), batch_size=4, seed=0)
    neg = s.sample_negatives(np.zeros(20000, np.int64), np.random.default_rng(7))
    c = np.bincount(neg, minlength=5)
    assert c[2] == 0
    chi2 = float((((c[[0, 1, 3, 4]] - 5000) ** 2) / 5000).sum())
    assert chi2 < 16.27
    assert set(s.sample_negatives(np.ones(50, np.int64), np.random.default_rng(1))) == {2}
