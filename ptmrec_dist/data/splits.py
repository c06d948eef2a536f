"""Train/valid/test split rules, vectorised (no Python loop over users or interactions).

Labels follow MMRec's ``x_label``: 0 train, 1 valid, 2 test.

MMRec's random per-user rule, as its released splits show it: a user with n interactions gets
``max(1, floor(0.1 n))`` valid and as many test interactions, the rest train (so users with < 10
interactions get n-2/1/1, others about 80/10/10 %). This reproduces the per-user counts of the
Amazon Baby release exactly (tests/test_interactions.py). Users with fewer than 3 interactions keep
them all in train (there is nothing to hold out without leaving train empty).
"""

from __future__ import annotations

import numpy as np

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")
# the interactions of held-out (cold-start) items: neither trained on nor in valid/test
# (``data.cold_items``); never in a file's x_label column
COLD = 3


def holdout_sizes(counts: np.ndarray) -> np.ndarray:
    """Per-user number of valid (= number of test) interactions under MMRec's rule."""
    counts = np.asarray(counts, dtype=np.int64)
    k = np.maximum(1, counts // 10)
    return np.where(counts >= 3, k, 0)


def _rank_within_user(users: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Given interactions sorted by ``order`` (grouped by user), each one's rank in its group."""
    sorted_users = users[order]
    n = len(users)
    starts = np.r_[0, np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1] if n else \
        np.zeros(0, np.int64)
    group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    return rank


def _labels_from_rank_from_end(users: np.ndarray, rank_from_end: np.ndarray,
                               sizes: np.ndarray) -> np.ndarray:
    k = sizes[users]
    labels = np.full(len(users), TRAIN, dtype=np.int8)
    labels[rank_from_end < 2 * k] = VALID
    labels[rank_from_end < k] = TEST
    return labels


def random_split_labels(users: np.ndarray, seed: int) -> np.ndarray:
    """MMRec's random per-user split, seeded. ``users``: user index of each interaction."""
    users = np.asarray(users, dtype=np.int64)
    counts = np.bincount(users, minlength=int(users.max()) + 1 if len(users) else 0)
    keys = np.random.default_rng(seed).random(len(users))
    order = np.lexsort((keys, users))          # by user, then random key
    return _labels_from_rank_from_end(users, _rank_within_user(users, order), holdout_sizes(counts))


def leave_last_out_labels(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Per user (>= 3 interactions): the latest interaction is test, the one before valid.

    Ties in time keep file order (a stable sort), so the split is deterministic.
    """
    users = np.asarray(users, dtype=np.int64)
    counts = np.bincount(users, minlength=int(users.max()) + 1 if len(users) else 0)
    order = np.lexsort((-np.arange(len(users)), -np.asarray(timestamps, dtype=np.float64), users))
    sizes = np.where(counts >= 3, 1, 0)
    return _labels_from_rank_from_end(users, _rank_within_user(users, order), sizes)


def temporal_split_labels(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Per user, MMRec's hold-out sizes (:func:`holdout_sizes`) taken from the end of time: the
    latest ``k`` interactions are test, the ``k`` before them valid, the rest train. Ties in
    time keep file order (a stable sort)."""
    users = np.asarray(users, dtype=np.int64)
    counts = np.bincount(users, minlength=int(users.max()) + 1 if len(users) else 0)
    order = np.lexsort((-np.arange(len(users)), -np.asarray(timestamps, dtype=np.float64), users))
    return _labels_from_rank_from_end(users, _rank_within_user(users, order),
                                      holdout_sizes(counts))


SUBSAMPLE_MIN = 5     # every user keeps at least this many (or all it has), as a 5-core set


def subsample_per_user(users: np.ndarray, fraction: float, seed: int,
                       minimum: int = SUBSAMPLE_MIN) -> np.ndarray:
    """Rows to keep (sorted indices) of a seeded per-user subsample: a user with n interactions
    keeps ``max(min(n, minimum), round(fraction * n))`` of them, chosen uniformly at random
    (``numpy.random.default_rng([seed, SUBSAMPLE])``)."""
    from ptmrec_dist.seeds import SUBSAMPLE

    users = np.asarray(users, dtype=np.int64)
    counts = np.bincount(users, minlength=int(users.max()) + 1 if len(users) else 0)
    sizes = np.maximum(np.minimum(counts, minimum), np.round(fraction * counts).astype(np.int64))
    keys = np.random.default_rng([seed, SUBSAMPLE]).random(len(users))
    order = np.lexsort((keys, users))
    return np.flatnonzero(_rank_within_user(users, order) < sizes[users])


def cold_item_choice(items: np.ndarray, n_items: int, fraction: float, seed: int) -> np.ndarray:
    """The cold-start items (sorted indices): a seeded ``round(fraction * n)`` of the ``n`` items
    that have interactions, drawn uniformly (``numpy.random.default_rng([seed, COLD_ITEMS])``)."""
    from ptmrec_dist.seeds import COLD_ITEMS

    present = np.flatnonzero(np.bincount(np.asarray(items, dtype=np.int64), minlength=n_items))
    n_cold = int(round(fraction * len(present)))
    rng = np.random.default_rng([seed, COLD_ITEMS])
    return np.sort(rng.choice(present, size=n_cold, replace=False)) if n_cold else \
        np.zeros(0, np.int64)
