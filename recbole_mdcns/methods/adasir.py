"""``neg_sampler: adasir`` -- AdaSIR: adaptive sampling by importance resampling.

Chen, Lian, Jin, Zheng and Chen, "Learning Recommenders for Implicit Feedback with Importance
Resampling" (WWW 2022). AdaSIR keeps a fixed-size sample pool per context, filled by
*sampling-importance-resampling* (SIR) from a static proposal ``q``, and trains on items drawn
uniformly from the pool, which approximates drawing them from the model's softmax
``p(j | u) ~ exp(s_uj)``. One named function per step:

===========================  =====================================================================
proposals ``j ~ q``          the row's candidate pool ``batch[CANDIDATES]`` (``candidate_num = M``
                             draws of ``candidate_distribution``: uniform or popularity^alpha over
                             the user's unseen items); ``log q`` per item from the loader's sampler
SIR weights                  :func:`importance_log_weights` -- ``w_j = softmax_j(s_uj - log q(j))``
                             over the ``M`` proposals (the paper's resampling weights)
resampling                   :func:`importance_resample` -- ``L`` draws with replacement by ``w``
pool update                  :func:`merge_pools` -- the new pool is ``L`` uniform draws from the old
                             pool and the new resample together (the authors' code: old hard
                             samples are reused with probability 1/2 per refresh); an empty pool
                             is filled outright
negatives                    :func:`draw_from_pool` -- ``K = neg_num`` slots drawn uniformly
loss weights                 :func:`importance_weights` -- ``omega_k = softmax_k(s_k / lambda -
                             log P(k))``, ``P(k)`` ~ ``w`` stored with slot ``k`` (the probability
                             with which the pool drew it); ``lambda = adasir_temperature``
loss                         :func:`weighted_pair_loss` -- ``mean_rows sum_k omega_k l(s+, s_k)``
                             with ``l`` = ``neg_loss`` (bpr | bce) on one (positive, negative) pair
===========================  =====================================================================

**The importance weights are used in the loss** (the MDCNS authors' baseline script discards
them). ``omega`` is the self-normalised importance-sampling estimate, over the ``K`` pool draws,
of the softmax-weighted ranking loss ``E_{j ~ softmax(s / lambda)} l(s+, s_j)`` -- the weighted
loss of the authors' code (``--weighted``, PRIS' loss) with the pool as the proposal. The
authors' code passes the stored weight as ``-log w`` where its other samplers pass ``log q``,
i.e. it *multiplies* by ``w``; here the proposal's log-probability is subtracted, as importance
sampling requires, so with fresh pools and ``lambda = 1`` the weights are ``~ q`` (the pool
already follows the softmax) and they correct for pools drawn with older scores. The paper's
optional positive-rank weighting is not implemented.

**Per user, not per row.** A pool is keyed by user id (``[n_users, L]``): state stays bounded
by users x ``L``, it is valid whether a batch row is a prefix row or one target of a
full-sequence window, and DDP ranks can merge it. The pool is "contextualised" by the user's
latest trained row: a row's proposals are scored with its own encoding ``h`` and refresh its
user's pool (one row per user per batch, after the row's negatives were drawn), so a row
trains on items resampled under an earlier context of the same user.

**Fill before read.** A user's pool is filled from the row's own proposals before its first
negatives are drawn (the MDCNS authors' script reads the pool before filling it, so every
epoch-0 negative is item 0).

State (pool items, their log-weights, which users have a pool) is saved in the Lightning
checkpoint and merged across DDP ranks at epoch end (:mod:`.user_state`). Randomness comes from
torch's global generator, which the trainer reseeds per (seed, epoch, rank): a resumed run draws
exactly as an uninterrupted one.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction

from recbole_mdcns.config import check_number, packaged_yaml, require_one
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.losses import LossFn
from recbole_mdcns.methods.user_state import (copy_state, first_rows, grow_rows, take_rank,
                                              winning_rank)
from recbole_mdcns.registry import register_sampler

WEIGHTABLE_LOSSES = ("bpr", "bce")  # losses over one (positive, negative) pair, so each pair can be weighted


# --------------------------------------------------------------------------- the method's steps


def importance_log_weights(scores: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """SIR weights over ``M`` proposals, in log space: ``log softmax_j(s_j - log q(j))`` (``[R, M]``)."""
    return F.log_softmax(scores - log_q, dim=1)


def importance_resample(log_w: torch.Tensor, size: int) -> torch.Tensor:
    """``[R, size]`` proposal positions drawn with replacement with probabilities ``exp(log_w)``."""
    return torch.multinomial(log_w.exp(), size, replacement=True)


def merge_pools(old_items: torch.Tensor, old_log_w: torch.Tensor, new_items: torch.Tensor,
                new_log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The refreshed pool: ``L`` slots drawn uniformly (with replacement) from the ``2L`` slots of the
    old pool and the new resample, each slot keeping its item's stored log-weight."""
    items, log_w = torch.cat([old_items, new_items], 1), torch.cat([old_log_w, new_log_w], 1)
    pick = torch.randint(items.shape[1], old_items.shape, device=items.device)
    return items.gather(1, pick), log_w.gather(1, pick)


def draw_from_pool(items: torch.Tensor, log_w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` slots per row drawn uniformly (with replacement) from ``[R, L]`` pools: ``([R, k]`` items,
    ``[R, k]`` their stored log-weights)."""
    pick = torch.randint(items.shape[1], (items.shape[0], k), device=items.device)
    return items.gather(1, pick), log_w.gather(1, pick)


def importance_weights(neg_scores: torch.Tensor, log_proposal: torch.Tensor, temperature: float) -> torch.Tensor:
    """Self-normalised importance weights toward ``softmax(s / temperature)``: ``softmax_k(s_k / temperature -
    log P(k))`` over each row's ``K`` negatives (``[R, K]``, rows sum to 1; no gradient)."""
    return torch.softmax(neg_scores.detach() / temperature - log_proposal, dim=1)


def weighted_pair_loss(loss_fn: LossFn, pos: torch.Tensor, neg: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_r sum_k weights[r, k] * loss_fn(pos[r], neg[r, k])``: ``loss_fn`` (a mean over its rows)
    applied to every (positive, negative) pair alone, then weighted."""
    pairs = torch.vmap(torch.vmap(loss_fn))(pos.unsqueeze(1).expand_as(neg), neg)
    return (weights * pairs).sum(1).mean()


# --------------------------------------------------------------------------- Lightning module


class AdaSIRModule(NegativeSamplingModule):
    """``neg_sampler: adasir`` (see the module docstring)."""

    user_state_why = "keeps a pool per user, refilled from every row's proposals"

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.pool_size = config["adasir_pool_size"]
        self.num_neg = config["neg_num"]
        self.temperature = float(config["adasir_temperature"])
        self.log_q = torch.zeros(model.n_items)  # uniform proposals: log q is a per-row constant
        self.pool = torch.zeros(0, self.pool_size, dtype=torch.long)    # items, per user
        self.pool_log_w = torch.zeros(0, self.pool_size)                # their SIR log-weights
        self.filled = torch.zeros(0, dtype=torch.bool)
        self.updates = torch.zeros(0, dtype=torch.long)                 # pool refreshes this epoch (DDP merge)
        self.weight_ess = 0.0  # sum over rows of the weights' effective sample size / K, this epoch
        self.rows = 0

    @staticmethod
    def validate_config(config) -> None:
        require_one(config, "top_m", "adasir", "it resamples, it takes no top-M")
        if config["neg_loss"] not in WEIGHTABLE_LOSSES:
            raise ValueError(f"neg_loss must be one of {list(WEIGHTABLE_LOSSES)} for neg_sampler=adasir "
                             f"(its importance weights weight each (positive, negative) pair), "
                             f"got {config['neg_loss']!r}")
        check_number(config, "candidate_num", 2, integer=True)
        check_number(config, "adasir_pool_size", 1, integer=True)
        check_number(config, "neg_num", 1, integer=True)
        check_number(config, "adasir_temperature", 0.0, low_open=True)

    # ---- state

    def ensure_users(self, n_users: int) -> None:
        """Size the per-user tables to ``n_users`` (on the module's device)."""
        device = self.device
        self.pool, self.pool_log_w = self.pool.to(device), self.pool_log_w.to(device)
        self.filled, self.updates, self.log_q = self.filled.to(device), self.updates.to(device), self.log_q.to(device)
        self.pool, self.pool_log_w = grow_rows(self.pool, n_users), grow_rows(self.pool_log_w, n_users)
        self.filled, self.updates = grow_rows(self.filled, n_users), grow_rows(self.updates, n_users)

    def set_proposal(self, sampler) -> None:
        """``log q`` of the loader's candidate sampler: popularity^alpha weights, or uniform (zeros)."""
        if sampler.distribution == "popularity":
            self.log_q = sampler.item_weights.float().clamp_min(1e-30).log().to(self.device)

    def on_fit_start(self) -> None:
        train_data = self.trainer.datamodule.train_data
        self.set_proposal(train_data._sampler)
        self.ensure_users(train_data._dataset.user_num)

    # ---- training

    def refresh(self, users: torch.Tensor, proposals: torch.Tensor, log_w: torch.Tensor) -> None:
        """Refresh the pools of ``users`` (distinct) by SIR over their rows' proposals: fill empty pools,
        merge the others (:func:`merge_pools`)."""
        pick = importance_resample(log_w, self.pool_size)
        items, weights = proposals.gather(1, pick), log_w.gather(1, pick)
        empty = ~self.filled[users]
        merged_items, merged_w = merge_pools(self.pool[users], self.pool_log_w[users], items, weights)
        self.pool[users] = torch.where(empty.unsqueeze(1), items, merged_items)
        self.pool_log_w[users] = torch.where(empty.unsqueeze(1), weights, merged_w)
        self.filled[users] = True
        self.updates[users] += 1

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        model = self.model
        users, proposals = batch[model.USER_ID].long(), batch[CANDIDATES]
        self.ensure_users(int(users.max()) + 1)
        scorer = self.scorer_for("self", model, batch)
        h = scorer.encode(model, batch)
        with torch.no_grad():
            log_w = importance_log_weights(scorer.score(model, batch, h, proposals), self.log_q[proposals])
            first = first_rows(users)
            new = first[~self.filled[users[first]]]
            if len(new):  # fill before read: a user's first pool comes from its row's own proposals
                self.refresh(users[new], proposals[new], log_w[new])
            negatives, log_proposal = draw_from_pool(self.pool[users], self.pool_log_w[users], self.num_neg)
        self.record_negatives(negatives)
        scores = scorer.score(model, batch, h, torch.cat([batch[model.POS_ITEM_ID].unsqueeze(1), negatives], 1))
        weights = importance_weights(scores[:, 1:], log_proposal, self.temperature)
        with torch.no_grad():
            old = first[~torch.isin(first, new)]
            if len(old):
                self.refresh(users[old], proposals[old], log_w[old])
            self.weight_ess += float((1.0 / weights.pow(2).sum(1)).sum()) / self.num_neg
            self.rows += len(users)
        return weighted_pair_loss(self.loss_fn, scores[:, 0], scores[:, 1:], weights)

    # ---- epoch end

    def merge_ranks(self) -> None:
        """DDP: every rank keeps, per user, the pool of the rank that refreshed it most this epoch."""
        rank = winning_rank(self.all_gather(self.updates))
        self.pool = take_rank(self.all_gather(self.pool), rank)
        self.pool_log_w = take_rank(self.all_gather(self.pool_log_w), rank)
        self.filled = take_rank(self.all_gather(self.filled.long()), rank).bool()  # gloo gathers no bools

    def on_train_epoch_end(self) -> None:
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if distributed:
            self.merge_ranks()
        record = self.negative_report(self.current_epoch)
        ess, rows = self.weight_ess, self.rows
        if distributed:
            totals = self.all_gather(torch.tensor([ess, float(rows)], device=self.device, dtype=torch.float64))
            ess, rows = (float(v) for v in totals.reshape(-1, 2).sum(0))
        record.update({"pool_users": int(self.filled.sum()),
                       "weight_effective_sample_fraction": ess / max(rows, 1)})
        self.updates.zero_()
        self.weight_ess, self.rows = 0.0, 0
        self.log_epoch(record, f"adasir epoch {record['epoch']}: pools for {record['pool_users']} users; importance "
                               f"weights' effective sample size {record['weight_effective_sample_fraction']:.1%} "
                               f"of {self.num_neg}")

    # ---- checkpoint

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["adasir"] = {"pool": copy_state(self.pool), "pool_log_w": copy_state(self.pool_log_w),
                                "filled": copy_state(self.filled), "updates": copy_state(self.updates),
                                "weight_ess": self.weight_ess, "rows": self.rows}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "adasir" in checkpoint:
            state = checkpoint["adasir"]
            if state["pool"].shape[1] != self.pool_size:
                raise ValueError(f"adasir_pool_size is {self.pool_size} but the checkpoint's pools hold "
                                 f"{state['pool'].shape[1]} items; resume with adasir_pool_size="
                                 f"{state['pool'].shape[1]}")
            device = self.device
            self.pool, self.pool_log_w = copy_state(state["pool"], device), copy_state(state["pool_log_w"], device)
            self.filled, self.updates = copy_state(state["filled"], device), copy_state(state["updates"], device)
            self.weight_ess, self.rows = state["weight_ess"], state["rows"]


register_sampler("adasir", AdaSIRModule, config_file=packaged_yaml("adasir"))
