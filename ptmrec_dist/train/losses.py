"""Stage-2 losses on in-batch score matrices (R batch users x B batch items; row r's positive is
item ``pos[r]``, by default the diagonal: R = B, pos[r] = r).

* :func:`in_batch_bpr`: ``-log sigmoid(S[b, b] - S[b, j])`` averaged, per row, over the items j
  that are not known training positives of user b (the diagonal is always excluded), then over
  the rows (weighted by ``weights`` if given; rows without a negative count 0).
* :func:`kt_loss`: the in-batch knowledge transfer,
  ``mean_b KL(softmax(S_T[b] / tau) || softmax(S_S[b] / tau))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptmrec_dist.rec.base import at_least_fp32


def in_batch_bpr(scores: torch.Tensor, known: torch.Tensor,
                 weights: torch.Tensor | None = None,
                 pos: torch.Tensor | None = None) -> torch.Tensor:
    """``known[r, j]``: item j is a training positive of row r's user (True at its positive).
    Computed in fp32 for bf16 / fp16 scores (as :func:`kt_loss`); the result is fp32 then."""
    scores = at_least_fp32(scores)
    valid = ~known
    rows_idx = torch.arange(scores.shape[0], device=scores.device)
    pos_scores = scores.diagonal() if pos is None else scores[rows_idx, pos]
    diff = pos_scores.unsqueeze(1) - scores
    per_pair = -F.logsigmoid(diff) * valid
    count = valid.sum(1)
    has = count > 0
    if not has.any():
        return scores.sum() * 0.0
    rows = per_pair.sum(1)[has] / count[has]
    w = torch.ones_like(rows) if weights is None else weights[has].to(rows.dtype)
    return (w * rows).sum() / w.sum().clamp_min(1e-12)


def kt_loss(teacher: torch.Tensor, student: torch.Tensor, tau: float) -> torch.Tensor:
    log_p = F.log_softmax(teacher.detach().float() / tau, dim=1)
    log_q = F.log_softmax(student.float() / tau, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()
