"""Full-ranking metrics with MMRec's definitions, chunked over users, no Python loop over users.

For each evaluated user (one with at least one positive in the target split) every item is
scored, the user's training items (and, as a switch, other held-out items) are masked, and the
top ``max(ks)`` items are taken; ties are broken by the lower item index, so the result does not
depend on the chunking or the kernel. With ``hits`` the 0/1 relevance of the ranked list and
``P`` the user's number of positives:

- Recall@K = hits in top K / P;  Precision@K = hits in top K / K;  HitRate@K = [any hit in top K]
- NDCG@K = sum_i hits_i / log2(i + 2) over the top K, divided by the same sum over the first
  min(P, K) positions (the ideal DCG);
- MAP@K = sum_i Precision@i x hits_i over the top K, divided by min(P, K).

Each metric is averaged over the evaluated users. Memory is O(chunk x items): the score matrix of
one chunk of users, never users x items; above :data:`BLOCK_ABOVE` items, with a score function
that offers ``.block``, O(USER_TILE x ITEM_BLOCK) per tile plus each user's running top k
(:func:`chunk_topk_blocked`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from ptmrec_dist.logs import progress

METRICS = ("recall", "ndcg", "precision", "map", "hit")


def topk_items(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, k]`` item indices by descending score, ties by ascending index (deterministic);
    -1 where fewer than k items have a score above -inf (the rest are masked)."""
    n_items = scores.shape[1]
    k = min(k, n_items)
    # one extra place tells whether the k-th score is tied with an item left out
    vals, idx = torch.topk(scores, min(k + 1, n_items), dim=1)
    dev = scores.device
    cut = (torch.nonzero(vals[:, k] == vals[:, k - 1]).squeeze(1) if n_items > k
           else torch.zeros(0, dtype=torch.long, device=dev))
    vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
    if cut.numel():
        # rows where the tie is cut: keep the items above the k-th score, then the
        # lowest-index tied ones
        sub, kth = scores[cut], vals[cut, k - 1:k]
        n_above = (sub > kth).sum(1)
        r, c = torch.nonzero(sub == kth, as_tuple=True)     # row-major: c ascending
        n_tied = torch.bincount(r, minlength=len(cut))
        pos = torch.arange(r.numel(), device=dev) - (torch.cumsum(n_tied, 0) - n_tied)[r]
        take = pos < (k - n_above)[r]
        fixed = idx[cut]
        fixed[r[take], n_above[r[take]] + pos[take]] = c[take]
        idx[cut] = fixed
        vals[cut] = torch.gather(sub, 1, fixed)
    # order by (score desc, index asc): sort by index, then a stable sort by score
    by_index = torch.argsort(idx, dim=1)
    idx, vals = torch.gather(idx, 1, by_index), torch.gather(vals, 1, by_index)
    by_score = torch.sort(vals, dim=1, descending=True, stable=True)
    idx = torch.gather(idx, 1, by_score.indices)
    # masked items (-inf) only fill places when fewer than k items are left: report them as -1
    return idx.masked_fill(by_score.values == -torch.inf, -1)


def _keys(csr: sp.csr_matrix) -> np.ndarray:
    """Sorted ``user * n_items + item`` of every entry (a fast membership index)."""
    csr = csr.tocsr()
    csr.sort_indices()
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    return rows * csr.shape[1] + csr.indices.astype(np.int64)


def hits_matrix(users: np.ndarray, topk: np.ndarray, target_keys: np.ndarray,
                n_items: int) -> np.ndarray:
    """``[n, K]`` bool: is ``topk[u, j]`` a positive of ``users[u]``."""
    keys = users[:, None].astype(np.int64) * n_items + topk.astype(np.int64)
    pos = np.searchsorted(target_keys, keys)
    pos = np.minimum(pos, len(target_keys) - 1)
    return (target_keys[pos] == keys) & (topk >= 0)


def metric_sums(hits: np.ndarray, n_pos: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Per-metric sums over the users of one chunk (divide by the user count for the mean)."""
    return {name: float(rows.sum()) for name, rows in metric_rows(hits, n_pos, ks).items()}


def metric_rows(hits: np.ndarray, n_pos: np.ndarray, ks: list[int]) -> dict[str, np.ndarray]:
    """Per-metric values of each user of one chunk (``[n]`` arrays; paired statistics)."""
    kmax = max(ks)
    hits = hits[:, :kmax]
    if hits.shape[1] < kmax:      # fewer items than K: the missing slots are misses
        hits = np.pad(hits, ((0, 0), (0, kmax - hits.shape[1])))
    hits = hits.astype(np.float64)
    cum = np.cumsum(hits, axis=1)
    disc = 1.0 / np.log2(np.arange(kmax) + 2.0)
    dcg = np.cumsum(hits * disc, axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(disc)])
    prec_at = cum / np.arange(1, kmax + 1)
    ap = np.cumsum(prec_at * hits, axis=1)
    out = {}
    for k in ks:
        h = cum[:, k - 1]
        denom = np.minimum(n_pos, k)
        out[f"recall@{k}"] = h / n_pos
        out[f"precision@{k}"] = h / k
        out[f"hit@{k}"] = (h > 0).astype(np.float64)
        out[f"ndcg@{k}"] = dcg[:, k - 1] / ideal[denom]
        out[f"map@{k}"] = ap[:, k - 1] / denom
    return out


BLOCK_ABOVE = 65536        # catalogs above this many items are ranked a tile at a time
ITEM_BLOCK = 512           # items per tile, USER_TILE users: a tile's scores (4 MB) stay in
USER_TILE = 2048           # cache; measured best of 128-8192 x 512-4096 at 1M items
MERGE_AT = 1.0             # merge a tile's candidates once there are MERGE_AT x k per user
# tiled, a chunk of 8 x USER_TILE users holds only their top k, masks and metrics (memory flat
# in the number of users)


def item_block(score_fn, n_items: int) -> int:
    """Items per tile for ``score_fn`` (0: whole rows): catalogs above :data:`BLOCK_ABOVE`
    items are ranked a tile at a time when the score function offers ``.block``
    (:func:`chunk_topk_blocked`: at 1M items 3.95x MMRec's protocol and 1.8x the previous
    block-wise top-k, ``bench/eval_reference.py``)."""
    return ITEM_BLOCK if n_items > BLOCK_ABOVE and hasattr(score_fn, "block") else 0


def chunk_size(n_items: int, chunk_users: int = 0, memory_mb: int = 512) -> int:
    """Users per chunk: ``chunk_users`` if set, else what fits ``memory_mb`` of score matrix
    (8 bytes per score: the fp32 matrix plus top-k and tie-handling temporaries, measured)."""
    if chunk_users:
        return chunk_users
    return max(1, memory_mb * 2**20 // (n_items * 8))


def chunk_topk(score_fn: Callable[[torch.Tensor], torch.Tensor], users: np.ndarray,
               mask: sp.csr_matrix, k: int) -> torch.Tensor:
    """The ``[n, k]`` top-k of one chunk of ``users`` (:func:`topk_items`), on the device the
    scores are on: ``score_fn`` scores every item, ``mask``'s entries (a CSR matrix) are
    excluded."""
    with torch.no_grad():
        scores = score_fn(torch.from_numpy(users.astype(np.int64))).float()
    sub = mask[users]
    rows = torch.from_numpy(np.repeat(np.arange(len(users)), np.diff(sub.indptr)))
    cols = torch.from_numpy(sub.indices.astype(np.int64))
    scores[rows.to(scores.device), cols.to(scores.device)] = -torch.inf
    return topk_items(scores, k)


def _merge_topk(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """The first ``k`` of each row's candidates by (score desc, item index asc)."""
    by_index = torch.argsort(idx, dim=1)
    idx, vals = torch.gather(idx, 1, by_index), torch.gather(vals, 1, by_index)
    by_score = torch.sort(vals, dim=1, descending=True, stable=True)
    return by_score.values[:, :k], torch.gather(idx, 1, by_score.indices)[:, :k]


class _RunningTopk:
    """Each row's best ``k`` (score desc, index asc) so far, fed with candidate triples (row,
    item, score) in any order; :attr:`kth` (each row's k-th best score, -inf while it has fewer
    than k) only rises, so any item scoring below it can be skipped."""

    def __init__(self, n: int, k: int, n_items: int, device):
        self.k, self.n_items = k, n_items
        self.vals = torch.full((n, k), -torch.inf, device=device)
        self.idx = torch.full((n, k), n_items, dtype=torch.long, device=device)
        self.kth = self.vals[:, -1].clone()
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.n_pending = 0

    def add(self, rows: torch.Tensor, items: torch.Tensor, vals: torch.Tensor) -> None:
        self.pending.append((rows, items, vals))
        self.n_pending += rows.numel()

    def merge(self) -> None:
        if not self.n_pending:
            return
        rows, items, vals = (torch.cat(p) for p in zip(*self.pending))
        self.pending, self.n_pending = [], 0
        touched, rows = torch.unique(rows, return_inverse=True)
        order = torch.argsort(rows, stable=True)
        rows, items, vals = rows[order], items[order], vals[order]
        counts = torch.bincount(rows, minlength=len(touched))
        pos = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0)
                                                                 - counts)[rows]
        width = self.k + int(counts.max())
        cand_v = torch.full((len(touched), width), -torch.inf, device=vals.device)
        cand_i = torch.full((len(touched), width), self.n_items, dtype=torch.long,
                            device=vals.device)
        cand_v[:, :self.k], cand_i[:, :self.k] = self.vals[touched], self.idx[touched]
        cand_v[rows, self.k + pos], cand_i[rows, self.k + pos] = vals, items
        v, i = _merge_topk(cand_v, cand_i, self.k)
        self.vals[touched], self.idx[touched], self.kth[touched] = v, i, v[:, -1]


def _tile_candidates(scores: torch.Tensor, kth: torch.Tensor):
    """``(rows, offsets)`` of the tile's items scoring at least their row's ``kth`` (every
    item that can still enter the row's top k), row-major: offsets ascend within a row. Only
    rows whose best score reaches ``kth`` are compared item by item (after the first tiles,
    few)."""
    rows = torch.nonzero(scores.amax(1) >= kth).squeeze(1)
    if rows.numel() == scores.shape[0]:
        return torch.nonzero(scores >= kth[:, None], as_tuple=True)
    r, offsets = torch.nonzero(scores[rows] >= kth[rows, None], as_tuple=True)
    return rows[r], offsets


def chunk_topk_blocked(block_fn: Callable[[torch.Tensor, int, int], torch.Tensor],
                       users: np.ndarray, mask: sp.csr_matrix, k: int, n_items: int,
                       block: int, with_scores: bool = False):
    """:func:`chunk_topk` scoring tiles of :data:`USER_TILE` users x ``block`` items
    (``block_fn(users, start, stop)`` scores items ``start:stop``), so a tile's scores stay in
    cache and no ``users x n_items`` matrix exists. Each user keeps a running top k
    (:class:`_RunningTopk`) and of a tile only the items scoring at least the running k-th best
    are taken (no top-k per tile). The same lists as :func:`chunk_topk`, ties by the lower
    index: an item of a user's final top k scores at least the final k-th best, which is at
    least the running one, so it is always taken, and candidates are merged by (score desc,
    index asc). ``with_scores``: ``(lists, their scores)`` (-inf where a place is -1)."""
    k = min(k, n_items)
    sub = mask[users].tocoo()
    by_col = np.argsort(sub.col, kind="stable")
    m_rows, m_cols = sub.row[by_col].astype(np.int64), sub.col[by_col].astype(np.int64)
    u_all = torch.from_numpy(users.astype(np.int64))
    out, scores_out = [], []
    with torch.no_grad():
        for t0 in range(0, len(users), USER_TILE):
            u = u_all[t0:t0 + USER_TILE]
            n = len(u)
            in_tile = (m_rows >= t0) & (m_rows < t0 + n)
            t_rows, t_cols = m_rows[in_tile] - t0, m_cols[in_tile]
            state = None
            for start in range(0, n_items, block):
                stop = min(start + block, n_items)
                scores = block_fn(u, start, stop).float()
                dev = scores.device
                if state is None:
                    state = _RunningTopk(n, k, n_items, dev)
                lo, hi = np.searchsorted(t_cols, [start, stop])
                if hi > lo:
                    scores[torch.from_numpy(t_rows[lo:hi]).to(dev),
                           torch.from_numpy(t_cols[lo:hi] - start).to(dev)] = -torch.inf
                rows, offsets = _tile_candidates(scores, state.kth)
                if rows.numel():
                    state.add(rows, offsets + start, scores[rows, offsets])
                if state.n_pending >= MERGE_AT * n * k or stop == n_items:
                    state.merge()
            out.append(state.idx.masked_fill(state.vals == -torch.inf, -1))
            scores_out.append(state.vals)
    return (torch.cat(out), torch.cat(scores_out)) if with_scores else torch.cat(out)


def ranked_chunks(score_fn: Callable[[torch.Tensor], torch.Tensor], users: np.ndarray,
                  mask: sp.csr_matrix, k: int, chunk: int,
                  block: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(users_chunk, topk [n, k])`` per chunk; ``mask`` entries are excluded from ranking.
    ``block`` > 0 (with a ``score_fn.block``): items are scored that many at a time."""
    mask = mask.tocsr()
    n_items = mask.shape[1]
    for start in range(0, len(users), chunk):
        u = users[start:start + chunk]
        top = (chunk_topk_blocked(score_fn.block, u, mask, k, n_items, block) if block
               else chunk_topk(score_fn, u, mask, k))
        yield u, top.cpu().numpy()


def evaluate(score_fn, train: sp.csr_matrix, target: sp.csr_matrix, ks: list[int],
             also_mask: sp.csr_matrix | None = None, chunk: int = 0, memory_mb: int = 512,
             users: np.ndarray | None = None, topk_sink=None, sink_k: int = 0,
             reduce=None, row_sink=None) -> dict[str, float]:
    """Mean metrics over the users with a positive in ``target`` (or the given subset of them:
    ranks pass their share and a ``reduce`` that sums ``[sums..., count]`` over ranks).

    ``score_fn(users LongTensor) -> [n, n_items]``; ``train`` (plus ``also_mask``) is masked.
    ``topk_sink(users, topk)`` receives every chunk's ranked lists (for ``--dump-topk``), at
    least ``sink_k`` places long; ``row_sink(users, {metric: [n] values})`` every chunk's
    per-user metrics (paired statistics).
    """
    n_items = train.shape[1]
    n_pos_all = np.diff(target.tocsr().indptr)
    users = np.flatnonzero(n_pos_all > 0) if users is None else \
        np.asarray(users)[n_pos_all[np.asarray(users, dtype=np.int64)] > 0]   # no positive: skip
    mask = train if also_mask is None else (train + also_mask).tocsr()
    keys = _keys(target)
    kmax = max(max(ks), sink_k if topk_sink is not None else 0)
    totals = {f"{m}@{k}": 0.0 for k in ks for m in METRICS}
    block = item_block(score_fn, n_items)
    per_chunk = chunk or (8 * USER_TILE if block else chunk_size(n_items, 0, memory_mb))
    with progress(total=len(users), desc="evaluate", unit="user", leave=False) as bar:
        for u, top in ranked_chunks(score_fn, users, mask, kmax, per_chunk, block):
            if topk_sink is not None:
                topk_sink(u, top)
            rows = metric_rows(hits_matrix(u, top, keys, n_items), n_pos_all[u], ks)
            if row_sink is not None:
                row_sink(u, rows)
            for name, value in rows.items():
                totals[name] += float(value.sum())
            bar.update(len(u))
    names = list(totals)
    vector = np.array([totals[n] for n in names] + [float(len(users))])
    if reduce is not None:
        vector = reduce(vector)
    count = vector[-1]
    return {n: (float(v / count) if count else 0.0) for n, v in zip(names, vector[:-1])}
