"""``SASRecRightAligned``: RecBole's SASRec numbering a row's positions back from its last item, as the MDCNS
authors' left-padded SASRec does -- equal to RecBole's SASRec run on left-padded rows, and trained on prefix rows
when ``train_positions: all`` is asked."""
from __future__ import annotations

import recbole.utils
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from conftest import tiny_config
from recbole_mdcns import run_recbole
from recbole_mdcns.config import create_config
from recbole_mdcns.models.sasrec_right_aligned import SASRecRightAligned


def test_outputs_equal_recboles_sasrec_on_left_padded_rows(tiny_data, in_tmp):
    config = create_config("SASRecRightAligned", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns",
                                                                                 candidate_num=5))
    assert (config["inner_size"], config["hidden_act"]) == (32, "gelu")  # tiny's value; SASRec.yaml's default
    assert recbole.utils.get_model("SASRecRightAligned") is SASRecRightAligned  # RecBole's own lookup finds it
    init_seed(config["seed"], True)
    train, _, _ = data_preparation(config, create_dataset(config))
    model = SASRecRightAligned(config, train._dataset).eval()
    sasrec = super(SASRecRightAligned, model)  # RecBole's SASRec.forward on the same weights
    batch = next(iter(train))
    seq, n = batch["item_id_list"], batch["item_length"]
    width = seq.shape[1]
    left = torch.zeros_like(seq)  # the authors' rows: the same items, padded on the left
    for row in range(len(seq)):
        left[row, width - n[row]:] = seq[row, :n[row]]
    with torch.no_grad():
        ours = model(seq, n)
        theirs = sasrec.forward(left, torch.full_like(n, width))
        recboles = sasrec.forward(seq, n)
        trimmed = model(seq[:, :int(n.max())], n)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trimmed, ours, atol=1e-6, rtol=1e-6)
    short = n < width
    assert short.any() and not torch.allclose(ours[short], recboles[short], atol=1e-3)
    assert torch.allclose(ours[~short], recboles[~short], atol=1e-5)  # a full row: the same positions


def test_all_positions_falls_back_to_prefix_rows(tiny_data, in_tmp, caplog):
    caplog.set_level("INFO")
    result = run_recbole("SASRecRightAligned", "tiny", config_dict=tiny_config(
        tiny_data, in_tmp, neg_sampler="dns", candidate_num=10, train_positions="all"))
    assert "SASRecRightAligned (self): not causal per position" in caplog.text
    assert "falls back to RecBole's prefix rows" in caplog.text
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
