"""DivNS's per-user state: the runner-up cache ``C_u``, the hard set ``H_u`` and the diverse sets ``D_u``.

**State layout.** Caches are tensors, not Python sets: :class:`RunnerUpCache` holds one
flat LongTensor with a ring-buffer segment per user (``0`` = empty; ids are deduplicated on
insertion; every segment ``divns_cache_size`` long -- a dense ``[n_users, cap]`` layout --
unless ``divns_cache_bound: rows`` sizes them), a ``[n_users]`` count, indexed by RecBole's
internal user id. The diverse sets (:class:`DiverseSets`) are ragged likewise. Both hand out
their state as CPU copies of their tensors for the checkpoint and are rebuilt from them.

Everything here is keyed by user id and item id only: nothing is specific to sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def to(self, device: torch.device | str) -> RunnerUpCache:
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
    def empty(cls, device: torch.device | str | None = None) -> DiverseSets:
        none = torch.zeros(0, dtype=torch.long, device=device)
        return cls(none, none.clone(), none.clone())

    @classmethod
    def from_dense(cls, items: torch.Tensor, size: torch.Tensor) -> DiverseSets:
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

    def to(self, device: torch.device | str) -> DiverseSets:
        return DiverseSets(self.ids.to(device), self.offset.to(device), self.size.to(device))

    def state_dict(self) -> dict:
        return {"ids": _copy(self.ids), "offset": _copy(self.offset), "size": _copy(self.size)}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> DiverseSets:
        return cls(_copy(state["ids"], device), _copy(state["offset"], device), _copy(state["size"], device))


def _copy(tensor: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """A copy on ``device``: saved / restored state never aliases the live, in-place updated tensors."""
    return tensor.detach().to(device, copy=True)

