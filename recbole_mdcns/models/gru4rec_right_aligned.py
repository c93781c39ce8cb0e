"""``GRU4RecRightAligned`` -- RecBole's GRU4Rec reading a row padded on the left, as the MDCNS authors' peer does.

RecBole pads a sequence on the right, so its GRU reads a row's items first and the output is taken at the
row's last item: the padding is never read. The MDCNS authors' GRU4Rec (``MDCNS_Code/models.py`` in
Lyz103/SIGIR26-MDCNS; their MDCNS's peer) has RecBole's layers and initialisation but pads every row on the
left to ``max_seq_length`` L and takes the output at position L - 1, so the GRU first reads L - n padding
steps. The padding id's embedding is not zero there: the Xavier initialisation overwrites the zeros
``padding_idx`` sets, and no gradient reaches that row, so it stays a fixed random vector -- in RecBole's
GRU4Rec just the same. This model is RecBole's GRU4Rec -- the same layers, parameters, initialisation, YAML
defaults and losses -- fed the row as theirs is: its items moved to the last ``n`` of L columns.

A row's output depends on how much padding precedes it, so one pass over a row cannot stand for its
prefixes: ``train_positions: all`` measures that at fit start and trains prefix rows instead, and
evaluation's ``eval_shared_prefixes`` scores such rows one by one. A batch trimmed of its padding columns
gives the same output (the row is always re-padded to ``MAX_ITEM_LIST_LENGTH``).
"""
from __future__ import annotations

import torch
from recbole.model.sequential_recommender.gru4rec import GRU4Rec


def pad_left(item_seq: torch.Tensor, item_seq_len: torch.Tensor, length: int) -> torch.Tensor:
    """Right-padded rows ``[B, W]`` (``W <= length``) as rows ``[B, length]`` padded on the left with id 0."""
    source = torch.arange(length, device=item_seq.device) - (length - item_seq_len).unsqueeze(1)  # [B, length]
    moved = item_seq.gather(1, source.clamp(0, item_seq.size(1) - 1))
    return moved.masked_fill(source < 0, 0)


class GRU4RecRightAligned(GRU4Rec):
    """GRU4Rec whose row of ``n`` items is read after ``MAX_ITEM_LIST_LENGTH - n`` padding steps."""

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        full = torch.full_like(item_seq_len, self.max_seq_length)
        return super().forward(pad_left(item_seq, item_seq_len, self.max_seq_length), full)  # [B, H]
