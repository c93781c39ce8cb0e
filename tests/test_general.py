"""RecBole's general recommenders (BPR, LightGCN, NGCF, SGL, NCL, DGCF, SpectralCF) under a sampler: one
propagation per step, scores equal to ``predict()``, the model's own loss terms, its per-epoch parts,
RecBole's full-sort evaluation, resume."""
from __future__ import annotations

import glob
import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.data.interaction import Interaction
from recbole.utils import get_model, init_seed

from conftest import tiny_config, write_dataset
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES, candidate_train_loader
from recbole_mdcns.general import GENERAL_MODELS, GeneralScorer
from recbole_mdcns.methods.divns import synthesis_is_exact
from recbole_mdcns.quick_start import build_model, build_trainer, load_data, run_recbole
from recbole_mdcns.registry import get_sampler

HAS_FAISS = importlib.util.find_spec("faiss") is not None
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="NCL's e_step needs faiss (pip install faiss-cpu)")
MODELS = [pytest.param(m, marks=needs_faiss) if m == "NCL" else m for m in GENERAL_MODELS]
# small versions of the models' defaults; NCL: 4 prototypes, its ProtoNCE from epoch 0
MODEL_KEYS = {"NCL": {"num_clusters": 4, "warm_up_step": 0}, "NGCF": {"hidden_size_list": [16, 16]},
              "SGL": {"n_layers": 2}, "DGCF": {"n_factors": 2}}


def general_config(data, tmp_path, model: str, **overrides) -> dict:
    """The tiny config for a general model: (user, item) rows, RecBole's random split by interaction."""
    return tiny_config(data, tmp_path, load_col={"inter": ["user_id", "item_id"]},
                       eval_args={"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "mode": "full", "group_by": "user"},
                       **{**MODEL_KEYS.get(model, {}), **overrides})


def general_setup(model_name: str, sampler: str, data, tmp_path, **overrides):
    """``(config, model, module, batch)`` for ``model_name`` under ``neg_sampler: sampler``: one real training
    batch with its candidate pool, the sampler's module and its verified scorer."""
    config = create_config(model_name, "tiny", config_dict=general_config(data, tmp_path, model_name,
                                                                         neg_sampler=sampler, **overrides))
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    train_data = candidate_train_loader(config, train_data)
    model = get_model(model_name)(config, train_data._dataset)
    module = get_sampler(sampler).cls(model, torch.optim.Adam(model.parameters(), lr=1e-3), config)
    batch = next(iter(train_data))
    module.prepare_scorers(batch)
    return config, model, module, batch


@pytest.mark.parametrize("sampler", ["uniform", "dns"])
@pytest.mark.parametrize("model_name", MODELS)
def test_general_model_trains_validates_and_tests(tiny_data, in_tmp, model_name, sampler, caplog):
    config = general_config(tiny_data, in_tmp, model_name, neg_sampler=sampler,
                            candidate_num=10 if sampler == "dns" else 1, state="INFO")
    with caplog.at_level("INFO"):
        result = run_recbole(model_name, "tiny", config_dict=config)
    assert 0 <= result["test_result"]["ndcg@10"] <= 1 and result["best_valid_result"] is not None
    assert result["train_info"]["epochs"] == 1
    assert f"scoring {model_name}: general model: u·v[items] from one propagation per step, verified" in caplog.text
    assert glob.glob(str(in_tmp / "saved" / f"{model_name}-*.pth"))


@pytest.mark.parametrize("model_name", MODELS)
def test_one_pass_scores_equal_predict(tiny_data, in_tmp, model_name):
    _, model, module, batch = general_setup(model_name, "dns", tiny_data, in_tmp, candidate_num=8)
    scorer = module.scorers["self"]
    assert isinstance(scorer, GeneralScorer)
    model.eval()
    items = torch.cat([batch[model.ITEM_ID].unsqueeze(1), batch[CANDIDATES]], 1)
    with torch.no_grad():
        got = scorer(model, batch, items)
        scorer.end_step()
        for j in range(items.shape[1]):
            single = Interaction(dict(batch.interaction))
            single.update(Interaction({model.ITEM_ID: items[:, j]}))
            assert torch.allclose(got[:, j], model.predict(single), atol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_uniform_loss_equals_the_models_own_calculate_loss(tiny_data, in_tmp, model_name):
    """One uniform negative: the sampler's loss plus the model's own terms is its ``calculate_loss`` on the
    same negatives (same dropout masks, augmented graphs, correlation samples and clusters)."""
    _, model, module, batch = general_setup(model_name, "uniform", tiny_data, in_tmp)
    model.train()  # SGL draws its augmented graphs here, as RecBole's trainer makes it do
    if model_name == "NCL":
        model.e_step()
    recbole_batch = Interaction(dict(batch.interaction))
    recbole_batch.update(Interaction({model.NEG_ITEM_ID: batch[CANDIDATES][:, 0]}))

    def seeded(step):
        torch.manual_seed(7)
        random.seed(7)
        np.random.seed(7)
        return step()

    ours = seeded(lambda: module.step_loss(batch))
    own = seeded(lambda: model.calculate_loss(recbole_batch))
    own = sum(own) if isinstance(own, tuple) else own
    assert torch.allclose(ours.reshape(()), own.reshape(()), rtol=1e-5, atol=1e-6), (ours, own)
    if model_name != "BPR":  # the model's own terms are in (BPR has none)
        assert not torch.allclose(ours.reshape(()), module.training_loss(batch).reshape(()), rtol=1e-7, atol=0)


def test_restore_caches_are_cleared_after_a_training_step(tiny_data, in_tmp):
    """Validation after a step scores the trained embeddings, not those cached at the last validation."""
    _, model, module, batch = general_setup("LightGCN", "dns", tiny_data, in_tmp, candidate_num=10)
    users = Interaction({model.USER_ID: torch.arange(1, 6)})
    model.eval()
    stale = model.full_sort_predict(users).detach().clone()
    assert model.restore_user_e is not None
    model.train()
    optimizer = module.optimizer
    optimizer.zero_grad()
    module.step_loss(batch).backward()
    optimizer.step()
    assert model.restore_user_e is None and model.restore_item_e is None
    model.eval()
    fresh = model.full_sort_predict(users)
    users_e, items_e = model.forward()
    assert torch.allclose(fresh, (users_e[1:6] @ items_e.T).reshape(-1), atol=1e-6)
    assert not torch.allclose(fresh, stale)


def _fit(model_name: str, data, tmp_path, spy: str, **overrides):
    """Fit ``model_name`` with ``uniform`` while counting ``model.<spy>()`` calls by training epoch."""
    config = create_config(model_name, "tiny", config_dict=general_config(data, tmp_path, model_name,
                                                                         neg_sampler="uniform", **overrides))
    _, train_data, valid_data, _ = load_data(config)
    model = build_model(config, train_data)
    trainer = build_trainer(config, model)
    calls = []
    original = getattr(model, spy)

    def counted(*args, **kwargs):
        lit = trainer.lightning_trainer
        calls.append(lit.current_epoch if lit is not None else None)
        return original(*args, **kwargs)

    setattr(model, spy, counted)
    trainer.fit(train_data, valid_data, saved=False)
    return calls, trainer


@pytest.mark.parametrize("eval_step", [1, 2])
def test_sgl_redraws_its_graphs_once_per_epoch(tiny_data, in_tmp, eval_step):
    calls, _ = _fit("SGL", tiny_data, in_tmp, "graph_construction", epochs=3, eval_step=eval_step)
    assert calls == [0, 1, 2]


@needs_faiss
def test_ncl_e_step_every_m_step_epochs(tiny_data, in_tmp):
    calls, trainer = _fit("NCL", tiny_data, in_tmp, "e_step", epochs=5, m_step=2)
    assert calls == [0, 2, 4]
    assert trainer.model.user_centroids.shape == (4, 16)


def test_one_propagation_per_training_step(tiny_data, in_tmp):
    config = create_config("LightGCN", "tiny", config_dict=general_config(tiny_data, in_tmp, "LightGCN",
                                                                         neg_sampler="dns", candidate_num=10))
    _, train_data, valid_data, _ = load_data(config)
    trainer = build_trainer(config, build_model(config, train_data))
    trainer.fit(train_data, valid_data, saved=False)
    assert trainer.module.scorers["self"].propagations == len(train_data) == trainer.lightning_trainer.global_step


@pytest.mark.parametrize(("model_name", "sampler", "message"), [
    ("BPR", "gnno", "neg_sampler=gnno works with RecBole's sequential models only"),
    ("ItemKNN", "dns", "model ItemKNN is not supported by neg_sampler"),
    ("Pop", "uniform", "model Pop is not supported by neg_sampler"),
    ("ConvNCF", "dns", "model ConvNCF is not supported by neg_sampler"),
])
def test_unsupported_general_model_or_sampler_is_refused(tiny_data, in_tmp, model_name, sampler, message):
    with pytest.raises(ValueError) as error:
        create_config(model_name, "tiny", config_dict=general_config(tiny_data, in_tmp, model_name,
                                                                    neg_sampler=sampler))
    assert message in str(error.value)
    listed = "'BPR', 'LightGCN', 'NGCF', 'SGL', 'NCL', 'DGCF', 'SpectralCF'" if sampler != "gnno" else "'dns'"
    assert listed in str(error.value)


def test_ncl_num_clusters_checked_before_training(tiny_data, in_tmp):
    config = general_config(tiny_data, in_tmp, "NCL", neg_sampler="dns", candidate_num=10, num_clusters=1000)
    if not HAS_FAISS:
        with pytest.raises(ValueError, match="model NCL needs faiss"):
            run_recbole("NCL", "tiny", config_dict=config)
        return
    with pytest.raises(ValueError, match=r"num_clusters must be in \[1, 41\]"):
        run_recbole("NCL", "tiny", config_dict=config)


def test_general_pool_excludes_the_users_training_items(tiny_data, in_tmp):
    config = create_config("BPR", "tiny", config_dict=general_config(tiny_data, in_tmp, "BPR", neg_sampler="dns",
                                                                    candidate_num=30))
    _, train_data, _, _ = load_data(config)
    inter = train_data._dataset.inter_feat
    seen = set(zip(inter["user_id"].tolist(), inter["item_id"].tolist()))
    assert train_data.neg_sample_args["distribution"] == "none" and train_data.step == config["train_batch_size"]
    rows = 0
    for batch in train_data:
        assert "neg_item_id" not in batch.interaction  # RecBole's own negative sampling is off: rows not repeated
        rows += len(batch)
        for user, pool in zip(batch["user_id"].tolist(), batch[CANDIDATES].tolist()):
            assert not any((user, item) in seen for item in pool)
    assert rows == len(inter)
    assert len(train_data._sampler.used_ids) == len(seen)  # memory: one key per training interaction


def test_lightgcn_dns_resume_equals_uninterrupted(tiny_data, in_tmp):
    config = general_config(tiny_data, in_tmp, "LightGCN", neg_sampler="dns", candidate_num=10, top_m=2, epochs=2)
    first = run_recbole("LightGCN", "tiny", config_dict=config)
    assert run_recbole("LightGCN", "tiny", config_dict=config)["test_result"] == first["test_result"]
    run_recbole("LightGCN", "tiny", config_dict=dict(config, epochs=1))  # "killed" after epoch 0
    last = max(glob.glob(str(in_tmp / "saved" / "*-lightning" / "last.ckpt")), key=os.path.getmtime)
    resumed = run_recbole("LightGCN", "tiny", config_dict=dict(config, resume_from=last))
    assert resumed["test_result"] == first["test_result"]


SAMPLER_KEYS = {
    "divns": {"candidate_num": 10},
    "mixgcf": {"candidate_num": 10},
    "dens": {"candidate_num": 10},
    "ahns": {"candidate_num": 10},
    "srns": {},
    "adasir": {"candidate_num": 20, "adasir_pool_size": 10},
}


@pytest.mark.parametrize("sampler", ["divns", "mixgcf", "dens", "ahns", "srns", "adasir", "mdcns"])
@pytest.mark.parametrize("model_name", ["BPR", "LightGCN"])
def test_every_sampler_trains_bpr_and_lightgcn(tiny_data, in_tmp, model_name, sampler):
    keys = dict(SAMPLER_KEYS.get(sampler, {}))
    if sampler == "mdcns":
        keys.update(candidate_num=10, mdcns_peer_model="LightGCN" if model_name == "BPR" else "BPR")
    result = run_recbole(model_name, "tiny", config_dict=general_config(tiny_data, in_tmp, model_name,
                                                                      neg_sampler=sampler, epochs=1, **keys))
    assert 0 <= result["test_result"]["ndcg@10"] <= 1
    assert result["train_info"]["negative_history"][0]["negatives"] > 0



@pytest.mark.parametrize("model_name", ["LightGCN", "NGCF"])
def test_mixgcf_hop_mixing_scores_the_pooled_mixed_embeddings(tiny_data, in_tmp, model_name):
    """MixGCF's negative, built from embeddings as its code builds it -- per layer alpha_l e_{v+} + (1 - alpha_l)
    e_{c_l}, pooled as the model pools its layers (LightGCN: mean, NGCF: concatenation) -- scores with the user
    vector exactly as :func:`hop_mixing` computes it from per-layer scores."""
    from recbole_mdcns.general import layer_scores, propagate
    from recbole_mdcns.methods.mixgcf import hop_mixing

    _, model, _, batch = general_setup(model_name, "mixgcf", tiny_data, in_tmp, candidate_num=10)
    model.eval()
    with torch.no_grad():
        prop = propagate(model)
        users, pos = batch[model.USER_ID], batch[model.ITEM_ID]
        rows, layers = len(users), len(prop.layers)
        chosen = batch[CANDIDATES][:, :layers]                    # layer l's choice: candidate l
        alpha = torch.rand(rows, 1, layers)
        mixed = [alpha[:, 0, l, None] * layer[model.n_users + pos] + (1 - alpha[:, 0, l, None])
                 * layer[model.n_users + chosen[:, l]] for l, layer in enumerate(prop.layers)]
        negative = torch.stack(mixed, 1).mean(1) if model_name == "LightGCN" else torch.cat(mixed, 1)
        user = prop.users[users]
        expected = (user * negative).sum(-1)
        per_layer = layer_scores(model, prop, users, chosen).diagonal(dim1=1, dim2=2).unsqueeze(1)
        got = hop_mixing(layer_scores(model, prop, users, pos.unsqueeze(1)).squeeze(1), per_layer, alpha, prop)
    assert torch.allclose(got.squeeze(1), expected, atol=1e-5)


@pytest.mark.parametrize(("model_name", "line"), [("LightGCN", "positive and hop mixing over its 2 layers"),
                                                  ("BPR", "positive mixing in one layer")])
def test_mixgcf_logs_its_path(tiny_data, in_tmp, model_name, line, caplog):
    with caplog.at_level("INFO"):
        run_recbole(model_name, "tiny", config_dict=general_config(tiny_data, in_tmp, model_name, neg_sampler="mixgcf",
                                                                 candidate_num=10, n_layers=1, state="INFO"))
    assert line in caplog.text


def test_lightgcn_ddp_validates_and_tests_like_one_process_on_its_checkpoint(tiny_data, in_tmp):
    """LightGCN + dns under 2-process CPU DDP: training, RecBole's full-sort evaluation sharded over the
    processes (general batches: interaction, history_index, positive_u, positive_i), and results equal to one
    process's evaluation of the checkpoint it saved."""
    from test_sharded_eval import assert_log_matches_checkpoint, ddp_cli_run

    config = general_config(tiny_data, in_tmp, "LightGCN", neg_sampler="dns", candidate_num=10, eval_batch_size=7,
                            state="INFO", metric_decimal_place=12)
    log = ddp_cli_run(in_tmp, "LightGCN", config)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log and log.count("epoch 0 training") == 1
    assert_log_matches_checkpoint(in_tmp, "LightGCN", config, log)


def test_history_mask_is_refused_for_a_general_model(tiny_data, in_tmp):
    """``eval_mask_history`` rebuilds sequences; a general model's full sort already masks the training items."""
    with pytest.raises(ValueError, match="eval_mask_history: true is for sequential models; BPR is not one"):
        create_config("BPR", "tiny", config_dict=general_config(tiny_data, in_tmp, "BPR", neg_sampler="dns",
                                                                candidate_num=10, eval_mask_history=True))


def test_wide_pool_scored_from_the_batchs_distinct_users(tiny_data, in_tmp):
    """A pool wide enough for the full-catalogue path is scored from one product per distinct user of the
    batch: the same scores as the gathered per-row product, on a batch whose users repeat."""
    _, model, module, batch = general_setup("LightGCN", "dns", tiny_data, in_tmp, candidate_num=8)
    scorer = module.scorers["self"]
    users = batch[model.USER_ID]
    assert len(users.unique()) < len(users)  # rows of one user repeat, as in any general batch
    items = torch.randint(1, model.n_items, (len(users), model.n_items))
    with torch.no_grad():
        h = scorer.encode(model, batch)
        got = scorer.score(model, batch, h, items)
        expected = torch.bmm(scorer.item_vectors(model, items), h.unsqueeze(-1)).squeeze(-1)
        scorer.end_step()
    assert torch.allclose(got, expected, atol=1e-5)
    assert synthesis_is_exact(scorer)  # still h · v: DENS's gating and DivNS's mixing on scores hold


@pytest.fixture(scope="module")
def many_users_data(tmp_path_factory) -> Path:
    """1,200 users of the tiny dataset's 60 items: 1,200 full-sort evaluation batches at one user a batch."""
    return write_dataset(tmp_path_factory.mktemp("many"), n_users=1200, min_len=3, max_len=5)


@pytest.mark.parametrize(("model_name", "sampler", "data", "eval_batch_size", "warned"), [
    # one user a batch of the 61 item ids (60 items and RecBole's padding id), under plain RecBole
    ("BPR", "recbole", "many", 61, True),
    ("BPR", "dns", "many", 61 * 2, False),  # 600 batches
    ("BPR", "dns", "many", 61, True),
    ("BPR", "dns", "tiny", 61, False),  # 40 batches
    ("SASRec", "dns", "many", 1, False),  # a sequential model's eval_batch_size counts rows
])
def test_few_users_per_full_sort_batch_are_warned(tiny_data, many_users_data, in_tmp, caplog, model_name, sampler,
                                                  data, eval_batch_size, warned):
    path = many_users_data if data == "many" else tiny_data
    settings = general_config(path, in_tmp, model_name) if model_name == "BPR" else tiny_config(path, in_tmp)
    config = create_config(model_name, "tiny", config_dict={**settings, "neg_sampler": sampler,
                                                           "eval_batch_size": eval_batch_size, "candidate_num": 10})
    with caplog.at_level("WARNING"):
        load_data(config)
    message = ("eval_batch_size: 61 scores 1 user(s) a batch in RecBole's full-sort evaluation of the general model "
               "BPR (eval_batch_size counts user x item scores there: eval_batch_size // 61 items)")
    assert (message in caplog.text) is warned
    assert ("eval_batch_size: 15616 scores 256 users a batch" in caplog.text) is warned
