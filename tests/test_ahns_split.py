"""benchmarks/studies/ahns_split.py: the AHNS authors' train.txt / test.txt as RecBole benchmark files."""
from __future__ import annotations

import random

import pytest
from recbole.data import create_dataset, data_preparation

from benchmarks.studies.ahns_split import convert
from recbole_mdcns.config import create_config


def _write_authors_files(folder, n_users=30, n_items=50, seed=0):
    """``train.txt`` / ``test.txt`` in the authors' layout (``user item item ...``, 0-based ids)."""
    rng = random.Random(seed)
    train, test = {}, {}
    for user in range(n_users):
        items = rng.sample(range(n_items), rng.randint(5, 20))
        cut = int(0.8 * len(items))
        train[user], test[user] = items[:cut], items[cut:]
    for name, users in (("train", train), ("test", test)):
        (folder / f"{name}.txt").write_text("".join(f"{u} {' '.join(map(str, items))}\n" for u, items in users.items()))
    return train, test


def _read(path):
    rows = path.read_text().splitlines()
    assert rows[0] == "user_id:token\titem_id:token"
    return [tuple(map(int, row.split("\t"))) for row in rows[1:]]


def test_validation_is_a_seeded_tenth_of_each_users_train_and_recbole_loads_it(tmp_path):
    train, test = _write_authors_files(tmp_path)
    counts = convert(tmp_path, tmp_path / "data", "ahns", ratio=0.1, seed=7)
    folder = tmp_path / "data" / "ahns"
    kept, valid, held = (_read(folder / f"ahns.{split}.inter") for split in ("train", "valid", "test"))
    assert sorted(held) == sorted((u, i) for u, items in test.items() for i in items)  # the test as given
    assert sorted(kept + valid) == sorted((u, i) for u, items in train.items() for i in items)  # a partition
    for user, items in train.items():
        assert sum(1 for u, _ in valid if u == user) == min(round(0.1 * len(items)), len(items) - 1)
    assert counts == {"train": len(kept), "valid": len(valid), "test": len(held)}
    convert(tmp_path, tmp_path / "again", "ahns", ratio=0.1, seed=7)
    assert (tmp_path / "again" / "ahns" / "ahns.valid.inter").read_text() == (folder / "ahns.valid.inter").read_text()
    config = create_config("BPR", "ahns", config_dict={
        "data_path": str(tmp_path / "data"), "benchmark_filename": ["train", "valid", "test"],
        "load_col": {"inter": ["user_id", "item_id"]}, "neg_sampler": "uniform", "state": "WARNING",
        "eval_args": {"order": "RO", "mode": "full", "group_by": "user"}, "checkpoint_dir": str(tmp_path / "saved")})
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    assert (len(train_data.dataset), len(valid_data.dataset), len(test_data.dataset)) == \
        (len(kept), len(valid), len(held))


def test_missing_files_and_bad_lines_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.txt"):
        convert(tmp_path, tmp_path / "out", "x")
    (tmp_path / "train.txt").write_text("0 1 2\nuser x\n")
    (tmp_path / "test.txt").write_text("0 3\n")
    with pytest.raises(ValueError, match="train.txt:2"):
        convert(tmp_path, tmp_path / "out", "x")
