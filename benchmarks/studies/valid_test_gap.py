"""Question: Why does a validation gain of one converged setting over another not reach the test?
Result: printed; findings: benchmarks/REPRODUCTION.md (LastFM).

Why a validation gain does not reach the test: two chosen settings of a converged grid, per seed.

    python -m benchmarks.studies.valid_test_gap --grid benchmarks/grids/converged_lastfm.yaml --pair MDCNS DNS+

Prints, per seed and family: the best validation, the mean validation over the best epoch ± 5 (a gain
that is only the luck of picking the best epoch shrinks there), and how many users have their held-out
item in the top ``k`` on validation and test; then the correlation over users of the two families'
per-user differences on validation and on test (each averaged over the seeds). Reads the records'
``valid_scores`` and ``user_ranks`` (``converged.py --user-ranks`` fills the latter).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from benchmarks.converged import Family, _results_paths, build, user_values
from benchmarks.report import load


@dataclass
class SeedGap:
    """One family's record at one seed."""

    family: str
    chosen: str
    seed: int
    best_valid: float
    near_best_valid: float  # mean validation over the best epoch ± ``window``
    hits: dict[str, int | None]  # split -> users with the held-out item in the top k (None: no ranks)
    users: int


def seed_gaps(family: Family, k: int, window: int = 5) -> list[SeedGap]:
    """Per seed: best validation, validation around the best epoch, users with a hit@k per split."""
    out = []
    for seed, record in sorted(family.records.items()):
        scores = np.array([score for _, score in record["valid_scores"]])
        best = int(np.argmax(scores))
        ranks = record.get("user_ranks") or {}
        hits = {split: None if ranks.get(split) is None else int(user_values(ranks[split], f"hit@{k}").sum())
                for split in ("valid", "test")}
        out.append(SeedGap(family.name, family.chosen, seed, float(scores.max()),
                           float(scores[max(0, best - window):best + window + 1].mean()), hits,
                           len(ranks.get("test") or [])))
    return out


def split_correlation(a: Family, b: Family, metric: str) -> float | None:
    """Correlation over users of ``a - b`` per user on validation with the same on test (each averaged over
    the seeds both have); None when a seed lacks the ranks."""
    seeds = sorted(set(a.records) & set(b.records))
    diffs = {}
    for split in ("valid", "test"):
        pairs = [[(f.records[s].get("user_ranks") or {}).get(split) for f in (a, b)] for s in seeds]
        if not seeds or any(x is None or y is None for x, y in pairs):
            return None
        diffs[split] = np.mean([user_values(x, metric) - user_values(y, metric) for x, y in pairs], axis=0)
    return float(np.corrcoef(diffs["valid"], diffs["test"])[0, 1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True)
    parser.add_argument("--pair", nargs=2, required=True, metavar=("A", "B"), help="two family names")
    parser.add_argument("--metric", default="ndcg@10")
    args = parser.parse_args(argv)
    records, _, _ = load(_results_paths([args.grid]))
    k = int(args.metric.split("@")[1])
    for e in build(args.grid, {r["key"]: r for r in records}):
        missing = [name for name in args.pair if name not in e.families]
        if missing:
            parser.error(f"--pair: no family {missing} in {args.grid}; valid: {list(e.families)}")
        a, b = (e.families[name] for name in args.pair)
        for g in seed_gaps(a, k) + seed_gaps(b, k):
            print(f"{e.dataset} {g.family} ({g.chosen}) seed {g.seed}: valid best {g.best_valid:.4f}, "
                  f"best epoch ± 5 {g.near_best_valid:.4f}; users with a hit@{k}: "
                  f"valid {g.hits['valid']}, test {g.hits['test']} (of {g.users})")
        r = split_correlation(a, b, args.metric)
        if r is not None:
            print(f"{e.dataset}: per-user {' - '.join(args.pair)} on validation vs on test, correlation {r:.2f}")


if __name__ == "__main__":
    main()
