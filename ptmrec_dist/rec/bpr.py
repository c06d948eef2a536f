"""``bpr``: matrix factorisation trained with BPR (Rendle et al. 2009); ID only, no content."""

from __future__ import annotations

from ptmrec_dist.rec.base import Recommender, bpr_loss, l2_reg, terms, xavier_embedding


class BPR(Recommender):
    name = "bpr"
    row_tables = ("user_embedding", "item_embedding")

    def __init__(self, n_users, n_items, features, config, train):
        super().__init__(n_users, n_items, features, config, train)
        self.reg_weight = config.bpr.reg_weight
        self.user_embedding = xavier_embedding(n_users, config.embedding_dim)
        self.item_embedding = xavier_embedding(n_items, config.embedding_dim)

    def representations(self):
        return self.user_embedding, self.item_embedding

    def loss(self, batch):
        u = self.rows("user_embedding", batch["users"])
        p = self.rows("item_embedding", batch["pos"])
        n = self.rows("item_embedding", batch["neg"])
        mf = bpr_loss((u * p).sum(-1), (u * n).sum(-1), batch)
        reg = l2_reg(batch, u, p, n)
        return terms(loss=mf + self.reg_weight * reg, bpr=mf, reg=reg)


MODEL = BPR
