"""``neg_sampler: mdcns`` -- Multi-source Divergence-Consensus Negative Sampling.

Li et al., "Divergence Meets Consensus: A Multi-Source Negative Sampling Framework
for Sequential Recommendation" (SIGIR 2026); our restatement and decisions are in
``shared/design/mdcns.md``. Every equation has one named function below:

=========  ==========================================================================
Eq. 2      candidate pool ``C_N`` -- :mod:`recbole_mdcns.data` (``batch[CANDIDATES]``)
Eq. 3      :func:`pool_scores` -- ``s(v) = h . e_v`` for ``[v+ | C_N]``, one encoder pass
Eq. 4      :func:`teacher_scores` -- aggregation of self, peer (and frozen extra) scores
Eq. 5      :func:`divergence` -- ``d(v) = |s_self(v) - s_peer(v)|``
Eq. 6      :func:`rerank` -- ``s~(v) = s(v) + beta_div * d(v)`` per view
Eqs. 7-8   :func:`hard_negatives` -- one negative drawn uniformly from each view's top-M
Eqs. 9-10  :func:`ranking_loss` -- ``alpha L(n_self) + beta L(n_peer) + gamma L(n_teacher)``
Eqs. 11-12 :func:`distillation_loss` -- ``tau^2 KL(p_teacher || p_student)``
Eq. 13     :func:`total_loss` -- ``L = L_rec + mu L_dis``
=========  ==========================================================================

:func:`mdcns_losses` chains them for the self model and, with the roles of self and
peer swapped, for the peer (paper footnote 1). Decisions where the paper is silent:

* ``mdcns_teacher_agg: mean`` (authors' code; the paper writes the sum). Same ranking,
  but the sum sharpens the teacher's softmax by the number of sources.
* ``mdcns_kl_include_positive: true``: the softmax of Eqs. 11-12 runs over
  ``[v+ | C_N]`` as in the authors' released code (which produced the published
  numbers); ``false`` gives the paper's ``C_N`` only.
* ``mdcns_kl_reduction``: ``mean`` (default) -- the KL is summed over the softmax items
  and averaged over rows (like the ranking losses), so ``mu`` does not depend on the
  batch size or on the number of DDP ranks; ``batch_sum`` -- summed over the rows of the
  global batch too, as the authors' code does (``kd_gamma * tau^2 * F.kl_div(log_p_student,
  p_teacher, reduction='sum')``, their ``kd_gamma`` = our ``mdcns_mu``): each row then weighs
  ``mu * B`` in the ``mean`` convention (0.01 at B = 1024 is ``mean`` with 10.24), and the
  last, partial batch weighs less. Under DDP the sum is the global batch's
  (:meth:`MDCNSModule.kl_factor`); with ``train_positions: all`` it runs over the trained targets.
* The three negatives are drawn once per row and shared by both models: the peer's
  ``alpha`` term uses the peer's own view, its ``beta`` term the self model's view.
* Extra frozen teachers only join the teacher (Eq. 4); the divergence stays self-vs-peer.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from numbers import Real
from typing import Sequence

import torch
import torch.nn.functional as F
from recbole.config import Config
from recbole.data.interaction import Interaction
from recbole.utils import ModelType, dict2str, set_color

from recbole_mdcns.companion_models import build_companion, load_frozen_model
from recbole_mdcns.config import NO_BPR_MODELS, check_bool, packaged_yaml, require_one
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.evaluation import ScoreEnsemble, evaluate_as
from recbole_mdcns.full_sequence import LOSS_SCALE
from recbole_mdcns.general import GENERAL_MODELS
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.losses import LossFn
from recbole_mdcns.models import sequential_model_class
from recbole_mdcns.quiet import FROZEN_IN_EVAL_MODE
from recbole_mdcns.registry import register_sampler
from recbole_mdcns.strategies import MultiViewTopMNegative

TEACHER_AGGS = ("mean", "sum")
KL_REDUCTIONS = ("mean", "batch_sum")
VIEWS = ("self", "peer", "teacher")
WEIGHT_KEYS = ("alpha", "beta", "gamma", "beta_div", "mu")
# Config keys are prefixed: FOSSIL, KSR and FEARec read ``alpha``, ``gamma`` and ``tau`` themselves.
KEY = {name: f"mdcns_{name}" for name in (*WEIGHT_KEYS, "tau")}
_PEER_SEED_OFFSET = 10007
_FORBIDDEN_PEER_KEYS = ("model", "dataset", "MODEL_TYPE", "neg_sampler")


# --------------------------------------------------------------------------- equations
def pool_scores(scorer, model, batch: Interaction, items: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``s(v) = h . e_v`` for every item of ``items`` (``[B, K]``), ``h`` encoded once.

    MDCNS scores ``items = [v+ | C_N]`` so that the positive, the ranking-loss negatives
    and the distillation softmax all reuse these scores (no second forward pass).
    """
    return scorer(model, batch, items)


def teacher_scores(sources: Sequence[torch.Tensor], agg: str = "mean") -> torch.Tensor:
    """Eq. 4: the teacher's scores, ``mean`` (default, authors' code) or ``sum`` (paper) of the sources.

    ``sources`` are same-shaped score tensors: self, peer and any frozen extra teachers.
    The caller passes detached tensors; the teacher never receives a gradient.
    """
    if agg not in TEACHER_AGGS:
        raise ValueError(f"mdcns_teacher_agg must be one of {list(TEACHER_AGGS)}, got {agg!r}")
    stacked = torch.stack(list(sources))
    return stacked.mean(0) if agg == "mean" else stacked.sum(0)


def divergence(s_self: torch.Tensor, s_peer: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``d(v) = |s_self(v) - s_peer(v)|``, how much self and peer disagree on ``v``."""
    return (s_self - s_peer).abs()


def rerank(scores: torch.Tensor, d: torch.Tensor, beta_div: float) -> torch.Tensor:
    """Eq. 6: ``s~(v) = s(v) + beta_div * d(v)`` (``beta_div = 0``: no re-ranking)."""
    return scores + beta_div * d if beta_div else scores


def hard_negatives(views: Sequence[torch.Tensor], strategy: MultiViewTopMNegative,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Eqs. 7-8: per view, one pool index drawn uniformly from its top-M re-ranked scores; ``[B, V]``."""
    with torch.no_grad():
        return strategy.select(views, generator)


def ranking_loss(pos: torch.Tensor, pool: torch.Tensor, negatives: torch.Tensor,
                 weights: Sequence[float], loss_fn: LossFn) -> torch.Tensor:
    """Eqs. 9-10: ``sum_j w_j * L(s(v+), s(n_j))`` with every negative scored by the trained model.

    ``pos`` ``[B]`` and ``pool`` ``[B, N]`` are the trained model's scores, ``negatives``
    ``[B, V]`` pool indices (one column per view), ``weights`` one per view
    (``alpha, beta, gamma`` for the view order of the trained model). A zero weight
    drops its term.
    """
    neg_scores = pool.gather(1, negatives)
    total = pos.new_zeros(())
    for j, weight in enumerate(weights):
        if weight:
            total = total + weight * loss_fn(pos, neg_scores[:, j])
    return total


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float,
                      reduction: str = "mean") -> torch.Tensor:
    """Eqs. 11-12: ``tau^2 * KL(p_teacher || p_student)``, ``p = softmax(s / tau)`` over the last dim.

    The teacher is detached. Summed over the softmax items, then over rows: averaged
    (``reduction="mean"``) or summed (``"batch_sum"``, the authors' ``reduction='sum'``).
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"mdcns_kl_reduction must be one of {list(KL_REDUCTIONS)}, got {reduction!r}")
    log_p_student = F.log_softmax(student.float() / tau, -1)
    log_p_teacher = F.log_softmax(teacher.detach().float() / tau, -1)
    per_row = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return tau * tau * (per_row.mean() if reduction == "mean" else per_row.sum())


def total_loss(rec: torch.Tensor, dis: torch.Tensor, mu: float) -> torch.Tensor:
    """Eq. 13: ``L = L_rec + mu * L_dis`` (``mu = 0``: no distillation)."""
    return rec + mu * dis if mu else rec


@dataclass
class MDCNSLosses:
    """Both models' loss terms for one batch, and the negatives they were trained on."""

    self_rec: torch.Tensor
    self_dis: torch.Tensor
    peer_rec: torch.Tensor
    peer_dis: torch.Tensor
    self_total: torch.Tensor
    peer_total: torch.Tensor
    negatives: torch.Tensor  # [B, 3] pool indices of the self / peer / teacher views' negatives


def mdcns_losses(s_self: torch.Tensor, s_peer: torch.Tensor, extra: Sequence[torch.Tensor] = (), *,
                 strategy: MultiViewTopMNegative, loss_fn: LossFn, alpha: float = 1.0, beta: float = 1.0,
                 gamma: float = 1.0, beta_div: float = 1.0, tau: float = 1.0, mu: float = 1.0,
                 agg: str = "mean", include_positive: bool = True, kl_reduction: str = "mean",
                 kl_factor: float = 1.0, generator: torch.Generator | None = None) -> MDCNSLosses:
    """Eqs. 4-13 for one batch from the scores of Eq. 3, for self and (roles swapped) peer.

    ``s_self``, ``s_peer`` and each tensor of ``extra`` are ``[B, 1 + N]`` scores of
    ``[v+ | C_N]``; ``s_self``/``s_peer`` carry their model's gradient, ``extra`` none.
    ``kl_reduction`` reduces each model's KL over rows (:func:`distillation_loss`);
    ``kl_factor`` multiplies it in Eq. 13 only (``self_dis`` / ``peer_dis`` stay this batch's
    values): :meth:`MDCNSModule.kl_factor` makes a DDP rank's sum count as the global batch's.
    """
    pos_self, pool_self = s_self[:, 0], s_self[:, 1:]
    pos_peer, pool_peer = s_peer[:, 0], s_peer[:, 1:]
    with torch.no_grad():
        teacher = teacher_scores([s_self.detach(), s_peer.detach(), *(e.detach() for e in extra)], agg)
        d = divergence(pool_self.detach(), pool_peer.detach())
        views = [rerank(view, d, beta_div) for view in (pool_self.detach(), pool_peer.detach(), teacher[:, 1:])]
    negatives = hard_negatives(views, strategy, generator)
    self_rec = ranking_loss(pos_self, pool_self, negatives, (alpha, beta, gamma), loss_fn)
    # The peer's own view weighs alpha, the other model's (self) view beta: roles swapped.
    peer_rec = ranking_loss(pos_peer, pool_peer, negatives[:, [1, 0, 2]], (alpha, beta, gamma), loss_fn)
    first = 0 if include_positive else 1
    if mu:
        self_dis = distillation_loss(s_self[:, first:], teacher[:, first:], tau, kl_reduction)
        peer_dis = distillation_loss(s_peer[:, first:], teacher[:, first:], tau, kl_reduction)
    else:
        self_dis = peer_dis = s_self.new_zeros(())
    weight = mu * kl_factor
    return MDCNSLosses(self_rec, self_dis, peer_rec, peer_dis, total_loss(self_rec, self_dis, weight),
                       total_loss(peer_rec, peer_dis, weight), negatives)


# --------------------------------------------------------------------------- config checks
def _validate_peer(config) -> None:
    name = config["mdcns_peer_model"]
    if config["MODEL_TYPE"] == ModelType.GENERAL:
        if name not in GENERAL_MODELS:
            raise ValueError(f"mdcns_peer_model must be one of the general models {list(GENERAL_MODELS)} beside the "
                             f"general model {config['model']} (e.g. LightGCN beside BPR), got {name!r}")
    elif sequential_model_class(name) is None or name in NO_BPR_MODELS:
        raise ValueError(
            f"mdcns_peer_model must be the name of a RecBole sequential model with a BPR mode "
            f"(e.g. GRU4Rec, SASRec, NARM, Caser; not one of {list(NO_BPR_MODELS)}), got {name!r}"
        )
    overrides = config["mdcns_peer_config"]
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"mdcns_peer_config must be a mapping of RecBole config keys or ~, got {overrides!r}")
    overrides = overrides or {}
    forbidden = [key for key in _FORBIDDEN_PEER_KEYS if key in overrides]
    if forbidden:
        raise ValueError(f"mdcns_peer_config cannot set {forbidden}; the peer model is set by mdcns_peer_model")
    if name == "S3Rec" and overrides.get("train_stage", config["train_stage"]) != "finetune":
        raise ValueError("mdcns_peer_model S3Rec fine-tunes: set mdcns_peer_config.train_stage to 'finetune' "
                         "(and its pre_model_path)")
    if overrides.get("loss_type", "BPR") != "BPR":
        raise ValueError(f"mdcns_peer_config.loss_type must be 'BPR', got {overrides['loss_type']!r}")
    learner = str(config["learner"])
    if str(overrides.get("learner", learner)).lower() != learner.lower():
        raise ValueError(
            f"mdcns_peer_config.learner must be the run's learner {learner!r} (the peer is a param group of the "
            f"same optimizer; set its learning_rate / weight_decay instead), got {overrides['learner']!r}"
        )


def _is_number(value, low: float, strict: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        return False
    return value > low if strict else value >= low


def _validate_weights(config) -> None:
    for name in ("beta", "beta_div", "mu"):  # the paper's names; no sequential model reads them
        if config[name] is not None:
            raise ValueError(f"{name} is not read by neg_sampler=mdcns: its weights are "
                             f"{', '.join(KEY.values())}; set {KEY[name]} instead")
    for key in (KEY[name] for name in WEIGHT_KEYS):
        if not _is_number(config[key], 0, strict=False):
            raise ValueError(f"{key} must be a finite number >= 0 (0 switches its term off), got {config[key]!r}")
    if not _is_number(config[KEY["tau"]], 0, strict=True):
        raise ValueError(f"{KEY['tau']} must be a finite number > 0, got {config[KEY['tau']]!r}")
    trained = [KEY[name] for name in ("alpha", "beta", "gamma", "mu")]
    if not any(config[key] for key in trained):
        raise ValueError(f"{', '.join(trained)} cannot all be 0: nothing would be trained")
    if config["mdcns_teacher_agg"] not in TEACHER_AGGS:
        raise ValueError(f"mdcns_teacher_agg must be one of {list(TEACHER_AGGS)}, got {config['mdcns_teacher_agg']!r}")
    if config["mdcns_kl_reduction"] not in KL_REDUCTIONS:
        raise ValueError(f"mdcns_kl_reduction must be one of {list(KL_REDUCTIONS)}, "
                         f"got {config['mdcns_kl_reduction']!r}")
    for key in ("mdcns_kl_include_positive", "mdcns_eval_peer"):
        check_bool(config, key)


def _validate_teachers(config) -> None:
    teachers = config["mdcns_extra_teachers"] or []
    if not isinstance(teachers, (list, tuple)) or not all(isinstance(p, str) for p in teachers):
        raise ValueError(f"mdcns_extra_teachers must be a list of RecBole checkpoint paths or ~, got {teachers!r}")
    missing = [p for p in teachers if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"mdcns_extra_teachers: no such checkpoint file(s) {missing}")


# --------------------------------------------------------------------------- Lightning
class MDCNSModule(NegativeSamplingModule):
    """MDCNS on Lightning: self model (the run's ``--model``), peer (``mdcns_peer_model``), and the
    frozen ``mdcns_extra_teachers``, all submodules, so the Lightning checkpoint holds them all.

    The peer and teachers need the train dataset, so they are built in :meth:`setup` (before
    Lightning restores a checkpoint or wraps the module for DDP). The peer's parameters join the
    run's optimizer as their own param group (own Adam state; ``learning_rate``/``weight_decay``
    from the peer config); frozen teachers are in no group. Both models are stepped every batch
    by the same procedure, roles swapped; their losses only reach their own parameters, so one
    backward of ``L_self + L_peer`` equals two separate updates. Gradient clipping
    (``clip_grad_norm``) is applied per model, as two RecBole trainers would.
    """

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.peer: torch.nn.Module | None = None
        self.peer_config: Config | None = None
        self.teachers = torch.nn.ModuleList()
        if config["mdcns_extra_teachers"]:  # frozen: in eval mode from the start of fit, by design
            self.harmless_warnings = (FROZEN_IN_EVAL_MODE,)
        self.strategy = MultiViewTopMNegative(config["top_m"])
        self.weights = {name: float(config[key]) for name, key in KEY.items()}
        self.agg = config["mdcns_teacher_agg"]
        self.include_positive = bool(config["mdcns_kl_include_positive"])
        self.kl_reduction = config["mdcns_kl_reduction"]
        self.epoch_parts = [0.0, 0.0]
        self.extra_valid_results: list[dict] = []

    # ------------------------------------------------------------------ config
    @staticmethod
    def validate_config(config) -> None:
        """``ValueError`` naming the key and its valid values for every MDCNS key."""
        require_one(config, "neg_num", "mdcns",
                    "each row trains on one negative per view -- self, peer, teacher -- weighted by "
                    "mdcns_alpha/beta/gamma")
        _validate_peer(config)
        _validate_weights(config)
        _validate_teachers(config)

    # ------------------------------------------------------------------ models
    def setup(self, stage: str) -> None:
        if self.peer is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_data"):
            raise RuntimeError("MDCNSModule needs the train data module (RecBoleTrainData) to build its peer")
        dataset = datamodule.train_data._dataset
        self.attach(dataset)

    def attach(self, dataset) -> None:
        """Build the peer and the extra teachers on ``dataset``; add the peer's param group."""
        self.peer, self.peer_config = build_companion(self.config, dataset, self.config["mdcns_peer_model"],
                                                      self.config["mdcns_peer_config"],
                                                      self.config["seed"] + _PEER_SEED_OFFSET)
        self.peer.to(self.config["device"])
        group = {"params": list(self.peer.parameters()), "lr": self.peer_config["learning_rate"]}
        if "weight_decay" in self.optimizer.defaults:
            group["weight_decay"] = self.peer_config["weight_decay"] or 0.0
        self.optimizer.add_param_group(group)
        paths = self.config["mdcns_extra_teachers"] or []
        self.teachers = torch.nn.ModuleList(load_frozen_model(p, self.config, dataset, "mdcns_extra_teachers")
                                             for p in paths)
        self.teachers.to(self.config["device"])

    def scored_models(self) -> dict[str, torch.nn.Module]:
        return {"self": self.model, "peer": self.peer,
                **{f"teacher{i}": teacher for i, teacher in enumerate(self.teachers)}}

    def train(self, mode: bool = True):
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()
        return self

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val is None:
            return
        clip = dict(self.config["clip_grad_norm"] or {"max_norm": gradient_clip_val})
        for model in (self.model, self.peer):
            torch.nn.utils.clip_grad_norm_(model.parameters(), **clip)

    # ------------------------------------------------------------------ training
    def scores(self, batch: Interaction) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Eq. 3 for every source: ``[B, 1 + N]`` scores of ``[v+ | C_N]``, one encoder pass per model."""
        items = torch.cat([batch[self.model.POS_ITEM_ID].unsqueeze(1), batch[CANDIDATES]], 1)
        s_self = pool_scores(self.scorer_for("self", self.model, batch), self.model, batch, items)
        s_peer = pool_scores(self.scorer_for("peer", self.peer, batch), self.peer, batch, items)
        extra = []
        with torch.no_grad():
            for i, teacher in enumerate(self.teachers):
                extra.append(pool_scores(self.scorer_for(f"teacher{i}", teacher, batch), teacher, batch, items))
        return s_self, s_peer, extra

    def world_size(self) -> int:
        """Number of DDP ranks training together (1 outside a Lightning run)."""
        return self._trainer.world_size if self._trainer is not None else 1

    def kl_factor(self, batch: Interaction) -> float:
        """Multiplier of this rank's batch-summed KL so that the gradient DDP applies is the global
        batch's sum (``1`` for ``mdcns_kl_reduction: mean``, whose per-rank means the base
        ``training_step`` already weighs).

        DDP averages the ranks' gradients, and under ``train_positions: all`` the base
        ``training_step`` first multiplies rank ``r``'s loss by ``LOSS_SCALE_r = T_r W / T``
        (``T_r`` of the global batch's ``T`` targets on this rank, ``W`` ranks). A rank that
        returns ``mu * S_r * W / LOSS_SCALE_r`` (``S_r``: its KL sum) therefore contributes
        ``mu * S_r * W`` to the sum DDP divides by ``W``: the gradient is that of
        ``mu * sum_r S_r``, the single-process sum over the global batch. Prefix rows carry no
        ``LOSS_SCALE`` (each rank has ``B / W`` rows): the factor is ``W``.
        """
        if self.kl_reduction != "batch_sum":
            return 1.0
        scale = float(batch[LOSS_SCALE][0]) if LOSS_SCALE in batch.interaction else 1.0
        return self.world_size() / scale

    def losses(self, batch: Interaction) -> MDCNSLosses:
        s_self, s_peer, extra = self.scores(batch)
        w = self.weights
        return mdcns_losses(s_self, s_peer, extra, strategy=self.strategy, loss_fn=self.loss_fn,
                            alpha=w["alpha"], beta=w["beta"], gamma=w["gamma"], beta_div=w["beta_div"],
                            tau=w["tau"], mu=w["mu"], agg=self.agg, include_positive=self.include_positive,
                            kl_reduction=self.kl_reduction, kl_factor=self.kl_factor(batch))

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        """``L_self + L_peer`` (Eq. 13 for each); one backward updates both models."""
        parts = self.losses(batch)
        self.record_negatives(batch[CANDIDATES].gather(1, parts.negatives))
        self.epoch_parts[0] += parts.self_total.item()
        self.epoch_parts[1] += parts.peer_total.item()
        self.log_dict({"loss_self": parts.self_total, "loss_peer": parts.peer_total,
                       "dis_self": parts.self_dis, "dis_peer": parts.peer_dis}, batch_size=len(parts.negatives))
        return parts.self_total + parts.peer_total

    def pop_epoch_loss(self) -> tuple[float, float]:
        """RecBole's multi-part train loss: ``train_loss1`` = self model's Eq. 13 sum, ``train_loss2`` = peer's."""
        parts, self.epoch_parts = tuple(self.epoch_parts), [0.0, 0.0]
        return parts

    # ------------------------------------------------------------------ evaluation
    def after_validation(self, trainer, valid_data) -> None:
        """Also report the peer and the self+peer :class:`ScoreEnsemble` on the validation data
        (``mdcns_eval_peer: false`` skips it). Early stopping and the saved model stay the self model's."""
        if not self.config["mdcns_eval_peer"]:
            return
        record = {"epoch": self.current_epoch}
        for name, model in (("peer", self.peer), ("ensemble", ScoreEnsemble([self.model, self.peer]))):
            try:
                score, result = evaluate_as(trainer, model, valid_data)
            except NotImplementedError:
                trainer.logger.info(f"{name} not evaluated: a model has no full_sort_predict")
                continue
            record[name] = result
            self.log(f"{name}_valid_score", score, sync_dist=True)
            trainer.logger.info(set_color(f"{name} valid result", "blue") + ": \n" + dict2str(result))
        self.extra_valid_results.append(record)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # the peer/ensemble results of every validation so far, for a resume
        checkpoint["extra_valid_results"] = [
            {k: v if k == "epoch" else {metric: float(x) for metric, x in v.items()} for k, v in record.items()}
            for record in self.extra_valid_results]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.extra_valid_results = [dict(record) for record in checkpoint.get("extra_valid_results", [])]


register_sampler("mdcns", MDCNSModule, config_file=packaged_yaml("mdcns"))
