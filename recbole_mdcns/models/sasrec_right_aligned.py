"""``SASRecRightAligned`` -- RecBole's SASRec with a row's positions counted back from its last item.

RecBole pads a sequence on the right and numbers positions from the row's first item (item ``j`` has
position ``j``), so that one causal pass gives every prefix of a row its own output. The MDCNS authors'
SASRec (``MDCNS_Code/models.py`` and ``Baselines/Neg_samples_DNS+/models.py`` in Lyz103/SIGIR26-MDCNS)
pads on the left to ``max_seq_length`` L: item ``j`` of a row of ``n`` items has position ``L - n + j``,
and a row's last item always ``L - 1``. This model is RecBole's SASRec -- the same layers, parameters,
initialisation, YAML defaults and losses -- with their numbering, so that the two codes can be run side by
side (``benchmarks/REPRODUCTION.md``). Only ``forward`` differs; the padding stays on the right, which
changes nothing else: padded keys are masked and the output is read at the row's last item either way.

A row's positions depend on its length, so one pass over a row cannot stand for its prefixes:
``train_positions: all`` measures that at fit start and trains prefix rows instead, and evaluation's
``eval_shared_prefixes`` scores such rows one by one. Trimming a batch's padding columns changes nothing
(positions are counted from ``MAX_ITEM_LIST_LENGTH``, not from the batch's width).
"""
from __future__ import annotations

import torch
from recbole.model.sequential_recommender.sasrec import SASRec


class SASRecRightAligned(SASRec):
    """SASRec whose row of ``n`` items puts item ``j`` at position ``MAX_ITEM_LIST_LENGTH - n + j``."""

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        index = torch.arange(item_seq.size(1), device=item_seq.device)
        position_ids = (index + (self.max_seq_length - item_seq_len).unsqueeze(1)).clamp_(max=self.max_seq_length - 1)
        input_emb = self.item_embedding(item_seq) + self.position_embedding(position_ids)
        input_emb = self.dropout(self.LayerNorm(input_emb))
        trm_output = self.trm_encoder(input_emb, self.get_attention_mask(item_seq), output_all_encoded_layers=True)
        return self.gather_indexes(trm_output[-1], item_seq_len - 1)  # [B, H]
