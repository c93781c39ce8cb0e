"""neg_loss (bpr / bce / softmax) over K negatives, the log-q correction, and neg_num per sampler."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from recbole.data import create_dataset, data_preparation
from recbole.model.loss import BPRLoss
from recbole.utils import get_model, init_seed

from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES, candidate_train_loader
from recbole_mdcns.losses import LOSSES, bce_loss, bpr_loss, log_q_corrected, softmax_loss
from recbole_mdcns.methods.dns import DNSModule, PoolDrawModule, pool_log_q
from recbole_mdcns.scoring import DotScorer
from recbole_mdcns.strategies import TopMNegative

from conftest import tiny_config

POS = torch.tensor([2.0, -1.0, 0.5])
NEG = torch.tensor([[1.0, 3.0], [-2.0, 0.0], [0.5, -0.5]])


# --------------------------------------------------------------------------- losses on hand-made scores
def test_softmax_with_one_negative_is_bpr():
    neg = NEG[:, 0]
    expected = -torch.log(torch.sigmoid(POS - neg)).mean()
    assert torch.allclose(softmax_loss(POS, neg), expected, atol=1e-6)
    assert torch.allclose(softmax_loss(POS, neg.unsqueeze(1)), bpr_loss(POS, neg), atol=1e-6)


def test_softmax_over_k_negatives_is_cross_entropy_on_the_positive():
    by_hand = torch.tensor([math.log(math.exp(p) + sum(math.exp(n) for n in row)) - p
                            for p, row in zip(POS.tolist(), NEG.tolist())]).mean()
    assert torch.allclose(softmax_loss(POS, NEG), by_hand, atol=1e-6)
    logits = torch.cat([POS.unsqueeze(1), NEG], 1)
    assert torch.allclose(softmax_loss(POS, NEG), F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)))


def test_bpr_over_k_negatives_is_recboles_bpr_on_repeated_rows():
    """Mean over rows and negatives: RecBole's BPRLoss with each row repeated once per negative."""
    expected = BPRLoss()(POS.repeat_interleave(2), NEG.reshape(-1))
    assert torch.allclose(bpr_loss(POS, NEG), expected, atol=1e-6)


def test_bce_over_k_negatives_sums_negatives_per_row():
    by_hand = torch.tensor([math.log1p(math.exp(-p)) + sum(math.log1p(math.exp(n)) for n in row)
                            for p, row in zip(POS.tolist(), NEG.tolist())]).mean()
    assert torch.allclose(bce_loss(POS, NEG), by_hand, atol=1e-6)


def test_log_q_uniform_cancels_and_popularity_shifts_the_logits():
    items = torch.tensor([[1, 2, 3], [2, 3, 1], [3, 1, 2]])  # [v+ | 2 draws] per row
    scores = torch.cat([POS.unsqueeze(1), NEG], 1)
    uniform = torch.full((4,), -math.log(3.0))
    corrected = log_q_corrected(scores, items, uniform)
    assert torch.allclose(softmax_loss(corrected[:, 0], corrected[:, 1:]), softmax_loss(POS, NEG), atol=1e-6)
    log_q = pool_log_q(torch.tensor([0.0, 1.0, 2.0, 5.0]))  # item 0 is padding
    assert torch.allclose(log_q[1:], torch.tensor([1.0, 2.0, 5.0]).log() - math.log(8.0), atol=1e-6)
    shifted = log_q_corrected(scores, items, log_q)
    assert torch.allclose(shifted, scores - log_q[items])
    by_hand = torch.tensor([math.log(sum(math.exp(s - log_q[i]) for s, i in zip(row, ids))) - (row[0] - log_q[ids[0]])
                            for row, ids in zip(scores.tolist(), items.tolist())]).mean()
    loss = softmax_loss(shifted[:, 0], shifted[:, 1:])
    assert torch.allclose(loss, by_hand, atol=1e-5) and not torch.allclose(loss, softmax_loss(POS, NEG))


def test_pool_log_q_floors_items_never_drawn():
    log_q = pool_log_q(torch.tensor([0.0, 0.0, 4.0, 12.0]))
    assert torch.isfinite(log_q).all() and log_q[1] == log_q[2]


# --------------------------------------------------------------------------- K distinct draws from the top-M
def test_select_k_draws_distinct_candidates_inside_the_top_m():
    scores = torch.tensor([[0.1, 5.0, 3.0, 4.0, -1.0, 2.0]]).repeat(2000, 1)
    picks = TopMNegative(4).select_k(scores, 2, torch.Generator().manual_seed(0))
    assert picks.shape == (2000, 2) and (picks[:, 0] != picks[:, 1]).all()
    assert set(picks.flatten().tolist()) == {1, 2, 3, 5}
    assert set(TopMNegative(3).select_k(scores[:5], 3).flatten().tolist()) == {1, 2, 3}
    assert (TopMNegative(1).select_k(scores[:5], 1) == 1).all()
    with pytest.raises(ValueError, match="cannot draw 3 distinct negatives from the top 2"):
        TopMNegative(2).select_k(scores, 3)


# --------------------------------------------------------------------------- modules on a real batch
def _setup(tiny_data, tmp_path, **overrides):
    config = create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp_path, **overrides))
    init_seed(config["seed"], True)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    train_data = candidate_train_loader(config, train_data)
    model = get_model("SASRec")(config, train_data._dataset)
    model.eval()  # no dropout: the test recomputes the same scores
    return config, model, next(iter(train_data)), train_data


def test_dns_trains_on_k_distinct_top_m_candidates(tiny_data, tmp_path):
    config, model, batch, _ = _setup(tiny_data, tmp_path, neg_sampler="dns", candidate_num=12, top_m=4, neg_num=3)
    module = DNSModule(model, torch.optim.Adam(model.parameters()), config)
    trained_on = []
    module.record_negatives = trained_on.append  # the [R, K] negatives the loss is computed on
    loss = module.training_loss(batch)
    (negatives,) = trained_on
    candidates = batch[CANDIDATES]
    with torch.no_grad():
        scores = DotScorer(model)(model, batch, candidates)
        top4 = candidates.gather(1, scores.topk(4, dim=1).indices)
        items = torch.cat([batch[model.POS_ITEM_ID].unsqueeze(1), negatives], 1)
        expected = DotScorer(model)(model, batch, items)
    assert negatives.shape == (len(candidates), 3)
    for row, top in zip(negatives.tolist(), top4.tolist()):  # from the row's top 4 (distinct: test_select_k_...)
        assert all(item in top for item in row)
    assert torch.allclose(loss, LOSSES["bpr"](expected[:, 0], expected[:, 1:]), atol=1e-6)


def test_popularity_softmax_uses_the_pools_log_q(tiny_data, tmp_path):
    config, model, batch, train_data = _setup(tiny_data, tmp_path, neg_sampler="popularity", neg_loss="softmax",
                                              candidate_num=6, neg_num=6)
    module = PoolDrawModule(model, torch.optim.Adam(model.parameters()), config)
    sampler = train_data._sampler
    module.set_pool_weights(sampler.item_weights)
    loss = module.training_loss(batch)
    items = torch.cat([batch[model.POS_ITEM_ID].unsqueeze(1), batch[CANDIDATES]], 1)
    with torch.no_grad():
        scores = DotScorer(model)(model, batch, items)
    q = sampler.item_weights / sampler.item_weights.sum()
    logits = scores - q[items].log().float()
    assert torch.allclose(loss, F.cross_entropy(logits, torch.zeros(len(items), dtype=torch.long)), atol=1e-5)
    module.set_pool_weights(None)  # uniform pool: raw scores
    assert torch.allclose(module.training_loss(batch), softmax_loss(scores[:, 0], scores[:, 1:]), atol=1e-5)
    assert module.negative_counts.sum() == 2 * 6 * len(items)  # every draw of the pool is a negative


@pytest.mark.parametrize("overrides,message", [
    ({"neg_sampler": "dns", "candidate_num": 10, "top_m": 2, "neg_num": 3}, "neg_num must be <= top_m"),
    ({"neg_sampler": "dns", "candidate_num": 2, "top_m": 2, "neg_num": 3}, "neg_num must be <= candidate_num"),
    ({"neg_sampler": "dns", "neg_num": 0}, "neg_num must be an integer"),
    ({"neg_sampler": "uniform", "neg_num": 4}, "neg_num must be <= candidate_num"),
    ({"neg_sampler": "uniform", "candidate_num": 5}, "candidate_num must equal neg_num for neg_sampler=uniform"),
    ({"neg_sampler": "popularity", "candidate_num": 3, "neg_num": 3, "top_m": 2}, "top_m must be 1"),
    ({"neg_sampler": "divns", "neg_num": 2}, "neg_num must be 1 for neg_sampler=divns"),
    ({"neg_sampler": "mdcns", "neg_num": 2}, "neg_num must be 1 for neg_sampler=mdcns"),
    ({"neg_sampler": "dns", "neg_loss": "hinge"}, "neg_loss must be one of ['bpr', 'bce', 'softmax']"),
])
def test_neg_num_errors_name_the_keys(tiny_data, tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp_path, **overrides))
    assert message in str(error.value)
