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

**General graph models: hop mixing** (:func:`hop_mixing`). LightGCN, NGCF, SGL, NCL and SpectralCF have
per-layer embeddings ``e^(l)`` (:attr:`recbole_mdcns.general.Propagation.layers`, from the step's one
propagation). As MixGCF's code: per layer ``l`` an ``alpha_l ~ U(0, 1)`` per row, the mixed candidates
``e'^(l)_c = alpha_l e^(l)_{v+} + (1 - alpha_l) e^(l)_c``, the layer's choice ``c_l = argmax_c u . e'^(l)_c``
(the pooled user vector for layer-averaging models, ``u^(l)`` for NGCF's and SpectralCF's concatenated
layers; ``top_m > 1``: drawn from the top-M), and the negative ``pool_l(e'^(l)_{c_l})`` (mean, or
concatenation) -- its score ``pool_l(alpha_l s^(l)(v+) + (1 - alpha_l) s^(l)(c_l))`` is computed exactly
on per-layer scores. The regulariser of the model's own loss runs over the layer-0 choices. BPR (no
layers) and DGCF (layers its ``forward`` does not expose) take the single-layer path above: positive
mixing only; the run's log says which.
"""
from __future__ import annotations

from logging import getLogger

import torch
from recbole.data.interaction import Interaction

from recbole_mdcns.config import packaged_yaml
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.general import GeneralScorer, Propagation, combine_layers, layer_scores
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


def hop_mixing(pos: torch.Tensor, chosen: torch.Tensor, alpha: torch.Tensor, prop: Propagation) -> torch.Tensor:
    """``[R, K]`` scores of MixGCF's synthesised negatives (Sec. 3.3): per layer the positive-mixed score of
    that layer's chosen candidate, ``alpha_l s^(l)(v+) + (1 - alpha_l) s^(l)(c_l)``, pooled over the layers as
    the model pools them (:func:`~recbole_mdcns.general.combine_layers`). ``pos`` ``[R, L + 1]`` and ``chosen``
    ``[R, K, L + 1]`` per-layer scores, ``alpha`` ``[R, K, L + 1]``."""
    return combine_layers(prop, alpha * pos.unsqueeze(1) + (1.0 - alpha) * chosen)


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
        h = scorer.encode(model, batch)
        if isinstance(scorer, GeneralScorer) and scorer.step.layers is not None:
            return self.hop_mixing_loss(batch, scorer.step)
        if not self._mix_logged:
            self._mix_logged = True
            getLogger().info(f"mixgcf: {type(model).__name__} via {scorer.path}; positive mixing in one layer, the "
                             f"synthetic negative's score alpha*s(v+) + (1-alpha)*s(c) is "
                             f"{describe_synthesis(scorer, 'items')}")
        alpha = torch.rand(len(candidates), self.neg_num, device=candidates.device)  # alpha ~ U(0, 1)
        with torch.no_grad():
            s = scorer.score(model, batch, h, torch.cat([positives, candidates], 1))
            picked = self.strategy.select(s[:, 0], s[:, 1:], alpha[:, :1], self.neg_num)
        negatives = candidates.gather(1, picked)
        self.record_negatives(negatives)
        scores = scorer.score(model, batch, h, torch.cat([positives, negatives], 1))
        return self.loss_fn(scores[:, 0], positive_mixing(scores[:, 0], scores[:, 1:], alpha))

    def hop_mixing_loss(self, batch: Interaction, prop: Propagation) -> torch.Tensor:
        """A general graph model's loss over its hop-mixed negatives (:func:`hop_mixing`)."""
        model, candidates = self.model, batch[CANDIDATES]
        users, positives = batch[model.USER_ID], batch[model.POS_ITEM_ID].unsqueeze(1)
        if not self._mix_logged:
            self._mix_logged = True
            getLogger().info(f"mixgcf: {type(model).__name__}, positive and hop mixing over its {len(prop.layers)} "
                             f"layers (layers {'averaged' if prop.combine == 'mean' else 'concatenated'})")
        rows, layers = len(candidates), len(prop.layers)
        alpha = torch.rand(rows, self.neg_num, layers, device=candidates.device)  # alpha_l ~ U(0, 1)
        with torch.no_grad():  # per layer, the mixed scores rank the candidates as their own scores do
            per_layer = layer_scores(model, prop, users, candidates)
            picked = torch.stack([self.strategy.top_m.select_k(per_layer[..., l], self.neg_num)
                                  for l in range(layers)], -1)                      # [R, K, L + 1]
        negatives = candidates.gather(1, picked.flatten(1)).view(rows, self.neg_num, layers)
        self.record_negatives(negatives[..., 0])  # the layer-0 choices: the model's regulariser runs over them
        self.record_negatives(negatives[..., 1:])
        pos = layer_scores(model, prop, users, positives).squeeze(1)               # [R, L + 1]
        chosen = layer_scores(model, prop, users, negatives.flatten(1)).view(rows, self.neg_num, layers, layers)
        chosen = chosen.diagonal(dim1=2, dim2=3)                                    # layer l's score of c_l
        return self.loss_fn(combine_layers(prop, pos), hop_mixing(pos, chosen, alpha, prop))


register_sampler("mixgcf", MixGCFModule, config_file=packaged_yaml("mixgcf"))
