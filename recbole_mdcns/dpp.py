"""Batched, device-agnostic k-DPP sampling and greedy MAP inference in torch.

Conventions shared by every function in this module:

* ``L`` is a symmetric PSD kernel of shape ``[m, m]`` or ``[b, m, m]`` (only its
  lower triangle is read by the eigendecomposition). Any float dtype and device
  is accepted; ``eigh`` runs in ``L``'s dtype, everything after it in float64,
  all on ``L``'s device.
* ``mask`` (optional, ``[m]`` or ``[b, m]`` bool) marks the valid items of a
  ragged set. Rows/columns of ``L`` outside the mask are treated as zero, so
  padded items carry zero-eigenvalue directions and are never returned.
* Results are ``torch.long`` tensors of item indices into ``L``'s rows. Batched
  results have shape ``[b, max(k)]``; a row with ``k_i < max(k)`` is
  right-padded with ``-1``. Unbatched results have shape ``[k]``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

__all__ = ["sample_k_dpp", "greedy_map_dpp", "kdpp_rank"]

KType = Union[int, torch.Tensor]


def _prepare(
    L: torch.Tensor, k: KType, mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Batch and mask ``L``, broadcast ``k`` to ``[b]`` and ``mask`` to ``[b, m]``."""
    if L.dim() not in (2, 3) or L.shape[-1] != L.shape[-2] or not L.is_floating_point():
        raise ValueError(f"L must be a float tensor of shape [m, m] or [b, m, m], got {L.dtype} {tuple(L.shape)}")
    unbatched = L.dim() == 2
    L = L.unsqueeze(0) if unbatched else L
    b, m, _ = L.shape
    if mask is None:
        mask = torch.ones(b, m, dtype=torch.bool, device=L.device)
    else:
        mask = mask.to(device=L.device, dtype=torch.bool).reshape(-1, m).expand(b, m)
        L = torch.where(mask.unsqueeze(-1) & mask.unsqueeze(-2), L, torch.zeros_like(L))
    k = torch.as_tensor(k, dtype=torch.long, device=L.device).reshape(-1).expand(b)
    if bool(((k < 0) | (k > m)).any()):
        raise ValueError(f"k must lie in [0, m={m}], got {k.tolist()}")
    return L, k.contiguous(), mask, unbatched


def _clean_eigvals(lam: torch.Tensor, rtol: Optional[float], dtype: torch.dtype) -> torch.Tensor:
    """Ascending eigenvalues ``[b, m]`` as float64, those ``<= rtol * max`` (default ``m * eps(dtype)``) set to 0."""
    rtol = lam.shape[-1] * torch.finfo(dtype).eps if rtol is None else rtol
    lam = lam.to(torch.float64).clamp_min(0.0)
    return torch.where(lam > rtol * lam[:, -1:], lam, torch.zeros_like(lam))


def kdpp_rank(L: torch.Tensor, mask: Optional[torch.Tensor] = None, rtol: Optional[float] = None) -> torch.Tensor:
    """Numerical rank of (masked) ``L``: eigenvalues ``> rtol * max eigenvalue``.

    ``rtol`` defaults to ``m * eps(L.dtype)``. Returns a 0-d tensor for ``[m, m]``
    input, else ``[b]``. Use ``k = torch.minimum(k, kdpp_rank(L, mask))`` to clamp
    k before :func:`sample_k_dpp`, which uses the same rank definition.
    """
    Lb, _, _, unbatched = _prepare(L, 0, mask)
    rank = (_clean_eigvals(torch.linalg.eigvalsh(Lb), rtol, L.dtype) > 0).sum(-1)
    return rank[0] if unbatched else rank


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn per row with probability ∝ ``weights`` (``[b, m]``, >= 0) from uniforms ``u`` in ``(0, 1]``.

    Taking the first index whose cumulative weight reaches ``u * total`` can never land
    on a zero-weight item, even under rounding, because ``u * total <= total`` in floating point.
    """
    cdf = weights.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)


def _sequential_gram_schmidt(
    K: torch.Tensor, k: torch.Tensor, avail: torch.Tensor, u: Optional[torch.Tensor], floor: torch.Tensor
) -> torch.Tensor:
    """Pick up to ``k_i`` items per row by the Gram-Schmidt chain rule on kernel ``K``.

    The score of item ``i`` is its residual squared norm ``K_ii - K_iY K_YY^-1 K_Yi``.
    With uniforms ``u`` (``[b, kmax]`` in ``(0, 1]``) items are drawn proportionally to the score
    (exact projection-DPP sampling when ``K`` is a projection); with ``u=None``
    the argmax is taken (greedy MAP). A row stops early (``-1``) once the picked
    score is not above its ``floor`` (``[b]``). Returns ``[b, kmax]`` indices in pick order.
    """
    b, m, _ = K.shape
    kmax = int(k.max()) if b else 0
    out = torch.full((b, kmax), -1, dtype=torch.long, device=K.device)
    C = K.new_zeros(b, kmax, m)  # C[:, t] = t-th Gram-Schmidt vector over items
    d2 = torch.diagonal(K, dim1=-2, dim2=-1).clone()
    avail = avail.clone()
    rows = torch.arange(b, device=K.device)
    for t in range(kmax):
        score = torch.where(avail, d2.clamp_min(0.0), torch.zeros_like(d2))
        j = score.argmax(-1) if u is None else _inverse_cdf(score, u[:, t])
        dj = score[rows, j]
        ok = (t < k) & (dj > floor)
        out[:, t] = torch.where(ok, j, torch.full_like(j, -1))
        avail[rows, j] = avail[rows, j] & ~ok
        if t + 1 < kmax:
            e = K[rows, :, j] - torch.einsum("btm,bt->bm", C[:, :t], C[rows, :t, j])
            e = e / dj.clamp_min(torch.finfo(K.dtype).tiny).sqrt().unsqueeze(-1)
            e = e * ok.unsqueeze(-1)
            C[:, t] = e
            d2 = d2 - e * e
    return out


def sample_k_dpp(
    L: torch.Tensor,
    k: KType,
    generator: Optional[torch.Generator] = None,
    mask: Optional[torch.Tensor] = None,
    rtol: Optional[float] = None,
    clamp_k: bool = False,
) -> torch.Tensor:
    """Draw exact k-DPP samples, ``P(Y) ∝ det(L_Y)`` over ``|Y| = k``, for a batch of kernels.

    Spectral algorithm of Kulesza & Taskar (2012), Alg. 8 + Alg. 1: batched
    ``eigh`` (in ``L``'s dtype); k eigenvectors are selected exactly by the backward
    recursion on the elementary symmetric polynomials of the eigenvalues (log-space
    float64, so large eigenvalues or ``m`` in the hundreds cannot overflow); the
    selected projection DPP is then sampled by the Gram-Schmidt chain rule. Python
    loops run over ``max(k)`` steps only, never over users or items.

    Args:
        L: ``[m, m]`` or ``[b, m, m]`` symmetric PSD kernel (any float dtype/device).
        k: sample size, int or ``[b]`` LongTensor; ``0 <= k_i <= m``.
        generator: torch generator on ``L``'s device; the only source of randomness,
            so a fixed seed gives identical output.
        mask: optional ``[m]`` / ``[b, m]`` bool of valid items (see module docstring).
        rtol: relative eigenvalue tolerance defining the numerical rank
            (default ``m * eps(L.dtype)``); smaller eigenvalues are treated as 0.
        clamp_k: lower each ``k_i`` to its kernel's numerical rank instead of raising
            (the same as ``torch.minimum(k, kdpp_rank(L, mask))`` without a second
            eigendecomposition).

    Returns:
        ``[k]`` (unbatched) or ``[b, max(k)]`` LongTensor of distinct indices,
        sorted ascending per row, right-padded with ``-1`` where ``k_i < max(k)``.

    Raises:
        ValueError: if some ``k_i`` exceeds the numerical rank of its (masked)
            kernel and ``clamp_k`` is False, since then every ``k_i``-subset has
            determinant 0. The message names ``k``, the rank and the batch row.
    """
    Lb, kb, mask, unbatched = _prepare(L, k, mask)
    b, m, _ = Lb.shape
    device = Lb.device
    empty = torch.full((b, 0), -1, dtype=torch.long, device=device)
    if b == 0 or int(kb.max()) == 0:
        return empty[0] if unbatched else empty

    lam, vec = torch.linalg.eigh(Lb)
    lam, vec = _clean_eigvals(lam, rtol, L.dtype), vec.to(torch.float64)
    rank = (lam > 0).sum(-1)
    if clamp_k:
        kb = torch.minimum(kb, rank)
        if int(kb.max()) == 0:
            return empty[0] if unbatched else empty
    kmax = int(kb.max())
    bad = kb > rank
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"k={int(kb[i])} exceeds the numerical rank {int(rank[i])} of L (batch row {i}); "
            "no k-subset has positive determinant. Pass clamp_k=True or clamp k with kdpp_rank(L, mask)."
        )

    # Phase 1 (Alg. 8): choose k eigen-indices J with P(J) ∝ prod_{j in J} lam_j. Drawing the
    # largest remaining index n directly, P(n | l left, n < N) ∝ lam_n e_{l-1}(lam_{<n}), is the
    # backward recursion with its Bernoulli skips collapsed into one categorical draw per step.
    # log_w[:, l-1, n] = log(lam_n e_{l-1}(lam_{<n})) and e_l(lam_{<=n}) = cumsum_n w[:, l-1]. Log-space
    # is required: for m ~ 200 these values span far more than float64's range within one level.
    log_lam = lam.log()
    log_w = lam.new_empty(b, kmax, m)
    log_e = torch.zeros_like(lam)  # log e_0(lam_{<n}) = 0
    for l in range(kmax):
        log_w[:, l] = log_lam + log_e
        log_e = torch.cat([log_e.new_full((b, 1), float("-inf")), log_w[:, l, :-1].logcumsumexp(-1)], -1)
    u = 1.0 - torch.rand(b, 2 * kmax, generator=generator, device=device, dtype=torch.float64)
    pos = torch.arange(m, device=device)
    upper = torch.full_like(kb, m)  # eigen-indices still allowed: pos < upper
    cols = torch.zeros(b, kmax, dtype=torch.long, device=device)
    for t in range(kmax):
        left = kb - t
        lw = log_w.gather(1, (left - 1).clamp_min(0).view(b, 1, 1).expand(b, 1, m)).squeeze(1)
        lw = torch.where((pos < upper.unsqueeze(-1)) & (left > 0).unsqueeze(-1), lw, float("-inf"))
        cols[:, t] = _inverse_cdf((lw - lw.amax(-1, keepdim=True).clamp_min(-1e300)).exp(), u[:, t])
        upper = torch.where(left > 0, cols[:, t], upper)

    # Phase 2 (Alg. 1): projection DPP with kernel V V^T, V = selected eigenvectors.
    live = torch.arange(kmax, device=device) < kb.unsqueeze(-1)
    V = vec.gather(2, cols.unsqueeze(1).expand(b, m, kmax)) * live.unsqueeze(1)
    out = _sequential_gram_schmidt(V @ V.transpose(1, 2), kb, mask, u[:, kmax:], torch.zeros_like(lam[:, 0]))
    out = torch.where(out < 0, m, out).sort(-1).values
    out = torch.where(out == m, -1, out)
    return out[0] if unbatched else out


def greedy_map_dpp(L: torch.Tensor, k: KType, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy MAP (non-exact) k-DPP inference: approximately maximise ``log det(L_Y)``.

    Fast greedy of Chen et al. (2018): each step adds the item with the largest
    marginal gain in ``det(L_Y)`` (its Cholesky residual), in ``O(k m^2)`` batched.
    This is deterministic and not a sample from the k-DPP.

    Args:
        L: ``[m, m]`` or ``[b, m, m]`` symmetric PSD kernel.
        k: int or ``[b]`` LongTensor, ``0 <= k_i <= m``.
        mask: optional ``[m]`` / ``[b, m]`` bool of valid items.

    Returns:
        ``[k]`` or ``[b, max(k)]`` LongTensor of distinct indices in greedy
        (decreasing-gain) order, right-padded with ``-1`` where ``k_i < max(k)``
        or where every remaining item would make ``L_Y`` numerically singular
        (residual ``<= m * eps(L.dtype) * max diag(L)``).
    """
    Lb, kb, mask, unbatched = _prepare(L, k, mask)
    Lb = Lb.to(torch.float64)
    floor = Lb.shape[-1] * torch.finfo(L.dtype).eps * torch.diagonal(Lb, dim1=-2, dim2=-1).amax(-1)
    out = _sequential_gram_schmidt(Lb, kb, mask, None, floor)
    return out[0] if unbatched else out
