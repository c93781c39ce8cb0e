"""``python -m recbole_mdcns.user_split``: a split of USERS, the MDCNS authors' protocol, as RecBole
benchmark files.

The authors shuffle the users, keep 70 / 20 / 10 % of them for training / validation / test (validation
and test users are never trained on) and score a held-out user's last item from its history. RecBole
splits each user's sequence leave-one-out instead. This command writes, from any atomic ``.inter`` with
user, item and (optionally) time columns, the three files RecBole loads with
``benchmark_filename: [train, valid, test]``, plus the RecBole configuration that loads them right:

* ``NAME.train.inter`` -- every prefix of every training user: one row per target from the user's
  2nd item on, so each row is the previous row plus its target (what ``train_positions: all``
  rebuilds sequences from); RecBole does not augment benchmark files itself;
* ``NAME.valid.inter`` / ``NAME.test.inter`` -- per held-out user its last item (``--heldout last``,
  the authors' Beauty files) or every prefix (``--heldout prefixes``, the authors' LastFM files);
* each row: ``user_id``, ``item_id`` (the target), ``item_id_list`` (the LAST ``--max-len`` items
  before it: RecBole's ``seq_len`` option would keep the first ones) and ``timestamp``;
* ``NAME.history`` -- only when a held-out user's first row had to be cut to ``--max-len``: the
  items before its ``item_id_list``, so that ``eval_mask_history`` masks the whole prefix;
* ``NAME.yaml`` -- ``benchmark_filename``, ``load_col`` (which must keep ``item_id_list``),
  ``alias_of_item_id`` (else ``item_id_list`` gets an id space of its own), eval order ``TO`` (RecBole's
  sequential datasets require it), ``MAX_ITEM_LIST_LENGTH`` and ``eval_mask_history: true``;
* ``NAME.item`` (``.user``, ``.kg``, ...) -- a copy of each atomic file beside ``--inter`` with its name,
  for models that read features (add the file's suffix to ``load_col`` to load it).

Users are shuffled by ``--seed`` and cut by ``--ratios`` as the authors cut them (``int(n * r)`` training
and validation users, the rest test), or taken from ``--assignment`` (a file, or the name of a packaged
one, e.g. ``amazon-beauty-mdcns``: the authors' own Beauty split). Nothing is written unless every check
passes, and an output folder that already holds files is never written to.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from recbole_mdcns.benchmark_files import (
    HISTORY_ITEMS,
    HISTORY_SUFFIX,
    HISTORY_USER,
    ITEM,
    ITEM_LIST,
    SPLITS,
    TIME,
    USER,
)

HELDOUT = ("last", "prefixes")
SIDE_SUFFIXES = ("item", "user", "kg", "link", "ent", "rel")  # atomic files beside the .inter, copied as they are
ASSIGNMENT_FOLDER = Path(__file__).resolve().parent / "splits"


@dataclass
class Sequences:
    """Every user's items in time order: user ``u`` (in order of first appearance in the file) holds
    ``items[offset[u] : offset[u] + length[u]]``; tokens are kept as the file spells them."""

    users: np.ndarray   # [U] user tokens
    offset: np.ndarray  # [U]
    length: np.ndarray  # [U]
    items: np.ndarray   # [N] item tokens
    times: np.ndarray | None  # [N] time values as written, or None without a time column

    def of(self, u: int) -> slice:
        """The positions of user ``u``'s items in :attr:`items`."""
        return slice(int(self.offset[u]), int(self.offset[u] + self.length[u]))


def read_inter(path: str | os.PathLike, user_field: str = USER, item_field: str = ITEM,
               time_field: str | None = TIME) -> Sequences:
    """The users' sequences of an atomic ``.inter`` file (tab-separated, ``name:type`` header), ordered by
    ``time_field`` (ties and ``time_field=None``: file order). ``ValueError`` naming a missing column, a
    non-numeric time, an item token with a space (RecBole's token_seq separator) or a user with one item."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    names = [column.split(":")[0] for column in header]
    for field, flag in ((user_field, "--user-field"), (item_field, "--item-field"), (time_field, "--time-field")):
        if field is not None and field not in names:
            hint = " (or --time-field none to keep each user's file order)" if flag == "--time-field" else ""
            raise ValueError(f"{path} has no column {field!r} (its columns: {names}); name the column with {flag}{hint}")
    wanted = [f for f in (user_field, item_field, time_field) if f is not None]
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3,
                        usecols=[header[names.index(f)] for f in wanted])
    frame.columns = wanted
    if frame[item_field].str.contains(r"\s").any():
        raise ValueError(f"{path}: item tokens must not contain spaces (RecBole separates token_seq items by one)")
    codes, users = pd.factorize(frame[user_field])
    if time_field is not None:
        times = pd.to_numeric(frame[time_field], errors="coerce")
        if times.isna().any():
            bad = frame[time_field][times.isna()].iloc[0]
            raise ValueError(f"{path}: column {time_field!r} must be numeric, got {bad!r}")
        order = np.lexsort((times.to_numpy(), codes))  # stable: ties keep the file's order
    else:
        order = np.argsort(codes, kind="stable")
    length = np.bincount(codes, minlength=len(users))
    short = np.flatnonzero(length < 2)
    if len(short):
        raise ValueError(f"{path}: {len(short)} users have a single item (e.g. {list(users[short[:5]])}); every user "
                         "needs at least 2 (a history and a target): filter them out first")
    return Sequences(np.asarray(users, dtype=object), np.cumsum(length) - length, length,
                     frame[item_field].to_numpy()[order],
                     None if time_field is None else frame[time_field].to_numpy()[order])


def check_ratios(ratios: list[float], n_users: int) -> None:
    """``ValueError`` unless ``ratios`` are 3 positive shares summing to 1 that leave every split a user."""
    if len(ratios) != 3:
        raise ValueError(f"--ratios takes 3 shares (train valid test), got {len(ratios)}: {ratios}")
    if any(r <= 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ValueError(f"--ratios must be 3 positive shares summing to 1 (e.g. 0.7 0.2 0.1), got {ratios} "
                         f"(sum {sum(ratios):g})")
    counts = split_sizes(n_users, ratios)
    if min(counts) == 0:
        raise ValueError(f"--ratios {ratios} leave a split of {n_users} users empty (sizes {counts})")


def split_sizes(n_users: int, ratios: list[float]) -> tuple[int, int, int]:
    """Users per split as the authors count them: ``int(n * train)``, ``int(n * valid)``, the rest test."""
    train, valid = int(n_users * ratios[0]), int(n_users * ratios[1])
    return train, valid, n_users - train - valid


def shuffled_split(n_users: int, seed: int, ratios: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the training, validation and test users: ``numpy.random.default_rng(seed)``'s permutation
    of the users (in order of first appearance), cut by :func:`split_sizes`."""
    order = np.random.default_rng(seed).permutation(n_users)
    train, valid, _ = split_sizes(n_users, ratios)
    return order[:train], order[train:train + valid], order[train + valid:]


def assignment_path(name: str) -> Path:
    """``name`` if it is a file, else the packaged assignment of that name (``recbole_mdcns/splits/NAME.txt``);
    ``ValueError`` naming the packaged ones otherwise."""
    if os.path.isfile(name):
        return Path(name)
    packaged = ASSIGNMENT_FOLDER / f"{name}.txt"
    if packaged.is_file():
        return packaged
    names = sorted(p.stem for p in ASSIGNMENT_FOLDER.glob("*.txt"))
    raise ValueError(f"--assignment {name!r} is neither a file nor a packaged assignment (one of {names})")


def read_assignment(path: Path, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the training, validation and test users of an assignment file: one ``USER valid|test`` a
    line (``#`` comments), held-out rows written in the file's order; every other user trains."""
    index = {token: i for i, token in enumerate(users)}
    held: dict[str, list[int]] = {"valid": [], "test": []}
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in held:
                raise ValueError(f"{path}:{number}: expected 'USER valid' or 'USER test', got {line.strip()!r}")
            user, split = fields
            if user not in index:
                raise ValueError(f"{path}:{number}: user {user!r} is not in the .inter file")
            if user in seen:
                raise ValueError(f"{path}:{number}: user {user!r} is assigned twice")
            seen.add(user)
            held[split].append(index[user])
    if not held["valid"] or not held["test"]:
        raise ValueError(f"{path} assigns no {'valid' if not held['valid'] else 'test'} user")
    valid, test = np.array(held["valid"]), np.array(held["test"])
    train = np.setdiff1d(np.arange(len(users)), np.concatenate([valid, test]))
    if not len(train):
        raise ValueError(f"{path} leaves no training user")
    return train, valid, test


@dataclass
class Written:
    """What :func:`write_split` wrote: the folder, each split's users and rows, the history rows."""

    folder: Path
    users: dict[str, int]
    rows: dict[str, int]
    history_rows: int


def _rows(seq: Sequences, users: np.ndarray, max_len: int, every_prefix: bool) -> tuple[list[str], list[str]]:
    """The ``.inter`` lines of ``users`` (every prefix, or the last target only) and the history lines of those
    whose first row's sequence is cut to ``max_len``."""
    lines, history = [], []
    for u in users:
        items = seq.items[seq.of(u)]
        times = None if seq.times is None else seq.times[seq.of(u)]
        first = 1 if every_prefix else len(items) - 1
        if first > max_len:
            history.append(f"{seq.users[u]}\t{' '.join(items[:first - max_len])}")
        for p in range(first, len(items)):
            row = [seq.users[u], items[p], " ".join(items[max(0, p - max_len):p])]
            lines.append("\t".join(row if times is None else row + [times[p]]))
    return lines, history


def side_files(inter: str | os.PathLike) -> dict[str, Path]:
    """The atomic files beside ``inter`` that share its name (``NAME.item``, ``NAME.user``, a knowledge
    graph's ``.kg`` / ``.link`` / ``.ent`` / ``.rel``), by suffix: features some models need (FDSA, SASRecF,
    GRU4RecF read item features), copied unchanged next to the split's files."""
    inter = Path(inter)
    found = {suffix: inter.with_suffix(f".{suffix}") for suffix in SIDE_SUFFIXES}
    return {suffix: path for suffix, path in found.items() if path.is_file()}


def write_split(seq: Sequences, split: tuple[np.ndarray, np.ndarray, np.ndarray], out: str | os.PathLike,
                name: str, heldout: str, max_len: int, command: str = "",
                side: dict[str, Path] | None = None) -> Written:
    """Write ``out/name/``: the three benchmark files, ``name.history`` where needed, ``name.yaml`` (see the
    module docstring) and a copy of each ``side`` file as ``name.<suffix>``. The files appear only once
    all are written; ``ValueError`` (nothing written) for a bad ``heldout`` / ``max_len`` or an ``out/name``
    that already holds files."""
    if heldout not in HELDOUT:
        raise ValueError(f"--heldout must be one of {list(HELDOUT)}, got {heldout!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"--max-len must be a positive integer, got {max_len!r}")
    folder = Path(out) / name
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{folder} already exists and is not an empty folder; choose another --out or --name "
                         "(files already there are never overwritten)")
    header = [f"{USER}:token", f"{ITEM}:token", f"{ITEM_LIST}:token_seq"] + ([] if seq.times is None else [f"{TIME}:float"])
    contents, rows, history = {}, {}, []
    for part, users in zip(SPLITS, split):
        lines, cut = _rows(seq, users, max_len, every_prefix=part == "train" or heldout == "prefixes")
        contents[f"{name}.{part}.inter"] = "\t".join(header) + "\n" + "".join(line + "\n" for line in lines)
        rows[part] = len(lines)
        history += cut
    config = benchmark_config(Path(out).resolve(), max_len, bool(history), seq.times is not None)
    if history:
        contents[f"{name}.{HISTORY_SUFFIX}"] = (f"{HISTORY_USER}:token\t{HISTORY_ITEMS}:token_seq\n"
                                                + "".join(line + "\n" for line in history))
    contents[f"{name}.yaml"] = config_yaml(config, name, folder.resolve(), command)
    Path(out).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    try:
        for file, text in contents.items():
            (staging / file).write_text(text, encoding="utf-8")
        for suffix, source in (side or {}).items():
            shutil.copyfile(source, staging / f"{name}.{suffix}")
        if folder.exists():
            folder.rmdir()  # empty (checked above)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Written(folder, {part: len(users) for part, users in zip(SPLITS, split)}, rows, len(history))


def benchmark_config(data_path: Path, max_len: int, history: bool, timed: bool) -> dict:
    """The RecBole settings that load the files :func:`write_split` writes (see :func:`config_yaml`)."""
    load_col = {"inter": [USER, ITEM, ITEM_LIST] + ([TIME] if timed else [])}
    extra: dict = {}
    if history:
        load_col[HISTORY_SUFFIX] = [HISTORY_USER, HISTORY_ITEMS]
        extra = {"additional_feat_suffix": [HISTORY_SUFFIX], "alias_of_user_id": [HISTORY_USER]}
    return {
        "data_path": str(data_path),
        "benchmark_filename": list(SPLITS),
        "load_col": load_col,
        **extra,
        "alias_of_item_id": [ITEM_LIST] + ([HISTORY_ITEMS] if history else []),
        "MAX_ITEM_LIST_LENGTH": max_len,
        "eval_args": {"order": "TO", "mode": "full"},
        "eval_mask_history": True,
    }


_COMMENTS = {
    "data_path": "the folder that holds this dataset's folder",
    "benchmark_filename": "NAME.train/valid/test.inter, used as they are: RecBole neither augments nor filters them",
    "load_col": "item_id_list must be loaded: it is each row's sequence",
    "alias_of_item_id": "one id space with item_id (without it item_id_list would get its own ids)",
    "alias_of_user_id": "NAME.history's users are the files' users",
    "additional_feat_suffix": "NAME.history: the items before a held-out row cut to MAX_ITEM_LIST_LENGTH",
    "MAX_ITEM_LIST_LENGTH": "the files hold the last this-many items before each target",
    "eval_args": "RecBole's sequential datasets need order TO; the split itself is the files'",
    "eval_mask_history": "the authors' ranking: every item before the target scores -inf (false: RecBole's)",
}


def config_yaml(config: dict, name: str, folder: Path, command: str = "") -> str:
    """``config`` as a commented YAML file, headed by how it was made and how to run it."""
    lines = [f"# RecBole settings for the user-split benchmark files in {folder}",
             *([f"# written by: {command}"] if command else []),
             f"# run: python -m recbole_mdcns --model=SASRec --dataset={name} --config_files={folder / (name + '.yaml')}",
             "#      (add --neg_sampler=NAME for a sampler; docs/authors_protocol.md)"]
    for key, value in config.items():
        dumped = yaml.safe_dump({key: value}, default_flow_style=True, width=1000, sort_keys=False).strip()[1:-1]
        lines.append(f"{dumped}    # {_COMMENTS[key]}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Written:
    """The command line: parse, check, write, print what was written and the YAML to use."""
    parser = argparse.ArgumentParser(prog="python -m recbole_mdcns.user_split", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inter", required=True, help="atomic .inter file (tab-separated, name:type header)")
    parser.add_argument("--out", required=True, help="data folder: the files go to OUT/NAME/ (RecBole's data_path)")
    parser.add_argument("--name", required=True, help="dataset name: OUT/NAME/NAME.train.inter, ...")
    parser.add_argument("--seed", type=int, default=None, help="seed of the users' shuffle (default 2020)")
    parser.add_argument("--ratios", type=float, nargs="+", default=None,
                        help="train valid test shares of the users (default 0.7 0.2 0.1)")
    parser.add_argument("--assignment", default=None,
                        help="file of 'USER valid|test' lines (or a packaged name, e.g. amazon-beauty-mdcns) in place "
                             "of --seed / --ratios")
    parser.add_argument("--heldout", choices=HELDOUT, default="last",
                        help="held-out rows: each user's last item, or every prefix (default last)")
    parser.add_argument("--max-len", type=int, default=50, help="items kept before each target (default 50)")
    parser.add_argument("--user-field", default=USER)
    parser.add_argument("--item-field", default=ITEM)
    parser.add_argument("--time-field", default=TIME, help="time column, or 'none' for each user's file order")
    args = parser.parse_args(argv)
    time_field = None if args.time_field.lower() == "none" else args.time_field
    try:
        if args.assignment and (args.seed is not None or args.ratios is not None):
            raise ValueError("--assignment fixes each split's users: drop --seed and --ratios")
        if not os.path.isfile(args.inter):
            raise ValueError(f"--inter {args.inter}: no such file")
        path = assignment_path(args.assignment) if args.assignment else None
        seq = read_inter(args.inter, args.user_field, args.item_field, time_field)
        if path is not None:
            split = read_assignment(path, seq.users)
        else:
            ratios = args.ratios if args.ratios is not None else [0.7, 0.2, 0.1]
            check_ratios(ratios, len(seq.users))
            split = shuffled_split(len(seq.users), 2020 if args.seed is None else args.seed, ratios)
        command = "python -m recbole_mdcns.user_split " + " ".join(sys.argv[1:] if argv is None else argv)
        side = side_files(args.inter)
        written = write_split(seq, split, args.out, args.name, args.heldout, args.max_len, command, side)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {written.folder}:")
    for part in SPLITS:
        print(f"  {args.name}.{part}.inter  {written.users[part]:>7} users  {written.rows[part]:>8} rows")
    for suffix in side:
        print(f"  {args.name}.{suffix}  copied from beside --inter (load it by adding {suffix!r} to load_col)")
    if written.history_rows:
        print(f"  {args.name}.{HISTORY_SUFFIX}     {written.history_rows:>7} users whose held-out row is cut to "
              f"--max-len {args.max_len}: the items before it")
    print(f"\nRecBole settings ({written.folder / (args.name + '.yaml')}):\n")
    print((written.folder / f"{args.name}.yaml").read_text())
    return written


if __name__ == "__main__":
    main()
