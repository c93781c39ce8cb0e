"""``neg_sampler: uniform | popularity | dns`` -- negatives drawn from the pool, or the top of the scored pool.

``uniform`` and ``popularity`` (RNS / PNS) train each row on its pool's draws, unscored: the pool
*is* the row's ``neg_num`` negatives (``candidate_num == neg_num``). DNS (Zhang et al., SIGIR'13)
scores N candidates and trains on the top one; DNS(M, N) (the MDCNS paper's DNS+) draws one of the
top M; with ``neg_num: K`` it draws K distinct ones of the top M.

With ``neg_loss: softmax``, ``uniform`` / ``popularity`` train a sampled softmax over ``[v+ | pool]``
with the log-q correction of the pool's distribution (uniform: a constant, which cancels;
popularity: ``log q(v) = alpha log count(v) - log Z``); ``dns`` a softmax over ``[v+ | its K
negatives]``, uncorrected -- the probability that the top-M rule picks an item is unknown.
"""
from __future__ import annotations

import torch
from recbole.data.interaction import Interaction

from recbole_mdcns.config import packaged_yaml, require_one
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.losses import log_q_corrected
from recbole_mdcns.registry import register_sampler
from recbole_mdcns.strategies import TopMNegative


def pool_log_q(weights: torch.Tensor) -> torch.Tensor:
    """``[n_items]`` ``log q(v)`` of a pool drawn with probability proportional to ``weights`` (the sampler's
    ``count(v)^alpha``). Items of weight 0 are never drawn; they can still be a row's positive, so their
    weight is floored at the smallest positive one (a finite logit). The pool excludes the row's user's
    history, which rescales ``q`` by a per-row constant: it cancels in the row's softmax."""
    weights = weights.double()
    floor = weights[weights > 0].min()
    return (weights.clamp_min(floor).log() - weights.sum().log()).float()


class PoolDrawModule(NegativeSamplingModule):
    """``uniform`` and ``popularity``: each row trains on every draw of its pool (``candidate_num == neg_num``),
    no scoring; under ``neg_loss: softmax`` the logits carry the pool's log-q correction."""

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.log_q: torch.Tensor | None = None  # None: a uniform pool (no correction needed)

    @staticmethod
    def validate_config(config) -> None:
        name = config["neg_sampler"]
        require_one(config, "top_m", name, "its negatives are drawn, not scored",
                    hint="; for DNS(M, N) use neg_sampler=dns")
        if config["candidate_num"] != config["neg_num"]:
            raise ValueError(
                f"candidate_num must equal neg_num for neg_sampler={name}: every draw of its pool is a negative, "
                f"unscored; got candidate_num={config['candidate_num']}, neg_num={config['neg_num']} -- set both "
                f"to the number of negatives per row (for a scored pool use neg_sampler=dns)")

    def on_fit_start(self) -> None:
        sampler = self.trainer.datamodule.train_data._sampler
        self.set_pool_weights(sampler.item_weights if sampler.distribution == "popularity" else None)

    def set_pool_weights(self, weights: torch.Tensor | None) -> None:
        """The pool's item weights (``None``: uniform), for the softmax's log-q correction."""
        self.log_q = None if weights is None else pool_log_q(weights)

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        negatives = batch[CANDIDATES]
        self.record_negatives(negatives)
        scorer = self.scorer_for("self", self.model, batch)
        items = torch.cat([batch[self.model.POS_ITEM_ID].unsqueeze(1), negatives], 1)
        scores = scorer.score(self.model, batch, scorer.encode(self.model, batch), items)
        if self.config["neg_loss"] == "softmax" and self.log_q is not None:
            self.log_q = self.log_q.to(scores.device)
            scores = log_q_corrected(scores, items, self.log_q)
        return self.loss_fn(scores[:, 0], scores[:, 1:])


def check_neg_num_within_top_m(config, why: str) -> None:
    """``neg_num <= top_m`` for samplers whose K negatives are distinct draws from the top-M; ``why`` says so."""
    if config["neg_num"] > config["top_m"]:
        raise ValueError(f"neg_num must be <= top_m for neg_sampler={config['neg_sampler']} ({why}), got "
                         f"neg_num={config['neg_num']}, top_m={config['top_m']}")


class DNSModule(NegativeSamplingModule):
    """``dns``: score the pool, train on ``neg_num`` distinct candidates drawn from its top-M.

    Candidate scores for the selection need no gradient; only the positive and
    the chosen negatives are scored with one, from the same encoding.
    """

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.strategy = TopMNegative(config["top_m"])
        self.neg_num = config["neg_num"]

    @staticmethod
    def validate_config(config) -> None:
        check_neg_num_within_top_m(config, "its neg_num negatives are distinct draws from the top_m scored candidates")

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        candidates = batch[CANDIDATES]
        scorer = self.scorer_for("self", self.model, batch)
        h = scorer.encode(self.model, batch)
        if candidates.shape[1] > self.neg_num:
            with torch.no_grad():
                picked = self.strategy.select_k(scorer.score(self.model, batch, h, candidates), self.neg_num)
            negatives = candidates.gather(1, picked)
        else:
            negatives = candidates
        self.record_negatives(negatives)
        items = torch.cat([batch[self.model.POS_ITEM_ID].unsqueeze(1), negatives], 1)
        scores = scorer.score(self.model, batch, h, items)
        return self.loss_fn(scores[:, 0], scores[:, 1:])


for _name in ("uniform", "popularity"):
    register_sampler(_name, PoolDrawModule, config_file=packaged_yaml(_name))
register_sampler("dns", DNSModule, config_file=packaged_yaml("dns"))
