"""``vbpr`` (He & McAuley 2016, MMRec's form): an item is its ID embedding concatenated with a
linear projection of its (frozen) modal features; a user has one embedding of twice the size."""

from __future__ import annotations

import torch
from torch import nn

from ptmrec_dist.rec.base import (Recommender, bpr_loss, l2_reg, modal_tensor, terms,
                                  xavier_embedding)


class VBPR(Recommender):
    name = "vbpr"
    needs_features = True
    row_tables = ("user_embedding", "item_embedding")

    def __init__(self, n_users, n_items, features, config, train):
        super().__init__(n_users, n_items, features, config, train)
        d = config.embedding_dim
        self.reg_weight = config.vbpr.reg_weight
        self.modalities = [m for m in ("text", "image") if features.get(m) is not None]
        for m in self.modalities:   # frozen inputs (not saved); stage 2 swaps in adapted ones
            self.register_buffer(f"{m}_features", modal_tensor(features.get(m)), persistent=False)
        raw_dim = sum(getattr(self, f"{m}_features").shape[1] for m in self.modalities)
        self.user_embedding = xavier_embedding(n_users, 2 * d)
        self.item_embedding = xavier_embedding(n_items, d)
        self.item_linear = nn.Linear(raw_dim, d)
        nn.init.xavier_normal_(self.item_linear.weight)
        nn.init.zeros_(self.item_linear.bias)

    def item_modal_inputs(self):
        return {m: getattr(self, f"{m}_features") for m in self.modalities}

    @classmethod
    def planned_sizes(cls, n_users, n_items, feature_dim, config, n_interactions=None,
                      n_modalities=2):
        """Users ``2d``, items ``d``, item_linear; the (frozen) feature bank is a buffer."""
        dim = config.embedding_dim
        trainable = n_users * 2 * dim + n_items * dim + n_modalities * feature_dim * dim + dim
        feature_bank = n_items * n_modalities * feature_dim * 4        # <m>_features
        return {"trainable": trainable, "buffers_bytes": feature_bank, "graph_layers": 0,
                "repr_dim": 2 * dim}

    def _items(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Item representations (of ``index`` only, if given: a batch projects only its own
        features, not the whole catalog)."""
        feats = [getattr(self, f"{m}_features") for m in self.modalities]
        ids = self.item_embedding
        if index is not None:
            feats, ids = [f[index] for f in feats], self.rows("item_embedding", index)
        content = self.item_linear(torch.cat(feats, dim=1).to(self.item_linear.weight.dtype))
        return torch.cat([ids, content], dim=1)

    def representations(self):
        return self.user_embedding, self._items()

    def content_representations(self, modal):
        """The content half alone (the ID half zero): scores ``user[:, d:] . item_linear(f)``."""
        feats = torch.cat([modal[m] for m in self.modalities], dim=1)
        content = self.item_linear(feats.to(self.item_linear.weight.dtype))
        return torch.cat([content.new_zeros(len(feats), self.item_embedding.shape[1]), content],
                         dim=1)

    def set_modal_inputs(self, tables):
        for m in self.modalities:
            old = getattr(self, f"{m}_features")
            setattr(self, f"{m}_features", tables[m].detach().to(old.device, old.dtype).clone())

    def stage2_scores(self, users, items, modal):
        """BPR on the full scores; the KT student is the content part alone (user's second
        half . projected features), so the teacher's collaborative knowledge is transferred
        into what the features must carry (the full scores start equal to the teacher's)."""
        u = self.user_embedding[users]
        content = self.item_linear(torch.cat([modal[m] for m in self.modalities], dim=1))
        i = torch.cat([self.item_embedding[items], content], dim=1)
        scores = u @ i.T
        reg = ((u ** 2).sum(-1).mean() + (i ** 2).sum(-1).mean()) / 2
        student = u[:, self.item_embedding.shape[1]:] @ content.T
        return {"bpr": [(1.0, scores)], "student": student, "reg": self.reg_weight * reg}

    def loss(self, batch):
        u = self.rows("user_embedding", batch["users"])
        p, n = self._items(batch["pos"]), self._items(batch["neg"])
        mf = bpr_loss((u * p).sum(-1), (u * n).sum(-1), batch)
        reg = l2_reg(batch, u, p, n)
        return terms(loss=mf + self.reg_weight * reg, bpr=mf, reg=reg)


MODEL = VBPR
