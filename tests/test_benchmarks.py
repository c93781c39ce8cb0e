"""The benchmark harness end to end on a tiny dataset: grid -> results (append-only, resumable) -> report."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_dataset

from benchmarks import converged, report, run

try:
    import matplotlib  # noqa: F401  (the `bench` extra; without it the report has no plots)
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False

REPO = Path(__file__).resolve().parent.parent


def _grid(tmp_path: Path) -> Path:
    """The repository's smoke grid, pointed at a tiny dataset and a private results file."""
    grid = yaml.safe_load((REPO / "benchmarks" / "grids" / "smoke.yaml").read_text())
    write_dataset(tmp_path / "data")
    grid["datasets"] = {"tiny": {"data_path": str(tmp_path / "data")}}
    grid["results"] = str(tmp_path / "results" / "smoke.jsonl")
    grid["baselines"] = ["uniform"]  # so the report has a proposed row and an Improv. row
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_grid_cells_and_keys(tmp_path):
    cells = run.load_grid(_grid(tmp_path))
    assert [(c.sampler, c.seed) for c in cells] == [("uniform", 2020), ("dns-10", 2020),
                                                    ("uniform", 2021), ("dns-10", 2021)]
    assert cells[1].config["candidate_num"] == 10 and cells[1].config["MAX_ITEM_LIST_LENGTH"] == 10
    assert cells[0].role == "baseline" and cells[1].role == "proposed"
    assert cells[0].group == cells[2].group != cells[1].group  # seeds of one setting share a group
    assert len({c.key for c in cells}) == 4
    again = run.load_grid(_grid(tmp_path))
    assert [c.key for c in again] == [c.key for c in cells]  # keys are stable across runs


def test_smoke_grid_resume_and_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = _grid(tmp_path)
    results = tmp_path / "results" / "smoke.jsonl"
    # --allow-dirty: the tests run from a working tree, whose package code may not be committed yet
    common = ["--grid", str(grid), "--workdir", str(tmp_path / "work"), "--allow-dirty", "--in-process"]

    # an interrupted run: 3 of the 4 cells finished, the 4th was killed while its line was being written
    first = run.main(common + ["--limit", "3"])
    assert [r["status"] for r in first] == ["ok"] * 3, [r.get("traceback") for r in first]
    with open(results, "a") as f:
        f.write('{"key": "torn')
    before = results.read_bytes()

    # the resumed run takes the default path: each cell in a fresh process, which appends its own record
    second = run.main(common[:-1])
    assert len(second) == 1 and second[0]["status"] == "ok", second
    assert results.read_bytes().startswith(before)  # appended, never rewritten
    assert run.main(common) == []  # everything done: nothing runs

    records = [r for r in run.read_results(results) if r.get("status") == "ok"]
    assert len(records) == 4 and len({r["key"] for r in records}) == 4
    for r in records:
        assert set(r["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)}
        assert set(r["valid"]) == set(r["test"])
        assert r["epochs"] == 2 and r["best_epoch"] in (0, 1) and len(r["epoch_seconds"]) == 2
        assert r["seconds_per_epoch"] > 0 and r["peak_memory_mib"] > 0
        assert r["device"]["device"] == "cpu" and r["command"].startswith("python -m benchmarks.run")
        assert r["resolved_config"]["neg_sampler"] == r["config"]["neg_sampler"]
        assert r["resolved_config"]["candidate_num"] == r["config"].get("candidate_num", 1)
        assert 0 <= r["sampling_share"] < 1
        ranks = r["user_ranks"]  # each user's rank of its held-out item gives RecBole's metrics back
        assert ranks["top"] == 20 and len(ranks["test"]) == len(ranks["valid"]) > 0
        for split in ("valid", "test"):
            for metric in ("ndcg@10", "recall@5", "ndcg@20"):
                assert converged.user_values(ranks[split], metric).mean() == pytest.approx(r[split][metric], abs=1e-4)
    assert [r["isolation"] for r in records] == ["in-process"] * 3 + ["subprocess"]
    # the cell process keeps glibc's large blocks in its heap, unless the environment says otherwise
    assert records[-1]["malloc_env"] == {name: os.environ.get(name, value) for name, value in run.MALLOC_ENV.items()}
    assert records[0]["malloc_env"] == {name: os.environ.get(name) for name in run.MALLOC_ENV}

    out = report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
    text = out.read_text()
    assert "## SASRec on tiny (preset `smoke`)" in text
    assert text.count("**") >= 2 * 6  # a bold best in every metric column
    assert "| Improv. |" in text and "python -m benchmarks.run --grid" in text
    table = [line for line in text.splitlines() if line.startswith("| uniform") or line.startswith("| dns-10")]
    assert len(table) == 4 and "± " in table[0]  # metrics and diversity rows, mean ± std over two seeds
    assert "Negatives trained on (SASRec on tiny):" in text and "| mean pairwise cosine distance |" in text
    if HAVE_MATPLOTLIB:
        for name in ("smoke_tiny_ndcg10.png", "smoke_tiny_ndcg10_vs_time.png"):
            png = tmp_path / "plots" / name
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"](plots/{name})" in text


def test_a_killed_cell_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    from recbole_mdcns import run_recbole

    monkeypatch.chdir(tmp_path)
    (cell,) = [c for c in run.load_grid(_grid(tmp_path)) if c.sampler == "dns-10" and c.seed == 2020]
    uninterrupted = run.run_cell(cell, tmp_path / "uninterrupted", "test")
    assert uninterrupted["resumed_from"] is None
    # what an attempt killed after epoch 0 leaves in the cell's folder: its .pth and epoch 0's last.ckpt
    work = tmp_path / "work"
    run_recbole(cell.model, cell.dataset, config_dict=dict(cell.run_config(work), epochs=1))
    killed = run.last_checkpoint(work / cell.key / "saved")
    assert killed is not None and killed.name == "last.ckpt"
    resumed = run.run_cell(cell, work, "test")
    assert resumed["status"] == "ok", resumed.get("traceback")
    assert resumed["resumed_from"] == str(killed)
    assert resumed["test"] == uninterrupted["test"] and resumed["valid"] == uninterrupted["valid"]
    assert resumed["epochs"] == uninterrupted["epochs"] == 2
    assert resumed["user_ranks"]["test"] == uninterrupted["user_ranks"]["test"]
    # the record's curve holds the epoch validated before the kill too
    assert resumed["valid_scores"] == uninterrupted["valid_scores"] and len(resumed["valid_scores"]) == 2


def test_a_parked_cell_resumes_on_a_fresh_machine_as_if_never_stopped(tmp_path, monkeypatch):
    """``--park``: a stopped cell's checkpoints, copied into the committed ``benchmarks/parked``, resume the cell
    from another scratch folder (a fresh machine's), whose best model the resumed run finds by the moved path."""
    from recbole_mdcns import run_recbole

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "PARKED", tmp_path / "parked")
    cells = [c for c in run.load_grid(_grid(tmp_path)) if c.sampler == "dns-10"]
    cell, other = cells[0], cells[1]
    uninterrupted = run.run_cell(cell, tmp_path / "uninterrupted", "test")
    stopped = tmp_path / "old-machine"
    run_recbole(cell.model, cell.dataset, config_dict=dict(cell.run_config(stopped), epochs=1))
    assert [c.key for c in run.park(cells, stopped)] == [cell.key]  # the other cell never started: nothing to park
    assert not run.parked_dir(other).exists()
    shutil.rmtree(stopped)  # the machine is gone; what is parked is all there is
    resumed = run.run_cell(cell, tmp_path / "new-machine", "test")
    assert resumed["status"] == "ok", resumed.get("traceback")
    assert str(tmp_path / "new-machine") in resumed["resumed_from"]
    assert resumed["test"] == uninterrupted["test"] and resumed["valid"] == uninterrupted["valid"]
    assert resumed["epochs"] == uninterrupted["epochs"] == 2
    run.append_result(cell.results, resumed)
    assert run.park(cells, tmp_path / "new-machine") == [] and not run.parked_dir(cell).exists()  # finished: dropped


def test_a_cell_parked_twice_keeps_its_best_model(tmp_path, monkeypatch):
    """A cell resumed from its parked checkpoints writes its next ``last.ckpt`` into a folder named after its
    own start while its best model keeps the first attempt's name; parked again, the best model goes with it, and
    a third machine finishes the cell as the uninterrupted run does."""
    from dataclasses import replace

    from recbole_mdcns import run_recbole

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "PARKED", tmp_path / "parked")
    (first,) = [c for c in run.load_grid(_grid(tmp_path)) if c.sampler == "dns-10" and c.seed == 2020]
    cell = replace(first, config={**first.config, "epochs": 3}, key="")
    uninterrupted = run.run_cell(cell, tmp_path / "uninterrupted", "test")
    for machine, epochs in (("a", 1), ("b", 2)):  # stopped after epoch 0 on one machine, after epoch 1 on the next
        run_recbole(cell.model, cell.dataset, config_dict=dict(cell.run_config(tmp_path / machine), epochs=epochs))
        assert run.park([cell], tmp_path / machine) == [cell]
        shutil.rmtree(tmp_path / machine)
    parked = run.parked_dir(cell)
    (lightning,) = [p.name for p in parked.iterdir() if p.is_dir()]
    (best,) = [p.name for p in parked.glob("*.pth")]
    assert best.removesuffix(".pth") + "-lightning" != lightning  # the second attempt's folder, the first's model
    resumed = run.run_cell(cell, tmp_path / "c", "test")
    assert resumed["status"] == "ok", resumed.get("traceback")
    assert resumed["test"] == uninterrupted["test"] and resumed["valid"] == uninterrupted["valid"]
    assert resumed["epochs"] == uninterrupted["epochs"] == 3


def test_results_file_tolerates_torn_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    run.append_result(path, {"key": "a", "status": "ok"})
    with open(path, "a") as f:
        f.write('{"key": "b", "sta')
    run.append_result(path, {"key": "c", "status": "error"})
    assert run.finished_keys(path) == {"a"}
    assert json.loads(path.read_text().splitlines()[0])["key"] == "a"


def test_epoch_time_mdcns_target_is_against_per_round_sum_of_both_models():
    from argparse import Namespace

    from benchmarks import epoch_time

    args = Namespace(model="SASRec", peer_model="GRU4Rec")
    assert epoch_time.variant_spec("peer-uniform", args) == ("GRU4Rec", {"neg_sampler": "uniform"})
    model, overrides = epoch_time.variant_spec("mdcns", args)
    assert model == "SASRec" and overrides["mdcns_peer_model"] == "GRU4Rec"
    times = {label: {"epoch_s": epochs, "fit_s": epochs} for label, epochs in
             {"uniform": [10.0, 12.0, 10.0], "peer-uniform": [2.0, 2.0, 2.0], "mdcns": [13.0, 13.0, 16.0]}.items()}
    (target,) = [t for t in epoch_time.summarize(times, {})["targets"] if t["variant"] == "mdcns"]
    # per-round ratios 13/12, 13/14, 16/12 -> median 13/12
    assert target["reference"] == "uniform + peer-uniform" and target["bound"] == 1.15
    assert abs(target["ratio"] - 13 / 12) < 1e-12 and target["met"]
    times["mdcns"]["epoch_s"] = [14.0, 17.0, 16.0]  # 14/12, 17/14, 16/12 -> median 17/14 > 1.15
    (target,) = [t for t in epoch_time.summarize(times, {})["targets"] if t["variant"] == "mdcns"]
    assert abs(target["ratio"] - 17 / 14) < 1e-12 and not target["met"]
    assert "NOT MET: mdcns time / (uniform + peer-uniform) time = 1.21x" in epoch_time.render(
        epoch_time.summarize(times, {}), times, {})


def test_parallel_runs_each_cell_once(tmp_path, monkeypatch):
    """``benchmarks.parallel``: the unfinished cells as concurrent processes, one record each; a rerun has nothing left."""
    from benchmarks import parallel

    monkeypatch.chdir(tmp_path)
    grid = _grid(tmp_path)
    common = ["--grid", str(grid), "--workdir", str(tmp_path / "work"), "--seeds", "2020", "--allow-dirty"]
    status = parallel.main(common + ["--jobs", "2", "--in-process"])
    assert len(status) == 2 and set(status.values()) == {0}
    records = run.read_results(tmp_path / "results" / "smoke.jsonl")
    assert sorted(r["cell"]["sampler"] for r in records) == ["dns-10", "uniform"]
    assert all(r["status"] == "ok" for r in records)
    assert parallel.main(common) == {}  # every cell done


def test_converged_protocol_chooses_on_validation_and_orders_the_work(tmp_path):
    """benchmarks.converged: a family's setting is its best validation cell (not its best test cell), an
    ablation is the cell equal to the parent's choice but for the removed keys, paired differences are
    per seed, and the runnable cells come in priority order (tuning, then seeds)."""
    from benchmarks import converged

    grid = {"name": "protocol", "results": str(tmp_path / "r.jsonl"),
            "config": {"epochs": 100, "stopping_step": 5, "eval_step": 2},
            "datasets": {"tiny": {"data_path": str(tmp_path)}}, "models": ["SASRec"],
            "samplers": {"u": {"neg_sampler": "uniform"}, "d1": {"neg_sampler": "dns", "top_m": 1},
                         "d3": {"neg_sampler": "dns", "top_m": 3},
                         "m-g1": {"neg_sampler": "mdcns", "mdcns_gamma": 1, "mdcns_tau": 5},
                         "m-g1-nd": {"neg_sampler": "mdcns", "mdcns_gamma": 1, "mdcns_mu": 0}},
            "selection": {"seeds": [2020, 2021], "priority": ["MDCNS", "RNS"],
                          "families": [{"name": "RNS", "role": "baseline", "members": ["u"]},
                                       {"name": "DNS+", "role": "baseline", "members": ["d1", "d3"]},
                                       {"name": "MDCNS", "members": ["m-g1"]},
                                       {"name": "w/o distillation", "ablation_of": "MDCNS",
                                        "differs_in": ["mdcns_mu", "mdcns_tau"], "members": ["m-g1-nd"]}],
                          "claims": [["MDCNS", "DNS+"]]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    cells = {(c.sampler, c.seed): c for c in run.load_grid(path, seeds=[2020, 2021])}

    def record(label, seed, valid, test):
        return {"key": cells[(label, seed)].key, "status": "ok", "best_epoch": 3, "epochs": 9,
                "valid": {"ndcg@10": valid}, "test": {"ndcg@10": test, "recall@10": test}}

    records = [record("u", 2020, 0.20, 0.20), record("d1", 2020, 0.10, 0.90), record("d3", 2020, 0.30, 0.10)]
    evidence, = converged.build(str(path), {r["key"]: r for r in records})
    families = evidence.families
    assert families["DNS+"].chosen == "d3"  # validation 0.30 beats 0.10, whatever the test metric says
    assert families["MDCNS"].chosen is None and families["w/o distillation"].chosen is None
    # MDCNS's tuning comes first (priority), then the chosen baselines' remaining seed; the ablation waits
    assert converged.next_cells(evidence) == [("m-g1", 2020), ("u", 2021), ("d3", 2021)]

    records += [record("m-g1", 2020, 0.40, 0.30), record("m-g1", 2021, 0.40, 0.05), record("d3", 2021, 0.30, 0.15)]
    evidence, = converged.build(str(path), {r["key"]: r for r in records})
    assert evidence.families["w/o distillation"].chosen == "m-g1-nd"  # the same but for mu (and tau)
    assert converged.next_cells(evidence)[:2] == [("u", 2021), ("m-g1-nd", 2020)]
    diffs, seeds = converged.paired(evidence.families["MDCNS"], evidence.families["DNS+"], "ndcg@10")
    assert seeds == [2020, 2021] and [round(d, 4) for d in diffs] == [0.2, -0.1]
    text = "\n".join(converged.render_dataset(evidence))
    assert "| MDCNS > DNS+ | 2020: +0.2000, 2021: -0.1000 | +0.0500 ± 0.2121 (1/2 seeds > 0) | mixed |" in text
    assert "A run ends 10 epochs after its best" in text  # 5 evaluations without gain, one every 2 epochs


def test_a_family_with_its_own_seeds_asks_for_no_others(tmp_path):
    """A family that lists ``seeds: [2020]`` (one cell, as the protocol asks for prefix rows) is chosen and
    complete on that seed alone: ``--run`` schedules no other seed of it, and the report says so."""
    from benchmarks import converged

    grid = {"name": "one_seed", "results": str(tmp_path / "r.jsonl"), "config": {"epochs": 100, "stopping_step": 5},
            "datasets": {"tiny": {"data_path": str(tmp_path)}}, "models": ["SASRec"],
            "samplers": {"u": {"neg_sampler": "uniform"}, "p": {"neg_sampler": "uniform", "train_positions": "last"}},
            "selection": {"seeds": [2020, 2021],
                          "families": [{"name": "RNS", "role": "baseline", "members": ["u"]},
                                       {"name": "RNS on prefix rows", "members": ["p"], "seeds": [2020]}]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    keys = {(c.sampler, c.seed): c.key for c in run.load_grid(path, seeds=[2020, 2021])}
    records = {keys[(label, 2020)]: {"key": keys[(label, 2020)], "status": "ok", "best_epoch": 3, "epochs": 9,
                                     "valid": {"ndcg@10": 0.2}, "test": {"ndcg@10": 0.1, "recall@10": 0.1}}
               for label in ("u", "p")}
    evidence, = converged.build(str(path), records)
    assert converged.next_cells(evidence) == [("u", 2021)]  # the grid's seeds for RNS; none for prefix rows
    assert list(evidence.families["RNS on prefix rows"].records) == [2020]
    assert "seeds 2020 only, by the grid" in "\n".join(converged.render_dataset(evidence))


def test_the_report_gives_recall_at_the_selection_cutoff_and_flags_a_best_first_validation(tmp_path):
    """A grid selecting on NDCG@20 (the general models' protocol) reports Recall@20 beside it, not Recall@10;
    with a validation every 5 epochs, a best at the first of them (epoch 4) is flagged: the peak may be earlier."""
    from benchmarks import converged

    grid = {"name": "at20", "results": str(tmp_path / "r.jsonl"),
            "config": {"epochs": 100, "stopping_step": 5, "eval_step": 5},
            "datasets": {"tiny": {"data_path": str(tmp_path)}}, "models": ["BPR"],
            "samplers": {"u": {"neg_sampler": "uniform"}},
            "selection": {"metric": "ndcg@20", "seeds": [2020],
                          "families": [{"name": "RNS", "role": "baseline", "members": ["u"]}]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    cell, = run.load_grid(path, seeds=[2020])
    record = {"key": cell.key, "status": "ok", "best_epoch": 4, "epochs": 29, "valid": {"ndcg@20": 0.2},
              "test": {"ndcg@20": 0.1234, "recall@20": 0.4321, "recall@10": 0.9999}}
    evidence, = converged.build(str(path), {cell.key: record})
    text = "\n".join(converged.render_dataset(evidence))
    assert "| test ndcg@20 | test recall@20 |" in text
    assert "0.4321" in text and "0.9999" not in text
    assert "| 0.2000 | 0.1234 | 4 first! | 29 |" in text and "after epoch 4, so the peak may lie before it" in text
    record["best_epoch"] = 9  # the second validation: a peak inside the schedule
    evidence, = converged.build(str(path), {cell.key: record})
    text = "\n".join(converged.render_dataset(evidence))
    assert "| 0.2000 | 0.1234 | 9 | 29 |" in text and "9 first!" not in text


def test_a_converged_page_goes_where_its_grids_say_and_never_over_another_grids(tmp_path):
    """Each converged grid names its page (``report.page``): the authors' protocol grids write
    AUTHORS_PROTOCOL.md, not CONVERGED.md; grids naming different pages need --out, refused before any run."""
    from benchmarks import converged

    grids = REPO / "benchmarks" / "grids"
    out, title = converged.report_page([str(grids / "authors_lastfm.yaml"), str(grids / "authors_beauty.yaml")],
                                       None, None)
    assert out == REPO / "benchmarks" / "AUTHORS_PROTOCOL.md" and "authors' protocol" in title
    assert converged.report_page([str(grids / "converged_ml100k.yaml")], None, None)[0].name == "CONVERGED.md"
    assert converged.report_page([str(grids / "converged_ml100k.yaml")], str(tmp_path / "p.md"), "T") == (
        tmp_path / "p.md", "T")
    mixed = ["--run", "--grid", str(grids / "converged_lastfm.yaml"), "--grid", str(grids / "authors_lastfm.yaml"),
             "--results", str(tmp_path / "none.jsonl")]
    with pytest.raises(SystemExit, match=r"--out.*AUTHORS_PROTOCOL.md.*CONVERGED.md"):
        converged.main(mixed)
    assert not (tmp_path / "none.jsonl").exists()  # nothing ran


def test_converged_run_refuses_an_unknown_family(tmp_path):
    from benchmarks import converged

    grid = REPO / "benchmarks" / "grids" / "converged_ml100k.yaml"
    with pytest.raises(SystemExit, match=r"DNS\+\+.*'DNS\+'"):  # names the bad family and the valid ones
        converged.drive([str(grid)], [str(tmp_path / "none.jsonl")], first=["DNS++"])


def test_held_out_negatives_counts_the_users_validation_and_test_items(tmp_path, monkeypatch):
    """``benchmarks.studies.held_out_negatives``: each user's held-out items are their last two (by time), and the
    counts are consistent: a uniform negative is a held-out item exactly when its one-item pool is."""
    from benchmarks.studies import held_out_negatives
    from recbole_mdcns.config import create_config
    from recbole_mdcns.quick_start import load_data

    monkeypatch.chdir(tmp_path)
    grid = _grid(tmp_path)
    cell = run.load_grid(grid)[0]
    config = create_config(cell.model, cell.dataset, None, cell.run_config(tmp_path / "work"))
    dataset, _, valid_data, test_data = load_data(config)
    held = held_out_negatives.held_out_items(valid_data, test_data, dataset.user_num)
    inter = (tmp_path / "data" / "tiny" / "tiny.inter").read_text().splitlines()[1:]
    last_two = {}
    for line in inter:  # written in time order per user
        user, item = line.split("\t")[:2]
        last_two[user] = (last_two.get(user, (None, None))[1], item)
    tokens = dataset.field2id_token
    for user_id in range(1, dataset.user_num):
        expected = last_two[tokens[dataset.uid_field][user_id]]
        assert tuple(tokens[dataset.iid_field][i] for i in held[user_id].tolist()) == expected

    out = held_out_negatives.main(["--grid", str(grid), "--cells", "uniform,dns-10", "--epochs", "2",
                                   "--json", str(tmp_path / "held.json")])
    uniform, dns = out["results"]
    assert [p["epoch"] for p in uniform["per_epoch"]] == [0, 1]
    for p, q in zip(uniform["per_epoch"], dns["per_epoch"]):
        assert p["rows"] == q["rows"] == p["negatives"] == q["negatives"] > 0
        assert p["hits"] == p["pool_rows"] and q["hits"] <= q["pool_rows"]
        assert q["pool"] > p["pool"]  # a 10-item pool holds a held-out item more often than a 1-item one
    assert json.loads((tmp_path / "held.json").read_text())["results"][1]["cell"] == "dns-10"


def test_user_ranks_give_per_user_metrics_and_a_bootstrap_over_users():
    import torch
    from recbole.evaluator.collector import DataStruct

    from benchmarks.probe import held_out_ranks

    struct = DataStruct()  # RecBole's rec.topk: hit flags at ranks 1..4, then the user's held-out count
    struct.set("rec.topk", torch.tensor([[0, 0, 1, 0, 1], [0, 0, 0, 0, 1], [1, 0, 0, 0, 1]]))
    assert held_out_ranks(struct) == [3, 0, 1]
    struct.set("rec.topk", torch.tensor([[0, 1, 1, 0, 2]]))
    assert held_out_ranks(struct) is None  # two held-out items: a rank says too little
    assert converged.user_values([3, 0, 1, 11], "ndcg@10").tolist() == [0.5, 0.0, 1.0, 0.0]
    assert converged.user_values([3, 0, 1, 11], "recall@5").tolist() == [1.0, 0.0, 1.0, 0.0]

    def family(name, *per_seed):
        return converged.Family(name, "proposed", [name], records={
            2020 + i: {"user_ranks": {"test": ranks, "valid": None}} for i, ranks in enumerate(per_seed)})

    a = family("a", [1] * 50 + [0] * 50, [1] * 50 + [0] * 50)
    b = family("b", [0] * 100, [1] * 100)
    mean, low, high, users, seeds = converged.users_interval(a, b, "ndcg@10")
    assert (users, seeds) == (100, 2) and mean == pytest.approx(0.0)  # +0.5 on one seed, -0.5 on the other
    assert low < 0 < high
    mean, low, high, _, _ = converged.users_interval(a, family("c", [0] * 100, [0] * 100), "ndcg@10")
    assert mean == pytest.approx(0.5) and 0.35 < low < 0.5 < high < 0.65
    assert converged.users_interval(a, b, "ndcg@10", split="valid") is None  # no validation ranks


def test_valid_test_gap_reads_the_window_hits_and_the_per_user_correlation():
    """benchmarks.studies.valid_test_gap: validation around the best epoch, users with a hit, and the correlation of
    the per-user differences on validation with those on test."""
    from benchmarks.studies.valid_test_gap import seed_gaps, split_correlation

    def family(name, valid_scores, valid, test):
        return converged.Family(name, "proposed", [name], chosen=name, records={2020: {
            "valid_scores": [[epoch, s] for epoch, s in enumerate(valid_scores)],
            "user_ranks": {"valid": valid, "test": test}}})

    scores = [0.1] * 10 + [0.9] + [0.1] * 10  # one lucky epoch: its ± 5 window is far below it
    a = family("a", scores, valid=[1, 1, 0, 0], test=[1, 1, 0, 0])
    gap, = seed_gaps(a, k=10)
    assert gap.best_valid == pytest.approx(0.9)
    assert gap.near_best_valid == pytest.approx((0.9 + 10 * 0.1) / 11)
    assert gap.hits == {"valid": 2, "test": 2} and gap.users == 4
    same = family("b", scores, valid=[0, 0, 1, 1], test=[0, 0, 1, 1])  # the users a wins are its own on both
    assert split_correlation(a, same, "ndcg@10") == pytest.approx(1.0)
    e = family("e", scores, valid=[1, 1, 0, 0], test=[0, 0, 1, 1])  # wins on validation what it loses on test
    assert split_correlation(e, family("c", scores, valid=[0, 0, 1, 1], test=[1, 1, 0, 0]),
                             "ndcg@10") == pytest.approx(-1.0)
    assert split_correlation(a, family("d", scores, valid=None, test=[0] * 4), "ndcg@10") is None


def test_a_cell_another_process_runs_is_skipped_then_free_once_it_ends(tmp_path, monkeypatch):
    """``run_grid``'s per-cell lock: two drivers over one grid never run the same cell; the lock goes with
    its holder, so the cell runs once the holder ends."""
    import fcntl

    monkeypatch.chdir(tmp_path)
    cells = [c for c in run.load_grid(_grid(tmp_path)) if c.seed == 2020]
    work = tmp_path / "work"
    busy = cells[0]
    work.mkdir()
    with open(work / f"{busy.key}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another driver is inside this cell
        written = run.run_grid(cells, "test", in_process=True, workdir=work)
        assert [r["cell"]["sampler"] for r in written] == [c.sampler for c in cells[1:]]
        assert busy.key not in run.finished_keys(busy.results)
    written = run.run_grid(cells, "test", in_process=True, workdir=work)  # its holder has ended
    assert [r["key"] for r in written] == [busy.key] and written[0]["status"] == "ok"


def test_all_models_table_marks_each_cell_ok_refused_error_or_not_run(tmp_path):
    from benchmarks.studies import all_models

    grid = {"name": "sweep", "preset": "smoke", "results": str(tmp_path / "r.jsonl"),
            "datasets": {"tiny": {"data_path": str(tmp_path)}}, "models": ["SASRec", "TransRec"],
            "samplers": {"dns": {"neg_sampler": "dns"}, "dens": {"neg_sampler": "dens"}}, "seeds": [2020]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    cells = {(c.model_label, c.sampler): c for c in run.load_grid(path)}
    run.append_result(tmp_path / "r.jsonl", {"key": cells[("SASRec", "dns")].key, "status": "ok",
                                             "seconds_per_epoch": 1.25})
    run.append_result(tmp_path / "r.jsonl", {"key": cells[("TransRec", "dens")].key, "status": "error",
                                             "error": "ValueError: neg_sampler=dens gates item vectors"})
    run.append_result(tmp_path / "r.jsonl", {"key": cells[("TransRec", "dns")].key, "status": "error",
                                             "error": "cell process ended (-9) without a result"})
    text = all_models.table(str(path))
    assert "(3 of 4 cells run)" in text
    assert "| SASRec | 1.2 | -- |" in text
    assert "| TransRec | error [1] | refused [2] |" in text
    assert "1. cell process ended (-9) without a result" in text and "2. ValueError: neg_sampler=dens" in text


def test_a_choice_at_its_grids_edge_is_named():
    configs = {"d1": {"neg_sampler": "dns", "top_m": 1}, "d3": {"neg_sampler": "dns", "top_m": 3},
               "d10": {"neg_sampler": "dns", "top_m": 10}, "d10-bpr": {"neg_sampler": "dns", "top_m": 10, "loss": "bpr"},
               "m-g1": {"gamma": 1, "mu": 0.01}, "m-g3": {"gamma": 3, "mu": 0.01}, "m-g3-nd": {"gamma": 3, "mu": 0}}
    dns = ["d1", "d3", "d10", "d10-bpr"]
    assert converged.grid_edges(configs, dns, "d10") == ["top_m (10)"]  # d10-bpr differs in more than M
    assert converged.grid_edges(configs, dns, "d3") == []  # inside
    assert converged.grid_edges(configs, dns, "d1") == ["top_m (1)"]
    # one neighbour per axis is no axis: gamma 1 vs 3 and mu 0 vs 0.01 are not grids to extend
    assert converged.grid_edges(configs, ["m-g1", "m-g3", "m-g3-nd"], "m-g3") == []


def _scratch_repo(root: Path) -> Path:
    """A git repository holding a copy of this checkout's package code and harness (committed), a results
    file and a README, as a user's clone would."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("recbole_mdcns", "config_yamls"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    (root / "benchmarks" / "results").mkdir(parents=True)
    for module in (REPO / "benchmarks").glob("*.py"):
        shutil.copy2(module, root / "benchmarks" / module.name)
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy2(REPO / name, root / name)
    (root / "README.md").write_text("# scratch\n")
    (root / "benchmarks" / "results" / "smoke.jsonl").write_text("")

    def git(*args):
        subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "scratch")
    return root


def test_git_state_names_uncommitted_package_files_not_results_or_documents(tmp_path):
    from benchmarks.common import git_state

    repo = _scratch_repo(tmp_path / "repo")
    clean = git_state(repo)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    assert clean["package_dirty"] == [] and clean["diff_sha256"] is None
    with open(repo / "benchmarks" / "results" / "smoke.jsonl", "a") as f:  # a grid appending its records
        f.write('{"key": "x"}\n')
    (repo / "README.md").write_text("# rewritten\n")
    (repo / "benchmarks" / "grids").mkdir()
    (repo / "benchmarks" / "grids" / "new.yaml").write_text("name: new\n")
    docs_only = git_state(repo)
    assert docs_only["dirty"] is True and docs_only["package_dirty"] == [] and docs_only["diff_sha256"] is None
    with open(repo / "recbole_mdcns" / "trainer.py", "a") as f:
        f.write("# an edit\n")
    (repo / "recbole_mdcns" / "extra.py").write_text("X = 1\n")  # new, not yet added
    with open(repo / "benchmarks" / "run.py", "a") as f:
        f.write("# an edit\n")
    dirty = git_state(repo)
    assert dirty["package_dirty"] == ["benchmarks/run.py", "recbole_mdcns/extra.py", "recbole_mdcns/trainer.py"]
    assert len(dirty["diff_sha256"]) == 64
    assert git_state(repo)["diff_sha256"] == dirty["diff_sha256"]  # the same changes, the same hash
    (repo / "recbole_mdcns" / "extra.py").write_text("X = 2\n")
    assert git_state(repo)["diff_sha256"] != dirty["diff_sha256"]


def test_a_grid_with_uncommitted_package_code_is_refused_unless_allowed(tmp_path):
    """``benchmarks.run`` in a clone: a results file or README being edited does not block a run; an uncommitted
    edit of the package does, naming the file, and ``--allow-dirty`` runs it with the record marked."""
    repo = _scratch_repo(tmp_path / "repo")
    results = tmp_path / "results" / "smoke.jsonl"
    command = [sys.executable, "-m", "benchmarks.run", "--grid", str(_grid(tmp_path)), "--seeds", "2020",
               "--only", "uniform*", "--workdir", str(tmp_path / "work"), "--in-process"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run_here(*extra):
        return subprocess.run(command + list(extra), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    (repo / "README.md").write_text("# rewritten while a grid runs\n")
    with open(repo / "benchmarks" / "results" / "smoke.jsonl", "a") as f:
        f.write('{"key": "appended by another grid"}\n')
    done = run_here()
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = run.read_results(results)
    assert record["status"] == "ok" and record["git"]["dirty"] is True
    assert record["git"]["package_dirty"] == [] and record["git"]["diff_sha256"] is None

    results.unlink()
    with open(repo / "recbole_mdcns" / "losses.py", "a") as f:
        f.write("# an uncommitted edit\n")
    refused = run_here()
    assert refused.returncode != 0
    assert "uncommitted changes" in refused.stderr and "recbole_mdcns/losses.py" in refused.stderr
    assert "--allow-dirty" in refused.stderr and not results.exists()  # nothing ran, nothing recorded

    allowed = run_here("--allow-dirty")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    (record,) = run.read_results(results)
    assert record["status"] == "ok" and record["git"]["package_dirty"] == ["recbole_mdcns/losses.py"]
    assert len(record["git"]["diff_sha256"]) == 64


def test_verify_reruns_a_record_and_says_whether_it_matches(tmp_path, monkeypatch, capsys):
    """``--verify``: a record verified right after it was made MATCHES (whole run, and its first epoch alone);
    one whose stored metric or validation score was altered DIFFERS, naming what, with exit status 1. The reruns
    go to a scratch results file, never to the grid's."""
    monkeypatch.chdir(tmp_path)
    grid = _grid(tmp_path)
    results = tmp_path / "results" / "smoke.jsonl"
    common = ["--grid", str(grid), "--seeds", "2020", "--only", "dns-10*", "--workdir", str(tmp_path / "work"),
              "--allow-dirty", "--in-process"]
    (made,) = run.main(common)
    assert made["status"] == "ok" and made["epochs"] == 2
    assert made["device"]["cpu_capability"] and "cpu_id" in made["device"]  # which kernels ran: a record's machine
    before = results.read_bytes()

    (whole,) = run.main(common + ["--verify"])
    assert whole["differences"] == [] and whole["epochs"] is None and whole["record_commit"] == made["git"]["commit"]
    (first,) = run.main(common + ["--verify", "--epochs", "1"])
    assert first["differences"] == [] and first["epochs"] == 1
    out = capsys.readouterr().out
    assert out.count("MATCH    dns-10 | SASRec | tiny | seed 2020") == 2 and "the first 1 epochs" in out
    assert results.read_bytes() == before  # the reruns went elsewhere
    scratch = sorted((tmp_path / "work").glob("verify-*/results.jsonl"))
    assert len(scratch) == 2 and all(run.read_results(path)[0]["status"] == "ok" for path in scratch)

    altered = copy.deepcopy(made)
    altered["test"]["ndcg@10"] += 0.001
    altered["valid_scores"][1][1] += 0.001
    altered["git"]["commit"] = "0" * 40
    run.append_result(results, altered)
    with pytest.raises(SystemExit) as failed:
        run.main(common + ["--verify"])
    assert failed.value.code == 1
    out = capsys.readouterr().out
    name = f"dns-10 | SASRec | tiny | seed 2020 ({made['key']})"
    assert f"MATCH    {name} vs record at {made['git']['commit'][:7]}" in out
    differs = next(line for line in out.splitlines() if line.startswith("DIFFERS"))
    assert "vs record at 0000000" in differs and "epoch 1: valid" in differs and "test ndcg@10" in differs
    assert "[verify] 1 of 2 records match" in out
    (only_first,) = run.main(common + ["--verify", "--epochs", "1", "--against", "0000"])  # epoch 0 is unaltered
    assert only_first["differences"] == []
    (loose,) = run.main(common + ["--verify", "--against", "0000", "--tolerance", "0.002"])
    assert loose["differences"] == []


def test_compare_records_reports_the_first_differing_epoch():
    record = {"status": "ok", "epochs": 4, "best_epoch": 1, "best_valid_score": 0.3,
              "valid_scores": [[0, 0.1], [1, 0.3], [2, 0.2], [3, 0.2]], "valid": {"ndcg@10": 0.3},
              "test": {"ndcg@10": 0.25}}
    assert run.compare_records(record, copy.deepcopy(record)) == ([], None)
    rerun = copy.deepcopy(record)
    rerun["valid_scores"][2][1] = 0.21
    rerun["test"]["ndcg@10"] = 0.26
    differences, first = run.compare_records(record, rerun)
    assert first == 2 and differences == ["epoch 2: valid 0.21 (record 0.2)", "test ndcg@10 0.26 (record 0.25)"]
    short = {**copy.deepcopy(rerun), "epochs": 2, "valid_scores": rerun["valid_scores"][:2]}
    assert run.compare_records(record, short, epochs=2) == ([], None)  # a truncated rerun: its epochs only
    assert run.compare_records(record, short, epochs=3) == (["epoch 2: not validated by the rerun"], 2)
    assert run.compare_records(record, {"status": "error", "error": "boom"})[0] == ["the rerun failed: boom"]


def test_a_reference_family_is_never_the_best_baseline(tmp_path):
    """``role: reference`` (e.g. the full softmax): set against the samplers through claims only -- never the
    report's best baseline even with the best validation, not marked ``*`` as a proposed method; an unknown
    role is refused naming the valid ones."""
    from benchmarks import converged

    grid = {"name": "reference", "results": str(tmp_path / "r.jsonl"), "config": {"epochs": 100, "stopping_step": 5},
            "datasets": {"tiny": {"data_path": str(tmp_path)}}, "models": ["SASRec"],
            "samplers": {"u": {"neg_sampler": "uniform"}, "ce": {"neg_sampler": "full_softmax"},
                         "d": {"neg_sampler": "dns", "candidate_num": 10}},
            "selection": {"seeds": [2020],
                          "families": [{"name": "RNS", "role": "baseline", "members": ["u"]},
                                       {"name": "CE", "role": "reference", "members": ["ce"]},
                                       {"name": "DNS", "members": ["d"]}],
                          "claims": [["DNS", "CE"]]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    keys = {c.sampler: c.key for c in run.load_grid(path, seeds=[2020])}
    records = {keys[label]: {"key": keys[label], "status": "ok", "best_epoch": 3, "epochs": 9,
                             "valid": {"ndcg@10": valid}, "test": {"ndcg@10": valid, "recall@10": valid}}
               for label, valid in (("u", 0.1), ("ce", 0.5), ("d", 0.2))}
    evidence, = converged.build(str(path), records)
    assert converged.best_baseline(evidence).name == "RNS"
    text = "\n".join(converged.render_dataset(evidence))
    assert "| CE | `ce`" in text and "| DNS * | `d`" in text
    assert "| DNS > CE | 2020: -0.3000 |" in text
    grid["selection"]["families"][1]["role"] = "bar"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    with pytest.raises(ValueError, match=r"role must be one of \['proposed', 'baseline', 'reference'\], got 'bar'"):
        converged.build(str(path), records)


def test_a_grid_extends_another_and_runs_a_dataset_in_the_authors_protocol(tmp_path, monkeypatch):
    """``extends:`` takes the other grid, merging config, samplers (a sampler both name, key by key) and
    selection; a dataset's ``user_split:``
    writes the split once (under the harness's data folder) and each cell trains on it with the history mask,
    recording each evaluated row's user where a user has several rows (every prefix held out)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "SPLIT_DATA", tmp_path / "split-data")
    write_dataset(tmp_path / "data")
    base = {"name": "base", "preset": "smoke", "results": str(tmp_path / "base.jsonl"), "config": {"epochs": 1},
            "datasets": {"tiny": {"data_path": str(tmp_path / "data")}}, "models": ["SASRec"],
            "samplers": {"uniform": {"neg_sampler": "uniform"}},
            "selection": {"metric": "ndcg@10", "families": [{"name": "RNS", "members": ["uniform"]}],
                          "claims": []}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    split = {"inter": "data/tiny/tiny.inter", "seed": 3, "ratios": [0.6, 0.2, 0.2], "heldout": "prefixes"}
    child = {"extends": "base.yaml", "results": str(tmp_path / "authors.jsonl"), "config": {"stopping_step": 30},
             "datasets": {"tiny-users": {"user_split": split}},
             "samplers": {"dns": {"neg_sampler": "dns", "candidate_num": 5}, "uniform": {"neg_loss": "bpr"}},
             "selection": {"metric": "ndcg@20", "families": [{"name": "DNS", "members": ["dns"]}]}}
    grid = tmp_path / "child.yaml"
    grid.write_text(yaml.safe_dump(child))
    raw = run.read_grid(grid)
    assert raw["config"] == {"epochs": 1, "stopping_step": 30} and set(raw["samplers"]) == {"uniform", "dns"}
    assert raw["samplers"]["uniform"] == {"neg_sampler": "uniform", "neg_loss": "bpr"}  # a sampler both name: merged
    assert raw["selection"]["metric"] == "ndcg@20" and raw["selection"]["claims"] == []
    assert [f["name"] for f in raw["selection"]["families"]] == ["RNS", "DNS"]
    cells = run.load_grid(grid)
    assert [c.sampler for c in cells] == ["uniform", "dns"] and cells[0].grid == "child"
    assert cells[0].split["inter"] == str(tmp_path / "data" / "tiny" / "tiny.inter")

    records = run.main(["--grid", str(grid), "--workdir", str(tmp_path / "work"), "--allow-dirty", "--in-process"])
    assert [r["status"] for r in records] == ["ok", "ok"], [r.get("traceback") for r in records]
    (folder,) = (tmp_path / "split-data").iterdir()  # written once, shared by both cells
    assert (folder / "tiny-users" / "tiny-users.train.inter").exists()
    for r in records:
        assert r["run_config"]["eval_mask_history"] is True and r["run_config"]["benchmark_filename"]
        assert "user_split" not in r["run_config"] and r["config"]["user_split"] == split
        ranks = r["user_ranks"]
        users = ranks["test_users"]  # every prefix of a test user: several rows per user
        assert len(users) == len(ranks["test"]) > len(set(users))
    with pytest.raises(ValueError, match="user_split takes inter"):
        child["datasets"]["tiny-users"]["user_split"] = {"seed": 3}
        grid.write_text(yaml.safe_dump(child))
        run.load_grid(grid)


def test_the_bootstrap_over_users_resamples_a_users_rows_together():
    def family(name, ranks, users):
        return converged.Family(name, "proposed", [name], records={
            2020: {"user_ranks": {"test": ranks, "valid": None, "test_users": users}}})

    # 10 users, each with 10 identical rows: 100 rows, but only 10 independent units
    a = family("a", [1] * 50 + [0] * 50, [u for u in range(10) for _ in range(10)])
    b = family("b", [0] * 100, None)
    mean, low, high, users, _ = converged.users_interval(a, b, "ndcg@10")
    assert users == 10 and mean == pytest.approx(0.5)
    rows = family("rows", [1] * 50 + [0] * 50, None)  # the same rows taken as 100 users
    _, row_low, row_high, row_users, _ = converged.users_interval(rows, b, "ndcg@10")
    assert row_users == 100 and (high - low) > 2 * (row_high - row_low)  # grouped: a far wider interval


def test_their_logs_give_best_epoch_and_test_as_their_code_prints_them():
    """benchmarks.studies.side_by_side reads the MDCNS authors' logs: the self model's validation per epoch and
    the final test (MDCNS), the validation per epoch and the test after the switch to the test matrix (DNS+)."""
    from benchmarks.studies.side_by_side import compare, parse_log

    def line(epoch, hit10, ndcg10, ndcg20):
        return (f"{{'Epoch': {epoch}, 'HIT@5': '0.01', 'NDCG@5': '0.01', 'HIT@10': '{hit10}', 'NDCG@10': '{ndcg10}', "
                f"'HIT@20': '0.3', 'NDCG@20': '{ndcg20}'}}")

    mdcns = []
    for epoch, score in enumerate([0.10, 0.12, 0.11]):
        mdcns += [f"---- Validation for Epoch {epoch} ----", line(epoch, 0.2, 0.09, 0.5), "",
                  f"Model 1 (SASRec) Results: {line(epoch, 0.2, 0.09, score)}",
                  f"Model 2 (GRU4Rec) Results: {line(epoch, 0.2, 0.09, 0.99)}",
                  f"---- Test for Epoch {epoch} ----", f"Model 1 (SASRec) Results: {line(epoch, 0.2, 0.09, 0.7)}"]
    with pytest.raises(ValueError, match="not finished"):
        parse_log("\n".join(mdcns), "MDCNS")
    mdcns += ["---- Best Validation Scores for Test ----", line(1, 0.2066, 0.1129, 0.1347)]
    parsed = parse_log("\n".join(mdcns), "MDCNS")
    assert parsed["valid_ndcg@20"] == [0.10, 0.12, 0.11] and parsed["epochs"] == 3 and parsed["best_epoch"] == 1
    assert parsed["test"]["ndcg@10"] == 0.1129 and parsed["test"]["recall@10"] == 0.2066
    dns = [line(0, 0.1, 0.05, 0.02), line(1, 0.1, 0.05, 0.03), line(2, 0.1, 0.05, 0.03),
           "---------------Change to test_rating_matrix!-------------------", line(0, 0.1856, 0.1006, 0.1217)]
    parsed = parse_log("\n".join(dns), "DNS+")
    assert parsed["best_epoch"] == 1 and parsed["test"]["ndcg@10"] == 0.1006  # the first of two equal bests
    resumed = dns[:2] + [line(1, 0.1, 0.05, 0.01)] + dns[2:]  # epoch 1 printed again after a resume: the last counts
    parsed = parse_log("\n".join(resumed), "DNS+")
    assert parsed["best_epoch"] == 2 and parsed["epochs"] == 3 and parsed["valid_ndcg@20"] == [0.02, 0.01, 0.03]
    assert compare([0.10, 0.11, 0.12], [0.105]).endswith("inside our seeds' range")
    assert compare([0.10, 0.11, 0.12], [0.13]).endswith("outside our seeds' range")
    assert compare([0.10], [0.105]) == "-0.0050 (4.8%); one run each: no spread to test against"
    assert compare([0.100, 0.101, 0.102], [0.100, 0.101, 0.102]).endswith("met")
    assert compare([0.100, 0.101, 0.102], [0.120, 0.121, 0.122]).endswith("missed")


def test_a_driver_given_a_results_file_writes_there_and_schedules_from_it(tmp_path, monkeypatch):
    """``benchmarks.converged --run --results F`` (a driver run from another checkout, recording into the main
    one): each cell's record goes to F, so the chosen setting's further seeds are scheduled from it."""
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data")
    grid = {"name": "drv", "preset": "smoke", "results": str(tmp_path / "grid-own.jsonl"), "config": {"epochs": 1},
            "datasets": {"tiny": {"data_path": str(tmp_path / "data")}}, "models": ["SASRec"],
            "samplers": {"u": {"neg_sampler": "uniform"}},
            "selection": {"seeds": [2020, 2021], "families": [{"name": "RNS", "members": ["u"]}], "claims": []}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    elsewhere = tmp_path / "main-checkout.jsonl"
    converged.main(["--run", "--grid", str(path), "--results", str(elsewhere), "--allow-dirty", "--keep-checkpoints",
                    "--out", str(tmp_path / "page.md"), "--plots", str(tmp_path / "plots")])
    records = run.read_results(elsewhere)
    assert sorted(r["cell"]["seed"] for r in records if r["status"] == "ok") == [2020, 2021]
    for r in records:  # --keep-checkpoints: each cell's best model stays, to be re-evaluated later
        saved = run.scratch_dir(run.load_grid(path)[0]) / r["key"] / "saved"
        assert list(saved.glob("*.pth")), saved
        shutil.rmtree(saved)
    assert not (tmp_path / "grid-own.jsonl").exists()
    with pytest.raises(SystemExit, match="one results file"):
        converged.main(["--run", "--grid", str(path), "--results", str(elsewhere), str(elsewhere) + "2",
                        "--out", str(tmp_path / "page.md")])


def test_park_takes_a_converged_grids_further_seeds_too(tmp_path, monkeypatch):
    """A converged grid lists one seed; its chosen settings' further seeds (``selection.seeds``) are cells
    too, and ``--park`` keeps theirs when they were stopped."""
    from recbole_mdcns import run_recbole

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "PARKED", tmp_path / "parked")
    grid = yaml.safe_load(_grid(tmp_path).read_text())
    grid["seeds"] = [2020]
    grid["selection"] = {"seeds": [2020, 2021], "families": [{"name": "RNS", "members": ["uniform"]}]}
    path = tmp_path / "converged.yaml"
    path.write_text(yaml.safe_dump(grid))
    (cell,) = [c for c in run.load_grid(path, seeds=[2021]) if c.sampler == "uniform"]
    workdir = tmp_path / "work"
    run_recbole(cell.model, cell.dataset, config_dict=dict(cell.run_config(workdir), epochs=1))
    run.main(["--grid", str(path), "--park", "--workdir", str(workdir)])
    assert run.parked_dir(cell).is_dir()


def test_a_finished_cell_is_described_by_its_own_validation_metric():
    """The runner's one-line summary reports the test value of the metric the cell selects on (the general
    grids select on NDCG@20 and record no NDCG@10)."""
    record = {"status": "ok", "config": {"valid_metric": "NDCG@20"}, "test": {"ndcg@20": 0.3672, "recall@20": 0.2371},
              "epochs": 70, "seconds_per_epoch": 18.3, "wall_seconds": 1333}
    assert run._describe(record) == "ok: test NDCG@20 0.3672, epochs 70, 18.3 s/epoch, 1333s"
