"""neg_sampler=gnno: the transition graph, the sparse neighbourhood overlap, the curriculum and the hard
draws on hand-made inputs; the module on a real batch; a SASRec run."""
from __future__ import annotations

import pytest
import torch

import recbole_mdcns
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.methods.gnno import (GNNOModule, hard_negatives, hardness_threshold, neighbourhood_jaccard,
                                        transition_edges)

from conftest import tiny_config
from real_batches import last_checkpoint, sampler_setup

# --------------------------------------------------------------------------- graph and overlap


def test_transition_edges_cover_each_pair_within_three_steps_once():
    # RecBole's rows of the training sequence 5 6 7 8 9: prefixes [5], [5 6], [5 6 7], [5 6 7 8]
    prefix = torch.tensor([[5, 0, 0, 0], [5, 6, 0, 0], [5, 6, 7, 0], [5, 6, 7, 8]])
    src, dst = transition_edges(prefix, torch.tensor([1, 2, 3, 4]), torch.tensor([6, 7, 8, 9]))
    pairs = sorted(zip(src.tolist(), dst.tolist()))
    seq = [5, 6, 7, 8, 9]
    assert pairs == sorted((seq[a], seq[b]) for a in range(5) for b in range(a + 1, min(a + 4, 5)))


def _dense_jaccard(src, dst, n):
    adjacency = torch.zeros(n, n)
    keep = src != dst
    adjacency[src[keep], dst[keep]] = 1
    adjacency[dst[keep], src[keep]] = 1
    common = adjacency @ adjacency.T
    degree = adjacency.sum(1)
    return common / (degree.unsqueeze(1) + degree.unsqueeze(0) - common).clamp_min(1)


def test_jaccard_hand_computed():
    # path 1-2, 1-3, 2-3, 3-4, 4-5: N(1)={2,3} N(2)={1,3} N(3)={1,2,4} N(4)={3,5} N(5)={4}
    src, dst = torch.tensor([1, 1, 2, 3, 4, 2]), torch.tensor([2, 3, 3, 4, 5, 2])  # (2, 2): a self-loop, dropped
    ids, overlaps = neighbourhood_jaccard(src, dst, 6, top_k=5)
    got = {(i, int(j)): float(v) for i in range(6) for j, v in zip(ids[i], overlaps[i]) if j > 0}
    expected = {(1, 2): 1 / 3, (1, 4): 1 / 3, (1, 3): 1 / 4, (2, 1): 1 / 3, (2, 4): 1 / 3, (2, 3): 1 / 4,
                (3, 1): 1 / 4, (3, 2): 1 / 4, (3, 5): 1 / 3, (4, 1): 1 / 3, (4, 2): 1 / 3, (5, 3): 1 / 3}
    assert got.keys() == expected.keys()
    assert all(abs(got[key] - value) < 1e-6 for key, value in expected.items())
    assert (overlaps[:, :-1] >= overlaps[:, 1:]).all()  # sorted by decreasing overlap


def test_jaccard_chunks_cap_and_top_k_match_a_dense_computation():
    torch.manual_seed(0)
    n = 40
    src, dst = torch.randint(1, n, (150,)), torch.randint(1, n, (150,))
    dense = _dense_jaccard(src, dst, n)
    dense.fill_diagonal_(0)
    dense[:, 0] = 0
    dense[dense > 0.3] = 0
    for chunk in (7, 10_000):  # 1 row at a time, or all rows at once: the same lists
        ids, overlaps = neighbourhood_jaccard(src, dst, n, top_k=6, max_overlap=0.3, chunk_entries=chunk)
        assert ids.shape == (n, 6)
        assert torch.allclose(overlaps, dense.topk(6, 1).values)
        assert torch.allclose(dense.gather(1, ids)[ids > 0], overlaps[ids > 0])
        assert (overlaps <= 0.3).all() and ((ids == 0) == (overlaps == 0)).all()


def test_curriculum_threshold():
    assert hardness_threshold(4, 5, 0.1, 0.25) is None
    assert [hardness_threshold(e, 5, 0.1, 0.25) for e in (5, 6, 7, 8)] == pytest.approx([0.0, 0.1, 0.2, 0.25])


def test_hard_negatives_respect_threshold_and_temperature():
    torch.manual_seed(0)
    neighbours = torch.tensor([[7, 8, 9, 0], [4, 5, 0, 0], [3, 0, 0, 0]])
    overlaps = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.5, 0.4, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0]])
    items, found = hard_negatives(neighbours, overlaps, threshold=0.35, tau=1.0, num=200)
    assert set(items[0].tolist()) == {8, 9}  # 7 overlaps too much (a likely false negative)
    assert not found[1].any() and (items[1] == 0).all()  # nothing admissible: no draw
    assert (items[2] == 3).all() and found[2].all()
    share_8 = (items[0] == 8).float().mean()  # exp(0.3) / (exp(0.3) + exp(0.1)) = 0.55
    assert 0.45 < share_8 < 0.65
    sharp, _ = hard_negatives(neighbours, overlaps, threshold=0.35, tau=0.01, num=50)
    assert (sharp[0] == 8).all()  # a low temperature takes the hardest admissible neighbour


# --------------------------------------------------------------------------- the module on a real batch


@pytest.fixture(scope="module")
def sasrec(tiny_data, tmp_path_factory):
    return sampler_setup("SASRec", "gnno", tiny_data, tmp_path_factory.mktemp("gnno"), gnno_start_epoch=0,
                         gnno_pace=0.5, gnno_top_k=20)


def test_graph_from_training_rows(sasrec):
    config, model, optimizer, _, train_data = sasrec
    module = GNNOModule(model, optimizer, config)
    module.prepare(train_data)
    assert module.neighbours.shape == module.overlaps.shape == (model.n_items, 20)
    listed = module.neighbours > 0
    assert listed.any(1).float().mean() > 0.9 and (module.overlaps[listed] <= config["gnno_max_hardness"]).all()
    # each listed pair shares a neighbour in the training transitions
    inter = train_data._dataset.inter_feat
    src, dst = transition_edges(inter["item_id_list"].long(), inter["item_length"].long(), inter["item_id"].long())
    assert torch.allclose(_dense_jaccard(src, dst, model.n_items).gather(1, module.neighbours)[listed],
                          module.overlaps[listed])


def test_training_loss_uses_graph_negatives_outside_the_users_items(sasrec):
    config, model, optimizer, batch, train_data = sasrec
    model.eval()
    module = GNNOModule(model, optimizer, config)
    module.prepare(train_data)
    pool, positives, users = batch[CANDIDATES], batch[model.POS_ITEM_ID], batch[model.USER_ID]
    # epoch 0 = gnno_start_epoch: threshold 0, no neighbour is admissible: all negatives are the pool
    torch.manual_seed(3)
    loss = module.training_loss(batch)
    scores = module.scorers["self"](model, batch, torch.cat([positives.unsqueeze(1), pool], 1))
    assert torch.allclose(loss, module.loss_fn(scores[:, 0], scores[:, 1:]), atol=1e-6)
    assert module.graph_slots == 0 and module.hard_slots == pool.shape[0] * module.num_hard
    # with a threshold of 0.5 the same draw as hard_negatives, minus the users' own items
    module.start = -1  # epoch 0 is now one epoch into the curriculum: threshold 0.5
    torch.manual_seed(3)
    loss = module.training_loss(batch)
    torch.manual_seed(3)
    hard, found = hard_negatives(module.neighbours[positives], module.overlaps[positives], 0.5, 1.0, module.num_hard)
    found &= ~train_data._sampler.is_used(users.unsqueeze(1).expand_as(hard), hard)
    uniform = pool.shape[1] - module.num_hard
    negatives = torch.cat([pool[:, :uniform], torch.where(found, hard, pool[:, uniform:])], 1)
    match = module.neighbours[positives].unsqueeze(2) == hard.unsqueeze(1)
    overlap = (module.overlaps[positives].unsqueeze(2) * match).sum(1)  # J(positive, drawn item)
    assert found.any() and (overlap[found] > 0).all() and (overlap[found] <= 0.5).all()
    scores = module.scorers["self"](model, batch, torch.cat([positives.unsqueeze(1), negatives], 1))
    assert torch.allclose(loss, module.loss_fn(scores[:, 0], scores[:, 1:]), atol=1e-6)


@pytest.mark.parametrize("overrides,key", [
    ({"gnno_num_hard": 6}, "candidate_num"), ({"gnno_num_hard": 0}, "gnno_num_hard"), ({"gnno_top_k": 0}, "gnno_top_k"),
    ({"gnno_pace": 0}, "gnno_pace"), ({"gnno_max_hardness": 1.5}, "gnno_max_hardness"), ({"gnno_tau": 0}, "gnno_tau"),
    ({"gnno_start_epoch": -1}, "gnno_start_epoch"), ({"top_m": 2}, "top_m")])
def test_validate_config_names_key(tiny_data, tmp_path, overrides, key):
    with pytest.raises(ValueError, match=key):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp_path, neg_sampler="gnno", **overrides))


def test_sasrec_run_follows_the_curriculum(tiny_data, tmp_path, in_tmp):
    result = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, tmp_path, neg_sampler="gnno", epochs=3, gnno_start_epoch=1, gnno_pace=0.3))
    history = last_checkpoint(tmp_path)["negatives"]["history"]
    assert history[0]["hardness_threshold"] is None
    assert [h["hardness_threshold"] for h in history[1:]] == pytest.approx([0.0, 0.3])
    assert history[0]["graph_negative_fraction"] == history[1]["graph_negative_fraction"] == 0.0
    assert history[2]["graph_negative_fraction"] > 0.5
    assert result["test_result"]["ndcg@10"] >= 0
