"""``neg_sampler: uniform | popularity | dns`` -- one negative per row from a scored candidate pool.

DNS (Zhang et al., SIGIR'13) scores N candidates and trains on the top one; DNS(M, N) (the MDCNS
paper's DNS+) draws one of the top M. ``uniform`` and ``popularity`` are the pool of one item
drawn from that distribution (RNS / PNS), so no scoring is needed.
"""
from __future__ import annotations

import torch
from recbole.data.interaction import Interaction

from recbole_mdcns.config import packaged_yaml
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.registry import register_sampler
from recbole_mdcns.strategies import TopMNegative


class DNSModule(NegativeSamplingModule):
    """``uniform``, ``popularity`` and ``dns``: score the pool, take one of the top-M.

    Candidate scores for the selection need no gradient; only the positive and
    the chosen negative are scored with one, from the same encoding.
    """

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.strategy = TopMNegative(config["top_m"])

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        candidates = batch[CANDIDATES]
        scorer = self.scorer_for("self", self.model, batch)
        h = scorer.encode(self.model, batch)
        if candidates.shape[1] > 1:
            with torch.no_grad():
                picked = self.strategy.select(scorer.score(self.model, batch, h, candidates))
            negatives = candidates.gather(1, picked.unsqueeze(1))
        else:
            negatives = candidates
        self.record_negatives(negatives)
        items = torch.cat([batch[self.model.POS_ITEM_ID].unsqueeze(1), negatives], 1)
        scores = scorer.score(self.model, batch, h, items)
        return self.loss_fn(scores[:, 0], scores[:, 1])


for _name in ("uniform", "popularity", "dns"):
    register_sampler(_name, DNSModule, config_file=packaged_yaml(_name))
