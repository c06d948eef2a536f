"""MMRec's evaluation protocol, re-implemented here from its documented behaviour as the
**reference** that :mod:`ptmrec_dist.eval.metrics` is checked and timed against (tests and
``bench/eval_reference.py``). Not used by any command: it is slower by design, being faithful.

What MMRec does (``Trainer.evaluate`` with ``TopKEvaluator``), step by step:

1. users with at least one item in the evaluated split, in user order, in batches of
   ``eval_batch_size`` users (MMRec's default 4096);
2. per batch, the model scores **every** item (a dense ``[batch, items]`` matrix); the batch's
   training items are set to ``-1e10`` through (row, column) index lists (dense masking);
3. ``torch.topk(scores, max(topk))`` per batch; the indices of all batches are concatenated;
4. the 0/1 relevance matrix is built **per user** in Python: for each user, for each of the
   top-K items, ``item in positives`` where positives are the user's held-out items as a NumPy
   array (as MMRec's eval data loader keeps them);
5. the metrics are NumPy over that matrix: Recall = cumulative hits / positives; Precision =
   cumulative hits / rank; NDCG with the ideal DCG capped, per row, at min(positives, K) places
   (a Python loop over users); MAP = cumulative Precision x hit over min(positives, K) places
   (a Python loop over users); each averaged over users at each K.

Ties in ``torch.topk`` follow the kernel (MMRec does not break them); on continuous scores the
two evaluators agree to rounding (``tests/test_metrics.py``). MMRec rounds the printed means to
four places; this returns them unrounded.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

MMREC_EVAL_BATCH = 4096      # MMRec's eval_batch_size default
MASK_VALUE = -1e10           # what MMRec writes into the scores of masked items


def _recall(hits: np.ndarray, pos_len: np.ndarray) -> np.ndarray:
    return np.cumsum(hits, axis=1) / pos_len.reshape(-1, 1)


def _precision(hits: np.ndarray, pos_len: np.ndarray) -> np.ndarray:
    return hits.cumsum(axis=1) / np.arange(1, hits.shape[1] + 1)


def _ndcg(hits: np.ndarray, pos_len: np.ndarray) -> np.ndarray:
    n = hits.shape[1]
    idcg_len = np.minimum(pos_len, n)
    ranks = np.tile(np.arange(1, n + 1, dtype=np.float64), (len(hits), 1))
    idcg = np.cumsum(1.0 / np.log2(ranks + 1), axis=1)
    for row, length in enumerate(idcg_len):         # the ideal DCG stops growing at min(P, K)
        idcg[row, length:] = idcg[row, length - 1]
    dcg = np.cumsum(np.where(hits, 1.0 / np.log2(ranks + 1), 0.0), axis=1)
    return dcg / idcg


def _map(hits: np.ndarray, pos_len: np.ndarray) -> np.ndarray:
    n = hits.shape[1]
    precision = hits.cumsum(axis=1) / np.arange(1, n + 1)
    sum_precision = np.cumsum(precision * hits, axis=1)
    actual_len = np.minimum(pos_len, n)
    out = np.zeros_like(sum_precision, dtype=np.float64)
    for row, length in enumerate(actual_len):        # divide by min(P, rank)
        ranges = np.arange(1, n + 1)
        ranges[length:] = ranges[length - 1]
        out[row] = sum_precision[row] / ranges
    return out


METRIC_FUNCS = {"recall": _recall, "precision": _precision, "ndcg": _ndcg, "map": _map}


def mmrec_evaluate(score_fn: Callable[[torch.Tensor], torch.Tensor], train: sp.csr_matrix,
                   target: sp.csr_matrix, ks: list[int],
                   batch_users: int = MMREC_EVAL_BATCH) -> dict[str, float]:
    """Mean ``recall``/``precision``/``ndcg``/``map`` at each K, as MMRec computes them
    (see the module text). ``score_fn(users LongTensor) -> [n, n_items]``."""
    train, target = train.tocsr(), target.tocsr()
    pos_len_all = np.diff(target.indptr)
    users = np.flatnonzero(pos_len_all > 0)
    # the eval loader's per-user held-out items (NumPy arrays) and the masking index lists
    pos_items = [target.indices[target.indptr[u]:target.indptr[u + 1]] for u in users]
    kmax = max(ks)
    batches = []
    for start in range(0, len(users), batch_users):
        u = users[start:start + batch_users]
        with torch.no_grad():
            scores = score_fn(torch.from_numpy(u.astype(np.int64))).float()
        sub = train[u]
        rows = torch.from_numpy(np.repeat(np.arange(len(u)), np.diff(sub.indptr)))
        cols = torch.from_numpy(sub.indices.astype(np.int64))
        scores[rows, cols] = MASK_VALUE
        _, top = torch.topk(scores, kmax, dim=-1)
        batches.append(top)
    topk_index = torch.cat(batches, dim=0).cpu().numpy()
    bool_rec = np.asarray([[True if i in m else False for i in n]
                           for m, n in zip(pos_items, topk_index)])
    pos_len = pos_len_all[users]
    out = {}
    for name, fn in METRIC_FUNCS.items():
        per_user = fn(bool_rec, pos_len).mean(axis=0)
        for k in ks:
            out[f"{name}@{k}"] = float(per_user[k - 1])
    return out
