"""``run_recbole`` as in ``recbole.quick_start``, with ``neg_sampler`` switching the sampler."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from logging import getLogger
from time import time
from typing import Iterator

import torch
import yaml
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from recbole.data import create_dataset, data_preparation
from recbole.data.transform import construct_transform
from recbole.utils import get_environment, get_flops, get_trainer, init_logger, init_seed, set_color

from recbole_mdcns.benchmark_files import check_benchmark_ids, warn_unseen_users
from recbole_mdcns.config import check_catalogue, create_config, preset_yaml
from recbole_mdcns.data import candidate_train_loader
from recbole_mdcns.history_mask import SCORES, history_score, mask_history, with_history_score
from recbole_mdcns.recbole_keys import user_settings
from recbole_mdcns.models import get_model
from recbole_mdcns.quiet import dataset_output
from recbole_mdcns.registry import get_sampler
from recbole_mdcns.summary import summary_table
from recbole_mdcns.trainer import NegSamplingTrainer


def _init_logger(config) -> None:
    """RecBole's logger on rank 0; other ranks only print warnings and write no log file."""
    if rank_zero_only.rank == 0:
        init_logger(config)
    else:
        logging.basicConfig(level=logging.WARNING)
        config["show_progress"] = False


def load_data(config) -> tuple:
    """RecBole's dataset and its train / valid / test loaders; with a sampler the train loader
    also draws candidate pools, after checking that the pool fits in the catalogue; with
    ``eval_mask_history: true`` the valid / test loaders mask each row's prefix
    (:mod:`recbole_mdcns.history_mask`)."""
    with dataset_output():  # pandas' FutureWarnings about RecBole's dataset code, nothing else
        dataset = create_dataset(config)
        getLogger().info(dataset)
        check_catalogue(config, dataset)
        if config["neg_sampler"] != "recbole" or config["eval_mask_history"]:
            check_benchmark_ids(dataset)
        train_data, valid_data, test_data = data_preparation(config, dataset)
    warn_unseen_users(config, train_data._dataset, valid_data._dataset, test_data._dataset)
    valid_data, test_data = mask_history(config, train_data, valid_data, test_data)
    if config["neg_sampler"] != "recbole":
        train_data = candidate_train_loader(config, train_data)
    return dataset, train_data, valid_data, test_data


def build_model(config, train_data):
    """The RecBole model ``config["model"]`` on the training set, seeded as RecBole seeds it."""
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    getLogger().info(model)
    return model


def build_trainer(config, model):
    """:class:`NegSamplingTrainer` with a sampler, else RecBole's own trainer for the model."""
    if config["neg_sampler"] != "recbole":
        return NegSamplingTrainer(config, model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])
    if history_score(config) != SCORES["-inf"]:  # eval_history_score: 0 -- RecBole's trainer masks with -inf
        trainer = with_history_score(trainer)
    return trainer(config, model)


def fit_and_test(trainer, train_data, valid_data, test_data, saved: bool = True, verbose: bool = True) -> dict:
    """Train, then test the best model: RecBole's four result keys, plus ``train_info`` with a sampler."""
    config = trainer.config
    show_progress = config["show_progress"]
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=show_progress)
    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }
    if isinstance(trainer, NegSamplingTrainer):  # an extra key; RecBole's four are unchanged
        result["train_info"] = trainer.train_info(train_data)
    return result


def run_recbole(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, queue=None) -> dict:
    """Train and test ``model`` on ``dataset``; same arguments and result as RecBole's ``run_recbole``.

    With a sampler the result also has ``train_info``: epochs run, best epoch, seconds per
    epoch, seconds spent drawing candidate pools, the per-epoch negative-diversity records,
    and for MDCNS the peer's and the self+peer ensemble's validation results per epoch.

    ``config_dict`` / YAML / ``--neg_sampler=NAME`` picks the sampler; without it,
    or with ``neg_sampler: recbole``, RecBole's own trainer runs untouched.
    """
    config = create_config(model, dataset, config_file_list, config_dict)
    with _torch_threads(config["torch_threads"]):
        return _run(config, saved, queue)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the run (``None``: torch's setting), restored after it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(config, saved: bool, queue) -> dict:
    init_seed(config["seed"], config["reproducibility"])
    _init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    dataset, train_data, valid_data, test_data = load_data(config)
    model = build_model(config, train_data)
    flops = get_flops(model, dataset, config["device"], logger, construct_transform(config))
    logger.info(set_color("FLOPs", "blue") + f": {flops}")
    trainer = build_trainer(config, model)
    result = fit_and_test(trainer, train_data, valid_data, test_data, saved=saved)

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {result['best_valid_result']}")
    logger.info(set_color("test result", "yellow") + f": {result['test_result']}")
    if queue is not None and rank_zero_only.rank == 0:
        queue.put(result)
    return result


# flags of ``python -m recbole_mdcns`` that RecBole's Config, which reads sys.argv itself, cannot parse
_VALUE_FLAGS = ("--model", "-m", "--dataset", "-d", "--config_files", "--preset")


def _recbole_argv(argv: list[str], files: list[str], drop_keys=()) -> list[str]:
    """``argv`` as RecBole's ``Config`` (and a DDP child process, which re-runs it) should see it: this command's
    own flags out (``--preset NAME`` resolved into ``--config_files=...``, ``--compare``), ``--key=value`` flags of
    ``drop_keys`` out, everything else kept (RecBole still warns about arguments it cannot use)."""
    kept, tokens = [], iter(argv)
    for token in tokens:
        name = token.split("=", 1)[0]
        if token in _VALUE_FLAGS:
            next(tokens, None)
        elif name in ("--preset", "--config_files", "--compare") or name.lstrip("-") in drop_keys:
            continue
        else:
            kept.append(token)
    return kept + ([f"--config_files={' '.join(files)}"] if files else [])


@contextlib.contextmanager
def _sys_argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        yield
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> dict:
    """``python -m recbole_mdcns``: RecBole's ``run_recbole.py`` flags plus ``--neg_sampler=NAME``,
    ``--preset NAME`` (a packaged configuration, read before ``--config_files``, so those and ``--key=value``
    flags override it) and ``--compare`` (then the same settings with ``neg_sampler: uniform``).
    Ends with a summary table; returns the (first) run's result."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--model", "-m", type=str, default="BPR", help="name of models")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="name of datasets")
    parser.add_argument("--config_files", type=str, default=None, help="config files (space-separated)")
    parser.add_argument("--preset", type=str, default=None,
                        help="a packaged configuration, e.g. quickstart, read before --config_files")
    parser.add_argument("--compare", action="store_true",
                        help="afterwards run the same settings with neg_sampler=uniform, and compare")
    argv = sys.argv[1:] if argv is None else argv
    args, _ = parser.parse_known_args(argv)
    files = [preset_yaml(args.preset)] if args.preset else []  # ValueError naming the presets
    files += args.config_files.strip().split(" ") if args.config_files else []
    runs = []
    with _sys_argv(_recbole_argv(argv, files)):
        if args.compare:
            _check_single_process(create_config(args.model, args.dataset, files))
        started = time()
        result = run_recbole(model=args.model, dataset=args.dataset, config_file_list=files or None)
        runs.append((user_settings(files).get("neg_sampler") or "recbole", result, time() - started))
    if args.compare:
        uniform = _uniform_settings()
        with _sys_argv(_recbole_argv(argv, files, drop_keys=uniform)):
            started = time()
            compared = run_recbole(model=args.model, dataset=args.dataset, config_file_list=files or None,
                                   config_dict=uniform)
            runs.append(("uniform", compared, time() - started))
    getLogger().info(set_color("summary", "yellow") + f" ({args.model} on {args.dataset}; test: the best validation "
                     "epoch's model; valid: at that epoch):\n" + summary_table(runs, args.model))
    return result


def _uniform_settings() -> dict:
    """``neg_sampler: uniform`` with its own defaults, which override a preset's ``candidate_num`` / ``top_m``."""
    with open(get_sampler("uniform").config_file) as f:
        return {"neg_sampler": "uniform", **(yaml.safe_load(f) or {})}


def _check_single_process(config) -> None:
    if str(config["devices"]) != "1" or config["num_nodes"] != 1:
        raise ValueError(f"--compare runs one process after another: it needs devices: 1 and num_nodes: 1, got "
                         f"devices: {config['devices']}, num_nodes: {config['num_nodes']}")
