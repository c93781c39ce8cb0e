"""DivNS: diversity-augmented negative sampling (arXiv 2508.14468) for RecBole's sequential models.

Per training row of user ``u`` (see ``shared/design/divns.md``):

1. the ``candidate_num`` pool is scored with one encoder pass; its top-1 is the
   hard negative ``v_H`` (DNS), recorded by item id in the user's hard set ``H_u``
   (bounded at ``divns_hard_size``, default ``divns_cache_size // r`` so that
   ``|C_u| ~ r |H_u|`` as in the paper even when the bounds bind);
2. ranks ``2..r+1`` (``r = divns_cache_ratio``) go into the user's runner-up cache
   ``C_u``, by item id, deduplicated, bounded at ``divns_cache_size`` per user;
3. from epoch 1 on, a diverse item ``v_D`` is drawn uniformly from the user's
   diverse set ``D_u`` (built at the previous epoch end) and the row trains on the
   synthetic negative ``e_syn = lam e_H + (1 - lam) e_D`` (``lam = divns_lambda``)
   against its positive under ``neg_loss`` (bpr | bce). Rows of users with an empty ``D_u`` (all rows of epoch 0) use ``v_H`` alone: plain DNS.

At each epoch end, per user, ``D_u`` is an exact k-DPP sample (``dpp.sample_k_dpp``;
``divns_dpp_mode: greedy`` uses greedy MAP instead) over ``C_u`` with the kernel
``L = diag(q) S diag(q)`` of :func:`diversity_kernel`, ``k = min(|H_u|, |C_u|, rank L)``;
then ``C_u`` and ``H_u`` are cleared.

**Synthesis on scores.** When the scorer's score is linear in the item's parameters --
``h · v(item)`` (:class:`~recbole_mdcns.scoring.DotScorer` and the one-pass scorers that only
change how ``h`` or ``v`` is read: S3Rec, SHAN, NPE with ``v = relu(E)``, HGN, FPMC with
``v = [IU, IL]``), or plus a per-item bias (BERT4Rec) -- the score of the synthetic item
``v_syn = lam v_H + (1 - lam) v_D`` is exactly ``lam s(v_H) + (1 - lam) s(v_D)``, so the
mix is done on scores (gradients reach both items). For the other scorers (TransRec's
distance, the generic ``predict()`` path) the same score mix is the documented
*fallback*: it trains on the convex combination of the two negatives' scores, which is
not the score of a mixed embedding. The run logs which case applies.

**Item representation** (kernel, ``q`` and the diversity statistics): the vectors the
scorer scores (``scorer.item_vectors``, e.g. FPMC's ``[IU, IL]``), else the model's
``item_embedding``, else the concatenation of every ``nn.Embedding`` with ``n_items`` rows;
always detached.

**State layout.** Caches are tensors, not Python sets: :class:`RunnerUpCache` is a
``[n_users, cap]`` LongTensor ring buffer (``0`` = empty; ids are deduplicated on
insertion) plus a ``[n_users]`` count, indexed by RecBole's internal user id. The
diverse sets are a ``[n_users, cap]`` LongTensor (0-padded) plus sizes. All of it is
saved in the Lightning checkpoint (``checkpoint["divns"]``) and restored on resume.
The refresh draws from a generator seeded by ``(seed, epoch)``, so a resumed run
refreshes exactly as an uninterrupted one.

**DDP.** Ranks see different rows of the same user. Before the refresh every rank
``all_gather``s the caches and merges them per user (union, deduplicated, bounded),
then runs the same refresh with the same seed, so every rank holds the same, global
``D_u`` (and rank 0's checkpoint is complete). Used-negative counts are summed too.
The price is one ``[n_users, cap]`` gather per cache and the refresh computed on every
rank rather than split among them.

**Negative-diversity evidence.** Every negative id a row trains on (``v_H``, and
``v_D`` where mixed) is counted per epoch (:meth:`DivNSModule.record_negatives`);
at epoch end :func:`negative_stats` reports the mean pairwise cosine distance of the
used negatives and the fraction of the catalogue used (this epoch and ever), kept in
``DivNSModule.negative_history`` and logged.
"""
from __future__ import annotations

from logging import getLogger
from time import perf_counter

import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction

from recbole_mdcns.config import check_number, packaged_yaml
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.diagnostics import item_representation
from recbole_mdcns.dpp import greedy_map_dpp, kdpp_rank, sample_k_dpp
from recbole_mdcns.methods.dns import DNSModule
from recbole_mdcns.registry import register_sampler
from recbole_mdcns.scoring import BERT4RecScorer, DotScorer, Scorer

KERNELS = ("rbf", "cosine")
DPP_MODES = ("exact", "greedy")
# q_a = 1 / (1 + alpha * mean cos): the denominator is floored here so that an item
# (anti-)aligned with every hard negative cannot make q infinite (or flip its sign).
Q_DENOMINATOR_FLOOR = 1e-3


# --------------------------------------------------------------------------- pure tensor units


def compact_unique(items: torch.Tensor, valid: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first occurrences of the valid, positive ids of ``items`` (``[U, M]``), in
    their original order, truncated to ``cap``: returns ``([U, cap]`` 0-padded, ``[U]`` sizes)."""
    vals = torch.where(valid, items, torch.zeros_like(items))
    sorted_vals, order = vals.sort(dim=1, stable=True)
    dup_sorted = torch.zeros_like(valid)
    dup_sorted[:, 1:] = sorted_vals[:, 1:] == sorted_vals[:, :-1]
    dup = torch.zeros_like(valid).scatter(1, order, dup_sorted)
    keep = (vals > 0) & ~dup
    pos = keep.long().cumsum(1) - 1
    keep &= pos < cap
    out = items.new_zeros(items.shape[0], cap + 1)
    out.scatter_(1, torch.where(keep, pos, cap), torch.where(keep, vals, 0))
    return out[:, :cap].contiguous(), keep.sum(1)


class RunnerUpCache:
    """Bounded per-user sets of item ids, as tensors.

    ``items`` is a ``[n_users, cap]`` LongTensor ring buffer (``0`` = empty slot) and
    ``count`` a ``[n_users]`` LongTensor of the distinct ids inserted since the last
    :meth:`clear`. An id already present in the user's row is not inserted again, so a
    row holds ``min(count, cap)`` distinct ids in slots ``0..size-1``; once full, new ids
    overwrite the oldest slots. Rows grow on demand for unseen user ids.
    """

    def __init__(self, capacity: int, n_users: int = 0, device: torch.device | str | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.items = torch.zeros(n_users, capacity, dtype=torch.long, device=device)
        self.count = torch.zeros(n_users, dtype=torch.long, device=device)

    @property
    def n_users(self) -> int:
        return self.items.shape[0]

    @property
    def device(self) -> torch.device:
        return self.items.device

    @property
    def size(self) -> torch.Tensor:
        """``[n_users]`` number of distinct ids held per user."""
        return self.count.clamp(max=self.capacity)

    def valid(self) -> torch.Tensor:
        """``[n_users, cap]`` bool: the slots holding an id."""
        return _prefix_mask(self.items, self.count)

    def to(self, device) -> "RunnerUpCache":
        self.items, self.count = self.items.to(device), self.count.to(device)
        return self

    def ensure_users(self, n_users: int) -> None:
        if n_users > self.n_users:
            extra = n_users - self.n_users
            self.items = torch.cat([self.items, self.items.new_zeros(extra, self.capacity)])
            self.count = torch.cat([self.count, self.count.new_zeros(extra)])

    def clear(self) -> None:
        self.items.zero_()
        self.count.zero_()

    def add(self, users: torch.Tensor, items: torch.Tensor) -> None:
        """Insert ``items[i]`` into the set of ``users[i]`` (same shapes, any; ids <= 0 are skipped)."""
        users, items = users.reshape(-1).long(), items.reshape(-1).long()
        keep = items > 0
        if not bool(keep.any()):
            return
        pairs = torch.unique(torch.stack([users[keep], items[keep]], 1), dim=0)  # sorted by user, then item
        self.ensure_users(int(pairs[:, 0].max()) + 1)
        users, items = pairs[:, 0].to(self.device), pairs[:, 1].to(self.device)
        fresh = ~(self.items[users] == items.unsqueeze(1)).any(1)
        users, items = users[fresh], items[fresh]
        if len(users) == 0:
            return
        group_users, group_sizes = torch.unique_consecutive(users, return_counts=True)
        starts = group_sizes.cumsum(0) - group_sizes
        offset = torch.arange(len(users), device=self.device) - starts.repeat_interleave(group_sizes)
        # more than ``cap`` new ids for one user in one call: only the last ``cap`` can survive
        last = offset >= (group_sizes - self.capacity).repeat_interleave(group_sizes)
        slot = (self.count[users] + offset) % self.capacity
        self.items[users[last], slot[last]] = items[last]
        self.count.index_add_(0, group_users, group_sizes)

    def merge(self, items: torch.Tensor, count: torch.Tensor) -> None:
        """Replace the sets by the per-user union of ``W`` gathered caches (``[W, U, cap]``,
        ``[W, U]``, e.g. from DDP ranks): deduplicated, bounded, slots interleaved across ranks."""
        world, n_users, cap = items.shape
        valid = _prefix_mask(items, count)
        flat = items.permute(1, 2, 0).reshape(n_users, cap * world)
        flat_valid = valid.permute(1, 2, 0).reshape(n_users, cap * world)
        self.items, size = compact_unique(flat, flat_valid, self.capacity)
        self.count = size

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": _copy(self.items), "count": _copy(self.count)}

    def load_state_dict(self, state: dict) -> None:
        device = self.device
        if state["capacity"] != self.capacity:  # a resumed run with another bound: re-compact
            self.items, self.count = compact_unique(state["items"], _prefix_mask(state["items"], state["count"]),
                                                    self.capacity)
            self.items, self.count = self.items.to(device), self.count.to(device)
            return
        self.items, self.count = _copy(state["items"], device), _copy(state["count"], device)


def _copy(tensor: torch.Tensor, device="cpu") -> torch.Tensor:
    """A copy on ``device``: saved / restored state never aliases the live, in-place updated tensors."""
    return tensor.detach().to(device, copy=True)


def _prefix_mask(items: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``items``-shaped bool: the first ``count`` slots of each row (last dim), ``count`` capped at the row length."""
    cap = items.shape[-1]
    return torch.arange(cap, device=items.device) < count.clamp(max=cap).unsqueeze(-1)


def hard_and_runner_ups(scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool positions of the top-1 (``[B]``) and of ranks ``2..r+1`` (``[B, r]``) of ``[B, N]`` scores."""
    r = min(r, scores.shape[1] - 1)
    top = scores.topk(r + 1, dim=1).indices
    return top[:, 0], top[:, 1:]


def diversity_kernel(emb: torch.Tensor, hard_emb: torch.Tensor, kernel: str = "rbf", gamma: float = 1.0,
                     alpha: float = 1.0, mask: torch.Tensor | None = None,
                     hard_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DivNS's L-ensemble ``L = diag(q) S diag(q)`` over cached items, in float64.

    Args:
        emb: ``[m, d]`` or ``[b, m, d]`` embeddings of the cached items.
        hard_emb: ``[h, d]`` or ``[b, h, d]`` embeddings of the user's hard negatives ``H_u``.
        kernel: ``"rbf"``: ``S_ij = exp(-gamma ||e_i - e_j||^2)`` (the reference code's);
            ``"cosine"``: ``S_ij = cos(e_i, e_j)`` (rank <= d).
        alpha: ``q_a = 1 / (1 + alpha * mean_{h in H_u} cos(e_a, e_h))``; the denominator is
            floored at :data:`Q_DENOMINATOR_FLOOR`. With no valid hard item, ``q = 1``.
        mask, hard_mask: ``[m]`` / ``[b, m]`` and ``[h]`` / ``[b, h]`` bool valid entries;
            rows and columns of invalid items are zero in ``L``.

    Returns:
        ``[m, m]`` or ``[b, m, m]`` symmetric PSD float64 kernel.
    """
    unbatched = emb.dim() == 2
    e = (emb.unsqueeze(0) if unbatched else emb).double()
    h = (hard_emb.unsqueeze(0) if hard_emb.dim() == 2 else hard_emb).double()
    b, m, _ = e.shape
    mask = torch.ones(b, m, dtype=torch.bool, device=e.device) if mask is None else mask.reshape(-1, m).expand(b, m)
    hard_mask = (torch.ones(h.shape[:2], dtype=torch.bool, device=e.device) if hard_mask is None
                 else hard_mask.reshape(-1, h.shape[1]).expand(h.shape[0], h.shape[1]))
    e_unit = F.normalize(e, dim=-1)
    if kernel == "rbf":
        sq = (e * e).sum(-1)
        d2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * e @ e.transpose(1, 2)).clamp_min(0.0)
        d2 = d2 * (1 - torch.eye(m, dtype=d2.dtype, device=d2.device))  # exact zeros on the diagonal
        S = torch.exp(-gamma * d2)
    elif kernel == "cosine":
        S = e_unit @ e_unit.transpose(1, 2)
    else:
        raise ValueError(f"divns_kernel must be one of {list(KERNELS)}, got {kernel!r}")
    cos_hard = e_unit @ F.normalize(h, dim=-1).transpose(1, 2)  # [b, m, h]
    weights = hard_mask.to(cos_hard.dtype).unsqueeze(1)
    mean_cos = (cos_hard * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)
    q = 1.0 / (1.0 + alpha * mean_cos).clamp_min(Q_DENOMINATOR_FLOOR)
    q = q * mask
    L = q.unsqueeze(-1) * S * q.unsqueeze(-2)
    return L[0] if unbatched else L


def refresh_diverse_sets(item_emb: torch.Tensor, cache_items: torch.Tensor, cache_size: torch.Tensor,
                         hard_items: torch.Tensor, hard_size: torch.Tensor, kernel: str = "rbf",
                         gamma: float = 1.0, alpha: float = 1.0, mode: str = "exact",
                         generator: torch.Generator | None = None,
                         chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Every user's diverse set ``D_u``, batched over users.

    ``cache_items`` ``[U, C]`` / ``hard_items`` ``[U, H]`` hold distinct ids in their first
    ``cache_size`` / ``hard_size`` slots. For each user with both sets non-empty,
    ``L`` = :func:`diversity_kernel` over ``item_emb[C_u]`` and ``k = min(|H_u|, |C_u|, rank L)``
    items are drawn by ``sample_k_dpp`` (``mode="exact"``) or ``greedy_map_dpp``
    (``mode="greedy"``). Users are sorted by cache size and sent ``chunk`` at a time,
    each chunk trimmed to its largest set (ragged sets via ``mask``).

    Returns ``([U, C]`` ids, 0-padded, ``[U]`` sizes).
    """
    if mode not in DPP_MODES:
        raise ValueError(f"divns_dpp_mode must be one of {list(DPP_MODES)}, got {mode!r}")
    n_users, cap = cache_items.shape
    diverse = torch.zeros_like(cache_items)
    sizes = torch.zeros(n_users, dtype=torch.long, device=cache_items.device)
    active = ((cache_size > 0) & (hard_size > 0)).nonzero().flatten()
    active = active[cache_size[active].argsort(stable=True)]
    emb = item_emb.detach()
    for start in range(0, len(active), chunk):
        users = active[start:start + chunk]
        c_size, h_size = cache_size[users], hard_size[users]
        m, hm = int(c_size.max()), int(h_size.max())
        items, hards = cache_items[users, :m], hard_items[users, :hm]
        mask = torch.arange(m, device=items.device) < c_size.unsqueeze(1)
        hard_mask = torch.arange(hm, device=items.device) < h_size.unsqueeze(1)
        L = diversity_kernel(emb[items], emb[hards], kernel, gamma, alpha, mask, hard_mask)
        k = torch.minimum(c_size, h_size)
        if mode == "exact":
            picked = sample_k_dpp(L, k, generator=generator, mask=mask, clamp_k=True)
        else:
            picked = greedy_map_dpp(L, torch.minimum(k, kdpp_rank(L, mask)), mask=mask)
        ids = torch.where(picked >= 0, items.gather(1, picked.clamp_min(0)), 0)
        diverse[users, :ids.shape[1]] = ids
        sizes[users] = (picked >= 0).sum(1)
    # greedy rows may stop early; -1s come last in both modes, so ids form a prefix
    return diverse, sizes


def synthesize_scores(hard_scores: torch.Tensor, diverse_scores: torch.Tensor, lam: float,
                      has_diverse: torch.Tensor) -> torch.Tensor:
    """Score of the synthetic negative per row: ``lam s(v_H) + (1 - lam) s(v_D)`` where the row has a
    diverse item (for ``s(v) = h · e_v`` this is exactly ``h · (lam e_H + (1 - lam) e_D)``), else
    ``s(v_H)`` (plain DNS). No gradient reaches ``diverse_scores`` of rows without a diverse item."""
    mixed = lam * hard_scores + (1.0 - lam) * diverse_scores
    return torch.where(has_diverse, mixed, hard_scores)


def synthesis_is_exact(scorer: Scorer) -> bool:
    """Whether ``lam s(v_H) + (1 - lam) s(v_D)`` is the score of a mixed item for ``scorer``: its
    score is ``h · item_vectors(v)`` (optionally plus a per-item bias, BERT4Rec)."""
    return isinstance(scorer, DotScorer) and type(scorer).score in (DotScorer.score, BERT4RecScorer.score)


# --------------------------------------------------------------------------- Lightning module


class DivNSModule(DNSModule):
    """``neg_sampler: divns`` (see the module docstring)."""

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.cache_ratio = config["divns_cache_ratio"]
        self.lam = float(config["divns_lambda"])
        self.kernel = config["divns_kernel"]
        self.gamma = float(config["divns_gamma"])
        self.alpha = float(config["divns_alpha"])
        self.dpp_mode = config["divns_dpp_mode"]
        self.chunk = config["divns_refresh_chunk"]
        self.seed = config["seed"] or 0
        cache_size = config["divns_cache_size"]
        hard_size = config["divns_hard_size"] or max(1, cache_size // self.cache_ratio)
        self.cache = RunnerUpCache(cache_size)   # C_u
        self.hard = RunnerUpCache(hard_size)     # H_u
        self.diverse = torch.zeros(0, cache_size, dtype=torch.long)  # D_u, 0-padded
        self.diverse_size = torch.zeros(0, dtype=torch.long)
        self.synthetic_rows = 0
        self.rows = 0
        self._synthesis_logged = False

    # ---- config

    @staticmethod
    def validate_config(config) -> None:
        if config["neg_num"] != 1:
            raise ValueError(f"neg_num must be 1 for neg_sampler=divns (each row trains on one synthetic negative: "
                             f"DNS's top-1 mixed with a diverse item), got {config['neg_num']!r}")
        if config["top_m"] != 1:
            raise ValueError(f"top_m must be 1 for neg_sampler=divns (its hard negative is the top-1), "
                             f"got {config['top_m']!r}")
        n = config["candidate_num"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"candidate_num must be an integer >= 2 for neg_sampler=divns "
                             f"(top-1 plus runner-ups), got {n!r}")
        check_number(config, "divns_cache_ratio", 1, n - 1, integer=True)
        check_number(config, "divns_lambda", 0.0, 1.0)
        check_number(config, "divns_gamma", 0.0, low_open=True)
        check_number(config, "divns_alpha", 0.0)
        check_number(config, "divns_cache_size", 1, integer=True)
        if config["divns_hard_size"] is not None:
            check_number(config, "divns_hard_size", 1, integer=True)
        check_number(config, "divns_refresh_chunk", 1, integer=True)
        for key, choices in (("divns_kernel", KERNELS), ("divns_dpp_mode", DPP_MODES)):
            if config[key] not in choices:
                raise ValueError(f"{key} must be one of {list(choices)}, got {config[key]!r}")

    # ---- state on the module's device

    def _to_device(self) -> None:
        device = self.device
        if self.cache.device != device:
            self.cache.to(device)
            self.hard.to(device)
            self.diverse, self.diverse_size = self.diverse.to(device), self.diverse_size.to(device)

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def on_fit_start(self) -> None:
        dataset = getattr(getattr(self.trainer.datamodule, "train_data", None), "_dataset", None)
        n_users = getattr(dataset, "user_num", 0)
        self._to_device()
        self.cache.ensure_users(n_users)
        self.hard.ensure_users(n_users)

    # ---- training

    def pick_diverse(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One item drawn uniformly from each row's ``D_u`` (``[B]`` ids, ``[B]`` bool has-one)."""
        n = self.diverse.shape[0]
        if n == 0 or not bool(self.diverse_size.any()):
            return torch.zeros_like(users), torch.zeros_like(users, dtype=torch.bool)
        known = users < n
        rows = users.clamp(max=n - 1)
        size = torch.where(known, self.diverse_size[rows], 0)
        pick = (torch.rand(len(users), device=users.device) * size).long().clamp(min=0)
        pick = torch.minimum(pick, (size - 1).clamp_min(0))
        return self.diverse[rows, pick], size > 0

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        self._to_device()
        model = self.model
        candidates, users = batch[CANDIDATES], batch[model.USER_ID].long()
        scorer = self.scorer_for("self", model, batch)
        if not self._synthesis_logged:
            self._synthesis_logged = True
            how = ("exact: the score of the mixed item vector" if synthesis_is_exact(scorer) else
                   "fallback: the mix of the two negatives' scores, not the score of a mixed embedding")
            getLogger().info(f"divns: {type(model).__name__} via {scorer.path}; synthetic negative's score "
                             f"lam*s(v_H) + (1-lam)*s(v_D) is {how}")
        h = scorer.encode(model, batch)
        with torch.no_grad():
            hard_pos, runner_pos = hard_and_runner_ups(scorer.score(model, batch, h, candidates), self.cache_ratio)
        hard = candidates.gather(1, hard_pos.unsqueeze(1)).squeeze(1)
        runners = candidates.gather(1, runner_pos)
        self.hard.add(users, hard)
        self.cache.add(users.unsqueeze(1).expand_as(runners), torch.where(runners == hard.unsqueeze(1), 0, runners))
        diverse, has = self.pick_diverse(users)
        self.rows += len(users)
        self.record_negatives(hard)
        positives = batch[model.POS_ITEM_ID].unsqueeze(1)
        if not bool(has.any()):  # plain DNS (epoch 0, or no user of this batch has a diverse set)
            scores = scorer.score(model, batch, h, torch.cat([positives, hard.unsqueeze(1)], 1))
            return self.loss_fn(scores[:, 0], scores[:, 1])
        self.synthetic_rows += int(has.sum())
        self.record_negatives(diverse[has])
        items = torch.cat([positives, hard.unsqueeze(1), torch.where(has, diverse, hard).unsqueeze(1)], 1)
        scores = scorer.score(model, batch, h, items)
        return self.loss_fn(scores[:, 0], synthesize_scores(scores[:, 1], scores[:, 2], self.lam, has))

    # ---- epoch end

    def on_train_epoch_end(self) -> None:
        self.refresh(self.current_epoch)

    def refresh(self, epoch: int) -> dict:
        """Epoch-end step: report the negatives used (:meth:`negative_report`), gather caches across
        ranks, draw every user's ``D_u``, clear ``C_u`` / ``H_u``. Returns the epoch's record (the
        last entry of ``negative_history``), extended with the refresh's figures."""
        started = perf_counter()
        self._to_device()
        stats = self.negative_report(epoch)
        emb = item_representation(self.model, self.scorers.get("self"))
        local_entries = int(self.cache.size.sum())
        if self._world_size() > 1:
            n_users = int(self.all_gather(torch.tensor(self.cache.n_users, device=self.device)).max())
            for cache in (self.cache, self.hard):
                cache.ensure_users(n_users)
                cache.merge(self.all_gather(cache.items), self.all_gather(cache.count))
        refresh_gen = torch.Generator(device=self.device).manual_seed(self._epoch_seed(epoch))
        self.diverse, self.diverse_size = refresh_diverse_sets(
            emb, self.cache.items, self.cache.size, self.hard.items, self.hard.size, self.kernel, self.gamma,
            self.alpha, self.dpp_mode, refresh_gen, self.chunk)
        record = stats
        record.update({
            "synthetic_row_fraction": self.synthetic_rows / max(self.rows, 1),
            "cache_entries_local": local_entries,
            "cache_entries": int(self.cache.size.sum()),
            "diverse_users": int((self.diverse_size > 0).sum()),
            "diverse_mean_size": float(self.diverse_size[self.diverse_size > 0].float().mean())
            if bool((self.diverse_size > 0).any()) else 0.0,
        })
        self.cache.clear()
        self.hard.clear()
        self.synthetic_rows = self.rows = 0
        record["refresh_seconds"] = perf_counter() - started
        if self._trainer is None or self.trainer.is_global_zero:
            getLogger().info(
                f"divns epoch {epoch}: refresh {record['refresh_seconds']:.2f}s; D_u for {record['diverse_users']} "
                f"users (mean k {record['diverse_mean_size']:.1f}); synthetic rows "
                f"{record['synthetic_row_fraction']:.1%}; negatives: mean pairwise cosine distance "
                f"{record['mean_pairwise_cosine_distance']:.4f}, catalogue used {record['catalogue_fraction']:.1%} "
                f"(ever {record['catalogue_fraction_ever']:.1%})"
            )
        return record

    def _epoch_seed(self, epoch: int) -> int:
        return (int(self.seed) * 1_000_003 + epoch * 7919 + 17) % 2**62

    # ---- checkpoint

    def divns_state(self) -> dict:
        return {
            "cache": self.cache.state_dict(),
            "hard": self.hard.state_dict(),
            "diverse": _copy(self.diverse),
            "diverse_size": _copy(self.diverse_size),
            "synthetic_rows": self.synthetic_rows,
            "rows": self.rows,
        }

    def load_divns_state(self, state: dict) -> None:
        self.cache.load_state_dict(state["cache"])
        self.hard.load_state_dict(state["hard"])
        device = self.cache.device
        diverse = state["diverse"]
        size = state["diverse_size"]
        if diverse.shape[1] != self.cache.capacity:  # resumed with another divns_cache_size
            diverse, size = compact_unique(diverse, _prefix_mask(diverse, size), self.cache.capacity)
        self.diverse, self.diverse_size = _copy(diverse, device), _copy(size, device)
        self.synthetic_rows, self.rows = state["synthetic_rows"], state["rows"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["divns"] = self.divns_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "divns" in checkpoint:
            self.load_divns_state(checkpoint["divns"])


register_sampler("divns", DivNSModule, config_file=packaged_yaml("divns"))
