"""``eval_shared_prefixes: true`` (the default) -- a held-out user's prefix rows scored from one encoder pass.

In the MDCNS authors' LastFM protocol every prefix of a held-out user is an evaluated row (``python -m
recbole_mdcns.user_split --heldout prefixes``): 4,430 validation rows of 109 users, each re-encoding up to 50
items, so evaluating costs about what a training epoch on all positions does. For a causal model (SASRec,
GRU4Rec, ...: the output after position t depends on items 0..t only), a row whose sequence is the beginning
of a longer row of the same batch gets the same vector from that row's pass, read at its own last position --
as ``train_positions: all`` trains every target from one pass per window (docs/full_sequence.md).

Per evaluation batch and user, the longest row covers every row whose sequence is its beginning (checked
item by item); the covering rows are encoded once (``[R, L, d]``) and each row's vector is read at its last
position, then the model's own ``full_sort_predict`` scores it (its ``forward`` answering with that vector).
Rows cut to ``MAX_ITEM_LIST_LENGTH`` (a sliding window) cover none but themselves. Exactness is measured,
not assumed: the first batch of each model is scored both ways and must come out equal to the last bit,
else that model is evaluated row by row as RecBole does (logged). Nothing changes for batches without
shared prefixes (RecBole's leave-one-out rows: one row per user).
"""
from __future__ import annotations

import contextlib
import inspect
from logging import getLogger
from typing import Iterator

import torch
from recbole.data.interaction import Interaction

from recbole_mdcns.full_sequence import whole_output

KEY = "eval_shared_prefixes"


def check_config(config) -> None:
    """``ValueError`` naming the key unless it is true or false."""
    if config[KEY] not in (True, False):
        raise ValueError(f"{KEY} must be true or false, got {config[KEY]!r}")


def covering_rows(users: torch.Tensor | None, seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
    """``[B]``: for each row, the row of the same user whose encoder pass gives its vector -- the user's
    longest row (the first of equals) when this row's sequence is its beginning, else the row itself."""
    cover = torch.arange(len(seq), device=seq.device)
    groups = torch.zeros_like(seq_len) if users is None else users
    positions = torch.arange(seq.shape[1], device=seq.device)
    for user in torch.unique(groups):
        rows = (groups == user).nonzero(as_tuple=True)[0]
        if len(rows) < 2:
            continue
        longest = rows[torch.argmax(seq_len[rows])]  # argmax: the first maximum
        beyond = positions.unsqueeze(0) >= seq_len[rows].unsqueeze(1)
        starts = ((seq[rows] == seq[longest]) | beyond).all(dim=1) & (seq_len[rows] <= seq_len[longest])
        cover[rows[starts]] = longest
    return cover


@contextlib.contextmanager
def _forward_gives(model, value: torch.Tensor) -> Iterator[None]:
    """``model.forward`` answers ``value`` (and ``gather_indexes`` its input) while inside."""
    model.forward = lambda *args, **kwargs: value
    try:
        yield
    finally:
        del model.forward


def _reads_the_sequence_only(model) -> bool:
    params = inspect.signature(type(model).forward).parameters.values()
    required = [p.name for p in params if p.default is inspect.Parameter.empty and p.name != "self"]
    return required == ["item_seq", "item_seq_len"] and hasattr(model, "gather_indexes")


class SharedPrefixes:
    """Scores evaluation batches with shared prefixes; remembers, per model, whether its first batch
    came out exactly as RecBole's row-by-row scoring (:meth:`full_sort_predict`)."""

    def __init__(self) -> None:
        self.exact: dict[int, bool] = {}

    def shared_scores(self, model, interaction: Interaction) -> tuple[torch.Tensor, int] | None:
        """``full_sort_predict`` from one pass per covering row, and the number of passes; None when no row
        shares a prefix."""
        seq, seq_len = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
        user_field = getattr(model, "USER_ID", None)
        users = interaction[user_field] if user_field in interaction.interaction else None
        cover = covering_rows(users, seq, seq_len)
        encoded, where = torch.unique(cover, return_inverse=True)
        if len(encoded) == len(cover):
            return None
        with whole_output(model):
            out = type(model).forward(model, seq[encoded], seq_len[encoded])
        if out.dim() != 3 or out.shape[:2] != (len(encoded), seq.shape[1]):
            raise ValueError(f"forward() gives {tuple(out.shape)}, not one vector per position")
        with _forward_gives(model, out[where, seq_len - 1]):
            return type(model).full_sort_predict(model, interaction), len(encoded)

    def full_sort_predict(self, model, interaction: Interaction) -> torch.Tensor:
        verdict = self.exact.get(id(model))
        if verdict is False:
            return type(model).full_sort_predict(model, interaction)
        try:
            found = self.shared_scores(model, interaction)
        except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
            return self._refuse(model, interaction, f"its forward cannot be read per position ({error})")
        if found is None:
            return type(model).full_sort_predict(model, interaction)
        shared, passes = found
        if verdict is None:
            plain = type(model).full_sort_predict(model, interaction)
            if not torch.equal(shared.view_as(plain), plain):
                diff = (shared.view_as(plain) - plain).abs().max().item()
                return self._refuse(model, interaction, f"shared passes differ from row by row by {diff:.3g}", plain)
            self.exact[id(model)] = True
            getLogger().info(f"{KEY}: {type(model).__name__} scores a row that begins a longer row of its user from "
                             f"that row's pass ({len(interaction)} rows from {passes} passes in the first batch) -- "
                             "checked: equal to RecBole's row-by-row scores")
        return shared

    def _refuse(self, model, interaction: Interaction, why: str, plain: torch.Tensor | None = None) -> torch.Tensor:
        self.exact[id(model)] = False
        getLogger().info(f"{KEY}: {type(model).__name__} is evaluated row by row ({why})")
        return plain if plain is not None else type(model).full_sort_predict(model, interaction)

    @contextlib.contextmanager
    def applied(self, evaluated) -> Iterator[None]:
        """While inside, the evaluated model -- or each member of an ensemble of models -- scores through
        :meth:`full_sort_predict` when its ``forward`` reads the item sequence alone."""
        models = [m for m in getattr(evaluated, "members", [evaluated]) if _reads_the_sequence_only(m)]
        for model in models:
            model.full_sort_predict = lambda interaction, model=model: self.full_sort_predict(model, interaction)
        try:
            yield
        finally:
            for model in models:
                del model.full_sort_predict
