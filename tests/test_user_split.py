"""``python -m recbole_mdcns.user_split``: the files hold what the authors' protocol needs, RecBole loads them
as written (the traps: alias, load_col, eval order, no augmentation), ``train_positions: all`` trains them,
bad input writes nothing, and models with user embeddings are warned about."""
from __future__ import annotations

import collections
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_config, write_dataset
from recbole.data import create_dataset

import recbole_mdcns  # noqa: F401 -- installs the compat shims
from recbole_mdcns.config import create_config
from recbole_mdcns.quick_start import load_data, run_recbole
from recbole_mdcns.user_split import ASSIGNMENT_FOLDER, main, read_inter, split_sizes
from test_history_mask import _raw_sequences

L = 4  # --max-len: shorter than most tiny sequences (6-14 items), so rows and held-out prefixes are cut


def _split(tiny_data: Path, out: Path, name: str = "us", *flags: str):
    return main(["--inter", str(tiny_data / "tiny" / "tiny.inter"), "--out", str(out), "--name", name,
                 "--max-len", str(L), *flags])


def _read(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    names = [h.split(":")[0] for h in lines[0].split("\t")]
    return [dict(zip(names, line.split("\t"))) for line in lines[1:]]


def _rows_by_user(path: Path) -> dict[str, list[dict]]:
    rows = collections.defaultdict(list)
    for row in _read(path):
        rows[row["user_id"]].append(row)
    return rows


@pytest.mark.parametrize("heldout", ["last", "prefixes"])
def test_files_hold_every_training_prefix_and_the_heldout_rows(tiny_data, tmp_path, heldout, capsys):
    raw = _raw_sequences(tiny_data / "tiny" / "tiny.inter")
    written = _split(tiny_data, tmp_path, "us", "--heldout", heldout, "--seed", "7")
    folder = tmp_path / "us"
    parts = {part: _rows_by_user(folder / f"us.{part}.inter") for part in ("train", "valid", "test")}
    assert [len(parts[p]) for p in parts] == list(split_sizes(40, [0.7, 0.2, 0.1])) == [28, 8, 4]
    assert set().union(*parts.values()) == set(raw) and sum(map(len, parts.values())) == 40  # disjoint users
    history = {row["history_user_id"]: row["history_item_id_list"].split() for row in _read(folder / "us.history")} \
        if heldout == "last" else {}
    for part, users in parts.items():
        for user, rows in users.items():
            items = raw[user]
            positions = range(1, len(items)) if part == "train" or heldout == "prefixes" else [len(items) - 1]
            assert [row["item_id"] for row in rows] == [items[p] for p in positions]  # each row: previous + target
            assert [row["item_id_list"].split() for row in rows] == [items[max(0, p - L):p] for p in positions]
            assert [row["timestamp"] for row in rows] == [str(p) for p in positions]  # the target's time
            cut = positions[0] > L
            assert history.get(user) == (items[:positions[0] - L] if cut else None)
    if heldout == "last":
        assert len(history) == written.history_rows > 0
    else:  # every held-out row's first prefix is one item: nothing is cut
        assert written.history_rows == 0 and not (folder / "us.history").exists()
    assert written.rows == {part: sum(map(len, parts[part].values())) for part in parts}
    printed = capsys.readouterr().out
    assert (folder / "us.yaml").read_text() in printed and "us.train.inter" in printed

    _split(tiny_data, tmp_path / "again", "us", "--heldout", heldout, "--seed", "7")
    _split(tiny_data, tmp_path / "other", "us", "--heldout", heldout, "--seed", "8")
    for part in ("train", "valid", "test"):
        assert (tmp_path / "again" / "us" / f"us.{part}.inter").read_text() == (folder / f"us.{part}.inter").read_text()
    assert set(_rows_by_user(tmp_path / "other" / "us" / "us.test.inter")) != set(parts["test"])


@pytest.fixture(scope="module")
def split_data(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split")
    _split(tiny_data, out, "us")
    return out


def _settings(out: Path, **overrides) -> dict:
    settings = {**yaml.safe_load((out / "us" / "us.yaml").read_text()), "hidden_size": 16, "n_layers": 1,
                "n_heads": 1, "inner_size": 32}
    return {**tiny_config(out, out), **settings, **overrides}


def test_recbole_loads_the_files_as_written(split_data, in_tmp):
    """With the YAML: no augmentation (RecBole's rows are the files' rows), item_id_list in item_id's ids
    and the last L items, eval order TO accepted, every user and item known."""
    config = create_config("SASRec", "us", config_dict=_settings(split_data, neg_sampler="dns", candidate_num=5))
    dataset = create_dataset(config)
    train, valid, test = dataset.build()
    for data, part in ((train, "train"), (valid, "valid"), (test, "test")):
        rows = _read(split_data / "us" / f"us.{part}.inter")
        inter = data.inter_feat
        assert len(inter) == len(rows)
        assert list(dataset.id2token("item_id", inter["item_id"].numpy())) == [row["item_id"] for row in rows]
        sequences = [list(dataset.id2token("item_id", seq[:n].numpy()))
                     for seq, n in zip(inter["item_id_list"], inter["item_length"])]
        assert sequences == [row["item_id_list"].split() for row in rows]
    assert dataset.user_num == 41 and dataset.item_num == 61  # tiny's 40 users and 60 items, plus padding


def test_recbole_traps_are_errors_naming_the_key(split_data, in_tmp):
    """Without alias_of_item_id RecBole gives item_id_list its own ids; without item_id_list in load_col it has
    no sequences; without eval order TO RecBole refuses a sequential dataset (its own error)."""
    settings = _settings(split_data, neg_sampler="dns", candidate_num=5)
    no_alias = create_config("SASRec", "us", config_dict={**settings, "alias_of_item_id": ["history_item_id_list"]})
    with pytest.raises(ValueError, match="alias_of_item_id must list item_id_list: RecBole gave item_id_list ids of "
                                         "its own"):
        load_data(no_alias)
    no_list = {**settings, "load_col": {**settings["load_col"], "inter": ["user_id", "item_id", "timestamp"]}}
    with pytest.raises(ValueError, match=r"load_col: with benchmark_filename .* must include it"):
        create_config("SASRec", "us", config_dict=no_list)
    with pytest.raises(ValueError, match="ordering args for sequential recommendation has to be 'TO'"):
        load_data(create_config("SASRec", "us", config_dict={**settings, "eval_args": {"mode": "full"}}))


def test_train_positions_all_trains_every_row_of_the_files(split_data, in_tmp):
    settings = _settings(split_data, neg_sampler="uniform", train_positions="all", eval_mask_history=False)
    result = run_recbole("SASRec", "us", config_dict=settings, saved=False)
    train_rows = len(_read(split_data / "us" / "us.train.inter"))
    assert result["train_info"]["train_positions"] == "all"
    assert result["train_info"]["targets_per_epoch"] == train_rows  # each row's target once per epoch


def test_models_with_user_embeddings_are_warned_about_on_unseen_users(split_data, tiny_data, in_tmp, caplog):
    caplog.set_level(logging.WARNING)
    for model in ("Caser", "SASRec"):
        load_data(create_config(model, "us", config_dict=_settings(split_data, neg_sampler="dns", candidate_num=5)))
    warned = [r.getMessage() for r in caplog.records if "user embedding" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("Caser scores with a learned user embedding, but 12 of the 12 "
                                                     "validation / test users have no training row")
    caplog.clear()
    load_data(create_config("Caser", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns",
                                                                       candidate_num=5)))
    assert not [r for r in caplog.records if "user embedding" in r.getMessage()]  # leave-one-out: all trained


def test_assignment_fixes_the_users_and_the_order_of_heldout_rows(tiny_data, tmp_path):
    (tmp_path / "a.txt").write_text("# held-out users, rows in this order\nu7 test\nu3 valid\nu31 valid\nu2 test\n")
    _split(tiny_data, tmp_path, "us", "--assignment", str(tmp_path / "a.txt"), "--heldout", "last")
    folder = tmp_path / "us"
    assert [r["user_id"] for r in _read(folder / "us.valid.inter")] == ["u3", "u31"]
    assert [r["user_id"] for r in _read(folder / "us.test.inter")] == ["u7", "u2"]
    trained = list(dict.fromkeys(r["user_id"] for r in _read(folder / "us.train.inter")))
    assert trained == [f"u{i}" for i in range(1, 41) if i not in (2, 3, 7, 31)]  # file order


def test_packaged_beauty_assignment_is_the_authors_split_sizes():
    """The MDCNS authors' Beauty split (benchmarks/studies/authors_split.md): 4,472 validation and 2,237 test
    users of amazon-beauty's 22,363, each once."""
    lines = [line.split() for line in (ASSIGNMENT_FOLDER / "amazon-beauty-mdcns.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    users = [user for user, _ in lines]
    assert collections.Counter(split for _, split in lines) == {"valid": 4472, "test": 2237}
    assert len(set(users)) == len(users) and all(1 <= int(u) <= 22363 for u in users)


def _nothing_written(folder: Path, before: dict) -> bool:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("flags, message", [
    (["--ratios", "0.7", "0.2", "0.2"], r"--ratios must be 3 positive shares summing to 1 .* \(sum 1.1\)"),
    (["--ratios", "0.8", "0.2"], r"--ratios takes 3 shares \(train valid test\), got 2"),
    (["--ratios", "0.98", "0.01", "0.01"], r"leave a split of 40 users empty"),
    (["--max-len", "0"], "--max-len must be a positive integer, got 0"),
    (["--user-field", "uid"], r"has no column 'uid' \(its columns: \['user_id', 'item_id', 'rating', 'timestamp'\]\)"),
    (["--time-field", "when"], r"no column 'when' .*\(or --time-field none to keep each user's file order\)"),
    (["--assignment", "nope"], r"--assignment 'nope' is neither a file nor a packaged assignment \(one of "
                               r"\['amazon-beauty-mdcns'\]\)"),
    (["--assignment", "amazon-beauty-mdcns", "--seed", "1"], "--assignment fixes each split's users: drop --seed"),
])
def test_bad_input_is_an_error_and_writes_nothing(tiny_data, tmp_path, capsys, flags, message):
    (tmp_path / "mine.txt").write_text("saved by the user")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        _split(tiny_data, tmp_path, "us", *flags)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert _nothing_written(tmp_path, before) and sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_single_item_user_and_bad_assignment_are_errors(tmp_path, capsys):
    data = write_dataset(tmp_path / "d", n_users=6)
    inter = data / "tiny" / "tiny.inter"
    cases = {
        "u1 valid\nu1 test\n": "user 'u1' is assigned twice",
        "u1 valid\nu99 test\n": "user 'u99' is not in the .inter file",
        "u1 valid\nu2 holdout\n": "expected 'USER valid' or 'USER test', got 'u2 holdout'",
        "u1 valid\n": "assigns no test user",
    }
    for text, message in cases.items():
        (tmp_path / "a.txt").write_text(text)
        with pytest.raises(SystemExit):
            main(["--inter", str(inter), "--out", str(tmp_path / "out"), "--name", "x", "--assignment",
                  str(tmp_path / "a.txt")])
        assert message in capsys.readouterr().err
    inter.write_text(inter.read_text() + "lonely\ti1\t5\t0\n")
    with pytest.raises(SystemExit):
        main(["--inter", str(inter), "--out", str(tmp_path / "out"), "--name", "x"])
    assert "1 users have a single item (e.g. ['lonely'])" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_is_never_written_to(tiny_data, tmp_path, capsys):
    _split(tiny_data, tmp_path, "us")
    saved = {p: p.read_bytes() for p in (tmp_path / "us").iterdir()}
    with pytest.raises(SystemExit):
        _split(tiny_data, tmp_path, "us", "--seed", "9")
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "us").iterdir()} == saved
    (tmp_path / "empty").mkdir()
    assert _split(tiny_data, tmp_path, "empty").rows["test"] == 4  # an empty folder is fine


def test_sequences_follow_time_not_file_order(tmp_path):
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\na\t3\t20\na\t1\t5\nb\t2\t1\na\t2\t5\nb\t1\t0\n")
    seq = read_inter(inter)
    assert list(seq.users) == ["a", "b"]
    assert [list(seq.items[seq.of(u)]) for u in range(2)] == [["1", "2", "3"], ["1", "2"]]  # ties: file order
    assert list(read_inter(inter, time_field=None).items[:3]) == ["3", "1", "2"]
    assert np.array_equal(seq.length, [3, 2])


def test_a_feature_model_trains_on_the_split_and_its_checkpoint_reloads(split_data, tiny_data, in_tmp):
    """The item features beside the .inter are copied as ``us.item``; SASRecF reads them, and its checkpoint --
    which holds the dataset, whose ``field2seqlen`` RecBole makes a defaultdict for benchmark files -- loads back
    through this package's checkpoint loader."""
    import recbole.quick_start

    assert (split_data / "us" / "us.item").read_text() == (tiny_data / "tiny" / "tiny.item").read_text()
    settings = _settings(split_data, neg_sampler="uniform", selected_features=["categories"], epochs=1,
                         load_col={**yaml.safe_load((split_data / "us" / "us.yaml").read_text())["load_col"],
                                   "item": ["item_id", "categories"]}, checkpoint_dir=str(in_tmp / "saved"))
    result = run_recbole("SASRecF", "us", config_dict=settings)
    (checkpoint,) = (in_tmp / "saved").glob("SASRecF-*.pth")
    _, _, _, _, _, test_data = recbole.quick_start.load_data_and_model(str(checkpoint))
    assert len(test_data.dataset) == len(_read(split_data / "us" / "us.test.inter"))
    assert result["test_result"]["ndcg@10"] >= 0
