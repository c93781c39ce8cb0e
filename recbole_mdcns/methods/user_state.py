"""State tables with one bounded row per key -- AdaSIR's pool per user, SRNS's memory per
(user, target item): row selection within a batch, growth, and the DDP merge rule.

Keys are RecBole's internal ids (a user, or a user and the row's target item), never a row's
position, so state holds whether a batch row is a prefix row or one target of a full-sequence
window. Tables are sized at fit start (every rank alike).

**DDP.** Ranks update the rows of different keys -- and sometimes of the same key. At epoch end
every rank ``all_gather``\\ s its tables and the per-key update counts of the epoch and keeps, per
key, the row of the rank that updated it most (ties: the lowest rank), so all ranks start the next
epoch with identical state and rank 0's checkpoint is the whole state.
"""
from __future__ import annotations

import torch


def first_rows(keys: torch.Tensor) -> torch.Tensor:
    """Positions of the first row of each distinct key in ``keys`` (``[R]``), in key order."""
    distinct, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(len(keys), device=keys.device)
    first = torch.full((len(distinct),), len(keys), dtype=torch.long, device=keys.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")


def grow_rows(table: torch.Tensor, n_rows: int, fill: float = 0) -> torch.Tensor:
    """``table`` with rows appended (filled with ``fill``) up to ``n_rows``; unchanged if it has as many."""
    extra = n_rows - table.shape[0]
    if extra <= 0:
        return table
    return torch.cat([table, table.new_full((extra, *table.shape[1:]), fill)])


def winning_rank(updates: torch.Tensor) -> torch.Tensor:
    """``[U]`` rank whose row of each key to keep: the most updates this epoch (``updates`` ``[W, U]``),
    ties to the lowest rank (keys nobody updated: rank 0, whose row every rank shares)."""
    return updates.argmax(0)


def take_rank(gathered: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Per key ``u``, row ``gathered[rank[u], u]`` of a ``[W, U, ...]`` gathered table."""
    return gathered[rank, torch.arange(gathered.shape[1], device=gathered.device)]


def copy_state(tensor: torch.Tensor, device="cpu") -> torch.Tensor:
    """A detached copy on ``device``: saved / restored state never aliases live, in-place updated tensors."""
    return tensor.detach().to(device, copy=True)
