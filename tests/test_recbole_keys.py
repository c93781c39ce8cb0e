"""RecBole's trainer and model keys under a sampler: honoured, mapped, refused or warned about, never
silently ignored -- and only when the user set them (docs/usage.md, "RecBole keys with a sampler")."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import yaml
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from conftest import tiny_config
from recbole_mdcns.config import create_config
from recbole_mdcns.data import candidate_train_loader
from recbole_mdcns.models import get_model
from recbole_mdcns.quick_start import build_trainer
from recbole_mdcns.recbole_keys import DISTRIBUTED_KEYS, LOSS_ONLY_KEYS, RecBoleKeyWarning, user_settings


def _config(tiny_data, tmp, model="SASRec", files=None, **overrides):
    return create_config(model, "tiny", files, tiny_config(tiny_data, tmp, **{"neg_sampler": "dns", **overrides}))


def _key_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RecBoleKeyWarning)]


# --- who set a key ------------------------------------------------------------------------------

def test_user_settings_merge_files_dict_and_command_line_as_recbole(in_tmp, monkeypatch):
    path = in_tmp / "run.yaml"
    path.write_text(yaml.safe_dump({"neg_sampler": "uniform", "eval_step": 3, "port": "5678"}))
    monkeypatch.setattr(sys, "argv", ["run", "--neg_sampler=dns", "--learning_rate=0.01", "stray", "--a=b=c"])
    settings = user_settings([str(path)], {"neg_sampler": "mdcns", "eval_step": 2})
    assert settings == {"neg_sampler": "dns", "eval_step": 2, "port": "5678", "learning_rate": 0.01}


def test_defaults_are_never_refused_or_warned_about(tiny_data, in_tmp):
    """RecBole's default train_neg_sample_args samples (sample_num 1) and Caser's YAML sets reg_weight:
    neither was set by the user."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        config = _config(tiny_data, in_tmp, model="Caser")
    assert config["reg_weight"] > 0 and config["train_neg_sample_args"]["distribution"] == "none"
    assert _key_warnings(record) == []


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", DISTRIBUTED_KEYS)
def test_recbole_ddp_keys_name_lightnings(tiny_data, in_tmp, key):
    with pytest.raises(ValueError, match=rf"^{key}: RecBole's own multi-process start-up") as err:
        _config(tiny_data, in_tmp, **{key: 1})
    assert all(name in str(err.value) for name in ("devices", "strategy", "num_nodes"))
    assert not dist.is_initialized()  # refused before RecBole's Config could open its NCCL group


def test_recbole_ddp_keys_from_files_and_command_line(tiny_data, in_tmp, monkeypatch):
    path = in_tmp / "ddp.yaml"
    path.write_text(yaml.safe_dump({"nproc": 2, "world_size": 2}))
    with pytest.raises(ValueError, match="nproc, world_size: RecBole's own"):
        _config(tiny_data, in_tmp, files=[str(path)])
    monkeypatch.setattr(sys, "argv", ["run", "--local_rank=0"])
    with pytest.raises(ValueError, match="local_rank: RecBole's own"):
        _config(tiny_data, in_tmp)
    monkeypatch.setattr(sys, "argv", ["run", "--nproc=2"])  # RecBole's own pipeline keeps its keys
    assert _config(tiny_data, in_tmp, neg_sampler="recbole", train_neg_sample_args=None)["nproc"] == 2


def test_recbole_sampling_keys_shrink_the_batch_so_they_are_refused(tiny_data, in_tmp):
    recbole = {"distribution": "uniform", "sample_num": 4}
    plain = create_config("SASRec", "tiny", None, tiny_config(tiny_data, in_tmp, train_neg_sample_args=recbole,
                                                              loss_type="BPR"))
    train, _, _ = data_preparation(plain, create_dataset(plain))
    assert train.step == plain["train_batch_size"] // 4  # what a sampler run would have trained on
    with pytest.raises(ValueError, match="train_neg_sample_args is RecBole's own negative sampling") as err:
        _config(tiny_data, in_tmp, train_neg_sample_args=recbole)
    assert "candidate_num" in str(err.value) and "neg_sampler: recbole" in str(err.value)
    assert _config(tiny_data, in_tmp, train_neg_sample_args=None)["train_neg_sample_args"]["distribution"] == "none"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"clip_grad_norm": {"norm_type": 1}}, "clip_grad_norm must be a dict"),
    ({"clip_grad_norm": {"max_norm": 1, "norm": 1}}, "keys from ['max_norm', 'norm_type'"),
    ({"enable_scaler": True}, "enable_scaler: True scales the gradients of mixed-precision"),
    ({"enable_amp": True, "precision": "32-true"}, "enable_amp: True means precision: bf16-mixed on accelerator cpu"),
    ({"accelerator": "gpu", "devices": 2}, "gpu_id: '0' makes only 1 visible"),
])
def test_bad_recbole_keys_are_refused(tiny_data, in_tmp, overrides, message):
    with pytest.raises(ValueError) as err:
        _config(tiny_data, in_tmp, **overrides)
    assert message in str(err.value)


# --- mapped and honoured -----------------------------------------------------------------------

def test_enable_amp_maps_to_lightning_precision(tiny_data, in_tmp):
    assert _config(tiny_data, in_tmp)["precision"] == "32-true"
    assert _config(tiny_data, in_tmp, enable_amp=True)["precision"] == "bf16-mixed"  # RecBole's CPU autocast
    gpu = _config(tiny_data, in_tmp, enable_amp=True, enable_scaler=True, accelerator="gpu", precision="16-mixed")
    assert gpu["precision"] == "16-mixed"  # float16 autocast with a gradient scaler
    with pytest.warns(RecBoleKeyWarning, match="enable_scaler: False is not honoured"):
        _config(tiny_data, in_tmp, enable_amp=True, enable_scaler=False, accelerator="gpu")


def test_enable_amp_trains_in_bf16_on_cpu(tiny_data, in_tmp):
    config = _config(tiny_data, in_tmp, enable_amp=True, candidate_num=5)
    init_seed(config["seed"], config["reproducibility"])
    train, valid, _ = data_preparation(config, create_dataset(config))
    train = candidate_train_loader(config, train)
    trainer = build_trainer(config, get_model("SASRec")(config, train._dataset))
    trainer.fit(train, valid, saved=False)
    assert trainer.lightning_trainer.precision == "bf16-mixed" and trainer.best_valid_result is not None


def test_clip_grad_norm_honours_norm_type(tiny_data, in_tmp):
    config = _config(tiny_data, in_tmp, candidate_num=5, clip_grad_norm={"max_norm": 0.01, "norm_type": 1.0})
    init_seed(config["seed"], config["reproducibility"])
    train, _, _ = data_preparation(config, create_dataset(config))
    train = candidate_train_loader(config, train)
    trainer = build_trainer(config, get_model("SASRec")(config, train._dataset))
    module = trainer.build_module()
    (100 * module.training_loss(train.probe_batch())).backward()
    module.configure_gradient_clipping(module.optimizer, gradient_clip_val=0.01)  # what Lightning calls
    grads = torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])
    assert grads.abs().sum().item() == pytest.approx(0.01, rel=1e-4)  # the 1-norm is clipped, not the 2-norm
    assert grads.norm().item() < 0.005


# --- warned ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "key"), [(m, k) for m, keys in LOSS_ONLY_KEYS.items() for k in keys])
def test_model_loss_keys_are_warned_about_once(tiny_data, in_tmp, model, key):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        value = _config(tiny_data, in_tmp, model=model)[key]  # the model's default: not the user's
        assert _key_warnings(record) == []
        _config(tiny_data, in_tmp, model=model, **{key: value})
    messages = _key_warnings(record)
    assert len(messages) == 1 and messages[0].startswith(f"{key} is not used: it serves only {model}'s own")


def test_mdcns_peer_loss_keys_are_warned_about(tiny_data, in_tmp):
    with pytest.warns(RecBoleKeyWarning, match="reg_weight is not used: it serves only Caser's"):
        _config(tiny_data, in_tmp, neg_sampler="mdcns", mdcns_peer_model="Caser", reg_weight=0.1)
