"""``load_col`` and a sequential model's time field: RecBole's default ``load_col`` (``inter: [user_id, item_id]``)
gets the ``.inter`` file's TIME_FIELD added, a ``load_col`` the user set without it is refused before any data is
loaded, and a dataset without the field is left to RecBole -- with and without a sampler."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import yaml
from recbole.data import create_dataset, data_preparation

from conftest import tiny_config, write_dataset
from recbole_mdcns.config import create_config
from recbole_mdcns.quick_start import build_model, build_trainer, fit_and_test, load_data

ADDED = "load_col: added timestamp (TIME_FIELD) to RecBole's default inter columns"
DEFAULT_INTER = ["user_id", "item_id"]  # RecBole's default load_col (properties/dataset/sample.yaml)


@pytest.fixture(scope="module")
def untimed_data(tmp_path_factory) -> Path:
    """The tiny dataset with the timestamp column dropped from its ``.inter`` file."""
    root = write_dataset(tmp_path_factory.mktemp("untimed"))
    inter = root / "tiny" / "tiny.inter"
    inter.write_text("".join("\t".join(line.split("\t")[:-1]) + "\n" for line in inter.read_text().splitlines()))
    return root


def _settings(data: Path, tmp: Path, sampler: str, **overrides) -> dict:
    """The tiny config without its ``load_col`` (RecBole's default then applies), then ``overrides``; RecBole's
    own trainer (``neg_sampler: recbole``) trains SASRec's BPR mode on its own sampled negatives."""
    settings = tiny_config(data, tmp, neg_sampler=sampler, loss_type="BPR")
    del settings["load_col"]
    settings.update(overrides)
    if sampler == "recbole":
        settings["train_neg_sample_args"] = {"distribution": "uniform", "sample_num": 1}
    return settings


def _added(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("load_col:")]


@pytest.mark.parametrize("sampler", ["recbole", "uniform"])
def test_default_load_col_gets_the_time_field_and_trains(tiny_data, in_tmp, caplog, sampler):
    with caplog.at_level(logging.WARNING):
        config = create_config("SASRec", "tiny", None, _settings(tiny_data, in_tmp, sampler))
    assert config["load_col"] == {"inter": [*DEFAULT_INTER, "timestamp"]}
    assert _added(caplog) == [f"{ADDED}, as SASRec is a sequential model, whose dataset orders each user's "
                              "interactions by it: load_col = {'inter': ['user_id', 'item_id', 'timestamp']}"]
    dataset, train, valid, test = load_data(config)
    assert "timestamp" in dataset.inter_feat.columns
    result = fit_and_test(build_trainer(config, build_model(config, train)), train, valid, test, saved=False)
    assert 0 <= result["test_result"]["ndcg@10"] <= 1


@pytest.mark.parametrize(("sampler", "source"), [("recbole", "dict"), ("uniform", "dict"), ("uniform", "file"),
                                                 ("uniform", "command line")])
def test_user_load_col_without_the_time_field_is_refused(tiny_data, in_tmp, monkeypatch, sampler, source):
    load_col = {"inter": DEFAULT_INTER, "item": ["item_id", "brand"]}
    settings, files = _settings(tiny_data, in_tmp, sampler), None
    if source == "dict":
        settings["load_col"] = load_col
    elif source == "file":
        (in_tmp / "load_col.yaml").write_text(yaml.safe_dump({"load_col": load_col}))
        files = [str(in_tmp / "load_col.yaml")]
    else:
        monkeypatch.setattr(sys, "argv", ["run", f"--load_col={load_col}"])
    with pytest.raises(ValueError) as err:
        create_config("SASRec", "tiny", files, settings)  # the config: no dataset is created before it
    assert str(err.value) == (
        "load_col must load timestamp (TIME_FIELD) from tiny.inter: SASRec is a sequential model, whose dataset "
        f"orders each user's interactions by it; got load_col: {load_col}. Add it to the inter columns: "
        "load_col: {inter: [user_id, item_id, timestamp], item: [item_id, brand]}")


@pytest.mark.parametrize(("model", "data", "overrides"), [
    pytest.param("SASRec", "untimed", {}, id="no-time-column"),  # nothing to add: RecBole's own error follows
    pytest.param("BPR", "timed", {}, id="general-model"),  # not sequential: never ordered by time
    pytest.param("SASRec", "timed", {"load_col": {"inter": [*DEFAULT_INTER, "timestamp"]}}, id="complete"),
    pytest.param("SASRec", "timed", {"load_col": {"inter": "*"}}, id="every-column"),
    pytest.param("SASRec", "timed", {"load_col": {"inter": DEFAULT_INTER}, "benchmark_filename": ["train", "test"]},
                 id="benchmark-parts"),  # already split: never ordered by time
])
def test_load_col_left_as_recbole_has_it(tiny_data, untimed_data, in_tmp, caplog, model, data, overrides):
    settings = _settings(tiny_data if data == "timed" else untimed_data, in_tmp, "recbole", **overrides)
    with caplog.at_level(logging.WARNING):
        config = create_config(model, "tiny", None, settings)
    assert config["load_col"] == overrides.get("load_col", {"inter": DEFAULT_INTER}) and _added(caplog) == []
    if data == "untimed":
        with pytest.raises(ValueError, match=r"\[timestamp\] is not exist in interaction"):
            data_preparation(config, create_dataset(config))
