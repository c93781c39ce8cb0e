"""``neg_sampler: ahns`` -- Adaptive Hardness Negative Sampling (Lai et al., "Adaptive Hardness Negative
Sampling for Collaborative Filtering", AAAI'24), its instantiation AHNS_{p<0}.

AHNS asks that a negative's hardness (its predicted score) depend on the row's positive (criterion C1),
fall as the positive's score rises (C2: a well-ranked positive needs no hard negative, which would
likely be a false negative; a poorly ranked one needs a hard negative), and be adjustable (C3).
AHNS_{p<0} is two-pass: draw a pool ``C`` of candidates, then pick

    ``j* = argmin_{j in C} | s(j) - beta * (s(v+) + alpha) ** (p + 1) |``

with ``s(v) = h . e_v`` for the row's representation ``h`` (the user embedding in the paper, the
sequence representation here; any scorer works, the rule reads scores only) and ``alpha``, ``beta``,
``p < 0`` the ``ahns_alpha``, ``ahns_beta``, ``ahns_p`` settings (defaults: the authors' code,
``alpha = 1``, ``beta = 0.1``, ``p = -2``). The target score ``t = beta (s(v+) + alpha)^(p+1)``
decreases in ``s(v+)`` when ``p < -1``.

**Adaptation (unbounded scores).** The paper's analysis takes ``s(v+) + alpha > 0``; a sequential
model's dot-product scores are unbounded, and for ``s(v+) + alpha <= 0`` the power is undefined
(non-integer ``p``) or flips sign. The base is floored at :data:`BASE_FLOOR`, the limit the rule tends to
as ``s(v+) + alpha -> 0+``: the target grows without bound, so the row gets its hardest candidate -- C2
continued to the poorest positives. The target is then clamped to the row's score range, which leaves
the argmin unchanged and keeps an overflowing target from tying every candidate. A model whose
scores sit below ``-alpha`` (TransRec's ``bias - distance``) thus trains as DNS: raise ``ahns_alpha``.

``neg_num: K``: the K candidates nearest the target (distinct; ``neg_num <= candidate_num``; the authors'
code draws K separate pools instead). ``top_m`` is not read (must be 1). No state spans batches.
"""
from __future__ import annotations

import math

import torch
from recbole.data.interaction import Interaction

from recbole_mdcns.config import packaged_yaml, require_one
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.registry import register_sampler

BASE_FLOOR = 1e-12  # floor of s(v+) + alpha before the power (float64)


def ahns_target(pos: torch.Tensor, alpha: float, beta: float, p: float) -> torch.Tensor:
    """``[R]`` float64 target scores ``beta * max(s(v+) + alpha, BASE_FLOOR) ** (p + 1)``."""
    return beta * (pos.double() + alpha).clamp_min(BASE_FLOOR).pow(p + 1)


class AdaptiveHardnessNegative:
    """AHNS_{p<0}'s rule over ``[R, N]`` pool scores: the ``k`` candidates whose scores are nearest the
    row's target :func:`ahns_target` (``k = 1``: the paper's ``argmin``)."""

    def __init__(self, alpha: float = 1.0, beta: float = 0.1, p: float = -2.0) -> None:
        self.alpha, self.beta, self.p = alpha, beta, p

    def select(self, pos: torch.Tensor, pool: torch.Tensor, k: int = 1) -> torch.Tensor:
        """``[R, k]`` pool indices, nearest first."""
        pool = pool.double()
        target = ahns_target(pos, self.alpha, self.beta, self.p)
        target = torch.minimum(torch.maximum(target, pool.min(1).values), pool.max(1).values)
        return (pool - target.unsqueeze(1)).abs().topk(k, dim=1, largest=False).indices


class AHNSModule(NegativeSamplingModule):
    """``neg_sampler: ahns`` (see the module docstring)."""

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.strategy = AdaptiveHardnessNegative(float(config["ahns_alpha"]), float(config["ahns_beta"]),
                                                 float(config["ahns_p"]))
        self.neg_num = config["neg_num"]

    @staticmethod
    def validate_config(config) -> None:
        require_one(config, "top_m", "ahns", "its rule picks the candidates nearest a target score, not a top-M")
        for key, low, high in (("ahns_alpha", -math.inf, math.inf), ("ahns_beta", 0.0, math.inf),
                               ("ahns_p", -math.inf, 0.0)):
            value = config[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or (key != "ahns_alpha" and not low < value < high):
                raise ValueError(f"{key} must be a finite number in ({low}, {high}), got {value!r} "
                                 "(AHNS_{p<0}: beta > 0, p < 0; the authors use alpha=1, beta=0.1, p=-2)")

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        model = self.model
        candidates = batch[CANDIDATES]
        positives = batch[model.POS_ITEM_ID].unsqueeze(1)
        scorer = self.scorer_for("self", model, batch)
        h = scorer.encode(model, batch)
        with torch.no_grad():
            s = scorer.score(model, batch, h, torch.cat([positives, candidates], 1))
            picked = self.strategy.select(s[:, 0], s[:, 1:], self.neg_num)
        negatives = candidates.gather(1, picked)
        self.record_negatives(negatives)
        scores = scorer.score(model, batch, h, torch.cat([positives, negatives], 1))
        return self.loss_fn(scores[:, 0], scores[:, 1:])


register_sampler("ahns", AHNSModule, config_file=packaged_yaml("ahns"))
