"""Hyper-parameter tuning with RecBole's ``HyperTuning``: an objective that trains with ``neg_sampler``.

``python -m recbole_mdcns.hyper --config_files=run.yaml --params_file=hyper/dns.hyper`` works
like RecBole's ``run_hyper.py``: an exhaustive (or random / bayes) hyperopt search over the
``.hyper`` file's keys, results written to ``--output_file``. From Python, pass
:func:`objective_function` to ``recbole.trainer.HyperTuning`` (or to Ray Tune, which it
reports to when it runs under it).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from logging import getLogger

from recbole.config import Config
from recbole.trainer import HyperTuning
from recbole.utils import init_logger, init_seed

from recbole_mdcns.config import create_config, packaged_yaml
from recbole_mdcns.quick_start import build_model, build_trainer, fit_and_test, load_data


def _under_ray_tune() -> bool:
    """Whether this trial runs inside a Ray Tune session (never imports ray itself)."""
    tune = sys.modules.get("ray.tune")
    return tune is not None and tune.is_session_enabled()


def _refused_trial(error: ValueError, config_dict, config_file_list) -> dict:
    """An invalid combination: the worst score, and the message in place of the results.

    "Worst" follows ``valid_metric_bigger``, which RecBole derives from ``valid_metric``: read
    from a RecBole ``Config`` without our checks, over our base defaults.
    """
    getLogger().error(f"trial {config_dict} refused: {error}")
    try:
        config = Config(config_file_list=[packaged_yaml("base"), *(config_file_list or [])], config_dict=config_dict)
        model, bigger = config["model"], config["valid_metric_bigger"]
    except ValueError:  # RecBole's own checks failed before it read valid_metric: ranking metrics are bigger
        model, bigger = (config_dict or {}).get("model"), True
    message = {"error": str(error)}
    return {
        "model": model,
        "best_valid_score": -math.inf if bigger else math.inf,
        "valid_score_bigger": bigger,
        "best_valid_result": message,
        "test_result": message,
    }


def objective_function(config_dict=None, config_file_list=None, saved=True) -> dict:
    """One trial for ``recbole.trainer.HyperTuning``, as RecBole's ``objective_function``: returns
    ``model``, ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result`` and ``test_result``
    (plus ``train_info`` with a sampler), resets the log handlers, and reports the test result
    to Ray Tune only when it runs under Ray Tune.

    A combination our checks refuse (``top_m > candidate_num``, a pool larger than the
    catalogue, ...) is not trained: it scores the worst possible value and its results hold
    ``{"error": message}``, so the search goes on.
    """
    logger = getLogger()
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
    try:
        config = create_config(None, None, config_file_list, config_dict)
        init_seed(config["seed"], config["reproducibility"])
        init_logger(config)
        logging.basicConfig(level=logging.ERROR)
        _, train_data, valid_data, test_data = load_data(config)
    except ValueError as error:
        return _refused_trial(error, config_dict, config_file_list)
    trainer = build_trainer(config, build_model(config, train_data))
    result = fit_and_test(trainer, train_data, valid_data, test_data, saved=saved, verbose=False)
    if _under_ray_tune():
        sys.modules["ray.tune"].report(**result["test_result"])
    return {"model": config["model"], **result}


def main(argv: list[str] | None = None) -> HyperTuning:
    """``python -m recbole_mdcns.hyper``: RecBole's ``run_hyper.py`` with :func:`objective_function`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config_files", type=str, default=None, help="fixed config files (space-separated)")
    parser.add_argument("--params_file", type=str, required=True, help="the .hyper file: one 'key type values' a line")
    parser.add_argument("--output_file", type=str, default="hyper_example.result", help="where results are written")
    parser.add_argument("--tool", type=str, default="Hyperopt", choices=["Hyperopt"],
                        help="Hyperopt; for Ray Tune, pass objective_function to ray.tune yourself")
    parser.add_argument("--algo", type=str, default="exhaustive", choices=["exhaustive", "random", "bayes"])
    parser.add_argument("--max_evals", type=int, default=100, help="trials for random / bayes")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without a gain")
    args, _ = parser.parse_known_args(argv)
    files = args.config_files.strip().split(" ") if args.config_files else None
    tuning = HyperTuning(objective_function, algo=args.algo, max_evals=args.max_evals, early_stop=args.early_stop,
                         params_file=args.params_file, fixed_config_file_list=files)
    tuning.run()
    tuning.export_result(output_file=args.output_file)
    print("best params: ", tuning.best_params)
    print("best result: ")
    print(tuning.params2result[tuning.params2str(tuning.best_params)])
    return tuning


if __name__ == "__main__":
    main()
