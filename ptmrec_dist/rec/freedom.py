"""``freedom`` (Zhou & Shen, MM 2023; MMRec's implementation): a *frozen* item-item kNN graph
from the modal features plus a user-item graph pruned each epoch by degree-sensitive edge
sampling; LightGCN propagation on the user-item graph; item IDs propagated over the item-item
graph are added to the item side. Loss: BPR + reg_weight x (BPR of the users against the
projected image and text features)."""

from __future__ import annotations

import torch

from ptmrec_dist.rec import graph
from ptmrec_dist.rec.base import (Recommender, bpr_loss, modal_tables, tables_to_bank, terms,
                                  xavier_embedding)


class FREEDOM(Recommender):
    name = "freedom"
    needs_features = True
    derives_from_features = True     # the item-item kNN graph

    def __init__(self, n_users, n_items, features, config, train):
        super().__init__(n_users, n_items, features, config, train)
        c = config.freedom
        self.c = c
        d = config.embedding_dim
        self.user_embedding = xavier_embedding(n_users, d)
        self.item_id_embedding = xavier_embedding(n_items, d)
        self.modalities = modal_tables(self, features, ("image", "text"),
                                       config.feat_embed_dim, xavier=False)
        # the kNN graphs come from the initial (frozen) features and stay fixed in stage 1
        mm_adj, mm_adj_t = self._mm_graph({m: getattr(self, f"{m}_embedding").detach()
                                           for m in self.modalities})
        # graphs are derived data: buffers that move with the module, never saved
        eu, ei = graph.train_edges(train)
        norm_adj = graph.csr(graph.bipartite_adj(eu, ei, n_users, n_items))
        for name, value in (("mm_adj", mm_adj), ("mm_adj_t", mm_adj_t), ("edge_users", eu),
                            ("edge_items", ei),
                            ("edge_w", graph.edge_weights(eu, ei, n_users, n_items)),
                            ("norm_adj", norm_adj), ("masked_adj", norm_adj)):
            self.register_buffer(name, value, persistent=False)

    def _mm_graph(self, tables):
        c = self.c
        adjs = {m: graph.knn_graph(t, c.knn_k, method=c.knn, nprobe=c.knn_nprobe)
                for m, t in tables.items()}
        if len(adjs) == 2:
            mm = c.mm_image_weight * adjs["image"] + (1 - c.mm_image_weight) * adjs["text"]
        else:
            mm = next(iter(adjs.values()))
        return graph.to_csr(mm)          # the kNN graph is not symmetric: (A, A^T)

    def item_modal_inputs(self):
        return {m: getattr(self, f"{m}_embedding") for m in self.modalities}

    @classmethod
    def planned_sizes(cls, n_users, n_items, feature_dim, config, n_interactions=None,
                      n_modalities=2):
        """Users, item IDs and the per-item feature tables with their projections (parameters
        when the engine is built); buffers: the feature bank and, with ``n_interactions``, the
        user-item graph (full and pruned), its edge lists and the item-item kNN graph."""
        dim, feat_dim, freedom_cfg = config.embedding_dim, config.feat_embed_dim, config.freedom
        trainable = (n_users * dim + n_items * dim
                     + n_modalities * (n_items * feature_dim + feature_dim * feat_dim + feat_dim))
        buffers = n_items * n_modalities * feature_dim * 4             # the feature bank
        if n_interactions is not None:
            edges, nodes = n_interactions, n_users + n_items

            def csr(nnz, rows):                        # fp32 values, int64 columns and rows
                return nnz * 12 + (rows + 1) * 8
            kept = int(2 * edges * (1 - freedom_cfg.dropout))     # after edge pruning
            buffers += csr(2 * edges, nodes) + csr(kept, nodes)    # norm_adj, masked_adj
            buffers += edges * (8 + 8 + 4)             # edge_users, edge_items, edge_w
            buffers += 2 * csr(n_items * freedom_cfg.knn_k, n_items)     # mm_adj, mm_adj_t
        return {"trainable": trainable, "buffers_bytes": buffers,
                "graph_layers": freedom_cfg.n_ui_layers, "repr_dim": dim}

    def set_modal_inputs(self, tables):
        """Stage 2: the feature tables become the (untrained) feature bank, and the item-item
        graph is rebuilt from it, so the adapted features reach the ranking through the graph."""
        tables_to_bank(self, self.modalities, tables)
        self.rebuild_derived()

    def rebuild_derived(self):
        """The item-item kNN graph from the feature bank as it is now."""
        device = self.mm_adj.device
        self.mm_adj, self.mm_adj_t = (a.to(device) for a in self._mm_graph(
            {m: getattr(self, f"{m}_embedding") for m in self.modalities}))

    def stage2_scores(self, users, items, modal):
        """Ranking scores come from the graphs (features shape them through the kNN graph);
        the feature-dependent head is FREEDOM's modal BPR term, u . trs_m(f_m), which the KT
        loss aligns with the teacher."""
        users_e, items_e = self._propagate(self.masked_adj)
        u = users_e[users]
        graph_scores = u @ items_e[items].T
        modal_scores = sum(u @ getattr(self, f"{m}_trs")(modal[m]).T for m in self.modalities)
        return {"bpr": [(1.0, graph_scores), (self.c.reg_weight, modal_scores)],
                "student": modal_scores, "reg": graph_scores.new_zeros(())}

    def pre_epoch(self, epoch, generator):
        if self.c.dropout <= 0:
            self.masked_adj = self.norm_adj
            return
        n_keep = int(self.edge_w.numel() * (1 - self.c.dropout))
        keep = graph.degree_sensitive_sample(self.edge_w, n_keep, generator)
        self.masked_adj = graph.csr(graph.bipartite_adj(
            self.edge_users[keep], self.edge_items[keep], self.n_users, self.n_items))

    def _propagate(self, adj):
        h = graph.propagate(self.mm_adj, self.item_id_embedding, self.c.n_mm_layers,
                            self.mm_adj_t)
        ego = torch.cat([self.user_embedding, self.item_id_embedding], dim=0)
        out = graph.lightgcn(adj, ego, self.c.n_ui_layers)
        users, items = torch.split(out, [self.n_users, self.n_items])
        return users, items + h

    def representations(self):
        return self._propagate(self.norm_adj)   # the full graph at inference (MMRec)

    def content_representations(self, modal):
        """FREEDOM's modal head summed over modalities: scores ``u . sum_m trs_m(f_m)``."""
        return sum(getattr(self, f"{m}_trs")(modal[m].to(getattr(self, f"{m}_trs").weight.dtype))
                   for m in self.modalities)

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
