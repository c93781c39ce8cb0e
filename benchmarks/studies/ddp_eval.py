"""Question: Does sharding full-sort evaluation across DDP processes save time, with the same metrics?
Result: --json (committed: benchmarks/results/ddp_eval.json); findings: benchmarks/studies/ddp_eval.md.

Full-sort validation of SASRec on ml-100k: one process with 2 threads against 2 DDP processes
with 1 thread each (:meth:`recbole_mdcns.trainer.NegSamplingTrainer.evaluate` sharding RecBole's
evaluation batches), interleaved round by round on the same two processes:

    python -m benchmarks.studies.ddp_eval [--rounds 5] [--eval-batch-size 256]

Each round: process 0 alone runs RecBole's unsharded ``Trainer.evaluate`` with 2 threads, and
with 1 thread for reference (process 1 waits in a gloo barrier, which takes no CPU), then both
run the sharded evaluation with 1 thread each. Reported: the slower process's wall time and the
busier one's CPU time (all its threads), which a shared machine's other load does not inflate as
it does wall time. The model is SASRec at RecBole's defaults, freshly seeded (evaluation costs the
same trained or not); all three ways must give the same metrics. Figures and command:
``benchmarks/studies/ddp_eval.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
from time import perf_counter, process_time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import command_line, describe_device, quiet_warnings, versions

WORLD = 2
LABELS = {"1x2": "1 process x 2 threads ", "2x1": "2 processes x 1 thread", "1x1": "(1 process x 1 thread)"}


def _build(args):
    """Config, valid loader and trainer of a seeded SASRec (the same in every process)."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_mdcns.config import create_config
    from recbole_mdcns.models import get_model
    from recbole_mdcns.trainer import NegSamplingTrainer

    settings = {"neg_sampler": "uniform", "eval_batch_size": args.eval_batch_size, "state": "WARNING",
                "show_progress": False, "accelerator": "cpu", "checkpoint_dir": os.path.join(args.workdir, "saved"),
                "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}
    if args.data_path:
        settings["data_path"] = args.data_path
    config = create_config("SASRec", args.dataset, config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    train, valid, _ = data_preparation(config, create_dataset(config))
    trainer = NegSamplingTrainer(config, get_model("SASRec")(config, train._dataset))
    trainer.eval_collector.data_collect(train)
    return valid, trainer


def _timed(fn) -> tuple[list[float], dict]:
    """``[wall seconds, CPU seconds of this process (all its threads)]`` of ``fn()``, and its result."""
    started, cpu = perf_counter(), process_time()
    result = fn()
    return [perf_counter() - started, process_time() - cpu], dict(result)


def _rank_main(rank: int, port: int, args, out_path: str) -> None:
    from recbole.trainer import Trainer

    quiet_warnings()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    valid, trainer = _build(args)
    single, two, results = {"1x2": [], "1x1": []}, [], {}
    for _ in range(args.rounds + 1):  # round 0 warms up
        dist.barrier()
        if rank == 0:  # RecBole's own evaluate: every batch, no process group involved
            for label, threads in (("1x2", WORLD), ("1x1", 1)):
                torch.set_num_threads(threads)
                seconds, results[label] = _timed(lambda: Trainer.evaluate(trainer, valid, load_best_model=False))
                single[label].append(seconds)
        torch.set_num_threads(1)
        dist.barrier()
        seconds, results["2x1"] = _timed(lambda: trainer.evaluate(valid, load_best_model=False))
        slowest = torch.tensor(seconds)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        two.append(slowest.tolist())
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({**{way: times[1:] for way, times in single.items()}, "2x1": two[1:],
                       "users": len(valid._dataset), "batches": len(valid), "results": results}, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-path", default=None, help="folder holding <dataset>/ (ml-100k ships with RecBole)")
    parser.add_argument("--eval-batch-size", type=int, default=256,
                        help="users per evaluation batch; sharded when there are at least as many batches as processes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the record here")
    args = parser.parse_args(argv)
    args.data_path, args.json = (os.path.abspath(p) if p else None for p in (args.data_path, args.json))  # chdir below
    command = command_line(argv, "benchmarks.studies.ddp_eval")
    print(f"$ {command}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_ddp_eval-") as tmp:
        args.workdir = tmp
        os.chdir(tmp)  # RecBole writes log/ and log_tensorboard/ into the working directory
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = os.path.join(tmp, "times.json")
        mp.spawn(_rank_main, args=(port, args, out), nprocs=WORLD)
        with open(out) as f:
            measured = json.load(f)
    medians = {way: [statistics.median(t[i] for t in measured[way]) for i in (0, 1)] for way in LABELS}
    same = measured["results"]["1x2"] == measured["results"]["2x1"] == measured["results"]["1x1"]
    record = {"command": command, "device": describe_device("cpu"), "versions": versions(), **measured,
              "medians_wall_cpu_s": medians, "speedup": medians["1x2"][0] / medians["2x1"][0], "same_metrics": same}
    print(f"{args.dataset} full-sort validation, SASRec, {measured['users']} users in {measured['batches']} batches "
          f"of {args.eval_batch_size}, {args.rounds} interleaved rounds (wall s / CPU s of the busiest process):")
    for way, label in LABELS.items():
        walls = [round(t[0], 3) for t in measured[way]]
        print(f"  {label}: median {medians[way][0]:.3f} s wall, {medians[way][1]:.3f} s CPU  (walls {walls})")
    print(f"  1x2 / 2x1 wall = {record['speedup']:.2f}; same metrics: {same} {measured['results']['2x1']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
