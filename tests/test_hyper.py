"""Hyper-parameter tuning: RecBole's ``HyperTuning`` with ``recbole_mdcns.hyper.objective_function``."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import yaml
from recbole.trainer import HyperTuning

from recbole_mdcns import hyper
from recbole_mdcns.config import create_config, packaged_yaml

from conftest import tiny_config

HYPER_DIR = Path(__file__).resolve().parent.parent / "hyper"
needs_hyperopt = pytest.mark.skipif(importlib.util.find_spec("hyperopt") is None,
                                    reason="hyperopt is not installed (pip install '.[hyper]')")


@needs_hyperopt
def test_exhaustive_search_records_an_invalid_trial_and_goes_on(tiny_data, in_tmp, capsys):
    """Two trials through ``python -m recbole_mdcns.hyper``'s ``main``: RecBole's exhaustive
    search (hyperopt >= 0.2.7 needs compat's fix), ``candidate_num`` as hyperopt's float 20.0,
    and ``top_m: 30 > candidate_num`` refused with the worst score while the search goes on."""
    fixed = in_tmp / "fixed.yaml"
    fixed.write_text(yaml.safe_dump({**tiny_config(tiny_data, in_tmp, neg_sampler="dns"),
                                     "model": "SASRec", "dataset": "tiny"}))
    params = in_tmp / "dns.hyper"
    params.write_text("candidate_num choice [20.0]\ntop_m choice [2,30]\n")
    output = in_tmp / "dns.result"

    tuning = hyper.main([f"--config_files={fixed}", f"--params_file={params}", f"--output_file={output}"])

    results = {params: tuning.params2result[params] for params in tuning.params_list}
    assert set(results) == {"candidate_num:20.0, top_m:2", "candidate_num:20.0, top_m:30"}
    valid, invalid = results["candidate_num:20.0, top_m:2"], results["candidate_num:20.0, top_m:30"]
    assert 0 < valid["best_valid_score"] <= 1 and valid["model"] == "SASRec"
    assert 0 <= valid["test_result"]["ndcg@10"] <= 1 and valid["train_info"]["epochs"] == 1
    assert invalid["best_valid_score"] == -math.inf and invalid["valid_score_bigger"] is True
    assert "top_m must be an integer in [1, 20]" in invalid["best_valid_result"]["error"]
    assert tuning.best_params == {"candidate_num": 20.0, "top_m": 2}
    written = output.read_text()
    assert "top_m:30" in written and "error : top_m must be an integer in [1, 20], got 30" in written
    assert "best params:  {'candidate_num': 20.0, 'top_m': 2}" in capsys.readouterr().out


def test_objective_reports_to_ray_only_under_ray_tune():
    assert not hyper._under_ray_tune()  # a plain process: nothing to report to


@needs_hyperopt
@pytest.mark.parametrize("name", ["dns", "mdcns"])
def test_example_hyper_files_search_the_samplers_keys(name):
    """The shipped ``hyper/*.hyper`` parse with RecBole's reader and search keys the sampler has."""
    space = HyperTuning._build_space_from_file(str(HYPER_DIR / f"{name}.hyper"))
    with open(packaged_yaml(name)) as f:
        defaults = yaml.safe_load(f)
    with open(packaged_yaml("base")) as f:
        defaults.update(yaml.safe_load(f))
    assert space and set(space) <= set(defaults)


def test_integer_keys_take_whole_number_floats(tiny_data, in_tmp):
    """hyperopt's ``quniform`` gives floats: ``100.0`` is accepted (stored as ``100``), ``2.5`` is not."""
    config = create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns",
                                                                      candidate_num=20.0, top_m=3.0))
    assert (config["candidate_num"], config["top_m"]) == (20, 3) and isinstance(config["top_m"], int)
    with pytest.raises(ValueError, match=r"top_m must be an integer in \[1, 20\], got 2.5"):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns",
                                                                 candidate_num=20, top_m=2.5))
