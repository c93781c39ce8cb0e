"""Question: How much do our runs' test metrics change when the masked history items score 0, as the MDCNS authors'
baselines (their DNS+) evaluate, instead of -inf, as their MDCNS evaluates?
Result: ``benchmarks/results/history_score-<grid>.json``; findings: benchmarks/studies/history_score.md.

Each finished cell of the named samplers whose best model was kept (``python -m benchmarks.converged --run
--keep-checkpoints``) is reloaded from that checkpoint and its test set evaluated twice, ``eval_history_score: -inf``
and ``0`` (one process, one thread); the ``-inf`` figures must equal the cell's recorded test metrics. A cell
finished without ``--keep-checkpoints`` can be rerun with ``python -m benchmarks.run --verify --keep-checkpoints``
(its folder is then a further ``--work``).

    python -m benchmarks.studies.history_score --grid benchmarks/grids/authors_lastfm.yaml \\
        --work benchmarks/.work/authors_lastfm [--samplers dns-m10 mdcns-g0.3-t5]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT, command_line, describe_device, git_state, to_jsonable
from benchmarks.converged import protocol_seeds
from benchmarks.run import load_grid, read_grid, read_results

SCORES = ("-inf", "0")
METRICS = ("ndcg@10", "recall@10", "ndcg@20")


def best_model(works: list[str], key: str) -> str | None:
    """The RecBole best-model file a kept cell left in a work folder (not its Lightning folder)."""
    found = sorted(path for work in works for path in glob.glob(str(Path(work) / key / "saved" / "*.pth")))
    return found[-1] if found else None


def evaluate_both(model_file: str) -> dict[str, dict[str, float]]:
    """The checkpoint's test metrics with the masked history at each of :data:`SCORES`."""
    from recbole_mdcns.compat import load_data_and_model
    from recbole_mdcns.quick_start import build_trainer

    config, model, _, train_data, _, test_data = load_data_and_model(model_file)
    config["metric_decimal_place"] = 12  # RecBole rounds to 4: a change below that must show too
    trainer = build_trainer(config, model)
    trainer.eval_collector.data_collect(train_data)
    out = {}
    for score in SCORES:
        config["eval_history_score"] = score
        out[score] = {k: float(v) for k, v in trainer.evaluate(test_data, load_best_model=False).items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", required=True)
    parser.add_argument("--work", nargs="+", required=True,
                        help="the drivers' work folders, holding <cell key>/saved/ (also a --verify rerun's folder)")
    parser.add_argument("--results", help="results file (default: the grid's)")
    parser.add_argument("--samplers", nargs="+", default=["dns-m10", "mdcns-g0.3-t5"])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import recbole_mdcns  # noqa: F401  (compat shims)

    name = read_grid(args.grid).get("name", Path(args.grid).stem)
    cells = {c.key: c for c in load_grid(args.grid, seeds=protocol_seeds(read_grid(args.grid)))
             if c.sampler in args.samplers}
    records = {r["key"]: r for r in read_results(args.results or next(iter(cells.values())).results)
               if r.get("status") == "ok" and r["key"] in cells}
    rows = []
    for key, record in sorted(records.items(), key=lambda kv: (cells[kv[0]].sampler, cells[kv[0]].seed)):
        model_file = best_model(args.work, key)
        if model_file is None:
            print(f"[skip] {cells[key].sampler} seed {cells[key].seed}: no kept checkpoint under {args.work}/{key}")
            continue
        scores = evaluate_both(model_file)
        recorded = {m: record["test"][m] for m in METRICS}
        if any(abs(scores["-inf"][m] - recorded[m]) > 1e-4 for m in METRICS):
            raise SystemExit(f"{key}: the checkpoint's -inf test {scores['-inf']} is not the recorded {recorded}")
        rows.append({"sampler": cells[key].sampler, "seed": cells[key].seed, "key": key,
                     "best_epoch": record["best_epoch"], "test": scores})
        print(f"{cells[key].sampler:>16} seed {cells[key].seed}: " + ", ".join(
            f"{m} {scores['-inf'][m]:.4f} -> {scores['0'][m]:.4f}" for m in METRICS), flush=True)
    result = {"question": __doc__.split("\n")[0], "grid": args.grid, "rows": rows,
              "command": command_line(argv, "benchmarks.studies.history_score"),
              "device": describe_device("cpu"), "git": git_state()}
    out = Path(args.out or REPO_ROOT / "benchmarks" / "results" / f"history_score-{name}.json")
    out.write_text(json.dumps(to_jsonable(result), indent=1) + os.linesep)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
