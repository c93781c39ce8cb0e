"""Negative selection strategies: small, model-free units over ``[B, N]`` score tensors.

Each strategy maps candidate scores to pool indices: one per row (``[B]`` long), or ``k`` per row
(``[B, k]``, ``neg_num: k``).
They never see the model, the data or the loop, so they compose and test alone.
"""
from __future__ import annotations

import torch


def uniform_pick(num_rows: int, num_choices: int, generator: torch.Generator | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """One index in ``[0, num_choices)`` per row, uniformly."""
    return torch.randint(num_choices, (num_rows,), generator=generator, device=device)


class TopMNegative:
    """DNS(M, N): one candidate drawn uniformly from the top-``m`` scored (M = 1: classic DNS).

    With ``m == N`` it is uniform over the pool; with ``N == 1`` it returns the only candidate.
    """

    def __init__(self, m: int = 1) -> None:
        if m < 1:
            raise ValueError(f"top_m must be >= 1, got {m}")
        self.m = m

    def select(self, scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        m = min(self.m, scores.shape[1])
        if m == 1:
            return scores.argmax(1)
        top = scores.topk(m, dim=1).indices
        pick = uniform_pick(len(scores), m, generator, scores.device)
        return top.gather(1, pick.unsqueeze(1)).squeeze(1)

    def select_k(self, scores: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, k]``: ``k`` distinct candidates per row, drawn uniformly without replacement from its top-``m``
        (``k == 1``: :meth:`select`; ``k == m``: the whole top-``m``)."""
        m = min(self.m, scores.shape[1])
        if k > m:
            raise ValueError(f"cannot draw {k} distinct negatives from the top {m}")
        if k == 1:
            return self.select(scores, generator).unsqueeze(1)
        top = scores.topk(m, dim=1).indices
        if k == m:
            return top
        order = torch.rand(top.shape, generator=generator, device=scores.device).argsort(1)[:, :k]
        return top.gather(1, order)


class MultiViewTopMNegative:
    """One hard negative per score view (MDCNS Eqs. 7-8): :class:`TopMNegative` on each view.

    ``select`` takes ``V`` score tensors of shape ``[B, N]`` over the same pool and returns a
    ``[B, V]`` long tensor of pool indices, column ``j`` drawn from the top-``m`` of view ``j``.
    """

    def __init__(self, m: int = 1) -> None:
        self.top_m = TopMNegative(m)

    @property
    def m(self) -> int:
        return self.top_m.m

    def select(self, views, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.stack([self.top_m.select(view, generator) for view in views], 1)
