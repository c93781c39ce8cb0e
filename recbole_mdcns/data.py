"""Candidate pools: a RecBole ``Sampler`` and a ``TrainDataLoader`` that attach them to batches.

Each training row (sequence, target) gets ``candidate_num`` items drawn from the
items its user never interacted with in training (MDCNS Eq. 2), as a ``[B, N]``
tensor under the field :data:`CANDIDATES`. Rows are not repeated per candidate.
A general model's rows are RecBole's (user, item) training interactions; their
pools exclude the user's training items the same way.
Draws are independent (with replacement), like RecBole's own samplers.
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
                 bitmap_max_bytes: int = BITMAP_MAX_BYTES) -> None:
        self.item_seq_field = train_dataset.config["ITEM_ID_FIELD"] + train_dataset.config["LIST_SUFFIX"]
        self.generator = torch.Generator().manual_seed(train_dataset.config["seed"])
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

    def _complement(self, user: int) -> torch.Tensor:
        lo, hi = torch.searchsorted(self.used_ids, torch.tensor([user * self.item_num, (user + 1) * self.item_num]))
        allowed = torch.ones(self.item_num, dtype=torch.bool)
        allowed[0] = False
        allowed[self.used_ids[lo:hi] - user * self.item_num] = False
        return allowed.nonzero().flatten()

    def sample_pool(self, user_ids: torch.Tensor, num: int) -> torch.Tensor:
        """``[B, num]`` items none of which the row's user interacted with in training."""
        users = user_ids.long().unsqueeze(1).expand(-1, num).reshape(-1)
        items = self._draw(len(users))
        todo = self.is_used(users, items).nonzero().flatten()
        for _ in range(_REJECTION_ROUNDS):
            if len(todo) == 0:
                break
            items[todo] = self._draw(len(todo))
            todo = todo[self.is_used(users[todo], items[todo])]
        for user in users[todo].unique().tolist():
            rows = todo[users[todo] == user]
            allowed = self._complement(user)
            if self.distribution == "popularity" and self.item_weights[allowed].sum() > 0:
                pick = torch.multinomial(self.item_weights[allowed], len(rows), True, generator=self.generator)
            else:
                pick = torch.randint(len(allowed), (len(rows),), generator=self.generator)
            items[rows] = allowed[pick]
        return items.view(-1, num)

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

    def draw_pools(self, users: torch.Tensor) -> torch.Tensor:
        """``[len(users), candidate_num]`` candidate pools, timed into :attr:`sampling_seconds`; with
        ``candidate_num: 0`` (a sampler that draws no pool) an empty ``[len(users), 0]``, nothing drawn."""
        if self.candidate_num == 0:
            return torch.zeros(len(users), 0, dtype=torch.long)
        started = perf_counter()
        pools = self._sampler.sample_pool(users, self.candidate_num)
        self.sampling_seconds += perf_counter() - started
        return pools

    def _neg_sampling(self, inter: Interaction) -> Interaction:
        inter.update(Interaction({CANDIDATES: self.draw_pools(inter[self._dataset.uid_field])}))
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
    sampler = CandidatePoolSampler(dataset, config["candidate_distribution"], config["candidate_alpha"])
    return CandidateTrainDataLoader(config, dataset, sampler, shuffle=config["shuffle"])
