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


def last_checkpoint(root: Path) -> dict:
    """The run's Lightning ``last.ckpt`` under ``root/saved``, loaded as plain tensors and values."""
    (path,) = root.glob("saved/*-lightning/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_path(root: Path) -> Path:
    (path,) = root.glob("saved/*-lightning/last.ckpt")
    return path
