"""BPR triplets for stage 1, vectorised and independent of the number of ranks; stage 2's
training users of streamed items (:class:`UserSampler`, :func:`item_batches`).

Each epoch the training interactions are permuted with a generator seeded by ``(seed, epoch)``
and cut into *global* batches; negatives for a whole global batch are drawn with a generator
seeded by ``(seed, epoch, step)`` (uniform over items, redrawn where they hit one of the user's
training positives); rank r takes the r-th of ``world_size`` near-equal slices. So ranks draw
different examples and negatives, and a run on N ranks sees exactly the batches of a run on one.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from ptmrec_dist import seeds
from ptmrec_dist.errors import InputError


class BPRSampler:
    def __init__(self, train: sp.csr_matrix, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, negatives: bool = True,
                 exclude_items: np.ndarray | None = None):
        """``exclude_items``: item indices never drawn as negatives (the held-out items of
        ``data.cold_items``: a cold item must not be seen in training at all)."""
        train = train.tocsr()
        train.sort_indices()
        self.n_users, self.n_items = train.shape
        self.users = np.repeat(np.arange(self.n_users, dtype=np.int64), np.diff(train.indptr))
        self.items = train.indices.astype(np.int64)
        self.keys = self.users * self.n_items + self.items      # sorted: CSR order
        self.candidates = None            # None: every item (the draws of runs without cold items)
        if exclude_items is not None and len(exclude_items):
            keep = np.ones(self.n_items, dtype=bool)
            keep[np.asarray(exclude_items, dtype=np.int64)] = False
            self.candidates = np.flatnonzero(keep)
        n_candidates = self.n_items if self.candidates is None else len(self.candidates)
        full = np.flatnonzero(np.diff(train.indptr) >= n_candidates)
        if negatives and len(full):
            raise InputError(None, f"user index {int(full[0])} interacted with every item in "
                                   "training, so no negative can be sampled")
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.negatives = rank, world_size, negatives

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.candidates is None:
            return rng.integers(0, self.n_items, size=n)
        return self.candidates[rng.integers(0, len(self.candidates), size=n)]

    def __len__(self) -> int:
        return -(-len(self.users) // self.batch_size)

    def sample_negatives(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        neg = self._draw(rng, len(users))
        todo = np.arange(len(users))
        while len(todo):
            keys = users[todo] * self.n_items + neg[todo]
            pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            todo = todo[self.keys[pos] == keys]          # drew a training positive: redraw
            neg[todo] = self._draw(rng, len(todo))
        return neg

    def epoch(self, epoch: int) -> Iterator[dict]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.users))
        for step in range(len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            users, pos = self.users[idx], self.items[idx]
            neg = (self.sample_negatives(users, np.random.default_rng([self.seed, epoch, step]))
                   if self.negatives else None)
            mine = np.array_split(np.arange(len(idx)), self.world_size)[self.rank]
            batch = {"users": torch.from_numpy(users[mine]), "pos": torch.from_numpy(pos[mine]),
                     "denom": len(idx) / self.world_size, "step": step,
                     "generator": torch.Generator().manual_seed(seeds.step_seed(self.seed, epoch, step))}
            if neg is not None:
                batch["neg"] = torch.from_numpy(neg[mine])
            yield batch


class UserSampler:
    """Stage 2: training users of streamed items, uniformly among each item's training users
    (vectorised), and the in-batch masks of known positives."""

    def __init__(self, train: sp.csr_matrix, seed: int):
        self.train = train.tocsr()
        self.by_item = train.T.tocsr()
        self.by_item.sort_indices()
        self.degree = np.diff(self.by_item.indptr)
        self.mean_degree = float(self.degree[self.degree > 0].mean()) if self.degree.any() else 1.0
        self.seed = seed

    def row_weights(self, items: np.ndarray) -> np.ndarray:
        """Importance weights ``degree / mean degree``: with them the item-uniform stream's BPR
        estimates the interaction-uniform BPR of stage 1 (popular items are positives as often
        as in the training data)."""
        return (self.degree[items] / self.mean_degree).astype(np.float32)

    def __call__(self, items: np.ndarray, epoch: int, step: int, rank: int, k: int = 1):
        """``(users [n, k], keep [n])``: ``k`` users per item, drawn with replacement among its
        training users; ``keep`` marks the items that have one (the others get -1)."""
        rng = np.random.default_rng([self.seed, epoch, step, rank, seeds.STAGE2_USERS])
        deg = self.degree[items][:, None]
        keep = deg[:, 0] > 0
        offset = (rng.random((len(items), k)) * np.maximum(deg, 1)).astype(np.int64)
        at = self.by_item.indptr[items][:, None] + np.minimum(offset, np.maximum(deg - 1, 0))
        users = self.by_item.indices[np.minimum(at, max(self.by_item.nnz - 1, 0))]
        return np.where(keep[:, None], users, -1).astype(np.int64), keep

    def known(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``[len(users), len(items)]`` bool: item j is a training positive of user r."""
        return self.train[users][:, items].toarray() > 0


def item_batches(loader, sampler: UserSampler, epoch: int, rank: int, device, weighting: bool,
                 users_per_item: int, first_step: int = 0, loader_start: int = 0):
    """Training batches: the streamed items that have a training user, ``users_per_item`` users
    for each (rows ``r`` of the score matrices; row r's positive is item ``pos[r]``).
    A resumed epoch: the loader starts at batch ``loader_start`` (see
    :meth:`~ptmrec_dist.data.readers.StreamingItems.skip_start`), training at ``first_step``;
    users are drawn per step, so they are those of the uninterrupted epoch."""
    k = users_per_item
    for step, raw in enumerate(loader, start=loader_start):
        if step < first_step:
            continue
        items = raw["index"].numpy()
        users, keep = sampler(items, epoch, step, rank, k)
        weight = 1.0
        if not keep.any():   # still step (the ranks' collectives must match), with no loss
            keep[0], users[0], weight = True, 0, 0.0
        sel = torch.from_numpy(np.flatnonzero(keep))
        users, items = users[keep].reshape(-1), items[keep]
        pos = np.repeat(np.arange(len(items)), k)
        extra = ({"row_weights": torch.from_numpy(sampler.row_weights(items[pos])).to(device)}
                 if weighting else {})
        yield {**extra, "pixel_values": raw["pixel_values"][sel].to(device),
               "input_ids": raw["input_ids"][sel].to(device),
               "attention_mask": raw["attention_mask"][sel].to(device),
               "users": torch.from_numpy(users).to(device),
               "items": torch.from_numpy(items).to(device),
               "pos": torch.from_numpy(pos).to(device),
               "known": torch.from_numpy(sampler.known(users, items)).to(device),
               "weight": weight}
