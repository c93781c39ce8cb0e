"""Question: What do DivNS's cache caps cost in refresh time and memory under divns_cache_bound: rows?
Result: --json (committed: benchmarks/results/divns_cap-*-cpu.json); findings: benchmarks/studies/divns_cap.md.

Cost of DivNS's epoch-end k-DPP refresh and of its caches, per cap, with ``divns_cache_bound: rows``.

Under ``rows`` a user with ``n_u`` training rows per epoch gets ``|C_u| <= min(r n_u, cap)`` and
``|H_u| <= min(n_u, cap // r)``. This fills every user's caches to those bounds with distinct
random items (the worst case: every runner-up of the epoch distinct), on the real per-user row
counts of a dataset and random item vectors of its catalogue, and times
``refresh_diverse_sets`` (exact k-DPP, ``O(m^3)`` per user for ``m`` cached items) per cap. Memory
is the caches' id slots (8 bytes each) against the fixed ``[n_users, cap]`` layout. Run from the
repo root:

    python -m benchmarks.studies.divns_cap --dataset ml-100k --caps 64,128,192,256 --threads 1
    python -m benchmarks.studies.divns_cap --dataset lastfm --data_path ../shared/datasets
"""
from __future__ import annotations

import argparse
import json
import os
from time import perf_counter

import recbole
import torch

import recbole_mdcns  # noqa: F401  (applies the compat shims)
from recbole.data import create_dataset

from benchmarks.common import command_line
from recbole_mdcns.config import create_config
from recbole_mdcns.methods.divns import RunnerUpCache, refresh_diverse_sets


def rows_per_user(dataset_name: str, data_path: str, max_len: int) -> tuple[torch.Tensor, int]:
    """RecBole's training rows per user (after its leave-one-out split) and the item count."""
    config = create_config("SASRec", dataset_name, config_dict={
        "neg_sampler": "divns", "data_path": data_path, "MAX_ITEM_LIST_LENGTH": max_len, "state": "ERROR",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "show_progress": False,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"}})
    dataset = create_dataset(config)
    train, _, _ = dataset.build()
    return torch.bincount(train.inter_feat[train.uid_field], minlength=dataset.user_num), dataset.item_num


def filled(cap: torch.Tensor, capacity: int, n_items: int, generator: torch.Generator) -> RunnerUpCache:
    """A cache with bounds ``cap``, each user's segment full of distinct random item ids."""
    cache = RunnerUpCache(capacity, n_users=len(cap))
    cache.set_capacities(cap)
    ids = torch.rand(len(cap), capacity, generator=generator).argsort(1)[:, :capacity] % (n_items - 1) + 1
    users = torch.arange(len(cap)).unsqueeze(1).expand_as(ids)
    keep = torch.arange(capacity) < cap.unsqueeze(1)
    cache.add(users[keep], ids[keep])
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=os.path.join(os.path.dirname(recbole.__file__), "dataset_example"))
    parser.add_argument("--max_len", type=int, default=50)
    parser.add_argument("--caps", default="64,128,192,256")
    parser.add_argument("--ratio", type=int, default=2, help="divns_cache_ratio r")
    parser.add_argument("--dim", type=int, default=64, help="item vector size")
    parser.add_argument("--kernel", default="rbf")
    parser.add_argument("--gamma", default="median", help="RBF bandwidth: a number or median")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, n_items = rows_per_user(args.dataset, os.path.abspath(args.data_path), args.max_len)
    users = int((rows > 0).sum())
    gamma = args.gamma if args.gamma == "median" else float(args.gamma)
    generator = torch.Generator().manual_seed(0)
    emb = torch.randn(n_items, args.dim, generator=generator) * 0.1
    median = int(rows[rows > 0].median())
    print(f"{args.dataset}: {users} users with training rows, {int(rows.sum())} rows (median {median}"
          f" per user), {n_items - 1} items; r={args.ratio}, {args.kernel} gamma={args.gamma}, exact k-DPP, "
          f"{args.threads} thread(s)")
    print("| cap | hard cap | users at the cap | mean m | mean k | refresh s (median) | ms / user | "
          "rows-bound MiB | fixed MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for capacity in (int(c) for c in args.caps.split(",")):
        hard_capacity = max(1, capacity // args.ratio)
        cache = filled((args.ratio * rows).clamp(1, capacity), capacity, n_items, generator)
        hard = filled(rows.clamp(1, hard_capacity), hard_capacity, n_items, generator)
        times = []
        for _ in range(args.repeats):
            started = perf_counter()
            sets = refresh_diverse_sets(emb, cache, cache.size, hard, hard.size, args.kernel, gamma,
                                        generator=torch.Generator().manual_seed(1))
            times.append(perf_counter() - started)
        seconds = sorted(times)[len(times) // 2]
        slots = int(cache.cap.sum() + hard.cap.sum())
        record = {"cap": capacity, "hard_cap": hard_capacity,
                  "users_at_cap": int(((args.ratio * rows) >= capacity).sum()),
                  "mean_m": float(cache.size[rows > 0].float().mean()),
                  "mean_k": float(sets.size[rows > 0].float().mean()), "refresh_seconds": seconds,
                  "ms_per_user": 1000 * seconds / users, "rows_bound_mib": slots * 8 / 2**20,
                  "fixed_mib": len(rows) * (capacity + hard_capacity) * 8 / 2**20}
        results.append(record)
        print(f"| {capacity} | {hard_capacity} | {record['users_at_cap']} | {record['mean_m']:.1f} | "
              f"{record['mean_k']:.1f} | {seconds:.2f} | {record['ms_per_user']:.2f} | "
              f"{record['rows_bound_mib']:.2f} | {record['fixed_mib']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command_line(module="benchmarks.studies.divns_cap"), "dataset": args.dataset, "users": users,
                       "rows": int(rows.sum()), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
