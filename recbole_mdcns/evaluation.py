"""Evaluating models other than the trainer's self model with RecBole's own full-sort evaluation:
a companion model (e.g. MDCNS's peer) or a score ensemble of several."""
from __future__ import annotations

from typing import Sequence

import torch
from recbole.data.interaction import Interaction


def evaluate_as(trainer, model: torch.nn.Module, valid_data):
    """RecBole's ``_valid_epoch`` of ``model`` in place of the trainer's (self) model: ``(score, result)``."""
    original = trainer.model
    trainer.model = model
    try:
        return trainer._valid_epoch(valid_data)
    finally:
        trainer.model = original


class ScoreEnsemble(torch.nn.Module):
    """Self + peer ensemble for evaluation only: the sum of the members' full-sort scores, each
    standardised per row (zero mean, unit std over the real items, padding item 0 excluded), so
    models with different score scales weigh the same. ``predict`` gathers from the same scores."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.ITEM_ID = members[0].ITEM_ID

    @staticmethod
    def standardize(scores: torch.Tensor) -> torch.Tensor:
        real = scores[:, 1:]
        return (scores - real.mean(1, keepdim=True)) / real.std(1, keepdim=True).clamp_min(1e-12)

    def full_sort_predict(self, interaction: Interaction) -> torch.Tensor:
        total = None
        for member in self.members:
            scores = member.full_sort_predict(interaction)
            scores = self.standardize(scores.view(len(interaction), -1))
            total = scores if total is None else total + scores
        return total

    def predict(self, interaction: Interaction) -> torch.Tensor:
        items = interaction[self.ITEM_ID].long().unsqueeze(1)
        return self.full_sort_predict(interaction).gather(1, items).squeeze(1)
