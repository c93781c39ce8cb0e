"""Tests for neg_sampler=divns: tensor units, the module's training step, checkpoints, runs."""
from __future__ import annotations

import collections
import copy
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from recbole.data import create_dataset
from recbole.utils import get_model

import recbole_mdcns
from recbole_mdcns.config import create_config, packaged_yaml
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.diagnostics import item_representation, negative_stats
from recbole_mdcns.methods.divns import (
    Q_DENOMINATOR_FLOOR,
    DiverseSets,
    DivNSModule,
    RunnerUpCache,
    compact_unique,
    diversity_kernel,
    distinct_slots,
    hard_and_runner_ups,
    median_bandwidth,
    pick_slots,
    pool_diverse,
    synthesis_is_exact,
    refresh_diverse_sets,
    synthesize_scores,
)
from recbole_mdcns.methods.dns import DNSModule
from recbole_mdcns.losses import LOSSES, bpr_loss
from recbole_mdcns import scoring
from recbole_mdcns.scoring import DotScorer, PredictScorer

from conftest import tiny_config
from real_batches import sampler_setup

# --------------------------------------------------------------------------- cache


def _row_set(cache: RunnerUpCache, user: int) -> list[int]:
    return sorted(cache.items[user, : int(cache.size[user])].tolist())


def test_cache_dedups_bounds_and_grows():
    cache = RunnerUpCache(4)
    cache.add(torch.tensor([0, 0, 0, 2]), torch.tensor([5, 5, 6, 7]))
    assert cache.n_users == 3  # grown to the largest user id
    assert _row_set(cache, 0) == [5, 6] and _row_set(cache, 1) == [] and _row_set(cache, 2) == [7]
    cache.add(torch.tensor([0, 0]), torch.tensor([6, 0]))  # already present / padding id: nothing changes
    assert cache.count.tolist() == [2, 0, 1]
    cache.add(torch.tensor([0, 0, 0]), torch.tensor([8, 9, 10]))  # 5 distinct ids, bound 4: ring overwrites
    assert cache.count[0] == 5 and cache.size[0] == 4
    assert sorted(cache.items[0].tolist()) == [6, 8, 9, 10]
    cache.add(torch.zeros(7, dtype=torch.long), torch.arange(20, 27))  # > cap new ids in one call
    row = cache.items[0].tolist()
    assert len(set(row)) == 4 and set(row) <= set(range(20, 27))
    cache.clear()
    assert int(cache.size.sum()) == 0 and not cache.items.any()


def test_cache_merge_is_union_deduplicated_and_bounded():
    a, b = RunnerUpCache(3, n_users=2), RunnerUpCache(3, n_users=2)
    a.add(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 9]))
    b.add(torch.tensor([0, 0, 0]), torch.tensor([2, 3, 4]))
    merged = RunnerUpCache(3, n_users=2)  # the ranks' layout
    merged.merge(torch.stack([a.data, b.data]), torch.stack([a.count, b.count]))
    assert merged.size.tolist() == [3, 1]
    assert set(merged.items[0].tolist()) <= {1, 2, 3, 4} and len(set(merged.items[0].tolist())) == 3
    assert merged.items[1].tolist() == [9, 0, 0]


def test_compact_unique_keeps_first_occurrences_in_order():
    items = torch.tensor([[4, 2, 4, 7, 2, 9], [3, 3, 3, 0, 0, 0]])
    valid = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    out, size = compact_unique(items, valid, 3)
    assert out.tolist() == [[4, 2, 7], [3, 0, 0]] and size.tolist() == [3, 1]


def test_hard_and_runner_ups_are_ranks_1_and_2_to_r_plus_1():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2], [3.0, 1.0, 2.0, 0.0, -1.0]])
    hard, runners = hard_and_runner_ups(scores, 2)
    assert hard.tolist() == [1, 0] and runners.tolist() == [[3, 2], [2, 1]]


# --------------------------------------------------------------------------- kernel and refresh


def _hand_kernel(emb, hard, kernel, gamma, alpha):
    m = len(emb)

    def cos(x, y):
        return sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))

    q = [1.0 / (1.0 + alpha * sum(cos(emb[a], h) for h in hard) / len(hard)) for a in range(m)]
    out = [[0.0] * m for _ in range(m)]
    for i in range(m):
        for j in range(m):
            if kernel == "rbf":
                s = math.exp(-gamma * sum((x - y) ** 2 for x, y in zip(emb[i], emb[j])))
            else:
                s = cos(emb[i], emb[j])
            out[i][j] = q[i] * s * q[j]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kernel,gamma,alpha", [("rbf", 1.0, 1.0), ("rbf", 0.3, 0.5), ("cosine", 1.0, 0.8)])
def test_kernel_matches_hand_computation(kernel, gamma, alpha):
    g = torch.Generator().manual_seed(1)
    emb, hard = torch.randn(4, 3, generator=g), torch.randn(2, 3, generator=g) + 1.0
    got = diversity_kernel(emb, hard, kernel, gamma, alpha)
    expected = _hand_kernel(emb.tolist(), hard.tolist(), kernel, gamma, alpha)
    assert got.dtype == torch.float64 and torch.allclose(got, expected, atol=1e-10)
    assert torch.linalg.eigvalsh(got).min() > -1e-10  # PSD


def test_kernel_q_denominator_is_floored():
    """alpha * mean cos <= -1 would make q infinite or negative: q is capped at 1 / floor instead."""
    emb, hard = torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    L = diversity_kernel(emb, hard, "cosine", alpha=2.0)
    assert L[0, 0] == pytest.approx(1 / Q_DENOMINATOR_FLOOR ** 2) and L[1, 1] == pytest.approx(1.0)


def test_kernel_batched_masks_padding():
    g = torch.Generator().manual_seed(2)
    emb, hard = torch.randn(2, 4, 3, generator=g), torch.randn(2, 3, 3, generator=g)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    hard_mask = torch.tensor([[True, False, False], [True, True, True]])
    L = diversity_kernel(emb, hard, "rbf", 1.0, 1.0, mask, hard_mask)
    assert torch.allclose(L[0, :3, :3], diversity_kernel(emb[0, :3], hard[0, :1]))
    assert not L[0, 3].any() and not L[0, :, 3].any()
    assert torch.allclose(L[1], diversity_kernel(emb[1], hard[1]))


def test_refresh_k_is_min_of_hard_cache_and_rank():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(30, 2, generator=g)  # cosine kernel of 2-d embeddings: rank <= 2
    cache = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0], [11, 12, 0, 0, 0, 0], [13, 14, 15, 0, 0, 0]])
    cache_size = torch.tensor([6, 4, 2, 3])
    hard = torch.tensor([[20, 21, 22], [23, 0, 0], [24, 25, 26], [0, 0, 0]])
    hard_size = torch.tensor([3, 1, 3, 0])
    for kernel, expected in (("cosine", [2, 1, 2, 0]), ("rbf", [3, 1, 2, 0])):
        for mode in ("exact", "greedy"):
            sets = refresh_diverse_sets(emb, cache, cache_size, hard, hard_size, kernel=kernel, mode=mode,
                                        generator=torch.Generator().manual_seed(3), chunk=2)
            assert sets.size.tolist() == expected, (kernel, mode)
            assert len(sets.ids) == sum(expected)  # ragged: the sets take what they hold
            diverse, valid = sets.rows(torch.arange(4))
            for u in range(4):
                ids = diverse[u, valid[u]].tolist()
                assert len(set(ids)) == len(ids) == expected[u]
                assert set(ids) <= set(cache[u, : int(cache_size[u])].tolist())


def test_refresh_never_picks_two_identical_items():
    """det(L_Y) = 0 when Y holds two items with the same embedding: an exact k-DPP never draws both."""
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]])
    users = 400
    cache = torch.tensor([[1, 2, 3, 4]]).expand(users, 4)
    hard = torch.tensor([[3, 4]]).expand(users, 2)
    sets = refresh_diverse_sets(emb, cache, torch.full((users,), 4), hard, torch.full((users,), 2),
                                kernel="rbf", generator=torch.Generator().manual_seed(0))
    assert (sets.size == 2).all()
    pairs = {tuple(sorted(row)) for row in sets.ids.view(users, 2).tolist()}
    assert (1, 2) not in pairs and len(pairs) >= 3  # random, yet never the duplicate pair


# --------------------------------------------------------------------------- on sequences: tensor units


def test_cache_with_per_user_bounds_is_ragged():
    cache = RunnerUpCache(6, n_users=3)
    cache.add(torch.tensor([0, 1, 1]), torch.tensor([4, 5, 6]))
    cache.set_capacities(torch.tensor([1, 6, 2]))  # held ids survive up to the new bounds
    assert cache.data.numel() == 9 and cache.offset.tolist() == [0, 1, 7]  # memory: the sum of the bounds
    assert _row_set(cache, 0) == [4] and _row_set(cache, 1) == [5, 6]
    cache.add(torch.tensor([2, 2, 2, 0, 1]), torch.tensor([7, 8, 9, 3, 5]))  # user 2: 3 ids, bound 2: ring
    assert cache.size.tolist() == [1, 2, 2] and cache.count.tolist() == [2, 2, 3]
    assert set(_row_set(cache, 2)) <= {7, 8, 9} and _row_set(cache, 0) == [3]  # bound 1: the newest id
    assert cache.items.shape == (3, 6) and cache.rows(torch.tensor([2]), 3)[0, 2] == 0
    other = RunnerUpCache(6, n_users=3)
    other.set_capacities(torch.tensor([1, 6, 2]))
    other.add(torch.tensor([1, 1]), torch.tensor([6, 11]))
    merged = RunnerUpCache(6, n_users=3)
    merged.set_capacities(torch.tensor([1, 6, 2]))
    merged.merge(torch.stack([cache.data, other.data]), torch.stack([cache.count, other.count]))
    assert _row_set(merged, 1) == [5, 6, 11] and merged.size.tolist() == [1, 3, 2]
    restored = RunnerUpCache(6)
    restored.load_state_dict(merged.state_dict())
    assert torch.equal(restored.data, merged.data) and torch.equal(restored.cap, merged.cap)
    smaller = RunnerUpCache(2)  # resumed with a lower bound: re-compacted to it
    smaller.load_state_dict(merged.state_dict())
    assert smaller.cap.tolist() == [1, 2, 2] and smaller.size.tolist() == [1, 2, 2]
    with pytest.raises(ValueError, match="bounds"):
        cache.set_capacities(torch.tensor([0, 1, 7]))


def test_median_bandwidth_fixes_the_kernel_scale():
    g = torch.Generator().manual_seed(4)
    emb, hard = torch.randn(7, 5, generator=g), torch.randn(2, 5, generator=g)
    L = diversity_kernel(emb, hard, "rbf", "median", alpha=0.0)  # alpha 0: q = 1, L = S
    off = L[torch.ones(7, 7, dtype=torch.bool).triu(1)]
    assert off.median().item() == pytest.approx(math.exp(-1))  # the median pair sits at exp(-1)
    scaled = diversity_kernel(emb * 0.05, hard, "rbf", "median")
    assert torch.allclose(scaled, diversity_kernel(emb, hard, "rbf", "median"))  # whatever the scale
    assert diversity_kernel(emb * 0.05, hard, "rbf", 1.0, alpha=0.0).min() > 0.9  # gamma 1 on small vectors: flat
    d2 = torch.zeros(1, 3, 3, dtype=torch.float64)
    assert median_bandwidth(d2, torch.ones(1, 3, dtype=torch.bool)).item() == 1.0  # no pair at distance > 0
    mask = torch.tensor([[True, True, False, False, False, False, False]])
    batched = diversity_kernel(emb.unsqueeze(0), hard.unsqueeze(0), "rbf", "median", 0.0, mask)
    assert batched[0, 0, 1].item() == pytest.approx(math.exp(-1))  # one valid pair: its own median


def test_pick_slots_top_score_and_uniform():
    valid = torch.tensor([[True, True, True, False]] * 6000)
    scores = torch.tensor([[0.0, math.log(3.0), 0.5, 100.0]]).expand(6000, 4)
    users = torch.arange(6000)
    assert (pick_slots(users, valid, scores, "top") == 1).all()  # the padded slot's score is ignored
    torch.manual_seed(0)
    counts = torch.bincount(pick_slots(users, valid, scores, "score"), minlength=4).float() / 6000
    expected = torch.softmax(torch.tensor([0.0, math.log(3.0), 0.5]), 0)
    assert torch.allclose(counts[:3], expected, atol=0.02) and counts[3] == 0
    counts = torch.bincount(pick_slots(users, valid, None, "uniform"), minlength=4).float() / 6000
    assert torch.allclose(counts[:3], torch.full((3,), 1 / 3), atol=0.02) and counts[3] == 0
    with pytest.raises(ValueError, match="divns_diverse_pick"):
        pick_slots(users, valid, scores, "best")


def test_distinct_slots_pair_a_users_rows_one_to_one():
    users = torch.tensor([5, 7, 5, 5, 7, 9])
    inf = float("-inf")
    preference = torch.tensor([[3.0, 2.0, inf], [1.0, 2.0, 3.0], [3.0, 2.0, inf], [3.0, 2.0, inf],
                               [1.0, 2.0, 3.0], [inf, inf, inf]])
    slot = distinct_slots(users, preference)
    assert slot[[0, 2]].tolist() == [0, 1]   # user 5: best, then the next best
    assert slot[3] == 0                       # both of its items taken: it starts again
    assert slot[[1, 4]].tolist() == [2, 1]   # user 7
    assert slot[5] == 0                       # no item: the caller marks the row as without one
    assert (pick_slots(users, preference.isfinite(), preference, "top", "independent")[[0, 2, 3]] == 0).all()
    ranked = pick_slots(torch.zeros(50, dtype=torch.long), torch.ones(50, 50, dtype=torch.bool), None, "uniform",
                        "distinct")
    assert sorted(ranked.tolist()) == list(range(50))  # 50 rows of one user, 50 items: a permutation


# --------------------------------------------------------------------------- synthesis and statistics


def test_synthesize_scores_equals_dot_with_mixed_embedding_and_falls_back():
    g = torch.Generator().manual_seed(0)
    h, e_hard, e_div = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    e_div.requires_grad_(True)
    has = torch.tensor([True, True, False, True, False])
    lam = 0.7
    got = synthesize_scores((h * e_hard).sum(1), (h * e_div).sum(1), lam, has)
    exact = (h * (lam * e_hard + (1 - lam) * e_div)).sum(1)
    assert torch.allclose(got[has], exact[has], atol=1e-6)
    assert torch.equal(got[~has], (h * e_hard).sum(1)[~has])  # plain DNS rows
    got.sum().backward()
    assert not e_div.grad[~has].any() and e_div.grad[has].abs().sum() > 0


def test_negative_stats():
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    same = negative_stats(emb, torch.tensor([1, 1, 1]))
    assert same["mean_pairwise_cosine_distance"] == 0.0 and same["catalogue_fraction"] == pytest.approx(1 / 3)
    two = negative_stats(emb, torch.tensor([1, 2] * 50), n_pairs=20000, generator=torch.Generator().manual_seed(0))
    assert two["mean_pairwise_cosine_distance"] == pytest.approx(0.5, abs=0.02)  # orthogonal half the time
    assert two["unique"] == 2 and two["negatives"] == 100
    assert math.isnan(negative_stats(emb, torch.tensor([0]))["mean_pairwise_cosine_distance"])


# --------------------------------------------------------------------------- the module on real batches


def _setup(model_name, tiny_data, tmp_path, **overrides):
    return sampler_setup(model_name, "divns", tiny_data, tmp_path, **overrides)


@pytest.fixture(scope="module")
def sasrec(tiny_data, tmp_path_factory):
    return _setup("SASRec", tiny_data, tmp_path_factory.mktemp("sasrec"))


@pytest.fixture(scope="module")
def fpmc(tiny_data, tmp_path_factory):
    return _setup("FPMC", tiny_data, tmp_path_factory.mktemp("fpmc"))


def _one_diverse_item_per_user(module, batch, offset=1, size=None):
    """Give every user a diverse set of one known item (not its row's candidates' top-1); returns the ids."""
    n_users = int(batch[module.model.USER_ID].max()) + 1
    ids = (torch.arange(n_users) * 7 + offset) % (module.model.n_items - 1) + 1
    size = torch.ones(n_users, dtype=torch.long) if size is None else size
    module.diverse = DiverseSets.from_dense(ids.unsqueeze(1), size)
    return ids


def test_epoch0_is_dns_and_records_ids(sasrec):
    config, model, optimizer, batch, _ = sasrec
    model.eval()  # no dropout: both modules see the same scores
    divns, dns = DivNSModule(model, optimizer, config), DNSModule(model, optimizer, config)
    assert torch.allclose(divns.training_loss(batch), dns.training_loss(batch))
    assert divns.synthetic_rows == 0 and divns.rows == len(batch)
    # H_u / C_u hold item ids (never pool positions) of ranks 1 and 2..r+1
    candidates, users = batch[CANDIDATES], batch[model.USER_ID]
    with torch.no_grad():
        scores = DotScorer(model)(model, batch, candidates)
    order = scores.argsort(1, descending=True)
    ranked = candidates.gather(1, order)
    for u in users.unique().tolist():
        rows = users == u
        assert set(_row_set(divns.hard, u)) == set(ranked[rows, 0].tolist())
        runners = {i for row in ranked[rows] for i in row[1:3].tolist() if i not in row[:1].tolist()}
        if len(runners) <= divns.cache.capacity:
            assert set(_row_set(divns.cache, u)) == runners
    assert divns.negative_counts.sum() == len(batch)


@pytest.mark.parametrize("neg_loss", ["bpr", "bce"])
def test_synthesis_is_exact_for_dot_scorer(sasrec, neg_loss):
    config, model, optimizer, batch, _ = sasrec
    model.eval()
    module = DivNSModule(model, optimizer, config)
    module.loss_fn = LOSSES[neg_loss]
    users = batch[model.USER_ID]
    size = torch.ones(int(users.max()) + 1, dtype=torch.long)
    size[users[0]] = 0  # this user's rows fall back to DNS
    diverse_ids = _one_diverse_item_per_user(module, batch, size=size)
    loss = module.training_loss(batch)
    with torch.no_grad():
        h = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
        candidates = batch[CANDIDATES]
        hard = candidates.gather(1, torch.einsum("bd,bkd->bk", h, model.item_embedding(candidates)).argmax(1, True))
        e_hard = model.item_embedding(hard.squeeze(1))
        e_div = model.item_embedding(diverse_ids[users])
        has = users != users[0]
        lam = config["divns_lambda"]
        e_syn = torch.where(has.unsqueeze(1), lam * e_hard + (1 - lam) * e_div, e_hard)
        pos = (h * model.item_embedding(batch[model.POS_ITEM_ID])).sum(1)
        expected = LOSSES[neg_loss](pos, (h * e_syn).sum(1))
    assert torch.allclose(loss, expected, atol=1e-6)
    assert module.synthetic_rows == int(has.sum()) > 0
    loss.backward()  # gradients reach the diverse items' embeddings
    grad = model.item_embedding.weight.grad
    assert grad[diverse_ids[users[has]]].abs().sum() > 0
    model.zero_grad()


def test_which_scorers_mix_exactly():
    assert all(synthesis_is_exact(cls.__new__(cls)) for cls in (
        DotScorer, scoring.BERT4RecScorer, scoring.S3RecScorer, scoring.SHANScorer, scoring.NPEScorer,
        scoring.HGNScorer, scoring.FPMCScorer))
    assert not synthesis_is_exact(scoring.TransRecScorer.__new__(scoring.TransRecScorer))
    assert not synthesis_is_exact(PredictScorer())


def test_generic_path_uses_documented_score_mix(fpmc, monkeypatch):
    """FPMC without its one-pass scorer goes through predict(): the fallback score mix."""
    monkeypatch.delitem(scoring.MODEL_SCORERS, "FPMC")
    config, model, optimizer, batch, _ = fpmc
    model.eval()
    module = DivNSModule(model, optimizer, config)
    diverse_ids = _one_diverse_item_per_user(module, batch, offset=3)
    loss = module.training_loss(batch)
    assert isinstance(module.scorers["self"], PredictScorer)
    users = batch[model.USER_ID]
    scorer = PredictScorer()
    with torch.no_grad():
        candidates = batch[CANDIDATES]
        hard = candidates.gather(1, scorer(model, batch, candidates).argmax(1, True))
        s = scorer(model, batch, torch.cat([batch[model.POS_ITEM_ID].unsqueeze(1), hard,
                                            diverse_ids[users].unsqueeze(1)], 1))
        lam = config["divns_lambda"]
        expected = bpr_loss(s[:, 0], lam * s[:, 1] + (1 - lam) * s[:, 2])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert item_representation(model).shape == (model.n_items, 3 * model.embedding_size)  # IU, LI, IL tables
    one_pass = scoring.FPMCScorer(model)  # with its one-pass scorer: the vectors it scores, [IU, IL]
    assert torch.equal(item_representation(model, one_pass),
                       torch.cat([model.IU_emb.weight, model.IL_emb.weight], 1))


def test_refresh_then_state_roundtrip(sasrec):
    config, model, optimizer, batch, _ = sasrec
    module = DivNSModule(model, optimizer, config)
    module.training_loss(batch)
    state_before = {k: v.clone() for k, v in (("c", module.cache.items), ("h", module.hard.items))}
    ckpt = {}
    module.on_save_checkpoint(ckpt)  # mid-epoch: the caches themselves are saved
    fresh = DivNSModule(model, optimizer, config)
    fresh.on_load_checkpoint(ckpt)
    assert torch.equal(fresh.cache.items, state_before["c"]) and torch.equal(fresh.hard.items, state_before["h"])
    assert torch.equal(fresh.negative_counts, module.negative_counts)
    record = module.refresh(0)
    assert record["diverse_users"] == int((module.diverse.size > 0).sum()) > 0
    assert int(module.cache.size.sum()) == 0 and int(module.hard.size.sum()) == 0  # cleared after the refresh
    k_bound = torch.minimum(fresh.cache.size, fresh.hard.size)
    assert (module.diverse.size <= k_bound).all() and (module.diverse.size[k_bound > 0] > 0).all()
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    fresh.on_load_checkpoint(ckpt)
    assert all(torch.equal(getattr(fresh.diverse, f), getattr(module.diverse, f)) for f in ("ids", "offset", "size"))
    assert fresh.negative_history == module.negative_history


def _changed(config, **values):
    """A copy of a RecBole ``Config`` with ``values`` set."""
    config = copy.deepcopy(config)
    for key, value in values.items():
        config[key] = value
    return config


def _with_sets(module, users, per_user: int):
    """Give every user a diverse set of ``per_user`` distinct known items."""
    n_users = int(users.max()) + 1
    ids = (torch.arange(n_users).unsqueeze(1) * 5 + torch.arange(per_user)) % (module.model.n_items - 1) + 1
    module.diverse = DiverseSets.from_dense(ids, torch.full((n_users,), per_user))
    return ids


def test_pick_top_follows_each_rows_representation(sasrec):
    config, model, optimizer, batch, _ = sasrec
    model.eval()
    module = DivNSModule(model, optimizer, _changed(config, divns_diverse_pick="top"))
    users = batch[model.USER_ID]
    ids = _with_sets(module, users, 6)
    scorer = module.scorer_for("self", model, batch)
    h = scorer.encode(model, batch)
    picked, has = module.pick_diverse(users, batch, h, scorer)
    with torch.no_grad():
        expected = ids[users].gather(1, torch.einsum("bd,bkd->bk", h, model.item_embedding(ids[users])).argmax(1, True))
    assert has.all() and torch.equal(picked, expected.squeeze(1))
    rows_of = {u: picked[users == u].unique().numel() for u in users.unique().tolist() if (users == u).sum() > 1}
    assert rows_of and max(rows_of.values()) > 1  # one user, several rows, several "best" diverse items


def test_distinct_pairing_and_rows_bound(sasrec):
    config, model, optimizer, batch, train_data = sasrec
    model.eval()
    module = DivNSModule(model, optimizer, _changed(config, divns_pairing="distinct", divns_cache_bound="rows",
                                                    divns_cache_size=12))
    users = batch[model.USER_ID]
    _with_sets(module, users, 2)
    picked, _ = module.pick_diverse(users, batch)
    for u in users.unique().tolist():
        assert picked[users == u].unique().numel() == min(int((users == u).sum()), 2)  # one-to-one where possible
    rows = torch.zeros(train_data._dataset.user_num, dtype=torch.long)
    epoch = list(train_data)
    for b in epoch:
        rows += torch.bincount(b[model.USER_ID], minlength=len(rows))
    module.bound_by_rows(torch.bincount(train_data._dataset.inter_feat["user_id"], minlength=len(rows)))
    r, hard_bound = config["divns_cache_ratio"], 12 // config["divns_cache_ratio"]
    assert torch.equal(module.cache.cap, (r * rows).clamp(1, 12))
    assert torch.equal(module.hard.cap, rows.clamp(1, hard_bound))
    assert module.cache.data.numel() == int((r * rows).clamp(1, 12).sum()) < len(rows) * 12  # memory ~ rows
    module.diverse = DiverseSets.empty()
    inserted = collections.defaultdict(set)  # every distinct runner-up of the epoch, per user
    for b in epoch:
        module.training_loss(b)
        with torch.no_grad():
            hard, runners = hard_and_runner_ups(DotScorer(model)(model, b, b[CANDIDATES]), r)
        hard_ids = b[CANDIDATES].gather(1, hard.unsqueeze(1))
        runner_ids = b[CANDIDATES].gather(1, runners)
        for u, h_id, row in zip(b[model.USER_ID].tolist(), hard_ids.tolist(), runner_ids.tolist()):
            inserted[u].update(set(row) - set(h_id))
    fits = [u for u, ids in inserted.items() if len(ids) <= int(module.cache.cap[u])]
    assert len(fits) > 10 and all(_row_set(module.cache, u) == sorted(inserted[u]) for u in fits)  # none evicted
    full = [u for u, ids in inserted.items() if len(ids) > int(module.cache.cap[u])]
    assert full and all(int(module.cache.size[u]) == 12 for u in full)  # only the cap binds
    sets = refresh_diverse_sets(item_representation(model), module.cache, module.cache.size, module.hard,
                                module.hard.size, generator=torch.Generator().manual_seed(0))
    assert (sets.size <= torch.minimum(module.cache.size, module.hard.size)).all() and (sets.size > 0).sum() > 30


@pytest.mark.parametrize("r", [2, 4, 6])
def test_hard_bound_can_be_independent_of_r(tiny_data, tmp_path, r):
    def module(**overrides):
        config = create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp_path, neg_sampler="divns",
                                                                         divns_cache_ratio=r, **overrides))
        return DivNSModule(get_model("SASRec")(config, create_dataset(config)), None, config)

    assert module(divns_hard_size=16).hard.capacity == 16  # the cap on k = min(|H_u|, |C_u|) does not move with r
    assert module().hard.capacity == 64 // r               # the default follows r (|C_u| ~ r |H_u|)


@pytest.mark.parametrize("key,value", [("divns_cache_ratio", 10), ("divns_cache_ratio", 0), ("divns_lambda", 1.5),
                                       ("divns_kernel", "poly"), ("divns_dpp_mode", "map"), ("divns_gamma", 0),
                                       ("divns_alpha", -1), ("divns_cache_size", 0), ("top_m", 2),
                                       ("candidate_num", 1), ("divns_gamma", "mean"), ("divns_diverse_pick", "best"),
                                       ("divns_pairing", "greedy"), ("divns_cache_bound", "users"),
                                       ("divns_ablation", "no_kdpp")])
def test_validate_config_names_key(tiny_data, tmp_path, key, value):
    with pytest.raises(ValueError, match=key):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp_path, neg_sampler="divns",
                                                                **{key: value}))


def test_defaults_are_the_papers():
    with open(packaged_yaml("divns")) as f:
        defaults = yaml.safe_load(f)
    assert defaults["candidate_num"] == 10 and defaults["divns_cache_ratio"] == 2
    assert defaults["divns_lambda"] == 0.5 and defaults["divns_alpha"] == 1.0 and defaults["divns_gamma"] == 1.0
    assert defaults["divns_kernel"] == "rbf" and defaults["divns_dpp_mode"] == "exact"


# --------------------------------------------------------------------------- full runs


def _last_ckpt(root: Path) -> dict:
    (path,) = root.glob("saved/*-lightning/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and Python values


def test_sasrec_run_checkpoint_and_resume(tiny_data, tmp_path, in_tmp):
    runs = {name: tmp_path / name for name in ("full", "first", "resumed")}

    def run(name, epochs, **extra):
        return recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=tiny_config(
            tiny_data, runs[name], neg_sampler="divns", epochs=epochs, **extra))

    full = run("full", 3)
    ckpt = _last_ckpt(runs["full"])
    history = ckpt["negatives"]["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[0]["synthetic_row_fraction"] == 0.0  # epoch 0 is plain DNS
    assert history[1]["synthetic_row_fraction"] > 0.9 and history[2]["synthetic_row_fraction"] > 0.9
    assert (ckpt["divns"]["diverse"]["size"] > 0).sum() > 30
    assert 0 < history[2]["mean_pairwise_cosine_distance"] <= 2 and 0 < history[2]["catalogue_fraction"] <= 1

    run("first", 2)
    first = _last_ckpt(runs["first"])
    assert len(first["negatives"]["history"]) == 2 and (first["divns"]["diverse"]["size"] > 0).any()
    (path,) = runs["first"].glob("saved/*-lightning/last.ckpt")
    resumed = run("resumed", 3, resume_from=str(path))
    after = _last_ckpt(runs["resumed"])
    assert after["negatives"]["history"][2]["synthetic_row_fraction"] > 0.9  # continued with loaded D_u
    # a resumed run is the uninterrupted one: same weights, same diverse sets, same results
    for key, value in ckpt["state_dict"].items():
        assert torch.allclose(value, after["state_dict"][key], atol=1e-6), key
    assert all(torch.equal(ckpt["divns"]["diverse"][f], after["divns"]["diverse"][f]) for f in ("ids", "size"))
    assert resumed["test_result"] == full["test_result"]


def test_sequence_variants_train_all_positions(tiny_data, tmp_path, in_tmp, caplog):
    """Every option of 'DivNS on sequences' at once, on full-sequence batches, resumed exactly."""
    caplog.set_level(logging.INFO)
    variants = {"divns_diverse_pick": "score", "divns_pairing": "distinct", "divns_cache_bound": "rows",
                "divns_gamma": "median", "train_positions": "all", "train_window_stride": 3, "state": "INFO"}

    def run(name, epochs, **extra):
        return recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=tiny_config(
            tiny_data, tmp_path / name, neg_sampler="divns", epochs=epochs, **variants, **extra))

    full = run("full", 3)
    assert full["train_info"]["train_positions"] == "all"
    assert "divns caches bounded by each user's training rows" in caplog.text
    history = _last_ckpt(tmp_path / "full")["negatives"]["history"]
    assert history[0]["synthetic_row_fraction"] == 0.0 and history[1]["synthetic_row_fraction"] > 0.9
    assert history[1]["diverse_users"] >= 38
    run("first", 2)
    (path,) = (tmp_path / "first").glob("saved/*-lightning/last.ckpt")
    assert run("resumed", 3, resume_from=str(path))["test_result"] == full["test_result"]


def test_rows_bound_saves_memory_not_results(tiny_data, tmp_path, in_tmp):
    """A user inserts at most r n_u runner-ups and n_u hard negatives an epoch, so at one cap the bounds that
    follow the rows hold what the fixed ones hold: same training, smaller caches."""
    def run(name, bound):
        result = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=tiny_config(
            tiny_data, tmp_path / name, neg_sampler="divns", epochs=2, divns_cache_bound=bound, divns_cache_size=16))
        return result, _last_ckpt(tmp_path / name)["divns"]

    (fixed, fixed_state), (rows, rows_state) = run("fixed", "fixed"), run("rows", "rows")
    assert rows["test_result"] == fixed["test_result"]
    assert torch.equal(rows_state["diverse"]["ids"], fixed_state["diverse"]["ids"])
    assert rows_state["cache"]["data"].numel() < fixed_state["cache"]["data"].numel()


def test_fpmc_generic_path_run(tiny_data, tmp_path, in_tmp, monkeypatch, caplog):
    monkeypatch.delitem(scoring.MODEL_SCORERS, "FPMC")  # force the generic predict() path
    caplog.set_level(logging.INFO)
    result = recbole_mdcns.run_recbole("FPMC", "tiny", config_dict=tiny_config(
        tiny_data, tmp_path, neg_sampler="divns", epochs=2, divns_kernel="cosine", divns_dpp_mode="greedy",
        state="INFO"))
    history = _last_ckpt(tmp_path)["negatives"]["history"]
    assert history[1]["synthetic_row_fraction"] > 0.9
    assert math.isfinite(result["best_valid_score"])
    assert "is fallback: the mix of the two negatives' scores" in caplog.text


def test_ddp_two_cpu_processes_gather_caches(tiny_data, tmp_path):
    """Two gloo ranks: caches are all_gathered before the refresh, so the merged cache holds more
    entries than rank 0 collected itself, and rank 0's checkpoint has every user's diverse set."""
    config = tiny_config(tiny_data, tmp_path, epochs=2, train_batch_size=32)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "recbole_mdcns", "--model=SASRec", "--dataset=tiny",
           f"--config_files={tmp_path / 'tiny.yaml'}", "--neg_sampler=divns",
           "--accelerator=cpu", "--devices=2", "--strategy=ddp"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = _last_ckpt(tmp_path)
    divns, history = ckpt["divns"], ckpt["negatives"]["history"]
    assert all(h["cache_entries"] > h["cache_entries_local"] for h in history)
    assert history[1]["synthetic_row_fraction"] > 0.9
    assert (divns["diverse"]["size"] > 0).sum() >= 38  # (almost) every one of the 40 users


def test_refresh_every_k_epochs(tiny_data, in_tmp):
    """divns_refresh_every: 2 -- D_u is drawn after epochs 1 and 3 only; epochs 0-1 train plain DNS."""
    recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, in_tmp, neg_sampler="divns", epochs=4, divns_refresh_every=2, train_positions="all"))
    history = _last_ckpt(in_tmp)["negatives"]["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert ["refresh_seconds" in h for h in history] == [False, True, False, True]
    assert history[1]["synthetic_row_fraction"] == 0.0  # no D_u before the first refresh
    assert history[3]["synthetic_row_fraction"] > 0.9  # epochs 2-3 mixed with the D_u of epoch 1
    with pytest.raises(ValueError, match="divns_refresh_every"):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="divns",
                                                                divns_refresh_every=0))


# --------------------------------------------------------------------------- ablations (divns_ablation)


def test_no_dpp_draws_a_uniform_subset_of_the_cache():
    """Cache {1, 2, 3, 4}: items 1-3 share one direction, 4 is orthogonal; k = 2. The k-DPP (almost) never
    draws two of the three look-alikes; the no_dpp ablation's uniform 2-subset does so in 3 of 6 subsets."""
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.001], [1.0, -0.001], [0.0, 1.0], [0.5, 0.5], [-0.5, 0.5]])
    users = 3000
    cache = torch.tensor([[1, 2, 3, 4]]).repeat(users, 1)
    hard = torch.tensor([[5, 6]]).repeat(users, 1)
    size_c, size_h = torch.full((users,), 4), torch.full((users,), 2)
    look_alike_pairs = {}
    for mode in ("exact", "uniform"):
        sets = refresh_diverse_sets(emb, cache, size_c, hard, size_h, mode=mode,
                                    generator=torch.Generator().manual_seed(5))
        assert (sets.size == 2).all()
        drawn, _ = sets.rows(torch.arange(users))
        assert ((drawn >= 1) & (drawn <= 4)).all() and (drawn[:, 0] != drawn[:, 1]).all()
        look_alike_pairs[mode] = float((drawn != 4).all(1).float().mean())
        if mode == "uniform":
            counts = torch.bincount(drawn.flatten(), minlength=5)[1:].float() / users
            assert torch.allclose(counts, torch.full((4,), 0.5), atol=0.04)  # every item in k/m = 1/2 of the sets
    assert look_alike_pairs["exact"] < 0.01
    assert abs(look_alike_pairs["uniform"] - 0.5) < 0.04


def test_pool_diverse_is_a_uniform_runner_up_other_than_the_hard_one():
    g = torch.Generator().manual_seed(0)
    runners = torch.tensor([[4, 5, 6], [7, 7, 8], [9, 9, 9]]).repeat(2000, 1)
    hard = torch.tensor([1, 7, 9]).repeat(2000)
    diverse, has = pool_diverse(runners, hard, g)
    assert has.tolist() == [True, True, False] * 2000  # row 3: every runner-up is its hard negative
    first, second = diverse[0::3], diverse[1::3]
    assert set(first.tolist()) == {4, 5, 6} and set(second.tolist()) == {8}
    share = torch.bincount(first, minlength=7)[4:].float() / len(first)
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.04)


def _ablation(sasrec, ablation):
    config, model, optimizer, batch, _ = sasrec
    model.eval()  # no dropout: every module sees the same scores
    return DivNSModule(model, optimizer, _changed(config, divns_ablation=ablation)), model, batch


def test_no_mix_trains_on_the_hard_negative_alone(sasrec):
    """With diverse sets in place DivNS mixes; no_mix ignores them and fills no cache: its loss is DNS's."""
    config, _, optimizer, _, _ = sasrec
    module, model, batch = _ablation(sasrec, "no_mix")
    dns, divns = DNSModule(model, optimizer, config), DivNSModule(model, optimizer, config)
    _one_diverse_item_per_user(module, batch)
    _one_diverse_item_per_user(divns, batch)
    assert torch.allclose(module.training_loss(batch), dns.training_loss(batch))
    assert not torch.allclose(divns.training_loss(batch), dns.training_loss(batch))
    assert int(module.cache.size.sum()) == int(module.hard.size.sum()) == 0 and module.synthetic_rows == 0


def test_no_cache_mixes_each_row_with_its_own_runner_up_from_the_first_step(sasrec):
    module, model, batch = _ablation(sasrec, "no_cache")
    torch.manual_seed(11)
    loss = module.training_loss(batch)
    assert int(module.cache.size.sum()) == int(module.hard.size.sum()) == 0 and not bool(module.diverse.size.any())
    candidates = batch[CANDIDATES]
    scorer = module.scorers["self"]
    with torch.no_grad():
        hard_pos, runner_pos = hard_and_runner_ups(scorer(model, batch, candidates), module.cache_ratio)
    hard = candidates.gather(1, hard_pos.unsqueeze(1)).squeeze(1)
    torch.manual_seed(11)
    diverse, has = pool_diverse(candidates.gather(1, runner_pos), hard)
    assert module.synthetic_rows == int(has.sum()) > 0  # epoch 0 already mixes
    scores = scorer(model, batch, torch.stack([batch[model.POS_ITEM_ID], hard, diverse], 1))
    expected = module.loss_fn(scores[:, 0], synthesize_scores(scores[:, 1], scores[:, 2], module.lam, has))
    assert torch.allclose(loss, expected)


def test_no_dpp_refresh_is_the_uniform_draw_over_the_epochs_caches(sasrec):
    module, model, batch = _ablation(sasrec, "no_dpp")
    module.training_loss(batch)
    emb = item_representation(model, module.scorers.get("self"))
    expected = refresh_diverse_sets(emb, module.cache, module.cache.size.clone(), module.hard,
                                    module.hard.size.clone(), mode="uniform",
                                    generator=torch.Generator().manual_seed(module._epoch_seed(0)))
    module.refresh(0)
    assert module.diverse.size.sum() > 0
    assert all(torch.equal(getattr(module.diverse, f), getattr(expected, f)) for f in ("ids", "offset", "size"))


@pytest.mark.parametrize("ablation,mixed_from_epoch0,refreshes", [("no_cache", True, False), ("no_dpp", False, True),
                                                                   ("no_mix", False, False)])
def test_ablations_train_a_general_model(tiny_data, in_tmp, ablation, mixed_from_epoch0, refreshes):
    recbole_mdcns.run_recbole("LightGCN", "tiny", config_dict=tiny_config(
        tiny_data, in_tmp, neg_sampler="divns", divns_ablation=ablation, epochs=2, load_col={"inter": ["user_id", "item_id"]},
        eval_args={"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "mode": "full", "group_by": "user"}))
    history = _last_ckpt(in_tmp)["negatives"]["history"]
    assert [("refresh_seconds" in h) for h in history] == [refreshes, refreshes]
    assert (history[0]["synthetic_row_fraction"] > 0.9) == mixed_from_epoch0
    if ablation == "no_mix":
        assert history[1]["synthetic_row_fraction"] == 0.0
    else:
        assert history[1]["synthetic_row_fraction"] > 0.9
