"""Scoring a candidate pool with one encoder pass per model.

For a model whose ``forward`` maps a sequence to a representation ``h`` and
whose ``predict`` is ``h · E[item]``, all ``[B, K]`` candidate scores come from
one ``forward`` call and a batched dot product (:class:`DotScorer`). Every model
is checked once, on a real batch in eval mode, against its own ``predict``
(to 1e-5); a model that fails the check, or that has no such ``forward``, is
scored by :class:`PredictScorer`, which calls ``predict`` on the rows repeated
once per candidate -- correct for every model, ``K`` times the encoder work.
"""
from __future__ import annotations

import inspect
from logging import getLogger

import torch
from recbole.data.interaction import Interaction

TOLERANCE = 1e-5
# forward() parameter names used across RecBole's sequential models -> config field keys
_FORWARD_ARGS = {
    "item_seq": "ITEM_SEQ",
    "seq_item": "ITEM_SEQ",
    "item_seq_len": "ITEM_SEQ_LEN",
    "seq_item_len": "ITEM_SEQ_LEN",
    "user": "USER_ID",
}


class Scorer:
    """``encode`` once per batch, then ``score`` any ``[B, K]`` item tensor."""

    path = ""

    def encode(self, model, interaction: Interaction):
        raise NotImplementedError

    def score(self, model, interaction: Interaction, state, items: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model, interaction: Interaction, items: torch.Tensor) -> torch.Tensor:
        return self.score(model, interaction, self.encode(model, interaction), items)


class DotScorer(Scorer):
    """``s(v) = h · E[v]`` with ``h = model.forward(...)``: one encoder pass per batch."""

    path = "dot-product h·E[items] (one encoder pass)"

    def __init__(self, model) -> None:
        params = inspect.signature(model.forward).parameters.values()
        required = [p.name for p in params if p.default is inspect.Parameter.empty]
        unknown = [name for name in required if name not in _FORWARD_ARGS]
        if unknown or not isinstance(getattr(model, "item_embedding", None), torch.nn.Embedding):
            raise TypeError(f"forward({', '.join(required)}) / item_embedding not usable")
        self.fields = [getattr(model, _FORWARD_ARGS[name]) for name in required]

    def encode(self, model, interaction: Interaction) -> torch.Tensor:
        return model.forward(*(interaction[field] for field in self.fields))

    def score(self, model, interaction: Interaction, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,bkd->bk", h, model.item_embedding(items))


class PredictScorer(Scorer):
    """Generic path: ``model.predict`` on each row repeated once per candidate."""

    path = "generic predict() per candidate (K encoder passes)"

    def encode(self, model, interaction: Interaction) -> None:
        return None

    def score(self, model, interaction: Interaction, state, items: torch.Tensor) -> torch.Tensor:
        batch, k = items.shape
        repeated = interaction.repeat_interleave(k)
        repeated.update(Interaction({model.ITEM_ID: items.reshape(-1)}))
        return model.predict(repeated).view(batch, k)


def _predict_columns(model, interaction: Interaction, items: torch.Tensor) -> torch.Tensor:
    columns = []
    for j in range(items.shape[1]):
        single = Interaction(dict(interaction.interaction))
        single.update(Interaction({model.ITEM_ID: items[:, j]}))
        columns.append(model.predict(single))
    return torch.stack(columns, 1)


def build_scorer(model, interaction: Interaction, items: torch.Tensor) -> Scorer:
    """The fastest scorer that reproduces ``model.predict`` on this batch; logs the path taken."""
    logger = getLogger()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = _predict_columns(model, interaction, items)
            try:
                scorer: Scorer = DotScorer(model)
                got = scorer(model, interaction, items)
                diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
                if not diff <= TOLERANCE * max(1.0, expected.abs().max().item()):
                    raise TypeError(f"h·E differs from predict() by {diff:.3g}")
            except (TypeError, RuntimeError, ValueError, IndexError) as reason:
                scorer = PredictScorer()
                got = scorer(model, interaction, items)
                if not torch.allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE):
                    raise RuntimeError(f"{type(model).__name__}: predict() is not deterministic in eval mode")
                logger.info(f"scoring {type(model).__name__}: {scorer.path} ({reason})")
                return scorer
    finally:
        model.train(was_training)
    logger.info(f"scoring {type(model).__name__}: {scorer.path}, verified against predict() (max diff {diff:.2g})")
    return scorer
