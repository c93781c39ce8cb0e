"""``eval_mask_history``: every item before the target in the row's whole sequence scores -inf in full-sort
validation and test -- checked against ranks computed by hand from the raw ``.inter`` file, for RecBole's
leave-one-out rows and user-split benchmark files, one process and two (DDP), the self model and MDCNS's
peer and ensemble; off, RecBole's evaluation is untouched."""
from __future__ import annotations

import collections
import glob
import math
import os
import socket
from pathlib import Path

import pytest
import recbole.quick_start
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import tiny_config
from recbole.data import create_dataset, data_preparation
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.trainer import Trainer
from recbole.utils import init_seed

import recbole_mdcns  # noqa: F401 -- installs the compat shims
from recbole_mdcns.config import create_config
from recbole_mdcns.evaluation import ScoreEnsemble
from recbole_mdcns.history_mask import HistoryMaskedEvalLoader
from recbole_mdcns.quick_start import build_model, build_trainer, fit_and_test, load_data, run_recbole
from recbole_mdcns.user_split import main as user_split

METRICS = {"metrics": ["Recall", "NDCG", "MRR"], "topk": [10], "metric_decimal_place": 12}
DNS = {"neg_sampler": "dns", "candidate_num": 5, **METRICS}


def _raw_sequences(inter: Path) -> dict[str, list[str]]:
    """Each user's item tokens in time order, read straight from the atomic file."""
    rows = collections.defaultdict(list)
    lines = inter.read_text().splitlines()
    names = [h.split(":")[0] for h in lines[0].split("\t")]
    for line in lines[1:]:
        row = dict(zip(names, line.split("\t")))
        rows[row["user_id"]].append((float(row["timestamp"]), row["item_id"]))
    return {user: [item for _, item in sorted(items)] for user, items in rows.items()}


@torch.no_grad()
def _by_hand(model, loader, raw: dict[str, list[str]], masked: bool, fill: float = -math.inf) -> tuple[dict, int]:
    """Recall / NDCG / MRR @10 of the loader's rows from the model's full-sort scores, with each row's whole
    prefix in ``raw`` (the items before its target) set to ``fill`` when ``masked``; also how many rows had a
    prefix item scored above their target."""
    dataset = loader._dataset
    rows = dataset.inter_feat
    model.eval()
    scores = model.full_sort_predict(rows).view(len(rows), -1).clone()
    scores[:, 0] = -math.inf
    above = 0
    ranks = []
    for r in range(len(rows)):
        user = dataset.id2token(dataset.uid_field, rows[dataset.uid_field][r].item())
        target = rows[dataset.iid_field][r].item()
        sequence = raw[user]
        prefix = sequence[:sequence.index(dataset.id2token(dataset.iid_field, target))]
        prefix_ids = torch.as_tensor(dataset.token2id(dataset.iid_field, prefix))
        above += int(bool((scores[r, prefix_ids] > scores[r, target]).any()))
        if masked:
            scores[r, prefix_ids] = fill
        ranks.append(int((scores[r] > scores[r, target]).sum()) + 1)
    ranks = torch.tensor(ranks, dtype=torch.float64)
    hit = ranks <= 10
    result = {"recall@10": hit.double().mean().item(),
              "ndcg@10": torch.where(hit, 1 / torch.log2(ranks + 1), 0.0).mean().item(),
              "mrr@10": torch.where(hit, 1 / ranks, 0.0).mean().item()}
    return result, above


def _close(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(abs(got[k] - want[k]) < 1e-9 for k in want)


def _setup(folder: Path, workdir: Path, dataset: str = "tiny", **settings):
    """SASRec's trainer (seeded, untrained) and the validation and test loaders of ``load_data``."""
    config = create_config("SASRec", dataset, config_dict={**tiny_config(folder, workdir), **settings})
    init_seed(config["seed"], config["reproducibility"])
    _, train, valid, test = load_data(config)
    trainer = build_trainer(config, build_model(config, train))
    trainer.eval_collector.data_collect(train)
    return trainer, valid, test


def test_leave_one_out_mask_equals_ranks_by_hand_and_raises_the_metric(tiny_data, in_tmp):
    """RecBole's leave-one-out rows: with the switch a validation row's prefix is the user's training items,
    a test row's also the validation item, however long (MAX_ITEM_LIST_LENGTH 8 < sequences of up to 13)."""
    raw = _raw_sequences(tiny_data / "tiny" / "tiny.inter")
    masked, valid, test = _setup(tiny_data, in_tmp, **DNS, eval_mask_history=True)
    plain, plain_valid, plain_test = _setup(tiny_data, in_tmp, **DNS)
    assert isinstance(valid, HistoryMaskedEvalLoader) and type(plain_valid) is FullSortEvalDataLoader
    assert torch.equal(plain.model.item_embedding.weight, masked.model.item_embedding.weight)  # same seed
    assert max(len(seq) for seq in raw.values()) > 8 + 2  # some prefixes are longer than the model's window
    for data, plain_data in ((valid, plain_valid), (test, plain_test)):
        want_masked, above = _by_hand(masked.model, data, raw, masked=True)
        want_plain, _ = _by_hand(masked.model, data, raw, masked=False)
        got_masked = masked.evaluate(data, load_best_model=False)
        got_plain = plain.evaluate(plain_data, load_best_model=False)
        assert _close(got_masked, want_masked) and _close(got_plain, want_plain)
        assert above > 0  # history items outrank targets without the mask ...
        assert got_masked["mrr@10"] > got_plain["mrr@10"]  # ... so masking them lifts the metric
        assert got_masked["recall@10"] >= got_plain["recall@10"]


def test_switch_off_is_recboles_evaluation_and_plain_recbole_is_untouched(tiny_data, in_tmp):
    """Off (the default), a sampler run evaluates exactly as RecBole's own Trainer on RecBole's loaders; the
    plain RecBole path (no sampler) gets RecBole's loaders and results. The plain path honours the switch too."""
    raw = _raw_sequences(tiny_data / "tiny" / "tiny.inter")
    trainer, valid, test = _setup(tiny_data, in_tmp, **DNS, eval_mask_history=False)
    config = create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, **DNS))
    recbole_valid, recbole_test = data_preparation(config, create_dataset(config))[1:]
    recbole = Trainer(config, trainer.model)
    for data, recbole_data in ((valid, recbole_valid), (test, recbole_test)):
        assert type(data) is FullSortEvalDataLoader
        assert trainer.evaluate(data, load_best_model=False) == recbole.evaluate(recbole_data, load_best_model=False)

    for switch in (None, True):
        settings = {**METRICS, "train_neg_sample_args": None,
                    **({} if switch is None else {"eval_mask_history": switch})}
        plain, valid, _ = _setup(tiny_data, in_tmp, **settings)
        assert type(plain) is Trainer and plain.config["neg_sampler"] == "recbole"
        assert (type(valid) is FullSortEvalDataLoader) == (switch is None)
        want, _ = _by_hand(plain.model, valid, raw, masked=bool(switch))
        assert _close(plain.evaluate(valid, load_best_model=False), want)


@pytest.fixture(scope="module")
def split_files(tiny_data, tmp_path_factory) -> Path:
    """The tiny dataset split by users, held-out rows cut to 4 items (so NAME.history is written)."""
    out = tmp_path_factory.mktemp("split")
    for heldout in ("last", "prefixes"):
        user_split(["--inter", str(tiny_data / "tiny" / "tiny.inter"), "--out", str(out), "--name", f"us-{heldout}",
                    "--heldout", heldout, "--max-len", "4"])
    return out


def _split_settings(out: Path, name: str) -> dict:
    settings = yaml.safe_load((out / name / f"{name}.yaml").read_text())
    return {**settings, "hidden_size": 16, "n_layers": 1, "n_heads": 1, "inner_size": 32}


@pytest.mark.parametrize("heldout", ["last", "prefixes"])
def test_user_split_mask_covers_the_whole_prefix_beyond_max_len(tiny_data, split_files, in_tmp, heldout):
    """Held-out users never trained on: every item before the target is masked, also those before the row's
    4-item window (from NAME.history for --heldout last, from the user's earlier rows for prefixes)."""
    raw = _raw_sequences(tiny_data / "tiny" / "tiny.inter")
    name = f"us-{heldout}"
    trainer, valid, test = _setup(split_files, in_tmp, name, **DNS, **_split_settings(split_files, name))
    assert (split_files / name / f"{name}.history").exists() == (heldout == "last")
    for data in (valid, test):
        assert int(data._dataset.inter_feat["item_length"].max()) == 4
        want, above = _by_hand(trainer.model, data, raw, masked=True)
        assert _close(trainer.evaluate(data, load_best_model=False), want) and above > 0


def test_mdcns_peer_and_ensemble_validation_are_masked(tiny_data, in_tmp):
    """MDCNS validates its peer and the self+peer ensemble on the same masked loader."""
    raw = _raw_sequences(tiny_data / "tiny" / "tiny.inter")
    config = create_config("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, in_tmp, neg_sampler="mdcns", candidate_num=5, eval_mask_history=True, **METRICS))
    _, train, valid, test = load_data(config)
    trainer = build_trainer(config, build_model(config, train))
    result = fit_and_test(trainer, train, valid, test, saved=False, verbose=False)
    record, = result["train_info"]["extra_valid_results"]  # one epoch: the models as they were validated
    self_model, peer = trainer.model, trainer.module.peer
    assert _close(result["best_valid_result"], _by_hand(self_model, valid, raw, masked=True)[0])
    assert _close(record["peer"], _by_hand(peer, valid, raw, masked=True)[0])
    assert _close(record["ensemble"], _by_hand(ScoreEnsemble([self_model, peer]), valid, raw, masked=True)[0])


def _rank_main(rank: int, world: int, port: int, data_path: Path, tmp_path: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer, valid, test = _setup(data_path, tmp_path, **DNS, eval_batch_size=7, eval_mask_history=True)
        torch.save([trainer.evaluate(data, load_best_model=False) for data in (valid, test)], tmp_path / f"r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_ddp_evaluation_masks_like_one_process(tiny_data, in_tmp):
    """Two gloo processes, each scoring its block of RecBole's batches of 7 rows: the masked metrics of one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, tiny_data, in_tmp), nprocs=2)
    trainer, valid, test = _setup(tiny_data, in_tmp, **DNS, eval_batch_size=7, eval_mask_history=True)
    single = [trainer.evaluate(data, load_best_model=False) for data in (valid, test)]
    assert len(list(valid.batch_sampler)) == 6  # 40 users in batches of 7: both processes score 3
    for rank in range(2):
        assert torch.load(in_tmp / f"r{rank}.pt", weights_only=False) == single
    raw = _raw_sequences(tiny_data / "tiny" / "tiny.inter")
    assert _close(single[1], _by_hand(trainer.model, test, raw, masked=True)[0])


@pytest.mark.parametrize("value, message", [
    ("yes", "eval_mask_history must be true or false, got 'yes'"),
    (1, "eval_mask_history must be true or false, got 1"),
])
def test_bad_switch_value_is_an_error_naming_the_key(tiny_data, in_tmp, value, message):
    for sampler in ({"neg_sampler": "dns"}, {"train_neg_sample_args": None}):
        with pytest.raises(ValueError, match=message):
            create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, eval_mask_history=value,
                                                                     **sampler))


def test_history_score_zero_ranks_as_the_authors_baselines(tiny_data, in_tmp):
    """``eval_history_score: 0``: the masked items score 0, as the authors' DNS+ evaluation sets them -- checked
    against ranks by hand, for a sampler's trainer and RecBole's own; a target scored below 0 then ranks under
    its history, so the metric falls below the -inf mask's."""
    raw = _raw_sequences(tiny_data / "tiny" / "tiny.inter")
    for sampler in (DNS, {**METRICS, "train_neg_sample_args": None}):
        settings = {**sampler, "eval_mask_history": True, "eval_shared_prefixes": False}  # scores: full_sort_predict
        zero, valid, test = _setup(tiny_data, in_tmp, **settings, eval_history_score=0)
        inf, inf_valid, _ = _setup(tiny_data, in_tmp, **settings)
        if "neg_sampler" not in sampler:  # RecBole's own trainer, given the 0 only when asked for
            assert type(inf) is Trainer and type(zero) is not Trainer and isinstance(zero, Trainer)
        for trainer in (zero, inf):  # every real score below 0, as a BCE-trained model scores most items
            trainer.model.full_sort_predict = _shifted(trainer.model.full_sort_predict, -10.0)
        for data in (valid, test):
            want = _by_hand(zero.model, data, raw, masked=True, fill=0.0)[0]
            assert _close(zero.evaluate(data, load_best_model=False), want)
            assert want["recall@10"] < _by_hand(zero.model, data, raw, masked=True)[0]["recall@10"]
        assert zero.evaluate(valid, load_best_model=False)["mrr@10"] < inf.evaluate(inf_valid, load_best_model=False)["mrr@10"]


def _shifted(predict, shift: float):
    return lambda interaction: predict(interaction) + shift


@pytest.mark.parametrize("settings, message", [
    ({"eval_mask_history": True, "eval_history_score": 1},
     r"eval_history_score must be one of \['-inf', '0'\].*got 1"),
    ({"eval_history_score": 0}, "eval_history_score: 0 is the score of the items eval_mask_history masks; set "
                                "eval_mask_history: true"),
])
def test_bad_history_score_is_an_error_naming_the_keys(tiny_data, in_tmp, settings, message):
    for sampler in ({"neg_sampler": "dns"}, {"train_neg_sample_args": None}):
        with pytest.raises(ValueError, match=message):
            create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, **settings, **sampler))


def test_switch_needs_full_sort_evaluation(tiny_data, in_tmp):
    args = {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "uni100", "group_by": "user"}
    with pytest.raises(ValueError, match="eval_mask_history: true masks the full ranking: eval_args mode"):
        create_config("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, neg_sampler="dns",
                                                                 eval_mask_history=True, eval_args=args))


def test_history_file_left_unloaded_is_an_error(split_files, in_tmp):
    settings = _split_settings(split_files, "us-last")
    for key in ("additional_feat_suffix", "alias_of_user_id"):
        settings.pop(key)
    settings["load_col"].pop("history")
    settings["alias_of_item_id"] = ["item_id_list"]
    with pytest.raises(ValueError, match=r"us-last\.history holds the items before held-out rows .* "
                                         r"additional_feat_suffix: \[history\]"):
        create_config("SASRec", "us-last", config_dict={**tiny_config(split_files, in_tmp), **DNS, **settings})


def test_rows_that_do_not_chain_are_an_error_naming_the_switch(tiny_data, tmp_path, in_tmp):
    """Benchmark files whose held-out row does not continue the user's training rows."""
    folder = tmp_path / "broken"
    folder.mkdir()
    header = "user_id:token\titem_id:token\titem_id_list:token_seq\ttimestamp:float\n"
    (folder / "broken.train.inter").write_text(header + "u1\ti2\ti1\t1\nu1\ti3\ti1 i2\t2\nu2\ti2\ti4\t1\n")
    (folder / "broken.valid.inter").write_text(header + "u1\ti5\ti1 i9\t3\n")
    (folder / "broken.test.inter").write_text(header + "u2\ti1\ti4 i2\t2\n")
    settings = {"benchmark_filename": ["train", "valid", "test"], "alias_of_item_id": ["item_id_list"],
                "load_col": {"inter": ["user_id", "item_id", "item_id_list", "timestamp"]},
                "eval_args": {"order": "TO", "mode": "full"}, "eval_mask_history": True}
    config = create_config("SASRec", "broken", config_dict={**tiny_config(tmp_path, in_tmp), **DNS, **settings})
    with pytest.raises(ValueError, match="eval_mask_history: the rows of a user across the training, validation "
                                         "and test sets must form one sequence"):
        load_data(config)


def test_checkpoint_of_a_masked_run_reloads_masked_loaders(tiny_data, in_tmp):
    """RecBole's load_data_and_model (as this package installs it) rebuilds the masked loaders from the saved
    config, so testing the checkpoint again gives the run's test result."""
    result = run_recbole("SASRec", "tiny", config_dict=tiny_config(tiny_data, in_tmp, **DNS, eval_mask_history=True))
    checkpoint, = glob.glob(str(in_tmp / "saved" / "SASRec-*.pth"))
    config, model, _, train, valid, test = recbole.quick_start.load_data_and_model(checkpoint)
    assert isinstance(valid, HistoryMaskedEvalLoader) and isinstance(test, HistoryMaskedEvalLoader)
    trainer = Trainer(config, model)
    trainer.eval_collector.data_collect(train)
    assert trainer.evaluate(test, load_best_model=False) == result["test_result"]
