"""``SASRecRightAligned`` and ``GRU4RecRightAligned``: RecBole's SASRec and GRU4Rec reading a row as the MDCNS
authors' left-padded models do -- equal to RecBole's models run on left-padded rows, and trained on prefix rows
when ``train_positions: all`` is asked (as the model or as MDCNS's peer)."""
from __future__ import annotations

import pytest
import recbole.utils
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from conftest import tiny_config
from recbole_mdcns import run_recbole
from recbole_mdcns.config import create_config
from recbole_mdcns.models.gru4rec_right_aligned import GRU4RecRightAligned
from recbole_mdcns.models.sasrec_right_aligned import SASRecRightAligned

# each model: a key tiny's config sets over its RecBole YAML's default, with tiny's value, and a key only the
# YAML sets, with its default
DEFAULTS = {SASRecRightAligned: (("inner_size", 32), ("hidden_act", "gelu")),
            GRU4RecRightAligned: (("hidden_size", 16), ("dropout_prob", 0.3))}


@pytest.mark.parametrize("cls", list(DEFAULTS))
def test_outputs_equal_recboles_model_on_left_padded_rows(tiny_data, in_tmp, cls):
    config = create_config(cls.__name__, "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns",
                                                                         candidate_num=5))
    (tiny_key, tiny_value), (key, default) = DEFAULTS[cls]
    assert (config[tiny_key], config[key]) == (tiny_value, default)  # tiny's value; the RecBole model's YAML default
    assert recbole.utils.get_model(cls.__name__) is cls  # RecBole's own lookup finds it
    init_seed(config["seed"], True)
    train, _, _ = data_preparation(config, create_dataset(config))
    model = cls(config, train._dataset).eval()
    recbole_model = super(cls, model)  # RecBole's SASRec / GRU4Rec forward on the same weights
    batch = next(iter(train))
    seq, n = batch["item_id_list"], batch["item_length"]
    width = model.max_seq_length
    left = torch.zeros(len(seq), width, dtype=seq.dtype)  # the authors' rows: the same items, padded on the left
    for row in range(len(seq)):
        left[row, width - n[row]:] = seq[row, :n[row]]
    with torch.no_grad():
        ours = model(seq, n)
        theirs = recbole_model.forward(left, torch.full_like(n, width))
        recboles = recbole_model.forward(seq, n)
        trimmed = model(seq[:, :int(n.max())], n)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trimmed, ours, atol=1e-6, rtol=1e-6)
    short = n < width
    assert short.any() and not torch.allclose(ours[short], recboles[short], atol=1e-3)
    assert torch.allclose(ours[~short], recboles[~short], atol=1e-5)  # a full row is read the same way


def test_all_positions_falls_back_to_prefix_rows(tiny_data, in_tmp, caplog):
    caplog.set_level("INFO")
    result = run_recbole("SASRecRightAligned", "tiny", config_dict=tiny_config(
        tiny_data, in_tmp, neg_sampler="dns", candidate_num=10, train_positions="all"))
    assert "SASRecRightAligned (self): not causal per position" in caplog.text
    assert "falls back to RecBole's prefix rows" in caplog.text
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0


def test_a_right_aligned_peer_trains_mdcns_on_prefix_rows(tiny_data, in_tmp, caplog):
    caplog.set_level("INFO")
    result = run_recbole("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, in_tmp, neg_sampler="mdcns", candidate_num=10, train_positions="all",
        mdcns_peer_model="GRU4RecRightAligned"))
    assert "GRU4RecRightAligned (peer): not causal per position" in caplog.text
    assert "SASRec (self): all positions" in caplog.text
    assert "falls back to RecBole's prefix rows" in caplog.text
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
