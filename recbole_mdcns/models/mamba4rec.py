"""Mamba4Rec: sequential recommendation with selective state space models.

Chengkai Liu, Jianghao Lin, Jianling Wang, Hanzhou Liu, James Caverlee. *Mamba4Rec: Towards
Efficient Sequential Recommendation with Selective State Space Models*, arXiv 2403.03900 (2024).
Follows the authors' RecBole code (github.com/chengkai-liu/Mamba4Rec, ``mamba4rec.py``).

Architecture (the paper's Mamba layer and position-wise feed-forward network), for a
right-padded item sequence ``[B, L]``:

1. item embedding ``E[s_t]`` (``hidden_size`` = d) -> dropout -> LayerNorm;
2. ``num_layers`` Mamba layers, each
   ``h = LayerNorm(Dropout(Mamba(x)) + x)`` (no residual when ``num_layers == 1``, as the
   original) followed by a position-wise feed-forward network
   ``LayerNorm(Dropout(W2 Dropout(GELU(W1 h))) + h)`` with inner size ``4 d``;
3. the output at the last real item, ``item_seq_len - 1``, scored against the item
   embeddings by a dot product (BPR or CE loss, as SASRec).

The Mamba block (Gu & Dao 2023, arXiv 2312.00752, Alg. 2: SSM + selection) projects ``x`` to
``d_inner = expand * d`` channels twice (``x``, gate ``z``); ``x`` goes through a causal depthwise convolution of width
``d_conv`` and SiLU, then the selective scan with state size ``d_state``:
``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t``, ``y_t = C_t h_t + D x_t``, with ``Δ, B, C``
computed from ``x_t``; the output is ``out_proj(y * SiLU(z))``. Every step reads only
positions ``<= t``, so the model is causal: the items after a position (the right padding
included) never change its output.

Backends (``mamba_backend``), both with the same parameters (names and shapes), so a
state dict moves between them:

* ``mambapy`` -- ``mambapy.mamba.MambaBlock``: the scan in pure PyTorch (Blelloch parallel
  scan; the time axis is zero-padded *after* the sequence to a power of two, which cannot
  reach back to earlier positions). Runs on CPU and GPU.
* ``mamba_ssm`` -- ``mamba_ssm.Mamba``, the authors' dependency: fused CUDA kernels, CUDA only.
* ``auto`` (default) -- ``mamba_ssm`` when it imports and the model's ``device`` is CUDA, else
  ``mambapy``.

Memory and time of the ``mambapy`` scan: it materialises several ``[B, L', d_inner, d_state]``
float32 tensors per layer (``L'`` = ``L`` rounded up to a power of two), kept for backward.
One training step (forward + backward, BPR) on CPU, one thread, ml-100k, ``L = 50``, the
defaults (d = 64, d_inner = 128, d_state = 16, 2 layers), measured with
``python -m benchmarks.studies.mamba4rec_memory --batches 1024,2048 --chunks 0,256``:

==========  ========================  ===========================
batch       ``mamba_batch_chunk: 0``  ``mamba_batch_chunk: 256``
==========  ========================  ===========================
1024        +7.2 GiB RSS, 29 s        +1.8 GiB RSS, 28 s
2048        +13.6 GiB RSS, 89 s       +2.4 GiB RSS, 72 s
==========  ========================  ===========================

``mamba_batch_chunk: R`` (> 0) runs each layer's Mamba block on ``R`` rows at a time, under
activation checkpointing when gradients flow (the block is recomputed in backward), so only
one chunk's scan tensors are alive at once; outputs and gradients are unchanged. On this CPU
chunking cost no time (table); on a GPU the recompute is one more forward of each block
(not measured). The ``mamba_ssm`` kernels keep the state in on-chip
memory and need neither.

Initialisation as the original: every ``nn.Linear`` / ``nn.Embedding`` weight (the Mamba
block's projections included) ~ N(0, 0.02), every linear bias 0 (also the block's ``Δ``
bias), LayerNorms 1 / 0.
"""
from __future__ import annotations

import importlib

import torch
from mambapy.mamba import MambaBlock, MambaConfig
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn
from torch.utils.checkpoint import checkpoint

MAMBA_BACKENDS = ("auto", "mambapy", "mamba_ssm")
LOSS_TYPES = ("BPR", "CE")
_POSITIVE_INTS = ("hidden_size", "num_layers", "d_state", "d_conv", "expand")


def _mamba_ssm_class() -> type[nn.Module] | None:
    """``mamba_ssm.Mamba`` if the package imports (it needs its compiled CUDA extension), else None."""
    try:
        return importlib.import_module("mamba_ssm").Mamba
    except ImportError:
        return None


def resolve_backend(name: str, device: torch.device | str) -> str:
    """``mamba_backend`` -> ``mambapy`` or ``mamba_ssm`` for a model on ``device``; ``ValueError``
    naming the key if unusable. ``auto``: ``mamba_ssm`` if it imports and ``device`` is CUDA."""
    if name not in MAMBA_BACKENDS:
        raise ValueError(f"mamba_backend must be one of {list(MAMBA_BACKENDS)}, got {name!r}")
    if name == "auto":
        return "mamba_ssm" if _mamba_ssm_class() is not None and torch.device(device).type == "cuda" else "mambapy"
    if name == "mamba_ssm" and _mamba_ssm_class() is None:
        raise ValueError(
            "mamba_backend: mamba_ssm, but the mamba_ssm package does not import (it needs CUDA and a "
            "build matching this torch); install mamba-ssm or set mamba_backend to 'mambapy' or 'auto'"
        )
    return name


def mamba_block(backend: str, d_model: int, d_state: int, d_conv: int, expand: int) -> nn.Module:
    """One Mamba block ``[B, L, d_model] -> [B, L, d_model]`` from ``backend`` (``mambapy`` / ``mamba_ssm``)."""
    if backend == "mamba_ssm":
        return _mamba_ssm_class()(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    return MambaBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, d_conv=d_conv, expand_factor=expand))


class FeedForward(nn.Module):
    """Position-wise ``LayerNorm(Dropout(W2 Dropout(GELU(W1 x))) + x)`` (the original's, with the
    dropout after the activation that RecBole's ``FeedForward`` lacks)."""

    def __init__(self, d_model: int, inner_size: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.activation(self.w_1(x)))
        return self.LayerNorm(self.dropout(self.w_2(hidden)) + x)


class MambaLayer(nn.Module):
    """``FFN(LayerNorm(Dropout(Mamba(x)) [+ x]))``; the residual only when ``residual``."""

    def __init__(self, mamba: nn.Module, d_model: int, dropout: float, residual: bool, batch_chunk: int) -> None:
        super().__init__()
        self.mamba = mamba
        self.residual = residual
        self.batch_chunk = batch_chunk
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The Mamba block on ``x``; with ``batch_chunk`` on that many rows at a time, each chunk
        checkpointed when gradients flow (the block has no randomness, so the recompute is exact)."""
        if not 0 < self.batch_chunk < x.shape[0]:
            return self.mamba(x)
        grad = torch.is_grad_enabled()
        return torch.cat([checkpoint(self.mamba, part, use_reentrant=False) if grad else self.mamba(part)
                          for part in x.split(self.batch_chunk)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.mix(x))
        return self.ffn(self.LayerNorm(hidden + x if self.residual else hidden))


class Mamba4Rec(SequentialRecommender):
    """Mamba4Rec (arXiv 2403.03900) on RecBole; see the module docstring.

    Config keys (defaults in ``config_yamls/models/Mamba4Rec.yaml``): ``hidden_size``,
    ``num_layers``, ``dropout_prob``, ``d_state``, ``d_conv``, ``expand``, ``loss_type``
    (``BPR`` | ``CE``), ``mamba_backend`` (``auto`` | ``mambapy`` | ``mamba_ssm``),
    ``mamba_batch_chunk`` (0 = off). The sizes, ``dropout_prob`` and ``loss_type`` are required
    (RecBole loads no model YAML for a model outside its package; pass the YAML or the keys);
    ``mamba_backend`` and ``mamba_batch_chunk`` default to ``auto`` and 0 when unset.
    """

    def __init__(self, config, dataset) -> None:
        super().__init__(config, dataset)
        _check_config(config)
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        self.dropout_prob = config["dropout_prob"]
        self.d_state = config["d_state"]
        self.d_conv = config["d_conv"]
        self.expand = config["expand"]
        self.loss_type = config["loss_type"]
        self.backend = resolve_backend(config["mamba_backend"] or "auto", config["device"] or "cpu")
        batch_chunk = config["mamba_batch_chunk"] or 0

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(self.dropout_prob)
        self.mamba_layers = nn.ModuleList(
            MambaLayer(mamba_block(self.backend, self.hidden_size, self.d_state, self.d_conv, self.expand),
                       self.hidden_size, self.dropout_prob, residual=self.num_layers > 1, batch_chunk=batch_chunk)
            for _ in range(self.num_layers)
        )
        self.loss_fct = BPRLoss() if self.loss_type == "BPR" else nn.CrossEntropyLoss()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` items -> ``[B, d]``, the representation after item ``item_seq_len - 1``."""
        output = self.LayerNorm(self.dropout(self.item_embedding(item_seq)))
        for layer in self.mamba_layers:
            output = layer(output)
        return self.gather_indexes(output, item_seq_len - 1)

    def calculate_loss(self, interaction) -> torch.Tensor:
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "BPR":
            pos_score = (seq_output * self.item_embedding(pos_items)).sum(-1)
            neg_score = (seq_output * self.item_embedding(interaction[self.NEG_ITEM_ID])).sum(-1)
            return self.loss_fct(pos_score, neg_score)
        return self.loss_fct(seq_output @ self.item_embedding.weight.T, pos_items)

    def predict(self, interaction) -> torch.Tensor:
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (seq_output * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return seq_output @ self.item_embedding.weight.T


def _check_config(config) -> None:
    """``ValueError`` naming the key for a missing or out-of-range Mamba4Rec setting."""
    for key in _POSITIVE_INTS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Mamba4Rec: {key} must be a positive integer, got {value!r} "
                             "(defaults: config_yamls/models/Mamba4Rec.yaml)")
    dropout = config["dropout_prob"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"Mamba4Rec: dropout_prob must be a number in [0, 1), got {dropout!r}")
    if config["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"Mamba4Rec: loss_type must be one of {list(LOSS_TYPES)}, got {config['loss_type']!r}")
    chunk = config["mamba_batch_chunk"]
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0):
        raise ValueError(f"Mamba4Rec: mamba_batch_chunk must be an integer >= 0 (0: off), got {chunk!r}")
