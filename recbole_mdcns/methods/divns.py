"""DivNS: diversity-augmented negative sampling (arXiv 2508.14468) for RecBole's sequential models.

Per training row of user ``u`` (see ``shared/design/divns.md``):

1. the ``candidate_num`` pool is scored with one encoder pass; its top-1 is the
   hard negative ``v_H`` (DNS), recorded by item id in the user's hard set ``H_u``
   (bounded at ``divns_hard_size``, default ``divns_cache_size // r`` so that
   ``|C_u| ~ r |H_u|`` as in the paper even when the bounds bind; set
   ``divns_hard_size`` for a bound, hence a cap on ``k``, that does not move with ``r``);
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

**On sequences** (``shared/design/divns.md``, "What happens on sequences"): ``D_u`` is per user,
but each row of a user has its own representation ``h``. Options, each off by default (the
paper's rule), all reading only row-level fields (``USER_ID``, ``POS_ITEM_ID``, ``CANDIDATES``)
and the scorer, so they hold under ``train_positions: all`` too:

* ``divns_diverse_pick``: ``uniform`` (paper) | ``top`` -- the item of ``D_u`` the row's ``h``
  scores highest | ``score`` -- drawn by ``softmax`` of those scores (:meth:`DivNSModule.pick_diverse`);
* ``divns_pairing``: ``independent`` (paper) | ``distinct`` -- the rows of one user in a batch
  take different items of ``D_u`` where possible (:func:`distinct_slots`);
* ``divns_cache_bound``: ``fixed`` (every user ``divns_cache_size`` / hard bound) | ``rows`` --
  ``|C_u| <= min(r n_u, divns_cache_size)``, ``|H_u| <= min(n_u, hard bound)`` for a user with
  ``n_u`` training rows per epoch, in memory that grows with the interactions
  (:meth:`DivNSModule.bound_by_rows`);
* ``divns_gamma: median`` -- the RBF bandwidth of each user's kernel from the median squared
  pairwise distance of its cached items (:func:`median_bandwidth`).

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

**State layout.** Caches are tensors, not Python sets: :class:`RunnerUpCache` holds one
flat LongTensor with a ring-buffer segment per user (``0`` = empty; ids are deduplicated on
insertion; every segment ``divns_cache_size`` long -- a dense ``[n_users, cap]`` layout --
unless ``divns_cache_bound: rows`` sizes them), a ``[n_users]`` count, indexed by RecBole's
internal user id. The diverse sets (:class:`DiverseSets`) are ragged likewise. All of it is
saved in the Lightning checkpoint (``checkpoint["divns"]``) and restored on resume.
The refresh draws from a generator seeded by ``(seed, epoch)``, so a resumed run
refreshes exactly as an uninterrupted one.

**DDP.** Ranks see different rows of the same user. Before the refresh every rank
``all_gather``s the caches and merges them per user (union, deduplicated, bounded),
then runs the same refresh with the same seed, so every rank holds the same, global
``D_u`` (and rank 0's checkpoint is complete). Used-negative counts are summed too.
The price is one gather of each cache per epoch and the refresh computed on every
rank rather than split among them.

**Negative-diversity evidence.** Every negative id a row trains on (``v_H``, and
``v_D`` where mixed) is counted per epoch (:meth:`DivNSModule.record_negatives`);
at epoch end :func:`negative_stats` reports the mean pairwise cosine distance of the
used negatives and the fraction of the catalogue used (this epoch and ever), kept in
``DivNSModule.negative_history`` and logged.
"""
from __future__ import annotations

from dataclasses import dataclass
from logging import getLogger
from time import perf_counter

import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction

from recbole_mdcns.config import check_number, packaged_yaml, require_one
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.diagnostics import item_representation
from recbole_mdcns.dpp import greedy_map_dpp, kdpp_rank, sample_k_dpp
from recbole_mdcns.methods.dns import DNSModule
from recbole_mdcns.registry import register_sampler
from recbole_mdcns.scoring import BERT4RecScorer, DotScorer, Scorer

KERNELS = ("rbf", "cosine")
DPP_MODES = ("exact", "greedy")
DIVERSE_PICKS = ("uniform", "top", "score")
PAIRINGS = ("independent", "distinct")
CACHE_BOUNDS = ("fixed", "rows")
# q_a = 1 / (1 + alpha * mean cos): the denominator is floored here so that an item
# (anti-)aligned with every hard negative cannot make q infinite (or flip its sign).
Q_DENOMINATOR_FLOOR = 1e-3


# --------------------------------------------------------------------------- pure tensor units


def compact_unique(items: torch.Tensor, valid: torch.Tensor,
                   cap: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first occurrences of the valid, positive ids of ``items`` (``[U, M]``), in
    their original order, truncated to ``cap`` (an int, or ``[U]`` per row): returns
    ``([U, max cap]`` 0-padded, ``[U]`` sizes)."""
    width = int(cap) if not torch.is_tensor(cap) else int(cap.max()) if len(cap) else 0
    vals = torch.where(valid, items, torch.zeros_like(items))
    sorted_vals, order = vals.sort(dim=1, stable=True)
    dup_sorted = torch.zeros_like(valid)
    dup_sorted[:, 1:] = sorted_vals[:, 1:] == sorted_vals[:, :-1]
    dup = torch.zeros_like(valid).scatter(1, order, dup_sorted)
    keep = (vals > 0) & ~dup
    pos = keep.long().cumsum(1) - 1
    keep &= pos < (cap.unsqueeze(1) if torch.is_tensor(cap) else cap)
    out = items.new_zeros(items.shape[0], width + 1)
    out.scatter_(1, torch.where(keep, pos, width), torch.where(keep, vals, 0))
    return out[:, :width].contiguous(), keep.sum(1)


def _segments(offset: torch.Tensor, length: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, width]`` flat indices ``offset + j`` and the mask ``j < length`` of ragged segments."""
    j = torch.arange(width, device=offset.device)
    return offset.unsqueeze(1) + j, j < length.unsqueeze(1)


def _gather_segments(data: torch.Tensor, offset: torch.Tensor, length: torch.Tensor,
                     width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, width]`` ids, 0 past each segment's ``length``; ``[B, width]`` bool in-segment)."""
    index, inside = _segments(offset, length, width)
    if len(data) == 0:
        return torch.zeros_like(index), inside & False
    return torch.where(inside, data[index.clamp(max=len(data) - 1)], 0), inside


class RunnerUpCache:
    """Bounded per-user sets of item ids, as one flat tensor (memory = the sum of the bounds).

    User ``u`` owns the segment ``data[offset[u] : offset[u] + cap[u]]``, a ring buffer of item
    ids (``0`` = empty slot); ``count[u]`` counts the distinct ids inserted since the last
    :meth:`clear`. An id already in the user's segment is not inserted again, so it holds
    ``min(count, cap)`` distinct ids in slots ``0..size-1``; once full, new ids overwrite the
    oldest slots. Every bound starts at ``capacity`` (a dense ``[n_users, capacity]`` layout);
    :meth:`set_capacities` gives each user its own bound, e.g. one that follows its number of
    training rows, so that memory grows with the interactions. Users grow on demand.
    """

    def __init__(self, capacity: int, n_users: int = 0, device: torch.device | str | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.cap = torch.full((n_users,), capacity, dtype=torch.long, device=device)
        self.offset = torch.arange(n_users, dtype=torch.long, device=device) * capacity
        self.data = torch.zeros(n_users * capacity, dtype=torch.long, device=device)
        self.count = torch.zeros(n_users, dtype=torch.long, device=device)

    @property
    def n_users(self) -> int:
        return len(self.cap)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def size(self) -> torch.Tensor:
        """``[n_users]`` number of distinct ids held per user."""
        return torch.minimum(self.count, self.cap)

    @property
    def items(self) -> torch.Tensor:
        """``[n_users, max bound]`` dense view, 0-padded (a view of :attr:`data` when every bound is equal)."""
        if self.n_users and bool((self.cap == self.capacity).all()):
            return self.data.view(self.n_users, self.capacity)
        return self.rows(torch.arange(self.n_users, device=self.device))

    def rows(self, users: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """``[len(users), width]`` ids of the users' segments (default width: their largest bound), 0-padded."""
        width = (int(self.cap[users].max()) if len(users) else 0) if width is None else width
        return _gather_segments(self.data, self.offset[users], self.cap[users], width)[0]

    def to(self, device) -> "RunnerUpCache":
        self.cap, self.offset = self.cap.to(device), self.offset.to(device)
        self.data, self.count = self.data.to(device), self.count.to(device)
        return self

    def _layout(self, cap: torch.Tensor, dense: torch.Tensor, size: torch.Tensor) -> None:
        """Adopt bounds ``cap`` with contents ``dense`` (``[U, >= max cap]``, ids in slots ``< size``)."""
        self.cap = cap.to(self.device)
        self.offset = self.cap.cumsum(0) - self.cap
        width = int(self.cap.max()) if len(self.cap) else 0
        keep = torch.arange(width, device=self.device) < self.cap.unsqueeze(1)
        self.data = dense[:, :width].to(self.device)[keep]
        self.count = size.to(self.device)

    def set_capacities(self, cap: torch.Tensor) -> None:
        """Give user ``u`` the bound ``cap[u]`` (``1 <= cap <= capacity``); held ids are kept up to it."""
        cap = cap.to(device=self.device, dtype=torch.long)
        if len(cap) and not bool(((cap >= 1) & (cap <= self.capacity)).all()):
            raise ValueError(f"per-user cache bounds must lie in [1, {self.capacity}]")
        if torch.equal(cap, self.cap):
            return
        self.ensure_users(len(cap))
        held = self.items
        dense, size = compact_unique(held, torch.arange(held.shape[1], device=self.device) < self.size.unsqueeze(1),
                                     cap)
        self._layout(cap, dense, size)

    def ensure_users(self, n_users: int) -> None:
        if n_users > self.n_users:
            extra = n_users - self.n_users
            start = int(self.data.numel())
            self.offset = torch.cat([self.offset, start + torch.arange(extra, device=self.device) * self.capacity])
            self.cap = torch.cat([self.cap, self.cap.new_full((extra,), self.capacity)])
            self.data = torch.cat([self.data, self.data.new_zeros(extra * self.capacity)])
            self.count = torch.cat([self.count, self.count.new_zeros(extra)])

    def clear(self) -> None:
        self.data.zero_()
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
        fresh = ~(self.rows(users) == items.unsqueeze(1)).any(1)
        users, items = users[fresh], items[fresh]
        if len(users) == 0:
            return
        group_users, group_sizes = torch.unique_consecutive(users, return_counts=True)
        starts = group_sizes.cumsum(0) - group_sizes
        offset = torch.arange(len(users), device=self.device) - starts.repeat_interleave(group_sizes)
        cap = self.cap[users]
        # more than ``cap`` new ids for one user in one call: only the last ``cap`` can survive
        last = offset >= group_sizes.repeat_interleave(group_sizes) - cap
        slot = self.offset[users] + (self.count[users] + offset) % cap
        self.data[slot[last]] = items[last]
        self.count.index_add_(0, group_users, group_sizes)

    def merge(self, data: torch.Tensor, count: torch.Tensor) -> None:
        """Replace the sets by the per-user union of ``W`` gathered caches with this cache's layout
        (``[W, len(data)]``, ``[W, n_users]``, e.g. from DDP ranks): deduplicated, bounded, slots
        interleaved across ranks."""
        world = data.shape[0]
        width = int(self.cap.max()) if self.n_users else 0
        users = torch.arange(self.n_users, device=self.device)
        per_rank = [_gather_segments(data[w], self.offset, torch.minimum(count[w], self.cap), width)
                    for w in range(world)]
        flat = torch.stack([ids for ids, _ in per_rank], 2).reshape(len(users), width * world)
        flat_valid = torch.stack([inside for _, inside in per_rank], 2).reshape(len(users), width * world)
        dense, size = compact_unique(flat, flat_valid, self.cap)
        self._layout(self.cap, dense, size)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "cap": _copy(self.cap), "data": _copy(self.data),
                "count": _copy(self.count)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved cache; a saved bound above this cache's ``capacity`` is lowered to it."""
        device = self.device
        cap, count = state["cap"].to(device), state["count"].to(device)
        saved = RunnerUpCache(int(state["capacity"]), device=device)
        saved.cap, saved.offset, saved.data, saved.count = cap, cap.cumsum(0) - cap, state["data"].to(device), count
        dense = saved.items.clone()
        self._layout(cap, dense, count)
        if bool((cap > self.capacity).any()):
            self.set_capacities(cap.clamp(max=self.capacity))


@dataclass
class DiverseSets:
    """Every user's diverse set ``D_u``, ragged: ``ids[offset[u] : offset[u] + size[u]]`` (memory = the
    sum of the set sizes)."""

    ids: torch.Tensor
    offset: torch.Tensor
    size: torch.Tensor

    @classmethod
    def empty(cls, device=None) -> "DiverseSets":
        none = torch.zeros(0, dtype=torch.long, device=device)
        return cls(none, none.clone(), none.clone())

    @classmethod
    def from_dense(cls, items: torch.Tensor, size: torch.Tensor) -> "DiverseSets":
        """From ``[U, C]`` ids held in the first ``size[u]`` slots of each row."""
        keep = torch.arange(items.shape[1], device=items.device) < size.unsqueeze(1)
        return cls(items[keep], size.cumsum(0) - size, size.clone())

    @property
    def n_users(self) -> int:
        return len(self.size)

    def sizes_of(self, users: torch.Tensor) -> torch.Tensor:
        """``[B]`` size of each row's ``D_u`` (0 for users the sets do not know)."""
        known = users < self.n_users
        return torch.where(known, self.size[users.clamp(max=max(self.n_users - 1, 0))], 0) if self.n_users \
            else torch.zeros_like(users)

    def rows(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, K]`` each row's ``D_u`` ids, 0-padded; ``[B, K]`` bool valid), ``K`` the largest of them."""
        size = self.sizes_of(users)
        offset = self.offset[users.clamp(max=self.n_users - 1)] if self.n_users else torch.zeros_like(users)
        return _gather_segments(self.ids, offset, size, int(size.max()) if len(size) else 0)

    def to(self, device) -> "DiverseSets":
        return DiverseSets(self.ids.to(device), self.offset.to(device), self.size.to(device))

    def state_dict(self) -> dict:
        return {"ids": _copy(self.ids), "offset": _copy(self.offset), "size": _copy(self.size)}

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> "DiverseSets":
        return cls(_copy(state["ids"], device), _copy(state["offset"], device), _copy(state["size"], device))


def _copy(tensor: torch.Tensor, device="cpu") -> torch.Tensor:
    """A copy on ``device``: saved / restored state never aliases the live, in-place updated tensors."""
    return tensor.detach().to(device, copy=True)


def hard_and_runner_ups(scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool positions of the top-1 (``[B]``) and of ranks ``2..r+1`` (``[B, r]``) of ``[B, N]`` scores."""
    r = min(r, scores.shape[1] - 1)
    top = scores.topk(r + 1, dim=1).indices
    return top[:, 0], top[:, 1:]


def median_bandwidth(d2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[b]`` RBF bandwidths ``gamma = 1 / median_{i < j} ||e_i - e_j||^2`` over each set's valid pairs
    (``d2`` ``[b, m, m]`` squared distances, ``mask`` ``[b, m]``), so that the median pair of every
    set has ``S_ij = exp(-1)`` whatever the scale of the embeddings; ``1`` for a set without a pair
    at positive distance."""
    m = d2.shape[-1]
    upper = torch.ones(m, m, dtype=torch.bool, device=d2.device).triu(1)
    pairs = mask.unsqueeze(-1) & mask.unsqueeze(-2) & upper
    median = torch.where(pairs, d2, torch.nan).flatten(1).nanmedian(1).values
    return torch.where(median > 0, 1.0 / median, torch.ones_like(median))


def diversity_kernel(emb: torch.Tensor, hard_emb: torch.Tensor, kernel: str = "rbf", gamma: float | str = 1.0,
                     alpha: float = 1.0, mask: torch.Tensor | None = None,
                     hard_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DivNS's L-ensemble ``L = diag(q) S diag(q)`` over cached items, in float64.

    Args:
        emb: ``[m, d]`` or ``[b, m, d]`` embeddings of the cached items.
        hard_emb: ``[h, d]`` or ``[b, h, d]`` embeddings of the user's hard negatives ``H_u``.
        kernel: ``"rbf"``: ``S_ij = exp(-gamma ||e_i - e_j||^2)`` (the reference code's), ``gamma`` a
            number or ``"median"`` (per set, :func:`median_bandwidth`);
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
        bandwidth = median_bandwidth(d2, mask).view(b, 1, 1) if gamma == "median" else gamma
        S = torch.exp(-bandwidth * d2)
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


# elements of one chunk's [users, m, m] kernel: fewer users per chunk for large caches
_CHUNK_ELEMENTS = 1 << 24


def refresh_diverse_sets(item_emb: torch.Tensor, cache_items: torch.Tensor | RunnerUpCache,
                         cache_size: torch.Tensor, hard_items: torch.Tensor | RunnerUpCache,
                         hard_size: torch.Tensor, kernel: str = "rbf", gamma: float | str = 1.0, alpha: float = 1.0,
                         mode: str = "exact", generator: torch.Generator | None = None,
                         chunk: int = 1024) -> DiverseSets:
    """Every user's diverse set ``D_u``, batched over users.

    ``cache_items`` / ``hard_items`` are ``[U, C]`` / ``[U, H]`` tensors or :class:`RunnerUpCache`\ s
    holding distinct ids in their first ``cache_size`` / ``hard_size`` slots. For each user with
    both sets non-empty, ``L`` = :func:`diversity_kernel` over ``item_emb[C_u]`` and
    ``k = min(|H_u|, |C_u|, rank L)`` items are drawn by ``sample_k_dpp`` (``mode="exact"``) or
    ``greedy_map_dpp`` (``mode="greedy"``). Users are sorted by cache size and sent ``chunk`` at a
    time (fewer when a chunk's ``[users, m, m]`` kernel would exceed 2^24 elements), each chunk
    trimmed to its largest set (ragged sets via ``mask``).
    """
    if mode not in DPP_MODES:
        raise ValueError(f"divns_dpp_mode must be one of {list(DPP_MODES)}, got {mode!r}")
    n_users = len(cache_size)
    device = cache_size.device
    picked_users, picked_ids, sizes = [], [], torch.zeros(n_users, dtype=torch.long, device=device)
    active = ((cache_size > 0) & (hard_size > 0)).nonzero().flatten()
    active = active[cache_size[active].argsort(stable=True)]
    emb = item_emb.detach()
    start = 0
    while start < len(active):
        m = int(cache_size[active[min(start + chunk, len(active)) - 1]])  # sorted: the chunk's largest set
        users = active[start:start + max(1, min(chunk, _CHUNK_ELEMENTS // (m * m)))]
        start += len(users)
        c_size, h_size = cache_size[users], hard_size[users]
        m, hm = int(c_size.max()), int(h_size.max())
        items, hards = _rows(cache_items, users, m), _rows(hard_items, users, hm)
        mask = torch.arange(m, device=items.device) < c_size.unsqueeze(1)
        hard_mask = torch.arange(hm, device=items.device) < h_size.unsqueeze(1)
        L = diversity_kernel(emb[items], emb[hards], kernel, gamma, alpha, mask, hard_mask)
        k = torch.minimum(c_size, h_size)
        if mode == "exact":
            picked = sample_k_dpp(L, k, generator=generator, mask=mask, clamp_k=True)
        else:
            picked = greedy_map_dpp(L, torch.minimum(k, kdpp_rank(L, mask)), mask=mask)
        # greedy rows may stop early; -1s come last in both modes, so ids form a prefix
        valid = picked >= 0
        picked_users.append(users.unsqueeze(1).expand_as(picked)[valid])
        picked_ids.append(items.gather(1, picked.clamp_min(0))[valid])
        sizes[users] = valid.sum(1)
    if not picked_users:
        return DiverseSets(torch.zeros(0, dtype=torch.long, device=device), sizes.cumsum(0) - sizes, sizes)
    owners, ids = torch.cat(picked_users), torch.cat(picked_ids)
    order = owners.argsort(stable=True)  # by user; each user's ids keep their order
    return DiverseSets(ids[order], sizes.cumsum(0) - sizes, sizes)


def _rows(items: torch.Tensor | RunnerUpCache, users: torch.Tensor, width: int) -> torch.Tensor:
    return items.rows(users, width) if isinstance(items, RunnerUpCache) else items[users, :width]


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


def describe_synthesis(scorer: Scorer, items: str) -> str:
    """For the log: whether mixing the scores of two ``items`` is the score of their mixed item vector."""
    if synthesis_is_exact(scorer):
        return "exact: the score of the mixed item vector"
    return f"fallback: the mix of the two {items}' scores, not the score of a mixed embedding"


def distinct_slots(users: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    """One slot per row, rows of one user taking different slots where possible (``divns_pairing: distinct``).

    ``preference`` ``[B, K]`` ranks each row's slots (``-inf``: no item there). A user's rows, in
    batch order, each take their most preferred slot not yet taken by an earlier row of the same
    user; once all of a user's slots are taken they are free again, so a user with more rows than
    items cycles through them. Returns ``[B]`` slot indices (0 for a row without a valid slot).
    """
    if len(users) == 0:
        return torch.zeros(0, dtype=torch.long, device=users.device)
    _, group = torch.unique(users, return_inverse=True)
    order = group.argsort(stable=True)
    counts = torch.bincount(group)
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group), device=group.device) - (counts.cumsum(0) - counts)[group[order]]
    n_valid = torch.isfinite(preference).sum(1)
    taken = torch.zeros(len(counts), preference.shape[1], dtype=torch.bool, device=preference.device)
    slot = torch.zeros(len(users), dtype=torch.long, device=users.device)
    for j in range(int(rank.max()) + 1):
        rows = (rank == j).nonzero().flatten()
        g = group[rows]
        taken[g[taken[g].sum(1) >= n_valid[rows]]] = False  # every slot of the user taken: start again
        slot[rows] = preference[rows].masked_fill(taken[g], float("-inf")).argmax(1)
        taken[g, slot[rows]] = True
    return slot


def pick_slots(users: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None, pick: str = "uniform",
               pairing: str = "independent") -> torch.Tensor:
    """``[B]`` slot of each row among its ``valid`` (``[B, K]``) diverse items.

    ``pick``: ``uniform`` -- any valid slot, equally likely (``scores`` unused); ``top`` -- the slot
    of the highest score; ``score`` -- drawn with probability ``softmax(scores)`` over the valid
    slots (Gumbel-max, so that with ``pairing: distinct`` a user's rows draw without replacement).
    ``pairing``: ``independent`` or ``distinct`` (:func:`distinct_slots`).
    """
    if pick not in DIVERSE_PICKS:
        raise ValueError(f"divns_diverse_pick must be one of {list(DIVERSE_PICKS)}, got {pick!r}")
    if pick == "uniform":
        preference = torch.rand(valid.shape, device=valid.device)
    else:
        preference = scores.detach().float()
        if pick == "score":
            preference = preference - torch.log(-torch.log(torch.rand_like(preference).clamp_min(1e-20)))
    preference = preference.masked_fill(~valid, float("-inf"))
    return preference.argmax(1) if pairing == "independent" else distinct_slots(users, preference)


# --------------------------------------------------------------------------- Lightning module


class DivNSModule(DNSModule):
    """``neg_sampler: divns`` (see the module docstring)."""

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.cache_ratio = config["divns_cache_ratio"]
        self.lam = float(config["divns_lambda"])
        self.kernel = config["divns_kernel"]
        self.gamma = config["divns_gamma"] if config["divns_gamma"] == "median" else float(config["divns_gamma"])
        self.alpha = float(config["divns_alpha"])
        self.dpp_mode = config["divns_dpp_mode"]
        self.chunk = config["divns_refresh_chunk"]
        self.refresh_every = config["divns_refresh_every"]
        self.pick = config["divns_diverse_pick"]
        self.pairing = config["divns_pairing"]
        self.cache_bound = config["divns_cache_bound"]
        self.seed = config["seed"] or 0
        cache_size = config["divns_cache_size"]
        hard_size = config["divns_hard_size"] or max(1, cache_size // self.cache_ratio)
        self.cache = RunnerUpCache(cache_size)   # C_u
        self.hard = RunnerUpCache(hard_size)     # H_u
        self.diverse = DiverseSets.empty()       # D_u
        self.synthetic_rows = 0
        self.rows = 0
        self._synthesis_logged = False

    # ---- config

    @staticmethod
    def validate_config(config) -> None:
        require_one(config, "neg_num", "divns",
                    "each row trains on one synthetic negative: DNS's top-1 mixed with a diverse item")
        require_one(config, "top_m", "divns", "its hard negative is the top-1")
        n = config["candidate_num"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"candidate_num must be an integer >= 2 for neg_sampler=divns "
                             f"(top-1 plus runner-ups), got {n!r}")
        check_number(config, "divns_cache_ratio", 1, n - 1, integer=True)
        check_number(config, "divns_lambda", 0.0, 1.0)
        if config["divns_gamma"] != "median":
            if isinstance(config["divns_gamma"], str):
                raise ValueError(f"divns_gamma must be a number > 0 or 'median', got {config['divns_gamma']!r}")
            check_number(config, "divns_gamma", 0.0, low_open=True)
        check_number(config, "divns_alpha", 0.0)
        check_number(config, "divns_cache_size", 1, integer=True)
        if config["divns_hard_size"] is not None:
            check_number(config, "divns_hard_size", 1, integer=True)
        check_number(config, "divns_refresh_chunk", 1, integer=True)
        check_number(config, "divns_refresh_every", 1, integer=True)
        for key, choices in (("divns_kernel", KERNELS), ("divns_dpp_mode", DPP_MODES),
                             ("divns_diverse_pick", DIVERSE_PICKS), ("divns_pairing", PAIRINGS),
                             ("divns_cache_bound", CACHE_BOUNDS)):
            if config[key] not in choices:
                raise ValueError(f"{key} must be one of {list(choices)}, got {config[key]!r}")

    # ---- state on the module's device

    def _to_device(self) -> None:
        device = self.device
        if self.cache.device != device:
            self.cache.to(device)
            self.hard.to(device)
        if self.diverse.size.device != device:
            self.diverse = self.diverse.to(device)

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def on_fit_start(self) -> None:
        dataset = getattr(getattr(self.trainer.datamodule, "train_data", None), "_dataset", None)
        n_users = getattr(dataset, "user_num", 0)
        self._to_device()
        self.cache.ensure_users(n_users)
        self.hard.ensure_users(n_users)
        if self.cache_bound == "rows" and dataset is not None:
            self.bound_by_rows(torch.bincount(dataset.inter_feat[dataset.uid_field].long(), minlength=n_users))

    def bound_by_rows(self, rows_per_user: torch.Tensor) -> None:
        """``divns_cache_bound: rows``: user ``u`` with ``n_u`` training rows per epoch (RecBole's rows,
        also the targets of ``train_positions: all``) gets ``|C_u| <= min(r n_u, divns_cache_size)`` and
        ``|H_u| <= min(n_u, hard bound)``: room for every runner-up and hard negative of an epoch up
        to the caps, in memory that grows with the interactions (:class:`RunnerUpCache`)."""
        rows = rows_per_user.to(self.device)
        self.cache.set_capacities((self.cache_ratio * rows).clamp(1, self.cache.capacity))
        self.hard.set_capacities(rows.clamp(1, self.hard.capacity))
        if self._trainer is None or self.trainer.is_global_zero:
            slots = int(self.cache.cap.sum() + self.hard.cap.sum())
            getLogger().info(
                f"divns caches bounded by each user's training rows: C_u <= min({self.cache_ratio} n_u, "
                f"{self.cache.capacity}), H_u <= min(n_u, {self.hard.capacity}); {slots} id slots "
                f"({slots * 8 / 2**20:.1f} MiB; fixed bounds would take "
                f"{len(rows) * (self.cache.capacity + self.hard.capacity) * 8 / 2**20:.1f} MiB)")

    # ---- training

    def pick_diverse(self, users: torch.Tensor, batch: Interaction | None = None, h=None,
                     scorer: Scorer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A diverse item ``v_D`` of each row's ``D_u`` (``[B]`` ids, ``[B]`` bool has-one).

        ``divns_diverse_pick``: ``uniform`` (the paper's: any item of ``D_u``), ``top`` (the item
        of ``D_u`` the row's own representation ``h`` scores highest), ``score`` (drawn with
        probability ``softmax`` of those scores). ``divns_pairing: distinct`` gives the rows of a
        user in the batch different items of ``D_u`` where possible (:func:`distinct_slots`).
        """
        if not bool(self.diverse.size.any()):
            return torch.zeros_like(users), torch.zeros_like(users, dtype=torch.bool)
        size = self.diverse.sizes_of(users)
        has = size > 0
        if self.pick == "uniform" and self.pairing == "independent":
            pick = (torch.rand(len(users), device=users.device) * size).long().clamp(min=0)
            pick = torch.minimum(pick, (size - 1).clamp_min(0))
            ids, _ = self.diverse.rows(users)
            return ids.gather(1, pick.unsqueeze(1)).squeeze(1), has
        ids, valid = self.diverse.rows(users)
        scores = None
        if self.pick != "uniform":
            with torch.no_grad():
                scores = scorer.score(self.model, batch, h, ids)
        slot = pick_slots(users, valid, scores, self.pick, self.pairing)
        return ids.gather(1, slot.unsqueeze(1)).squeeze(1), has

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        self._to_device()
        model = self.model
        candidates, users = batch[CANDIDATES], batch[model.USER_ID].long()
        scorer = self.scorer_for("self", model, batch)
        if not self._synthesis_logged:
            self._synthesis_logged = True
            getLogger().info(f"divns: {type(model).__name__} via {scorer.path}; synthetic negative's score "
                             f"lam*s(v_H) + (1-lam)*s(v_D) is {describe_synthesis(scorer, 'negatives')}")
        h = scorer.encode(model, batch)
        with torch.no_grad():
            hard_pos, runner_pos = hard_and_runner_ups(scorer.score(model, batch, h, candidates), self.cache_ratio)
        hard = candidates.gather(1, hard_pos.unsqueeze(1)).squeeze(1)
        runners = candidates.gather(1, runner_pos)
        self.hard.add(users, hard)
        self.cache.add(users.unsqueeze(1).expand_as(runners), torch.where(runners == hard.unsqueeze(1), 0, runners))
        diverse, has = self.pick_diverse(users, batch, h, scorer)
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
        """Refresh ``D_u`` every ``divns_refresh_every`` epochs (the caches keep filling in between, within
        their bounds); the epochs in between only report their negatives."""
        epoch = self.current_epoch
        if (epoch + 1) % self.refresh_every == 0:
            self.refresh(epoch)
        else:
            super().on_train_epoch_end()

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
                cache.merge(self.all_gather(cache.data), self.all_gather(cache.count))
        refresh_gen = torch.Generator(device=self.device).manual_seed(self._epoch_seed(epoch))
        self.diverse = refresh_diverse_sets(
            emb, self.cache, self.cache.size, self.hard, self.hard.size, self.kernel, self.gamma,
            self.alpha, self.dpp_mode, refresh_gen, self.chunk)
        sizes = self.diverse.size
        record = stats
        record.update({
            "synthetic_row_fraction": self.synthetic_rows / max(self.rows, 1),
            "cache_entries_local": local_entries,
            "cache_entries": int(self.cache.size.sum()),
            "diverse_users": int((sizes > 0).sum()),
            "diverse_mean_size": float(sizes[sizes > 0].float().mean()) if bool((sizes > 0).any()) else 0.0,
        })
        self.cache.clear()
        self.hard.clear()
        self.synthetic_rows = self.rows = 0
        record["refresh_seconds"] = perf_counter() - started
        self.log_epoch(record, f"divns epoch {epoch}: refresh {record['refresh_seconds']:.2f}s; D_u for "
                               f"{record['diverse_users']} users (mean k {record['diverse_mean_size']:.1f}); synthetic "
                               f"rows {record['synthetic_row_fraction']:.1%}")
        return record

    def _epoch_seed(self, epoch: int) -> int:
        return (int(self.seed) * 1_000_003 + epoch * 7919 + 17) % 2**62

    # ---- checkpoint

    def divns_state(self) -> dict:
        return {
            "cache": self.cache.state_dict(),
            "hard": self.hard.state_dict(),
            "diverse": self.diverse.state_dict(),
            "synthetic_rows": self.synthetic_rows,
            "rows": self.rows,
        }

    def load_divns_state(self, state: dict) -> None:
        self.cache.load_state_dict(state["cache"])
        self.hard.load_state_dict(state["hard"])
        self.diverse = DiverseSets.from_state(state["diverse"], self.cache.device)
        self.synthetic_rows, self.rows = state["synthetic_rows"], state["rows"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["divns"] = self.divns_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "divns" in checkpoint:
            self.load_divns_state(checkpoint["divns"])


register_sampler("divns", DivNSModule, config_file=packaged_yaml("divns"))
