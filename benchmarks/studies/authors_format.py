"""Question: What do our user-split files look like in the MDCNS authors' own data format, so their released code
runs on the same users and items as ours?
Result: DATA/{NAME}_train.txt, _val.txt, _test.txt, and line counts / sha256 printed; findings: docs/authors_code.md.

Write a recbole_mdcns.user_split folder as the MDCNS authors' data files.

Their main.py reads DATA/{NAME}_train.txt, _val.txt, _test.txt: one sequence per line, space-separated
item ids, no user id; ids 1..n (0 is padding, item_size = max id + 2). Each line is scored on its last item
with the line's other items as history (input = last max_seq_length of them, all of them masked).

Our files hold one row per target (user_id, item_id, item_id_list = last --max-len items before it, and,
for held-out users cut to --max-len, NAME.history with the earlier items). Each user's rows chain (each row
is the previous row plus its target), so every row is rebuilt into its whole prefix + target and written
as one line:
  train: every prefix of length >= 2 of each training user (what their data/dp.ipynb writes);
  val/test: one line per held-out row (--heldout prefixes: every prefix; --heldout last: whole sequences).
Item ids: by first appearance over the train, val, test lines; or, with --their-ids DIR, the authors' own
ids learnt from DIR/{NAME}_val.txt and _test.txt (Beauty), other items taking the unused ids in order.

  python -m benchmarks.studies.authors_format --split SPLIT_FOLDER --out DATA --name LastFM
"""
import argparse
import hashlib
import os
from collections import OrderedDict


def read_inter(path):
    with open(path, encoding="utf-8") as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        rows = [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f if line.strip()]
    return rows


def read_history(path):
    hist = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            f.readline()
            for line in f:
                user, items = line.rstrip("\n").split("\t")
                hist[user] = items.split()
    return hist


def rebuild(rows, hist):
    """One list of tokens per row: the row's whole prefix plus its target, checked against the chain."""
    seqs, out = {}, []
    max_len = max(len(r["item_id_list"].split()) for r in rows)
    for r in rows:
        user, target, lst = r["user_id"], r["item_id"], r["item_id_list"].split()
        if user not in seqs:
            seqs[user] = hist.get(user, []) + lst
        seq = seqs[user]
        if lst != seq[-len(lst):] or len(lst) != min(len(seq), max_len):
            raise SystemExit(f"user {user}: row does not chain (item_id_list {lst[:5]}...)")
        seq.append(target)
        out.append(list(seq))
    return out


def sha(lines):
    return hashlib.sha256("".join(l + "\n" for l in lines).encode()).hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", required=True, help="folder written by recbole_mdcns.user_split (OUT/NAME)")
    p.add_argument("--out", required=True, help="their data folder (main.py's --data_dir)")
    p.add_argument("--name", required=True, help="their --data_name, e.g. LastFM or Beauty")
    p.add_argument("--their-ids", default=None, help="folder with their {NAME}_val.txt/_test.txt: use their item ids")
    a = p.parse_args()
    base = os.path.join(a.split, os.path.basename(os.path.normpath(a.split)))
    hist = read_history(base + ".history")
    parts = OrderedDict((part, rebuild(read_inter(f"{base}.{part}.inter"), hist))
                        for part in ("train", "valid", "test"))

    ids = {}
    if a.their_ids:
        for part, suffix in (("valid", "val"), ("test", "test")):
            theirs = [l.split() for l in open(os.path.join(a.their_ids, f"{a.name}_{suffix}.txt"))]
            ours = parts[part]
            if len(theirs) != len(ours):
                raise SystemExit(f"{suffix}: {len(theirs)} lines in theirs, {len(ours)} in ours")
            for t_line, o_line in zip(theirs, ours):
                if len(t_line) != len(o_line):
                    raise SystemExit(f"{suffix}: line lengths differ")
                for tok, their in zip(o_line, t_line):
                    if ids.setdefault(tok, int(their)) != int(their):
                        raise SystemExit(f"item {tok}: two ids in their files")
        if len(set(ids.values())) != len(ids):
            raise SystemExit("their ids are not a bijection of ours")
    free = iter(i for i in range(1, 10 ** 9) if i not in set(ids.values()))
    for lines in parts.values():
        for line in lines:
            for tok in line:
                if tok not in ids:
                    ids[tok] = next(free)

    os.makedirs(a.out, exist_ok=True)
    suffixes = {"train": "train", "valid": "val", "test": "test"}
    for part, lines in parts.items():
        text = [" ".join(str(ids[t]) for t in line) for line in lines]
        path = os.path.join(a.out, f"{a.name}_{suffixes[part]}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(l + "\n" for l in text))
        note = ""
        if a.their_ids and part != "train":
            theirs = [l.rstrip("\n") for l in open(os.path.join(a.their_ids, f"{a.name}_{suffixes[part]}.txt"))]
            same = sum(x == y for x, y in zip(text, theirs))
            note = f"; {same} of {len(theirs)} lines equal theirs, sha256 {'identical' if sha(text) == sha(theirs) else 'differs'}"
        print(f"{path}: {len(text)} lines, {sum(len(l) for l in lines)} item ids, sha256 {sha(text)[:12]}{note}")
    print(f"items {len(ids)}, max id {max(ids.values())}, their item_size = {max(ids.values()) + 2}")


if __name__ == "__main__":
    main()
