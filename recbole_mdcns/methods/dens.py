"""``neg_sampler: dens`` -- Disentangled Negative Sampling (Lai et al., "Disentangled Negative Sampling for
Collaborative Filtering", WSDM'23), for a representation ``h``.

DENS splits item vectors into the factors relevant to the interaction and the rest, picks the
candidate that differs from the positive in the relevant factors while resembling it in the others,
and trains the split with four contrastive tasks. With ``h`` the row's representation (the user
embedding in the paper, the sequence representation here) and ``e_v`` the item vectors the scorer
scores (``s(v) = h . e_v``), following the paper and the authors' code (``Riwei-HEU/DENS``):

* **hierarchical gating module** -- positive gate ``g_p = sigmoid(W_i e_p + W_u h)``, relevant factors
  ``e_p^r = g_p * e_p``, irrelevant ``e_p^ir = e_p - e_p^r``; negative gate, conditioned on the
  positive's relevant factors, ``g_n = sigmoid(W_n e_n + W_p e_p^r)``, ``e_n^r = g_n * e_n``,
  ``e_n^ir = e_n - e_n^r`` (each ``W`` a ``d x d`` linear layer with bias: :class:`DisentangleGates`);
* **factor-aware sampling** -- from the pool ``C``, ``n* = argmax_n h . ((1 - w) e_n - e_n^r)
  = (1 - w) h . e_n^ir - w h . e_n^r``, the relevance weight ``w = min(1, epoch / dens_warmup)`` rising
  from 0 to 1 over the warm-up (the authors' schedule; ``dens_warmup: 0`` is ``w = 1`` throughout):
  :func:`factor_aware_scores` (computed, without gradient, by :func:`pool_selection_scores`: the negative
  gate's item part once per catalogue item, not once per pool entry; with ``dens_compile: true`` the
  elementwise rest is one kernel fused by ``torch.compile``);
* **contrastive tasks** -- ``L_dis`` = the mean of four BPR terms on factor scores ``s^r = h . e^r``,
  ``s^ir = h . e^ir``: positive ``s_p^r > s_p^ir``, negative ``s_n^ir > s_n^r``, relevant
  ``s_p^r > s_n^r``, irrelevant ``s_n^ir > s_p^ir`` (:func:`contrastive_loss`); the row's loss is
  ``neg_loss(s(v+), s(n*)) + dens_gamma * L_dis``.

**The gates' parameters** live in this LightningModule (``self.gates``), so the Lightning checkpoint
holds them, and are a param group of the run's optimizer (like MDCNS's peer) with its learning rate;
the self model's RecBole checkpoint (``saved/<Model>-<time>.pth``) holds only the model's
``state_dict`` and loads into plain RecBole. ``dens_gamma: 0`` leaves the gates untrained (frozen at
their initialisation, in no param group), as the DivNS reference code's DENS does.

**Adaptations.** DENS needs item vectors scored linearly (``h . v(item)``, BERT4Rec's per-item bias
aside, which the factor scores leave out): models scored otherwise (TransRec, the generic ``predict()``
path) are an error. ``neg_num: K`` trains on the K highest factor-aware scores (distinct,
``neg_num <= candidate_num``; the authors' code draws K separate pools); BPR's mean over rows and
negatives replaces the authors' ``log(1 + sum_k exp(.))`` for K > 1 (equal for K = 1). ``top_m`` is not
read (must be 1).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction

from recbole_mdcns.config import check_bool, packaged_yaml, require_one
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.methods.divns.pairing import synthesis_is_exact
from recbole_mdcns.registry import register_sampler
from recbole_mdcns.scoring import one_pass_scorer


class DisentangleGates(torch.nn.Module):
    """DENS's hierarchical gating module over ``d``-dimensional item vectors and representations."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.user_gate = torch.nn.Linear(dim, dim)
        self.item_gate = torch.nn.Linear(dim, dim)
        self.pos_gate = torch.nn.Linear(dim, dim)
        self.neg_gate = torch.nn.Linear(dim, dim)

    def positive(self, h: torch.Tensor, e_pos: torch.Tensor) -> torch.Tensor:
        """Relevant factors of the positive, ``e_p^r = sigmoid(W_i e_p + W_u h) * e_p`` (``[R, d]``)."""
        return e_pos * torch.sigmoid(self.item_gate(e_pos) + self.user_gate(h))

    def negative(self, e_neg: torch.Tensor, pos_relevant: torch.Tensor) -> torch.Tensor:
        """Relevant factors of negatives ``e_neg`` ``[R, K, d]``, ``e_n^r = sigmoid(W_n e_n + W_p e_p^r) * e_n``."""
        return e_neg * torch.sigmoid(self.neg_gate(e_neg) + self.pos_gate(pos_relevant).unsqueeze(1))


def relevance_weight(epoch: int, warmup: float) -> float:
    """``w = min(1, epoch / warmup)`` (``warmup <= 0``: 1)."""
    return 1.0 if warmup <= 0 else min(1.0, epoch / warmup)


def _dot(h: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``h . vectors`` over the last dim, ``h`` ``[R, d]`` against ``[R, d]`` or ``[R, K, d]``."""
    return (h.unsqueeze(1) * vectors).sum(-1) if vectors.dim() == 3 else (h * vectors).sum(-1)


def factor_aware_scores(h: torch.Tensor, e_neg: torch.Tensor, neg_relevant: torch.Tensor,
                        weight: float) -> torch.Tensor:
    """``[R, N]`` DENS selection scores ``h . ((1 - w) e_n - e_n^r)``; the negative is their argmax."""
    return _dot(h, (1.0 - weight) * e_neg - neg_relevant)


# The pool's selection scores run over row chunks of about this many ``[rows, N, d]`` elements (2 MiB of
# float32), so that a chunk's gate tensors stay in a CPU core's cache between their elementwise steps.
# One CPU core, R = 2048 rows, N = 100, d = 64, 3.6k items (LastFM), no gradient: the straightforward
# ``[R, N, d]`` gates ~225 ms a batch; this path ~25-30 ms in chunks of 2^16-2^19 elements (a shared machine);
# the fused kernel of ``dens_compile: true`` ~11 ms (benchmarks/studies/dens_selection.py).
SELECTION_CHUNK_ELEMENTS = 1 << 19


def gated_scores(item_part: torch.Tensor, row_part: torch.Tensor, vectors: torch.Tensor, h: torch.Tensor,
                 index: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``-h . ((sigmoid(item_part[index] + row_part) - shift) * vectors[index])``, ``[R, N]``: the
    selection scores of :func:`pool_selection_scores` as one expression, which ``torch.compile`` fuses into
    a single loop with no ``[R, N, d]`` intermediate (``shift`` a 0-d tensor, so ``w`` changing with the
    epoch does not recompile)."""
    gate = torch.sigmoid(item_part[index] + row_part.unsqueeze(1)) - shift
    return -(gate * vectors[index] * h.unsqueeze(1)).sum(-1)


_fused_gated_scores = None


def fused_gated_scores():
    """:func:`gated_scores` compiled (once a process, shapes dynamic)."""
    global _fused_gated_scores
    if _fused_gated_scores is None:
        _fused_gated_scores = torch.compile(gated_scores, dynamic=True)
    return _fused_gated_scores


def pool_selection_scores(gates: DisentangleGates, h: torch.Tensor, pos_relevant: torch.Tensor,
                          vectors: torch.Tensor, index: torch.Tensor, weight: float,
                          fused: bool = False) -> torch.Tensor:
    """:func:`factor_aware_scores` of the pool ``e_n = vectors[index]`` (``index`` ``[R, N]`` into the
    ``[M, d]`` table ``vectors``: the catalogue or the pool's distinct items), equal up to float rounding to
    ``factor_aware_scores(h, e, gates.negative(e, pos_relevant), weight)``, for selection (no gradient).

    The negative gate's pre-activation ``W_n e_n + W_p e_p^r`` splits into an item
    part, computed once per row of ``vectors`` (``M d^2`` multiply-adds instead of ``R N d^2``), and a row
    part ``W_p e_p^r``, once per row; the score is ``h . ((1 - w) e_n - g_n e_n)
    = -h . ((g_n - (1 - w)) e_n)`` (``h . (sigmoid(-x) e_n)`` at ``w = 0``, ``-h . (g_n e_n)`` at ``w = 1``).
    ``fused``: the elementwise rest as :func:`fused_gated_scores`' one kernel; else elementwise steps over
    row chunks (:data:`SELECTION_CHUNK_ELEMENTS`; one chunk on a GPU)."""
    item_part, row_part = gates.neg_gate(vectors), gates.pos_gate(pos_relevant)
    if fused:
        shift = torch.tensor(1.0 - weight, dtype=h.dtype, device=h.device)
        return fused_gated_scores()(item_part, row_part, vectors, h, index, shift)
    sign = -1.0
    if weight == 0.0:  # g - 1 = -sigmoid(-x): the score is h . (sigmoid(-x) e_n), one elementwise pass fewer
        item_part, row_part, sign = item_part.neg_(), row_part.neg_(), 1.0
    dim = vectors.shape[-1]
    rows = len(index) if h.is_cuda else max(1, SELECTION_CHUNK_ELEMENTS // (index.shape[1] * dim))
    scores = h.new_empty(index.shape)
    gate_buffer, vector_buffer = (h.new_empty(min(rows, len(index)) * index.shape[1], dim) for _ in range(2))
    for start in range(0, len(index), rows):
        chunk = slice(start, start + rows)
        ids = index[chunk].reshape(-1)
        shape = (*index[chunk].shape, dim)
        gate = torch.index_select(item_part, 0, ids, out=gate_buffer[:len(ids)]).view(shape)
        gate.add_(row_part[chunk].unsqueeze(1)).sigmoid_()
        if 0.0 < weight < 1.0:
            gate.sub_(1.0 - weight)
        gate.mul_(torch.index_select(vectors, 0, ids, out=vector_buffer[:len(ids)]).view(shape))
        torch.bmm(gate, h[chunk].unsqueeze(-1), out=scores[chunk].unsqueeze(-1))
    return scores.mul_(sign)


def compiles(gates: DisentangleGates, device: torch.device) -> str | None:
    """Run :func:`fused_gated_scores` once on a small input on ``device``: ``None`` if it compiles and agrees
    with the chunked path, else why not (no C++ compiler for the CPU, no Triton for the GPU, ...)."""
    generator = torch.Generator().manual_seed(0)
    dim = gates.neg_gate.in_features
    vectors, h, pos_relevant = (torch.randn(n, dim, generator=generator).to(device) for n in (7, 5, 5))
    index = torch.randint(0, 7, (5, 3), generator=generator).to(device)
    try:
        with torch.no_grad():
            fused = pool_selection_scores(gates, h, pos_relevant, vectors, index, 0.5, fused=True)
            chunked = pool_selection_scores(gates, h, pos_relevant, vectors, index, 0.5)
    except Exception as error:  # torch.compile's backends raise many kinds: report whichever it was
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not torch.allclose(fused, chunked, atol=1e-4):
        return f"its scores differ from the chunked path's by {(fused - chunked).abs().max().item():.2g}"
    return None


def pool_table(scorer, model, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vectors, index)`` with ``vectors[index] = item_vectors(candidates)``: the whole catalogue when it
    has no more items than the pool has entries (like :data:`recbole_mdcns.scoring.FULL_CATALOGUE_RATIO`'s
    rule), else the pool's distinct items."""
    if model.n_items <= candidates.numel():
        return scorer.item_vectors(model, torch.arange(model.n_items, device=candidates.device)), candidates
    items, index = candidates.unique(return_inverse=True)
    return scorer.item_vectors(model, items), index


def _prefer(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """BPR ``-log sigmoid(better - worse)``, mean over all entries; ``[R]`` broadcasts against ``[R, K]``."""
    if better.dim() < worse.dim():
        better = better.unsqueeze(1)
    elif worse.dim() < better.dim():
        worse = worse.unsqueeze(1)
    return F.softplus(worse - better).mean()


def contrastive_loss(h: torch.Tensor, e_pos: torch.Tensor, pos_relevant: torch.Tensor, e_neg: torch.Tensor,
                     neg_relevant: torch.Tensor) -> torch.Tensor:
    """DENS's four pairwise contrastive tasks, averaged (positive ``[R, d]``, negatives ``[R, K, d]``)."""
    pos_r = _dot(h, pos_relevant)
    pos_ir = _dot(h, e_pos) - pos_r
    neg_r = _dot(h, neg_relevant)
    neg_ir = _dot(h, e_neg) - neg_r
    return (_prefer(pos_r, pos_ir) + _prefer(neg_ir, neg_r) + _prefer(pos_r, neg_r) + _prefer(neg_ir, pos_ir)) / 4


def _item_vector_dim(model) -> int:
    """Dimension of the vectors ``model``'s one-pass scorer scores; ``ValueError`` if it has none to gate."""
    reason = ""
    try:
        probe = one_pass_scorer(model)(model)
        if synthesis_is_exact(probe):
            device = next(model.parameters()).device
            return probe.item_vectors(model, torch.zeros(1, dtype=torch.long, device=device)).shape[-1]
        reason = f"it is scored by {probe.path}"
    except (TypeError, AttributeError) as error:
        reason = str(error)
    raise ValueError(f"neg_sampler=dens gates item vectors: it needs a model scored as h . v(item) (e.g. SASRec, "
                     f"GRU4Rec, BERT4Rec, FPMC); {type(model).__name__} cannot be ({reason})")


class DENSModule(NegativeSamplingModule):
    """``neg_sampler: dens`` (see the module docstring)."""

    def __init__(self, model, optimizer, config) -> None:
        super().__init__(model, optimizer, config)
        self.gates = DisentangleGates(_item_vector_dim(model)).to(next(model.parameters()).device)
        self.gamma = float(config["dens_gamma"])
        self.warmup = float(config["dens_warmup"])
        self.neg_num = config["neg_num"]
        self.fused = bool(config["dens_compile"])
        if self.fused:
            why = compiles(self.gates, next(model.parameters()).device)
            if why:
                warnings.warn(f"dens_compile: true could not compile DENS's selection ({why}); the chunked "
                              f"path selects the same negatives, slower. Set dens_compile: false to silence.")
                self.fused = False
        if self.gamma:
            optimizer.add_param_group({"params": list(self.gates.parameters())})
        else:
            self.gates.requires_grad_(False)

    @staticmethod
    def validate_config(config) -> None:
        require_one(config, "top_m", "dens", "its negative is the argmax of the factor-aware score")
        check_bool(config, "dens_compile")
        for key in ("dens_gamma", "dens_warmup"):
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")

    def training_loss(self, batch: Interaction) -> torch.Tensor:
        model = self.model
        candidates, positives = batch[CANDIDATES], batch[model.POS_ITEM_ID]
        scorer = self.scorer_for("self", model, batch)
        if not synthesis_is_exact(scorer):
            raise ValueError(f"neg_sampler=dens needs a model scored as h . v(item); {type(model).__name__} "
                             f"is scored by {scorer.path}")
        h = scorer.encode(model, batch)
        e_pos = scorer.item_vectors(model, positives)
        pos_relevant = self.gates.positive(h, e_pos)
        with torch.no_grad():
            vectors, index = pool_table(scorer, model, candidates)
            weight = relevance_weight(self.current_epoch, self.warmup)
            picked = pool_selection_scores(self.gates, h.detach(), pos_relevant.detach(), vectors, index,
                                           weight, self.fused).topk(self.neg_num, dim=1).indices
        negatives = candidates.gather(1, picked)
        self.record_negatives(negatives)
        scores = scorer.score(model, batch, h, torch.cat([positives.unsqueeze(1), negatives], 1))
        loss = self.loss_fn(scores[:, 0], scores[:, 1:])
        if not self.gamma:
            return loss
        e_neg = scorer.item_vectors(model, negatives)
        return loss + self.gamma * contrastive_loss(h, e_pos, pos_relevant, e_neg,
                                                    self.gates.negative(e_neg, pos_relevant))


register_sampler("dens", DENSModule, config_file=packaged_yaml("dens"))
