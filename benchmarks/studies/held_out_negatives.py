"""Question: How often do samplers train on a user's held-out (validation / test) items as negatives?
Result: --json (committed: benchmarks/results/held_out_negatives-*.json); findings: benchmarks/studies/held_out_negatives.md.

How often a sampler trains on a user's held-out items as negatives (why DNS(M, N) loses to
``uniform`` in the converged grids).

RecBole's leave-one-out split holds out each user's last two items (validation, test). Candidate pools
exclude the items a user has in training, not those two: they are unknown to training, and they are
exactly the items a good model ranks high for that user. A hard sampler picks its pool's highest
scores, so it may train, again and again, on the very items it will be asked to rank. Per epoch, over
every training target:

* ``pool``: the fraction of rows whose candidate pool holds the row's user's validation or test item;
* ``negative``: the fraction of trained negatives that are one of them;
* ``picked given pool``: held-out negatives over the rows whose pool holds a held-out item -- how often such
  a row trains on it (with one negative a row, a probability).

Each cell is one of a converged grid's cells (same settings), trained ``--epochs`` epochs from scratch on
its tuning seed, without validation (so no early stop). The figures never feed back into training::

    python -m benchmarks.studies.held_out_negatives --grid benchmarks/grids/converged_ml100k.yaml \\
        --cells uniform,dns-m1,dns-m5,mdcns-m3 --epochs 30 --json benchmarks/results/held_out_negatives-ml-100k.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import git_state, quiet_warnings, versions
from benchmarks.run import load_grid


def held_out_items(valid_data, test_data, n_users: int) -> torch.Tensor:
    """``[n_users, 2]``: each user's validation and test target (-1, which matches no item, where a user has
    none)."""
    held = torch.full((n_users, 2), -1, dtype=torch.long)
    for column, loader in enumerate((valid_data, test_data)):
        dataset = loader._dataset
        inter = dataset.inter_feat
        held[inter[dataset.uid_field].long(), column] = inter[dataset.iid_field].long()
    return held


def _trainer_class():
    from recbole_mdcns.data import CANDIDATES
    from recbole_mdcns.trainer import NegSamplingTrainer

    class CountingTrainer(NegSamplingTrainer):
        """Counts, per epoch, rows whose pool holds a held-out item and negatives that are one."""

        held: torch.Tensor
        counts: dict

        def build_module(self):
            module = super().build_module()
            loss, record = module.training_loss, module.record_negatives
            state = {}

            def training_loss(batch):
                state["held"] = held = self.held[batch[module.model.USER_ID].long()]
                pool = batch[CANDIDATES].unsqueeze(-1) == held.unsqueeze(1)  # [R, N, 2]
                tally = self.counts[module.current_epoch]
                tally["rows"] += len(held)
                tally["pool_rows"] += int(pool.any(-1).any(-1).sum())
                return loss(batch)

            def record_negatives(ids):
                held = state["held"]
                if ids.dim() != 2 or len(ids) != len(held):
                    raise ValueError(f"{type(module).__name__} records negatives not one row per target")
                tally = self.counts[module.current_epoch]
                tally["negatives"] += ids.numel()
                tally["hits"] += int((ids.unsqueeze(-1) == held.unsqueeze(1)).sum())
                return record(ids)

            module.training_loss, module.record_negatives = training_loss, record_negatives
            return module

    return CountingTrainer


def measure(cell, epochs: int, workdir: Path) -> dict:
    """Train ``cell`` for ``epochs`` epochs and return its per-epoch counts."""
    import recbole_mdcns  # noqa: F401  (RecBole compat shims)
    from recbole_mdcns.config import create_config
    from recbole_mdcns.quick_start import build_model, load_data

    config_dict = {**cell.run_config(workdir), "epochs": epochs}
    config = create_config(cell.model, cell.dataset, None, config_dict)
    dataset, train_data, valid_data, test_data = load_data(config)
    model = build_model(config, train_data)
    trainer = _trainer_class()(config, model)
    trainer.held = held_out_items(valid_data, test_data, dataset.user_num).to(config["device"])
    trainer.counts = defaultdict(lambda: defaultdict(int))
    start = time.perf_counter()
    trainer.fit(train_data, None, verbose=False, saved=False)
    per_epoch = []
    for epoch in sorted(trainer.counts):
        t = trainer.counts[epoch]
        per_epoch.append({"epoch": epoch, **t, "pool": t["pool_rows"] / t["rows"],
                          "negative": t["hits"] / t["negatives"],
                          "picked_given_pool": t["hits"] / t["pool_rows"] if t["pool_rows"] else None})
    return {"cell": cell.sampler, "config": cell.config, "seconds": time.perf_counter() - start,
            "per_epoch": per_epoch}


def render(dataset: str, results: list[dict], epochs: int) -> str:
    lines = [f"{dataset}, {epochs} epochs, every training target; per epoch: pool | negative | picked given pool",
             "| cell | " + " | ".join(f"epoch {e}" for e in _shown(epochs)) + " |",
             "|---|" + "---|" * len(_shown(epochs))]
    for r in results:
        by_epoch = {p["epoch"]: p for p in r["per_epoch"]}
        cells = []
        for e in _shown(epochs):
            p = by_epoch.get(e)
            given = "–" if p is None or p["picked_given_pool"] is None else f"{p['picked_given_pool']:.2f}"
            cells.append("–" if p is None else f"{p['pool']:.3f} / {p['negative']:.4f} / {given}")
        lines.append(f"| {r['cell']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shown(epochs: int) -> list[int]:
    return sorted({0, epochs // 4, epochs // 2, epochs - 1})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="a converged grid file; its cells' settings are used")
    parser.add_argument("--cells", required=True, help="comma-separated sampler labels of the grid")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_warnings()
    cells = {c.sampler: c for c in load_grid(args.grid)}
    labels = args.cells.split(",")
    unknown = [label for label in labels if label not in cells]
    if unknown:
        raise SystemExit(f"--cells {unknown}: not cells of {args.grid}; cells: {sorted(cells)}")
    workdir = Path("benchmarks/.work/held_out_negatives")
    results = []
    for label in labels:
        results.append(measure(cells[label], args.epochs, workdir))
        print(f"[held-out] {label}: {results[-1]['seconds']:.0f} s", flush=True)
    dataset = cells[labels[0]].dataset
    print(render(dataset, results, args.epochs))
    out = {"command": "python -m benchmarks.studies.held_out_negatives " + " ".join(sys.argv[1:] if argv is None else argv),
           "dataset": dataset,
           "epochs": args.epochs, "git": git_state(), "versions": versions(), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
