"""Ranking losses over a positive score and sampled-negative scores (``neg_loss``).

Every loss takes ``pos`` ``[R]`` and ``neg`` ``[R]`` (one negative per row) or ``[R, K]`` (``neg_num: K``)
and returns a scalar:

* ``bpr`` -- ``-log sigmoid(s+ - s_k)``, mean over rows *and* negatives: RecBole's ``BPRLoss`` over the
  rows repeated once per negative (RecBole's ``sample_num: K``), so its scale does not grow with K;
* ``bce`` -- SASRec's point-wise loss, ``softplus(-s+) + sum_k softplus(s_k)``, mean over rows: each
  negative is one example labelled 0 next to the row's positive labelled 1;
* ``softmax`` -- sampled softmax, ``-log(e^{s+} / (e^{s+} + sum_k e^{s_k}))``, mean over rows. With one
  negative it is BPR's ``-log sigmoid(s+ - s-)``. A sampler whose negatives are draws from a known
  distribution ``q`` passes logits corrected by :func:`log_q_corrected` (Bengio & Senecal 2008; Jean et
  al. 2015: the target's logit and each draw's shifted by ``-log q``); a hard sampler passes raw scores.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_columns(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``neg`` as ``[R, K]`` (a ``[R]`` tensor is one negative per row)."""
    return neg.unsqueeze(-1) if neg.dim() == pos.dim() else neg


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Pairwise BPR, ``-log sigmoid(s+ - s_k)``, as RecBole's ``BPRLoss`` (mean over rows and negatives)."""
    return -torch.log(1e-10 + torch.sigmoid(pos.unsqueeze(-1) - _as_columns(pos, neg))).mean()


def bce_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Point-wise BCE of SASRec's paper: positive labelled 1, each negative 0 (summed per row, mean over rows)."""
    return (F.softplus(-pos) + F.softplus(_as_columns(pos, neg)).sum(-1)).mean()


def softmax_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Sampled softmax over ``[v+ | negatives]``: ``logsumexp([s+, s_1..s_K]) - s+``, mean over rows."""
    logits = torch.cat([pos.unsqueeze(-1), _as_columns(pos, neg)], -1)
    return (torch.logsumexp(logits, -1) - pos).mean()


def log_q_corrected(scores: torch.Tensor, items: torch.Tensor, log_q: torch.Tensor | None) -> torch.Tensor:
    """Sampled-softmax logits ``s(v) - log q(v)`` for draws from ``q`` (``log_q``: ``[n_items]``; ``None``:
    uniform ``q``, a constant that cancels in the softmax, so ``scores`` unchanged)."""
    return scores if log_q is None else scores - log_q[items]


LOSSES: dict[str, LossFn] = {"bpr": bpr_loss, "bce": bce_loss, "softmax": softmax_loss}
