"""Question: Does the pool sampler's memory grow with the interactions on a 300k x 300k catalogue, and what does its hash set cost against the bitmap?
Result: --json (committed: benchmarks/results/large_catalogue.json); findings: benchmarks/studies/large_catalogue.md.

Memory on a catalogue of hundreds of thousands, and the cost of the sparse pool sampler.

Two measurements, run from the repository root::

    python -m benchmarks.studies.large_catalogue                  # both (many minutes on a CPU)
    python -m benchmarks.studies.large_catalogue --skip-pool-draw  # memory only
    python -m benchmarks.studies.large_catalogue --skip-memory     # pool draw only (~1 min)

**Memory.** A synthetic dataset (written once into ``--workdir``, default
``benchmarks/.work/``): ``--users`` users x ``--items`` items, 5-7 distinct items per user
(every item at least once, the rest uniform), timestamps in order, so RecBole's sequential
augmentation makes one row per prefix. SASRec (16-d, 1 layer, ``MAX_ITEM_LIST_LENGTH`` 10)
trains the first ``--batches`` batches of 2048 rows, no evaluation, in a fresh subprocess per
variant:

* ``dns``     -- ``neg_sampler: dns``, ``candidate_num: 100``: RecBole's ``create_dataset`` and
  ``data_preparation``, our ``candidate_train_loader``, the ``DNSModule`` our trainer builds, and
  an optimizer step on its ``training_loss`` per batch;
* ``recbole`` -- RecBole's own pipeline: ``neg_sampler: recbole``, ``loss_type: BPR``,
  ``train_neg_sample_args: {distribution: uniform, sample_num: 1}``, RecBole's own trainer's
  ``_train_epoch`` over the same number of batches.

The figure is the subprocess's peak resident set (``ru_maxrss``); the resident set after each
stage (dataset, loaders, sampler, model) and our sampler's structures in bytes are recorded too.
Target: ``dns`` <= 1.2x ``recbole``.

**Pool draw.** On ml-100k (RecBole's copy), the candidate pool of a 2048-row batch at
N = ``--candidate-num`` drawn by the sampler holding the packed bitmap and by the one forced onto
the hash set (``bitmap_max_bytes=0``), interleaved, median of ``--repeats`` draws per round over
``--rounds`` rounds; both are checked to draw identical pools for the same seed. Target: hash
set <= 2x bitmap.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from time import perf_counter

from benchmarks.common import (
    MIB, REPO_ROOT, command_line, describe_device, git_state, lifetime_peak_rss_mib, quiet_warnings, rss_mib,
    versions,
)
from benchmarks.epoch_time import _FirstBatches

VARIANTS = {
    "dns": {"neg_sampler": "dns", "candidate_num": 100},
    "recbole": {"neg_sampler": "recbole", "loss_type": "BPR",
                "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1, "alpha": 1.0,
                                          "dynamic": False, "candidate_num": 0}},
}
MEMORY_BOUND = 1.2  # dns peak / recbole peak
DRAW_BOUND = 2.0  # hash-set pool draw / bitmap pool draw
CHILD_TAG = "LARGE_CATALOGUE "


def dataset_name(args) -> str:
    return f"synth-u{args.users}-i{args.items}-s{args.seed}"


def write_synthetic(args) -> str:
    """``<workdir>/data/<name>/<name>.inter`` (kept for later runs); returns the data path."""
    import numpy as np

    root = os.path.join(args.workdir, "data")
    name = dataset_name(args)
    path = os.path.join(root, name, f"{name}.inter")
    if os.path.exists(path):
        return root
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(5, 8, args.users)  # 5-7 items, 6 on average
    users = np.repeat(np.arange(args.users), lengths)
    items = rng.integers(0, args.items, len(users))
    items[rng.permutation(len(users))[:args.items]] = np.arange(args.items)  # every item at least once
    keep = np.unique(users * args.items + items, return_index=True)[1]  # distinct items per user
    keep.sort()
    users, items = users[keep], items[keep]
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    times = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        f.writelines(f"{u}\t{i}\t{t}\n" for u, i, t in zip(users.tolist(), items.tolist(), times.tolist()))
    os.replace(path + ".tmp", path)
    return root


def child_config(args, variant: str) -> dict:
    return {
        "data_path": os.path.join(args.workdir, "data"),
        "checkpoint_dir": os.path.join(args.workdir, "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": args.max_seq_len,
        "hidden_size": 16, "embedding_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1,
        "train_batch_size": args.batch_size,
        "epochs": 1, "seed": args.seed, "reproducibility": True,
        "show_progress": False, "state": "WARNING",
        **VARIANTS[variant],
    }


def memory_child(args) -> None:
    """Fresh process: build one variant, train ``--batches`` batches, print the memory record."""
    import torch
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    from recbole_mdcns.config import check_catalogue, create_config
    from recbole_mdcns.data import BITMAP_MAX_BYTES, candidate_train_loader
    from recbole_mdcns.trainer import NegSamplingTrainer

    variant = args.memory_child
    stages = {"imported": rss_mib()}
    config = create_config("SASRec", dataset_name(args), None, child_config(args, variant))
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    interactions = len(dataset.inter_feat)  # data_preparation replaces them by the augmented rows
    stages["dataset"] = rss_mib()
    check_catalogue(config, dataset)
    train_data, _, _ = data_preparation(config, dataset)
    stages["data_preparation"] = rss_mib()
    record = {"variant": variant, "users": dataset.user_num - 1, "items": dataset.item_num - 1,
              "interactions": interactions, "train_rows": len(train_data._dataset)}
    ours = variant != "recbole"
    if ours:
        start = perf_counter()
        train_data = candidate_train_loader(config, train_data)
        sampler = train_data._sampler
        stages["sampler"] = rss_mib()
        record["sampler"] = {
            "structure": type(sampler.used_pairs).__name__, "build_s": perf_counter() - start,
            "used_pairs": len(sampler.used_ids), "used_ids_mib": sampler.used_ids.numel() * 8 / MIB,
            "membership_mib": sampler.used_pairs.nbytes / MIB,
            "bitmap_would_be_mib": sampler.user_num * ((sampler.item_num + 7) // 8) / MIB,
            "bitmap_max_mib": BITMAP_MAX_BYTES / MIB}
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer_class = NegSamplingTrainer if ours else get_trainer(config["MODEL_TYPE"], config["model"])
    trainer = trainer_class(config, model)
    stages["model"] = rss_mib()
    start = perf_counter()
    batches = _FirstBatches(train_data, args.batches)
    model.train()
    if ours:
        module = trainer.build_module()
        losses = []
        for batch in batches:
            loss = module.training_loss(batch.to(config["device"]))
            trainer.optimizer.zero_grad()
            loss.backward()
            trainer.optimizer.step()
            losses.append(loss.item())
        record["loss"] = sum(losses)
    else:
        record["loss"] = float(trainer._train_epoch(batches, 0, show_progress=False))
    record["train_s"] = perf_counter() - start
    stages["trained"] = rss_mib()
    record.update({"stages_rss_mib": stages, "peak_rss_mib": lifetime_peak_rss_mib(),
                   "batches": len(batches), "torch_threads": torch.get_num_threads()})
    print(CHILD_TAG + json.dumps(record), flush=True)


def measure_memory(args) -> dict:
    write_synthetic(args)
    out = {}
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "benchmarks.studies.large_catalogue", "--memory-child", variant,
               "--users", str(args.users), "--items", str(args.items), "--batches", str(args.batches),
               "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
               "--seed", str(args.seed), "--threads", str(args.threads), "--workdir", args.workdir]
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        start = perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=args.workdir, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_TAG)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory run of {variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        out[variant] = {**json.loads(lines[-1][len(CHILD_TAG):]), "wall_s": perf_counter() - start}
        print(f"[memory] {variant}: peak {out[variant]['peak_rss_mib']:.0f} MiB; after each stage "
              + ", ".join(f"{k} {v:.0f}" for k, v in out[variant]["stages_rss_mib"].items())
              + (f"; sampler {out[variant]['sampler']}" if "sampler" in out[variant] else ""), flush=True)
    return out


def measure_pool_draw(args) -> dict:
    """Pool-draw time of the bitmap and the hash set on ml-100k, interleaved (see the module doc)."""
    import torch
    from recbole.data import create_dataset, data_preparation

    from recbole_mdcns.config import create_config
    from recbole_mdcns.data import CandidatePoolSampler

    config = create_config("SASRec", "ml-100k", None, {
        "neg_sampler": "dns", "candidate_num": args.candidate_num, "seed": args.seed, "state": "WARNING",
        "show_progress": False, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "checkpoint_dir": os.path.join(args.workdir, "saved")})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    dataset = train_data._dataset
    samplers = {"bitmap": CandidatePoolSampler(dataset),
                "hash set": CandidatePoolSampler(dataset, bitmap_max_bytes=0)}
    rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:args.batch_size]
    users = dataset.inter_feat[dataset.uid_field][rows]
    pools = {}
    for name, sampler in samplers.items():
        sampler.reseed(args.seed)
        pools[name] = sampler.sample_pool(users, args.candidate_num)
    if not torch.equal(pools["bitmap"], pools["hash set"]):
        raise RuntimeError("the bitmap and the hash set drew different pools for the same seed")
    ms = {name: [] for name in samplers}
    for rnd in range(args.rounds):
        order = list(samplers) if rnd % 2 == 0 else list(samplers)[::-1]
        for name in order:
            times = []
            for _ in range(args.repeats):
                start = perf_counter()
                samplers[name].sample_pool(users, args.candidate_num)
                times.append(perf_counter() - start)
            ms[name].append(statistics.median(times) * 1e3)
    ratios = [h / b for h, b in zip(ms["hash set"], ms["bitmap"])]
    out = {"dataset": "ml-100k", "users": dataset.user_num - 1, "items": dataset.item_num - 1,
           "used_pairs": len(samplers["bitmap"].used_ids), "batch_rows": len(users), "N": args.candidate_num,
           "ms_per_round": ms, "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
           "bytes": {name: s.used_pairs.nbytes for name, s in samplers.items()}, "identical_pools": True}
    print(f"[pool draw] ml-100k, {len(users)} rows x N={args.candidate_num}: "
          + ", ".join(f"{n} {statistics.median(v):.2f} ms" for n, v in ms.items())
          + f"; hash set / bitmap {out['ratio_median']:.2f}x (rounds " + " ".join(f"{r:.2f}" for r in ratios)
          + f"); structures {out['bytes']['bitmap'] / MIB:.2f} vs {out['bytes']['hash set'] / MIB:.2f} MiB",
          flush=True)
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=300_000)
    parser.add_argument("--items", type=int, default=300_000)
    parser.add_argument("--batches", type=int, default=3, help="training batches per memory run")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--max-seq-len", type=int, default=10, help="MAX_ITEM_LIST_LENGTH")
    parser.add_argument("--candidate-num", type=int, default=100, help="N of the pool-draw timing")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved pool-draw rounds")
    parser.add_argument("--repeats", type=int, default=20, help="pool draws per round and structure")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-pool-draw", action="store_true")
    parser.add_argument("--json", default=None, help="also write the measurement to this JSON file")
    parser.add_argument("--workdir", default=os.path.join(REPO_ROOT, "benchmarks", ".work"),
                        help="synthetic data and RecBole's logs (default: benchmarks/.work/)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    quiet_warnings()
    import torch

    torch.set_num_threads(args.threads)
    args.workdir = os.path.abspath(args.workdir)
    if args.json:
        args.json = os.path.abspath(args.json)
    os.makedirs(args.workdir, exist_ok=True)
    os.chdir(args.workdir)  # RecBole writes log/ and log_tensorboard/ into the working directory
    if args.memory_child:
        memory_child(args)
        return None
    command = command_line(argv, "benchmarks.studies.large_catalogue")
    print(f"$ {command}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("memory_child", "json")}
    record = {"command": command, "settings": settings,
              "device": describe_device("cpu"), "versions": versions(), "git": git_state(), "targets": []}
    start = perf_counter()
    if not args.skip_pool_draw:
        with tempfile.TemporaryDirectory(prefix="pool-draw-") as tmp:
            os.chdir(tmp)
            record["pool_draw"] = measure_pool_draw(args)
            os.chdir(args.workdir)
        ratio = record["pool_draw"]["ratio_median"]
        record["targets"].append({"what": "pool draw, hash set / bitmap (ml-100k)", "ratio": ratio,
                                  "bound": DRAW_BOUND, "met": ratio <= DRAW_BOUND})
    if not args.skip_memory:
        record["memory"] = measure_memory(args)
        ratio = record["memory"]["dns"]["peak_rss_mib"] / record["memory"]["recbole"]["peak_rss_mib"]
        record["targets"].append({"what": f"peak RSS, dns / recbole ({args.users} users x {args.items} items)",
                                  "ratio": ratio, "bound": MEMORY_BOUND, "met": ratio <= MEMORY_BOUND})
    record["wall_s"] = perf_counter() - start
    record["children_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    for target in record["targets"]:
        print(f"- {'MET' if target['met'] else 'NOT MET'}: {target['what']} = {target['ratio']:.2f}x "
              f"(target <= {target['bound']}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2, default=str)
    return record


if __name__ == "__main__":
    main()
