"""``neg_sampler: srns`` -- SRNS: a persistent candidate memory and a score-variance criterion.

Ding, Quan, Yao, Li and Jin, "Simplify and Robustify Negative Sampling for Implicit
Collaborative Filtering" (NeurIPS 2020; code github.com/dingjingtao/SRNS). False negatives tend
to keep stable predictions over training, true hard negatives do not, so SRNS prefers memory
items that both score high and *vary*. One named function per step:

==========================  ======================================================================
memory ``M_(u,i)``          ``srns_memory_size`` = S1 item ids per training target (user ``u``,
                            positive ``i``), kept across epochs
likelihood                  :func:`positive_likelihood` -- ``P_pos(k | u, i) = sigmoid(s_uk - s_ui)``,
                            the probability that memory item ``k`` outranks the row's positive
history / std               :func:`history_std` -- ``std`` of each memory item's ``P_pos`` over the
                            last ``srns_history`` = T epochs it was in the memory (the authors'
                            code: 5 epochs of scores)
variance-based sampling     :func:`variance_select` -- the negative is
                            ``argmax_{k in M} P_pos(k) + alpha_e std[P_pos(k)]``, with the warm
                            start :func:`warm_alpha` ``alpha_e = srns_alpha * min(1, e / srns_warmup)``
score-based memory update   :func:`memory_update` -- ``M`` <- S1 distinct items drawn without
                            replacement from ``M`` and the row's ``candidate_num`` = S2 fresh
                            candidates, with probability ``~ softmax(s / srns_temperature)``
==========================  ======================================================================

**Keyed by (user, target item), not by user.** ``P_pos(k | u, i)`` is defined per user and
positive. In collaborative filtering ``s_uk`` does not depend on the positive, so the paper keeps
one memory per user; in a sequential model the row's representation -- and with it every ``s_k``
-- depends on the row's prefix, and a per-user memory is re-ranked by each of the user's rows.
Measured on ml-100k (SASRec, 4 epochs, S2 = 64, ``srns_temperature`` 10, 1 and 0.1), a per-user
memory kept almost no item for two epochs (mean std of memory items < 1e-4): the criterion was
inert. Keyed by (user, target item) -- the sequential counterpart of the paper's (u, i) pair -- a
memory is read and updated once per epoch under the same prefix, so its items persist and their
per-epoch ``P_pos`` is the paper's history (same setup with S2 = 8, temperature 1 and alpha 5
from epoch 1: 26% of memory items had a std at epoch 3, and the std changed 58% of the picks).
State is bounded by training targets x S1 x (T + 2) values: it grows with interactions, not with
items. In full-sequence training a target is still one (user, item) pair; a repeated pair shares
one memory (its epoch entry is the mean over its rows).

**The variance is over the same items.** Each memory slot carries its item's history
(``[n_targets, S1, T]``, NaN = no observation): the epoch's ``P_pos`` of each memory item (scored
with the row's own encoding, as the selection needs anyway) becomes its entry at epoch end. A
surviving item keeps its history through memory updates; an item that enters the memory starts a
fresh one (``std`` = 0 until it has two epochs). The MDCNS authors' baseline script instead
indexed positions of a candidate set redrawn every epoch, so its "variance" mixed different items.
The authors' SRNS code scores a fixed per-user candidate set at every epoch end; scoring the memory
during training costs no extra encoder pass here.

**Fill before read.** A target seen for the first time gets the first S1 distinct items of its
row's candidate pool (uniform draws, as the paper's random initialisation) before its selection.

State (keys, memory, histories, the epoch's running sums) is saved in the Lightning checkpoint.
Under DDP each target's memory is taken at epoch end from the rank that updated it most, with the
epoch's ``P_pos`` sums of that memory's items added over all ranks (:mod:`.user_state`).
Randomness comes from torch's global generator, reseeded per (seed, epoch, rank): resume equals an
uninterrupted run.
"""
from __future__ import annotations


import torch
from recbole.data.interaction import Interaction

from recbole_mdcns.config import check_number, packaged_yaml, require_one
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.methods.user_state import copy_state, first_rows, take_rank, winning_rank
from recbole_mdcns.registry import register_sampler

_MERGE_CHUNK = 2048  # targets per step when matching items across ranks at the DDP merge


# --------------------------------------------------------------------------- the method's steps


def positive_likelihood(memory_scores: torch.Tensor, pos_scores: torch.Tensor) -> torch.Tensor:
    """``P_pos(k | u, i) = sigmoid(s_uk - s_ui)`` for ``[R, S]`` memory scores and ``[R]`` positive scores."""
    return torch.sigmoid(memory_scores - pos_scores.unsqueeze(1))


def history_std(history: torch.Tensor) -> torch.Tensor:
    """Standard deviation over the last dimension's observed (non-NaN) entries; 0 with fewer than two."""
    observed = ~history.isnan()
    count = observed.sum(-1)
    mean = history.nansum(-1) / count.clamp_min(1)
    spread = torch.where(observed, history - mean.unsqueeze(-1), torch.zeros_like(history))
    std = (spread.pow(2).sum(-1) / count.clamp_min(1)).sqrt()
    return torch.where(count >= 2, std, torch.zeros_like(std))


def warm_alpha(alpha: float, epoch: int, warmup: float) -> float:
    """The variance weight at ``epoch``: ``alpha * min(1, epoch / warmup)`` (``warmup = 0``: ``alpha``)."""
    return alpha if warmup <= 0 else alpha * min(1.0, epoch / warmup)


def variance_select(likelihood: torch.Tensor, std: torch.Tensor, alpha: float, valid: torch.Tensor) -> torch.Tensor:
    """Memory slot per row: ``argmax_k likelihood + alpha * std`` over the ``valid`` slots (``[R]``)."""
    criterion = likelihood + alpha * std
    return criterion.masked_fill(~valid, float("-inf")).argmax(1)


def first_occurrences(items: torch.Tensor) -> torch.Tensor:
    """``items``-shaped bool: each positive id's first occurrence in its row."""
    order = items.argsort(dim=1, stable=True)
    ordered = items.gather(1, order)
    repeat = torch.zeros_like(items, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return (items > 0) & ~torch.zeros_like(repeat).scatter(1, order, repeat)


def memory_update(scores: torch.Tensor, valid: torch.Tensor, size: int, temperature: float) -> torch.Tensor:
    """``size`` candidate positions per row drawn without replacement with probability
    ``~ softmax(scores / temperature)`` over the ``valid`` ones (Gumbel top-k); ``-1`` where a row
    has fewer valid candidates."""
    gumbel = -torch.empty_like(scores).exponential_().log()
    keys = (scores / temperature + gumbel).masked_fill(~valid, float("-inf"))
    top = keys.topk(size, dim=1)
    return torch.where(top.values > float("-inf"), top.indices, -1)


# --------------------------------------------------------------------------- Lightning module


class SRNSModule(NegativeSamplingModule):
    """``neg_sampler: srns`` (see the module docstring)."""

    user_state_why = "keeps a memory per user, updated from every row's pool"

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.size = config["srns_memory_size"]
        self.alpha = float(config["srns_alpha"])
        self.warmup = float(config["srns_warmup"])
        self.temperature = float(config["srns_temperature"])
        self.span = config["srns_history"]
        self.keys = torch.zeros(0, dtype=torch.long)          # sorted user * n_items + item of the training targets
        self.memory = torch.zeros(0, self.size, dtype=torch.long)
        self.history = torch.zeros(0, self.size, self.span)     # per-epoch mean P_pos, NaN = none
        self.epoch_sum = torch.zeros(0, self.size)              # this epoch's P_pos sums and counts
        self.epoch_count = torch.zeros(0, self.size)
        self.updates = torch.zeros(0, dtype=torch.long)         # memory updates this epoch (DDP merge)
        self.rows = self.variance_picks = 0                     # rows, and rows where std changed the pick

    @staticmethod
    def validate_config(config) -> None:
        require_one(config, "top_m", "srns", "it selects by score + variance")
        require_one(config, "neg_num", "srns",
                    "one negative per row: the memory item with the largest score + alpha * std")
        check_number(config, "srns_memory_size", 1, integer=True)
        check_number(config, "srns_alpha", 0.0)
        check_number(config, "srns_warmup", 0.0)
        check_number(config, "srns_temperature", 0.0, low_open=True)
        check_number(config, "srns_history", 2, integer=True)

    # ---- state

    def prepare(self, dataset) -> None:
        """One memory per (user, target item) of ``dataset``'s training rows (empty, no history)."""
        inter = dataset.inter_feat
        keys = torch.unique(inter[dataset.uid_field].long() * self.model.n_items + inter[dataset.iid_field].long())
        if torch.equal(keys, self.keys.cpu()):  # resumed: the checkpoint's state is this dataset's
            return
        device = self.device
        self.keys = keys.to(device)
        self.memory = torch.zeros(len(keys), self.size, dtype=torch.long, device=device)
        self.history = torch.full((len(keys), self.size, self.span), float("nan"), device=device)
        self.epoch_sum = torch.zeros(len(keys), self.size, device=device)
        self.epoch_count = torch.zeros(len(keys), self.size, device=device)
        self.updates = torch.zeros(len(keys), dtype=torch.long, device=device)

    def on_fit_start(self) -> None:
        self.prepare(self.trainer.datamodule.train_data._dataset)

    def _to_device(self, device) -> None:
        if self.memory.device != device:
            for name in ("keys", "memory", "history", "epoch_sum", "epoch_count", "updates"):
                setattr(self, name, getattr(self, name).to(device))

    def target_index(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Row of each (user, target item) in the state tables; a pair outside training is an error."""
        query = users.long() * self.model.n_items + items.long()
        index = torch.searchsorted(self.keys, query).clamp(max=max(len(self.keys) - 1, 0))
        if len(self.keys) == 0 or not bool((self.keys[index] == query).all()):
            raise KeyError("srns: a batch row's (user, target item) is not a training target of the dataset "
                           "the sampler was prepared with")
        return index

    # ---- training

    def fill_empty(self, targets: torch.Tensor, pool: torch.Tensor) -> None:
        """Memories of ``targets`` that are empty get their row's first S1 distinct pool items."""
        first = first_rows(targets)
        empty = first[(self.memory[targets[first]] == 0).all(1)]
        if len(empty) == 0:
            return
        items = pool[empty]
        keep = first_occurrences(items)
        slot = keep.long().cumsum(1) - 1
        keep &= slot < self.size
        rows = torch.zeros(len(empty), self.size + 1, dtype=torch.long, device=items.device)
        rows.scatter_(1, torch.where(keep, slot, self.size), torch.where(keep, items, 0))
        self.memory[targets[empty]] = rows[:, :self.size]
        self.history[targets[empty]] = float("nan")

    def update_memory(self, targets: torch.Tensor, pool: torch.Tensor, scores: torch.Tensor) -> None:
        """Score-based memory update from the first row of each target: ``scores`` are ``[R, S1 + S2]``
        over ``[memory | pool]``; surviving items keep their history and this epoch's sums."""
        first = first_rows(targets)
        owners = targets[first]
        candidates = torch.cat([self.memory[owners], pool[first]], 1)
        pick = memory_update(scores[first], first_occurrences(candidates), self.size, self.temperature)
        kept = pick >= 0
        index = pick.clamp_min(0)
        extra = pool.shape[1]
        history = torch.cat([self.history[owners], self.history.new_full((len(first), extra, self.span),
                                                                         float("nan"))], 1)
        sums = torch.cat([self.epoch_sum[owners], self.epoch_sum.new_zeros(len(first), extra)], 1)
        counts = torch.cat([self.epoch_count[owners], self.epoch_count.new_zeros(len(first), extra)], 1)
        self.memory[owners] = torch.where(kept, candidates.gather(1, index), 0)
        self.history[owners] = torch.where(kept.unsqueeze(2), history.gather(
            1, index.unsqueeze(2).expand(-1, -1, self.span)), float("nan"))
        self.epoch_sum[owners] = torch.where(kept, sums.gather(1, index), 0.0)
        self.epoch_count[owners] = torch.where(kept, counts.gather(1, index), 0.0)
        self.updates[owners] += 1

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        model = self.model
        pool, positives = batch[CANDIDATES], batch[model.POS_ITEM_ID]
        self._to_device(pool.device)
        targets = self.target_index(batch[model.USER_ID], positives)
        scorer = self.scorer_for("self", model, batch)
        h = scorer.encode(model, batch)
        with torch.no_grad():
            self.fill_empty(targets, pool)
            memory = self.memory[targets]
            scores = scorer.score(model, batch, h, torch.cat([positives.unsqueeze(1), memory, pool], 1))
            likelihood = positive_likelihood(scores[:, 1:1 + self.size], scores[:, 0])
            valid = memory > 0
            alpha = warm_alpha(self.alpha, self.current_epoch, self.warmup)
            slot = variance_select(likelihood, history_std(self.history[targets]), alpha, valid)
            greedy = likelihood.masked_fill(~valid, float("-inf")).argmax(1)
            self.variance_picks += int((slot != greedy).sum())
            self.rows += len(targets)
            observed = valid.float()
            self.epoch_sum.index_add_(0, targets, likelihood * observed)
            self.epoch_count.index_add_(0, targets, observed)
            negatives = memory.gather(1, slot.unsqueeze(1))
            self.update_memory(targets, pool, scores[:, 1:])
        self.record_negatives(negatives)
        trained = scorer.score(model, batch, h, torch.cat([positives.unsqueeze(1), negatives], 1))
        return self.loss_fn(trained[:, 0], trained[:, 1])

    # ---- epoch end

    def merge_ranks(self) -> None:
        """DDP: per target, the memory and history of the rank that updated it most this epoch, and the
        epoch's ``P_pos`` sums and counts of those items added up over every rank that saw them."""
        rank = winning_rank(self.all_gather(self.updates))
        memories = self.all_gather(self.memory)                  # [W, K, S1]
        sums, counts = self.all_gather(self.epoch_sum), self.all_gather(self.epoch_count)
        self.memory = take_rank(memories, rank)
        self.history = take_rank(self.all_gather(self.history), rank)
        for start in range(0, self.memory.shape[0], _MERGE_CHUNK):
            chunk = slice(start, start + _MERGE_CHUNK)
            kept = self.memory[chunk]
            same = ((memories[:, chunk].unsqueeze(2) == kept.unsqueeze(0).unsqueeze(3))
                    & (kept > 0).unsqueeze(0).unsqueeze(3))      # [W, k, slot here, slot on rank w]
            self.epoch_sum[chunk] = torch.einsum("wusr,wur->us", same.to(sums.dtype), sums[:, chunk])
            self.epoch_count[chunk] = torch.einsum("wusr,wur->us", same.to(counts.dtype), counts[:, chunk])

    def close_epoch(self, epoch: int) -> None:
        """Each slot's mean ``P_pos`` of ``epoch`` becomes its history entry ``epoch mod T`` (NaN if unread)."""
        seen = self.epoch_count > 0
        self.history[:, :, epoch % self.span] = torch.where(
            seen, self.epoch_sum / self.epoch_count.clamp_min(1), float("nan"))
        self.epoch_sum.zero_()
        self.epoch_count.zero_()
        self.updates.zero_()

    def on_train_epoch_end(self) -> None:
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if distributed:
            self.merge_ranks()
        epoch = self.current_epoch
        self.close_epoch(epoch)
        record = self.negative_report(epoch)
        counts = torch.tensor([self.rows, self.variance_picks], dtype=torch.float64, device=self.device)
        if distributed:
            counts = self.all_gather(counts).reshape(-1, 2).sum(0)
        std = history_std(self.history)[self.memory > 0]
        record.update({"variance_pick_fraction": float(counts[1] / counts[0]) if counts[0] > 0 else 0.0,
                       "memory_std_mean": float(std.mean()) if len(std) else 0.0,
                       "memory_with_history_fraction": float((std > 0).float().mean()) if len(std) else 0.0,
                       "alpha": warm_alpha(self.alpha, epoch, self.warmup)})
        self.rows = self.variance_picks = 0
        self.log_epoch(record, f"srns epoch {epoch}: alpha_e {record['alpha']:.3g}; the variance changed "
                               f"{record['variance_pick_fraction']:.1%} of the picks; memory items with a std "
                               f"{record['memory_with_history_fraction']:.1%}, mean std {record['memory_std_mean']:.4f}")

    # ---- checkpoint

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["srns"] = {name: copy_state(getattr(self, name))
                              for name in ("keys", "memory", "history", "epoch_sum", "epoch_count", "updates")}
        checkpoint["srns"].update(rows=self.rows, variance_picks=self.variance_picks)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "srns" in checkpoint:
            state = checkpoint["srns"]
            shape = tuple(state["history"].shape[1:])
            if shape != (self.size, self.span):
                raise ValueError(f"the checkpoint's SRNS memory is (srns_memory_size, srns_history) = {shape}, "
                                 f"this run's ({self.size}, {self.span}); resume with the same values")
            device = self.device
            for name in ("keys", "memory", "history", "epoch_sum", "epoch_count", "updates"):
                setattr(self, name, copy_state(state[name], device))
            self.rows, self.variance_picks = state["rows"], state["variance_picks"]


register_sampler("srns", SRNSModule, config_file=packaged_yaml("srns"))
