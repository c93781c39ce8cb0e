"""Tiny atomic datasets written by the tests themselves, and a fast RecBole config."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

N_USERS, N_ITEMS = 40, 60


def write_dataset(root: Path, name: str = "tiny", n_users: int = N_USERS, n_items: int = N_ITEMS,
                  min_len: int = 6, max_len: int = 14, seed: int = 0) -> Path:
    """``root/name/name.inter`` (+ ``.item`` with token, token_seq and float features)."""
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(1, n_users + 1):
        items = rng.sample(range(1, n_items + 1), rng.randint(min_len, max_len))
        lines += [f"u{user}\ti{item}\t{rng.randint(1, 5)}\t{t}" for t, item in enumerate(items)]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    item_lines = ["item_id:token\tcategories:token_seq\tbrand:token\tprice:float"]
    for item in range(1, n_items + 1):
        cats = " ".join(f"c{c}" for c in rng.sample(range(8), rng.randint(1, 3)))
        item_lines.append(f"i{item}\t{cats}\tb{item % 5}\t{rng.uniform(1, 100):.2f}")
    (folder / f"{name}.item").write_text("\n".join(item_lines) + "\n")
    return root


def tiny_config(data_path: Path, tmp_path: Path, **overrides) -> dict:
    """A RecBole config that trains any sequential model on the tiny dataset in seconds."""
    config = {
        "data_path": str(data_path),
        "checkpoint_dir": str(tmp_path / "saved"),
        "epochs": 1,
        "train_batch_size": 64,
        "eval_batch_size": 256,
        "MAX_ITEM_LIST_LENGTH": 8,
        "hidden_size": 16,
        "embedding_size": 16,
        "inner_size": 32,
        "n_layers": 1,
        "n_heads": 1,
        "show_progress": False,
        "seed": 2020,
        "reproducibility": True,
        "state": "WARNING",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                     "item": ["item_id", "categories", "brand", "price"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Recall", "NDCG"],
        "topk": [10],
        "valid_metric": "NDCG@10",
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in a temporary folder: RecBole writes log/ and log_tensorboard/ into the cwd."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
