"""Sets of (user, item) pairs with a vectorised membership test: a packed bitmap and a hash set.

Both are built from the sorted, unique int64 keys ``user * item_num + item`` and answer
``contains(users, items)`` with a ``[n]`` bool tensor; they give the same answers, so a
sampler draws the same items whichever it holds. The bitmap costs ``user_num * item_num / 8``
bytes whatever the data; the hash set costs 32-64 bytes per pair.
"""
from __future__ import annotations

import torch

_EMPTY = -1
_SEARCH_BELOW = 2048  # fewer tests than this (the sampler's later rejection rounds): one binary search
_GOLDEN = 2654435769  # floor(2**32 / golden ratio): Knuth's multiplicative hash
_LOW31, _LOW32 = (1 << 31) - 1, (1 << 32) - 1


def in_sorted(sorted_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: which of ``keys`` occur in the sorted 1-D tensor ``sorted_keys`` (binary search)."""
    if len(sorted_keys) == 0:
        return torch.zeros(len(keys), dtype=torch.bool)
    pos = torch.searchsorted(sorted_keys, keys).clamp_(max=len(sorted_keys) - 1)
    return sorted_keys.index_select(0, pos) == keys


class PackedBitmap:
    """One bit per (user, item): ``[user_num, ceil(item_num / 8)]`` bytes; a test is one gather."""

    def __init__(self, keys: torch.Tensor, user_num: int, item_num: int) -> None:
        users, items = keys // item_num, keys % item_num
        bytes_per_user = (item_num + 7) // 8
        byte, inverse = torch.unique_consecutive(users * bytes_per_user + (items >> 3), return_inverse=True)
        values = torch.zeros(len(byte), dtype=torch.int16).index_add_(0, inverse, (1 << (items & 7)).short())
        bits = torch.zeros(user_num * bytes_per_user, dtype=torch.uint8)
        bits[byte] = values.to(torch.uint8)  # distinct bits of one byte: their sum is their OR
        self.bits = bits.view(user_num, bytes_per_user)

    @property
    def nbytes(self) -> int:
        return self.bits.numel()

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        byte = self.bits.view(-1).index_select(0, users * self.bits.shape[1] + (items >> 3))
        return (byte >> (items & 7)) & 1 == 1


class PairHashSet:
    """Open addressing (linear probing) over the keys, load factor in (1/8, 1/4], plus the
    sorted keys themselves (the caller's tensor, not copied).

    The slot of a key is Knuth's 32-bit multiplicative hash of the key (folded to 31 bits
    when keys can exceed that), computed without int64 overflow. A test reads the key's slot
    and the next one: at this load that settles nearly all tests (97% on ml-100k); the rest, and
    batches of fewer than 2048 tests, are settled by a binary search of the sorted keys, so a
    test is a few vectorised passes whatever the probe lengths.
    """

    def __init__(self, keys: torch.Tensor, user_num: int, item_num: int) -> None:
        self.keys, self.item_num = keys, item_num
        self.fold = user_num * item_num > _LOW31
        self.bits = min(32, max(4, (4 * len(keys) - 1).bit_length()))
        size = 1 << self.bits
        if len(keys) > size // 2:
            raise ValueError(f"{len(keys)} pairs do not fit a hash set of at most 2**32 slots")
        self.table = torch.full((size,), _EMPTY, dtype=torch.long)
        pending, slot = keys, self._slot(keys)
        while len(pending) > 0:  # insert: the largest key wins a contested empty slot, the rest probe on
            free = self.table[slot] == _EMPTY
            self.table.scatter_reduce_(0, slot[free], pending[free], "amax")
            placed = self.table[slot] == pending
            pending, slot = pending[~placed], (slot[~placed] + 1) & (size - 1)

    def _slot(self, keys: torch.Tensor) -> torch.Tensor:
        mixed = (keys >> 31).bitwise_xor_(keys).bitwise_and_(_LOW31) if self.fold else keys
        return (mixed * _GOLDEN).bitwise_and_(_LOW32).bitwise_right_shift_(32 - self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes of the hash table (the sorted keys belong to the caller)."""
        return self.table.numel() * self.table.element_size()

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        keys = (users * self.item_num).add_(items)
        if len(keys) < _SEARCH_BELOW:
            return in_sorted(self.keys, keys)
        slot = self._slot(keys)
        held = self.table.index_select(0, slot)  # index_select: 2-3x faster than tensor[index] on a CPU
        found = held == keys
        todo = (held != _EMPTY).logical_and_(~found).nonzero().flatten()
        if len(todo) > 0:  # the next slot
            wanted = keys.index_select(0, todo)
            slot = slot.index_select(0, todo).add_(1).bitwise_and_(len(self.table) - 1)
            held = self.table.index_select(0, slot)
            hit = held == wanted
            found[todo[hit]] = True
            todo = todo[(held != _EMPTY).logical_and_(~hit)]
        if len(todo) > 0:  # longer probe sequences
            found[todo] = in_sorted(self.keys, keys.index_select(0, todo))
        return found
