"""Question: Which of our users are the MDCNS authors' Beauty validation and test users, do the files
``python -m recbole_mdcns.user_split --assignment amazon-beauty-mdcns`` builds reproduce theirs line for
line, and which seeded split of LastFM comes closest to their LastFM files?
Result: printed; ``beauty --write-assignment`` writes ``recbole_mdcns/splits/amazon-beauty-mdcns.txt``;
findings: benchmarks/studies/authors_split.md and docs/authors_protocol.md.

**beauty** reads the authors' ``Beauty_val.txt`` / ``Beauty_test.txt`` (one item sequence a line, in their
remapped ids; from github Lyz103/SIGIR26-MDCNS, ``MDCNS_Code/data/``) from the folder given, and our
``amazon-beauty.inter``. Their remap (``data/data_process.py``) numbers users by their third-latest real
timestamp and items by first appearance in that user order; our file's timestamps are positions, so the remap
cannot be recomputed -- the lines are matched instead: one item bijection under which each of their lines is
one of our users' whole sequence, found by propagation (a line whose length or already-mapped items leave one
consistent user fixes that user and its items' ids; repeated until nothing changes; lines still open -- users
with identical sequences, or items seen only within such a group -- take the smallest consistent user id). It
then builds the benchmark files from the assignment with the split command (``--heldout last --max-len 50``),
rebuilds each held-out row's whole sequence (``NAME.history`` + ``item_id_list`` + ``item_id``), writes it in
their ids and compares line by line and by SHA-256.

**lastfm**: their LastFM files are not public; their logs show 41,251 / 4,430 / 5,780 training / validation /
test lines. It shows which user ratios explain those counts (20,000 random splits each) and searches the split
command's seeds (``numpy.random.default_rng(seed)``) at ratios 0.8 0.1 0.1 for the counts closest to theirs.

    python -m benchmarks.studies.authors_split beauty --authors DIR \\
        --inter ../shared/datasets/amazon-beauty/amazon-beauty.inter [--write-assignment PATH]
    python -m benchmarks.studies.authors_split lastfm --inter ../shared/datasets/lastfm/lastfm.inter --seeds 1000000
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import tempfile
from pathlib import Path

import numpy as np

from recbole_mdcns.benchmark_files import HISTORY_ITEMS, HISTORY_SUFFIX, HISTORY_USER
from recbole_mdcns.user_split import (
    ASSIGNMENT_FOLDER,
    Sequences,
    main as user_split,
    read_inter,
    shuffled_split,
    split_sizes,
)

THEIR_LASTFM = {"train": 41251, "valid": 4430, "test": 5780}
BEAUTY_ASSIGNMENT = ASSIGNMENT_FOLDER / "amazon-beauty-mdcns.txt"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def match_lines(lines: list[tuple[str, ...]], seq: Sequences) -> tuple[list[int], dict[str, str], int]:
    """For each of their lines the index of our user with that sequence under one item bijection, the
    bijection (their id -> our token) and how many lines the propagation fixed (the rest by tie-break)."""
    ours = [tuple(seq.items[seq.of(u)]) for u in range(len(seq.users))]
    by_length: dict[int, set[int]] = collections.defaultdict(set)
    at: dict[tuple[int, str], set[int]] = collections.defaultdict(set)
    for u, items in enumerate(ours):
        by_length[len(items)].add(u)
        for p, item in enumerate(items):
            at[(p, item)].add(u)
    theirs_to_ours: dict[str, str] = {}
    ours_taken: set[str] = set()
    assigned: dict[int, int] = {}
    used: set[int] = set()

    def consistent(line: tuple[str, ...], u: int) -> bool:
        return len(ours[u]) == len(line) and u not in used and all(
            theirs_to_ours.get(x) == y if x in theirs_to_ours else y not in ours_taken for x, y in zip(line, ours[u]))

    def candidates(line: tuple[str, ...]) -> list[int]:
        pool = None
        for p, x in enumerate(line):
            if x in theirs_to_ours:
                here = at[(p, theirs_to_ours[x])]
                pool = here if pool is None else pool & here
        return sorted(u for u in (by_length[len(line)] if pool is None else pool) if consistent(line, u))

    def assign(k: int, u: int) -> None:
        assigned[k] = u
        used.add(u)
        for x, y in zip(lines[k], ours[u]):
            theirs_to_ours[x] = y
            ours_taken.add(y)

    changed = True
    while changed:
        changed = False
        for k, line in enumerate(lines):
            if k not in assigned:
                found = candidates(line)
                if not found:
                    raise ValueError(f"line {k + 1} of theirs matches none of our users: {' '.join(line)}")
                if len(found) == 1:
                    assign(k, found[0])
                    changed = True
    propagated = len(assigned)
    for k, line in enumerate(lines):  # ties: identical sequences, or items seen only within such a group
        if k not in assigned:
            assign(k, candidates(line)[0])
    return [assigned[k] for k in range(len(lines))], theirs_to_ours, propagated


def beauty(args: argparse.Namespace) -> None:
    files = {part: Path(args.authors) / f"Beauty_{name}.txt" for part, name in (("valid", "val"), ("test", "test"))}
    texts = {part: path.read_text() for part, path in files.items()}
    lines = {part: [tuple(line.split()) for line in text.splitlines() if line.strip()] for part, text in texts.items()}
    for part in files:
        print(f"their {files[part].name}: {len(lines[part])} lines, sha256 {_sha256(texts[part])}")
    seq = read_inter(args.inter)
    print(f"ours: {len(seq.users)} users, {len(set(seq.items))} items, {len(seq.items)} interactions")
    every = lines["valid"] + lines["test"]
    users, theirs_to_ours, propagated = match_lines(every, seq)
    print(f"matched {len(every)} lines to {len(set(users))} distinct users under one bijection of "
          f"{len(theirs_to_ours)} items; {propagated} fixed by propagation, {len(every) - propagated} by tie-break")
    split_of = ["valid"] * len(lines["valid"]) + ["test"] * len(lines["test"])
    assignment = "".join(f"{seq.users[u]} {part}\n" for u, part in zip(users, split_of))
    header = ("# The MDCNS authors' Beauty split (github Lyz103/SIGIR26-MDCNS, MDCNS_Code/data/Beauty_val.txt and\n"
              "# Beauty_test.txt) as user ids of amazon-beauty.inter (22,363 users), their line order; other users\n"
              "# train. Made by: python -m benchmarks.studies.authors_split beauty (benchmarks/studies/authors_split.md)\n")
    if args.write_assignment:
        Path(args.write_assignment).write_text(header + assignment)
        print(f"wrote {args.write_assignment}")
    elif BEAUTY_ASSIGNMENT.is_file():
        packaged = [line for line in BEAUTY_ASSIGNMENT.read_text().splitlines(keepends=True) if not line.startswith("#")]
        print(f"packaged {BEAUTY_ASSIGNMENT.name}: {'identical to' if ''.join(packaged) == assignment else 'DIFFERS from'}"
              " this matching")
    ours_to_theirs = {y: x for x, y in theirs_to_ours.items()}
    with tempfile.TemporaryDirectory() as out:
        user_split(["--inter", args.inter, "--out", out, "--name", "beauty-mdcns", "--heldout", "last",
                    "--max-len", "50", "--assignment", args.write_assignment or str(BEAUTY_ASSIGNMENT)])
        folder = Path(out) / "beauty-mdcns"
        older = {}
        if (folder / f"beauty-mdcns.{HISTORY_SUFFIX}").exists():
            rows = (folder / f"beauty-mdcns.{HISTORY_SUFFIX}").read_text().splitlines()
            assert rows[0] == f"{HISTORY_USER}:token\t{HISTORY_ITEMS}:token_seq"
            older = {user: items.split() for user, items in (row.split("\t") for row in rows[1:])}
        print(f"held-out rows longer than --max-len 50 (items before them in beauty-mdcns.history): {len(older)}")
        for part in files:
            rows = (folder / f"beauty-mdcns.{part}.inter").read_text().splitlines()[1:]
            rebuilt = []
            for row in rows:
                user, target, window = row.split("\t")[:3]
                whole = older.get(user, []) + window.split() + [target]
                rebuilt.append(" ".join(ours_to_theirs[item] for item in whole))
            same = sum(a == " ".join(b) for a, b in zip(rebuilt, lines[part]))
            text = "".join(line + "\n" for line in rebuilt)
            print(f"{files[part].name}: {same} of {len(lines[part])} lines equal, in order; rebuilt sha256 "
                  f"{_sha256(text)} ({'identical' if text == texts[part] else 'different'} file)")


def lastfm(args: argparse.Namespace) -> None:
    seq = read_inter(args.inter)
    rows = seq.length - 1
    n, total = len(rows), int(rows.sum())
    print(f"ours: {n} users, {total} prefix rows (theirs: {sum(THEIR_LASTFM.values())} lines = "
          f"{THEIR_LASTFM['train']} + {THEIR_LASTFM['valid']} + {THEIR_LASTFM['test']})")
    rng = np.random.default_rng(0)
    for ratios in ([0.7, 0.2, 0.1], [0.8, 0.1, 0.1]):
        sizes = split_sizes(n, ratios)
        draws = np.array([[c.sum() for c in np.split(rows[rng.permutation(n)], np.cumsum(sizes)[:2])]
                          for _ in range(20000)])
        parts = []
        for j, part in enumerate(("train", "valid", "test")):
            mean, sd = draws[:, j].mean(), draws[:, j].std()
            parts.append(f"{part} {mean:.0f} +- {sd:.0f} (theirs {(THEIR_LASTFM[part] - mean) / sd:+.2f} sd)")
        print(f"ratios {ratios} ({'/'.join(map(str, sizes))} users), rows over 20,000 random splits: " + "; ".join(parts))
    best = []
    for seed in range(args.seeds):
        _, valid, test = shuffled_split(n, seed, [0.8, 0.1, 0.1])
        v, t = int(rows[valid].sum()), int(rows[test].sum())
        best.append((abs(v - THEIR_LASTFM["valid"]) + abs(t - THEIR_LASTFM["test"]), seed, total - v - t, v, t))
        best = sorted(best)[:5]
    print(f"closest of seeds 0..{args.seeds - 1} at ratios 0.8 0.1 0.1 (|valid - 4430| + |test - 5780|, seed, "
          "train / valid / test rows):")
    for distance, seed, train, v, t in best:
        print(f"  {distance:>4}  seed {seed}: {train} / {v} / {t}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="dataset", required=True)
    b = commands.add_parser("beauty")
    b.add_argument("--authors", required=True, help="folder holding their Beauty_val.txt and Beauty_test.txt")
    b.add_argument("--inter", required=True, help="amazon-beauty.inter")
    b.add_argument("--write-assignment", default=None, help="write the assignment here (else: check the packaged one)")
    l_ = commands.add_parser("lastfm")
    l_.add_argument("--inter", required=True, help="lastfm.inter")
    l_.add_argument("--seeds", type=int, default=200000, help="seeds searched (0..N-1)")
    args = parser.parse_args()
    beauty(args) if args.dataset == "beauty" else lastfm(args)


if __name__ == "__main__":
    main()
