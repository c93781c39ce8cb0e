"""Tests for neg_sampler=divns: tensor units, the module's training step, checkpoints, runs."""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, init_seed

import recbole_mdcns
from recbole_mdcns.config import create_config, packaged_yaml
from recbole_mdcns.data import CANDIDATES, candidate_train_loader
from recbole_mdcns.diagnostics import item_representation, negative_stats
from recbole_mdcns.methods.divns import (
    Q_DENOMINATOR_FLOOR,
    DivNSModule,
    RunnerUpCache,
    compact_unique,
    diversity_kernel,
    hard_and_runner_ups,
    synthesis_is_exact,
    refresh_diverse_sets,
    synthesize_scores,
)
from recbole_mdcns.methods.dns import DNSModule
from recbole_mdcns.losses import LOSSES, bpr_loss
from recbole_mdcns import scoring
from recbole_mdcns.scoring import DotScorer, PredictScorer

from conftest import tiny_config

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
    merged = RunnerUpCache(3)
    merged.merge(torch.stack([a.items, b.items]), torch.stack([a.count, b.count]))
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
            diverse, size = refresh_diverse_sets(emb, cache, cache_size, hard, hard_size, kernel=kernel, mode=mode,
                                                 generator=torch.Generator().manual_seed(3), chunk=2)
            assert size.tolist() == expected, (kernel, mode)
            for u in range(4):
                ids = diverse[u, : int(size[u])].tolist()
                assert len(set(ids)) == len(ids) and set(ids) <= set(cache[u, : int(cache_size[u])].tolist())
                assert not diverse[u, int(size[u]):].any()


def test_refresh_never_picks_two_identical_items():
    """det(L_Y) = 0 when Y holds two items with the same embedding: an exact k-DPP never draws both."""
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]])
    users = 400
    cache = torch.tensor([[1, 2, 3, 4]]).expand(users, 4)
    hard = torch.tensor([[3, 4]]).expand(users, 2)
    diverse, size = refresh_diverse_sets(emb, cache, torch.full((users,), 4), hard, torch.full((users,), 2),
                                         kernel="rbf", generator=torch.Generator().manual_seed(0))
    assert (size == 2).all()
    pairs = {tuple(sorted(row[:2])) for row in diverse.tolist()}
    assert (1, 2) not in pairs and len(pairs) >= 3  # random, yet never the duplicate pair


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
    config = create_config(model_name, "tiny", config_dict=tiny_config(tiny_data, tmp_path, neg_sampler="divns",
                                                                       **overrides))
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    train_data = candidate_train_loader(config, train_data)
    model = get_model(model_name)(config, train_data._dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = next(iter(train_data))
    return config, model, optimizer, batch, train_data


@pytest.fixture(scope="module")
def sasrec(tiny_data, tmp_path_factory):
    return _setup("SASRec", tiny_data, tmp_path_factory.mktemp("sasrec"))


@pytest.fixture(scope="module")
def fpmc(tiny_data, tmp_path_factory):
    return _setup("FPMC", tiny_data, tmp_path_factory.mktemp("fpmc"))


def _one_diverse_item_per_user(module, batch, offset=1):
    """Give every user a diverse set of one known item (not its row's candidates' top-1)."""
    n_users = int(batch[module.model.USER_ID].max()) + 1
    module.diverse = torch.zeros(n_users, module.cache.capacity, dtype=torch.long)
    module.diverse[:, 0] = (torch.arange(n_users) * 7 + offset) % (module.model.n_items - 1) + 1
    module.diverse_size = torch.ones(n_users, dtype=torch.long)


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
    _one_diverse_item_per_user(module, batch)
    users = batch[model.USER_ID]
    module.diverse_size[users[0]] = 0  # this user's rows fall back to DNS
    loss = module.training_loss(batch)
    with torch.no_grad():
        h = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
        candidates = batch[CANDIDATES]
        hard = candidates.gather(1, torch.einsum("bd,bkd->bk", h, model.item_embedding(candidates)).argmax(1, True))
        e_hard = model.item_embedding(hard.squeeze(1))
        e_div = model.item_embedding(module.diverse[users, 0])
        has = users != users[0]
        lam = config["divns_lambda"]
        e_syn = torch.where(has.unsqueeze(1), lam * e_hard + (1 - lam) * e_div, e_hard)
        pos = (h * model.item_embedding(batch[model.POS_ITEM_ID])).sum(1)
        expected = LOSSES[neg_loss](pos, (h * e_syn).sum(1))
    assert torch.allclose(loss, expected, atol=1e-6)
    assert module.synthetic_rows == int(has.sum()) > 0
    loss.backward()  # gradients reach the diverse items' embeddings
    grad = model.item_embedding.weight.grad
    assert grad[module.diverse[users[has], 0]].abs().sum() > 0
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
    _one_diverse_item_per_user(module, batch, offset=3)
    loss = module.training_loss(batch)
    assert isinstance(module.scorers["self"], PredictScorer)
    users = batch[model.USER_ID]
    scorer = PredictScorer()
    with torch.no_grad():
        candidates = batch[CANDIDATES]
        hard = candidates.gather(1, scorer(model, batch, candidates).argmax(1, True))
        s = scorer(model, batch, torch.cat([batch[model.POS_ITEM_ID].unsqueeze(1), hard,
                                            module.diverse[users, :1]], 1))
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
    assert record["diverse_users"] == int((module.diverse_size > 0).sum()) > 0
    assert int(module.cache.size.sum()) == 0 and int(module.hard.size.sum()) == 0  # cleared after the refresh
    k_bound = torch.minimum(fresh.cache.size, fresh.hard.size)
    assert (module.diverse_size <= k_bound).all() and (module.diverse_size[k_bound > 0] > 0).all()
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    fresh.on_load_checkpoint(ckpt)
    assert torch.equal(fresh.diverse, module.diverse) and fresh.negative_history == module.negative_history


@pytest.mark.parametrize("key,value", [("divns_cache_ratio", 10), ("divns_cache_ratio", 0), ("divns_lambda", 1.5),
                                       ("divns_kernel", "poly"), ("divns_dpp_mode", "map"), ("divns_gamma", 0),
                                       ("divns_alpha", -1), ("divns_cache_size", 0), ("top_m", 2),
                                       ("candidate_num", 1)])
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
    assert (ckpt["divns"]["diverse_size"] > 0).sum() > 30
    assert 0 < history[2]["mean_pairwise_cosine_distance"] <= 2 and 0 < history[2]["catalogue_fraction"] <= 1

    run("first", 2)
    first = _last_ckpt(runs["first"])
    assert len(first["negatives"]["history"]) == 2 and (first["divns"]["diverse_size"] > 0).any()
    (path,) = runs["first"].glob("saved/*-lightning/last.ckpt")
    resumed = run("resumed", 3, resume_from=str(path))
    after = _last_ckpt(runs["resumed"])
    assert after["negatives"]["history"][2]["synthetic_row_fraction"] > 0.9  # continued with loaded D_u
    # a resumed run is the uninterrupted one: same weights, same diverse sets, same results
    for key, value in ckpt["state_dict"].items():
        assert torch.allclose(value, after["state_dict"][key], atol=1e-6), key
    assert torch.equal(ckpt["divns"]["diverse"], after["divns"]["diverse"])
    assert resumed["test_result"] == full["test_result"]


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
    assert (divns["diverse_size"] > 0).sum() >= 38  # (almost) every one of the 40 users
