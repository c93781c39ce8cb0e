"""RecBole's own loaders on this plug-in's checkpoints, and the restricted unpickler behind them.

A checkpoint saved by ``run_recbole`` loads through RecBole's ``load_data_and_model`` (and
its model ranks with ``full_sort_topk``); RecBole's trainer resumes from it; the dataset and
dataloader caches RecBole writes load too. A crafted file whose pickle would call a function
is refused by every one of those loaders, naming the type, and the function never runs.
"""
from __future__ import annotations

import glob
import os
import pickle
import re
from pathlib import Path

import pytest
import recbole.quick_start
import torch
import yaml
from recbole.data import create_dataset
from recbole.data.dataset import SequentialDataset
from recbole.trainer import Trainer
from recbole.utils.case_study import full_sort_topk

import recbole_mdcns.compat
from recbole_mdcns import run_recbole, safe_pickle
from recbole_mdcns.compat import load_recbole_checkpoint
from recbole_mdcns.safe_pickle import UnsafePickleError

from conftest import tiny_config


class _Calls:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One tiny ``dns`` run; its ``checkpoint_dir`` is a ``pathlib.Path`` (RecBole's Config keeps it)."""
    folder = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        config = tiny_config(tiny_data, folder, neg_sampler="dns", candidate_num=10, top_m=2, epochs=2)
        config["checkpoint_dir"] = folder / "saved"
        result = run_recbole("SASRec", "tiny", config_dict=config)
        (checkpoint,) = glob.glob(str(folder / "saved" / "SASRec-*.pth"))
        yield folder, Path(checkpoint), result


def test_load_data_and_model_and_full_sort_topk_on_our_checkpoint(trained, monkeypatch):
    folder, checkpoint, result = trained
    monkeypatch.chdir(folder)
    load_data_and_model = recbole.quick_start.load_data_and_model  # RecBole's, as `import recbole_mdcns` left it
    assert load_data_and_model is recbole_mdcns.compat.load_data_and_model
    config, model, dataset, _, _, test_data = load_data_and_model(str(checkpoint))

    saved = load_recbole_checkpoint(checkpoint)
    assert isinstance(saved["config"]["checkpoint_dir"], Path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["state_dict"].items())
    trainer = Trainer(config, model)  # RecBole's own evaluation of the loaded model = the run's test result
    assert trainer.evaluate(test_data, load_best_model=False) == result["test_result"]

    users = dataset.token2id(dataset.uid_field, ["u1", "u2", "u3"])
    scores, items = full_sort_topk(users, model, test_data, k=5, device=config["device"])
    assert scores.shape == items.shape == (3, 5) and torch.isfinite(scores).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all() and items.min() >= 1 and items.max() < dataset.item_num
    assert all(len(set(row.tolist())) == 5 for row in items)

    trainer.resume_checkpoint(checkpoint)  # RecBole's trainer-module torch.load, restricted too
    assert trainer.start_epoch == saved["epoch"] + 1


PAYLOADS = {  # name -> (marker, config) -> (object to pickle, the type the refusal names)
    # a function outside the allowlist: refused when the pickle names it
    "os.system": lambda marker, config: (_Calls(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
    # an allowed global that RecBole's files only reference (Config.yaml_loader): never called
    "call a referenced class": lambda marker, config: (_Calls(yaml.loader.FullLoader, "a: 1"),
                                                       "yaml.loader.FullLoader"),
    # getattr takes RecBole objects' methods (a loader's collate_fn), never a dunder
    "getattr": lambda marker, config: (_Calls(getattr, config, "__init__"), "builtins.getattr"),
}


@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_checkpoint_is_refused_by_every_loader_and_never_runs(trained, tmp_path, monkeypatch, payload):
    folder, checkpoint, _ = trained
    monkeypatch.chdir(folder)
    marker = tmp_path / "pwned"
    real = load_recbole_checkpoint(checkpoint)
    evil_object, named = PAYLOADS[payload](marker, real["config"])
    evil = tmp_path / "evil.pth"
    torch.save({**real, "other_parameter": evil_object}, evil, pickle_protocol=4)
    refused = pytest.raises(UnsafePickleError, match=re.escape(named))

    with refused:
        load_recbole_checkpoint(evil)
    with refused:
        recbole.quick_start.load_data_and_model(str(evil))
    config, model, _, _, _, test_data = recbole.quick_start.load_data_and_model(str(checkpoint))
    trainer = Trainer(config, model)
    with refused:
        trainer.evaluate(test_data, load_best_model=True, model_file=str(evil))
    with refused:
        trainer.resume_checkpoint(evil)
    assert not marker.exists()

    if payload == "os.system":  # the payload is live: plain pickle runs it
        torch.load(evil, weights_only=False)
        assert marker.exists()


def test_crafted_dataset_cache_is_refused(trained, tmp_path, monkeypatch):
    """``create_dataset`` unpickles ``<checkpoint_dir>/<dataset>-<class>.pth`` when it exists."""
    folder, checkpoint, _ = trained
    monkeypatch.chdir(folder)
    config = load_recbole_checkpoint(checkpoint)["config"]
    marker = tmp_path / "pwned"
    cache = Path(config["checkpoint_dir"]) / f"{config['dataset']}-SequentialDataset.pth"
    cache.write_bytes(pickle.dumps(_Calls(os.system, f"touch {marker}"), protocol=4))
    try:
        named = f"{cache}: refusing to load {os.system.__module__}.system"
        with pytest.raises(UnsafePickleError, match=re.escape(named)):
            create_dataset(config)
    finally:
        cache.unlink()
    assert not marker.exists()


def test_real_caches_and_a_checkpoint_holding_a_dataset_load(tiny_data, in_tmp):
    """SASRecF keeps its feature layer -- with the whole dataset -- in ``other_parameter``; with
    ``save_dataset`` / ``save_dataloaders`` RecBole pickles the dataset and the three loaders,
    which ``load_data_and_model`` reads back."""
    config = tiny_config(tiny_data, in_tmp, neg_sampler="uniform", selected_features=["categories", "brand"],
                         save_dataset=True, save_dataloaders=True)
    result = run_recbole("SASRecF", "tiny", config_dict=config)
    (checkpoint,) = glob.glob(str(in_tmp / "saved" / "SASRecF-*.pth"))
    saved = load_recbole_checkpoint(checkpoint)
    assert isinstance(saved["other_parameter"]["feature_embed_layer"].dataset, SequentialDataset)
    with open(in_tmp / "saved" / "tiny-SequentialDataset.pth", "rb") as f:
        assert isinstance(safe_pickle.load(f), SequentialDataset)
    with open(in_tmp / "saved" / "tiny-for-SASRecF-dataloader.pth", "rb") as f:
        loaders = safe_pickle.load(f)
    assert [type(loader).__name__ for loader, _ in loaders] == ["TrainDataLoader", "FullSortEvalDataLoader",
                                                                "FullSortEvalDataLoader"]

    config, model, _, _, _, test_data = recbole.quick_start.load_data_and_model(checkpoint)  # through both caches
    assert Trainer(config, model).evaluate(test_data, load_best_model=False) == result["test_result"]


def test_a_defaultdict_loads_only_with_an_allowed_factory():
    """RecBole's datasets from benchmark files hold ``defaultdict(int)``; a factory outside the allowed
    globals is refused before it could ever be called."""
    import collections
    import os
    import pickle

    loaded = safe_pickle.loads(pickle.dumps(collections.defaultdict(int, {"item_id_list": 50})))
    assert loaded == {"item_id_list": 50} and loaded["unseen"] == 0
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        safe_pickle.loads(pickle.dumps(collections.defaultdict(os.system)))
