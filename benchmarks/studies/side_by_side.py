"""Question: On the same files and at the same settings, does this package's MDCNS (and DNS+) score what the
MDCNS authors' released code scores?
Result: ``record`` appends one of their runs to ``benchmarks/results/authors_code.jsonl`` (read from its log);
``table`` prints the side-by-side table (their code x ours) that ``benchmarks/REPRODUCTION.md`` holds.
Findings: benchmarks/REPRODUCTION.md ("Their code beside ours"); how their code is run: docs/authors_code.md.

Their code runs outside this repository (docs/authors_code.md has the commands and the CPU patch). Its log
is the evidence: ``record`` reads, from an MDCNS log (``MDCNS_Code/main.py``), every epoch's validation of
the self model and the "Best Validation Scores for Test" line; from a DNS+ log
(``Baselines/Neg_samples_DNS+``), every epoch's validation and the test after "Change to test_rating_matrix!".
Their HIT@k is Recall@k here (one held-out item per row). A run without its final test line (still running,
or stopped) is refused.

``table`` sets their runs beside ours (``benchmarks/results/authors_protocol.jsonl``, grid
``grids/authors_lastfm.yaml``: ``mdcns-g0.3-t5`` and ``dns-m10`` on all positions at 3 seeds, and the same on
prefix rows at one seed, with our pools and with theirs; ``grids/authors_lastfm_as_theirs.yaml``: those with their
SASRec's positions too): mean +- std (sample) of test NDCG@10 and Recall@10, best epochs, ours - theirs +-
the Welch standard error (sqrt(s1^2/n1 + s2^2/n2); with one run of theirs: our seeds' spread alone), and the
target -- |difference| <= 2 standard errors and <= 5% of theirs; with one run of theirs, theirs inside the
range of our seeds -- with the published figure (paper Table 3) and their own logged GPU run beside them.
Their DNS+ evaluation scores the masked history items 0, their MDCNS -inf (docs/authors_protocol.md,
``eval_history_score``); where theirs is 0, a further row holds our runs re-evaluated so
(``benchmarks/results/history_score-authors_lastfm.json``, ``python -m benchmarks.studies.history_score``).

    python -m benchmarks.studies.side_by_side record LOG --method MDCNS --seed 42 --dataset LastFM \\
        --command "the command that ran it" [--note "..."]
    python -m benchmarks.studies.side_by_side table [--dataset LastFM]
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
from pathlib import Path

from benchmarks.common import REPO_ROOT, describe_device
from benchmarks.report import _fmt, _mean_std
from benchmarks.converged import protocol_seeds
from benchmarks.run import append_result, load_grid, read_grid, read_results

THEIRS = REPO_ROOT / "benchmarks" / "results" / "authors_code.jsonl"
GRID = REPO_ROOT / "benchmarks" / "grids" / "authors_lastfm.yaml"
AS_THEIRS = REPO_ROOT / "benchmarks" / "grids" / "authors_lastfm_as_theirs.yaml"  # SASRecRightAligned
METRICS = ("ndcg@10", "recall@10", "ndcg@20", "recall@20")
# method -> our cells as (sampler, model, what it trains): all positions first (the cell the "history at 0" row
# re-tests), then prefix rows as their code trains, then with their code's pools, then with their models' left padding
OURS = {method: [(cell, "SASRec", "all positions"), (prefix, "SASRec", "prefix rows"),
                 (f"{prefix}-their-pools", "SASRec", "prefix rows, their pools"),
                 (f"{prefix}-their-pools", "SASRecRightAligned", "prefix rows, their pools, their left padding")]
        for method, cell, prefix in (("MDCNS", "mdcns-g0.3-t5", "mdcns-prefix"),
                                     ("DNS+", "dns-m10", "dns-m10-prefix"))}
# paper Table 3 (NDCG@10) and their own logged GPU runs on their files (test NDCG@10 / Recall@10, best epoch):
# MDCNS_Code/Exp6_WeaktoStrong (GRU4Rec peer, gamma 0.3, tau 5) and EXP5/cankao_DNS+ (M 10)
PUBLISHED = {("LastFM", "MDCNS"): 0.1131, ("LastFM", "DNS+"): 0.0943}
# the score their code gives the masked history items when it evaluates each method
THEIR_HISTORY_SCORE = {"MDCNS": "-inf", "DNS+": "0"}
HISTORY_SCORE = REPO_ROOT / "benchmarks" / "results" / "history_score-authors_lastfm.json"
THEIR_LOGS = {("LastFM", "MDCNS"): (0.1129, 0.2066, 144), ("LastFM", "DNS+"): (0.1006, 0.1856, 117)}


def _metrics(line: str) -> dict:
    """``{'Epoch': 3, 'HIT@10': '0.0309', ...}`` (their print) -> {"epoch": 3, "recall@10": 0.0309, ...}."""
    raw = ast.literal_eval(line[line.index("{"):].strip())
    out = {"epoch": int(raw["Epoch"])}
    for key, value in raw.items():
        if "@" in key:
            name, k = key.split("@")
            out[f"{'recall' if name == 'HIT' else name.lower()}@{k}"] = float(value)
    return out


def parse_log(text: str, method: str) -> dict:
    """Best epoch, epochs run, the validation NDCG@20 curve and the test metrics of one of their logs."""
    section, valid, test = "validation", [], None
    for line in text.splitlines():
        if "Best Validation Scores for Test" in line or "Change to test_rating_matrix" in line:
            section = "final test"
        elif "Validation for Epoch" in line:
            section = "validation"
        elif "Test for Epoch" in line:
            section = "test"
        elif section == "final test" and line.startswith("{'Epoch'") and test is None:
            test = _metrics(line)
        # MDCNS: the self model's validation is "Model 1 (...) Results: {...}"; DNS+: one {'Epoch' line an epoch
        elif section == "validation" and line.startswith("Model 1" if method == "MDCNS" else "{'Epoch'"):
            valid.append(_metrics(line))
    if test is None:
        raise ValueError("the log has no final test line: the run has not finished")
    # a resumed run prints again an epoch it was stopped in after printing: the last print of an epoch counts
    by_epoch = {v["epoch"]: v["ndcg@20"] for v in valid}
    curve = [by_epoch[e] for e in sorted(by_epoch)]
    best = max(sorted(by_epoch), key=lambda e: (by_epoch[e], -e)) if by_epoch else None  # the first best, as theirs
    return {"epochs": len(curve), "best_epoch": test["epoch"] if method == "MDCNS" else best,
            "valid_ndcg@20": curve, "test": {m: test[m] for m in METRICS}}


def record(args: argparse.Namespace) -> dict:
    text = Path(args.log).read_text(errors="replace")
    parsed = parse_log(text, args.method)
    entry = {"code": "authors", "method": args.method, "dataset": args.dataset, "seed": args.seed,
             "command": args.command, "note": args.note, "log_sha256": hashlib.sha256(text.encode()).hexdigest(),
             "device": describe_device("cpu"), **parsed}
    append_result(THEIRS, entry)
    print(f"recorded {args.method} {args.dataset} seed {args.seed}: best epoch {parsed['best_epoch']} of "
          f"{parsed['epochs']}, test NDCG@10 {parsed['test']['ndcg@10']:.4f}, Recall@10 {parsed['test']['recall@10']:.4f}")
    return entry


def _cell(values: list[float]) -> str:
    stats = _mean_std(values)
    return f"{_fmt(*stats)} (n={stats[2]})" if values else "–"


def compare(ours: list[float], theirs: list[float]) -> str:
    """Ours - theirs +- the Welch standard error, and whether the target holds."""
    if not ours or not theirs:
        return "–"
    (m1, s1, n1), (m2, s2, n2) = _mean_std(ours), _mean_std(theirs)
    diff = m1 - m2
    relative = abs(diff) / m2 if m2 else math.inf
    if n1 == 1 and n2 == 1:
        return f"{diff:+.4f} ({relative:.1%}); one run each: no spread to test against"
    if n2 == 1:
        inside = min(ours) <= m2 <= max(ours)
        return f"{diff:+.4f} ({relative:.1%}); theirs {'inside' if inside else 'outside'} our seeds' range"
    se = math.sqrt(s1 ** 2 / n1 + s2 ** 2 / n2)
    met = abs(diff) <= 2 * se and relative <= 0.05
    return f"{diff:+.4f} ± {se:.4f} ({relative:.1%}): {'met' if met else 'missed'}"


def _ours_row(method: str, who: str, rows_trained: str, runs: list[tuple[dict, int]],
              their: dict[str, list[float]]) -> str:
    """One row of ours: ``runs`` are (test metrics, best epoch), set against ``their`` test metrics."""
    vals = {m: [test[m] for test, _ in runs] for m in ("ndcg@10", "recall@10")}
    return (f"| {method} | {who} | {rows_trained} | {len(runs)} | {_cell(vals['ndcg@10'])} | "
            f"{_cell(vals['recall@10'])} | {', '.join(str(epoch) for _, epoch in runs) or '–'} | "
            f"{compare(vals['ndcg@10'], their['ndcg@10'])} | {compare(vals['recall@10'], their['recall@10'])} |")


def table(dataset: str = "LastFM") -> str:
    theirs = [r for r in read_results(THEIRS) if r.get("dataset") == dataset]
    cells = [cell for grid in (GRID, AS_THEIRS)
             for cell in load_grid(grid, seeds=protocol_seeds(read_grid(grid)))]  # the chosen settings' seeds too
    records = {r["key"]: r for r in read_results(cells[0].results) if r.get("status") == "ok"}
    by_label: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        if c.key in records:
            by_label.setdefault((c.sampler, c.model_label), []).append(records[c.key])
    rows = ["| method | code | rows trained | runs | test NDCG@10 | test Recall@10 | best epochs | ours − theirs, NDCG@10 "
            "(Welch SE) | ours − theirs, Recall@10 |", "|---|---|---|---|---|---|---|---|---|"]
    for method, ours in OURS.items():
        mine_runs = [r for r in theirs if r["method"] == method]
        their = {m: [r["test"][m] for r in mine_runs] for m in ("ndcg@10", "recall@10")}
        rows.append(f"| {method} | theirs (CPU, our files) | prefix rows | {len(mine_runs)} | {_cell(their['ndcg@10'])} | "
                    f"{_cell(their['recall@10'])} | {', '.join(str(r['best_epoch']) for r in mine_runs) or '–'} | | |")
        all_positions = ours[0][0]
        for label, model, rows_trained in ours:
            runs = [(r["test"], r["best_epoch"]) for r in by_label.get((label, model), [])]
            who = f"ours (`{label}`)" if model == "SASRec" else f"ours (`{label}`, `{model}`)"
            rows.append(_ours_row(method, who, rows_trained, runs, their))
        score = THEIR_HISTORY_SCORE[method]
        if score != "-inf" and HISTORY_SCORE.exists():
            runs = [(r["test"][score], r["best_epoch"]) for r in json.loads(HISTORY_SCORE.read_text())["rows"]
                    if r["sampler"] == all_positions]
            rows.append(_ours_row(method, f"ours (`{all_positions}`), history at {score} as their {method} evaluation",
                                  "all positions", runs, their))
        logged = THEIR_LOGS.get((dataset, method))
        if logged:
            rows.append(f"| {method} | theirs, their logged GPU run (their files, seed 42) | prefix rows | 1 | "
                        f"{logged[0]:.4f} | {logged[1]:.4f} | {logged[2]} | | |")
        if (dataset, method) in PUBLISHED:
            rows.append(f"| {method} | published (Table 3) | | | {PUBLISHED[(dataset, method)]:.4f} | | | | |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.side_by_side", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    rec = sub.add_parser("record", help="append one of their finished runs, read from its log")
    rec.add_argument("log")
    rec.add_argument("--method", choices=sorted(OURS), required=True)
    rec.add_argument("--dataset", default="LastFM")
    rec.add_argument("--seed", type=int, required=True)
    rec.add_argument("--command", required=True, help="the command that ran it (docs/authors_code.md)")
    rec.add_argument("--note", default="")
    tab = sub.add_parser("table", help="print the side-by-side table")
    tab.add_argument("--dataset", default="LastFM")
    args = parser.parse_args(argv)
    if args.what == "record":
        record(args)
    else:
        print(table(args.dataset))


if __name__ == "__main__":
    main()
