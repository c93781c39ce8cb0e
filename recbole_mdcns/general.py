"""RecBole's general (collaborative-filtering) recommenders under a sampler: one propagation per step.

The supported models (:data:`GENERAL_MODELS`) train on ``neg_item_id`` pairs in RecBole and score a
(user, item) pair by a dot product ``u · v``. Per training step :class:`GeneralScorer` runs the
model's propagation **once** (:func:`propagate`) and keeps every user and item vector of it; the
positive, the pool and the chosen negatives are then all scored as ``u · v[items]``, exactly as
the model's ``predict`` (checked on a real batch before training, :func:`build_general_scorer`).

The model's own loss terms beside its BPR term are reproduced around the sampler's loss by
:func:`model_terms`, as each model's ``calculate_loss`` computes them (RecBole 1.2.1):

============  ==================================================================================
BPR           none
LightGCN      ``reg_weight * EmbLoss(ego u, ego v+, ego v-; require_pow)``
NGCF          ``reg_weight * EmbLoss(u, v+, v-)`` on the propagated vectors
SpectralCF    as NGCF
DGCF          ``reg_weight * EmbLoss(ego ...)`` + ``cor_weight *`` distance correlation of sampled
              users' and items' factors (``n_factors > 1``)
SGL           its BPR term is a *sum* over rows (the sampler's loss is scaled by the rows,
              :func:`rank_loss_scale`), ``reg_weight * EmbLoss(ego ...)`` + its SSL loss over two
              augmented graphs (two more propagations, as SGL's own step runs)
NCL           ``reg_weight * EmbLoss(ego ...)`` + structure-contrastive loss + ProtoNCE (from epoch
              ``warm_up_step`` on, as RecBole's NCLTrainer)
============  ==================================================================================

With ``neg_num: K`` the terms run over the rows repeated K times, as RecBole's ``sample_num: K``
repeats them. With ``neg_sampler: uniform`` and one negative the total is the model's own
``calculate_loss`` on the same negatives.

The models' own per-epoch parts are kept (:func:`epoch_start`): SGL redraws its augmented graphs
when ``model.train()`` is called, once per epoch; NCL's ``e_step`` (k-means with faiss) runs every
``m_step`` epochs as RecBole's ``NCLTrainer`` runs it. :func:`clear_restore_caches` drops the
``restore_user_e`` / ``restore_item_e`` full-sort caches after every step (the models' own
``calculate_loss`` does it at the start of each), so validation never scores stale embeddings.

Hop mixing for MixGCF needs the per-layer embeddings (:attr:`Propagation.layers`): LightGCN's and
SGL's propagation loops are reproduced from their public parts (``norm_adj_matrix`` /
``train_graph``, ``get_ego_embeddings``) -- still one propagation -- NCL's ``forward`` returns them,
NGCF's and SpectralCF's outputs are the layers concatenated; BPR (no layers) and DGCF (its
``forward`` averages layers it does not expose) have none.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from logging import getLogger

import numpy as np
import torch
from recbole.data.interaction import Interaction
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.model.loss import EmbLoss

from recbole_mdcns.scoring import FULL_CATALOGUE_RATIO, TOLERANCE, DotScorer

GENERAL_MODELS = ("BPR", "LightGCN", "NGCF", "SGL", "NCL", "DGCF", "SpectralCF")
# General models RecBole trains on neg_item_id pairs that do not score by a user·item dot product
# (ConvNCF: a CNN over the outer product; GCMC: a bilinear decoder; LINE: first/second-order
# proximities; SimpleX: cosine with a history aggregation), and models without sampled negatives.
WHY_NOT = ("ConvNCF, GCMC, LINE and SimpleX do not score by a user·item dot product; the other general models "
           "(Pop, ItemKNN, EASE, MultVAE, ...) train without sampled negatives")


def is_general(model: torch.nn.Module) -> bool:
    """Whether ``model`` is one of RecBole's general recommenders."""
    return isinstance(model, GeneralRecommender)


def adopt(model: torch.nn.Module) -> torch.nn.Module:
    """Give a general model the field name sequential models read their rows' positives from:
    ``POS_ITEM_ID`` (a sequential model's is its ``ITEM_ID``, as a general model's row item is)."""
    if is_general(model) and not hasattr(model, "POS_ITEM_ID"):
        model.POS_ITEM_ID = model.ITEM_ID
    return model


def unsupported_model_message(name: str) -> str:
    """The error for a general model outside :data:`GENERAL_MODELS`."""
    return (f"model {name} is not supported by neg_sampler: it works with RecBole's sequential models and the "
            f"general models {list(GENERAL_MODELS)}, which train on neg_item_id pairs and score by a user·item "
            f"dot product ({WHY_NOT}); use neg_sampler=recbole for {name}")


@dataclass
class Propagation:
    """One propagation of a general model: every user's and item's vector, and (where the model has
    them) the per-layer embeddings ``[n_users + n_items, d_l]``, combined into ``users`` / ``items`` by
    ``combine`` (``mean`` or ``concat``)."""

    users: torch.Tensor
    items: torch.Tensor
    layers: list[torch.Tensor] | None = None
    combine: str | None = None
    extra: list[torch.Tensor] = field(default_factory=list)  # NCL: every propagated layer (its embeddings_list)


def _split(model, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    users, items = torch.split(table, [model.n_users, model.n_items])
    return users, items


def _mean_of_layers(model, ego: torch.Tensor, graph, n_layers: int) -> Propagation:
    """LightGCN's (and SGL's) propagation: ``E^(l+1) = A E^(l)``, the mean of ``E^(0..L)``
    (He et al., SIGIR'20, Eqs. 3-4)."""
    layers = [ego]
    for _ in range(n_layers):
        layers.append(torch.sparse.mm(graph, layers[-1]))
    users, items = _split(model, torch.stack(layers, 1).mean(1))
    return Propagation(users, items, layers, "mean")


def propagate(model) -> Propagation:
    """One propagation of ``model`` (a :data:`GENERAL_MODELS` model): what its ``predict`` scores with."""
    name = type(model).__name__
    if name == "BPR":
        return Propagation(model.user_embedding.weight, model.item_embedding.weight)
    if name == "LightGCN":
        return _mean_of_layers(model, model.get_ego_embeddings(), model.norm_adj_matrix, model.n_layers)
    if name == "SGL":
        ego = torch.cat([model.user_embedding.weight, model.item_embedding.weight])
        return _mean_of_layers(model, ego, model.train_graph, model.n_layers)
    if name == "NCL":
        users, items, embeddings_list = model.forward()
        return Propagation(users, items, embeddings_list[:model.n_layers + 1], "mean", embeddings_list)
    users, items = model.forward()
    if name == "NGCF":
        sizes = list(model.hidden_size_list)
    elif name == "SpectralCF":
        sizes = [model.emb_dim] * (model.n_layers + 1)
    else:  # DGCF: the mean of layers its forward does not return
        return Propagation(users, items)
    return Propagation(users, items, list(torch.split(torch.cat([users, items]), sizes, 1)), "concat")


class GeneralScorer(DotScorer):
    """``s(u, v) = u · v`` from one propagation per training step (:func:`propagate`).

    ``encode`` runs the propagation on its first call in a step (later calls in the same step reuse
    it) and returns the rows' user vectors ``[B, d]``; ``item_vectors`` reads the same step's item
    table. :meth:`end_step` closes the step; outside one, ``item_vectors`` (diagnostics, DivNS's
    kernel) reads the last step's table, detached, or propagates once without gradient.
    """

    path = "general model: u·v[items] from one propagation per step"

    def __init__(self, model) -> None:
        if type(model).__name__ not in GENERAL_MODELS:
            raise TypeError(unsupported_model_message(type(model).__name__))
        self.fields = []
        self.step: Propagation | None = None
        self.last_items: torch.Tensor | None = None
        self.propagations = 0  # propagations run in training steps (the one-per-step check)

    def propagation(self, model) -> Propagation:
        """This step's propagation, run on the first call."""
        if self.step is None:
            self.step = propagate(model)
            self.propagations += 1
        return self.step

    def end_step(self) -> None:
        """Close the step: the next ``encode`` propagates again."""
        if self.step is not None:
            self.last_items = self.step.items.detach()
        self.step = None

    def encode(self, model, interaction: Interaction) -> torch.Tensor:
        return self.propagation(model).users[interaction[model.USER_ID]]

    def score(self, model, interaction: Interaction, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``u · v[items]``. A wide pool (the full-catalogue path of :meth:`DotScorer.score`) is scored from
        one ``[distinct users, n_items]`` product: a general batch's rows are a user's training interactions,
        so users repeat (about 830 distinct in a batch of 2048 on ml-100k) and ``h`` -- :meth:`encode`'s user
        vectors -- is the same on every row of a user."""
        if items.shape[1] * FULL_CATALOGUE_RATIO < model.n_items:
            return super().score(model, interaction, h, items)
        users, inverse = torch.unique(interaction[model.USER_ID], return_inverse=True)
        rows = torch.arange(len(inverse), device=inverse.device)
        first = torch.full_like(users, len(inverse)).scatter_reduce_(0, inverse, rows, "amin")
        table = self.item_vectors(model, torch.arange(model.n_items, device=items.device))
        return (h[first] @ table.T)[inverse.unsqueeze(1), items]

    def item_vectors(self, model, items: torch.Tensor) -> torch.Tensor:
        if self.step is not None:
            return self.step.items[items]
        if self.last_items is None:
            with torch.no_grad():
                self.last_items = propagate(model).items.detach()
        return self.last_items.to(items.device)[items]


def layer_scores(model, prop: Propagation, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``[B, K, L + 1]`` per-layer scores of ``items`` ``[B, K]`` for the rows' ``users`` ``[B]``: with layers
    averaged (LightGCN, SGL, NCL) ``u · v^(l)`` for the pooled user vector ``u``, whose mean over the layers is
    ``u · v``; with layers concatenated (NGCF, SpectralCF) ``u^(l) · v^(l)``, whose sum is ``u · v``."""
    if prop.layers is None:
        raise TypeError(f"{type(model).__name__} exposes no per-layer embeddings")
    scores = []
    for layer in prop.layers:
        u = prop.users[users] if prop.combine == "mean" else layer[users]
        v = layer[model.n_users + items]
        scores.append(torch.bmm(v, u.unsqueeze(-1)).squeeze(-1))
    return torch.stack(scores, -1)


def combine_layers(prop: Propagation, scores: torch.Tensor) -> torch.Tensor:
    """Per-layer scores ``[..., L + 1]`` combined into the model's score (their mean or their sum)."""
    return scores.mean(-1) if prop.combine == "mean" else scores.sum(-1)


def build_general_scorer(model, interaction: Interaction, items: torch.Tensor) -> GeneralScorer:
    """The :class:`GeneralScorer` of ``model``, checked in eval mode against the model's own
    ``predict`` on a real batch (to :data:`~recbole_mdcns.scoring.TOLERANCE`); logs the path."""
    name = type(model).__name__
    scorer = GeneralScorer(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = []
            for j in range(items.shape[1]):
                single = Interaction(dict(interaction.interaction))
                single.update(Interaction({model.ITEM_ID: items[:, j]}))
                expected.append(model.predict(single))
            expected = torch.stack(expected, 1)
            got = scorer(model, interaction, items)
            scorer.end_step()
            scorer.last_items, scorer.propagations = None, 0
    finally:
        torch.nn.Module.train(model, was_training)  # back to its mode; SGL's train() would redraw its graphs
        clear_restore_caches(model)
    diff = (got - expected).abs().max().item()
    if not diff <= TOLERANCE * max(1.0, expected.abs().max().item()):
        raise RuntimeError(f"scoring {name}: u·v from one propagation differs from its predict() by {diff:.3g}")
    layers = scorer_layers_note(model)
    getLogger().info(f"scoring {name}: {scorer.path}, verified against predict() (max diff {diff:.2g}); {layers}")
    return scorer


def scorer_layers_note(model) -> str:
    """What the run's log says about the per-layer embeddings (MixGCF's hop mixing)."""
    name = type(model).__name__
    if name in ("BPR", "DGCF"):
        return "no per-layer embeddings (MixGCF: positive mixing only)"
    return "per-layer embeddings available (MixGCF hop mixing)"


def clear_restore_caches(model) -> None:
    """Drop a general model's full-sort caches (``restore_user_e`` / ``restore_item_e``), as its own
    ``calculate_loss`` does at every training step."""
    if getattr(model, "restore_user_e", None) is not None or getattr(model, "restore_item_e", None) is not None:
        model.restore_user_e, model.restore_item_e = None, None


def rank_loss_scale(model, rows: int, neg_num: int, neg_loss: str) -> float:
    """Multiplier of the sampler's loss (a mean over rows) so that it weighs as the model's own BPR
    term: SGL sums ``-log sigmoid(s+ - s-)`` over RecBole's rows (``rows * neg_num`` of them with
    ``sample_num: neg_num``; for ``bce`` / ``softmax``, which already sum a row's negatives, ``rows``);
    the others average, as the sampler's loss does."""
    if type(model).__name__ != "SGL":
        return 1.0
    return float(rows * (neg_num if neg_loss == "bpr" else 1))


_EMB_LOSS = EmbLoss()


def model_terms(model, prop: Propagation, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                epoch: int, warm_up_step: int | None = None) -> torch.Tensor | None:
    """The terms of ``model.calculate_loss`` beside its BPR term (see the module docstring), for the rows
    ``users`` / ``pos`` / ``neg`` (flat, equal lengths: one row per (row, negative)); ``None`` for BPR."""
    name = type(model).__name__
    if name == "BPR":
        return None
    if name in ("NGCF", "SpectralCF"):
        return model.reg_weight * _EMB_LOSS(prop.users[users], prop.items[pos], prop.items[neg])
    ego = (model.user_embedding(users), model.item_embedding(pos), model.item_embedding(neg))
    if name == "LightGCN":
        return model.reg_weight * _EMB_LOSS(*ego, require_pow=model.require_pow)
    terms = model.reg_weight * _EMB_LOSS(*ego)
    if name == "DGCF":
        if model.n_factors > 1 and model.cor_weight > 1e-9:
            from recbole.model.general_recommender.dgcf import sample_cor_samples

            cor_users, cor_items = sample_cor_samples(model.n_users, model.n_items, model.cor_batch_size)
            cor_users = torch.as_tensor(cor_users, dtype=torch.long, device=users.device)
            cor_items = torch.as_tensor(cor_items, dtype=torch.long, device=users.device)
            terms = terms + model.cor_weight * model.create_cor_loss(prop.users[cor_users], prop.items[cor_items])
        return terms
    if name == "SGL":
        user_sub1, item_sub1 = model.forward(model.sub_graph1)
        user_sub2, item_sub2 = model.forward(model.sub_graph2)
        return terms + model.calc_ssl_loss(users, pos, user_sub1, user_sub2, item_sub1, item_sub2)
    if name == "NCL":
        center, context = prop.extra[0], prop.extra[model.hyper_layers * 2]
        terms = terms + model.ssl_layer_loss(context, center, users, pos)
        if warm_up_step is None or epoch >= warm_up_step:
            terms = terms + model.ProtoNCE_loss(center, users, pos)
        return terms
    raise TypeError(unsupported_model_message(name))


def repeated_rows(users: torch.Tensor, pos: torch.Tensor, negatives: torch.Tensor):
    """``(users, pos, neg)`` flat: each row once per negative, as RecBole's ``sample_num: K`` repeats rows
    (all rows' first negative, then all second ones)."""
    negatives = negatives.reshape(len(users), -1)
    k = negatives.shape[1]
    return users.repeat(k), pos.repeat(k), negatives.t().reshape(-1)


def epoch_start(model, epoch: int, seed: int, m_step: int | None) -> None:
    """A general model's per-epoch parts at the start of training epoch ``epoch``, as RecBole's trainer
    runs them: Python's and NumPy's RNGs seeded from ``seed`` (SGL's graph augmentation and DGCF's
    correlation samples draw from them, so a resumed run repeats an uninterrupted one); ``model.train()``,
    RecBole's once-per-epoch call, where SGL redraws its augmented graphs; NCL's ``e_step`` every
    ``m_step`` epochs (RecBole's NCLTrainer: at epochs 0, m_step, 2 m_step, ...)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    model.train()
    if type(model).__name__ == "NCL" and epoch % m_step == 0:
        getLogger().info("Running E-step ! ")
        model.e_step()


def _keep_graphs() -> None:
    """SGL's ``graph_construction`` inside :func:`graphs_kept`: the graphs stay as they are."""


@contextlib.contextmanager
def graphs_kept(module: torch.nn.Module):
    """Inside the block, ``train()`` on ``module`` does not make SGL redraw its augmented graphs: RecBole
    calls ``model.train()`` once per training epoch (its start, :func:`epoch_start`); this is for the other
    calls, e.g. back to train mode after a validation."""
    models = [m for m in module.modules() if is_general(m) and hasattr(m, "graph_construction")]
    own = [model.__dict__.get("graph_construction") for model in models]  # one set on the instance, if any
    for model in models:
        model.graph_construction = _keep_graphs  # an instance attribute shadows the method
    try:
        yield
    finally:
        for model, previous in zip(models, own):
            if previous is None:
                del model.graph_construction
            else:
                model.graph_construction = previous


NCL_STATE = ("user_centroids", "user_2cluster", "item_centroids", "item_2cluster")


def general_state(model) -> dict:
    """State of a general model that its ``state_dict`` lacks (NCL's clusters), for checkpoints."""
    if type(model).__name__ != "NCL" or model.user_centroids is None:
        return {}
    return {key: getattr(model, key).detach().cpu().clone() for key in NCL_STATE}


def load_general_state(model, state: dict) -> None:
    """Restore :func:`general_state` into ``model``."""
    for key, value in state.items():
        setattr(model, key, value.to(model.device))
