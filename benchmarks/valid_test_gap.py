"""Why a validation gain does not reach the test: two chosen settings of a converged grid, per seed.

    python -m benchmarks.valid_test_gap --grid benchmarks/grids/converged_lastfm.yaml --pair MDCNS DNS+

Prints, per seed and family: the best validation, the mean validation over the best epoch ± 5 (a gain
that is only the luck of picking the best epoch shrinks there), and how many users have their held-out
item in the top ``k`` on validation and test; then the correlation over users of the two families'
per-user differences on validation and on test (each averaged over the seeds). Reads the records'
``valid_scores`` and ``user_ranks`` (``converged.py --user-ranks`` fills the latter).
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks.converged import _results_paths, build, user_values
from benchmarks.report import load


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True)
    parser.add_argument("--pair", nargs=2, required=True, metavar=("A", "B"), help="two family names")
    parser.add_argument("--metric", default="ndcg@10")
    args = parser.parse_args(argv)
    records, _, _ = load(_results_paths([args.grid]))
    k = int(args.metric.split("@")[1])
    for e in build(args.grid, {r["key"]: r for r in records}):
        families = [e.families[name] for name in args.pair]
        for family in families:
            for seed, record in sorted(family.records.items()):
                scores = np.array([score for _, score in record["valid_scores"]])
                best = int(np.argmax(scores))
                ranks = record.get("user_ranks") or {}
                hits = {split: int(((np.asarray(r) > 0) & (np.asarray(r) <= k)).sum()) if r is not None else None
                        for split, r in ((s, ranks.get(s)) for s in ("valid", "test"))}
                print(f"{e.dataset} {family.name} ({family.chosen}) seed {seed}: valid best {scores.max():.4f}, "
                      f"best epoch ± 5 {scores[max(0, best - 5):best + 6].mean():.4f}; users with a hit@{k}: "
                      f"valid {hits['valid']}, test {hits['test']} (of {len(ranks.get('test') or [])})")
        diffs = {}
        for split in ("valid", "test"):
            seeds = sorted(set(families[0].records) & set(families[1].records))
            per_seed = [[(f.records[s].get("user_ranks") or {}).get(split) for f in families] for s in seeds]
            if seeds and all(a is not None and b is not None for a, b in per_seed):
                diffs[split] = np.mean([user_values(a, args.metric) - user_values(b, args.metric)
                                        for a, b in per_seed], axis=0)
        if len(diffs) == 2:
            r = np.corrcoef(diffs["valid"], diffs["test"])[0, 1]
            print(f"{e.dataset}: per-user {' - '.join(args.pair)} on validation vs on test, correlation {r:.2f}")


if __name__ == "__main__":
    main()
