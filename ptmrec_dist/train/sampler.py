"""BPR triplets for stage 1, vectorised and independent of the number of ranks.

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

from ptmrec_dist.errors import InputError


def step_seed(seed: int, epoch: int, step: int, stream: int = 0) -> int:
    """One integer for torch generators (numpy takes the tuple directly); ``stream`` separates
    independent uses (0: the batch's model randomness, 1: per-epoch graph pruning)."""
    return int(np.random.SeedSequence([seed, epoch, step, stream]).generate_state(1, np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


class BPRSampler:
    def __init__(self, train: sp.csr_matrix, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, negatives: bool = True):
        train = train.tocsr()
        train.sort_indices()
        self.n_users, self.n_items = train.shape
        self.users = np.repeat(np.arange(self.n_users, dtype=np.int64), np.diff(train.indptr))
        self.items = train.indices.astype(np.int64)
        self.keys = self.users * self.n_items + self.items      # sorted: CSR order
        full = np.flatnonzero(np.diff(train.indptr) >= self.n_items)
        if negatives and len(full):
            raise InputError(None, f"user index {int(full[0])} interacted with every item in "
                                   "training, so no negative can be sampled")
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.negatives = rank, world_size, negatives

    def __len__(self) -> int:
        return -(-len(self.users) // self.batch_size)

    def sample_negatives(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        neg = rng.integers(0, self.n_items, size=len(users))
        todo = np.arange(len(users))
        while len(todo):
            keys = users[todo] * self.n_items + neg[todo]
            pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            todo = todo[self.keys[pos] == keys]          # drew a training positive: redraw
            neg[todo] = rng.integers(0, self.n_items, size=len(todo))
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
                     "generator": torch.Generator().manual_seed(step_seed(self.seed, epoch, step))}
            if neg is not None:
                batch["neg"] = torch.from_numpy(neg[mine])
            yield batch
