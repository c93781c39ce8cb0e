"""A sampler module's inputs from a real RecBole pipeline on the tiny dataset: config, model, optimizer,
one training batch with its candidate pool, and the candidate loader."""
from __future__ import annotations

from pathlib import Path

import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, init_seed

from recbole_mdcns.config import create_config
from recbole_mdcns.data import candidate_train_loader

from conftest import tiny_config


def sampler_setup(model_name: str, sampler: str, data: Path, tmp_path: Path, **overrides):
    """``(config, model, optimizer, batch, train_data)`` for ``neg_sampler: sampler`` on the tiny dataset."""
    config = create_config(model_name, "tiny", config_dict=tiny_config(data, tmp_path, neg_sampler=sampler,
                                                                       **overrides))
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    train_data = candidate_train_loader(config, train_data)
    model = get_model(model_name)(config, train_data._dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = next(iter(train_data))
    return config, model, optimizer, batch, train_data


def pool_loader(data: Path, tmp_path: Path, dataset: str = "tiny", **overrides):
    """``(config, dataset, loader)``: SASRec's RecBole training rows on ``data/dataset`` in the candidate loader."""
    config = create_config("SASRec", dataset, config_dict=tiny_config(data, tmp_path, **overrides))
    built = create_dataset(config)
    train_data, _, _ = data_preparation(config, built)
    return config, built, candidate_train_loader(config, train_data)


def training_items(loader) -> dict[int, set[int]]:
    """Each user's training items (targets and sequence items) in the loader's dataset."""
    inter, seq_field = loader._dataset.inter_feat, loader._sampler.item_seq_field
    items: dict[int, set[int]] = {}
    for user, target, seq in zip(inter["user_id"].tolist(), inter["item_id"].tolist(), inter[seq_field].tolist()):
        items.setdefault(user, set()).update([target, *[i for i in seq if i > 0]])
    return items


def last_checkpoint(root: Path) -> dict:
    """The run's Lightning ``last.ckpt`` under ``root/saved``, loaded as plain tensors and values."""
    (path,) = root.glob("saved/*-lightning/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_path(root: Path) -> Path:
    (path,) = root.glob("saved/*-lightning/last.ckpt")
    return path
