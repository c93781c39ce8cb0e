"""``neg_sampler: full_softmax``: RecBole's CE loss on a real batch, no pool drawn, the config it refuses, and
full runs (all positions, resume)."""
from __future__ import annotations

import glob
import os

import pytest
import torch
from conftest import tiny_config
from real_batches import sampler_setup
from recbole.config import Config
from recbole.utils import get_model

import recbole_mdcns
from recbole_mdcns import scoring
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.methods.full_softmax import FullSoftmaxModule


def _recbole_ce_model(model_name: str, model, train_data, tiny_data, tmp_path):
    """RecBole's own ``model_name`` built with ``loss_type: CE`` on the same data, holding ``model``'s weights."""
    config = Config(model_name, "tiny", config_dict=tiny_config(tiny_data, tmp_path, loss_type="CE",
                                                                train_neg_sample_args=None))
    ce_model = get_model(model_name)(config, train_data._dataset)
    ce_model.load_state_dict(model.state_dict())
    return ce_model


@pytest.mark.parametrize("model_name", ["SASRec", "GRU4Rec"])
def test_loss_is_recbole_ce_with_the_padding_logit_masked(tiny_data, tmp_path, model_name):
    config, model, optimizer, batch, train_data = sampler_setup(model_name, "full_softmax", tiny_data, tmp_path)
    ce_model = _recbole_ce_model(model_name, model, train_data, tiny_data, tmp_path)
    model.eval(), ce_model.eval()  # no dropout: both losses see the same encoder outputs
    ours = FullSoftmaxModule(model, optimizer, config).training_loss(batch)
    with torch.no_grad():
        recbole_ce = ce_model.calculate_loss(batch)  # its softmax includes the padding id 0
        ce_model.loss_fct.register_forward_pre_hook(  # RecBole's full-sort evaluation scores item 0 -inf
            lambda module, args: (args[0].index_fill(1, torch.tensor([0]), -torch.inf), args[1]))
        recbole_masked = ce_model.calculate_loss(batch)
    assert abs(ours.item() - recbole_masked.item()) <= 1e-5
    assert recbole_ce.item() - ours.item() > 1e-4  # the padding logit is really left out
    ours.backward()
    assert model.item_embedding.weight.grad[1:].abs().sum() > 0  # every item's vector is trained


def test_no_pool_is_drawn(tiny_data, tmp_path):
    config, _, _, batch, train_data = sampler_setup("SASRec", "full_softmax", tiny_data, tmp_path)
    assert config["candidate_num"] == 0 and batch[CANDIDATES].shape == (len(batch), 0)
    state = train_data._sampler.generator.get_state()
    rows = sum(len(b) for b in train_data)
    assert rows == train_data.sample_size
    assert train_data.sampling_seconds == 0.0 and torch.equal(train_data._sampler.generator.get_state(), state)


@pytest.mark.parametrize("model_name", ["SASRec", "BERT4Rec", "TransRec", "FPMC"])
def test_score_all_is_every_item_scored(tiny_data, tmp_path, model_name):
    config, model, optimizer, batch, _ = sampler_setup(model_name, "full_softmax", tiny_data, tmp_path)
    model.eval()
    module = FullSoftmaxModule(model, optimizer, config)
    module.prepare_scorers(batch)
    scorer = module.scorers["self"]
    assert type(scorer) is scoring.one_pass_scorer(model)
    with torch.no_grad():
        h = scorer.encode(model, batch)
        every = torch.arange(model.n_items).expand(len(batch), -1)
        assert torch.allclose(scorer.score_all(model, batch, h), scorer.score(model, batch, h, every), atol=1e-5)


def test_model_scored_by_predict_per_item_is_refused(tiny_data, tmp_path, monkeypatch):
    monkeypatch.delitem(scoring.MODEL_SCORERS, "SHAN")  # SHAN's generic h·E differs from predict(): the fallback
    config, model, optimizer, batch, _ = sampler_setup("SHAN", "full_softmax", tiny_data, tmp_path)
    with pytest.raises(ValueError, match="full_softmax .* SHAN is scored by predict\\(\\) per item"):
        FullSoftmaxModule(model, optimizer, config).prepare_scorers(batch)


@pytest.mark.parametrize("model_name, overrides, message", [
    ("SASRec", {"candidate_num": 10}, "candidate_num must be 0 for neg_sampler=full_softmax"),
    ("SASRec", {"top_m": 2}, "top_m must be 1 for neg_sampler=full_softmax"),
    ("SASRec", {"neg_num": 5}, "neg_num must be 1 for neg_sampler=full_softmax"),
    ("SASRec", {"neg_loss": "bce"}, "neg_loss must be 'softmax' for neg_sampler=full_softmax"),
    ("SASRec", {"candidate_distribution": "popularity"}, "candidate_distribution must be 'uniform'"),
    ("BPR", {}, "neg_sampler=full_softmax works with RecBole's sequential models only"),
])
def test_config_errors_name_the_key(tiny_data, tmp_path, model_name, overrides, message):
    with pytest.raises(ValueError, match=message):
        create_config(model_name, "tiny", config_dict=tiny_config(tiny_data, tmp_path, neg_sampler="full_softmax",
                                                                  **overrides))


def test_all_positions_run_resumes_as_uninterrupted(tiny_data, in_tmp):
    config = tiny_config(tiny_data, in_tmp, neg_sampler="full_softmax", train_positions="all",
                         train_window_stride=3, train_batch_size=40, epochs=3)
    full = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=config)
    info = full["train_info"]
    assert info["train_positions"] == "all" and info["sampling_seconds"] == 0.0
    (path,) = glob.glob(str(in_tmp / "saved" / "*-lightning" / "last.ckpt"))
    n_items = torch.load(path, weights_only=True)["state_dict"]["model.item_embedding.weight"].shape[0]
    # each target's negatives: every item but the padding id and the target itself
    assert info["negative_history"][0]["negatives"] == info["targets_per_epoch"] * (n_items - 2)
    assert info["negative_history"][0]["catalogue_fraction"] == 1.0
    recbole_mdcns.run_recbole("SASRec", "tiny", config_dict={**config, "epochs": 2})
    last = max(glob.glob(str(in_tmp / "saved" / "*-lightning" / "last.ckpt")), key=os.path.getmtime)
    resumed = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict={**config, "resume_from": last})
    assert resumed["test_result"] == full["test_result"]
