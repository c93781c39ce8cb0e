"""``eval_shared_prefixes``: a held-out user's prefix rows scored from one encoder pass give RecBole's row-by-row
metrics exactly (SASRec, GRU4Rec, and MDCNS's peer and ensemble), and the rows that share are found item by item."""
from __future__ import annotations

import logging

import pytest
import torch
import yaml
from conftest import tiny_config

from recbole_mdcns.eval_prefixes import covering_rows
from recbole_mdcns.quick_start import run_recbole
from recbole_mdcns.user_split import main as user_split


def test_a_row_is_covered_by_its_users_longest_row_when_it_begins_it():
    seq = torch.tensor([[1, 2, 0, 0], [1, 2, 3, 0], [1, 2, 3, 4], [2, 3, 4, 5],   # user 7: prefixes, then a window
                        [1, 9, 0, 0], [1, 9, 8, 0],                             # user 8
                        [1, 2, 3, 0]])                                          # user 9 alone
    seq_len = torch.tensor([2, 3, 4, 4, 2, 3, 3])
    users = torch.tensor([7, 7, 7, 7, 8, 8, 9])
    assert covering_rows(users, seq, seq_len).tolist() == [2, 2, 2, 3, 5, 5, 6]
    # without users, one group: only rows beginning the batch's longest row share it
    assert covering_rows(None, seq, seq_len).tolist() == [2, 2, 2, 3, 4, 5, 2]


@pytest.fixture(scope="module")
def prefix_split(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix-split")
    user_split(["--inter", str(tiny_data / "tiny" / "tiny.inter"), "--out", str(out), "--name", "ps",
                "--heldout", "prefixes", "--max-len", "6", "--ratios", "0.6", "0.2", "0.2"])
    return out


def _run(prefix_split, in_tmp, model, shared, **overrides):
    settings = yaml.safe_load((prefix_split / "ps" / "ps.yaml").read_text())
    config = {**tiny_config(prefix_split, in_tmp), **settings, "hidden_size": 16, "n_layers": 1, "n_heads": 1,
              "inner_size": 32, "epochs": 2, "eval_shared_prefixes": shared, **overrides}
    return run_recbole(model, "ps", config_dict=config, saved=False)


@pytest.mark.parametrize("model, sampler", [("SASRec", {"neg_sampler": "uniform"}),
                                            ("GRU4Rec", {"neg_sampler": "mdcns", "mdcns_peer_model": "SASRec", "candidate_num": 10})])
def test_shared_prefixes_give_recboles_metrics_exactly(prefix_split, in_tmp, caplog, model, sampler):
    caplog.set_level(logging.INFO)
    shared = _run(prefix_split, in_tmp, model, True, **sampler)
    checked = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval_shared_prefixes:")]
    assert checked and all("checked: equal to RecBole's row-by-row scores" in m for m in checked), checked
    assert {m.split()[1] for m in checked} == {model, sampler.get("mdcns_peer_model", model)}  # MDCNS: its peer too
    caplog.clear()
    plain = _run(prefix_split, in_tmp, model, False, **sampler)
    assert not [r for r in caplog.records if r.getMessage().startswith("eval_shared_prefixes:")]
    assert shared["best_valid_result"] == plain["best_valid_result"]
    assert shared["test_result"] == plain["test_result"]


def test_positions_counted_from_a_rows_end_are_evaluated_row_by_row(prefix_split, in_tmp, caplog):
    """SASRecRightAligned numbers a row's positions from its end: a longer row's pass is not its prefixes' passes."""
    caplog.set_level(logging.INFO)
    shared = _run(prefix_split, in_tmp, "SASRecRightAligned", True, neg_sampler="uniform")
    assert "eval_shared_prefixes: SASRecRightAligned is evaluated row by row (shared passes differ" in caplog.text
    plain = _run(prefix_split, in_tmp, "SASRecRightAligned", False, neg_sampler="uniform")
    assert (shared["best_valid_result"], shared["test_result"]) == (plain["best_valid_result"], plain["test_result"])


def test_a_value_other_than_true_or_false_is_an_error(prefix_split, in_tmp):
    with pytest.raises(ValueError, match="eval_shared_prefixes must be true or false, got 'yes'"):
        _run(prefix_split, in_tmp, "SASRec", "yes", neg_sampler="uniform")
