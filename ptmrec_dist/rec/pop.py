"""``pop``: rank items by their number of training interactions (the same list for everyone)."""

from __future__ import annotations

import numpy as np
import torch

from ptmrec_dist.rec.base import Recommender


class Pop(Recommender):
    name = "pop"
    trainable = False

    def __init__(self, n_users, n_items, features, config, train):
        super().__init__(n_users, n_items, features, config, train)
        counts = np.asarray(train.sum(axis=0), dtype=np.float32).ravel()
        self.register_buffer("popularity", torch.from_numpy(counts))

    def representations(self):
        return torch.ones(self.n_users, 1), self.popularity[:, None]

    def loss(self, batch):
        raise RuntimeError("pop has nothing to train")


MODEL = Pop
