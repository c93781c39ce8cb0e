"""``train_positions: all`` -- every target of a user's window from one encoder pass.

RecBole trains sequential models on one row per (prefix, target), each padded to
``MAX_ITEM_LIST_LENGTH = L`` and encoded on its own. For a **causal** model (its output at
position ``t`` depends only on items ``<= t``) one pass over a window of a user's sequence
gives the representation of every prefix in it, so every target of the window trains from
that one pass. This module holds:

* :func:`user_sequences` -- each user's training sequence rebuilt from RecBole's own augmented
  rows (right-padded; a user's row ``k`` holds the last ``<= L`` items before its target), with
  the chain property checked: data that breaks it is refused.
* :class:`Windows` -- the windows: the first ``L`` items of a user train every target they
  precede (the same context as RecBole's rows); later targets, in chunks of ``stride``, each
  from a window ending at the chunk's last target, so such a target sees the last
  ``L - stride + 1 .. L`` items before it (RecBole's row: the last ``L``). Every target of
  RecBole's augmentation is trained exactly once per epoch.
* :class:`WindowBatchSampler` / :class:`WindowCollate` -- windows packed up to
  ``train_batch_size`` targets per step (a window is never split), the same global batches on
  every DDP rank, each split between the ranks (no padding duplicates); each trained target is
  one row of the batch, with its own candidate pool.
* :func:`full_sequence_scorer` -- a one-pass scorer whose ``encode`` returns one vector per
  trained target (``[T, d]``), so samplers stay row-wise and unchanged.
* :func:`check_positions` / :func:`check_trim` -- the measured checks: a model qualifies when,
  in eval mode on a real prefix-row batch, its output at every position of one window pass
  equals ``forward()`` on that position's prefix (to :data:`~recbole_mdcns.scoring.TOLERANCE`),
  and a batch may be trimmed to its longest real sequence when that changes no output.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from logging import getLogger

import torch
from recbole.data.interaction import Interaction

from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.scoring import TOLERANCE, DotScorer, Scorer

TRAIN_POSITIONS = ("last", "all")
# window-level fields of a full-sequence batch ([W, L] / [W]); the row-level fields are RecBole's
# USER_ID and POS_ITEM_ID ([T]) and CANDIDATES ([T, N]), as in a prefix-row batch
WINDOW_SEQ, WINDOW_LEN, WINDOW_USER = "window_item_seq", "window_item_seq_len", "window_user"
# where each row's target sits: window (in the batch) and position (in the window), and its
# position in the user's whole training sequence
ROW_WINDOW, ROW_POSITION, TARGET_POSITION = "row_window", "row_position", "target_position"
LOSS_SCALE = "loss_scale"  # DDP: this rank's share of the global batch's targets, times the world size


class ChainError(ValueError):
    """RecBole's training rows of a user do not form one augmented sequence."""


@dataclass
class UserSequences:
    """Every user's training sequence, concatenated: ``items[offset[u] : offset[u] + length[u]]``;
    targets of RecBole's rows are the positions ``first_target[u] ..`` of it."""

    users: torch.Tensor         # [U] RecBole user ids with training rows
    offset: torch.Tensor        # [U]
    length: torch.Tensor        # [U] items in the sequence (first row's prefix + every target)
    first_target: torch.Tensor  # [U] position of the first trained target (the first row's prefix length)
    items: torch.Tensor         # [sum(length)]


def user_sequences(user: torch.Tensor, target: torch.Tensor, seq: torch.Tensor,
                   seq_len: torch.Tensor) -> UserSequences:
    """Rebuild each user's sequence from RecBole's augmented rows (in dataset order within a user).

    Raises :class:`ChainError` unless, for every user, row ``k`` (from 0) has length
    ``min(len_0 + k, L)`` and holds the last items before its target: the first row's prefix,
    then each earlier row's target.
    """
    L = seq.shape[1]
    order = torch.argsort(user, stable=True)
    user, target, seq, seq_len = user[order], target[order], seq[order], seq_len[order]
    users, counts = torch.unique_consecutive(user, return_counts=True)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(user)) - starts.repeat_interleave(counts)   # k: row's index within its user
    first_len = seq_len[starts]
    length = first_len + counts
    offset = length.cumsum(0) - length
    items = torch.zeros(int(length.sum()), dtype=seq.dtype)
    first_rows = seq[starts]
    prefix_pos = torch.arange(L).unsqueeze(0) < first_len.unsqueeze(1)
    items[(offset.unsqueeze(1) + torch.arange(L))[prefix_pos]] = first_rows[prefix_pos]
    row_offset, row_first = offset.repeat_interleave(counts), first_len.repeat_interleave(counts)
    position = row_first + rank                                          # target's position in the sequence
    items[row_offset + position] = target
    expected_len = torch.clamp(position, max=L)
    index = row_offset.unsqueeze(1) + position.unsqueeze(1) - seq_len.unsqueeze(1) + torch.arange(L)
    real = torch.arange(L).unsqueeze(0) < seq_len.unsqueeze(1)
    same = torch.where(real, items[index.clamp(0, len(items) - 1)] == seq, True).all(1)
    broken = (seq_len != expected_len) | ~same
    if bool(broken.any()):
        bad = user[broken].unique()
        raise ChainError(
            f"train_positions: all needs RecBole's augmented training rows (each row of a user holds the previous "
            f"row's sequence plus its target, truncated to the last MAX_ITEM_LIST_LENGTH items); {int(broken.sum())} "
            f"rows of {len(bad)} users (ids {bad[:5].tolist()}) break it -- e.g. benchmark_filename data without "
            "augmentation. Use train_positions: last for such data.")
    return UserSequences(users, offset, length, first_len, items)


@dataclass
class Windows:
    """Training windows: ``seq[w]`` (right-padded, ``seq_len[w]`` real items) of user ``user[w]``;
    ``next_item[w, j]`` is the target trained at position ``j`` (0: none), at position
    ``start[w] + j + 1`` of the user's sequence."""

    seq: torch.Tensor
    seq_len: torch.Tensor
    user: torch.Tensor
    start: torch.Tensor
    next_item: torch.Tensor

    @property
    def targets(self) -> torch.Tensor:
        """``[W]`` trained targets per window."""
        return (self.next_item > 0).sum(1)

    @classmethod
    def build(cls, seqs: UserSequences, L: int, stride: int) -> "Windows":
        """The first window of a user trains the targets at positions ``first_target .. min(L, n - 1)``; the
        rest come in chunks of ``stride`` targets, each from the window of ``L`` items before its last target."""
        n, first = seqs.length, seqs.first_target
        extra = (n - 1 - L).clamp_min(0)
        chunks = (extra + stride - 1) // stride
        per_user = 1 + chunks
        u = torch.arange(len(n)).repeat_interleave(per_user)
        c = torch.arange(len(u)) - (per_user.cumsum(0) - per_user).repeat_interleave(per_user)  # 0 = first window
        last = torch.where(c == 0, torch.minimum(n[u] - 1, torch.full_like(u, L)),
                           torch.minimum(n[u] - 1, L + c * stride))
        lo = torch.where(c == 0, first[u], L + (c - 1) * stride + 1)
        start = torch.where(c == 0, 0, last - L)
        offs = seqs.offset[u].unsqueeze(1) + start.unsqueeze(1)
        j = torch.arange(L).unsqueeze(0)
        seq_len = last - start
        seq = torch.where(j < seq_len.unsqueeze(1), seqs.items[(offs + j).clamp(max=len(seqs.items) - 1)], 0)
        target_pos = start.unsqueeze(1) + j + 1
        trained = (target_pos >= lo.unsqueeze(1)) & (target_pos <= last.unsqueeze(1))
        next_item = torch.where(trained, seqs.items[(offs + j + 1).clamp(max=len(seqs.items) - 1)], 0)
        return cls(seq, seq_len, seqs.users[u], start, next_item)


def pack_batches(targets: torch.Tensor, order: torch.Tensor, batch_size: int) -> list[list[int]]:
    """Windows ``order``\\ ed into consecutive batches of at most ``batch_size`` targets (a window
    with more targets than that is a batch of its own)."""
    batches, current, size = [], [], 0
    for w, t in zip(order.tolist(), targets[order].tolist()):
        if current and size + t > batch_size:
            batches.append(current)
            current, size = [], 0
        current.append(w)
        size += t
    if current:
        batches.append(current)
    return batches


def split_for_ranks(batch: list[int], targets: torch.Tensor, world: int) -> list[list[int]]:
    """One global batch's windows shared between ``world`` ranks, each window to the rank with the
    fewest targets so far (every rank gets at least one window when there are enough)."""
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for w in sorted(batch, key=lambda w: -int(targets[w])):
        rank = min(range(world), key=lambda r: (load[r], len(shares[r])))
        shares[rank].append(w)
        load[rank] += int(targets[w])
    return shares


class WindowBatchSampler(torch.utils.data.Sampler):
    """This rank's batches of window indices for one epoch: the windows shuffled by ``(seed, epoch)``,
    packed into global batches of at most ``batch_size`` targets, each split between the ranks. Every
    rank builds the same global batches, so no rank pads, and every target is trained once per epoch."""

    def __init__(self, targets: torch.Tensor, batch_size: int, shuffle: bool, seed: int,
                 world: int = 1, rank: int = 0) -> None:
        if world > 1 and len(targets) < world:
            raise ValueError(f"train_positions: all under DDP needs at least {world} windows, got {len(targets)}")
        self.targets, self.batch_size, self.shuffle, self.seed = targets, batch_size, shuffle, seed
        self.world, self.rank = world, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.targets), generator=generator)
        else:
            order = torch.arange(len(self.targets))
        batches = pack_batches(self.targets, order, self.batch_size)
        if self.world == 1:
            return batches
        merged: list[list[int]] = []  # every rank needs a window: a batch with fewer joins the next one
        for batch in batches:
            if merged and len(merged[-1]) < self.world:
                merged[-1] += batch
            else:
                merged.append(batch)
        if len(merged) > 1 and len(merged[-1]) < self.world:
            merged[-2] += merged.pop()
        return merged

    def __iter__(self):
        for batch in self.global_batches():
            shares = split_for_ranks(batch, self.targets, self.world) if self.world > 1 else [batch]
            total = int(self.targets[batch].sum())
            yield shares[self.rank], total

    def __len__(self) -> int:
        return len(self.global_batches())


class WindowCollate:
    """A batch of windows as an ``Interaction``: window-level fields (:data:`WINDOW_SEQ`, ...) trimmed to
    the longest window of the batch, and one row per trained target with RecBole's ``USER_ID`` /
    ``POS_ITEM_ID`` fields, its position (:data:`ROW_WINDOW`, :data:`ROW_POSITION`,
    :data:`TARGET_POSITION`) and its own candidate pool (``CANDIDATES``, outside the user's training history;
    with ``candidate_exclude: row``, outside the window up to its position and its target)."""

    def __init__(self, windows: Windows, train_data, world: int = 1) -> None:
        self.windows, self.train_data, self.world = windows, train_data, world
        dataset = train_data._dataset
        self.user_field, self.item_field = dataset.uid_field, dataset.iid_field

    def __call__(self, batch: tuple[list[int], int]) -> Interaction:
        index, global_targets = batch
        index = torch.as_tensor(index, dtype=torch.long)
        w = self.windows
        seq_len = w.seq_len[index]
        width = int(seq_len.max())
        next_item = w.next_item[index, :width]
        row_window, row_position = (next_item > 0).nonzero(as_tuple=True)
        users = w.user[index][row_window]
        target = next_item[row_window, row_position]
        rows = None
        if self.train_data.excludes_rows:  # each target's own items: the window up to its position, and itself
            seen = w.seq[index, :width][row_window]
            seen = seen.masked_fill(torch.arange(width) > row_position.unsqueeze(1), 0)
            rows = torch.cat([seen, target.unsqueeze(1)], 1)
        fields = {
            self.user_field: users,
            self.item_field: target,
            TARGET_POSITION: w.start[index][row_window] + row_position + 1,
            ROW_WINDOW: row_window,
            ROW_POSITION: row_position,
            CANDIDATES: self.train_data.draw_pools(users, rows),
            WINDOW_SEQ: w.seq[index, :width],
            WINDOW_LEN: seq_len,
            WINDOW_USER: w.user[index],
        }
        if self.world > 1:
            fields[LOSS_SCALE] = torch.tensor([len(row_window) * self.world / global_targets])
        return Interaction(fields)


# --------------------------------------------------------------------------- encoding every position
@contextlib.contextmanager
def whole_output(model):
    """``model.gather_indexes`` returns its input unchanged: a ``forward`` that ends by reading
    ``[B, L, d]`` at ``item_seq_len - 1`` then returns the whole ``[B, L, d]``."""
    model.gather_indexes = lambda output, gather_index: output
    try:
        yield
    finally:
        del model.gather_indexes


def positions_output(scorer: DotScorer, model, seq: torch.Tensor, seq_len: torch.Tensor,
                     user: torch.Tensor | None) -> torch.Tensor:
    """``[B, L, d]``: the model's representation after every position of ``seq``, from one pass."""
    by_field = {model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: seq_len, getattr(model, "USER_ID", None): user}
    with whole_output(model):
        out = model.forward(*(by_field[field] for field in scorer.fields))
    if out.dim() != 3 or out.shape[:2] != seq.shape:
        raise ValueError(f"forward() gives {tuple(out.shape)}, not one vector per position "
                         f"(it does not end with gather_indexes over a [B, L, d] output)")
    return out


class _FullSequenceEncode:
    """``encode`` of a full-sequence batch: one pass over its windows, one vector per trained target."""

    def encode(self, model, interaction: Interaction) -> torch.Tensor:
        out = positions_output(self, model, interaction[WINDOW_SEQ], interaction[WINDOW_LEN],
                               interaction[WINDOW_USER])
        return out[interaction[ROW_WINDOW], interaction[ROW_POSITION]]


def full_sequence_scorer(scorer: DotScorer) -> Scorer:
    """``scorer`` (verified against ``predict``) reading full-sequence batches: its ``score`` and
    ``item_vectors`` unchanged, its ``encode`` one window pass giving ``[T, d]``."""
    cls = type(f"FullSequence{type(scorer).__name__}", (_FullSequenceEncode, type(scorer)),
               {"path": f"full sequence, {scorer.path}"})
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(scorer.__dict__)
    return wrapped


# --------------------------------------------------------------------------- the measured checks
def _max_relative_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def check_positions(scorer: Scorer, model, probe: Interaction, rows: int = 8) -> float:
    """Max relative difference between the output at every real position of one pass over the
    ``rows`` longest sequences of ``probe`` and ``forward()`` on that position's prefix (eval mode).
    ``ValueError`` when the model cannot be read per position at all."""
    if type(scorer).encode is not DotScorer.encode:
        raise ValueError(f"its scorer ({scorer.path}) reads the sequence in a model-specific way")
    seq_len = probe[model.ITEM_SEQ_LEN]
    pick = seq_len.argsort(descending=True, stable=True)[:rows]
    seq, seq_len = probe[model.ITEM_SEQ][pick], seq_len[pick]
    user = probe[model.USER_ID][pick] if model.USER_ID in probe.interaction else None
    L = seq.shape[1]
    r, j = (torch.arange(L).unsqueeze(0) < seq_len.unsqueeze(1)).nonzero(as_tuple=True)
    prefixes = torch.where(torch.arange(L).unsqueeze(0) <= j.unsqueeze(1), seq[r], 0)
    with _eval(model):
        whole = positions_output(scorer, model, seq, seq_len, user)[r, j]
        by_prefix = {model.ITEM_SEQ: prefixes, model.ITEM_SEQ_LEN: j + 1}
        if user is not None:
            by_prefix[model.USER_ID] = user[r]
        expected = scorer.encode(model, Interaction(by_prefix))
    return _max_relative_diff(whole, expected)


def trim_batch(batch: Interaction, seq_field: str, len_field: str) -> Interaction:
    """``batch`` with every ``[B, L]`` list field cut to the longest real sequence of the batch."""
    L = batch[seq_field].shape[1]
    width = int(batch[len_field].max())
    if width == L:
        return batch
    for key, value in list(batch.interaction.items()):
        if value.dim() == 2 and value.shape[1] == L and key.endswith("_list"):
            batch.interaction[key] = value[:, :width]
    return batch


def check_trim(scorer: Scorer, model, probe: Interaction, rows: int = 16) -> float:
    """Max relative difference of ``scorer.encode`` on the ``rows`` shortest sequences of ``probe``
    with and without :func:`trim_batch` (eval mode)."""
    pick = probe[model.ITEM_SEQ_LEN].argsort(stable=True)[:rows]
    rows_batch = probe[pick]
    with _eval(model):
        full = scorer.encode(model, rows_batch)
        trimmed = scorer.encode(model, trim_batch(Interaction(dict(rows_batch.interaction)), model.ITEM_SEQ,
                                                  model.ITEM_SEQ_LEN))
    return _max_relative_diff(trimmed, full)


@contextlib.contextmanager
def _eval(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            yield
    finally:
        model.train(was_training)


def qualifies(diff: float) -> bool:
    """Whether a check's max relative difference is within :data:`~recbole_mdcns.scoring.TOLERANCE`."""
    return diff <= TOLERANCE


def measure(check, scorer: Scorer, model, probe: Interaction) -> tuple[float, str]:
    """``(diff, reason)``: the check's max relative difference, or ``inf`` and why it could not run."""
    try:
        return check(scorer, model, probe), ""
    except (TypeError, RuntimeError, ValueError, IndexError, KeyError, AttributeError) as error:
        return float("inf"), str(error)


def plan_positions(module, probe: Interaction, train_positions: str) -> tuple[bool, bool]:
    """``(full_sequence, trim)`` for this run, measured on ``probe`` for every model the module scores
    with (self, peer, teachers), each verdict logged with its reason. ``train_positions: all`` is
    taken only when every model qualifies, else the run trains on prefix rows; batches are trimmed
    to their longest real sequence when that changes no model's output."""
    logger = getLogger()
    full, trim = train_positions == "all", True
    for name, model in module.scored_models().items():
        scorer, label = module.scorers[name], f"{type(model).__name__} ({name})"
        trim_diff, trim_reason = measure(check_trim, scorer, model, probe)
        trim &= qualifies(trim_diff)
        if train_positions != "all":
            continue
        diff, reason = measure(check_positions, scorer, model, probe)
        if qualifies(diff) and qualifies(trim_diff):
            logger.info(f"train_positions {label}: all positions, one pass per window -- its output at every "
                        f"position equals forward() on that prefix (max diff {diff:.2g})")
            continue
        full = False
        why = reason or (f"its output at a position differs from forward() on that prefix by {diff:.3g}"
                         if not qualifies(diff) else f"trimming its padding changes its output by {trim_diff:.3g}")
        logger.info(f"train_positions {label}: not causal per position ({why})")
    if train_positions == "all" and not full:
        logger.info("train_positions: all falls back to RecBole's prefix rows for this run (every scored model "
                    "must qualify)")
    logger.info("training batches are trimmed to their longest real sequence" if trim else
                "training batches keep MAX_ITEM_LIST_LENGTH columns (trimming would change a model's output)")
    if full:
        module.scorers = {name: full_sequence_scorer(scorer) for name, scorer in module.scorers.items()}
    return full, trim
