"""``bm3`` (Zhou et al., WWW 2023, "Bootstrap Latent Representations for Multi-modal
Recommendation"; MMRec's implementation): a LightGCN online network and a shared predictor;
target views are dropout-perturbed, gradient-stopped copies (no negatives sampled). Losses:
user<->item alignment between online and target views, modal-vs-ID alignment and masked modal
reconstruction per modality, and an embedding-norm regulariser."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptmrec_dist.rec import graph
from ptmrec_dist.rec.base import (Recommender, batch_mean, dropout_rows, modal_tables,
                                  tables_to_bank, terms, xavier_embedding)


def _cos_loss(a: torch.Tensor, b: torch.Tensor, batch: dict) -> torch.Tensor:
    return batch_mean(1 - F.cosine_similarity(a, b.detach(), dim=-1), batch)


class BM3(Recommender):
    name = "bm3"
    needs_features = True
    uses_negatives = False

    def __init__(self, n_users, n_items, features, config, train):
        super().__init__(n_users, n_items, features, config, train)
        self.c = config.bm3
        d = config.embedding_dim
        self.user_embedding = xavier_embedding(n_users, d)
        self.item_id_embedding = xavier_embedding(n_items, d)
        self.predictor = nn.Linear(d, d)
        nn.init.xavier_normal_(self.predictor.weight)
        self.modalities = modal_tables(self, features, ("text", "image"),
                                       config.feat_embed_dim, xavier=True)
        eu, ei = graph.train_edges(train)
        self.register_buffer("norm_adj",
                             graph.csr(graph.bipartite_adj(eu, ei, n_users, n_items)),
                             persistent=False)

    def item_modal_inputs(self):
        return {m: getattr(self, f"{m}_embedding") for m in self.modalities}

    @classmethod
    def planned_sizes(cls, n_users, n_items, feature_dim, config, n_interactions=None,
                      n_modalities=2):
        """Users, item IDs, the predictor and the per-item feature tables with their
        projections; buffers: the feature bank and, with ``n_interactions``, the normalised
        user-item graph."""
        dim, feat_dim = config.embedding_dim, config.feat_embed_dim
        trainable = (n_users * dim + n_items * dim + dim * dim + dim
                     + n_modalities * (n_items * feature_dim + feature_dim * feat_dim + feat_dim))
        buffers = n_items * n_modalities * feature_dim * 4             # the feature bank
        if n_interactions is not None:
            buffers += 2 * n_interactions * 12 + (n_users + n_items + 1) * 8   # norm_adj
        return {"trainable": trainable, "buffers_bytes": buffers,
                "graph_layers": config.bm3.n_layers, "repr_dim": dim}

    def _online(self):
        ego = torch.cat([self.user_embedding, self.item_id_embedding], dim=0)
        out = graph.lightgcn(self.norm_adj, ego, self.c.n_layers)
        users, items = torch.split(out, [self.n_users, self.n_items])
        return users, items + self.item_id_embedding

    def representations(self):
        users, items = self._online()
        return self.predictor(users), self.predictor(items)

    def content_representations(self, modal):
        """BM3's modal branch summed over modalities: ``sum_m predictor(trs_m(f_m))``."""
        return sum(self.predictor(getattr(self, f"{m}_trs")(
            modal[m].to(getattr(self, f"{m}_trs").weight.dtype))) for m in self.modalities)

    def set_modal_inputs(self, tables):
        tables_to_bank(self, self.modalities, tables)

    def stage2_scores(self, users, items, modal):
        """BM3 scores (predictor of the online network) for in-batch BPR; the modal head is the
        user's predicted representation against the predicted projected features of each
        modality (BM3's modal branch), weighted by ``cl_weight``; KT aligns that head."""
        u_ori, i_ori = self._online()
        u = self.predictor(u_ori[users])
        scores = u @ self.predictor(i_ori[items]).T
        modal_scores = sum(u @ self.predictor(getattr(self, f"{m}_trs")(modal[m])).T
                           for m in self.modalities)
        reg = (u_ori.norm() + i_ori.norm()) / self.n_items
        return {"bpr": [(1.0, scores), (self.c.cl_weight, modal_scores)],
                "student": modal_scores, "reg": self.c.reg_weight * reg}

    def loss(self, batch):
        users, items, gen = batch["users"], batch["pos"], batch["generator"]
        u_ori, i_ori = self._online()
        with torch.no_grad():   # masks drawn for the whole tables, applied to the batch rows
            u_target = dropout_rows(u_ori[users], users, self.n_users, self.c.dropout, gen)
            i_target = dropout_rows(i_ori[items], items, self.n_items, self.c.dropout, gen)
        u_online = self.predictor(u_ori[users])
        i_online = self.predictor(i_ori[items])
        loss_ui = _cos_loss(u_online, i_target, batch)
        loss_iu = _cos_loss(i_online, u_target, batch)
        modal = torch.zeros(())
        for m in self.modalities:
            # only the batch items' features are projected (MMRec projects the whole table)
            f_online = getattr(self, f"{m}_trs")(getattr(self, f"{m}_embedding")[items])
            with torch.no_grad():
                f_target = dropout_rows(f_online.detach(), items, self.n_items, self.c.dropout, gen)
            f_pred = self.predictor(f_online)
            modal = modal + _cos_loss(f_pred, i_target, batch) + _cos_loss(f_pred, f_target, batch)
        reg = (u_ori.norm() + i_ori.norm()) / self.n_items   # MMRec's EmbLoss on the full tables
        total = loss_ui + loss_iu + self.c.reg_weight * reg + self.c.cl_weight * modal
        return terms(loss=total, align=loss_ui + loss_iu, modal=modal, reg=reg)


MODEL = BM3
