"""Question: What share of a training epoch is DivNS's epoch-end k-DPP refresh?
Result: printed; findings: benchmarks/studies/divns_cap.md.

Time DivNS's epoch-end refresh against one training epoch (SASRec, ml-100k by default).

The refresh (negative statistics, per-user kernels over the runner-up caches, batched
exact k-DPP sampling, clearing the caches) must stay <= 10% of a training epoch.
Runs two epochs (epoch 0 is plain DNS, epoch 1 trains on synthetic negatives, so both
fill the caches the same way) without validation, and prints one line per epoch and
the ratio of the last epoch. Run from the repo root:

    python -m benchmarks.studies.divns_refresh [--max_len 20] [--epochs 2] [--device cpu] [--threads 0]
    python -m benchmarks.studies.divns_refresh --max_len 50 --batch 1024 --train_positions all --cache_bound rows \
        --cache_size 128 --gamma median --threads 1
"""
import argparse
import logging
import os
import shutil
import tempfile
from time import perf_counter

import recbole
import torch

import recbole_mdcns  # noqa: F401  (applies the compat shims)
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, init_seed

from recbole_mdcns.config import create_config
from recbole_mdcns.data import candidate_train_loader
from recbole_mdcns.trainer import NegSamplingTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=os.path.join(os.path.dirname(recbole.__file__), "dataset_example"),
                        help="folder holding <dataset>/ (default: the datasets shipped with RecBole)")
    parser.add_argument("--max_len", type=int, default=20, help="MAX_ITEM_LIST_LENGTH")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2048, help="train_batch_size")
    parser.add_argument("--device", default="cpu", help="cpu | gpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--kernel", default="rbf")
    parser.add_argument("--mode", default="exact")
    parser.add_argument("--cache_ratio", type=int, default=2)
    parser.add_argument("--cache_size", type=int, default=64)
    parser.add_argument("--cache_bound", default="fixed", help="divns_cache_bound: fixed | rows")
    parser.add_argument("--gamma", default="1.0", help="divns_gamma: a number or median")
    parser.add_argument("--train_positions", default="last", help="last | all")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.data_path = os.path.abspath(args.data_path)  # before moving into the scratch folder
    workdir = tempfile.mkdtemp(prefix="divns_refresh_")
    cwd = os.getcwd()
    os.chdir(workdir)  # RecBole writes log/ and log_tensorboard/ into the cwd
    try:
        run(args, workdir)
    finally:
        logging.shutdown()
        os.chdir(cwd)
        shutil.rmtree(workdir, ignore_errors=True)


def run(args, workdir: str) -> None:
    config_dict = {
        "neg_sampler": "divns",
        "data_path": os.path.abspath(args.data_path),
        "checkpoint_dir": os.path.join(workdir, "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "train_batch_size": args.batch,
        "epochs": args.epochs,
        "eval_step": args.epochs + 1,  # no validation inside the timed epochs
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "accelerator": args.device,
        "use_gpu": args.device != "cpu",
        "show_progress": False,
        "state": "WARNING",
        "divns_kernel": args.kernel,
        "divns_dpp_mode": args.mode,
        "divns_cache_ratio": args.cache_ratio,
        "divns_cache_size": args.cache_size,
        "divns_cache_bound": args.cache_bound,
        "divns_gamma": args.gamma if args.gamma == "median" else float(args.gamma),
        "train_positions": args.train_positions,
    }
    config = create_config("SASRec", args.dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    train_data = candidate_train_loader(config, train_data)
    model = get_model("SASRec")(config, train_data._dataset).to(config["device"])
    trainer = NegSamplingTrainer(config, model)
    started = perf_counter()
    trainer.fit(train_data, None, verbose=False, saved=False)
    total = perf_counter() - started
    trainer.tensorboard.close()
    module = trainer.lightning_trainer.lightning_module
    train = trainer.epoch_seconds  # the trainer's clock stops before the module's epoch-end refresh
    for rec in module.negative_history:
        print(f"epoch {rec['epoch']}: train {train[rec['epoch']]:.2f}s, refresh {rec['refresh_seconds']:.3f}s "
              f"({rec['diverse_users']} users, mean k {rec['diverse_mean_size']:.1f}, "
              f"cache entries {rec['cache_entries']}), negatives: mean pairwise cos dist "
              f"{rec['mean_pairwise_cosine_distance']:.4f}, catalogue {rec['catalogue_fraction']:.1%}")
    last = module.negative_history[-1]
    device = torch.cuda.get_device_name() if args.device != "cpu" else f"cpu, {torch.get_num_threads()} threads"
    print(f"divns refresh / epoch on {args.dataset} (SASRec, L={args.max_len}, batch {args.batch}, "
          f"{args.train_positions} positions, n={config['candidate_num']}, r={args.cache_ratio}, cache {args.cache_size} "
          f"({args.cache_bound}), {args.kernel} gamma {args.gamma}, {args.mode}; {len(train_data.dataset)} rows, "
          f"{dataset.user_num - 1} users; {device}): "
          f"epoch {last['epoch']} train {train[last['epoch']]:.2f}s, refresh {last['refresh_seconds']:.3f}s "
          f"-> {last['refresh_seconds'] / train[last['epoch']]:.1%} (target <= 10%); fit {total:.1f}s")


if __name__ == "__main__":
    main()
