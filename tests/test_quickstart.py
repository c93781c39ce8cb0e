"""A newcomer's first run: ``python -m recbole_mdcns --preset quickstart`` (its packaged preset, ``--compare``,
the summary), output that reads like RecBole's (no third-party warning floods, Lightning's lines through
RecBole's logger, RecBole's progress bars), and errors that still surface."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from recbole_mdcns import quiet
from recbole_mdcns.config import available_presets, create_config, preset_yaml
from recbole_mdcns.quick_start import _recbole_argv, _torch_threads, main


def _quickstart(tmp_path: Path, tiny_data: Path, *flags: str) -> subprocess.CompletedProcess:
    """``python -m recbole_mdcns --preset quickstart`` on the tiny dataset (its 60 items need a smaller pool)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path, state="INFO", epochs=2)))
    cmd = [sys.executable, "-m", "recbole_mdcns", "--model=SASRec", "--dataset=tiny", "--preset", "quickstart",
           "--config_files", str(path), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_quickstart_reads_like_recbole_and_ends_with_the_summary(tiny_data, in_tmp):
    out = _quickstart(in_tmp, tiny_data, "--candidate_num=10", "--show_progress=True", "--compare")
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    # the tiny dataset's item features and Lightning's fit raise every filtered warning unfiltered
    for flood in ("FutureWarning", "UserWarning", "💡", "LeafSpec", "transfer_batch_to_device", "will not be used"):
        assert flood not in log, flood
    for line in ("epoch 0 training", "epoch 0 evaluating", "best valid", "test result",
                 "INFO  GPU available: False", "MAX_ITEM_LIST_LENGTH = 8",  # Lightning's line in RecBole's format;
                 "train_positions = all", "neg_sampler = mdcns", "neg_sampler = uniform"):  # user files beat the preset
        assert line in log, line
    assert "Train     1: 100%" in log and "Evaluate   : 100%" in log  # RecBole's bars, training from Lightning's loop
    summary = out.stderr[out.stderr.index("INFO  summary"):].splitlines()
    assert summary[1].split() == ["mdcns", "uniform"]
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in summary[2:])}
    assert len(rows["SASRec test"]) == 3 and rows["SASRec test"][0] == "recall@10"
    assert rows["peer valid"][2] == "-" and rows["self+peer valid"][2] == "-"  # uniform has no peer
    assert rows["epochs run, best epoch"][0].startswith("2, ")
    assert summary[-1].startswith("time")


def test_errors_still_surface(tiny_data, in_tmp):
    out = _quickstart(in_tmp, tiny_data)  # the preset's pool of 100 exceeds the tiny catalogue
    assert out.returncode != 0
    assert "ValueError: candidate_num must be in [1, 60]" in out.stderr
    with pytest.raises(ValueError, match=re.escape(f"preset must be one of {available_presets()}, got 'nosuch'")):
        main(["--model=SASRec", "--preset", "nosuch"])
    with pytest.raises(ValueError, match=r"torch_threads must be an integer in \[1, inf\], got 0"):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="uniform",
                                                              torch_threads=0))


def test_filters_are_narrow_and_lightning_lines_reach_recbole_handlers():
    dataset_module, message = "recbole.data.dataset.dataset", quiet.DATASET_WARNINGS[0][0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet.dataset_output():
            warnings.warn_explicit(message, FutureWarning, "dataset.py", 1, module=dataset_module)  # filtered
            warnings.warn_explicit("another change", FutureWarning, "dataset.py", 2, module=dataset_module)
            warnings.warn_explicit(message, FutureWarning, "mine.py", 3, module="mine")
            warnings.warn_explicit(message, UserWarning, "dataset.py", 4, module=dataset_module)
    assert [w.lineno for w in seen] == [2, 3, 4]

    records = []
    root_handler = logging.Handler()
    root_handler.emit = records.append
    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    handlers = list(logging.getLogger("pytorch_lightning").handlers)
    logging.getLogger().addHandler(root_handler)
    try:
        with pytest.raises(RuntimeError, match="a real error"), quiet.lightning_output():
            lightning.info("GPU available: False, used: False")
            lightning.info("💡 Tip: For seamless cloud logging ...")
            raise RuntimeError("a real error")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert [r.getMessage() for r in records] == ["GPU available: False, used: False"]
    assert logging.getLogger("pytorch_lightning").handlers == handlers  # restored


def test_preset_is_explicit_and_packaged(tiny_data, in_tmp):
    assert {"quickstart", "sasrec_original"} <= set(available_presets())
    quick = yaml.safe_load(Path(preset_yaml("quickstart")).read_text())
    assert quick["neg_sampler"] == "mdcns" and quick["train_positions"] == "all"
    plain = create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="mdcns"))
    assert plain["train_positions"] == "last" and plain["torch_threads"] is None  # mdcns alone: unchanged
    argv = ["--model=SASRec", "--preset", "quickstart", "--compare", "--neg_sampler=dns", "--top_m=2", "-d", "x"]
    assert _recbole_argv(argv, ["p.yaml", "u.yaml"], drop_keys={"neg_sampler": 0, "top_m": 0}) == [
        "--model=SASRec", "--config_files=p.yaml u.yaml"]
    before = torch.get_num_threads()
    with _torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
