"""``neg_sampler: mdcns``: each equation on hand-made scores, the module on one real batch, and
full runs on the tiny dataset (ablation, extra teachers, reproducibility, resume, 2-process DDP)."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from recbole.data.interaction import Interaction
from conftest import tiny_config, write_dataset

import recbole_mdcns
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.losses import bce_loss, bpr_loss
from recbole_mdcns.lightning_module import NegativeSamplingModule
from recbole_mdcns.companion_models import load_frozen_model
from recbole_mdcns.evaluation import ScoreEnsemble
from recbole_mdcns.methods.mdcns import (
    MDCNSModule,
    distillation_loss,
    divergence,
    hard_negatives,
    mdcns_losses,
    ranking_loss,
    rerank,
    teacher_scores,
    total_loss,
)
from recbole_mdcns.strategies import MultiViewTopMNegative
from recbole_mdcns.trainer import NegSamplingTrainer

# Fast MDCNS settings for the tiny dataset (60 items): a small pool and a small peer.
MDCNS = {"neg_sampler": "mdcns", "candidate_num": 20, "mdcns_peer_config": {"hidden_size": 24, "embedding_size": 16}}


# =========================================================================== equations
def test_teacher_scores_eq4_mean_and_sum():
    a, b, c = torch.tensor([[1.0, 4.0]]), torch.tensor([[3.0, 0.0]]), torch.tensor([[2.0, 2.0]])
    assert torch.equal(teacher_scores([a, b]), torch.tensor([[2.0, 2.0]]))
    assert torch.equal(teacher_scores([a, b], "sum"), torch.tensor([[4.0, 4.0]]))
    assert torch.allclose(teacher_scores([a, b, c], "mean"), torch.tensor([[2.0, 2.0]]))
    with pytest.raises(ValueError, match="mdcns_teacher_agg"):
        teacher_scores([a, b], "max")


def test_divergence_eq5_and_rerank_eq6():
    s_self = torch.tensor([[1.0, 2.0, -1.0]])
    s_peer = torch.tensor([[3.0, 2.0, 1.5]])
    d = divergence(s_self, s_peer)
    assert torch.equal(d, torch.tensor([[2.0, 0.0, 2.5]]))
    assert torch.equal(d, divergence(s_peer, s_self))  # symmetric
    assert torch.equal(rerank(s_self, d, 1.0), torch.tensor([[3.0, 2.0, 1.5]]))
    assert torch.equal(rerank(s_self, d, 0.5), torch.tensor([[2.0, 2.0, 0.25]]))
    assert torch.equal(rerank(s_self, d, 0.0), s_self)  # beta_div = 0: no re-ranking


def test_hard_negatives_eqs7_8_top1_follows_reranked_views():
    s_self = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    s_peer = torch.tensor([[2.0, -2.0, 0.5], [0.0, 1.0, 3.0]])
    d = divergence(s_self, s_peer)
    teacher = teacher_scores([s_self, s_peer])
    views = [rerank(v, d, 1.0) for v in (s_self, s_peer, teacher)]
    negs = hard_negatives(views, MultiViewTopMNegative(1))
    assert negs.shape == (2, 3) and negs.dtype == torch.long
    # Row 0: the divergent item 1 overtakes self's and the teacher's favourite item 0
    # (self 1 + 3 > 2 + 0; teacher -0.5 + 3 > 2 + 0); the peer's view keeps item 0 (2 > -2 + 3).
    assert negs[0].tolist() == [1, 0, 1]
    # Row 1: no divergence, every view picks the common favourite.
    assert negs[1].tolist() == [2, 2, 2]
    # Without re-ranking the self view keeps its own argmax.
    assert hard_negatives([s_self], MultiViewTopMNegative(1))[0].item() == 0


def test_hard_negatives_top_m_draws_uniformly_from_the_top_m():
    scores = torch.tensor([[5.0, 0.0, 4.0, -1.0, 3.0]]).expand(4000, -1)
    negs = hard_negatives([scores, -scores], MultiViewTopMNegative(3), torch.Generator().manual_seed(0))
    counts = torch.bincount(negs[:, 0], minlength=5)
    assert set(negs[:, 0].tolist()) == {0, 2, 4}
    assert set(negs[:, 1].tolist()) == {1, 3, 4}
    assert (counts[[0, 2, 4]].float() / 4000 - 1 / 3).abs().max() < 0.04


def test_ranking_loss_eqs9_10_weights_and_gradients():
    pos = torch.tensor([2.0, 0.0], requires_grad=True)
    pool = torch.tensor([[1.0, 3.0, -1.0], [0.5, 0.0, 2.0]], requires_grad=True)
    negs = torch.tensor([[0, 1, 2], [2, 2, 0]])
    got = ranking_loss(pos, pool, negs, (1.0, 0.5, 2.0), bpr_loss)
    expected = sum(w * bpr_loss(pos.detach(), pool.detach()[torch.arange(2), negs[:, j]])
                   for j, w in enumerate((1.0, 0.5, 2.0)))
    assert torch.allclose(got, expected)
    got.backward()
    # Only the chosen negatives (and the positive) receive a gradient.
    assert pool.grad[1, 1] == 0 and (pool.grad[0] != 0).all() and (pos.grad != 0).all()
    assert ranking_loss(pos, pool, negs, (0.0, 0.0, 0.0), bpr_loss) == 0
    only_teacher = ranking_loss(pos, pool, negs, (0.0, 0.0, 1.0), bce_loss)
    assert torch.allclose(only_teacher, bce_loss(pos, pool[torch.arange(2), negs[:, 2]]))


@pytest.mark.parametrize("tau", [0.7, 1.0, 10.0])
def test_distillation_loss_eqs11_12(tau):
    torch.manual_seed(0)
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    got = distillation_loss(student, teacher, tau)
    reference = F.kl_div(F.log_softmax(student / tau, -1), F.softmax(teacher / tau, -1), reduction="batchmean")
    assert torch.allclose(got, tau**2 * reference, atol=1e-6)
    got.backward()
    assert teacher.grad is None  # teacher detached
    assert student.grad is not None
    assert distillation_loss(teacher, teacher, tau).abs() < 1e-6
    assert distillation_loss(student, teacher + 5.0, tau).item() == pytest.approx(got.item(), abs=1e-5)


def _authors_iteration_loss(s1, s2, kd_gamma, T, d_lambda, dws_beta=1.0):
    """The loss of one batch in the authors' released code (``MDCNS_Code/trainers.py``,
    ``MDHNSTrainer.iteration`` with ``loss_type BCE``, ``K_hns = 1``, ``alpha = beta = 1``), written out."""
    pos1, pool1, pos2, pool2 = s1[:, 0], s1[:, 1:], s2[:, 0], s2[:, 1:]
    istarget = torch.ones_like(pos1)

    def bce(pos_logits, neg_logits_pool, neg_indices):
        neg_scores = neg_logits_pool.gather(1, neg_indices.unsqueeze(1)).squeeze(1)
        loss = (-torch.log(torch.sigmoid(pos_logits) + 1e-24) - torch.log(1 - torch.sigmoid(neg_scores) + 1e-24))
        return torch.sum(loss * istarget) / (torch.sum(istarget) + 1e-8)

    with torch.no_grad():
        disagreement = torch.abs(pool1 - pool2)
        neg_a = torch.topk(pool1 + dws_beta * disagreement, 1).indices[:, 0]
        neg_b = torch.topk(pool2 + dws_beta * disagreement, 1).indices[:, 0]
        neg_c = torch.topk(0.5 * (pool1 + pool2) + dws_beta * disagreement, 1).indices[:, 0]
    L1 = bce(pos1, pool1, neg_a) + bce(pos1, pool1, neg_b) + d_lambda * bce(pos1, pool1, neg_c)
    L2 = bce(pos2, pool2, neg_b) + bce(pos2, pool2, neg_a) + d_lambda * bce(pos2, pool2, neg_c)
    p_teacher = F.softmax((0.5 * (s1 + s2)).detach() / T, dim=-1)
    L_KD1 = T ** 2 * F.kl_div(F.log_softmax(s1 / T, dim=-1), p_teacher, reduction="sum")
    L_KD2 = T ** 2 * F.kl_div(F.log_softmax(s2 / T, dim=-1), p_teacher, reduction="sum")
    return L1 + L2 + kd_gamma * (L_KD1 + L_KD2), L_KD1


@pytest.mark.parametrize("tau, gamma", [(1.0, 1.0), (5.0, 0.3)])  # the published Beauty / LastFM picks
def test_batch_sum_is_the_authors_distillation(tau, gamma):
    s_self, s_peer = _scores(1, rows=7, n=9), _scores(2, rows=7, n=9)
    kw = dict(strategy=MultiViewTopMNegative(1), loss_fn=bce_loss, alpha=1.0, beta=1.0, gamma=gamma, beta_div=1.0,
              tau=tau, mu=0.01)
    summed = mdcns_losses(s_self, s_peer, kl_reduction="batch_sum", **kw)
    authors, authors_kd1 = _authors_iteration_loss(s_self, s_peer, kd_gamma=0.01, T=tau, d_lambda=gamma)
    assert torch.allclose(summed.self_dis, authors_kd1, rtol=1e-5)
    assert torch.allclose(summed.self_total + summed.peer_total, authors, rtol=1e-5)
    grads = torch.autograd.grad(summed.self_total + summed.peer_total, (s_self, s_peer))
    expected = torch.autograd.grad(authors, (s_self, s_peer))
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, expected))
    # per row, batch_sum with mu is mean with mu * B (0.01 at B = 1024 is 10.24)
    mean = mdcns_losses(s_self, s_peer, kl_reduction="mean", **{**kw, "mu": 0.01 * 7})
    assert torch.allclose(mean.self_total, summed.self_total) and torch.allclose(mean.peer_total, summed.peer_total)
    assert not torch.allclose(mdcns_losses(s_self, s_peer, **kw).self_total, summed.self_total)
    with pytest.raises(ValueError, match="mdcns_kl_reduction"):
        distillation_loss(s_self, s_peer, 1.0, "sum")


def test_total_loss_eq13():
    assert total_loss(torch.tensor(2.0), torch.tensor(3.0), 0.5) == 3.5
    assert total_loss(torch.tensor(2.0), torch.tensor(float("nan")), 0.0) == 2.0  # mu = 0: term dropped


def _scores(seed, rows=5, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 1 + n, generator=g).requires_grad_()


def test_mdcns_losses_are_symmetric_and_isolated():
    s_self, s_peer = _scores(1), _scores(2)
    kw = dict(strategy=MultiViewTopMNegative(1), loss_fn=bpr_loss, alpha=1.0, beta=0.7, gamma=1.3,
              beta_div=1.0, tau=2.0, mu=0.9)
    out = mdcns_losses(s_self, s_peer, **kw)
    swapped = mdcns_losses(s_peer, s_self, **kw)
    assert torch.allclose(out.self_total, swapped.peer_total) and torch.allclose(out.peer_total, swapped.self_total)
    assert torch.equal(out.negatives[:, [1, 0, 2]], swapped.negatives)
    # Each model's loss only reaches that model's scores (teacher and selection are detached).
    (g_peer,) = torch.autograd.grad(out.self_total, s_peer, allow_unused=True, materialize_grads=True)
    assert (g_peer == 0).all()
    (g_self,) = torch.autograd.grad(out.peer_total, s_self, allow_unused=True, materialize_grads=True)
    assert (g_self == 0).all()
    # Eq. 13 and its parts, recomputed from the pieces.
    pool = s_self[:, 1:]
    rec = ranking_loss(s_self[:, 0], pool, out.negatives, (1.0, 0.7, 1.3), bpr_loss)
    teacher = teacher_scores([s_self.detach(), s_peer.detach()])
    dis = distillation_loss(s_self, teacher, 2.0)
    assert torch.allclose(out.self_total, rec + 0.9 * dis)


def test_mdcns_losses_positive_in_softmax_and_extra_teachers():
    s_self, s_peer, extra = _scores(1), _scores(2), _scores(3).detach()
    kw = dict(strategy=MultiViewTopMNegative(1), loss_fn=bpr_loss, alpha=0.0, beta=0.0, gamma=0.0, mu=1.0)
    with_pos = mdcns_losses(s_self, s_peer, **kw)
    pool_only = mdcns_losses(s_self, s_peer, include_positive=False, **kw)
    teacher = teacher_scores([s_self.detach(), s_peer.detach()])
    assert torch.allclose(with_pos.self_dis, distillation_loss(s_self, teacher, 1.0))
    assert torch.allclose(pool_only.self_dis, distillation_loss(s_self[:, 1:], teacher[:, 1:], 1.0))
    three = mdcns_losses(s_self, s_peer, [extra], agg="sum", **kw)
    teacher3 = s_self.detach() + s_peer.detach() + extra
    assert torch.allclose(three.peer_dis, distillation_loss(s_peer, teacher3, 1.0))
    # The divergence stays self-vs-peer; the extra teacher only moves the teacher view.
    kw_rank = dict(kw, gamma=1.0, mu=0.0)
    base = mdcns_losses(s_self, s_peer, **kw_rank).negatives
    moved = mdcns_losses(s_self, s_peer, [extra * 100], **kw_rank).negatives
    assert torch.equal(base[:, :2], moved[:, :2])
    d = divergence(s_self[:, 1:], s_peer[:, 1:]).detach()
    assert torch.equal(moved[:, 2], rerank(teacher_scores([s_self, s_peer, extra * 100])[:, 1:].detach(), d, 1.0)
                       .argmax(1))


def test_multiview_strategy_stacks_views():
    views = [torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[3.0, 1.0, 2.0]])]
    assert MultiViewTopMNegative(1).select(views).tolist() == [[2, 0]]
    assert MultiViewTopMNegative(2).m == 2


def test_score_ensemble_standardises_each_member():
    class Fixed(torch.nn.Module):
        ITEM_ID = "item_id"

        def __init__(self, scores):
            super().__init__()
            self.scores = scores

        def full_sort_predict(self, interaction):
            return self.scores

    a = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    ens = ScoreEnsemble([Fixed(a), Fixed(a * 1000 + 7)])  # same ranking on another scale
    inter = Interaction({"item_id": torch.tensor([3])})
    got = ens.full_sort_predict(inter)
    assert torch.allclose(got, 2 * ScoreEnsemble.standardize(a))
    assert torch.allclose(ens.predict(inter), got[:, 3])


# =========================================================================== config
@pytest.mark.parametrize("overrides, key", [
    ({"mdcns_peer_model": "NoSuchModel"}, "mdcns_peer_model"),
    ({"mdcns_peer_model": "BPR"}, "mdcns_peer_model"),
    ({"mdcns_peer_model": "DIN"}, "mdcns_peer_model"),
    ({"mdcns_alpha": -1.0}, "mdcns_alpha"),
    ({"mdcns_beta_div": float("nan")}, "mdcns_beta_div"),
    ({"mdcns_mu": "high"}, "mdcns_mu"),
    ({"mdcns_tau": 0}, "mdcns_tau"),
    ({"mdcns_alpha": 0, "mdcns_beta": 0, "mdcns_gamma": 0, "mdcns_mu": 0}, "cannot all be 0"),
    ({"mu": 0}, "set mdcns_mu instead"),
    ({"mdcns_teacher_agg": "max"}, "mdcns_teacher_agg"),
    ({"mdcns_kl_include_positive": "yes"}, "mdcns_kl_include_positive"),
    ({"mdcns_kl_reduction": "sum"}, "mdcns_kl_reduction"),
    ({"mdcns_peer_config": {"learner": "sgd"}}, "learner"),
    ({"mdcns_peer_config": {"model": "SASRec"}}, "mdcns_peer_config"),
    ({"mdcns_peer_config": [1, 2]}, "mdcns_peer_config"),
    ({"mdcns_extra_teachers": ["/no/such/teacher.pth"]}, "mdcns_extra_teachers"),
])
def test_validate_config_names_key(tiny_data, tmp_path, overrides, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp_path, **{**MDCNS, **overrides}))


def test_defaults_from_yaml(tiny_data, tmp_path):
    config = create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp_path, neg_sampler="mdcns"))
    assert config["candidate_num"] == 100 and config["top_m"] == 1
    assert config["mdcns_peer_model"] == "GRU4Rec" and config["mdcns_teacher_agg"] == "mean"
    assert [config[f"mdcns_{k}"] for k in ("alpha", "beta", "gamma", "beta_div", "tau", "mu")] == [1.0] * 6
    assert config["mdcns_kl_include_positive"] is True and config["mdcns_kl_reduction"] == "mean"


def test_authors_preset(tiny_data, tmp_path):
    """``presets/mdcns_authors.yaml`` loads under a run's own values, with a Mamba4Rec peer at the authors' sizes,
    and trains."""
    from recbole_mdcns.companion_models import companion_config
    from recbole_mdcns.config import preset_yaml

    run = {key: value for key, value in tiny_config(tiny_data, tmp_path).items()
           if key not in ("hidden_size", "embedding_size", "inner_size", "n_layers", "n_heads", "topk",
                          "MAX_ITEM_LIST_LENGTH", "train_batch_size", "valid_metric", "epochs")}
    config = create_config("SASRec", "tiny", config_file_list=[preset_yaml("mdcns_authors")],
                           config_dict={**run, "mdcns_gamma": 0.3, "mdcns_tau": 5.0})  # LastFM's published pick
    assert config["neg_sampler"] == "mdcns" and config["neg_loss"] == "bce" and config["train_batch_size"] == 1024
    assert (config["mdcns_kl_reduction"], config["mdcns_mu"], config["mdcns_teacher_agg"]) == (
        "batch_sum", 0.01, "mean")
    assert (config["mdcns_gamma"], config["mdcns_tau"], config["mdcns_alpha"], config["mdcns_beta"]) == (0.3, 5.0, 1, 1)
    assert (config["hidden_dropout_prob"], config["attn_dropout_prob"], config["n_layers"], config["n_heads"]) == (
        0.5, 0.5, 2, 2)
    assert (config["valid_metric"], config["stopping_step"], config["epochs"]) == ("NDCG@20", 30, 300)
    assert (config["candidate_exclude"], config["candidate_distinct"]) == ("row", True)  # neg_sample_dns_unique
    peer = companion_config(config, config["mdcns_peer_model"], config["mdcns_peer_config"])
    assert peer["model"] == "Mamba4Rec"
    assert [peer[k] for k in ("hidden_size", "num_layers", "d_state", "d_conv", "expand", "dropout_prob")] == [
        64, 2, 16, 4, 2, 0.5]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        result = recbole_mdcns.run_recbole("SASRec", "tiny", config_file_list=[preset_yaml("mdcns_authors")],
                                           config_dict={**run, "epochs": 1, "candidate_num": 20,
                                                        "MAX_ITEM_LIST_LENGTH": 8})
    assert 0.0 <= result["best_valid_result"]["ndcg@20"] <= 1.0
    assert result["train_info"]["extra_valid_results"][0]["peer"]["ndcg@20"] >= 0.0


# =========================================================================== one real batch
@pytest.fixture(scope="module")
def real_batch(tiny_data, tmp_path_factory):
    """An MDCNS module attached to the tiny train data, and one training batch."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, init_seed

    from recbole_mdcns.data import candidate_train_loader

    tmp = tmp_path_factory.mktemp("batch")
    peer = {"hidden_size": 24, "embedding_size": 16, "learning_rate": 0.002}
    overrides = {**MDCNS, "mdcns_peer_config": peer}
    config = create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp, **overrides))
    init_seed(config["seed"], config["reproducibility"])
    train, valid, _ = data_preparation(config, create_dataset(config))
    train = candidate_train_loader(config, train)
    model = get_model("SASRec")(config, train._dataset).to(config["device"])
    module = MDCNSModule(model, torch.optim.Adam(model.parameters(), lr=1e-3), config)
    module.attach(train._dataset)
    return module, next(iter(train)).to(config["device"]), train


def test_pool_eq2_excludes_training_items(real_batch):
    module, batch, train = real_batch
    candidates = batch[CANDIDATES].cpu().long()
    users = batch[train._dataset.uid_field].cpu().long().unsqueeze(1).expand_as(candidates)
    assert candidates.shape == (len(batch), 20)
    assert not train._sampler.is_used(users.reshape(-1), candidates.reshape(-1)).any()


def test_scores_eq3_match_predict(real_batch):
    module, batch, _ = real_batch
    module.eval()
    try:
        with torch.no_grad():
            s_self, s_peer, _ = module.scores(batch)
            items = torch.cat([batch[module.model.POS_ITEM_ID].unsqueeze(1), batch[CANDIDATES]], 1)
            for model, scores in ((module.model, s_self), (module.peer, s_peer)):
                for j in (0, 1, 20):
                    single = Interaction(dict(batch.interaction))
                    single.update(Interaction({model.ITEM_ID: items[:, j]}))
                    assert torch.allclose(scores[:, j], model.predict(single), atol=1e-5)
    finally:
        module.train()


def test_one_encoder_pass_per_model(real_batch, monkeypatch):
    module, batch, _ = real_batch
    module.losses(batch)  # builds and verifies the scorers
    calls = {"self": 0, "peer": 0}
    for name, model in (("self", module.model), ("peer", module.peer)):
        original = model.forward

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, "forward", counted)
    parts = module.losses(batch)
    assert calls == {"self": 1, "peer": 1}
    (parts.self_total + parts.peer_total).backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in module.peer.parameters())
    module.zero_grad()


def test_peer_built_from_peer_config_with_own_param_group(real_batch):
    module, _, _ = real_batch
    assert type(module.peer).__name__ == "GRU4Rec"
    assert module.peer.hidden_size == 24 and module.peer.embedding_size == 16  # mdcns_peer_config wins
    groups = module.optimizer.param_groups
    assert len(groups) == 2
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.peer.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in module.model.parameters()}
    assert groups[0]["lr"] == 0.001 and groups[1]["lr"] == 0.002  # the peer's own learning_rate


def test_gradient_clipping_is_per_model(real_batch):
    module, batch, _ = real_batch
    parts = module.losses(batch)
    (100 * (parts.self_total + parts.peer_total)).backward()
    module.configure_gradient_clipping(module.optimizer, gradient_clip_val=0.01)
    for model in (module.model, module.peer):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
        assert norm == pytest.approx(0.01, rel=1e-3)  # each model clipped to the bound on its own
    module.zero_grad()


# =========================================================================== DDP == one process
NO_DROPOUT_PEER = {"hidden_size": 24, "embedding_size": 16, "dropout_prob": 0.0}


@pytest.fixture(scope="module")
def split_data(tiny_data, tmp_path_factory):
    """A config without dropout (same scores in every pass) and the tiny training data."""
    from recbole.data import create_dataset, data_preparation

    from recbole_mdcns.data import candidate_train_loader

    tmp = tmp_path_factory.mktemp("split")
    overrides = {**MDCNS, "mdcns_peer_config": NO_DROPOUT_PEER, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0,
                 "mdcns_mu": 0.5, "mdcns_tau": 2.0}
    config = create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp, **overrides))
    train, _, _ = data_preparation(config, create_dataset(config))
    return config, candidate_train_loader(config, train)


def _fresh_module(config, train, reduction: str, positions: str) -> MDCNSModule:
    from recbole.utils import get_model, init_seed

    from recbole_mdcns.full_sequence import plan_positions

    config["mdcns_kl_reduction"] = reduction
    init_seed(config["seed"], True)
    model = get_model("SASRec")(config, train._dataset)
    module = MDCNSModule(model, torch.optim.Adam(model.parameters(), lr=1e-3), config)
    module.attach(train._dataset)
    probe = train.probe_batch()
    module.prepare_scorers(probe)
    assert plan_positions(module, probe, positions)[0] == (positions == "all")
    return module


def _ddp_gradient(module, batches, world: int, monkeypatch) -> list[torch.Tensor]:
    """What DDP applies when each of ``batches`` is one rank's: the mean over ranks of each rank's gradient
    of ``training_step`` (which scales by ``LOSS_SCALE`` under ``train_positions: all``)."""
    monkeypatch.setattr(module, "world_size", lambda: world)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)  # no Trainer here: nothing to log to
    params = [p for p in module.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for batch in batches:
        module.zero_grad()
        module.training_step(batch, 0).backward()
        total = [t + (p.grad if p.grad is not None else 0) for t, p in zip(total, params)]
    module.zero_grad()
    return [t / len(batches) for t in total]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(a, b))


def _rank_shares(train, world: int) -> tuple[Interaction, list[Interaction]]:
    """The first global batch of windows, whole and as ``world`` ranks' shares (with the whole batch's
    candidate pools, so that both see the same rows)."""
    from recbole_mdcns.full_sequence import (
        TARGET_POSITION, WindowBatchSampler, WindowCollate, Windows, user_sequences,
    )

    inter = train._dataset.inter_feat
    seqs = user_sequences(inter["user_id"], inter["item_id"], inter["item_id_list"], inter["item_length"])
    windows = Windows.build(seqs, train.config["MAX_ITEM_LIST_LENGTH"], 3)
    whole = WindowCollate(windows, train)(next(iter(WindowBatchSampler(windows.targets, 57, False, 0))))
    shares = [WindowCollate(windows, train, world)(next(iter(WindowBatchSampler(windows.targets, 57, False, 0,
                                                                                 world, rank))))
              for rank in range(world)]
    key = lambda b: b["user_id"] * 100_000 + b[TARGET_POSITION]  # noqa: E731
    for share in shares:
        index = (key(share).unsqueeze(1) == key(whole).unsqueeze(0)).long().argmax(1)
        assert torch.equal(key(whole)[index], key(share))
        share.interaction[CANDIDATES] = whole[CANDIDATES][index]
    assert sum(len(share["item_id"]) for share in shares) == len(whole["item_id"])
    return whole, shares


@pytest.mark.parametrize("reduction", ["mean", "batch_sum"])
def test_ddp_gradient_equals_one_process_all_positions(split_data, reduction, monkeypatch):
    """Three ranks' shares of a full-sequence global batch (unequal target counts) give DDP the gradient
    of the whole batch in one process, for both KL reductions."""
    config, train = split_data
    module = _fresh_module(config, train, reduction, "all")
    whole, shares = _rank_shares(train, 3)
    assert len({len(share["item_id"]) for share in shares}) > 1
    one = _ddp_gradient(module, [whole], 1, monkeypatch)
    assert _same(_ddp_gradient(module, shares, 3, monkeypatch), one)
    if reduction == "batch_sum":  # without the rank factor each rank's summed KL would count for a third
        assert not _same(_ddp_gradient(module, shares, 1, monkeypatch), one)


@pytest.mark.parametrize("reduction", ["mean", "batch_sum"])
def test_ddp_gradient_equals_one_process_prefix_rows(split_data, reduction, monkeypatch):
    """Prefix rows: each rank holds B / 2 rows (Lightning's DistributedSampler), no LOSS_SCALE."""
    config, train = split_data
    module = _fresh_module(config, train, reduction, "last")
    whole = next(iter(train))
    half = len(whole) // 2
    shares = [whole[torch.arange(half)], whole[torch.arange(half, 2 * half)]]
    whole = whole[torch.arange(2 * half)]
    one = _ddp_gradient(module, [whole], 1, monkeypatch)
    assert _same(_ddp_gradient(module, shares, 2, monkeypatch), one)
    if reduction == "batch_sum":
        assert not _same(_ddp_gradient(module, shares, 1, monkeypatch), one)


# =========================================================================== full runs
@contextlib.contextmanager
def _capture_modules():
    built = []
    original = NegSamplingTrainer.build_module

    def build(trainer):
        module = original(trainer)
        built.append(module)
        return module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NegSamplingTrainer, "build_module", build)
        yield built


def _run(data, folder: Path, model="SASRec", capture=False, **overrides):
    """One ``run_recbole`` in its own folder (log/, checkpoints); returns (result, module or None, folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(data, folder, **{**MDCNS, **overrides})
    with pytest.MonkeyPatch.context() as patch, _capture_modules() as built:
        patch.chdir(folder)
        result = recbole_mdcns.run_recbole(model, "tiny", config_dict=config)
    return result, (built[-1] if built else None), folder


def _last_ckpt(folder: Path) -> Path:
    (path,) = (folder / "saved").glob("*-lightning/last.ckpt")
    return path


def _best_pth(folder: Path) -> Path:
    (path,) = (folder / "saved").glob("*.pth")
    return path


@pytest.fixture(scope="module")
def two_epochs(tiny_data, tmp_path_factory):
    return _run(tiny_data, tmp_path_factory.mktemp("full"), epochs=2)


def _sane(result):
    test = result["test_result"]
    assert set(test) == {"recall@10", "ndcg@10"}
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in test.values())


def test_full_run_trains_self_and_peer(two_epochs):
    result, module, folder = two_epochs
    _sane(result)
    assert result["best_valid_result"]["recall@10"] > 0
    # The peer and the ensemble were validated after each epoch, with RecBole's evaluator.
    assert [r["epoch"] for r in module.extra_valid_results] == [0, 1]
    for record in module.extra_valid_results:
        for name in ("peer", "ensemble"):
            assert 0.0 <= record[name]["ndcg@10"] <= 1.0
    assert result["train_info"]["extra_valid_results"] == module.extra_valid_results  # also in the result
    # Both models (and both optimizer states) are in the Lightning checkpoint.
    ckpt = torch.load(_last_ckpt(folder), map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("peer.") for k in keys)
    assert len(ckpt["optimizer_states"][0]["param_groups"]) == 2
    peer_state = {k[5:]: v for k, v in ckpt["state_dict"].items() if k.startswith("peer.")}
    assert all(torch.equal(v, module.peer.state_dict()[k].cpu()) for k, v in peer_state.items())
    # RecBole's saved best model is the self model, as RecBole saves it.
    best = torch.load(_best_pth(folder), map_location="cpu", weights_only=False)
    assert best["config"]["model"] == "SASRec" and "item_embedding.weight" in best["state_dict"]


def test_same_seed_same_metrics(two_epochs, tiny_data, tmp_path):
    again, _, _ = _run(tiny_data, tmp_path / "again", epochs=2)
    assert again["test_result"] == two_epochs[0]["test_result"]
    assert again["best_valid_result"] == two_epochs[0]["best_valid_result"]


def test_resume_from_lightning_checkpoint_matches_uninterrupted(two_epochs, tiny_data, tmp_path):
    _, _, first = _run(tiny_data, tmp_path / "first", epochs=1)
    resumed, module, _ = _run(tiny_data, tmp_path / "resumed", epochs=2, resume_from=str(_last_ckpt(first)))
    for key in ("recall@10", "ndcg@10"):
        assert resumed["test_result"][key] == pytest.approx(two_epochs[0]["test_result"][key], abs=1e-6)
    assert resumed["best_valid_result"] == two_epochs[0]["best_valid_result"]
    # the record of the run holds every validation, those before the resume too: the self model's scores, and
    # the peer's and the ensemble's results (the summary reads them at the best epoch, which may precede a resume)
    uninterrupted = two_epochs[0]["train_info"]
    assert [e for e, _ in resumed["train_info"]["valid_scores"]] == [0, 1]
    assert resumed["train_info"]["valid_scores"] == uninterrupted["valid_scores"]
    assert [r["epoch"] for r in module.extra_valid_results] == [0, 1]
    assert resumed["train_info"]["extra_valid_results"] == uninterrupted["extra_valid_results"]


NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0}


def test_ablation_without_multi_source_is_dns(tiny_data, tmp_path):
    """mu = beta_div = beta = gamma = 0 leaves self with DNS(M=1, N): same metrics as ``neg_sampler: dns``."""
    ablated, module, _ = _run(tiny_data, tmp_path / "ablated", epochs=2, mdcns_mu=0.0, mdcns_beta_div=0.0, mdcns_beta=0.0, mdcns_gamma=0.0,
                              mdcns_peer_config={"hidden_size": 24, "dropout_prob": 0.0}, **NO_DROPOUT)
    assert module.peer is not None and module.extra_valid_results  # the peer still trains alongside
    dns, _, _ = _run(tiny_data, tmp_path / "dns", epochs=2, neg_sampler="dns", **NO_DROPOUT)
    for key in ("recall@10", "ndcg@10"):
        assert ablated["test_result"][key] == pytest.approx(dns["test_result"][key], abs=1e-6)


def _forged(source: Path, folder: Path, dataset=None, items=None) -> str:
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    if dataset:
        checkpoint["config"] = copy.deepcopy(checkpoint["config"])
        checkpoint["config"]["dataset"] = dataset
    if items:
        weight = checkpoint["state_dict"]["item_embedding.weight"]
        checkpoint["state_dict"]["item_embedding.weight"] = weight[:items]
    path = folder / f"forged-{dataset}-{items}.pth"
    torch.save(checkpoint, path)
    return str(path)


def test_extra_teacher_checks_its_dataset(two_epochs, real_batch, tmp_path):
    _, _, folder = two_epochs
    module, _, train = real_batch
    good = load_frozen_model(str(_best_pth(folder)), module.config, train._dataset, "mdcns_extra_teachers")
    assert not good.training and not any(p.requires_grad for p in good.parameters())
    with pytest.raises(ValueError, match="dataset 'other'"):
        load_frozen_model(_forged(_best_pth(folder), tmp_path, dataset="other"), module.config, train._dataset, "mdcns_extra_teachers")
    with pytest.raises(ValueError, match="items"):
        load_frozen_model(_forged(_best_pth(folder), tmp_path, items=40), module.config, train._dataset, "mdcns_extra_teachers")
    with pytest.raises(ValueError, match="not a RecBole checkpoint"):
        torch.save({"weights": 1}, tmp_path / "bad.pth")
        load_frozen_model(str(tmp_path / "bad.pth"), module.config, train._dataset, "mdcns_extra_teachers")


def test_run_with_frozen_extra_teacher(two_epochs, tiny_data, tmp_path, recwarn):
    teacher_path = str(_best_pth(two_epochs[2]))
    saved = torch.load(teacher_path, map_location="cpu", weights_only=False)["state_dict"]
    result, module, folder = _run(tiny_data, tmp_path / "teacher", epochs=1, mdcns_extra_teachers=[teacher_path],
                                  mdcns_teacher_agg="sum", mdcns_kl_include_positive=False)
    _sane(result)
    # the frozen teacher is in eval mode by design: MDCNS declares Lightning's notice of it harmless, and only then
    assert not [w for w in recwarn if "in eval mode at the start of training" in str(w.message)]
    assert module.harmless_warnings and not NegativeSamplingModule.harmless_warnings
    (teacher,) = module.teachers
    module.train()
    assert module.model.training and module.peer.training
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    in_optimizer = {id(p) for group in module.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in teacher.state_dict().items())  # untouched by training
    lightning = torch.load(_last_ckpt(folder), map_location="cpu", weights_only=True)
    assert any(k.startswith("teachers.0.") for k in lightning["state_dict"])


def test_wrong_dataset_teacher_fails_the_run_clearly(two_epochs, tmp_path):
    other = write_dataset(tmp_path / "other_data", n_items=45, seed=3)  # same name 'tiny', fewer items
    with pytest.raises(ValueError, match="items"):
        _run(other, tmp_path / "wrong", epochs=1, mdcns_extra_teachers=[str(_best_pth(two_epochs[2]))])


# =========================================================================== DDP
def test_ddp_two_cpu_processes_one_epoch(tiny_data, tmp_path):
    """Lightning's subprocess launcher re-runs ``python -m recbole_mdcns ...`` for rank 1 (with the
    authors' batch-summed KL, whose rank factor ``kl_factor`` is then 2)."""
    # use_gpu: False -- with accelerator=cpu alone, a CUDA machine fails in RecBole's get_environment
    # (config["use_gpu"] stays True while config["device"] is the CPU); see the report to the lead.
    config = tiny_config(tiny_data, tmp_path, **MDCNS, state="INFO", use_gpu=False)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "recbole_mdcns", "--model=SASRec", "--dataset=tiny", "--neg_sampler=mdcns",
               "--accelerator=cpu", "--devices=2", "--strategy=ddp", "--epochs=1", "--mdcns_kl_reduction=batch_sum",
               f"--config_files={config_file}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    lines = [line for line in output.splitlines() if "test result" in line]
    assert lines, output[-4000:]
    # The repr differs across Python / NumPy versions: [('recall@10', 0.1), ...] or {'recall@10': np.float64(0.1), ...}
    metric = r"'{}'[,:]\s*(?:np\.float\d+\()?([0-9.]+)"
    recall, ndcg = (float(re.search(metric.format(key), lines[-1]).group(1)) for key in ("recall@10", "ndcg@10"))
    assert 0.0 <= ndcg <= recall <= 1.0
    assert "peer valid result" in output and "ensemble valid result" in output
    assert "train_loss1" in output and "train_loss2" in output
    assert re.search(r"mdcns_kl_reduction = batch_sum", output), output[-4000:]
