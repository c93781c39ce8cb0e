"""Candidate pools: a RecBole ``Sampler`` and a ``TrainDataLoader`` that attach them to batches.

Each training row (sequence, target) gets ``candidate_num`` items drawn from the
items its user never interacted with in training (MDCNS Eq. 2), as a ``[B, N]``
tensor under the field :data:`CANDIDATES`. Rows are not repeated per candidate.
A general model's rows are RecBole's (user, item) training interactions; their
pools exclude the user's training items the same way.
Draws are independent (with replacement), like RecBole's own samplers.

``candidate_exclude: row`` excludes only the row's own sequence (as the model sees it) and
target instead -- a training user's later items may be drawn -- and ``candidate_distinct:
true`` draws a pool of distinct items: together, the MDCNS authors' released code
(``neg_sample_dns_unique``: ``random.sample`` of N items outside the row's prefix and target).
"""
from __future__ import annotations

from time import perf_counter

import numpy as np
import torch
from recbole.data.dataloader import TrainDataLoader
from recbole.data.interaction import Interaction
from recbole.sampler import Sampler

from recbole_mdcns.used_pairs import PackedBitmap, PairHashSet, in_sorted

CANDIDATES = "candidate_items"
CANDIDATE_EXCLUDE = ("user", "row")  # what a pool leaves out: the user's training items | the row's sequence and target
_REJECTION_ROUNDS = 20
# The packed bitmap of used (user, item) pairs costs user_num * item_num / 8 bytes whatever the data
# (10.5 GiB on the 300k x 300k synthetic catalogue of benchmarks/studies/large_catalogue.py, where our
# peak memory is then 1.07x RecBole's own pipeline's with a PairHashSet of 64 MiB instead). It is kept
# while at most this large (a cost bounded next to RecBole's own dataset), as it is the faster test:
# on ml-100k, forced onto the hash set, the same benchmark's pool draw (2048 rows, N = 100) took 1.87x
# the bitmap's.
BITMAP_MAX_BYTES = 64 * 1024 * 1024
# Sequence entries turned into keys at a time when collecting the used pairs (bounds the transient).
_KEY_CHUNK = 1 << 20


class CandidatePoolSampler(Sampler):
    """Vectorised uniform / popularity sampling that excludes each user's training items.

    ``used_ids`` is a sorted int64 tensor of keys ``user * item_num + item`` for
    every (user, item) seen in training, the first items of sequences included;
    ``used_pairs`` holds the same pairs for testing draws: a :class:`PackedBitmap`
    (``user_num * item_num / 8`` bytes, one gather per test) while that is at most
    ``bitmap_max_bytes``, else a :class:`PairHashSet` (32-64 bytes per pair); both
    answer alike, so the draws for a seed do not depend on which. Rejection sampling
    runs a bounded number of rounds; rows still rejected after that are drawn exactly
    from their user's complement. A user with no item left to sample raises
    ``ValueError`` when the sampler is built.
    """

    def __init__(self, train_dataset, distribution: str = "uniform", alpha: float = 1.0,
                 bitmap_max_bytes: int = BITMAP_MAX_BYTES, exclude: str = "user", distinct: bool = False) -> None:
        self.item_seq_field = train_dataset.config["ITEM_ID_FIELD"] + train_dataset.config["LIST_SUFFIX"]
        self.generator = torch.Generator().manual_seed(train_dataset.config["seed"])
        self.exclude, self.distinct = exclude, distinct
        super().__init__(["train"], [train_dataset], distribution, alpha)
        small = self.user_num * ((self.item_num + 7) // 8) <= bitmap_max_bytes
        structure = PackedBitmap if small else PairHashSet
        self.used_pairs: PackedBitmap | PairHashSet = structure(self.used_ids, self.user_num, self.item_num)

    def get_used_ids(self) -> torch.Tensor:
        inter = self.datasets[0].inter_feat
        users = inter[self.uid_field].long()
        keys = torch.unique(users * self.item_num + inter[self.iid_field].long())
        # sequence items that are no row's target (the first item of each history, or a given
        # sequence's items), a chunk of rows at a time so the transient stays small; a general
        # model's rows have no sequence: their (user, item) pairs are all of the user's history
        seqs = inter[self.item_seq_field] if self.item_seq_field in inter.interaction else users[:0].view(0, 1)
        extra = []
        rows = max(1, _KEY_CHUNK // max(1, seqs.shape[1]))
        for start in range(0, len(seqs), rows):
            seq = seqs[start:start + rows].long()
            seq_keys = (users[start:start + rows].unsqueeze(1) * self.item_num + seq)[seq > 0]
            extra.append(torch.unique(seq_keys[~in_sorted(keys, seq_keys)]))
        keys = torch.unique(torch.cat([keys, *extra]))
        counts = torch.bincount(keys // self.item_num, minlength=self.user_num)
        full = (counts >= self.item_num - 1).nonzero().flatten()
        if len(full) > 0:
            raise ValueError(
                f"users {full[:5].tolist()} interacted with every item in training, so no negative "
                "can be drawn for them; filter them with `user_inter_num_interval`."
            )
        return keys

    def _build_alias_table(self) -> None:
        items = torch.cat([dataset.inter_feat[self.iid_field].long() for dataset in self.datasets])
        counts = torch.bincount(items, minlength=self.item_num).double()
        counts[0] = 0
        self.item_weights = counts.pow(self.alpha)

    def _draw(self, size: int) -> torch.Tensor:
        if self.distribution == "popularity":
            return torch.multinomial(self.item_weights, size, replacement=True, generator=self.generator)
        return torch.randint(1, self.item_num, (size,), generator=self.generator)

    def is_used(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Whether each ``(users[i], items[i])`` (same shapes, any) is a training interaction of the user."""
        return self.used_pairs.contains(users.reshape(-1), items.reshape(-1)).view(items.shape)

    def _outside(self, excluded: torch.Tensor) -> torch.Tensor:
        """Every item id but the padding id 0 and ``excluded``, ascending."""
        allowed = torch.ones(self.item_num, dtype=torch.bool)
        allowed[0] = False
        allowed[excluded] = False
        return allowed.nonzero().flatten()

    def _allowed(self, user: int, row: torch.Tensor | None) -> torch.Tensor:
        """Every item a pool of ``user`` (``exclude: user``: outside the user's training items) or of the row
        holding ``row`` (``exclude: row``) may contain."""
        if self.exclude == "row":
            return self._outside(row)
        lo, hi = torch.searchsorted(self.used_ids, torch.tensor([user * self.item_num, (user + 1) * self.item_num]))
        return self._outside(self.used_ids[lo:hi] - user * self.item_num)

    def check_room(self, num: int, row_items: int) -> None:
        """``ValueError`` unless every row can get ``num`` distinct candidates (``candidate_distinct``): the
        items outside a user's training items (``exclude: user``) or outside ``row_items`` (a row's sequence
        and target at their longest, ``exclude: row``) must number at least ``num``."""
        if self.exclude == "row":
            free, who = self.item_num - 1 - row_items, f"a row of {row_items} items (sequence and target)"
        else:
            counts = torch.bincount(self.used_ids // self.item_num, minlength=self.user_num)
            user = int(counts.argmax())
            free, who = self.item_num - 1 - int(counts[user]), f"user {user}"
        if free < num:
            raise ValueError(f"candidate_distinct: true needs candidate_num ({num}) distinct items outside what a "
                             f"pool excludes (candidate_exclude: {self.exclude}), but {who} leaves {free} of the "
                             f"catalogue's {self.item_num - 1}; lower candidate_num or set candidate_distinct: false")

    def sample_pool(self, user_ids: torch.Tensor, num: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, num]`` items none of which the row's user interacted with in training; with ``exclude: row``,
        none of the row's own items ``rows`` (``[B, L]``: its sequence and target, 0 = padding) instead; with
        ``distinct``, no item twice in a row's pool. Rejection rounds, then an exact draw for what is left."""
        if self.exclude == "row" and rows is None:
            raise ValueError("candidate_exclude: row draws pools from each row's own sequence and target; "
                             "this caller passed none")
        users = user_ids.long().unsqueeze(1).expand(-1, num).reshape(-1)
        items = self._draw(len(users))
        todo = self._rejected(users, items, num, rows, torch.arange(len(items))).nonzero().flatten()
        for _ in range(_REJECTION_ROUNDS):
            if len(todo) == 0:
                break
            items[todo] = self._draw(len(todo))
            todo = todo[self._rejected(users, items, num, rows, todo)]
        per_row = self.exclude == "row" or self.distinct
        groups = todo // num if per_row else users[todo]
        for group in groups.unique().tolist():
            left = todo[groups == group]
            allowed = self._allowed(int(users[left[0]]), None if rows is None else rows[left[0] // num])
            if self.distinct:
                row = torch.arange(group * num, (group + 1) * num)
                kept = row[~torch.isin(row, left)]
                allowed = allowed[~torch.isin(allowed, items[kept])]
            items[left] = allowed[self._pick(allowed, len(left))]
        return items.view(-1, num)

    def _rejected(self, users: torch.Tensor, items: torch.Tensor, num: int, rows: torch.Tensor | None,
                  todo: torch.Tensor) -> torch.Tensor:
        """Which of the flat positions ``todo`` of the pools ``items`` (``[B * num]``) must be drawn again: an
        excluded item, or (``distinct``) an item its row already holds at a position not in ``todo`` or at an
        earlier one."""
        if self.exclude == "row" and len(todo) == len(items):  # every position: one broadcast, no [B * num, L] copy
            bad = (items.view(-1, num, 1) == rows.unsqueeze(1)).any(2).view(-1)
        elif self.exclude == "row":
            bad = (rows.index_select(0, todo // num) == items[todo].unsqueeze(1)).any(1)
        else:
            bad = self.is_used(users[todo], items[todo])
        if self.distinct:
            pools = items.view(-1, num)
            redraw = torch.zeros_like(items, dtype=torch.bool)
            redraw[todo] = True
            position = torch.arange(num).expand_as(pools)
            # within a row, equal items sort together, an item kept from an earlier round first
            order = (pools * (2 * num) + redraw.view_as(pools) * num + position).argsort(1)
            ordered = pools.gather(1, order)
            again = torch.zeros_like(pools, dtype=torch.bool)
            again.scatter_(1, order[:, 1:], ordered[:, 1:] == ordered[:, :-1])
            bad |= again.view(-1)[todo]
        return bad

    def _pick(self, allowed: torch.Tensor, size: int) -> torch.Tensor:
        """``size`` positions into ``allowed``: by the pool's distribution, without replacement if ``distinct``."""
        if self.distribution == "popularity" and self.item_weights[allowed].sum() > 0 and (
                not self.distinct or int((self.item_weights[allowed] > 0).sum()) >= size):
            return torch.multinomial(self.item_weights[allowed], size, not self.distinct, generator=self.generator)
        if self.distinct:
            return torch.randperm(len(allowed), generator=self.generator)[:size]
        return torch.randint(len(allowed), (size,), generator=self.generator)

    def sample_by_key_ids(self, key_ids, num: int) -> torch.Tensor:
        """RecBole's layout (all rows' first sample, then all second samples, ...)."""
        return self.sample_pool(torch.as_tensor(np.asarray(key_ids)), num).t().reshape(-1)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)


class CandidateTrainDataLoader(TrainDataLoader):
    """RecBole's training loader, plus a ``[B, candidate_num]`` candidate pool per batch."""

    def __init__(self, config, dataset, sampler: CandidatePoolSampler, shuffle: bool = False) -> None:
        self.candidate_num = config["candidate_num"]
        self.sampling_seconds = 0.0  # time spent drawing pools, for the benchmarks' sampling share
        super().__init__(config, dataset, sampler, shuffle=shuffle)

    def draw_pools(self, users: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[len(users), candidate_num]`` candidate pools, timed into :attr:`sampling_seconds`; with
        ``candidate_num: 0`` (a sampler that draws no pool) an empty ``[len(users), 0]``, nothing drawn.
        ``rows``: each row's own items (``[B, L]``, sequence and target), read with ``candidate_exclude: row``."""
        if self.candidate_num == 0:
            return torch.zeros(len(users), 0, dtype=torch.long)
        started = perf_counter()
        pools = self._sampler.sample_pool(users, self.candidate_num, rows)
        self.sampling_seconds += perf_counter() - started
        return pools

    @property
    def excludes_rows(self) -> bool:
        """``candidate_exclude: row``: pools leave out the row's own sequence and target, not the user's items."""
        return self._sampler.exclude == "row"

    def _neg_sampling(self, inter: Interaction) -> Interaction:
        rows = None
        if self.excludes_rows:
            rows = torch.cat([inter[self._sampler.item_seq_field], inter[self._dataset.iid_field].unsqueeze(1)], 1)
        inter.update(Interaction({CANDIDATES: self.draw_pools(inter[self._dataset.uid_field], rows)}))
        return inter

    def probe_batch(self, rows: int = 32) -> Interaction:
        """A real training batch (RecBole's rows, transform and candidate pools) for the checks made before
        training (scorers, full sequence): the ``rows`` shortest and longest sequences and ``2 * rows`` rows
        spread evenly over the lengths in between (a general model's rows: ``4 * rows`` spread evenly)."""
        inter = self._dataset.inter_feat
        length_field = self._dataset.config["ITEM_LIST_LENGTH_FIELD"]
        if length_field not in inter.interaction:
            return self.collate_fn(torch.linspace(0, len(inter) - 1, 4 * rows).long().unique().numpy())
        lengths = inter[length_field]
        order = lengths.argsort(stable=True)
        spread = torch.linspace(0, len(order) - 1, 2 * rows).long()
        index = torch.cat([order[:rows], order[spread], order[-rows:]]).unique()
        return self.collate_fn(index.numpy())


def candidate_train_loader(config, train_data: TrainDataLoader) -> CandidateTrainDataLoader:
    """Replace the loader RecBole built with one that draws candidate pools."""
    dataset = train_data._dataset
    sampler = CandidatePoolSampler(dataset, config["candidate_distribution"], config["candidate_alpha"],
                                   exclude=config["candidate_exclude"], distinct=config["candidate_distinct"])
    if config["candidate_distinct"] and config["candidate_num"]:
        sampler.check_room(config["candidate_num"], (config["MAX_ITEM_LIST_LENGTH"] or 0) + 1)
    return CandidateTrainDataLoader(config, dataset, sampler, shuffle=config["shuffle"])
