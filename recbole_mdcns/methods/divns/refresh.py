"""DivNS's epoch-end refresh: every user's diverse set ``D_u``, a k-DPP draw over its runner-up cache.

At each epoch end, per user, ``D_u`` is an exact k-DPP sample (``dpp.sample_k_dpp``;
``divns_dpp_mode: greedy`` uses greedy MAP instead) over ``C_u`` with the kernel
``L = diag(q) S diag(q)`` of :func:`diversity_kernel`, ``k = min(|H_u|, |C_u|, rank L)``
(:func:`refresh_diverse_sets`); the module (:meth:`~.module.DivNSModule.refresh`) then clears
``C_u`` and ``H_u``.

The inputs are item embeddings and the per-user id sets of :mod:`.cache`: nothing here is
specific to sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recbole_mdcns.dpp import greedy_map_dpp, kdpp_rank, sample_k_dpp
from recbole_mdcns.methods.divns.cache import DiverseSets, RunnerUpCache

KERNELS = ("rbf", "cosine")
DPP_MODES = ("exact", "greedy")
# what refresh_diverse_sets draws D_u with: the k-DPP's two modes, or (divns_ablation: no_dpp) a uniform k-subset
REFRESH_MODES = (*DPP_MODES, "uniform")
# q_a = 1 / (1 + alpha * mean cos): the denominator is floored here so that an item
# (anti-)aligned with every hard negative cannot make q infinite (or flip its sign).
Q_DENOMINATOR_FLOOR = 1e-3


def median_bandwidth(d2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[b]`` RBF bandwidths ``gamma = 1 / median_{i < j} ||e_i - e_j||^2`` over each set's valid pairs
    (``d2`` ``[b, m, m]`` squared distances, ``mask`` ``[b, m]``), so that the median pair of every
    set has ``S_ij = exp(-1)`` whatever the scale of the embeddings; ``1`` for a set without a pair
    at positive distance."""
    m = d2.shape[-1]
    upper = torch.ones(m, m, dtype=torch.bool, device=d2.device).triu(1)
    pairs = mask.unsqueeze(-1) & mask.unsqueeze(-2) & upper
    median = torch.where(pairs, d2, torch.nan).flatten(1).nanmedian(1).values
    return torch.where(median > 0, 1.0 / median, torch.ones_like(median))


def diversity_kernel(emb: torch.Tensor, hard_emb: torch.Tensor, kernel: str = "rbf", gamma: float | str = 1.0,
                     alpha: float = 1.0, mask: torch.Tensor | None = None,
                     hard_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DivNS's L-ensemble ``L = diag(q) S diag(q)`` over cached items, in float64.

    Args:
        emb: ``[m, d]`` or ``[b, m, d]`` embeddings of the cached items.
        hard_emb: ``[h, d]`` or ``[b, h, d]`` embeddings of the user's hard negatives ``H_u``.
        kernel: ``"rbf"``: ``S_ij = exp(-gamma ||e_i - e_j||^2)`` (the reference code's), ``gamma`` a
            number or ``"median"`` (per set, :func:`median_bandwidth`);
            ``"cosine"``: ``S_ij = cos(e_i, e_j)`` (rank <= d).
        alpha: ``q_a = 1 / (1 + alpha * mean_{h in H_u} cos(e_a, e_h))``; the denominator is
            floored at :data:`Q_DENOMINATOR_FLOOR`. With no valid hard item, ``q = 1``.
        mask, hard_mask: ``[m]`` / ``[b, m]`` and ``[h]`` / ``[b, h]`` bool valid entries;
            rows and columns of invalid items are zero in ``L``.

    Returns:
        ``[m, m]`` or ``[b, m, m]`` symmetric PSD float64 kernel.
    """
    unbatched = emb.dim() == 2
    e = (emb.unsqueeze(0) if unbatched else emb).double()
    h = (hard_emb.unsqueeze(0) if hard_emb.dim() == 2 else hard_emb).double()
    b, m, _ = e.shape
    mask = torch.ones(b, m, dtype=torch.bool, device=e.device) if mask is None else mask.reshape(-1, m).expand(b, m)
    hard_mask = (torch.ones(h.shape[:2], dtype=torch.bool, device=e.device) if hard_mask is None
                 else hard_mask.reshape(-1, h.shape[1]).expand(h.shape[0], h.shape[1]))
    e_unit = F.normalize(e, dim=-1)
    if kernel == "rbf":
        sq = (e * e).sum(-1)
        d2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * e @ e.transpose(1, 2)).clamp_min(0.0)
        d2 = d2 * (1 - torch.eye(m, dtype=d2.dtype, device=d2.device))  # exact zeros on the diagonal
        bandwidth = median_bandwidth(d2, mask).view(b, 1, 1) if gamma == "median" else gamma
        S = torch.exp(-bandwidth * d2)
    elif kernel == "cosine":
        S = e_unit @ e_unit.transpose(1, 2)
    else:
        raise ValueError(f"divns_kernel must be one of {list(KERNELS)}, got {kernel!r}")
    cos_hard = e_unit @ F.normalize(h, dim=-1).transpose(1, 2)  # [b, m, h]
    weights = hard_mask.to(cos_hard.dtype).unsqueeze(1)
    mean_cos = (cos_hard * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)
    q = 1.0 / (1.0 + alpha * mean_cos).clamp_min(Q_DENOMINATOR_FLOOR)
    q = q * mask
    L = q.unsqueeze(-1) * S * q.unsqueeze(-2)
    return L[0] if unbatched else L


def uniform_subsets(k: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[b, max(k)]`` slots of a uniform draw of ``k_i`` distinct valid items per row (``mask`` ``[b, m]``,
    ``k_i <=`` the row's valid items), ``-1`` after the first ``k_i``: every ``k_i``-subset equally likely
    (the ``divns_ablation: no_dpp`` replacement of the k-DPP)."""
    keys = torch.rand(mask.shape, generator=generator, device=mask.device).masked_fill(~mask, -1.0)
    slots = keys.argsort(1, descending=True)[:, :int(k.max())]
    return torch.where(torch.arange(slots.shape[1], device=mask.device) < k.unsqueeze(1), slots, -1)


# elements of one chunk's [users, m, m] kernel: fewer users per chunk for large caches
_CHUNK_ELEMENTS = 1 << 24


def refresh_diverse_sets(item_emb: torch.Tensor, cache_items: torch.Tensor | RunnerUpCache,
                         cache_size: torch.Tensor, hard_items: torch.Tensor | RunnerUpCache,
                         hard_size: torch.Tensor, kernel: str = "rbf", gamma: float | str = 1.0, alpha: float = 1.0,
                         mode: str = "exact", generator: torch.Generator | None = None,
                         chunk: int = 1024) -> DiverseSets:
    """Every user's diverse set ``D_u``, batched over users.

    ``cache_items`` / ``hard_items`` are ``[U, C]`` / ``[U, H]`` tensors or :class:`RunnerUpCache` caches
    holding distinct ids in their first ``cache_size`` / ``hard_size`` slots. For each user with
    both sets non-empty, ``L`` = :func:`diversity_kernel` over ``item_emb[C_u]`` and
    ``k = min(|H_u|, |C_u|, rank L)`` items are drawn by ``sample_k_dpp`` (``mode="exact"``) or
    ``greedy_map_dpp`` (``mode="greedy"``); ``mode="uniform"`` (the k-DPP ablation) draws
    ``k = min(|H_u|, |C_u|)`` items of ``C_u`` uniformly instead (:func:`uniform_subsets`, no kernel). Users are sorted by cache size and sent ``chunk`` at a
    time (fewer when a chunk's ``[users, m, m]`` kernel would exceed 2^24 elements), each chunk
    trimmed to its largest set (ragged sets via ``mask``).
    """
    if mode not in REFRESH_MODES:
        raise ValueError(f"refresh mode must be one of {list(REFRESH_MODES)}, got {mode!r}")
    n_users = len(cache_size)
    device = cache_size.device
    picked_users, picked_ids, sizes = [], [], torch.zeros(n_users, dtype=torch.long, device=device)
    active = ((cache_size > 0) & (hard_size > 0)).nonzero().flatten()
    active = active[cache_size[active].argsort(stable=True)]
    emb = item_emb.detach()
    start = 0
    while start < len(active):
        m = int(cache_size[active[min(start + chunk, len(active)) - 1]])  # sorted: the chunk's largest set
        users = active[start:start + max(1, min(chunk, _CHUNK_ELEMENTS // (m * m)))]
        start += len(users)
        c_size, h_size = cache_size[users], hard_size[users]
        m, hm = int(c_size.max()), int(h_size.max())
        items, hards = _rows(cache_items, users, m), _rows(hard_items, users, hm)
        mask = torch.arange(m, device=items.device) < c_size.unsqueeze(1)
        hard_mask = torch.arange(hm, device=items.device) < h_size.unsqueeze(1)
        k = torch.minimum(c_size, h_size)
        if mode == "uniform":
            picked = uniform_subsets(k, mask, generator)
        else:
            L = diversity_kernel(emb[items], emb[hards], kernel, gamma, alpha, mask, hard_mask)
            if mode == "exact":
                picked = sample_k_dpp(L, k, generator=generator, mask=mask, clamp_k=True)
            else:
                picked = greedy_map_dpp(L, torch.minimum(k, kdpp_rank(L, mask)), mask=mask)
        # greedy rows may stop early; -1s come last in every mode, so ids form a prefix
        valid = picked >= 0
        picked_users.append(users.unsqueeze(1).expand_as(picked)[valid])
        picked_ids.append(items.gather(1, picked.clamp_min(0))[valid])
        sizes[users] = valid.sum(1)
    if not picked_users:
        return DiverseSets(torch.zeros(0, dtype=torch.long, device=device), sizes.cumsum(0) - sizes, sizes)
    owners, ids = torch.cat(picked_users), torch.cat(picked_ids)
    order = owners.argsort(stable=True)  # by user; each user's ids keep their order
    return DiverseSets(ids[order], sizes.cumsum(0) - sizes, sizes)


def _rows(items: torch.Tensor | RunnerUpCache, users: torch.Tensor, width: int) -> torch.Tensor:
    return items.rows(users, width) if isinstance(items, RunnerUpCache) else items[users, :width]

