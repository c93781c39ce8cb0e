"""Models a method uses beside the self model: a trained companion built from the run's config
(MDCNS's peer) and frozen models loaded from RecBole checkpoints (MDCNS's extra teachers)."""
from __future__ import annotations

import torch
from recbole.config import Config

from recbole_mdcns.compat import load_recbole_checkpoint
from recbole_mdcns.general import GENERAL_MODELS
from recbole_mdcns.models import get_model, sequential_model_class


def companion_config(config: Config, model_name: str, overrides: dict | None = None) -> Config:
    """RecBole ``Config`` of a companion model: ``model_name``'s own RecBole defaults, then every value
    the user set for the run (files, dict, command line; the sampler defaults included), then
    ``overrides``, which win over all of them. Same dataset, device and accelerator as the run."""
    overrides = dict(overrides or {})
    external = {**config.file_config_dict, **config.variable_config_dict, **overrides}
    external.pop("model", None)
    companion = Config(model=model_name, dataset=config["dataset"], config_dict=external)
    for key, value in overrides.items():
        companion[key] = value
    companion["device"] = config["device"]
    companion["accelerator"] = config["accelerator"]
    return companion


def build_companion(config: Config, dataset, model_name: str, overrides: dict | None,
                    seed: int) -> tuple[torch.nn.Module, Config]:
    """A companion model (a sequential model, or one of the general models beside a general model) on the
    train ``dataset``, initialised from its own ``seed`` (the global RNG is
    left untouched), so it is neither a copy of a same-architecture self model nor dependent on the
    RNG state -- the same on every DDP rank."""
    companion_cfg = companion_config(config, model_name, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        name = companion_cfg["model"]
        model = (get_model(name) if name in GENERAL_MODELS else sequential_model_class(name))(companion_cfg, dataset)
    return model, companion_cfg


def load_frozen_model(path: str, config: Config, dataset, key: str) -> torch.nn.Module:
    """A frozen model from a RecBole checkpoint (``{'config', 'state_dict', ...}`` as RecBole saves it):
    the model class named in its config, rebuilt on this run's train ``dataset``, in eval mode with
    ``requires_grad=False``. A checkpoint made for another dataset, item count or
    ``MAX_ITEM_LIST_LENGTH`` raises ``ValueError`` naming the config ``key`` that listed it."""
    where = f"{key}: {path}"
    checkpoint = load_recbole_checkpoint(path, map_location="cpu")  # restricted unpickler: refuses code
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{where} is not a RecBole checkpoint (a dict with 'config' and 'state_dict')")
    t_cfg, state = checkpoint["config"], checkpoint["state_dict"]
    if t_cfg["dataset"] != config["dataset"]:
        raise ValueError(f"{where} was trained on dataset {t_cfg['dataset']!r}, this run uses {config['dataset']!r}")
    rows = state.get("item_embedding.weight")
    if rows is not None and rows.shape[0] != dataset.item_num:
        raise ValueError(
            f"{where} was trained on {rows.shape[0] - 1} items, dataset {config['dataset']!r} here has "
            f"{dataset.item_num - 1}: the checkpoint was made for another version of the dataset"
        )
    if t_cfg["MAX_ITEM_LIST_LENGTH"] != config["MAX_ITEM_LIST_LENGTH"]:
        raise ValueError(f"{where} was trained with MAX_ITEM_LIST_LENGTH={t_cfg['MAX_ITEM_LIST_LENGTH']}, "
                         f"this run uses {config['MAX_ITEM_LIST_LENGTH']}")
    model_class = sequential_model_class(t_cfg["model"])
    if model_class is None:
        raise ValueError(f"{where} holds {t_cfg['model']}, not a RecBole sequential model")
    t_cfg["device"] = config["device"]
    model = model_class(t_cfg, dataset)
    mismatch = [f"{k} {tuple(v.shape)} vs {tuple(state[k].shape)}" for k, v in model.state_dict().items()
                if k in state and v.shape != state[k].shape]
    if mismatch:
        raise ValueError(f"{where} does not fit dataset {config['dataset']!r}: {', '.join(mismatch)}")
    model.load_state_dict(state)
    model.load_other_parameter(checkpoint.get("other_parameter"))
    model.requires_grad_(False)
    return model.eval()
