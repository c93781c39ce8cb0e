"""The base LightningModule of every sampler: the model(s), the scorer, the loss and the epoch's negative
statistics. Each method (``recbole_mdcns.methods``) subclasses it and defines :meth:`training_loss`."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from recbole.data.interaction import Interaction

from logging import getLogger

from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.diagnostics import item_representation, negative_stats
from recbole_mdcns.full_sequence import LOSS_SCALE
from recbole_mdcns.general import (
    GeneralScorer,
    adopt,
    build_general_scorer,
    clear_restore_caches,
    general_state,
    is_general,
    load_general_state,
    model_terms,
    rank_loss_scale,
    repeated_rows,
)
from recbole_mdcns.losses import LOSSES
from recbole_mdcns.scoring import Scorer, build_scorer

_VERIFY_COLUMNS = 4


class NegativeSamplingModule(pl.LightningModule):
    """Trains one RecBole model on sampled negatives; subclasses define :meth:`training_loss`.

    A sampler (built-in or registered with :func:`recbole_mdcns.register_sampler`) is a subclass:
    :meth:`training_loss` maps a training batch to the loss (rows: ``batch[model.USER_ID]``,
    ``batch[model.POS_ITEM_ID]``, the ``[B, N]`` pool ``batch[CANDIDATES]``; scores through
    :meth:`scorer_for`), :meth:`validate_config` checks its keys before any data is loaded,
    ``config_file`` names its YAML defaults, and Lightning's hooks (``on_train_epoch_end``,
    ``on_save_checkpoint`` / ``on_load_checkpoint``, ``setup``) hold state that spans batches.

    The optimizer is the one RecBole's trainer built (``learner``, ``learning_rate``,
    ``weight_decay``), so RecBole checkpoints hold its state as usual.
    """

    config_file: str | None = None  # YAML defaults of a sampler registered without ``config_file=``
    general_models: bool = True  # also trains RecBole's general models (recbole_mdcns.general.GENERAL_MODELS)
    general_models_why: str = ""  # why not, when ``general_models`` is False (the config error says it)
    harmless_warnings: tuple = ()  # (message, category, module) warnings this module's fit raises by design
    draws_pool: bool = True  # False: no candidate pool is drawn (``candidate_num: 0``; ``batch[CANDIDATES]`` is [B, 0])
    # why negatives outlive the row they were drawn for (a per-user store), which ``candidate_exclude: row`` forbids:
    # an item kept for one row of a user may be another row's target; empty: each row's negatives come from its pool
    user_state_why: str = ""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config) -> None:
        super().__init__()
        self.model = adopt(model)
        self.optimizer = optimizer
        self.config = config
        self.loss_fn = LOSSES[config["neg_loss"]]
        self.scorers: dict[str, Scorer] = {}
        self.epoch_loss = 0.0
        self.negative_counts = torch.zeros(model.n_items, dtype=torch.long)  # this epoch, this rank
        self.ever_used = torch.zeros(model.n_items, dtype=torch.bool)
        self.negative_history: list[dict] = []
        self.step_negatives: torch.Tensor | None = None  # this step's first recorded negatives (general models)

    def scored_models(self) -> dict[str, torch.nn.Module]:
        """Every model this module encodes batches with, by scorer name (``self``; MDCNS adds its peer
        and frozen teachers). The full-sequence path is taken only when all of them qualify."""
        return {"self": self.model}

    def prepare_scorers(self, probe: Interaction) -> None:
        """Choose and verify the scorer of every scored model on ``probe``, a real prefix-row batch."""
        for name, model in self.scored_models().items():
            self.scorer_for(name, model, probe)

    def scorer_for(self, name: str, model: torch.nn.Module, batch: Interaction) -> Scorer:
        """The scorer of ``model``: chosen and verified against ``predict`` before training
        (:meth:`prepare_scorers`), or on the first batch it sees."""
        if name not in self.scorers:
            adopt(model)
            build = build_general_scorer if is_general(model) else build_scorer
            self.scorers[name] = build(model, batch, self.verification_items(model, batch))
        return self.scorers[name]

    def verification_items(self, model: torch.nn.Module, batch: Interaction) -> torch.Tensor:
        """``[B, k]`` items a scorer is checked on against ``model.predict``: each row's positive and the
        first candidates of its pool."""
        return torch.cat([batch[model.POS_ITEM_ID].unsqueeze(1), batch[CANDIDATES][:, :_VERIFY_COLUMNS]], 1)

    @staticmethod
    def validate_config(config) -> None:
        """Check this method's own config keys; raise ``ValueError`` naming the key and valid values."""

    def after_validation(self, trainer, valid_data) -> None:
        """Called after each validation of the self model (e.g. to also report a peer)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """RecBole's ``clip_grad_norm``, all of it (``norm_type`` too, which Lightning's own clipping lacks), over
        the parameters the optimizer steps; the trainer passes its ``max_norm`` as ``gradient_clip_val``."""
        if gradient_clip_val is None:
            return
        params = [param for group in optimizer.param_groups for param in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, **dict(self.config["clip_grad_norm"] or {"max_norm": gradient_clip_val}))

    def transfer_batch_to_device(self, batch: Interaction, device: torch.device, dataloader_idx: int) -> Interaction:
        return batch.to(device)

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        raise NotImplementedError

    def step_loss(self, batch: Interaction) -> torch.Tensor:
        """The batch's loss: :meth:`training_loss`; for a general model with its own loss terms around it
        (:meth:`with_model_terms`), its full-sort caches dropped before and after, as its
        ``calculate_loss`` drops them."""
        if not is_general(self.model):
            return self.training_loss(batch)
        self.step_negatives = None
        for model in self.scored_models().values():
            clear_restore_caches(model)
        return self.with_model_terms(batch, self.training_loss(batch))

    def training_step(self, batch: Interaction, batch_idx: int) -> torch.Tensor:
        loss = self.step_loss(batch)
        self.epoch_loss += loss.item()
        self.log("loss", loss, prog_bar=True, batch_size=len(batch[CANDIDATES]))
        if LOSS_SCALE in batch.interaction:  # DDP, all positions: the global batch's mean over its targets
            loss = loss * batch[LOSS_SCALE][0]
        return loss

    def with_model_terms(self, batch: Interaction, loss: torch.Tensor) -> torch.Tensor:
        """A general model's step: the sampler's ``loss`` weighed as the model's own BPR term, plus the other
        terms of its ``calculate_loss`` (regulariser, SGL's SSL, NCL's contrastive losses; see
        :mod:`recbole_mdcns.general`) for every trained model this step propagated, over the step's first
        recorded negatives (:meth:`record_negatives`); then the step's propagations and the models'
        full-sort caches are dropped."""
        users, pos = batch[self.model.USER_ID], batch[self.model.POS_ITEM_ID]
        neg_num = 1 if self.step_negatives is None else self.step_negatives.reshape(len(users), -1).shape[1]
        loss = loss * rank_loss_scale(self.model, len(users), neg_num, self.config["neg_loss"])
        epoch = self.current_epoch if self._trainer is not None else 0
        for name, model in self.scored_models().items():
            scorer = self.scorers.get(name)
            if not isinstance(scorer, GeneralScorer) or scorer.step is None:
                continue
            if self.step_negatives is not None and any(p.requires_grad for p in model.parameters()):
                terms = model_terms(model, scorer.step, *repeated_rows(users, pos, self.step_negatives), epoch,
                                    self.config["warm_up_step"])
                if terms is not None:
                    loss = loss + terms.reshape(())
            scorer.end_step()
            clear_restore_caches(model)
        return loss

    def record_negatives(self, ids: torch.Tensor) -> None:
        """Count the negative item ids rows trained on this epoch (ids <= 0 are ignored). The first ids
        recorded in a step (``[B]`` or ``[B, K]``) are the negatives a general model's own loss terms
        (its regulariser) run over."""
        if self.step_negatives is None:
            self.step_negatives = ids.detach()
        ids = ids.detach().reshape(-1)
        if self.negative_counts.device != ids.device:
            self.negative_counts, self.ever_used = self.negative_counts.to(ids.device), self.ever_used.to(ids.device)
        self.negative_counts.index_add_(0, ids.clamp_min(0), (ids > 0).long())

    def negative_report(self, epoch: int) -> dict:
        """This epoch's negatives (all ranks): mean pairwise cosine distance of their item vectors,
        fraction of the catalogue used this epoch and ever; appended to ``negative_history``."""
        counts = self.negative_counts
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        self.ever_used |= counts > 0
        generator = torch.Generator(device=counts.device).manual_seed(int(self.config["seed"] or 0) + epoch)
        try:
            vectors = item_representation(self.model, self.scorers.get("self")).to(counts.device)
        except TypeError:  # no item vectors (generic path without embeddings): counts only
            vectors = torch.zeros(len(counts), 1, device=counts.device)
        record = {"epoch": epoch, **self.epoch_negative_stats(vectors, counts, generator),
                  "catalogue_fraction_ever": int(self.ever_used[1:].sum()) / max(len(self.ever_used) - 1, 1)}
        self.negative_counts.zero_()
        self.negative_history.append(record)
        return record

    def epoch_negative_stats(self, vectors: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> dict:
        """:func:`~recbole_mdcns.diagnostics.negative_stats` of the epoch's negatives, given as per-item ``counts``."""
        used = torch.arange(len(counts), device=counts.device).repeat_interleave(counts)
        return negative_stats(vectors, used, generator=generator)

    def on_train_epoch_end(self) -> None:
        self.log_epoch(self.negative_report(self.current_epoch), f"epoch {self.current_epoch}")

    def log_epoch(self, record: dict, headline: str) -> None:
        """Rank 0 logs ``headline`` (the epoch and a method's own figures), then the epoch's negatives."""
        if self._trainer is None or self.trainer.is_global_zero:
            getLogger().info(
                f"{headline}; negatives: mean pairwise cosine distance {record['mean_pairwise_cosine_distance']:.4f}, "
                f"catalogue used {record['catalogue_fraction']:.1%} (ever {record['catalogue_fraction_ever']:.1%})")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["negatives"] = {"counts": self.negative_counts.clone().cpu(),
                                   "ever_used": self.ever_used.clone().cpu(),
                                   "history": [dict(record) for record in self.negative_history]}
        state = {name: general_state(model) for name, model in self.scored_models().items() if is_general(model)}
        if any(state.values()):
            checkpoint["general_models"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "negatives" in checkpoint:
            state = checkpoint["negatives"]
            self.negative_counts, self.ever_used = state["counts"].clone(), state["ever_used"].clone()
            self.negative_history = [dict(record) for record in state["history"]]
        models = self.scored_models()
        for name, state in checkpoint.get("general_models", {}).items():
            load_general_state(models[name], state)

    def pop_epoch_loss(self) -> float:
        """Sum of this epoch's batch losses (RecBole's ``train loss``), then reset."""
        loss, self.epoch_loss = self.epoch_loss, 0.0
        return loss
