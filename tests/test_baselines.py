"""The papers' baselines mixgcf (MixGCF / MixGCF+), dens (DENS) and ahns (AHNS): selection rules on hand-made
scores, the modules on a real batch, tiny SASRec runs, DENS's checkpoints (their DDP run: test_ddp_baselines.py)."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec, TransRec
from recbole.trainer import Trainer
from recbole.utils import get_model, init_seed

import recbole_mdcns
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES, candidate_train_loader
from recbole_mdcns.losses import LOSSES, bpr_loss
from recbole_mdcns.methods import dens
from recbole_mdcns.methods.ahns import AdaptiveHardnessNegative, AHNSModule, ahns_target
from recbole_mdcns.methods.dens import (
    DENSModule,
    DisentangleGates,
    contrastive_loss,
    factor_aware_scores,
    pool_selection_scores,
    pool_table,
    relevance_weight,
)
from recbole_mdcns.methods.mixgcf import MixGCFModule, MixGCFNegative, positive_mixing

from conftest import tiny_config


# =========================================================================== MixGCF: rules on hand-made scores
def test_positive_mixing_is_the_score_of_the_mixed_embedding():
    scores = positive_mixing(torch.tensor([2.0]), torch.tensor([[1.0, 3.0, -1.0]]), torch.tensor([[0.25]]))
    assert torch.allclose(scores, torch.tensor([[1.25, 2.75, -0.25]]))
    h, e_pos, e_c = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 3, 8)
    alpha = torch.rand(5, 3)
    mixed = alpha.unsqueeze(-1) * e_pos.unsqueeze(1) + (1 - alpha.unsqueeze(-1)) * e_c  # e' = a e+ + (1-a) e_c
    by_scores = positive_mixing((h * e_pos).sum(-1), torch.einsum("bd,bkd->bk", h, e_c), alpha)
    assert torch.allclose(by_scores, torch.einsum("bd,bkd->bk", h, mixed), atol=1e-5)


def test_mixgcf_picks_the_hardest_mixed_candidate_and_mixgcf_plus_the_top_m():
    pool = torch.tensor([[0.1, 5.0, 3.0, 4.0, -1.0]]).repeat(3000, 1)
    pos = torch.randn(3000) * 3
    alpha = torch.rand(3000, 1)  # any alpha < 1: mixing ranks the row's candidates as their own scores do
    assert (MixGCFNegative(1).select(pos, pool, alpha) == 1).all()
    plus = MixGCFNegative(3).select(pos, pool, alpha, generator=torch.Generator().manual_seed(0))
    assert set(plus.flatten().tolist()) == {1, 2, 3}
    two = MixGCFNegative(3).select(pos, pool, alpha, k=2)
    assert two.shape == (3000, 2) and (two[:, 0] != two[:, 1]).all()


# =========================================================================== DENS: rules on hand-made vectors
def test_relevance_weight_warms_up_linearly():
    assert [relevance_weight(e, 4) for e in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert relevance_weight(0, 0) == 1.0


def test_factor_aware_choice_moves_from_irrelevant_similarity_to_relevant_contrast():
    """Candidate A: all of it irrelevant (h . e^ir = 3, h . e^r = 0); B: all relevant and against h
    (h . e^r = -2). Early (w = 0) the rule prefers A, similar in irrelevant factors; after warm-up
    (w = 1) B, the most different in relevant ones."""
    h = torch.tensor([[1.0, 1.0]])
    e = torch.tensor([[[3.0, 0.0], [0.0, -2.0]]])
    relevant = torch.tensor([[[0.0, 0.0], [0.0, -2.0]]])
    assert torch.equal(factor_aware_scores(h, e, relevant, 0.0), torch.tensor([[3.0, 0.0]]))
    assert torch.equal(factor_aware_scores(h, e, relevant, 1.0), torch.tensor([[0.0, 2.0]]))
    assert torch.allclose(factor_aware_scores(h, e, relevant, 0.5), torch.tensor([[1.5, 1.0]]))


def test_gates_split_item_vectors_and_condition_negatives_on_the_positive():
    gates = DisentangleGates(2)
    with torch.no_grad():
        for layer in (gates.user_gate, gates.item_gate, gates.pos_gate, gates.neg_gate):
            layer.weight.zero_()
            layer.bias.zero_()
        gates.neg_gate.bias.fill_(math.log(3.0))  # sigmoid(log 3) = 3/4
        gates.pos_gate.weight.copy_(torch.eye(2) * 100)  # a relevant positive factor opens the gate
    h, e_pos = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, -4.0]])
    pos_relevant = gates.positive(h, e_pos)
    assert torch.allclose(pos_relevant, e_pos / 2)  # sigmoid(0) = 1/2
    e_neg = torch.tensor([[[4.0, 8.0]]])
    assert torch.allclose(gates.negative(e_neg, pos_relevant), torch.tensor([[[4.0, 0.0]]]), atol=1e-4)


def test_contrastive_loss_is_the_mean_of_four_bpr_tasks():
    h, e_pos, e_neg = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[[2.0, -1.0]]])
    pos_r, neg_r = torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.0, -1.0]]])
    # factor scores: s_p^r = 1, s_p^ir = 2, s_n^r = -2, s_n^ir = 2
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731 -- softplus(worse - better) = -log sigmoid(better - worse)
    by_hand = (sp(2 - 1) + sp(-2 - 2) + sp(-2 - 1) + sp(2 - 2)) / 4
    assert math.isclose(contrastive_loss(h, e_pos, pos_r, e_neg, neg_r).item(), by_hand, rel_tol=1e-6)


# =========================================================================== AHNS: rules on hand-made scores
def test_ahns_target_falls_as_the_positive_rises():
    target = ahns_target(torch.tensor([1.0, 3.0, 9.0]), alpha=1.0, beta=0.1, p=-2)
    assert torch.allclose(target, torch.tensor([0.05, 0.025, 0.01], dtype=torch.float64))


def test_ahns_picks_the_candidates_nearest_the_target():
    pool = torch.tensor([[0.9, 0.07, -0.5, 0.045]])
    rule = AdaptiveHardnessNegative(alpha=1.0, beta=0.1, p=-2)  # s(v+) = 1: target 0.05
    assert rule.select(torch.tensor([1.0]), pool).tolist() == [[3]]
    assert rule.select(torch.tensor([1.0]), pool, k=2).tolist() == [[3, 1]]
    # a well-ranked positive gets an easier negative, a poorly ranked one a harder negative (C2)
    pool = torch.tensor([[3.0, 1.0, 0.3, 0.0, -1.0]]).repeat(4, 1)
    picked = pool.gather(1, rule.select(torch.tensor([10.0, 1.0, -0.9, -5.0]), pool)).flatten()
    assert picked.tolist() == [0.0, 0.0, 1.0, 3.0]  # targets 0.009, 0.05, 1.0, +inf (base floored)


def test_ahns_unbounded_scores_stay_finite():
    """s(v+) + alpha <= 0 and a non-integer power: the row gets its hardest candidate, never a NaN pick."""
    rule = AdaptiveHardnessNegative(alpha=0.5, beta=0.1, p=-2.5)
    pool = torch.tensor([[0.2, 4.0, -3.0], [0.2, 4.0, -3.0]])
    assert rule.select(torch.tensor([-2.0, -0.5]), pool).flatten().tolist() == [1, 1]
    assert torch.isfinite(ahns_target(torch.tensor([-2.0]), 0.5, 0.1, -2.5)).all()


# =========================================================================== the modules on a real batch
def _setup(tiny_data, tmp_path, model_name="SASRec", **overrides):
    config = create_config(model_name, "tiny", config_dict=tiny_config(tiny_data, tmp_path, **overrides))
    init_seed(config["seed"], True)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    train_data = candidate_train_loader(config, train_data)
    model = get_model(model_name)(config, train_data._dataset)
    model.eval()  # no dropout: the tests recompute the module's scores
    return config, model, next(iter(train_data))


def _encode(model, batch):
    return model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])


@pytest.mark.parametrize("neg_loss", ["bpr", "softmax"])
def test_mixgcf_module_trains_on_the_mixed_embedding(tiny_data, tmp_path, neg_loss):
    config, model, batch = _setup(tiny_data, tmp_path, neg_sampler="mixgcf", candidate_num=15, neg_loss=neg_loss)
    module = MixGCFModule(model, torch.optim.Adam(model.parameters()), config)
    torch.manual_seed(7)
    loss = module.training_loss(batch)
    torch.manual_seed(7)
    alpha = torch.rand(len(batch[CANDIDATES]), 1)  # the module's one draw per row
    with torch.no_grad():
        h = _encode(model, batch)
        candidates, emb = batch[CANDIDATES], model.item_embedding
        hardest = candidates.gather(1, torch.einsum("bd,bkd->bk", h, emb(candidates)).argmax(1, keepdim=True))
        e_pos = emb(batch[model.POS_ITEM_ID])
        e_mixed = alpha * e_pos + (1 - alpha) * emb(hardest.squeeze(1))  # MixGCF's synthetic negative
        expected = LOSSES[neg_loss]((h * e_pos).sum(1), (h * e_mixed).sum(1))
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.equal(module.negative_counts, torch.bincount(hardest.flatten(), minlength=model.n_items))


def test_dens_module_picks_by_factor_aware_score_and_trains_the_gates(tiny_data, tmp_path):
    config, model, batch = _setup(tiny_data, tmp_path, neg_sampler="dens", candidate_num=15, dens_warmup=0)
    optimizer = torch.optim.Adam(model.parameters())
    module = DENSModule(model, optimizer, config)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["params"][0] is module.gates.user_gate.weight
    loss = module.training_loss(batch)
    with torch.no_grad():
        h = _encode(model, batch)
        candidates, emb = batch[CANDIDATES], model.item_embedding
        e_pos, e_pool = emb(batch[model.POS_ITEM_ID]), emb(candidates)
        pos_r = module.gates.positive(h, e_pos)
        pick = factor_aware_scores(h, e_pool, module.gates.negative(e_pool, pos_r), 1.0).argmax(1, keepdim=True)
        e_neg = emb(candidates.gather(1, pick))
        expected = bpr_loss((h * e_pos).sum(1), torch.einsum("bd,bkd->bk", h, e_neg)) + config["dens_gamma"] * \
            contrastive_loss(h, e_pos, pos_r, e_neg, module.gates.negative(e_neg, pos_r))
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.gates.parameters())
    assert model.item_embedding.weight.grad.abs().sum() > 0


def test_dens_fast_selection_equals_the_straightforward_gates(tiny_data, tmp_path, monkeypatch):
    """The selection's gates over the catalogue (or the pool's distinct items), in row chunks, give the
    scores and picks of the straightforward ``[R, N, d]`` gates; the loss and its gradients are those of the
    straightforward module."""
    monkeypatch.setattr(dens, "SELECTION_CHUNK_ELEMENTS", 3 * 15 * 64)  # several chunks of 3 rows
    config, model, batch = _setup(tiny_data, tmp_path, neg_sampler="dens", candidate_num=15, dens_warmup=2)
    module = DENSModule(model, torch.optim.Adam(model.parameters()), config)
    assert module.fused  # dens_compile: true, and torch.compile works here
    scorer = module.scorer_for("self", model, batch)
    candidates, emb = batch[CANDIDATES], model.item_embedding
    assert len(candidates) > 3 and candidates.numel() >= model.n_items  # this batch: the catalogue table
    with torch.no_grad():
        h, e_pos, e_pool = _encode(model, batch), emb(batch[model.POS_ITEM_ID]), emb(candidates)
        pos_r = module.gates.positive(h, e_pos)
        distinct, inverse = candidates.unique(return_inverse=True)
        for weight in (0.0, 0.5, 1.0):
            straight = factor_aware_scores(h, e_pool, module.gates.negative(e_pool, pos_r), weight)
            for (vectors, index), fused in itertools.product(
                    (pool_table(scorer, model, candidates), (emb(distinct), inverse)), (False, True)):
                fast = pool_selection_scores(module.gates, h, pos_r, vectors, index, weight, fused)
                assert torch.allclose(fast, straight, atol=1e-5)
                assert torch.equal(fast.topk(2, dim=1).indices, straight.topk(2, dim=1).indices)
        few = candidates[:2, :3]  # fewer pool entries than items: the pool's distinct items
        vectors, index = pool_table(scorer, model, few)
        assert len(vectors) == len(few.unique()) and torch.equal(vectors[index], emb(few))

    loss = module.training_loss(batch)  # epoch 0 of a 2-epoch warm-up: w = 0
    loss.backward()
    params = [*model.parameters(), *module.gates.parameters()]
    fast_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    h, e_pos = _encode(model, batch), emb(batch[model.POS_ITEM_ID])  # the straightforward module
    pos_r = module.gates.positive(h, e_pos)
    with torch.no_grad():
        e_pool = emb(candidates)
        pick = factor_aware_scores(h, e_pool, module.gates.negative(e_pool, pos_r), 0.0).argmax(1, keepdim=True)
    e_neg = emb(candidates.gather(1, pick))
    expected = bpr_loss((h * e_pos).sum(1), torch.einsum("bd,bkd->bk", h, e_neg)) + config["dens_gamma"] * \
        contrastive_loss(h, e_pos, pos_r, e_neg, module.gates.negative(e_neg, pos_r))
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    for p, fast_grad in zip(params, fast_grads):
        assert torch.allclose(fast_grad, p.grad, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in fast_grads[-8:])  # the gates train


def test_dens_falls_back_to_the_chunked_selection_when_the_fused_one_cannot_run(tiny_data, tmp_path, monkeypatch):
    def no_compiler(*args):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(dens, "_fused_gated_scores", no_compiler)  # what torch.compile raises without gcc
    config, model, batch = _setup(tiny_data, tmp_path, neg_sampler="dens", candidate_num=15)
    with pytest.warns(UserWarning, match=r"dens_compile: true could not compile .*RuntimeError: no C\+\+ compiler"):
        module = DENSModule(model, torch.optim.Adam(model.parameters()), config)
    assert not module.fused and torch.isfinite(module.training_loss(batch))
    config, model, batch = _setup(tiny_data, tmp_path, neg_sampler="dens", candidate_num=15, dens_compile=False)
    assert not DENSModule(model, torch.optim.Adam(model.parameters()), config).fused


def test_dens_without_contrast_freezes_the_gates_and_refuses_non_linear_scorers(tiny_data, tmp_path):
    config, model, _ = _setup(tiny_data, tmp_path, neg_sampler="dens", candidate_num=5, dens_gamma=0)
    optimizer = torch.optim.Adam(model.parameters())
    module = DENSModule(model, optimizer, config)
    assert len(optimizer.param_groups) == 1 and not any(p.requires_grad for p in module.gates.parameters())
    config, model, _ = _setup(tiny_data, tmp_path, "TransRec", neg_sampler="dens", candidate_num=5)
    assert isinstance(model, TransRec)
    with pytest.raises(ValueError, match="neg_sampler=dens .* TransRec cannot be"):
        DENSModule(model, torch.optim.Adam(model.parameters()), config)


def test_ahns_module_trains_on_the_rules_choice(tiny_data, tmp_path):
    config, model, batch = _setup(tiny_data, tmp_path, neg_sampler="ahns", candidate_num=15, neg_num=2)
    module = AHNSModule(model, torch.optim.Adam(model.parameters()), config)
    loss = module.training_loss(batch)
    with torch.no_grad():
        h = _encode(model, batch)
        candidates, emb = batch[CANDIDATES], model.item_embedding
        pos = (h * emb(batch[model.POS_ITEM_ID])).sum(1)
        pool = torch.einsum("bd,bkd->bk", h, emb(candidates))
        nearest = (pool.double() - ahns_target(pos, 1.0, 0.1, -2).unsqueeze(1)).abs().topk(2, largest=False).indices
        expected = bpr_loss(pos, pool.gather(1, nearest))
    assert torch.allclose(loss, expected, atol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    ({"neg_sampler": "mixgcf", "neg_num": 2}, "neg_num must be <= top_m for neg_sampler=mixgcf"),
    ({"neg_sampler": "dens", "top_m": 2}, "top_m must be 1 for neg_sampler=dens"),
    ({"neg_sampler": "dens", "dens_gamma": -1}, "dens_gamma must be a finite number >= 0"),
    ({"neg_sampler": "dens", "dens_warmup": "long"}, "dens_warmup must be a finite number >= 0"),
    ({"neg_sampler": "dens", "dens_compile": "yes"}, "dens_compile must be true or false"),
    ({"neg_sampler": "ahns", "ahns_p": 0}, "ahns_p must be a finite number in (-inf, 0.0)"),
    ({"neg_sampler": "ahns", "ahns_beta": 0}, "ahns_beta must be a finite number in (0.0, inf)"),
    ({"neg_sampler": "ahns", "top_m": 3}, "top_m must be 1 for neg_sampler=ahns"),
])
def test_config_errors_name_the_key(tiny_data, tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp_path, **overrides))
    assert message in str(error.value)


# =========================================================================== tiny SASRec runs
def _last_ckpt(root: Path) -> dict:
    (path,) = root.glob("saved/*-lightning/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("sampler,extra", [("mixgcf", {"top_m": 3, "neg_num": 2}), ("ahns", {})])
def test_sasrec_run(tiny_data, tmp_path, in_tmp, sampler, extra):
    result = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, tmp_path, neg_sampler=sampler, candidate_num=20, epochs=2, **extra))
    assert 0 <= result["test_result"]["ndcg@10"] <= result["test_result"]["recall@10"] <= 1
    history = result["train_info"]["negative_history"]
    assert [h["epoch"] for h in history] == [0, 1] and history[1]["catalogue_fraction"] > 0


def test_dens_run_resumes_exactly_and_its_recbole_checkpoint_loads_into_plain_sasrec(tiny_data, tmp_path, in_tmp):
    runs = {name: tmp_path / name for name in ("full", "first", "resumed")}

    def run(name, epochs, **extra):
        return recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=tiny_config(
            tiny_data, runs[name], neg_sampler="dens", candidate_num=20, dens_warmup=2, epochs=epochs, **extra))

    full = run("full", 2)
    ckpt = _last_ckpt(runs["full"])
    gates = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("gates.")}
    assert len(gates) == 8 and len(ckpt["optimizer_states"][0]["param_groups"]) == 2  # gates + their Adam state
    run("first", 1)
    (path,) = runs["first"].glob("saved/*-lightning/last.ckpt")
    resumed = run("resumed", 2, resume_from=str(path))
    after = _last_ckpt(runs["resumed"])
    first_gates = _last_ckpt(runs["first"])["state_dict"]["gates.neg_gate.weight"]
    assert not torch.equal(first_gates, gates["gates.neg_gate.weight"])  # the gates trained in epoch 1
    for key, value in ckpt["state_dict"].items():  # resumed == uninterrupted: model and gates
        assert torch.allclose(value, after["state_dict"][key], atol=1e-6), key
    assert resumed["test_result"] == full["test_result"]

    (pth,) = runs["full"].glob("saved/SASRec-*.pth")
    saved = torch.load(pth, map_location="cpu", weights_only=False)
    assert not any(key.startswith("gates") for key in saved["state_dict"])
    config = saved["config"]
    init_seed(config["seed"], config["reproducibility"])
    _, _, test_data = data_preparation(config, create_dataset(config))
    plain = SASRec(config, test_data._dataset)
    plain.load_state_dict(saved["state_dict"])  # strict: exactly SASRec's parameters
    result = Trainer(config, plain).evaluate(test_data, load_best_model=False)
    assert {k: round(float(v), 4) for k, v in result.items()} == dict(full["test_result"])

