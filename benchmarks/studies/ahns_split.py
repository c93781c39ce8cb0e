"""Data preparation: the AHNS authors' ML-1M split as RecBole benchmark files, with a seeded validation set.

Not a question but the input of ``grids/general_ml1m.yaml``. The AHNS code (Riwei-HEU/AHNS, AAAI'24) ships
ML-1M split at random 80/20 by interaction as ``data/ml/train.txt`` and ``data/ml/test.txt``, one user a line:
``user item item ...`` (0-based ids). This writes ``<out>/<name>/<name>.{train,valid,test}.inter`` for RecBole's
``benchmark_filename: [train, valid, test]``: the test as given, and a validation set carved out of each user's
training items (a seeded ``--valid-ratio`` of them, rounded, at least one item left to train on), so that settings
are chosen on validation and never on the test. The rest of train.txt is the training set (the authors train on
all of it and have no validation set).

    # the authors' files are not committed here; fetch them (about 6 MB):
    git clone --depth 1 https://github.com/Riwei-HEU/AHNS /tmp/AHNS
    python -m benchmarks.studies.ahns_split --source /tmp/AHNS/data/ml --out ../shared/datasets --name ml-1m-ahns
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

HEADER = "user_id:token\titem_id:token\n"


def read_lines(path: Path) -> dict[str, list[str]]:
    """``{user: [items]}`` of an AHNS ``train.txt`` / ``test.txt`` (``user item item ...`` per line; a user
    without items is skipped), items in file order."""
    users: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if not all(field.isdigit() for field in fields):
            raise ValueError(f"{path}:{number}: expected 'user item item ...' of integer ids, got {line[:80]!r}")
        users.setdefault(fields[0], []).extend(fields[1:])
    return users


def carve_validation(train: dict[str, list[str]], ratio: float, seed: int) -> tuple[dict, dict]:
    """``(train, valid)``: per user ``round(ratio * n)`` of its ``n`` training items drawn without replacement
    (seeded, users in sorted order) as validation, at most ``n - 1``; the rest stays in training, in order."""
    if not 0 <= ratio < 1:
        raise ValueError(f"--valid-ratio must be in [0, 1), got {ratio}")
    rng = random.Random(seed)
    kept, valid = {}, {}
    for user in sorted(train, key=int):
        items = train[user]
        n_valid = min(int(round(ratio * len(items))), len(items) - 1)
        held = set(rng.sample(range(len(items)), n_valid))
        kept[user] = [item for i, item in enumerate(items) if i not in held]
        valid[user] = [item for i, item in enumerate(items) if i in held]
    return kept, valid


def write_inter(path: Path, users: dict[str, list[str]]) -> int:
    """One ``user<TAB>item`` line per interaction, under RecBole's atomic header; returns the lines."""
    rows = [f"{user}\t{item}\n" for user, items in users.items() for item in items]
    path.write_text(HEADER + "".join(rows))
    return len(rows)


def convert(source: Path, out: Path, name: str, ratio: float = 0.1, seed: int = 2020) -> dict[str, int]:
    """Write the three benchmark files of ``source``'s ``train.txt`` / ``test.txt``; returns their line counts."""
    files = {split: source / f"{split}.txt" for split in ("train", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--source must hold train.txt and test.txt (the AHNS data/ml folder); missing "
                                f"{missing}")
    train, valid = carve_validation(read_lines(files["train"]), ratio, seed)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    return {split: write_inter(folder / f"{name}.{split}.inter", users)
            for split, users in (("train", train), ("valid", valid), ("test", read_lines(files["test"])))}


def main(argv=None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="folder holding the authors' train.txt and test.txt")
    parser.add_argument("--out", required=True, help="RecBole data_path: the files go to <out>/<name>/")
    parser.add_argument("--name", default="ml-1m-ahns", help="dataset name (default ml-1m-ahns)")
    parser.add_argument("--valid-ratio", type=float, default=0.1, help="share of each user's train items held out")
    parser.add_argument("--seed", type=int, default=2020)
    args = parser.parse_args(argv)
    counts = convert(Path(args.source), Path(args.out), args.name, args.valid_ratio, args.seed)
    print(f"wrote {Path(args.out) / args.name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


if __name__ == "__main__":
    main()
