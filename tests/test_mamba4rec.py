"""Mamba4Rec (recbole_mdcns/models/mamba4rec.py) on the tiny dataset: RecBole's trainer, our
sampler, causality over right-padded windows, batch chunking, the one-pass scorer, backends."""
from __future__ import annotations

import math
import re

import pytest
import recbole.quick_start
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.data.interaction import Interaction
from recbole.trainer import Trainer

import recbole_mdcns
from recbole_mdcns import scoring
from recbole_mdcns.config import packaged_yaml
from recbole_mdcns.models import mamba4rec
from recbole_mdcns.models.mamba4rec import Mamba4Rec

from conftest import tiny_config

MODEL_YAML = packaged_yaml("models/Mamba4Rec")
BPR = {"loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}}


def build(tiny_data, tmp_path, **overrides):
    """RecBole ``Config`` (the model class itself, its YAML) -> data -> ``Mamba4Rec``."""
    config = Config(model=Mamba4Rec, dataset="tiny", config_file_list=[MODEL_YAML],
                    config_dict=tiny_config(tiny_data, tmp_path, **{"mamba_backend": "mambapy", **overrides}))
    train, valid, test = data_preparation(config, create_dataset(config))
    return config, Mamba4Rec(config, train._dataset), (train, valid, test)


def full_window(model: Mamba4Rec, item_seq: torch.Tensor) -> torch.Tensor:
    """``[B, L, d]``: every position's output of one pass (``gather_indexes`` made an identity)."""
    model.gather_indexes = lambda output, index: output
    try:
        return model.forward(item_seq, torch.full((len(item_seq),), item_seq.shape[1]))
    finally:
        del model.gather_indexes


@pytest.mark.parametrize("loss", ["CE", "BPR"])
def test_trains_one_epoch_with_recbole_trainer(tiny_data, in_tmp, loss):
    config, model, (train, valid, _) = build(tiny_data, in_tmp, num_layers=2, **(BPR if loss == "BPR" else {}))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(config, model)
    trainer.fit(train, valid, saved=False, show_progress=False)
    assert math.isfinite(trainer.train_loss_dict[0])
    unchanged = [name for (name, p), b in zip(model.named_parameters(), before) if torch.equal(b, p)]
    assert unchanged == []


def test_trains_by_name_through_our_samplers(tiny_data, in_tmp, caplog):
    """``--model=Mamba4Rec`` and ``mdcns_peer_model: Mamba4Rec`` through the model hook, with its YAML
    defaults (its CE ``loss_type`` is overridden by the samplers' BPR), on all positions."""
    small = tiny_config(tiny_data, in_tmp, state="INFO", mamba_backend="mambapy", num_layers=1, epochs=1)
    with caplog.at_level("INFO"):
        result = recbole_mdcns.run_recbole("Mamba4Rec", "tiny", config_dict={
            **small, "neg_sampler": "dns", "candidate_num": 10, "train_positions": "all"})
        assert result["train_info"]["train_positions"] == "all"
        assert "train_positions Mamba4Rec (self): all positions" in caplog.text
        assert "scoring Mamba4Rec: dot-product" in caplog.text
        peer = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict={
            **small, "neg_sampler": "mdcns", "candidate_num": 5, "mdcns_peer_model": "Mamba4Rec"})
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    assert peer["train_info"]["extra_valid_results"][0]["peer"]["ndcg@10"] >= 0.0
    # its RecBole checkpoint loads through RecBole's own load_data_and_model, and tests as the run did
    (checkpoint,) = (in_tmp / "saved").glob("Mamba4Rec-*.pth")
    config, model, _, _, _, test_data = recbole.quick_start.load_data_and_model(str(checkpoint))
    assert isinstance(model, Mamba4Rec) and config["mamba_backend"] == "mambapy"
    assert Trainer(config, model).evaluate(test_data, load_best_model=False) == result["test_result"]


def test_predict_is_full_sort_gathered(tiny_data, in_tmp):
    _, model, (train, _, _) = build(tiny_data, in_tmp)
    batch = next(iter(train))
    model.eval()
    with torch.no_grad():
        full = model.full_sort_predict(batch)
        assert full.shape == (len(batch), model.n_items)
        expected = full.gather(1, batch[model.ITEM_ID].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(model.predict(batch), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_causal_every_position_equals_its_prefix(tiny_data, in_tmp, num_layers):
    """Position t of a full-window pass == ``forward`` on items ``<= t``: right-padded to the same
    width, and cut to width t + 1 (widths 1..11 hit several power-of-two paddings of the scan)."""
    _, model, _ = build(tiny_data, in_tmp, num_layers=num_layers)
    model.eval()
    length = 11
    seq = torch.randint(1, model.n_items, (4, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = full_window(model, seq)
        for t in range(length):
            n = torch.full((len(seq),), t + 1)
            padded = seq.clone()
            padded[:, t + 1:] = 0
            torch.testing.assert_close(model.forward(padded, n), full[:, t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.forward(seq[:, :t + 1], n), full[:, t], rtol=1e-5, atol=1e-5)


def test_batch_chunk_gives_the_same_outputs_and_gradients(tiny_data, in_tmp):
    _, plain, (train, _, _) = build(tiny_data, in_tmp, num_layers=2)
    _, chunked, _ = build(tiny_data, in_tmp, num_layers=2, mamba_batch_chunk=7)
    chunked.load_state_dict(plain.state_dict())
    batch = next(iter(train))
    assert len(batch) > 7
    for model in (plain, chunked):
        model.eval()  # no dropout: the two runs see the same function
        model.full_sort_predict(batch).logsumexp(1).sum().backward()
    with torch.no_grad():  # chunks without checkpointing
        torch.testing.assert_close(chunked.full_sort_predict(batch), plain.full_sort_predict(batch))
    for (name, a), b in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_one_pass_scorer_is_dot_product(tiny_data, in_tmp):
    _, model, (train, _, _) = build(tiny_data, in_tmp)
    batch = next(iter(train))
    items = torch.randint(1, model.n_items, (len(batch), 5), generator=torch.Generator().manual_seed(1))
    scorer = scoring.build_scorer(model, batch, items)
    assert type(scorer) is scoring.DotScorer
    model.eval()
    with torch.no_grad():
        expected = torch.stack([model.predict(Interaction({**batch.interaction, model.ITEM_ID: items[:, j]}))
                                for j in range(items.shape[1])], 1)
        torch.testing.assert_close(scorer(model, batch, items), expected, rtol=1e-5, atol=1e-6)


def test_mixer_parameters_match_mamba_ssm_layout(tiny_data, in_tmp):
    """mambapy's block has mamba_ssm.Mamba's parameter names and shapes (mamba_simple.py), so
    checkpoints move between the backends."""
    _, model, _ = build(tiny_data, in_tmp, hidden_size=16, d_state=8, d_conv=4, expand=2)
    d, d_inner, rank, n = 16, 32, 1, 8
    shapes = {name: tuple(p.shape) for name, p in model.mamba_layers[0].mamba.named_parameters()}
    assert shapes == {"in_proj.weight": (2 * d_inner, d), "conv1d.weight": (d_inner, 1, 4), "conv1d.bias": (d_inner,),
                      "x_proj.weight": (rank + 2 * n, d_inner), "dt_proj.weight": (d_inner, rank),
                      "dt_proj.bias": (d_inner,), "A_log": (d_inner, n), "D": (d_inner,),
                      "out_proj.weight": (d, d_inner)}


@pytest.mark.skipif(mamba4rec._mamba_ssm_class() is None or not torch.cuda.is_available(),
                    reason="mamba_ssm (CUDA) not installed")
def test_backends_agree(tiny_data, in_tmp):
    _, ours, (train, _, _) = build(tiny_data, in_tmp, num_layers=2)
    _, cuda, _ = build(tiny_data, in_tmp, num_layers=2, mamba_backend="mamba_ssm")
    cuda.load_state_dict(ours.state_dict())
    batch = next(iter(train)).to("cuda")
    outputs = []
    for model in (ours, cuda):
        model.to("cuda").eval()
        with torch.no_grad():
            outputs.append(full_window(model, batch[model.ITEM_SEQ]))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key, value, message", [
    ("mamba_backend", "cuda", "mamba_backend must be one of ['auto', 'mambapy', 'mamba_ssm']"),
    ("d_state", 0, "d_state must be a positive integer"),
    ("num_layers", None, "num_layers must be a positive integer"),
    ("dropout_prob", 1.0, "dropout_prob must be a number in [0, 1)"),
    ("mamba_batch_chunk", -1, "mamba_batch_chunk must be an integer >= 0"),
])
def test_bad_settings_name_the_key(tiny_data, in_tmp, key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(tiny_data, in_tmp, **{key: value})


@pytest.mark.skipif(mamba4rec._mamba_ssm_class() is not None, reason="mamba_ssm is installed")
def test_missing_mamba_ssm_names_the_key(tiny_data, in_tmp):
    with pytest.raises(ValueError, match="mamba_backend: mamba_ssm, but the mamba_ssm package does not import"):
        build(tiny_data, in_tmp, mamba_backend="mamba_ssm")
    assert mamba4rec.resolve_backend("auto", "cuda") == "mambapy"
