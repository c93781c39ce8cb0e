"""Question: How much of a CPU training epoch goes to the kernel zeroing fresh pages for glibc's large allocations,
and how much does keeping them in the heap (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) save?
Result: ``benchmarks/results/cpu_malloc-<dataset>-cpu.json``; findings: benchmarks/studies/cpu_malloc.md.

glibc serves an allocation above its mmap threshold (128 KiB, raised dynamically to at most 32 MiB) with a fresh
``mmap`` and unmaps it when freed, so every training step of a model whose activations exceed it page-faults its
buffers in again (SASRec 64-d, length 50, batch 1024: the feed-forward activations are 52 MB). With both variables
set (:data:`benchmarks.run.MALLOC_ENV`) freed blocks stay in the heap and are reused. The variables are read when a
process starts, so each measurement is its own process: ``--rounds`` rounds, each a process without and a process
with them, in turn; each trains SASRec (the converged grids' size) under ``dns`` (N 100, M 10) for ``--epochs``
epochs without validation and reports its epoch seconds and its own user / system CPU seconds, minor page faults
and peak RSS. Medians over rounds.

    python -m benchmarks.studies.cpu_malloc --dataset lastfm --data-path ../shared/datasets --positions all last
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO_ROOT, describe_device, git_state, to_jsonable
from benchmarks.run import MALLOC_ENV, _child_env

SETTINGS = {"MAX_ITEM_LIST_LENGTH": 50, "train_batch_size": 1024, "hidden_size": 64, "embedding_size": 64,
            "inner_size": 256, "n_layers": 2, "n_heads": 2, "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5,
            "learning_rate": 0.001, "neg_loss": "bce", "neg_sampler": "dns", "candidate_num": 100, "top_m": 10,
            "show_progress": False, "state": "WARNING", "seed": 2020}


def child(dataset: str, data_path: str, positions: str, epochs: int) -> dict:
    """One process's measurement: ``epochs`` training epochs, no validation."""
    import torch

    torch.set_num_threads(1)
    import recbole_mdcns  # noqa: F401  (compat shims)
    from recbole.utils import init_seed
    from recbole_mdcns.config import create_config
    from recbole_mdcns.quick_start import build_model, build_trainer, load_data

    config = create_config("SASRec", dataset, config_dict={
        **SETTINGS, "data_path": data_path, "train_positions": positions, "epochs": epochs,
        "checkpoint_dir": tempfile.mkdtemp()})
    init_seed(config["seed"], config["reproducibility"])
    _, train, _, _ = load_data(config)
    trainer = build_trainer(config, build_model(config, train))
    before = resource.getrusage(resource.RUSAGE_SELF)
    trainer.fit(train, None, saved=False, show_progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"epoch_seconds": [trainer.epoch_seconds[e] for e in sorted(trainer.epoch_seconds)],
            "user_seconds": after.ru_utime - before.ru_utime, "system_seconds": after.ru_stime - before.ru_stime,
            "minor_faults": after.ru_minflt - before.ru_minflt, "peak_rss_mib": after.ru_maxrss / 1024}


def measure(args, positions: str, heap: bool) -> dict:
    env = {k: v for k, v in _child_env().items() if k not in MALLOC_ENV}  # the harness's cell environment, ...
    env.update(MALLOC_ENV if heap else {})  # ... with the two variables set or unset, whatever this one holds
    argv = [sys.executable, "-m", "benchmarks.studies.cpu_malloc", "--child", "--dataset", args.dataset,
            "--data-path", args.data_path, "--positions", positions, "--epochs", str(args.epochs)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="lastfm")
    parser.add_argument("--data-path", default=str(REPO_ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--positions", nargs="+", default=["all", "last"], help="train_positions to measure")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.dataset, args.data_path, args.positions[0], args.epochs)))
        return {}
    results = []
    for positions in args.positions:
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for heap in (False, True):
                runs[heap].append(measure(args, positions, heap))
        summary = {}
        for heap, label in ((False, "mmap"), (True, "heap")):
            summary[label] = {key: statistics.median(run[key] for run in runs[heap])
                              for key in ("user_seconds", "system_seconds", "minor_faults", "peak_rss_mib")}
            summary[label]["epoch_seconds"] = statistics.median(s for run in runs[heap] for s in run["epoch_seconds"])
        cpu = {label: summary[label]["user_seconds"] + summary[label]["system_seconds"] for label in summary}
        results.append({"positions": positions, "runs": {"mmap": runs[False], "heap": runs[True]},
                        "median": summary, "cpu_ratio_heap_over_mmap": cpu["heap"] / cpu["mmap"],
                        "epoch_ratio_heap_over_mmap":
                            summary["heap"]["epoch_seconds"] / summary["mmap"]["epoch_seconds"]})
        print(f"train_positions: {positions}: epoch {summary['mmap']['epoch_seconds']:.1f} s -> "
              f"{summary['heap']['epoch_seconds']:.1f} s; system CPU {summary['mmap']['system_seconds']:.1f} s -> "
              f"{summary['heap']['system_seconds']:.1f} s; CPU time x{cpu['heap'] / cpu['mmap']:.2f}; peak RSS "
              f"{summary['mmap']['peak_rss_mib']:.0f} -> {summary['heap']['peak_rss_mib']:.0f} MiB", flush=True)
    out = Path(args.out or REPO_ROOT / "benchmarks" / "results" / f"cpu_malloc-{args.dataset}-cpu.json")
    given = sys.argv[1:] if argv is None else argv
    record = {"command": "python -m benchmarks.studies.cpu_malloc " + " ".join(given), "epochs": args.epochs,
              "rounds": args.rounds, "malloc_env": MALLOC_ENV, "results": results, "device": describe_device("cpu"),
              "git": git_state()}
    out.write_text(json.dumps(to_jsonable(record), indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
