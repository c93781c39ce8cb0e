"""Question: Does every sampler train, validate and test with every RecBole model -- sequential and general?
Result: benchmarks/ALL_MODELS.md (sequential models, results/all_models.jsonl) and benchmarks/GENERAL_MODELS.md
(general models, results/general_models.jsonl), from the grids' records.

A model-sweep grid as one table: every model of the grid (`grids/all_models.yaml`, `grids/general_models.yaml`)
against every sampler.

    OMP_NUM_THREADS=1 python -m benchmarks.run --grid benchmarks/grids/all_models.yaml
    python -m benchmarks.studies.all_models            # -> benchmarks/ALL_MODELS.md
    OMP_NUM_THREADS=1 python -m benchmarks.run --grid benchmarks/grids/general_models.yaml --in-process
    python -m benchmarks.studies.all_models --grid benchmarks/grids/general_models.yaml --out benchmarks/GENERAL_MODELS.md

A cell reads `s/epoch` when its epoch trained, validated and tested, `refused [n]` when the sampler refused
the model before training (the reason is footnote `n`), `error [n]` for any other failure, `--` when not
yet run.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

from benchmarks.report import load
from benchmarks.run import load_grid

GRID = "benchmarks/grids/all_models.yaml"
REFUSED = ("ValueError", "TypeError")  # the samplers' config checks: raised before the first batch


def table(grid: str = GRID, title: str = "Every sampler through every model") -> str:
    """The grid's model x sampler table as a Markdown page headed ``title``."""
    cells = load_grid(grid)
    records, failed, _ = load(list(OrderedDict.fromkeys(str(c.results) for c in cells)))
    ok = {r["key"]: r for r in records}
    bad = {r["key"]: r for r in failed}
    models = list(OrderedDict.fromkeys(c.model_label for c in cells))
    samplers = list(OrderedDict.fromkeys(c.sampler for c in cells))
    by_cell = {(c.model_label, c.sampler): c for c in cells}
    notes: OrderedDict[str, int] = OrderedDict()
    rows = [f"| model | {' | '.join(f'`{s}`' for s in samplers)} |", "|---" * (len(samplers) + 1) + "|"]
    for model in models:
        out = []
        for sampler in samplers:
            key = by_cell[(model, sampler)].key
            if key in ok:
                out.append(f"{ok[key]['seconds_per_epoch']:.1f}")
            elif key in bad:
                error = bad[key].get("error", "")
                number = notes.setdefault(error, len(notes) + 1)
                out.append(f"{'refused' if error.startswith(REFUSED) else 'error'} [{number}]")
            else:
                out.append("--")
        rows.append(f"| {model} | {' | '.join(out)} |")
    done = sum(1 for c in cells if c.key in ok or c.key in bad)
    datasets = ", ".join(OrderedDict.fromkeys(c.dataset_label for c in cells))
    lines = [f"# {title} ({done} of {len(cells)} cells run)", "",
             __doc__.split("\n\n")[3].replace("\n", " "), "",
             f"Grid `{grid}` (its header says how the cells are set); seconds per training epoch on {datasets} at "
             "smoke sizes, one CPU thread, on a machine "
             "running other jobs: which cells work, and roughly what they cost -- not a timing comparison "
             "(that is `epoch_time.py`'s, interleaved).", "", *rows]
    if notes:
        lines += ["", *(f"{n}. {error}" for error, n in notes.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default=GRID)
    parser.add_argument("--out", default="benchmarks/ALL_MODELS.md")
    parser.add_argument("--title", default=None,
                        help="the page's heading (default: every sampler through every sequential / general model, "
                             "by the grid)")
    args = parser.parse_args(argv)
    title = args.title or ("Every sampler through every general model" if "general" in Path(args.grid).stem
                           else "Every sampler through every model")
    out = Path(args.out)
    out.write_text(table(args.grid, title))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
