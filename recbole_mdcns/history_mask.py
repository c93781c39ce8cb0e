"""``eval_mask_history: true`` -- the MDCNS authors' ranking: in full-sort validation and test, every item
before the target in the row's WHOLE sequence scores ``-inf`` (RecBole's sequential full sort masks none).

Each evaluated row's whole prefix is rebuilt from RecBole's own rows: a user's rows across the training,
validation and test sets, in that order, form one chain (each row holds the previous row's sequence plus its
target, cut to the last ``MAX_ITEM_LIST_LENGTH`` items) -- RecBole's leave-one-out augmentation, and the
benchmark files of ``python -m recbole_mdcns.user_split`` -- so a user's sequence is its first row's sequence
followed by every row's target, and a row's prefix is the part of it before the row's target: for
leave-one-out, a validation row's prefix is the user's training items and a test row's also the validation
item. Where a user's first row was itself cut (a held-out ``--heldout last`` row longer than ``--max-len``),
the items before it come from the ``history`` feature file the split command writes (``NAME.history``).

The masked items reach RecBole's trainer as the ``history_index`` of each evaluation batch, the (row, item)
pairs RecBole's own ``_full_sort_batch_eval`` sets to ``-inf`` (as for its general models), so every trainer
and every model evaluated on these loaders is masked alike: the self model, MDCNS's peer and self+peer
ensemble, under DDP each process's block of batches. Memory: one copy of every user's sequence and two
integers per evaluated row; the pairs are built per batch. A target that also occurs earlier in its own
sequence is masked too, as in the authors' code.

``eval_history_score`` is the score the masked items get: ``-inf`` (the default; the authors' MDCNS trainer) or
``0`` (the authors' baselines -- their DNS+ and single-model trainers set ``rating_pred[history] = 0``, so a target
whose own score is below 0 ranks under every item of its history).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import ModelType

from recbole_mdcns.full_sequence import ChainError, user_sequences
from recbole_mdcns.benchmark_files import HISTORY_ITEMS, HISTORY_SUFFIX, HISTORY_USER

KEY = "eval_mask_history"
SCORE_KEY = "eval_history_score"
SCORES = {"-inf": float("-inf"), "0": 0.0}  # the authors' MDCNS trainer; their baselines'
_SPELLINGS = {"-inf": SCORES["-inf"], "-.inf": SCORES["-inf"], "0": SCORES["0"], "0.0": SCORES["0"]}


def check_config(config) -> None:
    """``ValueError`` naming the key unless ``eval_mask_history`` is true / false (or unset), and, when true,
    evaluation is full-sort and a ``NAME.history`` file beside benchmark files is loaded."""
    value = config[KEY]
    score = history_score(config)
    if value is None or value is False:
        if score != SCORES["-inf"]:
            raise ValueError(f"{SCORE_KEY}: {config[SCORE_KEY]!r} is the score of the items {KEY} masks; set "
                             f"{KEY}: true with it (or leave {SCORE_KEY} at -inf)")
        return
    if value is not True:
        raise ValueError(f"{KEY} must be true or false, got {value!r}")
    if config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        raise ValueError(f"{KEY}: true is for sequential models; {config['model']} is not one, and RecBole's full-sort "
                         "evaluation of a general model already masks the user's training items")
    modes = config["eval_args"]["mode"]
    if any(mode != "full" for mode in modes.values()):
        raise ValueError(f"{KEY}: true masks the full ranking: eval_args mode must be 'full' for valid and test, got "
                         f"{modes}")
    history = os.path.join(config["data_path"], f"{config['dataset']}.{HISTORY_SUFFIX}")
    if config["benchmark_filename"] and os.path.isfile(history) and \
            HISTORY_SUFFIX not in (config["additional_feat_suffix"] or []):
        raise ValueError(f"{KEY}: {history} holds the items before held-out rows cut to MAX_ITEM_LIST_LENGTH; load it "
                         f"with additional_feat_suffix: [{HISTORY_SUFFIX}] (and the load_col / alias_of_* entries of "
                         "the YAML python -m recbole_mdcns.user_split wrote beside it), else those items stay unmasked")


def history_score(config) -> float:
    """``eval_history_score`` as a float: ``-inf`` (also when unset) or ``0``; ``ValueError`` naming the key and
    the two values otherwise."""
    value = config[SCORE_KEY]
    if value is None:
        return SCORES["-inf"]
    score = _SPELLINGS.get(str(value).strip().lower())
    if score is not None:
        return score
    raise ValueError(f"{SCORE_KEY} must be one of {list(SCORES)} (the score of the history items {KEY} masks: -inf "
                     f"as the authors' MDCNS evaluation, 0 as their baselines'), got {value!r}")


class HistoryScore:
    """Trainer mixin: RecBole's full-sort batch with the masked history items at ``eval_history_score``
    instead of ``-inf`` (RecBole's padding item 0 stays at ``-inf``)."""

    def _full_sort_batch_eval(self, batched_data):
        interaction, history_index, positive_u, positive_i = batched_data
        score = history_score(self.config)
        if history_index is None or score == SCORES["-inf"]:
            return super()._full_sort_batch_eval(batched_data)
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(
            (interaction, None, positive_u, positive_i))
        scores[history_index] = score
        return interaction, scores, positive_u, positive_i


def with_history_score(trainer_class: type) -> type:
    """``trainer_class`` (RecBole's trainer of a model) with :class:`HistoryScore`'s batch."""
    return type(trainer_class.__name__, (HistoryScore, trainer_class), {})


@dataclass
class RowHistories:
    """Row ``r``'s prefix is ``items[start[r] : start[r] + length[r]]``."""

    items: torch.Tensor   # every user's whole sequence, concatenated
    start: torch.Tensor   # [R]
    length: torch.Tensor  # [R]

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """RecBole's ``history_index`` of the rows ``index``: (position in the batch, item) of each prefix item."""
        index = torch.as_tensor(index, dtype=torch.long)
        length, start = self.length[index], self.start[index]
        rows = torch.arange(len(index)).repeat_interleave(length)
        step = torch.arange(int(length.sum())) - (length.cumsum(0) - length).repeat_interleave(length)
        return rows, self.items[start.repeat_interleave(length) + step]


def row_histories(train, valid, test) -> tuple[RowHistories, RowHistories]:
    """The prefixes of the rows of the validation and test datasets (RecBole's built datasets, see the module
    docstring); ``ValueError`` naming ``eval_mask_history`` when a user's rows do not form one chain."""
    datasets = (train, valid, test)
    config = train.config
    seq_field, len_field = train.iid_field + config["LIST_SUFFIX"], config["ITEM_LIST_LENGTH_FIELD"]
    fields = [torch.cat([d.inter_feat[f] for d in datasets]) for f in (train.uid_field, train.iid_field,
                                                                      seq_field, len_field)]
    user = fields[0]
    try:
        seqs = user_sequences(*fields)
    except ChainError as error:
        raise ValueError(
            f"{KEY}: the rows of a user across the training, validation and test sets must form one sequence (each "
            "row the previous row's sequence plus its target, cut to the last MAX_ITEM_LIST_LENGTH items), as "
            "RecBole's leave-one-out rows and python -m recbole_mdcns.user_split's files do; these do not, so no "
            "row's whole prefix can be rebuilt") from error
    u = torch.searchsorted(seqs.users, user)                   # each row's user, as an index into seqs
    order = torch.argsort(user, stable=True)
    counts = torch.bincount(u, minlength=len(seqs.users))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(user)) - (counts.cumsum(0) - counts)[u[order]]
    older = _older_items(train, seqs, fields[2].shape[1])
    total = older.length + seqs.length
    offset = total.cumsum(0) - total
    items = torch.zeros(int(total.sum()), dtype=seqs.items.dtype)
    within = torch.arange(len(seqs.items)) - seqs.offset.repeat_interleave(seqs.length)
    items[(offset + older.length).repeat_interleave(seqs.length) + within] = seqs.items
    older_within = torch.arange(len(older.items)) - (older.length.cumsum(0) - older.length).repeat_interleave(older.length)
    items[offset.repeat_interleave(older.length) + older_within] = older.items
    length = older.length[u] + seqs.first_target[u] + rank     # the row's prefix: older items, then the chain's
    sizes = [len(d) for d in datasets]
    rows = [slice(sizes[0], sizes[0] + sizes[1]), slice(sizes[0] + sizes[1], sum(sizes))]
    return tuple(RowHistories(items, offset[u[r]], length[r]) for r in rows)


@dataclass
class _Older:
    length: torch.Tensor  # [U] items before each user's first row (0 for most)
    items: torch.Tensor   # concatenated, in user order


def _older_items(dataset, seqs, width: int) -> _Older:
    """Per user of ``seqs``: the items ``NAME.history`` lists before its first row (none without the file), which
    must then hold ``width`` items (the longest rows': it was cut)."""
    length = torch.zeros(len(seqs.users), dtype=torch.long)
    feat = getattr(dataset, f"{HISTORY_SUFFIX}_feat", None)
    if feat is None:
        return _Older(length, torch.zeros(0, dtype=seqs.items.dtype))
    users, lists = feat[HISTORY_USER].long(), feat[HISTORY_ITEMS]
    where = torch.searchsorted(seqs.users, users).clamp(max=len(seqs.users) - 1)
    known = seqs.users[where] == users
    if not bool(known.all()) or len(torch.unique(users)) != len(users):
        raise ValueError(f"{KEY}: {HISTORY_SUFFIX} file lists users with no row, or a user twice: it does not belong "
                         "to these benchmark files")
    if not bool((seqs.first_target[where] == width).all()):
        raise ValueError(f"{KEY}: {HISTORY_SUFFIX} file lists items before a user's first row, but that row holds "
                         "fewer items than the longest rows: it does not belong to these benchmark files")
    order = torch.argsort(where)
    n = (lists > 0).sum(1)
    length[where] = n
    real = torch.arange(lists.shape[1]).unsqueeze(0) < n.unsqueeze(1)
    return _Older(length, lists[order][real[order]])


class HistoryMaskedEvalLoader(FullSortEvalDataLoader):
    """RecBole's sequential full-sort loader, whose batches carry their rows' prefixes as RecBole's
    ``history_index`` (RecBole's trainer sets those (row, item) scores to ``-inf``)."""

    def __init__(self, loader: FullSortEvalDataLoader, histories: RowHistories) -> None:
        self.histories = histories
        super().__init__(loader.config, loader._dataset, loader._sampler, shuffle=False)

    def collate_fn(self, index):
        interaction, _, positive_u, positive_i = super().collate_fn(index)
        return interaction, self.histories.batch(np.asarray(index)), positive_u, positive_i


def mask_history(config, train_data, valid_data, test_data) -> tuple:
    """``(valid_data, test_data)``: RecBole's loaders, or with ``eval_mask_history: true`` loaders that mask
    every row's whole prefix (see the module docstring)."""
    if not config[KEY]:
        return valid_data, test_data
    valid, test = row_histories(train_data._dataset, valid_data._dataset, test_data._dataset)
    return HistoryMaskedEvalLoader(valid_data, valid), HistoryMaskedEvalLoader(test_data, test)
