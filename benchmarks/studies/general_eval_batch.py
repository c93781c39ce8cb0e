"""Question: How long does RecBole's full-sort validation of a general model take as a function of the users it
scores per batch (``eval_batch_size // item_num``: for general models RecBole's ``eval_batch_size`` counts user x
item scores, not users), and are the metrics the same?
Result: ``benchmarks/results/general_eval_batch-<dataset>-cpu.json``;
findings: benchmarks/studies/general_eval_batch.md.

One process, one thread: the dataset split as ``grids/general_beauty.yaml`` splits it (RecBole's random 80/10/10), a
model at the grids' size (64-d; LightGCN 3 layers; random weights: the metrics' equality does not depend on
training), one validation loader per batch size, evaluated in turn, ``--rounds`` times after one warm-up each;
metrics to 8 decimals (``metric_decimal_place: 8``) must be equal.

    python -m benchmarks.studies.general_eval_batch --dataset amazon-beauty --data-path ../shared/datasets
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT, describe_device, git_state, to_jsonable


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="amazon-beauty")
    parser.add_argument("--data-path", default=str(REPO_ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--models", nargs="+", default=["BPR", "LightGCN"])
    parser.add_argument("--users", nargs="+", type=int, default=[1, 4, 16, 64, 256, 1024],
                        help="users scored per batch: eval_batch_size = users x item_num")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import recbole_mdcns  # noqa: F401  (compat shims)
    from recbole.utils import init_seed
    from recbole_mdcns.config import create_config
    from recbole_mdcns.quick_start import build_model, build_trainer, load_data

    saved = tempfile.mkdtemp()

    def load(model_name: str, eval_batch_size: int) -> tuple:
        settings = {"data_path": args.data_path, "embedding_size": 64, "n_layers": 3,
                    "eval_batch_size": eval_batch_size, "load_col": {"inter": ["user_id", "item_id"]},
                    "metrics": ["Recall", "NDCG"], "topk": [20],
                    "valid_metric": "NDCG@20", "metric_decimal_place": 8, "neg_sampler": "uniform",
                    "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "mode": "full", "group_by": "user"},
                    "show_progress": False, "state": "ERROR", "seed": 2020, "checkpoint_dir": saved}
        config = create_config(model_name, args.dataset, config_dict=settings)
        init_seed(config["seed"], config["reproducibility"])  # the same split for every loader
        return (config, *load_data(config))

    item_num = load(args.models[0], 1)[1].item_num
    results = []
    for model_name in args.models:
        loaders, trainer = {}, None
        for users in args.users:
            config, _, train, valid, _ = load(model_name, users * item_num)
            loaders[users] = valid
            trainer = trainer or build_trainer(config, build_model(config, train))
        seconds = {users: [] for users in loaders}
        metrics = {users: dict(trainer.evaluate(valid, load_best_model=False)) for users, valid in loaders.items()}
        for _ in range(args.rounds):
            for users, valid in loaders.items():
                start = time.perf_counter()
                metrics[users] = dict(trainer.evaluate(valid, load_best_model=False))
                seconds[users].append(time.perf_counter() - start)
        reference = metrics[args.users[0]]
        for users in loaders:
            median = statistics.median(seconds[users])
            results.append({"model": model_name, "users_per_batch": users, "eval_batch_size": users * item_num,
                            "batches": len(loaders[users]), "seconds": median,
                            "metrics_identical": metrics[users] == reference, "metrics": metrics[users]})
            print(f"{model_name} {users:>5} users a batch ({len(loaders[users])} batches): {median:.2f} s, "
                  f"metrics identical: {metrics[users] == reference}")
    out = Path(args.out or REPO_ROOT / "benchmarks" / "results" / f"general_eval_batch-{args.dataset}-cpu.json")
    given = sys.argv[1:] if argv is None else argv
    record = {"command": "python -m benchmarks.studies.general_eval_batch " + " ".join(given),
              "rounds": args.rounds, "results": results, "device": describe_device("cpu"), "git": git_state()}
    out.write_text(json.dumps(to_jsonable(record), indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
