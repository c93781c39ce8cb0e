"""Foundation: candidate pools, strategies, losses, config errors, RecBole compatibility, training runs."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from recbole.model.loss import BPRLoss

from conftest import tiny_config, write_dataset
from real_batches import pool_loader, training_items
from recbole_mdcns import run_recbole
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES
from recbole_mdcns.losses import bce_loss, bpr_loss
from recbole_mdcns.strategies import TopMNegative

RECBOLE_KEYS = {"best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}


# --- candidate pool -------------------------------------------------------------------------

def test_pool_excludes_training_history_and_keeps_rows(tiny_data, in_tmp):
    config, ds, loader = pool_loader(tiny_data, in_tmp, neg_sampler="dns", candidate_num=30)
    history = training_items(loader)
    batch = next(iter(loader))
    cands = batch[CANDIDATES]
    assert cands.shape == (len(batch), 30)
    assert len(batch) == min(config["train_batch_size"], loader.sample_size)  # no row repetition
    assert cands.min() >= 1 and cands.max() < ds.item_num
    for user, row in zip(batch["user_id"].tolist(), cands.tolist()):
        assert not history[user] & set(row)


def test_used_bitmap_matches_the_used_pairs(tiny_data, in_tmp):
    _, ds, loader = pool_loader(tiny_data, in_tmp, neg_sampler="dns", candidate_num=5)
    sampler = loader._sampler
    users = torch.arange(ds.user_num).repeat_interleave(ds.item_num)
    items = torch.arange(ds.item_num).repeat(ds.user_num)
    expected = torch.isin(users * ds.item_num + items, sampler.used_ids)
    assert expected.any() and torch.equal(sampler.is_used(users, items), expected)


def test_pool_for_user_with_almost_every_item_terminates(tmp_path, in_tmp):
    root = write_dataset(tmp_path / "data", name="dense", n_users=6, n_items=20)
    inter = root / "dense" / "dense.inter"
    lines = inter.read_text().splitlines()
    lines += [f"u999\ti{item}\t5\t{t}" for t, item in enumerate(range(1, 21))]  # every item, in order
    inter.write_text("\n".join(lines) + "\n")
    _, ds, loader = pool_loader(root, in_tmp, dataset="dense", neg_sampler="dns", candidate_num=15)
    user = ds.field2token_id["user_id"]["u999"]
    allowed = {ds.field2token_id["item_id"]["i19"], ds.field2token_id["item_id"]["i20"]}  # valid/test targets
    pool = loader._sampler.sample_pool(torch.full((4,), user), 15)
    assert set(pool.flatten().tolist()) <= allowed


def test_popularity_pool_follows_counts(tiny_data, in_tmp):
    _, ds, loader = pool_loader(tiny_data, in_tmp, neg_sampler="popularity")
    sampler = loader._sampler
    draws = sampler._draw(200_000)
    freq = torch.bincount(draws, minlength=ds.item_num).double()
    expected = sampler.item_weights / sampler.item_weights.sum() * len(draws)
    assert freq[0] == 0
    assert torch.corrcoef(torch.stack([freq, expected]))[0, 1] > 0.99


# --- strategies and losses -------------------------------------------------------------------

def test_top_m_selects_inside_top_m_and_covers_it():
    scores = torch.tensor([[0.1, 5.0, 3.0, 4.0, -1.0]]).repeat(3000, 1)
    assert (TopMNegative(1).select(scores) == 1).all()
    picks = TopMNegative(3).select(scores, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 2, 3}
    assert (TopMNegative(5).select(scores[:1, :1]) == 0).all()


def test_losses_match_reference_definitions():
    pos, neg = torch.randn(64), torch.randn(64)
    assert torch.allclose(bpr_loss(pos, neg), BPRLoss()(pos, neg), atol=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(pos, torch.ones(64)) + bce(neg, torch.zeros(64))
    assert torch.allclose(bce_loss(pos, neg), expected, atol=1e-6)


# --- bad input: clear errors before training -------------------------------------------------

@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"neg_sampler": "hardest"}, "neg_sampler must be one of"),
        ({"neg_sampler": "dns", "neg_loss": "hinge"}, "neg_loss must be one of ['bpr', 'bce', 'softmax']"),
        ({"neg_sampler": "dns", "candidate_num": 5, "top_m": 6}, "top_m must be an integer in [1, 5]"),
        ({"neg_sampler": "dns", "candidate_num": 0}, "candidate_num must be an integer"),
        ({"neg_sampler": "dns", "loss_type": "CE"}, "loss_type must be 'BPR'"),
        ({"neg_sampler": "dns", "candidate_distribution": "zipf"}, "candidate_distribution must be one of"),
    ],
)
def test_bad_config_is_rejected_before_data_loading(tiny_data, in_tmp, overrides, message):
    with pytest.raises(ValueError) as err:
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, **overrides))
    assert message in str(err.value)


def test_missing_dataset_and_no_bpr_model(tiny_data, in_tmp):
    with pytest.raises(ValueError, match="dataset 'nowhere' not found"):
        create_config("SASRec", "nowhere", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns"))
    with pytest.raises(ValueError, match="model CORE has no sampled-negative"):
        create_config("CORE", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns"))


def test_pool_larger_than_catalogue_fails_before_training(tiny_data, in_tmp):
    with pytest.raises(ValueError, match=r"candidate_num must be in \[1, 60\]"):
        run_recbole("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns", candidate_num=500))
    assert not glob.glob(str(in_tmp / "saved" / "*"))


# --- RecBole compatibility -------------------------------------------------------------------

def test_plain_recbole_runs_in_the_same_environment(tiny_data, in_tmp):
    from recbole.quick_start import run_recbole as recbole_run_recbole

    config = tiny_config(tiny_data, in_tmp, loss_type="BPR",
                         train_neg_sample_args={"distribution": "uniform", "sample_num": 1})
    result = recbole_run_recbole("SASRec", "tiny", config_dict=config)  # loads its best checkpoint
    assert set(result) == RECBOLE_KEYS and 0 <= result["test_result"]["ndcg@10"] <= 1
    ours = run_recbole("SASRec", "tiny", config_dict=dict(config, neg_sampler="recbole"))
    assert ours["test_result"] == result["test_result"]


def test_broken_ray_gives_clear_error_only_when_tuning():
    code = (
        "import sys; sys.modules['pkg_resources'] = None\n"  # as with setuptools>=81: ray 2.6 cannot import
        "import recbole_mdcns\n"
        "from recbole.quick_start import run_recbole\n"
        "from ray import tune\n"
        "try:\n    tune.run\nexcept RuntimeError as e:\n    print('CLEAR:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CLEAR: RecBole's hyper-parameter tuning needs ray" in out.stdout
    assert "pkg_resources" in out.stdout  # the original failure is named


def test_recbole_sine_does_not_switch_on_anomaly_detection():
    """RecBole's sine.py calls torch.autograd.set_detect_anomaly(True) when imported, which RecBole does
    whenever it builds any sequential model: importing recbole_mdcns keeps the mode as it was."""
    code = (
        "import sys, torch\n"
        "on = sys.argv[1] == 'on'\n"
        "torch.autograd.set_detect_anomaly(on)\n"
        "import recbole_mdcns\n"
        "from recbole.utils import get_model\n"
        "get_model('SINE'), get_model('SASRec')\n"
        "print('anomaly', torch.is_anomaly_enabled())\n"
    )
    for state in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", code, state], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert f"anomaly {state == 'on'}" in out.stdout


def test_version_pins_hold():
    import numpy
    import pandas

    assert int(numpy.__version__.split(".")[0]) < 2 and int(pandas.__version__.split(".")[0]) < 3
    assert hasattr(numpy, "float_")  # RecBole's Config.compatibility_settings needs it


# --- training through run_recbole ------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["uniform", "popularity", "dns"])
def test_run_recbole_trains_and_saves_like_recbole(tiny_data, in_tmp, sampler, caplog):
    config = tiny_config(tiny_data, in_tmp, neg_sampler=sampler, candidate_num=20 if sampler == "dns" else 1,
                         epochs=2, top_m=2 if sampler == "dns" else 1)
    result = run_recbole("SASRec", "tiny", config_dict=config)
    assert set(result) == RECBOLE_KEYS | {"train_info"}
    assert 0 <= result["test_result"]["ndcg@10"] <= 1
    info = result["train_info"]
    assert info["epochs"] == 2 and len(info["epoch_seconds"]) == 2 and info["best_epoch"] in (0, 1)
    assert info["sampling_seconds"] > 0 and [h["epoch"] for h in info["negative_history"]] == [0, 1]
    assert 0 < info["negative_history"][-1]["catalogue_fraction"] <= 1
    saved = glob.glob(str(in_tmp / "saved" / "SASRec-*.pth"))
    assert len(saved) == 1
    checkpoint = torch.load(saved[0], weights_only=False)
    assert {"config", "epoch", "state_dict", "optimizer", "best_valid_score"} <= set(checkpoint)
    assert glob.glob(str(in_tmp / "saved" / "SASRec-*-lightning" / "last.ckpt"))


def test_same_seed_same_result_and_resume_matches(tiny_data, in_tmp):
    config = tiny_config(tiny_data, in_tmp, neg_sampler="dns", candidate_num=20, top_m=3, epochs=2)
    first = run_recbole("SASRec", "tiny", config_dict=config)
    second = run_recbole("SASRec", "tiny", config_dict=config)
    assert first["test_result"] == second["test_result"]

    run_recbole("SASRec", "tiny", config_dict=dict(config, epochs=1))  # "killed" after epoch 0
    last = max(glob.glob(str(in_tmp / "saved" / "*-lightning" / "last.ckpt")), key=os.path.getmtime)
    resumed = run_recbole("SASRec", "tiny", config_dict=dict(config, resume_from=last))
    assert resumed["test_result"] == first["test_result"]


def test_last_checkpoint_written_every_epoch_resumes_a_killed_run(tiny_data, in_tmp):
    """A run killed mid-training resumes from the last.ckpt its last finished epoch wrote."""
    import shutil

    from recbole_mdcns.quick_start import build_model, build_trainer, load_data

    config = create_config("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, in_tmp, neg_sampler="dns", candidate_num=20, top_m=3, epochs=3, stopping_step=10))
    _, train_data, valid_data, test_data = load_data(config)
    trainer = build_trainer(config, build_model(config, train_data))
    snapshot = in_tmp / "killed-after-epoch-0.ckpt"

    def copy_last_checkpoint(epoch: int, score: float) -> None:  # runs before this epoch's own save
        if epoch == 1:
            shutil.copy(os.path.join(trainer.lightning_dir, "last.ckpt"), snapshot)

    trainer.fit(train_data, valid_data, callback_fn=copy_last_checkpoint)
    uninterrupted = trainer.evaluate(test_data)
    assert torch.load(snapshot, weights_only=True)["epoch"] == 0
    resumed = run_recbole("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, in_tmp, neg_sampler="dns", candidate_num=20, top_m=3, epochs=3, stopping_step=10,
        resume_from=str(snapshot)))
    assert resumed["test_result"] == uninterrupted
    assert resumed["train_info"]["epochs"] == 3


def _cli(tmp_path: Path, tiny_data: Path, *flags: str) -> list[str]:
    """``python -m recbole_mdcns`` on the tiny dataset, its config given as a YAML file."""
    config = tiny_config(tiny_data, tmp_path, state="INFO")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "recbole_mdcns", "--model=SASRec", "--dataset=tiny",
            "--config_files", str(path), *flags]


def test_cli_matches_recbole_quick_start_output(tiny_data, in_tmp):
    cmd = _cli(in_tmp, tiny_data, "--neg_sampler=dns", "--candidate_num=10")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=in_tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    for line in ("epoch 0 training", "epoch 0 evaluating", "best valid", "test result",
                 "scoring SASRec: dot-product"):
        assert line in log
    assert "Train     0:" not in log and "Evaluate   :" not in log  # show_progress: False, no bars


def test_ddp_two_cpu_processes_train_and_only_rank_zero_writes(tiny_data, in_tmp):
    cmd = _cli(in_tmp, tiny_data, "--neg_sampler=dns", "--candidate_num=10",
               "--accelerator=cpu", "--devices=2", "--strategy=ddp")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=in_tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "test result" in log and "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert log.count("epoch 0 training") == 1  # rank 1 logs warnings only
    assert len(glob.glob(str(in_tmp / "log" / "**" / "*.log"), recursive=True)) == 1
    assert len(glob.glob(str(in_tmp / "saved" / "*.pth"))) == 1
    assert len(os.listdir(in_tmp / "log_tensorboard")) == 1


def test_runs_never_overwrite_saved_files(tiny_data, in_tmp):
    from recbole_mdcns.trainer import _unused_name

    first = in_tmp / "M-1.pth"
    first.write_text("user data")
    assert _unused_name(str(first)) == str(in_tmp / "M-1~1.pth")
    (in_tmp / "M-1~1-lightning").mkdir()
    assert _unused_name(str(first)) == str(in_tmp / "M-1~2.pth")
    assert first.read_text() == "user data"


def test_s3rec_needs_finetune_stage(tiny_data, in_tmp):
    with pytest.raises(ValueError, match="train_stage must be 'finetune'"):
        create_config("S3Rec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns",
                                                              item_attribute="categories"))


@pytest.mark.parametrize("model_name", ["LightGCN", "NGCF", "NCL", "SpectralCF", "GCMC"])
def test_recbole_graph_models_build_on_todays_scipy(tiny_data, in_tmp, model_name):
    """RecBole 1.2.1's graph models fill a ``dok_matrix`` with ``_update``, which scipy >= 1.13 lacks: with
    the compat shim plain RecBole builds each one, and LightGCN's normalised adjacency is exactly
    ``D^-1/2 A D^-1/2`` of the user-item graph computed here independently."""
    import numpy as np
    import scipy.sparse as sp
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, init_seed

    config = Config(model=model_name, dataset="tiny", config_dict=tiny_config(
        tiny_data, in_tmp, eval_args={"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "mode": "full",
                                      "group_by": "user"}))
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    model = get_model(model_name)(config, train_data._dataset)  # AttributeError: '_update' without the shim
    assert sum(p.numel() for p in model.parameters()) > 0
    if model_name == "LightGCN":
        inter = train_data._dataset.inter_matrix(form="coo").astype(np.float32)
        adj = sp.bmat([[None, inter], [inter.T, None]]).tocsr()
        assert adj.shape[0] == inter.shape[0] + inter.shape[1] and adj.nnz == 2 * inter.nnz > 0
        scale = sp.diags((np.asarray(adj.sum(axis=1)).ravel() + 1e-7) ** -0.5)
        np.testing.assert_allclose(model.norm_adj_matrix.to_dense().numpy(), (scale @ adj @ scale).toarray(),
                                   rtol=1e-5, atol=1e-7)
