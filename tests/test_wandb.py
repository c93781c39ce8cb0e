"""``log_wandb: True``: per-epoch train-loss and validation curves as RecBole's trainer logs them,
read back from the run wandb writes in offline mode; only rank 0 opens a run."""
from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from recbole_mdcns import run_recbole
from recbole_mdcns.config import create_config
from recbole_mdcns.quick_start import build_model, build_trainer, load_data

from conftest import tiny_config

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

_BLOCK, _HEADER = 32768, 7


def _history(run_file: Path) -> list[dict]:
    """The ``history`` records of an offline ``run-<id>.wandb`` file, as ``{key: value}`` rows.

    The file is wandb's LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of
    ``crc32 | length | type`` framed chunks) of wandb's own protobuf ``Record`` messages;
    wandb >= 0.19 ships no Python reader for it.
    """
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, parts, pos = [], [], _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER]) if left >= _HEADER else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        if pos + _HEADER + length > len(data):  # a record wandb's writer had not finished: the file ends here
            break
        parts.append(data[pos + _HEADER:pos + _HEADER + length])
        pos += _HEADER + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def _history_once_written(run_file: Path, key: str, count: int, timeout: float = 30.0) -> list[dict]:
    """:func:`_history` once ``count`` rows with ``key`` are on disk: wandb's service process may still be
    writing the offline file when ``wandb.finish()`` returns."""
    deadline = time.monotonic() + timeout
    while True:
        rows = _history(run_file) if run_file.exists() else []
        if sum(key in row for row in rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


@pytest.fixture
def offline_wandb(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(in_tmp))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield in_tmp
    wandb.finish()
    wandb.teardown()  # wandb keeps its settings (WANDB_DIR) per process until torn down


@pytest.mark.parametrize("sampler, extra", [("dns", {"candidate_num": 10}), ("mdcns", {"candidate_num": 10})])
def test_log_wandb_gives_per_epoch_train_loss_and_valid_curves(tiny_data, offline_wandb, sampler, extra):
    config = tiny_config(tiny_data, offline_wandb, neg_sampler=sampler, epochs=2, log_wandb=True,
                         wandb_project="recbole-mdcns-test", **extra)
    result = run_recbole("SASRec", "tiny", config_dict=config)
    run_file = Path(wandb.run.dir).parent / f"run-{wandb.run.id}.wandb"  # RecBole's trainer opened the run
    assert wandb.run.settings.mode == "offline" and run_file.parent.parent.parent == offline_wandb
    wandb.finish()

    rows = _history_once_written(run_file, "valid/ndcg@10", 2)
    train = [row for row in rows if "train/train_loss" in row]
    valid = [row for row in rows if "valid/ndcg@10" in row]
    assert [row["train_step"] for row in train] == [0, 1] and [row["train/epoch"] for row in train] == [0, 1]
    assert all(math.isfinite(row["train/train_loss"]) and row["train/train_loss"] > 0 for row in train)
    if sampler == "mdcns":  # RecBole's multi-part loss: self model's and peer's, and their sum
        assert all(row["train/train_loss"] == pytest.approx(row["train/train_loss1"] + row["train/train_loss2"])
                   for row in train)
    assert [row["valid_step"] for row in valid] == [0, 1]
    assert max(row["valid/ndcg@10"] for row in valid) == pytest.approx(result["best_valid_score"])
    assert all("valid/recall@10" in row for row in valid)


def test_only_rank_zero_opens_a_wandb_run(tiny_data, offline_wandb, monkeypatch):
    config = create_config("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, offline_wandb, neg_sampler="dns", candidate_num=10, log_wandb=True))
    _, train_data, _, _ = load_data(config)
    model = build_model(config, train_data)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    trainer = build_trainer(config, model)
    trainer.wandblogger.log_metrics({"train_loss": 1.0}, head="train")  # a no-op off rank 0
    assert wandb.run is None
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    build_trainer(config, model)
    assert wandb.run is not None
