"""``neg_sampler: mixgcf`` -- positive mixing of MixGCF (Huang et al., "MixGCF: An Improved Training Method
for Graph Neural Network-based Recommender Systems", KDD'21), ``top_m > 1`` giving MixGCF+.

MixGCF synthesises a hard negative from a candidate pool ``M`` in two steps, per GNN layer ``l``:

* **positive mixing** (Sec. 3.2): ``e'_c = alpha e_{v+} + (1 - alpha) e_c`` for every candidate ``c``,
  ``alpha ~ U(0, 1)`` drawn per row (shared by the row's candidates);
* **hop mixing** (Sec. 3.3): per layer, the candidate maximising ``e_u . e'_c`` (the hardest mixed one),
  then the chosen layers' mixed embeddings are pooled into the negative.

A sequential model has one representation ``h`` (the encoder's output) and one item vector per item,
not one per GNN layer, so **hop mixing has no counterpart** here: there is a single "layer", its
choice is ``argmax_c h . e'_c`` over the pool (``top_m > 1``: drawn uniformly from the top-M, the MDCNS
paper's MixGCF+), and the negative is that candidate's mixed embedding ``e' = alpha e_{v+} + (1 - alpha)
e_c``. Its score is ``h . e' = alpha s(v+) + (1 - alpha) s(c)`` -- exact on scores for scorers linear in
the item vector (``h . v(item)``, plus a per-item bias for BERT4Rec; see
:func:`recbole_mdcns.methods.divns.pairing.synthesis_is_exact`), so the mix is done on scores and its gradient
reaches both the positive's and the candidate's parameters, as MixGCF's does. Other scorers (TransRec,
the generic ``predict()`` path) train on that score mix as a documented fallback; the run logs which.

As ``alpha`` is shared by a row's candidates and ``alpha < 1``, ``h . e'_c`` ranks them exactly as
``s(c)`` does: in a single layer, positive mixing changes the negative a row trains on, not which
candidate is chosen -- that one is DNS(M, N)'s.

``neg_num: K``: K distinct candidates drawn from the top-M (``neg_num <= top_m``), each mixed with the
positive under its own ``alpha`` (MixGCF's K negatives come from K separate pools, each with its own
``alpha``). No state spans batches: ``alpha`` and the top-M draws use the global RNG, reseeded per
epoch, so a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

from logging import getLogger

import torch
from recbole.data.interaction import Interaction

from recbole_mdcns.config import packaged_yaml
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.methods.divns.pairing import describe_synthesis
from recbole_mdcns.methods.dns import check_neg_num_within_top_m
from recbole_mdcns.registry import register_sampler
from recbole_mdcns.strategies import TopMNegative


def positive_mixing(pos: torch.Tensor, candidates: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Scores of MixGCF's mixed candidates, ``alpha s(v+) + (1 - alpha) s(c)`` (``= h . e'_c`` for dot scorers).

    ``pos`` ``[R]``, ``candidates`` ``[R, K]`` scores, ``alpha`` ``[R, 1]`` (one per row) or ``[R, K]``.
    """
    return alpha * pos.unsqueeze(1) + (1.0 - alpha) * candidates


class MixGCFNegative:
    """MixGCF's choice in one layer: ``k`` distinct candidates from the top-``m`` of the mixed scores
    ``h . e'_c`` (``m = 1``: the hardest, MixGCF; ``m > 1``: MixGCF+)."""

    def __init__(self, m: int = 1) -> None:
        self.top_m = TopMNegative(m)

    def select(self, pos: torch.Tensor, pool: torch.Tensor, alpha: torch.Tensor, k: int = 1,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``[R, k]`` pool indices from ``pos`` ``[R]`` and ``pool`` ``[R, N]`` scores, ``alpha`` ``[R, 1]``."""
        return self.top_m.select_k(positive_mixing(pos, pool, alpha), k, generator)


class MixGCFModule(NegativeSamplingModule):
    """``neg_sampler: mixgcf`` (see the module docstring)."""

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.strategy = MixGCFNegative(config["top_m"])
        self.neg_num = config["neg_num"]
        self._mix_logged = False

    @staticmethod
    def validate_config(config) -> None:
        check_neg_num_within_top_m(config, "its neg_num negatives mix distinct candidates drawn from the top_m")

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        model = self.model
        candidates = batch[CANDIDATES]
        positives = batch[model.POS_ITEM_ID].unsqueeze(1)
        scorer = self.scorer_for("self", model, batch)
        if not self._mix_logged:
            self._mix_logged = True
            getLogger().info(f"mixgcf: {type(model).__name__} via {scorer.path}; the synthetic negative's score "
                             f"alpha*s(v+) + (1-alpha)*s(c) is {describe_synthesis(scorer, 'items')}")
        h = scorer.encode(model, batch)
        alpha = torch.rand(len(candidates), self.neg_num, device=candidates.device)  # alpha ~ U(0, 1)
        with torch.no_grad():
            s = scorer.score(model, batch, h, torch.cat([positives, candidates], 1))
            picked = self.strategy.select(s[:, 0], s[:, 1:], alpha[:, :1], self.neg_num)
        negatives = candidates.gather(1, picked)
        self.record_negatives(negatives)
        scores = scorer.score(model, batch, h, torch.cat([positives, negatives], 1))
        return self.loss_fn(scores[:, 0], positive_mixing(scores[:, 0], scores[:, 1:], alpha))


register_sampler("mixgcf", MixGCFModule, config_file=packaged_yaml("mixgcf"))
