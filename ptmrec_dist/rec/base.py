"""The interface every base recommender implements, and the pieces several share.

``Recommender(n_users, n_items, features, config, train)``: ``features`` is an
:class:`~ptmrec_dist.rec.features.ItemFeatures` (``image``/``text`` arrays or None), ``config`` the
``recommender`` section, ``train`` the training CSR matrix (graph models build their user-item
graph from it; ``pop`` counts it).

Training batches are dicts with ``users``, ``pos`` and (when ``uses_negatives``) ``neg`` index
tensors, ``denom`` (the divisor that turns per-example sums into the *global* batch mean, so that
averaging gradients over ranks gives the same update as one rank with the whole batch) and
``generator`` (a torch.Generator seeded by (seed, epoch, step), the same on every rank: any
randomness over shared tables, e.g. BM3's dropout, must come from it).

Scores are always ``user_repr @ item_repr.T`` of :meth:`representations`; ``full_scores`` and
``forward`` are derived from it, and stage 1 exports both matrices as the teacher of stage 2.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn


class Recommender(nn.Module):
    name = "base"
    needs_features = False      # requires image and/or text features
    uses_negatives = True       # the sampler draws one negative per (user, positive)
    trainable = True            # False: nothing to learn (pop)
    # the ID tables a batch reads row by row (stage1.sparse_embeddings: sparse gradients for
    # these, train/sparse_adam.py); empty: the model reads its tables whole (graph models)
    row_tables: tuple[str, ...] = ()
    sparse_rows = False         # set by stage 1: rows() gives sparse gradients
    # derives structure from the modal features (FREEDOM's item-item kNN graph): stage 2 can
    # rebuild it from the feature bank between re-extractions (stage2.graph_refresh_every)
    derives_from_features = False

    def __init__(self, n_users: int, n_items: int, features, config, train: sp.csr_matrix):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the table ``name`` (one of :attr:`row_tables`): with
        :attr:`sparse_rows`, through ``F.embedding(sparse=True)`` so that the table's gradient
        holds the touched rows only; else plain indexing (the same values and dense gradient)."""
        table = getattr(self, name)
        if self.sparse_rows and self.training and torch.is_grad_enabled():
            return F.embedding(index, table, sparse=True)
        return table[index]

    # ------------------------------------------------------------------ the interface
    def pre_epoch(self, epoch: int, generator: torch.Generator) -> None:
        """Per-epoch set-up (FREEDOM prunes its user-item graph here)."""

    def representations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(users [n_users, d], items [n_items, d])`` with scores = users @ items.T."""
        raise NotImplementedError

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """``{"loss": total, <term>: value, ...}`` for one batch (terms are detached copies)."""
        raise NotImplementedError

    def item_modal_inputs(self) -> dict[str, torch.Tensor]:
        """The per-item modal inputs (``image``/``text`` tables) that stage 2 replaces with
        adapted CLIP features; empty for ID-only models."""
        return {}

    def content_representations(self, modal: dict[str, torch.Tensor]) -> torch.Tensor:
        """Item representations ``[n, d]`` from modal inputs alone (``{m: [n, d_m]}``; no ID
        embedding, no interaction graph), scored against the users of
        :meth:`representations`: how the model scores an item it never trained on (cold start:
        ``data.cold_items``, ``ptmrec encode-items``). It is the head stage 2's KT aligns
        (:meth:`stage2_scores`' ``student``)."""
        raise NotImplementedError(f"{self.name} cannot score an item it never trained on (it "
                                  "reads no item features)")

    def content_item_representations(self, items: torch.Tensor) -> torch.Tensor:
        """:meth:`content_representations` of catalog items ``items`` (their modal inputs)."""
        return self.content_representations({m: t[items]
                                             for m, t in self.item_modal_inputs().items()})

    # ------------------------------------------------------------------ stage 2
    def set_modal_inputs(self, tables: dict[str, torch.Tensor]) -> None:
        """Replace the per-item modal inputs by ``tables`` (stage 2's feature bank: the adapted
        backbone's features of every item); graph models rebuild what they derive from them."""
        raise NotImplementedError(f"{self.name} has no modal inputs for stage 2")

    def rebuild_derived(self) -> None:
        """Rebuild what the model derives from its modal inputs (the feature bank as it is now:
        the rows written since the last re-extraction, the rest as re-extracted); only for
        models with :attr:`derives_from_features`."""
        raise NotImplementedError(f"{self.name} derives nothing from its modal inputs")

    def update_modal_inputs(self, items: torch.Tensor, modal: dict[str, torch.Tensor]) -> None:
        """Write a batch's (detached) adapted features into the feature bank. ``items`` and
        ``modal`` may live elsewhere than the bank (a resume writes a checkpoint's CPU rows into
        a bank on the GPU) and be in another dtype: they are moved to the bank's."""
        for m, table in self.item_modal_inputs().items():
            values = modal[m].detach().to(table.device, table.dtype)
            table.data.index_copy_(0, items.to(table.device), values)

    def stage2_scores(self, users: torch.Tensor, items: torch.Tensor,
                      modal: dict[str, torch.Tensor]) -> dict:
        """In-batch scores of stage 2, the rows' users x the batch items ``[R, B]``, with the
        batch items' modal inputs ``modal`` (``{m: [B, d_m]}``, differentiable adapted features).
        Returns ``{"bpr": [(weight, S), ...], "student": S, "reg": scalar}``: in-batch BPR terms,
        the matrix the KT loss aligns with the teacher, and the regulariser (weighted)."""
        raise NotImplementedError(f"{self.name} does not support stage 2")

    # ------------------------------------------------------------------ ptmrec plan
    @classmethod
    def planned_sizes(cls, n_users: int, n_items: int, feature_dim: int, config,
                      n_interactions: int | None = None, n_modalities: int = 2) -> dict | None:
        """What this model holds in stage 2, for ``ptmrec plan``, without building it: on
        ``n_modalities`` feature tables of ``feature_dim`` per item (``config``: the
        ``recommender`` section), ``{"trainable": elements of the parameters the engine gets,
        "buffers_bytes": fp32 bytes of its buffers (the feature bank; the graphs only when
        ``n_interactions`` is known), "graph_layers": propagation layers (0: no graph),
        "repr_dim": width of the user / item representations (the teacher's tables)}``.
        None: the planner does not know this model."""
        return None

    # ------------------------------------------------------------------ derived
    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u, i = self.representations()
        return (u[users] * i[items]).sum(-1)

    def full_scores(self, users: torch.Tensor) -> torch.Tensor:
        u, i = self.representations()
        return u[users] @ i.T


# ---------------------------------------------------------------------- shared pieces

def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 if it is bf16 / fp16 (DeepSpeed's casts), else ``x`` itself: losses are
    computed in fp32 whatever the parameters' dtype, and fp32 / fp64 inputs are untouched."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return x if x.dtype == dtype else x.to(dtype)


def batch_mean(x: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-example values summed (in fp32 at least) and divided by ``denom``: the global-batch
    mean share."""
    return at_least_fp32(x).sum() / batch["denom"]


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor, batch: dict) -> torch.Tensor:
    """-log sigmoid(pos - neg), averaged over the global batch (MMRec's BPRLoss); in fp32 for
    bf16 / fp16 scores."""
    return batch_mean(-F.logsigmoid(at_least_fp32(pos) - at_least_fp32(neg)), batch)


def l2_reg(batch: dict, *embeddings: torch.Tensor) -> torch.Tensor:
    """Per-example squared L2 norm / 2 of the batch's embeddings, global-batch mean.

    MMRec's EmbLoss uses the (unsquared) Frobenius norm of the whole batch, which is not a sum over
    examples and so would differ between 1 and N ranks; this is the per-example form (LightGCN's).
    """
    total = sum((e ** 2).sum(-1) for e in embeddings)
    return batch_mean(total / 2, batch)


def xavier_embedding(n: int, dim: int) -> nn.Parameter:
    w = torch.empty(n, dim)
    nn.init.xavier_normal_(w)
    return nn.Parameter(w)


def modal_tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.tensor(np.asarray(array, dtype=np.float32))


def dropout_rows(rows: torch.Tensor, index: torch.Tensor, n_rows: int, p: float,
                 generator: torch.Generator) -> torch.Tensor:
    """``dropout(table)[index]`` for a table of ``n_rows`` of which only ``rows = table[index]``
    was computed: the mask is drawn for the whole table, so every rank draws the same one."""
    if p <= 0:
        return rows
    keep = (torch.rand((n_rows, rows.shape[1]), generator=generator) >= p)[index.cpu()]
    return rows * keep.to(rows.device, rows.dtype) / (1 - p)


def terms(**values: torch.Tensor) -> dict[str, torch.Tensor]:
    """A loss dict: ``loss`` keeps its graph, the other terms are detached for logging."""
    return {k: v if k == "loss" else v.detach() for k, v in values.items()}


def tables_to_bank(module: nn.Module, modalities, tables: dict[str, torch.Tensor]) -> None:
    """Stage 2 for models that train their feature tables (FREEDOM, BM3): the tables
    ``<m>_embedding`` become untrained buffers holding the feature bank."""
    for m in modalities:
        name = f"{m}_embedding"
        old = getattr(module, name)
        # in the dtype of its projection (bf16 / fp16 when DeepSpeed casts the model)
        dtype = getattr(module, f"{m}_trs").weight.dtype
        table = tables[m].detach().to(old.device, dtype).clone()
        if name in module._parameters:
            del module._parameters[name]
            module.register_buffer(name, table, persistent=False)
        else:
            setattr(module, name, table)


def modal_tables(module: nn.Module, features, modalities: tuple[str, ...], out_dim: int,
                 xavier: bool) -> list[str]:
    """Trainable per-item feature tables ``<m>_embedding`` initialised from the features, and
    their projections ``<m>_trs`` to ``out_dim`` (FREEDOM, BM3: MMRec trains the features
    themselves); returns the modalities present, in the given order."""
    present = [m for m in modalities if features.get(m) is not None]
    for m in present:
        table = modal_tensor(features.get(m))
        trs = nn.Linear(table.shape[1], out_dim)
        if xavier:
            nn.init.xavier_normal_(trs.weight)
        setattr(module, f"{m}_embedding", nn.Parameter(table))
        setattr(module, f"{m}_trs", trs)
    return present
