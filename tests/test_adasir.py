"""neg_sampler=adasir: the resampling and weighting steps on hand-made scores, the module on a real
batch, and a SASRec run whose resume equals the uninterrupted run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import recbole_mdcns
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.losses import bce_loss, bpr_loss
from recbole_mdcns.methods.adasir import (AdaSIRModule, draw_from_pool, importance_log_weights,
                                          importance_resample, importance_weights, merge_pools,
                                          weighted_pair_loss)

from conftest import tiny_config
from real_batches import checkpoint_path, last_checkpoint, sampler_setup

# --------------------------------------------------------------------------- steps on hand-made scores


def test_sir_weights_are_softmax_of_score_minus_log_q():
    scores = torch.tensor([[1.0, 2.0, 3.0]])
    log_q = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    expected = torch.softmax(torch.tensor([[1 - math.log(0.5), 2 - math.log(0.25), 3 - math.log(0.25)]]), 1)
    assert torch.allclose(importance_log_weights(scores, log_q).exp(), expected)


def test_resampling_proposals_from_q_approximates_the_softmax():
    """SIR's defining property: proposals j ~ q, resampled by softmax(s - log q), are ~ softmax(s)."""
    torch.manual_seed(0)
    s = torch.tensor([0.0, 1.0, 2.0, -1.0])
    q = torch.tensor([0.7, 0.1, 0.1, 0.1])  # far from the target
    proposals = torch.multinomial(q, 4000 * 200, replacement=True).view(4000, 200)
    log_w = importance_log_weights(s[proposals], q.log()[proposals])
    picked = proposals.gather(1, importance_resample(log_w, 5))
    freq = torch.bincount(picked.flatten(), minlength=4).double() / picked.numel()
    assert torch.allclose(freq, torch.softmax(s.double(), 0), atol=0.01)


def test_resample_follows_the_weights_and_draws_with_replacement():
    torch.manual_seed(0)
    log_w = torch.log(torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]))
    pick = importance_resample(log_w, 50)
    assert pick.shape == (2, 50) and (pick[0] == 1).all()
    assert set(pick[1].tolist()) == {0, 2}


def test_merge_keeps_each_items_weight_and_reuses_old_items():
    torch.manual_seed(0)
    old_items, new_items = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 7, 8]])
    old_w, new_w = -old_items.float(), -new_items.float()  # weight -id: it must travel with its item
    counts = torch.zeros(9)
    for _ in range(500):
        items, log_w = merge_pools(old_items, old_w, new_items, new_w)
        assert items.shape == (1, 4) and torch.equal(log_w, -items.float())
        counts += torch.bincount(items.flatten(), minlength=9)
    old_share = counts[1:5].sum() / counts.sum()
    assert 0.45 < old_share < 0.55  # the old pool survives with probability 1/2 per slot


def test_draw_from_pool_returns_items_with_their_weights():
    torch.manual_seed(0)
    items = torch.tensor([[3, 4, 5], [6, 7, 8]])
    negatives, log_w = draw_from_pool(items, items.float() / 10, 7)
    assert negatives.shape == (2, 7) and torch.equal(log_w, negatives.float() / 10)
    assert set(negatives[0].tolist()) <= {3, 4, 5} and set(negatives[1].tolist()) <= {6, 7, 8}


def test_importance_weights_hand_computed():
    s = torch.tensor([[0.0, math.log(2.0)]], requires_grad=True)
    uniform = torch.log(torch.tensor([[0.5, 0.5]]))
    w = importance_weights(s, uniform, 1.0)
    assert torch.allclose(w, torch.tensor([[1 / 3, 2 / 3]])) and not w.requires_grad
    # an item the pool drew twice as often counts half as much; temperature 2 flattens exp(s)
    assert torch.allclose(importance_weights(s, torch.log(torch.tensor([[1 / 3, 2 / 3]])), 1.0),
                          torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(importance_weights(s, uniform, 2.0),
                          torch.softmax(torch.tensor([[0.0, math.log(2.0) / 2]]), 1))


def test_weighted_pair_loss_reduces_to_the_known_forms():
    torch.manual_seed(0)
    pos, neg = torch.randn(4), torch.randn(4, 3)
    w = torch.softmax(torch.randn(4, 3), 1)
    expected_bpr = (w * -torch.log(1e-10 + torch.sigmoid(pos.unsqueeze(1) - neg))).sum(1).mean()
    assert torch.allclose(weighted_pair_loss(bpr_loss, pos, neg, w), expected_bpr)
    expected_bce = (F.softplus(-pos) + (w * F.softplus(neg)).sum(1)).mean()
    assert torch.allclose(weighted_pair_loss(bce_loss, pos, neg, w), expected_bce)
    uniform = torch.full((4, 3), 1 / 3)  # equal weights: the unweighted loss over all pairs
    assert torch.allclose(weighted_pair_loss(bpr_loss, pos, neg, uniform), bpr_loss(pos, neg))


# --------------------------------------------------------------------------- the module on a real batch


@pytest.fixture(scope="module")
def sasrec(tiny_data, tmp_path_factory):
    return sampler_setup("SASRec", "adasir", tiny_data, tmp_path_factory.mktemp("adasir"), candidate_num=30,
                         adasir_pool_size=8, neg_num=4)


def test_pools_filled_before_read_and_only_from_unseen_proposals(sasrec):
    config, model, optimizer, batch, train_data = sasrec
    module = AdaSIRModule(model, optimizer, config)
    torch.manual_seed(0)
    loss = module.training_loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.item_embedding.weight.grad.abs().sum() > 0
    users = batch[model.USER_ID]
    assert bool(module.filled[users].all())
    pools = module.pool[users]
    assert (pools > 0).all()  # no empty slot was ever read: epoch-0 negatives are real items
    proposals = batch[CANDIDATES]
    for user in users.unique().tolist():  # a pool holds proposals of its user's rows
        assert set(module.pool[user].tolist()) <= set(proposals[users == user].flatten().tolist())
    user_of_slot = users.unsqueeze(1).expand_as(pools)
    assert not train_data._sampler.is_used(user_of_slot, pools).any()  # never a training item of the user
    assert torch.isfinite(module.pool_log_w[users]).all() and (module.pool_log_w[users] <= 0).all()
    assert module.negative_counts.sum() == len(users) * module.num_neg


def test_refresh_counts_and_checkpoint_roundtrip(sasrec):
    config, model, optimizer, batch, _ = sasrec
    module = AdaSIRModule(model, optimizer, config)
    torch.manual_seed(1)
    module.training_loss(batch)
    first = module.pool.clone()
    module.training_loss(batch)  # the second batch of the same users merges into their pools
    users = batch[model.USER_ID].unique()
    assert (module.updates[users] == 2).all() and not torch.equal(first[users], module.pool[users])
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    fresh = AdaSIRModule(model, optimizer, config)
    fresh.on_load_checkpoint(checkpoint)
    assert torch.equal(fresh.pool, module.pool) and torch.equal(fresh.pool_log_w, module.pool_log_w)
    assert torch.equal(fresh.filled, module.filled) and fresh.weight_ess == module.weight_ess
    module.on_train_epoch_end()
    assert module.negative_history[-1]["pool_users"] == len(users) and not module.updates.any()
    assert 0 < module.negative_history[-1]["weight_effective_sample_fraction"] <= 1


def test_popularity_proposals_set_log_q(tiny_data, tmp_path):
    config, model, optimizer, _, train_data = sampler_setup("SASRec", "adasir", tiny_data, tmp_path, candidate_num=20,
                                                            candidate_distribution="popularity")
    module = AdaSIRModule(model, optimizer, config)
    module.set_proposal(train_data._sampler)
    weights = train_data._sampler.item_weights
    seen = weights > 0
    assert torch.allclose(module.log_q[seen], weights[seen].float().log())


@pytest.mark.parametrize("key,value", [("adasir_pool_size", 0), ("neg_num", 0), ("adasir_temperature", 0),
                                       ("candidate_num", 1), ("top_m", 2), ("neg_loss", "softmax")])
def test_validate_config_names_key(tiny_data, tmp_path, key, value):
    with pytest.raises(ValueError, match=key):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp_path, neg_sampler="adasir",
                                                                **{"candidate_num": 20, key: value}))


# --------------------------------------------------------------------------- runs


def test_sasrec_run_checkpoint_and_resume(tiny_data, tmp_path, in_tmp):
    def run(name, epochs, **extra):
        return recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=tiny_config(
            tiny_data, tmp_path / name, neg_sampler="adasir", epochs=epochs, candidate_num=30, adasir_pool_size=8,
            adasir_temperature=0.5, **extra))

    full = run("full", 3)
    ckpt = last_checkpoint(tmp_path / "full")
    assert bool(ckpt["adasir"]["filled"][1:].all()) and (ckpt["adasir"]["pool"][1:] > 0).all()  # every user
    history = ckpt["negatives"]["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2] and all(h["pool_users"] == 40 for h in history)
    assert all(0 < h["weight_effective_sample_fraction"] < 1 for h in history)  # the weights are not uniform
    run("first", 2)
    resumed = run("resumed", 3, resume_from=str(checkpoint_path(tmp_path / "first")))
    after = last_checkpoint(tmp_path / "resumed")
    for key, value in ckpt["state_dict"].items():
        assert torch.allclose(value, after["state_dict"][key], atol=1e-6), key
    assert torch.equal(ckpt["adasir"]["pool"], after["adasir"]["pool"])
    assert resumed["test_result"] == full["test_result"]

