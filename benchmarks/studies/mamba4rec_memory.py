"""Question: How much memory and time does one Mamba4Rec training step take with the mambapy scan, and what does mamba_batch_chunk save?
Result: printed; findings: benchmarks/studies/mamba4rec_memory.md.

Peak CPU memory and time of one Mamba4Rec training step (``mambapy`` scan), per batch size and chunk.

Each setting runs in its own subprocess: RecBole's ml-100k (``MAX_ITEM_LIST_LENGTH`` 50), a real
training batch of RecBole's loader (BPR, one uniform negative), the model built from
``config_yamls/models/Mamba4Rec.yaml``, then two steps of ``calculate_loss`` + ``backward``.
Reported: the process's peak resident set (``resource.getrusage`` max RSS) minus its resident
set just before the steps, and the second step's seconds (one thread). Run from the repo root:

    python -m benchmarks.studies.mamba4rec_memory --batches 1024,2048 --chunks 0,256
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def measure(batch: int, chunk: int, length: int) -> dict:
    """One training step in this process; the figures as a dict."""
    import psutil
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation

    import recbole_mdcns  # noqa: F401  (RecBole 1.2.1 on today's stack)
    from recbole_mdcns.config import packaged_yaml
    from recbole_mdcns.models.mamba4rec import Mamba4Rec

    torch.set_num_threads(1)
    settings = {"loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
                "train_batch_size": batch, "MAX_ITEM_LIST_LENGTH": length, "mamba_backend": "mambapy",
                "mamba_batch_chunk": chunk, "state": "ERROR", "show_progress": False}
    config = Config(model=Mamba4Rec, dataset="ml-100k", config_file_list=[packaged_yaml("models/Mamba4Rec")],
                    config_dict=settings)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = Mamba4Rec(config, train_data._dataset)
    interaction = next(iter(train_data))
    before = psutil.Process().memory_info().rss
    model.calculate_loss(interaction).backward()
    start = time.perf_counter()  # the second step: without first-call costs
    model.calculate_loss(interaction).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"batch": len(interaction), "chunk": chunk, "length": length, "step_mb": (peak - before) / 2**20,
            "peak_mb": peak / 2**20, "seconds": seconds,
            "d_inner": model.expand * model.hidden_size, "d_state": model.d_state, "layers": model.num_layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1024,2048")
    parser.add_argument("--chunks", default="0,256", help="mamba_batch_chunk values (0: off)")
    parser.add_argument("--length", type=int, default=50, help="MAX_ITEM_LIST_LENGTH")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.length)))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    for batch in (int(b) for b in args.batches.split(",")):
        for chunk in (int(c) for c in args.chunks.split(",")):
            child = [sys.executable, __file__, "--length", str(args.length), "--child", str(batch), str(chunk)]
            out = subprocess.run(child, env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"B={r['batch']} L={r['length']} d_inner={r['d_inner']} d_state={r['d_state']} layers={r['layers']} "
                  f"mamba_batch_chunk={r['chunk']}: step +{r['step_mb']:.0f} MiB RSS (process peak "
                  f"{r['peak_mb']:.0f} MiB), {r['seconds']:.2f} s")


if __name__ == "__main__":
    main()
