"""Scoring a candidate pool with one encoder pass per model.

A scorer ``encode``\\ s a batch once (``h``) and then ``score``\\ s any ``[B, K]`` item
tensor against it. :func:`build_scorer` picks the one-pass scorer of the model,
checks it once on a real batch in eval mode against the model's own ``predict``
(to 1e-5), and falls back to :class:`PredictScorer` if it fails; the run's log
says which path the model took and why.

Paths for RecBole 1.2.1's sequential models (those with a BPR mode):

* :class:`DotScorer` -- ``h · E[v]`` with ``h = model.forward(...)`` (its arguments
  found by name: ``item_seq``/``seq_item``, ``item_seq_len``/``seq_item_len``,
  ``user``) and ``E = model.item_embedding``: Caser, FDSA, FEARec, FOSSIL, GCSAN,
  GRU4Rec, GRU4RecF, GRU4RecKG, HRM, LightSANs, NARM, NextItNet, SASRec, SASRecF,
  SINE, SRGNN, STAMP. A ``forward`` returning ``[B, L, d]`` is read at
  ``item_seq_len - 1``.
* Model-specific one-pass scorers, each reproducing that model's ``predict``:
  BERT4Rec (mask token appended, output bias), S3Rec (causal attention), SHAN
  (reversed sequence), NPE (``relu(E)``), HGN (its prediction table), FPMC (MF +
  FMC as one dot product) and TransRec (``bias - ||h - E||``).
* :class:`PredictScorer` -- everything else (e.g. KSR, whose items go through the
  KG): ``predict`` on each row repeated once per candidate; correct for any model,
  ``K`` times the encoder work.
"""
from __future__ import annotations

import inspect
from logging import getLogger

import torch
from recbole.data.interaction import Interaction

TOLERANCE = 1e-5
# DotScorer scores a [B, K] pool against the whole catalogue (one matmul, then a gather) when the
# catalogue has at most this many items per pool item. benchmarks/studies/pool_scoring.py, one CPU core,
# B = 2048, d = 64, K = 101, forward + backward: the gathered bmm 88-116 ms whatever the catalogue, the
# full matmul 33 ms at 1.7k items (ml-100k), 57 ms at 3.6k (LastFM), 297 ms at 12k (Beauty): break-even ~60 K.
FULL_CATALOGUE_RATIO = 50
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

    def score_all(self, model, interaction: Interaction, state) -> torch.Tensor:
        """``[B, n_items]``: every item of the catalogue (the padding id 0 included) scored against ``state``."""
        items = torch.arange(model.n_items, device=interaction[model.POS_ITEM_ID].device)
        return self.score(model, interaction, state, items.expand(len(interaction[model.POS_ITEM_ID]), -1))

    def __call__(self, model, interaction: Interaction, items: torch.Tensor) -> torch.Tensor:
        return self.score(model, interaction, self.encode(model, interaction), items)


class DotScorer(Scorer):
    """``s(v) = h · E[v]`` with ``h = model.forward(...)``: one encoder pass per batch.

    Subclasses adapt ``encode`` (how ``h`` is read) and ``item_vectors`` (``E[v]``).
    """

    path = "dot-product h·E[items] (one encoder pass)"

    def __init__(self, model) -> None:
        params = inspect.signature(model.forward).parameters.values()
        required = [p.name for p in params if p.default is inspect.Parameter.empty]
        unknown = [name for name in required if name not in _FORWARD_ARGS]
        if unknown or not isinstance(getattr(model, "item_embedding", None), torch.nn.Embedding):
            raise TypeError(f"forward({', '.join(required)}) / item_embedding not usable")
        self.fields = [getattr(model, _FORWARD_ARGS[name]) for name in required]

    def encode(self, model, interaction: Interaction) -> torch.Tensor:
        h = model.forward(*(interaction[field] for field in self.fields))
        if h.dim() == 3:  # [B, L, d]: the representation after the last item
            h = model.gather_indexes(h, interaction[model.ITEM_SEQ_LEN] - 1)
        return h

    def item_vectors(self, model, items: torch.Tensor) -> torch.Tensor:
        return model.item_embedding(items)

    def score(self, model, interaction: Interaction, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``h · E[items]``: one ``[B, n_items]`` matmul and a gather for a small catalogue (see
        :data:`FULL_CATALOGUE_RATIO`), else a batched product with the gathered item vectors."""
        if items.shape[1] * FULL_CATALOGUE_RATIO >= model.n_items:
            table = self.item_vectors(model, torch.arange(model.n_items, device=items.device))
            return (h @ table.T).gather(1, items)
        return torch.bmm(self.item_vectors(model, items), h.unsqueeze(-1)).squeeze(-1)

    def score_all(self, model, interaction: Interaction, h: torch.Tensor) -> torch.Tensor:
        """``h · E.T``: the whole catalogue in one ``[B, n_items]`` matmul."""
        return h @ self.item_vectors(model, torch.arange(model.n_items, device=h.device)).T


class BERT4RecScorer(DotScorer):
    """``predict``: the mask token after the last item (sequence shifted left by one, as
    ``reconstruct_test_data``), the output there, ``h · E[v] + output_bias[v]``.

    BERT4Rec thus trains on the next-item task (its fine-tuning samples); the Cloze
    positives/negatives of its ``mask_itemseq`` transform are not used.
    """

    path = "BERT4Rec one pass: mask token appended, h·E[items] + output_bias"

    def encode(self, model, interaction: Interaction) -> torch.Tensor:
        seq, length = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
        masked = torch.cat([seq, torch.zeros_like(seq[:, :1])], 1)
        masked = masked.scatter(1, length.unsqueeze(1), model.mask_token)[:, 1:]
        return model.gather_indexes(model.forward(masked), length - 1)

    def score(self, model, interaction: Interaction, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return super().score(model, interaction, h, items) + model.output_bias[items]

    def score_all(self, model, interaction: Interaction, h: torch.Tensor) -> torch.Tensor:
        return super().score_all(model, interaction, h) + model.output_bias


class S3RecScorer(DotScorer):
    """``predict`` (fine-tuning): causal attention (``forward(seq, bidirectional=False)``)."""

    path = "S3Rec one pass: causal encoder, h·E[items]"

    def encode(self, model, interaction: Interaction) -> torch.Tensor:
        out = model.forward(interaction[model.ITEM_SEQ], bidirectional=False)
        return model.gather_indexes(out, interaction[model.ITEM_SEQ_LEN] - 1)


class SHANScorer(DotScorer):
    """``predict`` encodes the reversed sequence (``INVERSE_ITEM_SEQ``) with the user."""

    path = "SHAN one pass: reversed sequence, h·E[items]"

    def encode(self, model, interaction: Interaction) -> torch.Tensor:
        return model.forward(interaction[model.INVERSE_ITEM_SEQ], interaction[model.USER_ID])


class NPEScorer(DotScorer):
    """``predict``: ``h · relu(E[v])``."""

    path = "NPE one pass: h·relu(E[items])"

    def item_vectors(self, model, items: torch.Tensor) -> torch.Tensor:
        return torch.relu(model.item_embedding(items))


class HGNScorer(DotScorer):
    """``predict`` scores items with a separate table, ``item_embedding_for_prediction``."""

    path = "HGN one pass: h·E_pred[items]"

    def item_vectors(self, model, items: torch.Tensor) -> torch.Tensor:
        return model.item_embedding_for_prediction(items)


class FPMCScorer(DotScorer):
    """``predict = <UI[u], IU[v]> + <LI[last], IL[v]>`` = ``[UI[u], LI[last]] · [IU[v], IL[v]]``."""

    path = "FPMC one pass: [UI(user), LI(last)]·[IU(items), IL(items)]"

    def __init__(self, model) -> None:
        self.fields = []

    def encode(self, model, interaction: Interaction) -> torch.Tensor:
        seq, length = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
        last = seq.gather(1, (length - 1).unsqueeze(1)).squeeze(1)
        return torch.cat([model.UI_emb(interaction[model.USER_ID]), model.LI_emb(last)], -1)

    def item_vectors(self, model, items: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.IU_emb(items), model.IL_emb(items)], -1)


class TransRecScorer(DotScorer):
    """``predict``: ``bias[v] - ||h - E[v]||`` (a translation distance, not a dot product)."""

    path = "TransRec one pass: bias[items] - ||h - E[items]||"

    def score(self, model, interaction: Interaction, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        distance = (h.unsqueeze(1) - model.item_embedding(items)).pow(2).sum(-1).sqrt()
        return model.bias(items).squeeze(-1) - distance

    def score_all(self, model, interaction: Interaction, h: torch.Tensor) -> torch.Tensor:
        """Every item through :meth:`score` (a distance, not a matmul)."""
        return Scorer.score_all(self, model, interaction, h)


MODEL_SCORERS = {
    "BERT4Rec": BERT4RecScorer,
    "S3Rec": S3RecScorer,
    "SHAN": SHANScorer,
    "NPE": NPEScorer,
    "HGN": HGNScorer,
    "FPMC": FPMCScorer,
    "TransRec": TransRecScorer,
}


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


def one_pass_scorer(model) -> type[DotScorer]:
    """The one-pass scorer class for ``model`` (by its class or a RecBole base class)."""
    from recbole_mdcns.general import GeneralScorer, is_general  # the general scorer builds on this module

    if is_general(model):
        return GeneralScorer
    for cls in type(model).__mro__:
        if cls.__name__ in MODEL_SCORERS:
            return MODEL_SCORERS[cls.__name__]
    return DotScorer


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
    name = type(model).__name__
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = _predict_columns(model, interaction, items)
            try:
                scorer: Scorer = one_pass_scorer(model)(model)
                got = scorer(model, interaction, items)
                diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
                if not diff <= TOLERANCE * max(1.0, expected.abs().max().item()):
                    raise ValueError(f"{type(scorer).__name__} differs from predict() by {diff:.3g}")
            except (TypeError, RuntimeError, ValueError, IndexError, KeyError, AttributeError) as reason:
                scorer = PredictScorer()
                got = scorer(model, interaction, items)
                if not torch.allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE):
                    raise RuntimeError(f"{name}: predict() is not deterministic in eval mode")
                logger.info(f"scoring {name}: {scorer.path} ({reason})")
                return scorer
    finally:
        model.train(was_training)
    logger.info(f"scoring {name}: {scorer.path}, verified against predict() (max diff {diff:.2g})")
    return scorer
