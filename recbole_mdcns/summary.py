"""The short table that ends ``python -m recbole_mdcns``: one column per run, side by side."""
from __future__ import annotations

Run = tuple[str, dict, float]  # (column label, run_recbole's result dict, wall seconds)


def _at_best_epoch(result: dict) -> dict:
    """MDCNS's peer and self+peer ensemble validation results at the self model's best epoch (else ``{}``)."""
    info = result.get("train_info") or {}
    return next((record for record in info.get("extra_valid_results", []) if record["epoch"] == info["best_epoch"]),
                {})


def _rows(result: dict, model: str) -> dict:
    """``{(group, metric): cell}`` for one run, in display order."""
    rows = {}
    groups = [(f"{model} test", result["test_result"]), (f"{model} valid", result["best_valid_result"])]
    extra = _at_best_epoch(result)
    groups += [("peer valid", extra.get("peer")), ("self+peer valid", extra.get("ensemble"))]
    for group, metrics in groups:
        for metric, value in (metrics or {}).items():
            rows[(group, metric)] = f"{value:.4f}"
    info = result.get("train_info")
    rows[("epochs run, best epoch", "")] = f"{info['epochs']}, {info['best_epoch']}" if info else "-"
    return rows


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m {seconds:02d}s"


def summary_table(runs: list[Run], model: str) -> str:
    """Test metrics of the self model (the best validation epoch's), its validation metrics at that epoch and, for
    MDCNS, the peer's and the self+peer ensemble's; epochs run, best epoch (RecBole's count from 0) and wall time."""
    per_run = [_rows(result, model) for _, result, _ in runs]
    keys = list(dict.fromkeys(key for rows in per_run for key in rows))
    table = [("", "", *(label for label, _, _ in runs))]
    previous = None
    for group, metric in keys:
        cells = (rows.get((group, metric), "-") for rows in per_run)
        table.append((group if group != previous else "", metric, *cells))
        previous = group
    table.append(("time", "", *(_duration(seconds) for _, _, seconds in runs)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table)
