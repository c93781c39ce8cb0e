"""Turn benchmark results files into ``benchmarks/RESULTS.md`` and PNG plots.

    python -m benchmarks.report                                  # every benchmarks/results/*.jsonl
    python -m benchmarks.report --results benchmarks/results/cpu.jsonl --out benchmarks/RESULTS.md

One table per (preset, model, dataset), laid out like the MDCNS paper's Table 3: a row
per sampler (baselines first), test Recall / NDCG @5/10/20 as mean ± std over seeds,
the best mean of each column in bold, and an ``Improv.`` row -- the best proposed
sampler's mean over the best baseline's, per column. Training columns follow:
seeds, epochs run, epoch of the best validation, seconds per training epoch, the
sampling share of the training time, peak memory. Records of one cell key are
deduplicated (the latest ``ok`` record wins); failed cells are listed, not averaged.
Interleaved timing records (``<results>.timing.jsonl`` from ``benchmarks.run --timing``)
become ratio tables. The header names every command that produced the records.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import statistics
from collections import OrderedDict
from pathlib import Path

from benchmarks.common import REPO_ROOT, command_line
from benchmarks.run import read_results

METRICS = [("recall@5", "R@5"), ("recall@10", "R@10"), ("recall@20", "R@20"),
           ("ndcg@5", "N@5"), ("ndcg@10", "N@10"), ("ndcg@20", "N@20")]
PLOT_METRIC = "ndcg@10"


def _mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def load(paths: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
    """(latest ok record per cell key, failed records of keys never ok, timing records)."""
    latest, errors, timing = OrderedDict(), OrderedDict(), []
    for path in paths:
        for record in read_results(path):
            if "key" not in record:
                continue
            if record.get("status") == "ok":
                latest[record["key"]] = record
            elif record.get("status") == "error":
                errors[record["key"]] = record
        timing_path = Path(path).with_suffix(".timing.jsonl")
        timing += read_results(timing_path)
    failed = [r for k, r in errors.items() if k not in latest]
    return list(latest.values()), failed, timing


class Row:
    """One sampler setting in one table: its records over seeds."""

    def __init__(self, label: str, role: str) -> None:
        self.label, self.role, self.records = label, role, []

    def metric(self, name: str, split: str = "test"):
        return _mean_std([(r.get(split) or {}).get(name) for r in self.records])

    def field(self, name: str):
        return _mean_std([r.get(name) for r in self.records])

    def peak_mib(self):
        return _mean_std([r.get("peak_memory_mib") for r in self.records])

    def sampling_sources(self) -> set:
        return {r.get("sampling_share_source") for r in self.records if r.get("sampling_share") is not None}


def tables(records: list[dict]) -> "OrderedDict[tuple, list[Row]]":
    """``{(preset, model, dataset): [Row, ...]}``, baselines first, in order of appearance."""
    out: "OrderedDict[tuple, OrderedDict]" = OrderedDict()
    for r in records:
        cell = r["cell"]
        table = out.setdefault((cell.get("preset") or cell["grid"], cell["model_label"], cell["dataset_label"]),
                               OrderedDict())
        row_key = (cell["sampler"], r.get("group"))
        if row_key not in table:
            table[row_key] = Row(cell["sampler"], cell.get("role", "baseline"))
        table[row_key].records.append(r)
    result = OrderedDict()
    for key, rows in out.items():
        rows = list(rows.values())
        labels = [row.label for row in rows]
        for row in rows:  # the same label with two different settings: tell them apart
            if labels.count(row.label) > 1:
                row.label = f"{row.label} ({row.records[0].get('group', '')[:6]})"
        result[key] = [r for r in rows if r.role == "baseline"] + [r for r in rows if r.role != "baseline"]
    return result


def _fmt(mean, std, n, digits=4):
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def render_table(rows: list[Row]) -> list[str]:
    metrics = [(m, title) for m, title in METRICS if any(row.metric(m)[0] is not None for row in rows)]
    best = {}
    for m, _ in metrics:
        means = [row.metric(m)[0] for row in rows if row.metric(m)[0] is not None]
        best[m] = max(means) if means else None
    head = (["sampler"] + [title for _, title in metrics]
            + ["valid N@10", "seeds", "epochs", "best epoch", "s / epoch", "sampling share", "peak MiB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.label + ("" if row.role == "baseline" else " *")]
        for m, _ in metrics:
            mean, std, n = row.metric(m)
            text = _fmt(mean, std, n)
            cells.append(f"**{text}**" if mean is not None and mean == best[m] else text)
        cells.append(_fmt(*row.metric("ndcg@10", "valid")))
        cells.append(str(len(row.records)))
        cells.append(_fmt(*row.field("epochs"), digits=1))
        cells.append(_fmt(*row.field("best_epoch"), digits=1))
        cells.append(_fmt(*row.field("seconds_per_epoch"), digits=2))
        share = row.field("sampling_share")
        sources = row.sampling_sources()
        cells.append("–" if share[0] is None else f"{share[0]:.1%}" + (" (loader)" if sources == {"loader"} else ""))
        cells.append(_fmt(*row.peak_mib(), digits=0))
        lines.append("| " + " | ".join(cells) + " |")
    baselines = [row for row in rows if row.role == "baseline"]
    proposed = [row for row in rows if row.role != "baseline"]
    if baselines and proposed:
        cells = ["Improv."]
        for m, _ in metrics:
            b = max((row.metric(m)[0] for row in baselines if row.metric(m)[0] is not None), default=None)
            p = max((row.metric(m)[0] for row in proposed if row.metric(m)[0] is not None), default=None)
            cells.append("–" if b in (None, 0) or p is None else f"{(p - b) / b:+.2%}")
        cells += [""] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_timing(timing: list[dict]) -> list[str]:
    lines = []
    for t in timing:
        ref = t.get("reference")
        device = t.get("device") or {}
        lines += ["", f"### {t.get('model')} on {t.get('dataset')} ({t.get('preset') or t.get('grid')}), "
                      f"{t.get('rounds')} interleaved rounds, {device.get('gpu') or device.get('cpu')}", "",
                  f"| sampler | epoch s (median) | per round | time / {ref} |", "|---|---|---|---|"]
        for label, entry in (t.get("summary") or {}).get("variants", {}).items():
            rounds = " ".join(f"{x:.2f}" for x in t["times"][label]["epoch_s"])
            ratio = entry.get(f"time_vs_{ref}")
            lines.append(f"| {label} | {entry.get('epoch_s_median', float('nan')):.2f} | {rounds} | "
                         f"{'–' if ratio is None else f'{ratio:.2f}x'} |")
        lines += ["", f"Command: `{t.get('command')}`"]
    return lines


def render_diversity(rows: list[Row]) -> list[str]:
    """The DivNS paper's diagnostic, per sampler: the last epoch's negatives' mean pairwise cosine
    distance and catalogue fraction, and the fraction of the catalogue ever used (mean ± std over seeds)."""
    def last(record: dict, key: str):
        history = record.get("negative_stats") or []
        return history[-1].get(key) if history and isinstance(history[-1], dict) else None

    keys = ("mean_pairwise_cosine_distance", "catalogue_fraction", "catalogue_fraction_ever")
    lines = ["| sampler | mean pairwise cosine distance | catalogue fraction (last epoch) | catalogue fraction ever |",
             "|---|---|---|---|"]
    for row in rows:
        stats = [_mean_std([last(r, key) for r in row.records]) for key in keys]
        if stats[0][0] is None:
            continue
        lines.append(f"| {row.label} | " + " | ".join(_fmt(*stat) for stat in stats) + " |")
    return lines if len(lines) > 2 else []


def _save(fig, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def _bar_panel(ax, rows: list[Row], title: str, metric: str = PLOT_METRIC, split: str = "test") -> None:
    """Horizontal bars, one per sampler (top to bottom in table order), ``split``'s ``metric`` as mean ± std
    over seeds, each labelled with its value and seed count; the best baseline's mean as a dashed line."""
    stats = [row.metric(metric, split) for row in rows]
    means = [s[0] or 0.0 for s in stats]
    errs = [s[1] or 0.0 for s in stats]
    y = list(range(len(rows)))
    colors = [{"baseline": "tab:gray", "reference": "tab:blue"}.get(row.role, "tab:red") for row in rows]
    ax.barh(y, means, xerr=errs, capsize=3, color=colors, height=0.7, error_kw={"elinewidth": 1})
    ax.set_yticks(y, [row.label for row in rows], fontsize=9)
    ax.invert_yaxis()
    right = max((m + e for m, e in zip(means, errs)), default=0.0) or 1.0
    for i, ((mean, std, n), m, e) in enumerate(zip(stats, means, errs)):
        if mean is not None:
            ax.text(m + e + 0.01 * right, i, f"{mean:.4f}" + (f" ± {std:.4f}" if n > 1 else "") + f"  (n={n})",
                    va="center", fontsize=8)
    best = max((s[0] for s, row in zip(stats, rows) if row.role == "baseline" and s[0] is not None), default=None)
    if best is not None:
        ax.axvline(best, color="tab:gray", linestyle="--", linewidth=1)
    ax.set_xlim(0, right * 1.65)
    ax.set_xlabel(f"{split} {metric.upper()} (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def _time_panel(ax, rows: list[Row], title: str) -> None:
    """NDCG@10 against training seconds per epoch, mean ± std over seeds; points numbered, named in the legend."""
    for i, row in enumerate(rows, 1):
        y, yerr, _ = row.metric(PLOT_METRIC)
        x, xerr, _ = row.field("seconds_per_epoch")
        if x is None or y is None:
            continue
        baseline = row.role == "baseline"
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o" if baseline else "s", capsize=2, markersize=4,
                    color="tab:gray" if baseline else "tab:red", elinewidth=0.8, label=f"{i}  {row.label}")
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("training seconds per epoch (log scale)")
    ax.set_ylabel(f"test {PLOT_METRIC.upper()}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, handlelength=1.2)


def plots(all_tables, out_dir: Path) -> list[Path]:
    """Per (preset, dataset): NDCG@10 per sampler with error bars (one facet per model), and NDCG@10
    against seconds per epoch. Files ``<preset>_<dataset>_ndcg10.png`` and ``..._ndcg10_vs_time.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    figures = OrderedDict()
    for (preset, model, dataset), rows in all_tables.items():
        figures.setdefault((preset, dataset), []).append((model, rows))
    for (preset, dataset), panels in figures.items():
        n = len(panels)
        tallest = max(len(rows) for _, rows in panels)
        name = f"{_slug(str(preset))}_{_slug(str(dataset))}_ndcg10"
        fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 1.2 + 0.32 * tallest), squeeze=False)
        for ax, (model, rows) in zip(axes[0], panels):
            _bar_panel(ax, rows, model)
        written.append(_save(fig, f"{dataset} (preset {preset}): test {PLOT_METRIC.upper()} per sampler "
                                  f"(grey: baselines, red: proposed; dashed: best baseline)", out_dir / f"{name}.png"))
        fig, axes = plt.subplots(1, n, figsize=(9 * n, max(4.5, 1.5 + 0.18 * tallest)), squeeze=False)
        for ax, (model, rows) in zip(axes[0], panels):
            _time_panel(ax, rows, model)
        written.append(_save(fig, f"{dataset} (preset {preset}): {PLOT_METRIC.upper()} against time per epoch",
                             out_dir / f"{name}_vs_time.png"))
    return written


def _provenance(records: list[dict], timing: list[dict]) -> list[str]:
    commands, commits, devices = OrderedDict(), OrderedDict(), OrderedDict()
    for r in records + timing:
        commands[r.get("command")] = commands.get(r.get("command"), 0) + 1
        git = r.get("git") or {}
        commits[f"{git.get('commit')}{' (uncommitted changes)' if git.get('dirty') else ''}"] = True
        d = r.get("device") or {}
        devices[f"{d.get('device')} -- {d.get('gpu') or d.get('cpu')}, {d.get('cpu_count')} cores, "
                f"torch threads {d.get('torch_threads')}"] = True
    stamps = sorted(r.get("finished_at") for r in records + timing if r.get("finished_at"))
    lines = ["Records produced by:"]
    lines += [f"- `{c}` ({n} record{'s' if n > 1 else ''})" for c, n in commands.items()]
    lines += ["", "Code: " + ", ".join(f"`{c}`" for c in commits) + "."]
    lines += ["Devices: " + "; ".join(devices) + "."]
    if stamps:
        lines += [f"Finished between {stamps[0]} and {stamps[-1]} (UTC)."]
    return lines


def render(records, failed, timing, results_paths, plot_paths, out_path: Path, report_command: str) -> str:
    all_tables = tables(records)
    rel = lambda p: os.path.relpath(p, out_path.parent)  # noqa: E731
    lines = ["# Benchmark results", "",
             f"Generated by `{report_command}` from " + ", ".join(f"`{rel(p)}`" for p in results_paths) + ".", ""]
    lines += _provenance(records, timing) + [""]
    lines += [
        "Test metrics are mean ± std over seeds (sample std), full ranking, RecBole's leave-one-out split by time; "
        "the best mean per column is **bold**. `*` marks the proposed samplers; `Improv.` is the best proposed "
        "mean relative to the best baseline mean. `s / epoch`: training seconds per epoch (validation excluded). "
        "`sampling share`: time spent drawing negatives over training time -- for recbole-mdcns samplers the "
        "candidate-pool draws (scoring the pool inside the training step not included); `(loader)`: RecBole's "
        "training loader, whose dynamic DNS also scores its candidates there. `peak MiB`: "
        "peak resident memory of the cell's process. Times from grid cells ran one after another on a shared "
        "machine; for like-for-like ratios see the interleaved timing section.", ""]
    for (preset, model, dataset), rows in all_tables.items():
        lines += [f"## {model} on {dataset} (preset `{preset}`)", ""] + render_table(rows) + [""]
        diversity = render_diversity(rows)
        if diversity:
            lines += [f"Negatives trained on ({model} on {dataset}):", ""] + diversity + [""]
    if timing:
        lines += ["## Interleaved epoch times (same process, alternating samplers)"] + render_timing(timing) + [""]
    if failed:
        lines += ["## Failed cells (no ok record yet)", ""]
        lines += [f"- {r['cell']['sampler']} | {r['cell']['model_label']} | {r['cell']['dataset_label']} | "
                  f"seed {r['cell']['seed']}: {str(r.get('error'))[:200]}" for r in failed] + [""]
    if plot_paths:
        lines += ["## Plots", ""] + [f"![{p.stem}]({rel(p)})" for p in plot_paths] + [""]
    return "\n".join(lines)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", nargs="+", help="results files (default: benchmarks/results/*.jsonl)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--plots", default=None, help="folder for the PNGs (default: <out folder>/plots)")
    args = parser.parse_args(argv)
    paths = args.results or sorted(p for p in glob.glob(str(REPO_ROOT / "benchmarks" / "results" / "*.jsonl"))
                                   if not p.endswith(".timing.jsonl"))
    records, failed, timing = load(paths)
    out = Path(args.out).resolve()
    plot_dir = Path(args.plots).resolve() if args.plots else out.parent / "plots"
    plot_paths = []
    if records:
        try:
            plot_paths = plots(tables(records), plot_dir)
        except ImportError as error:  # matplotlib is in the `bench` extra
            print(f"no plots: {error} (pip install matplotlib, or the package's [bench] extra)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(records, failed, timing, [Path(p).resolve() for p in paths], plot_paths, out,
                          command_line(argv, "benchmarks.report")))
    print(f"wrote {out} ({len(records)} cells, {len(failed)} failed) and {len(plot_paths)} plots in {plot_dir}")
    return out


if __name__ == "__main__":
    main()
