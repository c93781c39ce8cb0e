"""What a candidate pool leaves out (``candidate_exclude``) and whether it repeats items (``candidate_distinct``):
the paper's rule (the user's training items, draws with replacement) against the MDCNS authors' code (the row's
own sequence and target, distinct items), on prefix rows and on ``train_positions: all`` targets."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_config, write_dataset
from real_batches import pool_loader, training_items
from recbole_mdcns import run_recbole
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.full_sequence import (
    ROW_POSITION, ROW_WINDOW, WINDOW_SEQ, WindowBatchSampler, WindowCollate, Windows, user_sequences,
)


def _loader(data: Path, tmp: Path, dataset: str = "tiny", **overrides):
    return pool_loader(data, tmp, dataset, neg_sampler="dns", **overrides)[2]


def test_row_rule_excludes_the_rows_own_items_and_draws_the_users_later_ones(tiny_data, in_tmp):
    loader = _loader(tiny_data, in_tmp, candidate_num=30, candidate_exclude="row")
    user_items, later = training_items(loader), 0
    for batch in loader:
        seqs, targets = batch[loader._sampler.item_seq_field].tolist(), batch["item_id"].tolist()
        for user, seq, target, pool in zip(batch["user_id"].tolist(), seqs, targets, batch[CANDIDATES].tolist()):
            own = {target, *[i for i in seq if i > 0]}
            assert not own & set(pool) and 0 not in pool
            later += len((user_items[user] - own) & set(pool))  # the user's items outside the row: allowed
    assert later > 0


def test_distinct_pools_hold_no_item_twice_and_keep_the_rule(tiny_data, in_tmp):
    loose = _loader(tiny_data, in_tmp, candidate_num=30)
    assert any(len(set(pool)) < 30 for pool in next(iter(loose))[CANDIDATES].tolist())  # draws with replacement
    loader = _loader(tiny_data, in_tmp, candidate_num=30, candidate_distinct=True)
    user_items = training_items(loader)
    for batch in loader:
        for user, pool in zip(batch["user_id"].tolist(), batch[CANDIDATES].tolist()):
            assert len(set(pool)) == 30 and not user_items[user] & set(pool)


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_distinct_row_pools_on_a_full_catalogue_are_every_allowed_item(tmp_path, in_tmp, distribution):
    """20 items, rows of at most 3 + 1 items: a pool of 16 distinct items is every item the row leaves,
    which only the exact draw after the rejection rounds can complete."""
    root = write_dataset(tmp_path / "data", name="small", n_users=12, n_items=20)
    loader = _loader(root, in_tmp, dataset="small", MAX_ITEM_LIST_LENGTH=3, candidate_num=16,
                     candidate_exclude="row", candidate_distinct=True, candidate_distribution=distribution)
    catalogue = set(range(1, loader._dataset.item_num))
    for batch in loader:
        seqs, targets = batch[loader._sampler.item_seq_field].tolist(), batch["item_id"].tolist()
        for seq, target, pool in zip(seqs, targets, batch[CANDIDATES].tolist()):
            own = {target, *[i for i in seq if i > 0]}
            if len(own) == 4:
                assert sorted(pool) == sorted(catalogue - own)
            assert len(set(pool)) == 16 and not own & set(pool)


def test_all_positions_targets_exclude_the_window_up_to_their_position(tiny_data, in_tmp):
    train = _loader(tiny_data, in_tmp, candidate_num=30, train_positions="all", candidate_exclude="row",
                    candidate_distinct=True)
    inter = train._dataset.inter_feat
    seqs = user_sequences(inter["user_id"], inter["item_id"], inter["item_id_list"], inter["item_length"])
    windows, later = Windows.build(seqs, 8, 3), 0
    collate = WindowCollate(windows, train)
    for rows in map(collate, WindowBatchSampler(windows.targets, 50, shuffle=False, seed=0)):
        seq = rows[WINDOW_SEQ]
        for window, position, target, pool in zip(rows[ROW_WINDOW].tolist(), rows[ROW_POSITION].tolist(),
                                                  rows["item_id"].tolist(), rows[CANDIDATES].tolist()):
            own = {target, *seq[window, :position + 1].tolist()} - {0}
            assert not own & set(pool) and len(set(pool)) == 30
            later += len((set(seq[window, position + 1:].tolist()) - {0} - own) & set(pool))
    assert later > 0  # the window's later items are not excluded


def test_the_authors_pools_train_and_reproduce(tiny_data, in_tmp):
    settings = dict(neg_sampler="dns", candidate_num=20, top_m=3, candidate_exclude="row", candidate_distinct=True)
    first = run_recbole("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp / "a", **settings))
    again = run_recbole("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp / "b", **settings))
    paper = run_recbole("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp / "c", neg_sampler="dns",
                                                                  candidate_num=20, top_m=3))
    assert first["test_result"] == again["test_result"]
    assert first["best_valid_score"] != paper["best_valid_score"]  # other pools, another model


@pytest.mark.parametrize(
    ("model", "overrides", "message"),
    [
        ("SASRec", {"neg_sampler": "dns", "candidate_exclude": "prefix"},
         "candidate_exclude must be one of ['user', 'row']"),
        ("SASRec", {"neg_sampler": "dns", "candidate_distinct": "yes"}, "candidate_distinct must be true or false"),
        ("BPR", {"neg_sampler": "dns", "candidate_exclude": "row"}, "candidate_exclude must be 'user' for the general"),
        ("SASRec", {"neg_sampler": "adasir", "candidate_exclude": "row"}, "neg_sampler=adasir keeps a pool per user"),
        ("SASRec", {"neg_sampler": "srns", "candidate_exclude": "row"}, "neg_sampler=srns keeps a memory per user"),
        ("SASRec", {"neg_sampler": "divns", "candidate_exclude": "row"}, "neg_sampler=divns keeps a runner-up cache"),
        ("SASRec", {"neg_sampler": "full_softmax", "candidate_num": 0, "neg_loss": "softmax",
                    "candidate_distinct": True}, "candidate_distinct must be False (the default) for neg_sampler"),
    ],
)
def test_bad_pool_rules_are_refused_before_data_loading(tiny_data, in_tmp, model, overrides, message):
    with pytest.raises(ValueError) as err:
        create_config(model, "tiny", config_dict=tiny_config(tiny_data, in_tmp, **overrides))
    assert message in str(err.value)


@pytest.mark.parametrize("exclude", ["user", "row"])
def test_distinct_pool_larger_than_what_is_left_fails_before_training(tiny_data, in_tmp, exclude):
    with pytest.raises(ValueError, match=f"candidate_distinct: true needs candidate_num \\(55\\) distinct items .*"
                                         f"\\(candidate_exclude: {exclude}\\)"):
        _loader(tiny_data, in_tmp, candidate_num=55, candidate_exclude=exclude, candidate_distinct=True)
