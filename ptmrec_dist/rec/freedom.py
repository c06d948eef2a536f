"""``freedom`` (Zhou & Shen, MM 2023; MMRec's implementation): a *frozen* item-item kNN graph
from the modal features plus a user-item graph pruned each epoch by degree-sensitive edge
sampling; LightGCN propagation on the user-item graph; item IDs propagated over the item-item
graph are added to the item side. Loss: BPR + reg_weight x (BPR of the users against the
projected image and text features)."""

from __future__ import annotations

import torch

from ptmrec_dist.rec import graph
from ptmrec_dist.rec.base import Recommender, bpr_loss, modal_tables, terms, xavier_embedding


class FREEDOM(Recommender):
    name = "freedom"
    needs_features = True

    def __init__(self, n_users, n_items, features, config, train):
        super().__init__(n_users, n_items, features, config, train)
        c = config.freedom
        self.c = c
        d = config.embedding_dim
        self.user_embedding = xavier_embedding(n_users, d)
        self.item_id_embedding = xavier_embedding(n_items, d)
        self.modalities = modal_tables(self, features, ("image", "text"),
                                       config.feat_embed_dim, xavier=False)
        # the kNN graphs come from the initial (frozen) features and stay fixed
        adjs = {m: graph.knn_graph(getattr(self, f"{m}_embedding").detach(), c.knn_k)
                for m in self.modalities}
        if len(adjs) == 2:
            mm = c.mm_image_weight * adjs["image"] + (1 - c.mm_image_weight) * adjs["text"]
        else:
            mm = next(iter(adjs.values()))
        # graphs are derived data: buffers that move with the module, never saved
        eu, ei = graph.train_edges(train)
        mm_adj, mm_adj_t = graph.to_csr(mm)          # the kNN graph is not symmetric
        norm_adj = graph.csr(graph.bipartite_adj(eu, ei, n_users, n_items))
        for name, value in (("mm_adj", mm_adj), ("mm_adj_t", mm_adj_t), ("edge_users", eu),
                            ("edge_items", ei),
                            ("edge_w", graph.edge_weights(eu, ei, n_users, n_items)),
                            ("norm_adj", norm_adj), ("masked_adj", norm_adj)):
            self.register_buffer(name, value, persistent=False)

    def item_modal_inputs(self):
        return {m: getattr(self, f"{m}_embedding") for m in self.modalities}

    def pre_epoch(self, epoch, generator):
        if self.c.dropout <= 0:
            self.masked_adj = self.norm_adj
            return
        n_keep = int(self.edge_w.numel() * (1 - self.c.dropout))
        keep = graph.degree_sensitive_sample(self.edge_w, n_keep, generator)
        self.masked_adj = graph.csr(graph.bipartite_adj(
            self.edge_users[keep], self.edge_items[keep], self.n_users, self.n_items))

    def _propagate(self, adj):
        h = self.item_id_embedding
        for _ in range(self.c.n_mm_layers):
            h = graph.spmm(self.mm_adj, h, self.mm_adj_t)
        ego = torch.cat([self.user_embedding, self.item_id_embedding], dim=0)
        out = graph.lightgcn(adj, ego, self.c.n_ui_layers)
        users, items = torch.split(out, [self.n_users, self.n_items])
        return users, items + h

    def representations(self):
        return self._propagate(self.norm_adj)   # the full graph at inference (MMRec)

    def loss(self, batch):
        users_e, items_e = self._propagate(self.masked_adj)
        u = users_e[batch["users"]]
        pos, neg = batch["pos"], batch["neg"]
        mf = bpr_loss((u * items_e[pos]).sum(-1), (u * items_e[neg]).sum(-1), batch)
        modal = torch.zeros(())
        for m in self.modalities:
            trs = getattr(self, f"{m}_trs")
            table = getattr(self, f"{m}_embedding")
            fp, fn = trs(table[pos]), trs(table[neg])   # only the batch's rows are projected
            modal = modal + bpr_loss((u * fp).sum(-1), (u * fn).sum(-1), batch)
        return terms(loss=mf + self.c.reg_weight * modal, bpr=mf, modal_bpr=modal)


MODEL = FREEDOM
