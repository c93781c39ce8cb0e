"""Issue 14's six samplers and the full softmax on two gloo CPU ranks, in one pair of processes (one start-up
for the seven runs).

The test launches both ranks itself (``LOCAL_RANK`` set, as torchrun does), so Lightning creates no
processes and the seven fits share one process group. Both ranks must end with the same test results;
each epoch's negative count covers the rows of both ranks (all_gathered); DENS's gates and their param
group are in the Lightning checkpoint; after every epoch end each rank dumps its sampler state, and the
per-user state of AdaSIR and SRNS must be identical on both ranks (merged) and complete.
"""
from __future__ import annotations

import collections
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from conftest import tiny_config

SCRIPT = r'''
import os, sys
from pathlib import Path

import torch
import yaml

import recbole_mdcns
from recbole_mdcns.methods.adasir import AdaSIRModule
from recbole_mdcns.methods.gnno import GNNOModule
from recbole_mdcns.methods.srns import SRNSModule

out, config = Path(sys.argv[1]), yaml.safe_load(open(sys.argv[2]))
rank = int(os.environ["LOCAL_RANK"])


def dump_state_at_epoch_end(cls, name):
    original = cls.on_train_epoch_end

    def on_train_epoch_end(self):
        original(self)
        state = {}
        self.on_save_checkpoint(state)
        torch.save(state, out / f"{name}-rank{rank}-epoch{self.current_epoch}.pt")

    cls.on_train_epoch_end = on_train_epoch_end


dump_state_at_epoch_end(AdaSIRModule, "adasir")
dump_state_at_epoch_end(GNNOModule, "gnno")
dump_state_at_epoch_end(SRNSModule, "srns")
runs = {"mixgcf": {"candidate_num": 20, "top_m": 2, "neg_num": 2}, "dens": {"candidate_num": 20},
        "ahns": {"candidate_num": 20}, "adasir": {"candidate_num": 30, "adasir_pool_size": 8},
        "gnno": {"gnno_start_epoch": 0, "gnno_pace": 0.3},
        "srns": {"candidate_num": 12, "srns_memory_size": 4, "srns_warmup": 1, "srns_temperature": 0.1},
        "full_softmax": {}}
for name, extra in runs.items():
    result = recbole_mdcns.run_recbole("SASRec", "tiny", config_dict={
        **config, **extra, "neg_sampler": name, "checkpoint_dir": str(out / name / "saved")})
    print(f"RESULT {name} {dict(result['test_result'])}", flush=True)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks_train_the_baselines_alike_and_merge_their_state(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path, epochs=2, train_batch_size=32, accelerator="cpu", devices=2,
                         strategy="ddp", use_gpu=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "ddp_runs.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    repository = str(Path(__file__).resolve().parent.parent)
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0",
                "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                "PYTHONPATH": os.pathsep.join([repository, env.get("PYTHONPATH", "")])})
    command = [sys.executable, str(tmp_path / "ddp_runs.py"), str(tmp_path), str(tmp_path / "config.yaml")]
    procs = [subprocess.Popen(command, cwd=tmp_path, env={**env, "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs[0][-3000:] + outputs[1][-3000:]
    names = ("mixgcf", "dens", "ahns", "adasir", "gnno", "srns", "full_softmax")
    results = [dict(re.findall(r"RESULT (\w+) (\{[^}]*\})", output)) for output in outputs]
    assert set(results[0]) == set(names) and results[0] == results[1]  # both ranks test the same model

    lines = (tiny_data / "tiny" / "tiny.inter").read_text().splitlines()[1:]
    rows = sum(n - 3 for n in collections.Counter(line.split("\t")[0] for line in lines).values())  # LS: 2 held out
    for name, k in (("mixgcf", 2), ("dens", 1), ("ahns", 1)):
        (path,) = (tmp_path / name / "saved").glob("*-lightning/last.ckpt")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["negatives"]["history"][0]["negatives"] == 2 * math.ceil(rows / 2) * k, name
        if name == "dens":
            assert "gates.neg_gate.weight" in ckpt["state_dict"]
            assert len(ckpt["optimizer_states"][0]["param_groups"]) == 2
    (path,) = (tmp_path / "full_softmax" / "saved").glob("*-lightning/last.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # every row: all items but padding and target
    n_items = ckpt["state_dict"]["model.item_embedding.weight"].shape[0]
    assert ckpt["negatives"]["history"][0]["negatives"] == 2 * math.ceil(rows / 2) * (n_items - 2)

    def states(name, epoch):
        return [torch.load(tmp_path / f"{name}-rank{rank}-epoch{epoch}.pt", weights_only=True) for rank in (0, 1)]

    for epoch in (0, 1):
        a0, a1 = (s["adasir"] for s in states("adasir", epoch))
        assert torch.equal(a0["pool"], a1["pool"]) and torch.equal(a0["pool_log_w"], a1["pool_log_w"])
        assert bool(a0["filled"][1:].all()) and (a0["pool"][1:] > 0).all()  # all 40 users, from both ranks
        s0, s1 = (s["srns"] for s in states("srns", epoch))
        assert torch.equal(s0["memory"], s1["memory"]) and (s0["memory"][1:] > 0).all()
        assert torch.allclose(s0["history"], s1["history"], equal_nan=True)
        assert (~s0["history"][:, :, epoch].isnan()).sum() > 0
        g0, g1 = (s["negatives"] for s in states("gnno", epoch))
        assert g0["history"] == g1["history"]  # negative statistics are summed over both ranks
    history = states("gnno", 1)[0]["negatives"]["history"]
    assert history[1]["hardness_threshold"] == 0.3 and history[1]["graph_negative_fraction"] > 0.5
