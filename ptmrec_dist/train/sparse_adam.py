"""Adam with lazy rows for the ID embedding tables of stage 1 (``stage1.sparse_embeddings``).

With dense gradients, every optimizer step reads and writes the whole user and item tables
(Adam's moments, the weights, DeepSpeed's flattened gradients) although a batch touches a few
thousand rows: per step, work that grows with the catalog, and steps per epoch grow with the
interactions, so an epoch grows faster than the data (docs/scaling.md). Here the tables get
sparse gradients (``F.embedding(..., sparse=True)``: the rows a batch touched) and only those rows
are updated, their moments included ("lazy" Adam, as ``torch.optim.SparseAdam``); every other
parameter (projections, biases) gets torch's Adam update, dense. An epoch then costs work in
proportion to its batches.

It is not MMRec's optimizer: a row's moments decay only when the row is in a batch, and the bias
correction counts the optimizer's steps, not the row's. Results differ from dense Adam, so it is
off by default. Weight decay is added to the gradient (Adam's L2, as DeepSpeed's ``Adam`` with
``adam_w_mode: false``), for the tables on the touched rows only.

DeepSpeed takes it as a client optimizer under ZeRO stage 0 in fp32 (its all-reduce sums sparse
gradients across ranks: every rank then applies the same update); its ``state_dict`` (plain
tensors and numbers) goes into DeepSpeed's checkpoints like any optimizer's.
"""

from __future__ import annotations

import math

import torch


class RowSparseAdam(torch.optim.Optimizer):
    """Adam over parameters with dense gradients, lazy Adam over those with sparse ones."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) \
                or weight_decay < 0:
            raise ValueError(f"invalid Adam settings: lr {lr}, betas {betas}, eps {eps}, "
                             f"weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if p.grad.is_sparse:
                    g = p.grad.coalesce()        # repeated rows summed (a user twice in a batch)
                    rows, grad = g.indices()[0], g.values()
                    if wd:
                        grad = grad.add(p[rows], alpha=wd)
                    m_rows = m[rows].mul_(b1).add_(grad, alpha=1 - b1)
                    v_rows = v[rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    m[rows], v[rows] = m_rows, v_rows
                    denom = (v_rows.sqrt() / math.sqrt(bc2)).add_(eps)
                    p.index_add_(0, rows, m_rows.div(denom), alpha=-lr / bc1)
                else:
                    grad = p.grad if not wd else p.grad.add(p, alpha=wd)
                    m.mul_(b1).add_(grad, alpha=1 - b1)
                    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)     # torch.optim.Adam's
                    p.addcdiv_(m, denom, value=-lr / bc1)
        return loss
