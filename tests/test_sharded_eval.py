"""Evaluation under DDP: each process scores its block of RecBole's evaluation batches, and the
gathered per-user results give exactly one process's metrics."""
from __future__ import annotations

import ast
import glob
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from conftest import tiny_config
from recbole_mdcns.config import create_config
from recbole_mdcns.models import get_model
from recbole_mdcns.trainer import NegSamplingTrainer

# every per-user record RecBole's evaluator reads: rec.topk, rec.items (ShannonEntropy), rec.meanrank (GAUC)
METRICS = ["Recall", "NDCG", "MRR", "Hit", "ShannonEntropy", "GAUC"]
# 40 users in batches of 7: 6 batches, the last one short, shared 3 + 3 by two processes
SETTINGS = {"neg_sampler": "dns", "candidate_num": 5, "eval_batch_size": 7, "metrics": METRICS,
            "metric_decimal_place": 12}


def _evaluate(data_path: Path, tmp_path: Path) -> dict:
    """Full-sort valid and test evaluation of a freshly seeded SASRec: metrics, RecBole's per-user
    records, and how many rows this process scored."""
    config = create_config("SASRec", "tiny", config_dict=tiny_config(data_path, tmp_path, **SETTINGS))
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    model = get_model("SASRec")(config, train._dataset)
    trainer = NegSamplingTrainer(config, model)
    trainer.eval_collector.data_collect(train)
    structs, scored = [], []
    evaluate_struct, score_batch = trainer.evaluator.evaluate, trainer._full_sort_batch_eval
    trainer.evaluator.evaluate = lambda struct: structs.append(struct) or evaluate_struct(struct)
    trainer._full_sort_batch_eval = lambda batch: scored.append(len(batch[0])) or score_batch(batch)
    results = [trainer.evaluate(data, load_best_model=False) for data in (valid, test)]
    records = [{key: s[key] for key in ("rec.topk", "rec.items", "rec.meanrank")} for s in structs]
    return {"results": results, "records": records, "scored_rows": sum(scored)}


def _rank_main(rank: int, world: int, port: int, data_path: Path, tmp_path: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_evaluate(data_path, tmp_path), tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_one_process_metrics_and_records(tiny_data, in_tmp):
    mp.spawn(_rank_main, args=(2, _free_port(), tiny_data, in_tmp), nprocs=2)
    ranks = [torch.load(in_tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _evaluate(tiny_data, in_tmp)
    for rank in ranks:
        assert rank["results"] == single["results"]  # both processes get the metrics
        for got, want in zip(rank["records"], single["records"]):
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)  # row for row
    assert single["scored_rows"] == sum(len(r["rec.topk"]) for r in single["records"]) == 80  # valid + test users
    # per split, batches of 7, 7, 7 | 7, 7, 5 rows: each process scored its 3 batches, no user twice
    assert [rank["scored_rows"] for rank in ranks] == [42, 38]
    assert single["results"][0]["shannonentropy@10"] > 0 and single["results"][1]["gauc"] > 0


def _logged(log: str, head: str) -> dict:
    """The result dict of RecBole's last ``head`` log line, each value as printed (GAUC is a float32)."""
    line = re.findall(rf"{head}.*?: (OrderedDict\(.*\))", log)[-1]  # after RecBole's colour codes
    return {key: repr(value) for key, value in ast.literal_eval(line[len("OrderedDict("):-1])}


def ddp_cli_run(folder: Path, model: str, config: dict) -> str:
    """``python -m recbole_mdcns`` on the tiny dataset with ``config`` as a YAML file, as 2 CPU DDP processes
    in ``folder``; its stdout and stderr (it must succeed)."""
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "recbole_mdcns", f"--model={model}", "--dataset=tiny", "--config_files",
           str(folder / "tiny.yaml"), "--accelerator=cpu", "--devices=2", "--strategy=ddp"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=folder)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def assert_log_matches_checkpoint(folder: Path, model: str, config_dict: dict, log: str) -> None:
    """The best-valid and test results a run logged equal one process's evaluation of the checkpoint it saved
    in ``folder / saved``, on the data built again from ``config_dict`` (seeded: RecBole's random splits draw)."""
    checkpoint, = glob.glob(str(folder / "saved" / f"{model}-*.pth"))
    config = create_config(model, "tiny", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    trainer = NegSamplingTrainer(config, get_model(model)(config, train._dataset))
    trainer.eval_collector.data_collect(train)
    for head, data in (("best valid", valid), ("test result", test)):
        result = trainer.evaluate(data, model_file=checkpoint)
        assert _logged(log, head) == {key: repr(value) for key, value in result.items()}


def test_ddp_run_validates_and_tests_like_one_process_on_its_checkpoint(tiny_data, in_tmp):
    """MDCNS under 2-process CPU DDP (self, peer and ensemble validation sharded): its best-valid and
    test results equal one process's evaluation of the checkpoint it saved."""
    config = tiny_config(tiny_data, in_tmp, state="INFO", **{**SETTINGS, "neg_sampler": "mdcns"})
    log = ddp_cli_run(in_tmp, "SASRec", config)
    assert "peer valid result" in log and "ensemble valid result" in log

    assert_log_matches_checkpoint(in_tmp, "SASRec", config, log)
