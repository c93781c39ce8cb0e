"""neg_sampler=srns: likelihood, variance criterion and memory update on hand-made scores; histories that
follow their items through memory updates; the module on a real batch; a SASRec run whose resume equals
the uninterrupted run."""
from __future__ import annotations

import math

import pytest
import torch

import recbole_mdcns
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.methods.srns import (SRNSModule, first_occurrences, history_std, memory_update,
                                        positive_likelihood, variance_select, warm_alpha)

from conftest import tiny_config
from real_batches import checkpoint_path, last_checkpoint, sampler_setup

NAN = float("nan")

# --------------------------------------------------------------------------- rules on hand-made scores


def test_positive_likelihood_is_sigmoid_of_the_margin():
    p = positive_likelihood(torch.tensor([[0.0, 2.0]]), torch.tensor([1.0]))
    assert torch.allclose(p, torch.sigmoid(torch.tensor([[-1.0, 1.0]])))


def test_history_std_ignores_unobserved_epochs():
    history = torch.tensor([[1.0, 3.0, NAN], [2.0, NAN, NAN], [NAN, NAN, NAN], [0.0, 0.0, 3.0]])
    assert torch.allclose(history_std(history), torch.tensor([1.0, 0.0, 0.0, math.sqrt(2.0)]))


def test_variance_select_trades_score_for_variance():
    likelihood = torch.tensor([[0.9, 0.5, 0.6]] * 3)
    std = torch.tensor([[0.0, 0.3, 0.01]] * 3)
    valid = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])
    picks = [variance_select(likelihood[i:i + 1], std[i:i + 1], alpha, valid[i:i + 1]).item()
             for i, alpha in enumerate((1.0, 2.0, 0.0))]
    assert picks == [0, 1, 2]  # 0.9 > 0.8; 1.1 > 0.9; slot 0 invalid: the best valid score


def test_warm_start():
    assert [warm_alpha(5.0, e, 50) for e in (0, 25, 50, 80)] == [0.0, 2.5, 5.0, 5.0]
    assert warm_alpha(5.0, 0, 0) == 5.0


def test_first_occurrences():
    items = torch.tensor([[4, 2, 4, 0, 2, 9]])
    assert first_occurrences(items).tolist() == [[True, True, False, False, False, True]]


def test_memory_update_draws_distinct_valid_items_by_softmax():
    torch.manual_seed(0)
    scores = torch.tensor([[5.0, 1.0, 4.0, 3.0, 9.0]])
    valid = torch.tensor([[True, True, True, True, False]])
    assert sorted(memory_update(scores, valid, 3, 1e-3)[0].tolist()) == [0, 2, 3]  # cold: the top 3 valid
    assert memory_update(scores, torch.tensor([[True, False, False, False, False]]), 2, 1.0).tolist() == [[0, -1]]
    counts = torch.zeros(5)
    for _ in range(2000):
        pick = memory_update(scores, valid, 2, 2.0)[0]
        assert pick[0] != pick[1]
        counts[pick] += 1
    assert counts[4] == 0 and counts[0] > counts[2] > counts[3] > counts[1]


# --------------------------------------------------------------------------- the module on a real batch


@pytest.fixture(scope="module")
def sasrec(tiny_data, tmp_path_factory):
    return sampler_setup("SASRec", "srns", tiny_data, tmp_path_factory.mktemp("srns"), candidate_num=12,
                         srns_memory_size=4, srns_history=3, srns_warmup=0, srns_temperature=1.0)


def test_memory_per_training_target_filled_before_read_and_selection_is_the_criterion(sasrec):
    config, model, optimizer, batch, train_data = sasrec
    model.eval()
    module = SRNSModule(model, optimizer, config)
    module.prepare(train_data._dataset)
    dataset = train_data._dataset
    assert len(module.keys) == len(torch.unique(dataset.inter_feat["user_id"] * model.n_items
                                                + dataset.inter_feat["item_id"]))  # one memory per target
    users, pool, positives = batch[model.USER_ID], batch[CANDIDATES], batch[model.POS_ITEM_ID]
    targets = module.target_index(users, positives)
    assert torch.equal(module.keys[targets], users * model.n_items + positives)
    module.fill_empty(targets, pool)
    memory = module.memory[targets].clone()
    assert (memory > 0).all() and first_occurrences(memory).all()  # S1 distinct real items from the pool
    assert all(set(memory[r].tolist()) <= set(pool[r].tolist()) for r in range(len(targets)))
    # give every memory slot a history so that the variance matters: std grows with the slot index
    history = torch.tensor([[0.5, 0.5, 0.5], [0.4, 0.5, 0.6], [0.1, 0.5, 0.9], [0.0, 1.0, NAN]])
    module.history[:] = history
    torch.manual_seed(0)
    loss = module.training_loss(batch)
    scorer = module.scorers["self"]
    with torch.no_grad():
        s = scorer(model, batch, torch.cat([positives.unsqueeze(1), memory], 1))
    criterion = torch.sigmoid(s[:, 1:] - s[:, :1]) + config["srns_alpha"] * history_std(history)
    expected = memory.gather(1, criterion.argmax(1, keepdim=True))
    s_neg = scorer(model, batch, torch.cat([positives.unsqueeze(1), expected], 1))
    assert torch.allclose(loss, module.loss_fn(s_neg[:, 0], s_neg[:, 1]), atol=1e-6)
    assert module.variance_picks > 0  # with alpha = 5 the std changes some picks
    with pytest.raises(KeyError, match="training target"):
        module.target_index(users[:1], torch.tensor([0]))


def test_histories_follow_their_items_through_memory_updates(sasrec):
    config, model, optimizer, _, train_data = sasrec
    module = SRNSModule(model, optimizer, config)
    module.prepare(train_data._dataset)
    module.memory[1] = torch.tensor([11, 12, 13, 14])
    module.history[1] = torch.tensor([[0.1, 0.2, NAN], [0.3, 0.3, NAN], [0.5, 0.9, NAN], [0.7, 0.7, NAN]])
    module.epoch_sum[1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    module.epoch_count[1] = torch.tensor([1.0, 1.0, 2.0, 2.0])
    # candidates [11 12 13 14 | 21 22 13]: the cold update keeps the 4 best: 21, 13, 11, 22 (13 listed once)
    scores = torch.tensor([[3.0, -5.0, 6.0, -4.0, 9.0, 2.0, 6.0]])
    module.temperature = 1e-3
    module.update_memory(torch.tensor([1]), torch.tensor([[21, 22, 13]]), scores)
    memory = module.memory[1].tolist()
    assert sorted(memory) == [11, 13, 21, 22]
    slot = {item: memory.index(item) for item in memory}
    assert torch.allclose(module.history[1, slot[13]], torch.tensor([0.5, 0.9, NAN]), equal_nan=True)
    assert torch.allclose(module.history[1, slot[11]], torch.tensor([0.1, 0.2, NAN]), equal_nan=True)
    assert module.history[1, slot[21]].isnan().all() and module.history[1, slot[22]].isnan().all()
    assert module.epoch_sum[1, slot[13]] == 3.0 and module.epoch_count[1, slot[21]] == 0
    module.close_epoch(2)  # epoch 2 -> column 2 of a 3-epoch history: this epoch's mean P_pos
    assert module.history[1, slot[13], 2] == 1.5 and module.history[1, slot[11], 2] == 1.0
    assert module.history[1, slot[21], 2].isnan() and module.epoch_count.sum() == 0


def test_checkpoint_roundtrip(sasrec):
    config, model, optimizer, batch, train_data = sasrec
    module = SRNSModule(model, optimizer, config)
    module.prepare(train_data._dataset)
    torch.manual_seed(0)
    module.training_loss(batch)
    targets = module.target_index(batch[model.USER_ID], batch[model.POS_ITEM_ID])
    assert module.epoch_count.sum() > 0 and module.updates.sum() == targets.unique().numel()
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    fresh = SRNSModule(model, optimizer, config)
    fresh.on_load_checkpoint(checkpoint)
    fresh.prepare(train_data._dataset)  # on_fit_start after a restore keeps the restored state
    for name in ("keys", "memory", "epoch_sum", "epoch_count", "updates"):
        assert torch.equal(getattr(fresh, name), getattr(module, name)), name
    assert torch.allclose(fresh.history, module.history, equal_nan=True)


@pytest.mark.parametrize("key,value", [("srns_memory_size", 0), ("srns_alpha", -1), ("srns_warmup", -1),
                                       ("srns_temperature", 0), ("srns_history", 1), ("top_m", 2)])
def test_validate_config_names_key(tiny_data, tmp_path, key, value):
    with pytest.raises(ValueError, match=key):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, tmp_path, neg_sampler="srns",
                                                                **{"candidate_num": 20, key: value}))


# --------------------------------------------------------------------------- runs


def test_sasrec_run_checkpoint_and_resume(tiny_data, tmp_path, in_tmp):
    def run(name, epochs, **extra):
        return recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=tiny_config(
            tiny_data, tmp_path / name, neg_sampler="srns", epochs=epochs, candidate_num=12, srns_memory_size=4,
            srns_warmup=1, srns_temperature=0.1, **extra))

    full = run("full", 4)
    ckpt = last_checkpoint(tmp_path / "full")
    srns, history = ckpt["srns"], ckpt["negatives"]["history"]
    assert (srns["memory"] > 0).all()  # every training target's memory is full
    observed = (~srns["history"].isnan()).sum(-1)
    assert (observed >= 2).float().mean() > 0.1  # items kept, with their history, over epochs
    assert history[0]["alpha"] == 0.0 and history[3]["alpha"] == 5.0 and history[3]["memory_std_mean"] > 0
    assert history[3]["variance_pick_fraction"] > 0 and history[3]["memory_with_history_fraction"] > 0.1
    run("first", 3)
    resumed = run("resumed", 4, resume_from=str(checkpoint_path(tmp_path / "first")))
    after = last_checkpoint(tmp_path / "resumed")
    for key, value in ckpt["state_dict"].items():
        assert torch.allclose(value, after["state_dict"][key], atol=1e-6), key
    assert torch.equal(srns["memory"], after["srns"]["memory"])
    assert torch.allclose(srns["history"], after["srns"]["history"], equal_nan=True)
    assert resumed["test_result"] == full["test_result"]
