"""Ranking losses over a positive score and sampled-negative scores."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Pairwise BPR, ``-log sigmoid(s+ - s-)``, as RecBole's ``BPRLoss`` (mean over rows)."""
    if neg.dim() > pos.dim():
        pos = pos.unsqueeze(-1)
    return -torch.log(1e-10 + torch.sigmoid(pos - neg)).mean()


def bce_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Point-wise BCE of SASRec's paper: positive labelled 1, each negative 0 (mean over rows)."""
    neg_term = F.softplus(neg)
    if neg.dim() > pos.dim():
        neg_term = neg_term.sum(-1)
    return (F.softplus(-pos) + neg_term).mean()


LOSSES: dict[str, LossFn] = {"bpr": bpr_loss, "bce": bce_loss}
