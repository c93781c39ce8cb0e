"""Question: How much evaluation time does ``eval_shared_prefixes`` save on the MDCNS authors' LastFM split (every
prefix of a held-out user evaluated), and are the metrics the same?
Result: ``benchmarks/results/eval_prefixes-lastfm-cpu.json``; findings: benchmarks/studies/eval_prefixes.md.

One process, one thread: the split written by ``python -m recbole_mdcns.user_split`` (seed 47367, 0.8/0.1/0.1,
prefixes), a model at the converged grids' size (64-d, 2 layers, random weights: the scores' equality does not
depend on training), validation and test each evaluated with the option on and off, interleaved, ``--rounds`` times
(the first evaluation of each setting is a warm-up, not timed). Metrics must be equal to the last digit.

    python -m benchmarks.studies.eval_prefixes --inter ../shared/datasets/lastfm/lastfm.inter [--model SASRec]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import REPO_ROOT, describe_device, git_state, to_jsonable


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inter", required=True)
    parser.add_argument("--models", nargs="+", default=["SASRec", "GRU4Rec"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "eval_prefixes-lastfm-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import recbole_mdcns  # noqa: F401  (compat shims)
    from recbole_mdcns.config import create_config
    from recbole_mdcns.quick_start import build_model, build_trainer, load_data
    from recbole_mdcns.user_split import main as user_split

    out_dir = Path(tempfile.mkdtemp())
    user_split(["--inter", args.inter, "--out", str(out_dir), "--name", "lastfm-mdcns", "--seed", "47367",
                "--ratios", "0.8", "0.1", "0.1", "--heldout", "prefixes", "--max-len", "50"])
    split = yaml.safe_load((out_dir / "lastfm-mdcns" / "lastfm-mdcns.yaml").read_text())
    results = []
    for model_name in args.models:
        trainers = {}
        for shared in (True, False):
            settings = {**split, "hidden_size": 64, "n_layers": 2, "n_heads": 2, "inner_size": 256, "num_layers": 2,
                        "topk": [5, 10, 20], "metrics": ["Recall", "NDCG"], "valid_metric": "NDCG@20",
                        "eval_batch_size": 4096, "show_progress": False, "state": "WARNING", "neg_sampler": "uniform",
                        "eval_shared_prefixes": shared, "seed": 2020, "checkpoint_dir": str(out_dir / "saved")}
            config = create_config(model_name, "lastfm-mdcns", config_dict=settings)
            _, train, valid, test = load_data(config)
            trainer = build_trainer(config, build_model(config, train))
            trainer.evaluate(valid, load_best_model=False)  # warm-up
            trainers[shared] = (trainer, valid, test)
        seconds = {(shared, split_name): [] for shared in (True, False) for split_name in ("valid", "test")}
        metrics = {}
        for _ in range(args.rounds):
            for shared, (trainer, valid, test) in trainers.items():
                for split_name, data in (("valid", valid), ("test", test)):
                    start = time.perf_counter()
                    metrics[(shared, split_name)] = dict(trainer.evaluate(data, load_best_model=False))
                    seconds[(shared, split_name)].append(time.perf_counter() - start)
        for split_name, data in (("valid", trainers[True][1]), ("test", trainers[True][2])):
            on, off = (statistics.median(seconds[(s, split_name)]) for s in (True, False))
            same = metrics[(True, split_name)] == metrics[(False, split_name)]
            results.append({"model": model_name, "split": split_name, "rows": len(data.dataset),
                            "seconds_shared": on, "seconds_row_by_row": off, "speedup": off / on,
                            "metrics_identical": same, "metrics": metrics[(True, split_name)]})
            print(f"{model_name} {split_name} ({len(data.dataset)} rows): {off:.2f} s row by row, {on:.2f} s shared "
                  f"({off / on:.2f}x), metrics identical: {same}")
    record = {"command": "python -m benchmarks.studies.eval_prefixes " + " ".join(argv or []),
              "rounds": args.rounds, "results": results, "device": describe_device("cpu"), "git": git_state()}
    Path(args.out).write_text(json.dumps(to_jsonable(record), indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
