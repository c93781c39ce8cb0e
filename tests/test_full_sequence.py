"""``train_positions: all``: which models qualify (measured), the windows' supervision equals
RecBole's rows, batches, errors, and full runs (reproducible, resumable, DDP)."""
from __future__ import annotations

import collections
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from recbole.data import create_dataset, data_preparation

import recbole_mdcns
from recbole_mdcns.config import create_config
from recbole_mdcns.data import CANDIDATES, candidate_train_loader
from recbole_mdcns.full_sequence import (
    LOSS_SCALE,
    TARGET_POSITION,
    ChainError,
    WindowBatchSampler,
    WindowCollate,
    Windows,
    check_positions,
    measure,
    user_sequences,
)
from recbole_mdcns.models import get_model
from recbole_mdcns.scoring import build_scorer
from test_models import MODEL_CONFIG, MODELS

# Measured by check_positions on the tiny dataset (a model missing here fails the test: decide it first).
QUALIFY = {"FDSA", "GRU4Rec", "GRU4RecF", "GRU4RecKG", "SASRec", "SASRecF"}


def _pieces(data_path: Path, tmp_path: Path, model: str = "SASRec", **overrides):
    config = create_config(model, "tiny", config_dict=tiny_config(data_path, tmp_path, neg_sampler="uniform",
                                                                  **overrides))
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    return config, candidate_train_loader(config, train)


def _rows(train) -> collections.Counter:
    """RecBole's training rows as (user, position of the target in the user's sequence, target)."""
    inter = train._dataset.inter_feat
    users, targets = inter["user_id"].tolist(), inter["item_id"].tolist()
    first_len, seen, rows = {}, collections.Counter(), collections.Counter()
    for user, target, length in zip(users, targets, inter["item_length"].tolist()):
        first_len.setdefault(user, length)
        rows[(user, first_len[user] + seen[user], target)] += 1
        seen[user] += 1
    return rows


def _windows(train, L: int, stride: int) -> Windows:
    inter = train._dataset.inter_feat
    seqs = user_sequences(inter["user_id"], inter["item_id"], inter["item_id_list"], inter["item_length"])
    return Windows.build(seqs, L, stride)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_one_epoch_trains_recbole_rows_exactly_once(tiny_data, in_tmp, stride):
    config, train = _pieces(tiny_data, in_tmp)
    windows = _windows(train, config["MAX_ITEM_LIST_LENGTH"], stride)
    collate = WindowCollate(windows, train)
    seen = collections.Counter()
    for batch in WindowBatchSampler(windows.targets, 50, shuffle=True, seed=3):
        rows = collate(batch)
        assert len(rows[CANDIDATES]) == len(rows["item_id"]) <= 50
        seen.update(zip(rows["user_id"].tolist(), rows[TARGET_POSITION].tolist(), rows["item_id"].tolist()))
    assert seen == _rows(train)
    assert max(seen.values()) == 1


def test_context_of_each_target(tiny_data, in_tmp):
    """A target within the first L items sees RecBole's prefix; a later one the last L - stride + 1 .. L items."""
    config, train = _pieces(tiny_data, in_tmp)
    L, stride = config["MAX_ITEM_LIST_LENGTH"], 3
    w = _windows(train, L, stride)
    j = torch.arange(L)
    target_pos = w.start.unsqueeze(1) + j + 1
    context = (j + 1).expand_as(target_pos)
    trained = w.next_item > 0
    assert torch.equal(context[trained & (target_pos <= L)], target_pos[trained & (target_pos <= L)])
    later = context[trained & (target_pos > L)]
    assert len(later) > 0 and int(later.min()) >= L - stride + 1 and int(later.max()) <= L


def test_ddp_ranks_share_every_global_batch_without_padding():
    targets = torch.tensor([5, 1, 7, 3, 8, 2, 2, 6, 4, 1, 3])
    ranks = [list(WindowBatchSampler(targets, 12, shuffle=True, seed=1, world=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])  # no rank waits for another
    windows = [w for rank in ranks for share, _ in rank for w in share]
    assert sorted(windows) == list(range(len(targets)))  # each window once, no duplicate
    for (a, total), (b, _) in zip(*ranks):
        assert a and b and int(targets[a + b].sum()) == total


def test_loss_scale_makes_the_ddp_mean_the_global_mean(tiny_data, in_tmp):
    config, train = _pieces(tiny_data, in_tmp)
    windows = _windows(train, config["MAX_ITEM_LIST_LENGTH"], 4)
    shares = [next(iter(WindowBatchSampler(windows.targets, 60, False, 0, world=2, rank=r))) for r in (0, 1)]
    batches = [WindowCollate(windows, train, world=2)(share) for share in shares]
    # mean over ranks of (rank mean * scale) == sum over all targets / all targets
    per_target = [torch.rand(len(b["item_id"])) for b in batches]
    scaled = sum(p.mean() * b[LOSS_SCALE][0] for p, b in zip(per_target, batches)) / 2
    torch.testing.assert_close(scaled, torch.cat(per_target).mean())


def test_broken_chain_is_refused():
    seq = torch.tensor([[3, 0, 0], [3, 4, 0], [9, 9, 9]])  # the last row does not continue the first two
    with pytest.raises(ChainError, match="benchmark_filename"):
        user_sequences(torch.tensor([1, 1, 1]), torch.tensor([4, 5, 6]), seq, torch.tensor([1, 2, 3]))
    ok = user_sequences(torch.tensor([1, 1, 1]), torch.tensor([4, 5, 6]),
                        torch.tensor([[3, 0], [3, 4], [4, 5]]), torch.tensor([1, 2, 2]))
    assert ok.items.tolist() == [3, 4, 5, 6]


def test_benchmark_files_without_augmentation_are_refused(tmp_path, in_tmp):
    folder = tmp_path / "bench" / "tiny"
    folder.mkdir(parents=True)
    header = "user_id:token\titem_id:token\titem_id_list:token_seq\n"
    rows = {"train": [("u1", "i3", "i1 i2"), ("u1", "i6", "i4 i5"), ("u2", "i2", "i1")],
            "valid": [("u1", "i7", "i4 i5 i6"), ("u2", "i3", "i1 i2")],
            "test": [("u1", "i8", "i5 i6 i7"), ("u2", "i4", "i1 i2 i3")]}
    for part, lines in rows.items():
        (folder / f"tiny.{part}.inter").write_text(header + "".join("\t".join(r) + "\n" for r in lines))
    config = tiny_config(tmp_path / "bench", in_tmp, neg_sampler="uniform", train_positions="all",
                         benchmark_filename=["train", "valid", "test"], alias_of_item_id=["item_id_list"],
                         load_col={"inter": ["user_id", "item_id", "item_id_list"]}, candidate_num=1)
    with pytest.raises(ChainError, match="train_positions: last"):
        recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=config)


@pytest.mark.parametrize("overrides, key", [
    ({"train_positions": "every"}, "train_positions"),
    ({"train_positions": "all", "train_window_stride": 0}, "train_window_stride"),
    ({"train_positions": "all", "transform": "mask_itemseq"}, "transform"),
])
def test_bad_settings(tiny_data, in_tmp, overrides, key):
    with pytest.raises(ValueError, match=key):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns", **overrides))


def test_recbole_sampler_refuses_all_positions(tiny_data, in_tmp):
    with pytest.raises(ValueError, match="train_positions: all needs one of this package's samplers"):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="recbole",
                                                                train_positions="all", train_neg_sample_args=None))


def test_which_models_qualify(tiny_kg_data, in_tmp, request):
    """The measured check over every model of the all-models list."""
    qualified = set()
    for name in MODELS:
        extra = dict(MODEL_CONFIG.get(name, {}))
        if name == "S3Rec":
            extra["pre_model_path"] = request.getfixturevalue("s3rec_pretrained")
        config, train = _pieces(tiny_kg_data, in_tmp, name, candidate_num=4, neg_num=4, **extra)
        model = get_model(name)(config, train._dataset)
        probe = train.probe_batch()
        items = torch.cat([probe["item_id"].unsqueeze(1), probe[CANDIDATES]], 1)
        scorer = build_scorer(model, probe, items)
        diff, _ = measure(check_positions, scorer, model, probe)
        if diff <= 1e-5:
            qualified.add(name)
    assert {"SASRec", "GRU4Rec"} <= qualified
    assert qualified == QUALIFY


# ------------------------------------------------------------------------------------------- full runs
ALL = {"train_positions": "all", "train_window_stride": 3, "epochs": 2, "train_batch_size": 40}


@pytest.mark.parametrize("sampler, extra", [("dns", {"candidate_num": 5, "neg_loss": "bce"}),
                                            ("divns", {"candidate_num": 5}),
                                            ("mdcns", {"candidate_num": 5, "mdcns_peer_config": {"hidden_size": 8}})])
def test_samplers_train_all_positions_reproducibly(tiny_data, in_tmp, caplog, sampler, extra):
    config = tiny_config(tiny_data, in_tmp, neg_sampler=sampler, state="INFO", **ALL, **extra)
    with caplog.at_level("INFO"):
        first = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=config)
    assert first["train_info"]["train_positions"] == "all"
    assert first["train_info"]["targets_per_epoch"] == first["train_info"]["negative_history"][0]["negatives"] // (
        3 if sampler == "mdcns" else 1)  # every target trained once (MDCNS: three views' negatives per target)
    assert "train_positions SASRec (self): all positions" in caplog.text
    if sampler == "mdcns":
        assert "train_positions GRU4Rec (peer): all positions" in caplog.text
    again = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=config)
    assert again["test_result"] == first["test_result"] and again["best_valid_score"] == first["best_valid_score"]


@pytest.mark.parametrize("sampler, extra", [("uniform", {"neg_num": 2, "candidate_num": 2, "neg_loss": "softmax"}),
                                            ("mixgcf", {"candidate_num": 5, "top_m": 2}),
                                            ("dens", {"candidate_num": 5}), ("ahns", {"candidate_num": 5}),
                                            ("adasir", {"candidate_num": 8, "adasir_pool_size": 6, "neg_num": 2}),
                                            ("gnno", {"gnno_start_epoch": 0}), ("srns", {"srns_warmup": 0})])
def test_baselines_train_all_positions(tiny_data, in_tmp, sampler, extra):
    config = tiny_config(tiny_data, in_tmp, neg_sampler=sampler, **{**ALL, "epochs": 1}, **extra)
    info = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=config)["train_info"]
    assert info["train_positions"] == "all"
    assert info["negative_history"][0]["negatives"] >= info["targets_per_epoch"]


def test_resume_equals_uninterrupted(tiny_data, in_tmp):
    config = tiny_config(tiny_data, in_tmp, neg_sampler="dns", candidate_num=5, **{**ALL, "epochs": 3})
    full = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=config)
    first = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict={**config, "epochs": 2})
    last = max(glob.glob(str(in_tmp / "saved" / "*-lightning" / "last.ckpt")), key=os.path.getmtime)
    resumed = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict={**config, "resume_from": last})
    assert first["train_info"]["epochs"] == 2
    assert resumed["test_result"] == full["test_result"]


def test_non_causal_model_falls_back_to_prefix_rows(tiny_data, in_tmp, caplog):
    config = tiny_config(tiny_data, in_tmp, neg_sampler="mdcns", candidate_num=5, state="INFO",
                         mdcns_peer_model="LightSANs", mdcns_peer_config={"k_interests": 2}, **ALL)
    with caplog.at_level("INFO"):
        result = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict=config)
    assert result["train_info"]["train_positions"] == "last"
    assert "train_positions LightSANs (peer): not causal per position" in caplog.text
    assert "falls back to RecBole's prefix rows" in caplog.text


def test_ddp_two_cpu_processes_all_positions(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path, state="INFO", use_gpu=False, **ALL)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    cmd = [sys.executable, "-m", "recbole_mdcns", "--model=SASRec", "--dataset=tiny", "--neg_sampler=dns",
           "--candidate_num=5", "--accelerator=cpu", "--devices=2", "--strategy=ddp",
           f"--config_files={tmp_path / 'tiny.yaml'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "train_positions SASRec (self): all positions" in log and "test result" in log
    ckpt = torch.load(max(glob.glob(str(tmp_path / "saved" / "*-lightning" / "last.ckpt"))), weights_only=True)
    assert ckpt["negatives"]["history"][0]["negatives"] == sum(_rows_of(tiny_data, tmp_path).values())


def _rows_of(data_path: Path, tmp_path: Path) -> collections.Counter:
    return _rows(_pieces(data_path, tmp_path)[1])


from test_models import s3rec_pretrained  # noqa: E402,F401  (fixture)
