"""DivNS per training row: the hard negative and runner-ups of the scored pool, the row's diverse
item ``v_D`` of ``D_u``, and the score of the synthetic negative.

**Synthesis on scores.** When the scorer's score is linear in the item's parameters --
``h · v(item)`` (:class:`~recbole_mdcns.scoring.DotScorer` and the one-pass scorers that only
change how ``h`` or ``v`` is read: S3Rec, SHAN, NPE with ``v = relu(E)``, HGN, FPMC with
``v = [IU, IL]``), or plus a per-item bias (BERT4Rec) -- the score of the synthetic item
``v_syn = lam v_H + (1 - lam) v_D`` is exactly ``lam s(v_H) + (1 - lam) s(v_D)``, so the
mix is done on scores (gradients reach both items). For the other scorers (TransRec's
distance, the generic ``predict()`` path) the same score mix is the documented
*fallback*: it trains on the convex combination of the two negatives' scores, which is
not the score of a mixed embedding. The run logs which case applies (:func:`describe_synthesis`).
"""
from __future__ import annotations

import torch

from recbole_mdcns.general import GeneralScorer
from recbole_mdcns.scoring import BERT4RecScorer, DotScorer, Scorer

DIVERSE_PICKS = ("uniform", "top", "score")
PAIRINGS = ("independent", "distinct")


def hard_and_runner_ups(scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool positions of the top-1 (``[B]``) and of ranks ``2..r+1`` (``[B, r]``) of ``[B, N]`` scores."""
    r = min(r, scores.shape[1] - 1)
    top = scores.topk(r + 1, dim=1).indices
    return top[:, 0], top[:, 1:]


def pool_diverse(runners: torch.Tensor, hard: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``divns_ablation: no_cache``: each row's diverse item drawn uniformly from its own pool's runner-ups
    ``runners`` ``[B, r]`` (ranks 2..r+1 of this step's scores -- what the cache would have stored), leaving
    out any equal to the row's hard negative ``hard`` ``[B]`` (a pool may repeat an item). Returns ``[B]`` ids
    and ``[B]`` bool has-one (False where every runner-up is the hard negative)."""
    allowed = runners != hard.unsqueeze(1)
    keys = torch.rand(runners.shape, generator=generator, device=runners.device).masked_fill(~allowed, -1.0)
    return runners.gather(1, keys.argmax(1, keepdim=True)).squeeze(1), allowed.any(1)


def synthesize_scores(hard_scores: torch.Tensor, diverse_scores: torch.Tensor, lam: float,
                      has_diverse: torch.Tensor) -> torch.Tensor:
    """Score of the synthetic negative per row: ``lam s(v_H) + (1 - lam) s(v_D)`` where the row has a
    diverse item (for ``s(v) = h · e_v`` this is exactly ``h · (lam e_H + (1 - lam) e_D)``), else
    ``s(v_H)`` (plain DNS). No gradient reaches ``diverse_scores`` of rows without a diverse item."""
    mixed = lam * hard_scores + (1.0 - lam) * diverse_scores
    return torch.where(has_diverse, mixed, hard_scores)


def synthesis_is_exact(scorer: Scorer) -> bool:
    """Whether ``lam s(v_H) + (1 - lam) s(v_D)`` is the score of a mixed item for ``scorer``: its
    score is ``h · item_vectors(v)`` (optionally plus a per-item bias, BERT4Rec)."""
    return isinstance(scorer, DotScorer) and type(scorer).score in (DotScorer.score, BERT4RecScorer.score,
                                                                    GeneralScorer.score)


def describe_synthesis(scorer: Scorer, items: str) -> str:
    """For the log: whether mixing the scores of two ``items`` is the score of their mixed item vector."""
    if synthesis_is_exact(scorer):
        return "exact: the score of the mixed item vector"
    return f"fallback: the mix of the two {items}' scores, not the score of a mixed embedding"


def distinct_slots(users: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    """One slot per row, rows of one user taking different slots where possible (``divns_pairing: distinct``).

    ``preference`` ``[B, K]`` ranks each row's slots (``-inf``: no item there). A user's rows, in
    batch order, each take their most preferred slot not yet taken by an earlier row of the same
    user; once all of a user's slots are taken they are free again, so a user with more rows than
    items cycles through them. Returns ``[B]`` slot indices (0 for a row without a valid slot).
    """
    if len(users) == 0:
        return torch.zeros(0, dtype=torch.long, device=users.device)
    _, group = torch.unique(users, return_inverse=True)
    order = group.argsort(stable=True)
    counts = torch.bincount(group)
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group), device=group.device) - (counts.cumsum(0) - counts)[group[order]]
    n_valid = torch.isfinite(preference).sum(1)
    taken = torch.zeros(len(counts), preference.shape[1], dtype=torch.bool, device=preference.device)
    slot = torch.zeros(len(users), dtype=torch.long, device=users.device)
    for j in range(int(rank.max()) + 1):
        rows = (rank == j).nonzero().flatten()
        g = group[rows]
        taken[g[taken[g].sum(1) >= n_valid[rows]]] = False  # every slot of the user taken: start again
        slot[rows] = preference[rows].masked_fill(taken[g], float("-inf")).argmax(1)
        taken[g, slot[rows]] = True
    return slot


def pick_slots(users: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None, pick: str = "uniform",
               pairing: str = "independent") -> torch.Tensor:
    """``[B]`` slot of each row among its ``valid`` (``[B, K]``) diverse items.

    ``pick``: ``uniform`` -- any valid slot, equally likely (``scores`` unused); ``top`` -- the slot
    of the highest score; ``score`` -- drawn with probability ``softmax(scores)`` over the valid
    slots (Gumbel-max, so that with ``pairing: distinct`` a user's rows draw without replacement).
    ``pairing``: ``independent`` or ``distinct`` (:func:`distinct_slots`).
    """
    if pick not in DIVERSE_PICKS:
        raise ValueError(f"divns_diverse_pick must be one of {list(DIVERSE_PICKS)}, got {pick!r}")
    if pick == "uniform":
        preference = torch.rand(valid.shape, device=valid.device)
    else:
        preference = scores.detach().float()
        if pick == "score":
            preference = preference - torch.log(-torch.log(torch.rand_like(preference).clamp_min(1e-20)))
    preference = preference.masked_fill(~valid, float("-inf"))
    return preference.argmax(1) if pairing == "independent" else distinct_slots(users, preference)

