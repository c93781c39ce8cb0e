"""Tests for recbole_mdcns.dpp: exactness against brute-force enumeration and edge cases."""

import itertools
from collections import Counter

import pytest
import torch

from recbole_mdcns.dpp import greedy_map_dpp, kdpp_rank, sample_k_dpp

# Expected TV distance for n draws over s subsets is about sqrt(s / (2 pi n)); for s <= 20 and
# n = 20000 that is <= 0.013, so 0.03 leaves > 2x slack (runs are seeded, hence deterministic).
N_DRAWS = 20000
TV_BOUND = 0.03


def _kernel(m, rank=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, rank or m, generator=g, dtype=torch.float64)
    return (X @ X.T).to(dtype)


def _brute_force(L, k, items):
    """Exact k-DPP law over k-subsets of ``items`` (tuples of sorted indices)."""
    subsets = list(itertools.combinations(items, k))
    dets = torch.stack([torch.linalg.det(L.double()[list(s)][:, list(s)]) for s in subsets]).clamp_min(0)
    return subsets, dets / dets.sum()


def _tv(samples, subsets, probs):
    counts = Counter(map(tuple, samples.tolist()))
    assert set(counts) <= set(subsets), "sampled a subset outside the support"
    emp = torch.tensor([counts[s] for s in subsets], dtype=torch.float64) / samples.shape[0]
    return 0.5 * (emp - probs).abs().sum().item()


@pytest.mark.parametrize("m,k", [(4, 1), (4, 2), (5, 3), (6, 3), (6, 5)])
def test_matches_brute_force(m, k):
    L = _kernel(m, seed=m * 10 + k)
    S = sample_k_dpp(L.expand(N_DRAWS, m, m), k, generator=torch.Generator().manual_seed(k))
    assert S.shape == (N_DRAWS, k)
    assert _tv(S, *_brute_force(L, k, range(m))) < TV_BOUND


def test_float32_matches_brute_force():
    L = _kernel(5, seed=3, dtype=torch.float32)
    S = sample_k_dpp(L.expand(N_DRAWS, 5, 5), 2, generator=torch.Generator().manual_seed(0))
    assert _tv(S, *_brute_force(L, 2, range(5))) < TV_BOUND


def test_rank_deficient_kernel_within_rank():
    L = _kernel(6, rank=3, seed=1)
    S = sample_k_dpp(L.expand(N_DRAWS, 6, 6), 3, generator=torch.Generator().manual_seed(0))
    assert _tv(S, *_brute_force(L, 3, range(6))) < TV_BOUND


def test_batched_heterogeneous_rows_and_mask():
    m = 6
    valid = torch.tensor([True, False, True, True, False, True])
    kernels = [_kernel(m, seed=1), _kernel(m, seed=2), _kernel(m, seed=3)]
    kernels[2] = kernels[2] + 50.0 * ~(valid[:, None] & valid[None, :])  # garbage in padded entries
    ks = [2, 3, 1]
    masks = [torch.ones(m, dtype=torch.bool), torch.ones(m, dtype=torch.bool), valid]
    rows = torch.arange(3 * N_DRAWS) % 3
    L = torch.stack(kernels)[rows]
    k = torch.tensor(ks)[rows]
    mask = torch.stack(masks)[rows]
    S = sample_k_dpp(L, k, generator=torch.Generator().manual_seed(0), mask=mask)
    assert S.shape == (3 * N_DRAWS, 3)
    for r in range(3):
        Sr = S[rows == r]
        assert (Sr[:, ks[r]:] == -1).all()
        items = masks[r].nonzero().flatten().tolist()
        assert _tv(Sr[:, : ks[r]], *_brute_force(kernels[r], ks[r], items)) < TV_BOUND


def test_scale_invariance_and_large_m_without_overflow():
    L = _kernel(5, seed=6)
    S = sample_k_dpp((1e150 * L).expand(N_DRAWS, 5, 5), 3, generator=torch.Generator().manual_seed(0))
    assert _tv(S, *_brute_force(L, 3, range(5))) < TV_BOUND
    m = 200
    Q = torch.linalg.qr(torch.randn(4, m, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    L = (Q * torch.logspace(-6, 8, m, dtype=torch.float64)) @ Q.transpose(1, 2)  # e_150 ~ 1e1000 unscaled
    S = sample_k_dpp(L, torch.tensor([150, 100, 1, 0]), generator=torch.Generator().manual_seed(0))
    for s, ki in zip(S, [150, 100, 1, 0]):
        assert s[s >= 0].unique().numel() == ki and (s[ki:] == -1).all()


def test_valid_distinct_sorted_indices_within_mask():
    b, m = 64, 30
    g = torch.Generator().manual_seed(0)
    X = torch.randn(b, m, 8, generator=g)
    L = X @ X.transpose(1, 2)
    n_valid = torch.randint(8, m + 1, (b,), generator=g)
    mask = torch.rand(b, m, generator=g).argsort(-1) < n_valid[:, None]
    k = torch.randint(0, 9, (b,), generator=g)
    S = sample_k_dpp(L, k, generator=g, mask=mask)
    assert S.shape == (b, int(k.max())) and S.dtype == torch.long
    for s, ki, mi in zip(S, k, mask):
        sel = s[: int(ki)]
        assert (s[int(ki):] == -1).all()
        assert (sel[1:] > sel[:-1]).all()  # sorted and distinct
        assert mi[sel].all()


def test_deterministic_under_seed():
    L = _kernel(20, rank=12, seed=0).expand(32, 20, 20)
    a = sample_k_dpp(L, 5, generator=torch.Generator().manual_seed(7))
    b = sample_k_dpp(L, 5, generator=torch.Generator().manual_seed(7))
    c = sample_k_dpp(L, 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_k_zero_and_k_equals_m():
    L = _kernel(5)
    assert sample_k_dpp(L, 0).shape == (0,)
    assert sample_k_dpp(L.expand(3, 5, 5), 0).shape == (3, 0)
    assert torch.equal(sample_k_dpp(L, 5), torch.arange(5))


def test_k_above_rank_raises_and_clamps():
    L = _kernel(6, rank=2, seed=4)
    assert int(kdpp_rank(L)) == 2
    with pytest.raises(ValueError, match=r"k=3 exceeds the numerical rank 2 of L \(batch row 0\)"):
        sample_k_dpp(L, 3)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    Lb = _kernel(6, seed=5).expand(2, 6, 6)
    assert kdpp_rank(Lb, mask).tolist() == [6, 3]
    with pytest.raises(ValueError, match=r"k=4 exceeds the numerical rank 3 of L \(batch row 1\)"):
        sample_k_dpp(Lb, 4, mask=mask)
    k = torch.minimum(torch.tensor([4, 4]), kdpp_rank(Lb, mask))
    S = sample_k_dpp(Lb, k, mask=mask)
    assert S[1, :3].tolist() == [0, 1, 2] and S[1, 3] == -1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_k_dpp(Lb, 4, mask=mask, clamp_k=True, generator=g1),
                       sample_k_dpp(Lb, k, mask=mask, generator=g2))  # clamp_k == clamping with kdpp_rank
    assert sample_k_dpp(torch.zeros(2, 3, 3), 2, clamp_k=True).shape == (2, 0)
    with pytest.raises(ValueError, match="k must lie in"):
        sample_k_dpp(L, 7)


def _naive_greedy(L, k):
    chosen = []
    for _ in range(k):
        rest = [i for i in range(L.shape[0]) if i not in chosen]
        gains = [torch.linalg.det(L[chosen + [i]][:, chosen + [i]]) for i in rest]
        chosen.append(rest[int(torch.stack(gains).argmax())])
    return chosen


@pytest.mark.parametrize("seed", range(4))
def test_greedy_map_matches_naive_greedy(seed):
    m = 6
    L = _kernel(m, seed=100 + seed)
    for k in range(1, m + 1):
        assert greedy_map_dpp(L, k).tolist() == _naive_greedy(L, k)
    best = max(itertools.combinations(range(m), 1), key=lambda s: L[s[0], s[0]])
    assert greedy_map_dpp(L, 1).tolist() == list(best)


def test_greedy_map_batched_mask_and_rank_stop():
    L = torch.stack([_kernel(6, rank=2, seed=1), _kernel(6, seed=2)]).float()
    mask = torch.tensor([[True] * 6, [False, True, True, True, True, False]])
    out = greedy_map_dpp(L, torch.tensor([4, 3]), mask=mask)
    assert out.shape == (2, 4)
    assert (out[0, 2:] == -1).all() and (out[0, :2] >= 0).all()  # stops at rank 2
    sel = out[1, :3]
    assert out[1, 3] == -1 and mask[1][sel].all() and len(set(sel.tolist())) == 3
    assert torch.linalg.det(L[1].double()[sel][:, sel]) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_brute_force():
    L = _kernel(5, seed=9)
    g = torch.Generator(device="cuda").manual_seed(0)
    S = sample_k_dpp(L.cuda().expand(N_DRAWS, 5, 5), 2, generator=g)
    assert S.is_cuda
    assert _tv(S.cpu(), *_brute_force(L, 2, range(5))) < TV_BOUND
