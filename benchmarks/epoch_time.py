"""Time and peak memory of ONE training epoch per negative sampler, reported as ratios.

Default: SASRec on ml-100k, four variants --

* ``uniform``        -- ``neg_sampler: uniform`` (one uniform negative per row);
* ``dns-10``         -- ``neg_sampler: dns``, ``candidate_num: 10``;
* ``dns-100``        -- ``neg_sampler: dns``, ``candidate_num: 100``;
* ``recbole-dns-10`` -- RecBole's own dynamic DNS (``neg_sampler: recbole``,
  ``train_neg_sample_args: {distribution: uniform, sample_num: 1, dynamic: True,
  candidate_num: 10}``, BPR) on RecBole's own ``Trainer``.

``recbole-dns-100`` is the same at ``candidate_num: 100``; with ``--model LightGCN`` (any supported general model)
the variants time RecBole's general models (target: ``dns-100`` >= 5x faster than ``recbole-dns-100``).

``--variants full-sequence`` compares ``train_positions: all`` (``uniform-all``, ``dns-100-all``,
``mdcns-all``, ``divns-all``) with prefix rows (``uniform``) and RecBole's own ``uniform`` pipeline
(``recbole-uniform``); targets ``uniform-all / uniform <= 0.1``, ``mdcns-all / recbole-uniform <= 0.2``,
``dns-100-all / uniform-all <= 1.3``, and DivNS's epoch-end refresh as a share of its epoch.

On request, the papers' baselines ``mixgcf-100``, ``dens-100``, ``ahns-100`` (``candidate_num: 100``),
and (``--variants uniform,peer-uniform,mdcns``), MDCNS against the two models it trains:

* ``peer-uniform``   -- the peer model (``--peer-model``, default GRU4Rec) with ``neg_sampler: uniform``;
* ``mdcns``          -- ``neg_sampler: mdcns`` (``candidate_num: 100``), ``--model`` as self, the peer as peer.
  Its target is ``mdcns / (uniform + peer-uniform) <= 1.15``, the per-round sum of the two uniform epochs.

``--variants baselines-all``: every baseline on ``train_positions: all`` against ``uniform-all`` (target
1.3x each). ``--variants anomaly``: RecBole's own ``uniform`` pipeline and ``uniform-all`` with and without autograd
anomaly detection around the epoch (RecBole's ``sine.py`` switches it on when imported; this package keeps
it off).

Run from the repository root::

    python -m benchmarks.epoch_time                       # full measurement (many minutes on a CPU)
    python -m benchmarks.epoch_time --max-seq-len 10 --rounds 1 --variants uniform,dns-10

**Time.** All variants are set up once (config, dataset, loaders, model, trainer) in
one process; then each round trains one epoch of every variant, the order rotated
from round to round, so the variants share whatever load the machine carries. An
epoch is ``fit(train_data, valid_data=None, saved=False)`` with ``epochs: 1``; the
figure is the training loop alone -- batches loaded, negatives drawn and scored,
forward, backward, optimizer step, and a method's own epoch-end work -- timed from
Lightning's ``on_train_epoch_start`` to the end of the LightningModule's
``on_train_epoch_end`` for ``neg_sampler`` runs and around RecBole's
``Trainer._train_epoch`` for RecBole's (``fit_s`` adds the
trainer's start-up). No data loading, no evaluation. A ratio is the median over
rounds of the per-round ratio.

**Peak memory.** Each variant runs again in a fresh subprocess: setup, then one
epoch inside :class:`benchmarks.common.PeakMemory` -- peak resident set
during the epoch minus the resident set after setup (Linux ``VmHWM`` reset through
``/proc/self/clear_refs``; RSS polling elsewhere), plus CUDA's
``max_memory_allocated`` on a GPU. Ratios use these deltas: the memory training adds
(on a GPU, the CUDA deltas). ``--memory-batches N`` stops those runs after N batches:
every batch but the last has the same shape, so the peak is the epoch's.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from time import perf_counter

from benchmarks.common import (
    PeakMemory, REPO_ROOT, command_line, describe_device, git_state, quiet_warnings, versions,
)

RECBOLE_DNS = {"distribution": "uniform", "sample_num": 1, "dynamic": True, "candidate_num": 10}
VARIANTS = {
    "uniform": {"neg_sampler": "uniform"},
    "dns-10": {"neg_sampler": "dns", "candidate_num": 10},
    "dns-100": {"neg_sampler": "dns", "candidate_num": 100},
    "recbole-dns-10": {"neg_sampler": "recbole", "loss_type": "BPR", "train_neg_sample_args": RECBOLE_DNS},
    "recbole-dns-100": {"neg_sampler": "recbole", "loss_type": "BPR",
                        "train_neg_sample_args": {**RECBOLE_DNS, "candidate_num": 100}},
    "peer-uniform": {"neg_sampler": "uniform"},
    "mdcns": {"neg_sampler": "mdcns", "candidate_num": 100},
    # train_positions: all: every target of a user window from one encoder pass
    "recbole-uniform": {"neg_sampler": "recbole", "loss_type": "BPR",
                        "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}},
    "uniform-all": {"neg_sampler": "uniform", "train_positions": "all"},
    "dns-100-all": {"neg_sampler": "dns", "candidate_num": 100, "train_positions": "all"},
    "mdcns-all": {"neg_sampler": "mdcns", "candidate_num": 100, "train_positions": "all"},
    "divns-all": {"neg_sampler": "divns", "train_positions": "all"},
    "mixgcf-100": {"neg_sampler": "mixgcf", "candidate_num": 100},
    "dens-100": {"neg_sampler": "dens", "candidate_num": 100},
    "ahns-100": {"neg_sampler": "ahns", "candidate_num": 100},
    # the papers' baselines at their defaults; gnno from epoch 0 so that its hard draws are timed
    "adasir": {"neg_sampler": "adasir"},
    "gnno": {"neg_sampler": "gnno", "gnno_start_epoch": 0},
    "srns": {"neg_sampler": "srns"},
}
FULL_SEQUENCE_VARIANTS = ["uniform", "recbole-uniform", "uniform-all", "dns-100-all", "mdcns-all", "divns-all"]
# every baseline at N = 100 (its own pool where it has one) against uniform, all positions
BASELINES_ALL = {"mixgcf-100-all": "mixgcf-100", "dens-100-all": "dens-100", "ahns-100-all": "ahns-100",
                 "adasir-all": "adasir", "gnno-all": "gnno", "srns-all": "srns"}
VARIANTS.update({label: {**VARIANTS[base], "train_positions": "all"} for label, base in BASELINES_ALL.items()})
BASELINE_VARIANTS = ["uniform-all", "dns-100-all", *BASELINES_ALL]
# RecBole's sine.py switches autograd anomaly detection on when imported (recbole_mdcns.compat keeps it
# off): what that costs RecBole's own trainer and ours (Lightning), switched back on around the epoch
VARIANTS.update({f"{label}-anomaly": {**VARIANTS[label], "autograd_anomaly": True}
                 for label in ("recbole-uniform", "uniform-all")})
ANOMALY_VARIANTS = ["recbole-uniform", "recbole-uniform-anomaly", "uniform-all", "uniform-all-anomaly"]
DEFAULT_VARIANTS = ["uniform", "dns-10", "dns-100", "recbole-dns-10"]
# (variant, reference, quantity, relation, bound): "variant / reference" for time, or
# "reference is `bound`x better than variant" for the speed-up / memory saving targets. A tuple
# reference is the sum of those variants' epochs in the same round.
TARGETS = [
    ("dns-100", "uniform", "time", "<=", 1.3),
    ("mdcns", ("uniform", "peer-uniform"), "time", "<=", 1.15),
    ("recbole-dns-10", "dns-10", "time", ">=", 4.0),
    ("recbole-dns-10", "dns-10", "memory", ">=", 3.0),
    ("recbole-dns-100", "dns-100", "time", ">=", 5.0),
    ("uniform-all", "uniform", "time", "<=", 0.1),
    ("mdcns-all", "recbole-uniform", "time", "<=", 0.2),
    ("dns-100-all", "uniform-all", "time", "<=", 1.3),
    *((label, "uniform-all", "time", "<=", 1.3) for label in ("mixgcf-100-all", "dens-100-all", "ahns-100-all",
                                                              "adasir-all", "gnno-all", "srns-all")),
]
MEMORY_TAG = "EPOCH_TIME_MEMORY "


def base_config(args) -> dict:
    """Settings shared by every variant (the user's RecBole settings in a real run)."""
    cuda = args.device.startswith("cuda")
    config = {
        "MAX_ITEM_LIST_LENGTH": args.max_seq_len,
        "train_batch_size": args.batch_size,
        "epochs": 1,
        "seed": args.seed,
        "reproducibility": True,
        "show_progress": False,
        "state": "WARNING",
        "use_gpu": cuda,
        "gpu_id": args.device.split(":", 1)[1] if ":" in args.device else ("0" if cuda else ""),
        "accelerator": "gpu" if cuda else "cpu",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "checkpoint_dir": os.path.join(args.workdir, "saved"),
    }
    if args.data_path:
        config["data_path"] = os.path.abspath(args.data_path)
    return config


def variant_spec(label: str, args) -> tuple[str, dict]:
    """The model and config overrides of variant ``label``: ``peer-uniform`` trains the peer model,
    ``mdcns`` pairs ``--model`` (self) with it."""
    overrides = dict(VARIANTS[label])
    if label.startswith("mdcns"):
        overrides["mdcns_peer_model"] = args.peer_model
    return (args.peer_model if label == "peer-uniform" else args.model), overrides


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _candidates_on_device(train_data, device) -> str:
    """RecBole 1.2.1's dynamic sampling fails on CUDA: it indexes the CPU tensor of candidate ids
    with the CUDA ``argmax`` of their scores (``RuntimeError: indices should be either on cpu or on
    the same device``). Have its sampler hand the candidates over on the model's device instead --
    RecBole copies them there itself one line later -- so the rest of its code runs unchanged."""
    sampler = train_data._sampler
    draw = sampler.sample_by_user_ids

    def on_device(*args, **kwargs):
        return draw(*args, **kwargs).to(device)

    sampler.sample_by_user_ids = on_device
    return "candidate ids returned on the CUDA device (RecBole 1.2.1 dynamic sampling fails on CUDA otherwise)"


class _FirstBatches:
    """A RecBole loader cut to its first ``n`` batches (everything else passes through)."""

    def __init__(self, loader, n: int) -> None:
        self._loader, self._n = loader, n

    def __iter__(self):
        for index, batch in enumerate(self._loader):
            if index >= self._n:
                break
            yield batch

    def __len__(self) -> int:
        return min(self._n, len(self._loader))

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _timed_trainers():
    """Trainer subclasses that record the training-loop seconds of each epoch in ``epoch_times``."""
    import pytorch_lightning as pl
    from recbole_mdcns.trainer import NegSamplingTrainer

    class EpochTimer(pl.Callback):
        """From ``on_train_epoch_start`` to the end of the LightningModule's own
        ``on_train_epoch_end`` (which Lightning calls after the callbacks' hooks), so a
        method's epoch-end work -- DivNS' k-DPP refresh -- counts as part of its epoch."""

        def __init__(self, owner) -> None:
            self.owner, self.start = owner, 0.0

        def on_fit_start(self, trainer, module) -> None:
            hook = module.on_train_epoch_end

            def timed_epoch_end(*args, **kwargs):
                out = hook(*args, **kwargs)
                _sync(module.device)
                self.owner.epoch_times.append(perf_counter() - self.start)
                return out

            module.on_train_epoch_end = timed_epoch_end

        def on_train_epoch_start(self, trainer, module) -> None:
            _sync(module.device)
            self.start = perf_counter()

    class TimedNegSamplingTrainer(NegSamplingTrainer):
        epoch_times: list

        max_batches: int | None = None

        def _lightning_trainer(self, callbacks, *args, **kwargs):
            trainer = super()._lightning_trainer([EpochTimer(self), *callbacks], *args, **kwargs)
            if self.max_batches:
                trainer.limit_train_batches = self.max_batches
            return trainer

    def timed_recbole(base):
        class TimedRecBoleTrainer(base):
            epoch_times: list

            max_batches: int | None = None

            def _train_epoch(self, train_data, *args, **kwargs):
                if self.max_batches:
                    train_data = _FirstBatches(train_data, self.max_batches)
                _sync(self.device)
                start = perf_counter()
                loss = super()._train_epoch(train_data, *args, **kwargs)
                _sync(self.device)
                self.epoch_times.append(perf_counter() - start)
                return loss

        return TimedRecBoleTrainer

    return TimedNegSamplingTrainer, timed_recbole


class Variant:
    """One sampler's config, data, model and trainer, built once and trained one epoch per call."""

    def __init__(self, label: str, overrides: dict, base: dict, model: str, dataset: str) -> None:
        """``base`` and ``overrides`` are RecBole config dicts (``overrides`` wins)."""
        from recbole.data import create_dataset, data_preparation
        from recbole.utils import get_model, get_trainer, init_seed
        from recbole_mdcns.config import create_config
        from recbole_mdcns.data import candidate_train_loader

        self.label = label
        overrides = dict(overrides)
        self.anomaly = overrides.pop("autograd_anomaly", False)
        config_dict = copy.deepcopy({**base, **overrides})
        self.config = create_config(model, dataset, None, config_dict)
        init_seed(self.config["seed"], self.config["reproducibility"])
        data = create_dataset(self.config)
        train_data, _, _ = data_preparation(self.config, data)
        self.ours = self.config["neg_sampler"] != "recbole"
        if self.ours:
            train_data = candidate_train_loader(self.config, train_data)
        self.train_data = train_data
        self.patched = None
        dynamic = (self.config["train_neg_sample_args"] or {}).get("dynamic", False)
        if not self.ours and dynamic and self.config["device"].type == "cuda":
            self.patched = _candidates_on_device(train_data, self.config["device"])
        init_seed(self.config["seed"], self.config["reproducibility"])
        self.model = get_model(self.config["model"])(self.config, train_data._dataset).to(self.config["device"])
        ours_cls, timed_recbole = _timed_trainers()
        cls = ours_cls if self.ours else timed_recbole(get_trainer(self.config["MODEL_TYPE"], self.config["model"]))
        self.trainer = cls(self.config, self.model)
        self.trainer.epoch_times = []
        self.device = self.config["device"]
        self.rows, self.batches = len(train_data._dataset), len(train_data)

    def limit_batches(self, n: int | None) -> None:
        """Train only the first ``n`` batches of each epoch (``None``: the whole epoch)."""
        self.trainer.max_batches = n

    def run_epoch(self) -> dict:
        """Train one epoch; ``epoch_s`` is the training loop, ``fit_s`` the whole ``fit`` call."""
        import torch

        start = perf_counter()
        with torch.autograd.set_detect_anomaly(self.anomaly):
            self.trainer.fit(self.train_data, None, verbose=False, saved=False, show_progress=False)
        _sync(self.device)
        fit_s = perf_counter() - start
        result = {"epoch_s": self.trainer.epoch_times[-1], "fit_s": fit_s}
        history = getattr(self.trainer.module, "negative_history", None) if self.ours else None
        if history and "refresh_seconds" in history[-1]:  # DivNS: its epoch-end k-DPP refresh, inside epoch_s
            result["refresh_s"] = history[-1]["refresh_seconds"]
        return result


def _silence() -> None:
    quiet_warnings()
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def measure_times(args, labels: list[str]) -> dict:
    """Interleaved rounds in this process: ``{label: {"epoch_s": [...], "fit_s": [...], ...}}``."""
    base = base_config(args)
    variants = {}
    for label in labels:
        start = perf_counter()
        model, overrides = variant_spec(label, args)
        variants[label] = Variant(label, overrides, base, model, args.dataset)
        print(f"[setup] {label}: {variants[label].rows} training rows, {variants[label].batches} batches, "
              f"{perf_counter() - start:.1f}s", flush=True)
    for _ in range(args.warmup):
        for label in labels:
            result = variants[label].run_epoch()
            print(f"[warm-up] {label}: epoch {result['epoch_s']:.2f}s (not counted)", flush=True)
    times = {label: {"epoch_s": [], "fit_s": [], "refresh_s": []} for label in labels}
    for rnd in range(args.rounds):
        order = labels[rnd % len(labels):] + labels[:rnd % len(labels)]
        for label in order:
            result = variants[label].run_epoch()
            for key, value in result.items():
                times[label][key].append(value)
            print(f"[round {rnd + 1}/{args.rounds}] {label}: epoch {result['epoch_s']:.2f}s "
                  f"(fit {result['fit_s']:.2f}s)", flush=True)
    for label in labels:
        times[label]["rows"], times[label]["batches"] = variants[label].rows, variants[label].batches
        times[label]["device"] = str(variants[label].device)
        if variants[label].patched:
            times[label]["patched"] = variants[label].patched
    return times


def memory_child(args) -> None:
    """Fresh process: set one variant up, then measure the peak memory of one epoch."""
    model, overrides = variant_spec(args.memory_child, args)
    variant = Variant(args.memory_child, overrides, base_config(args), model, args.dataset)
    variant.limit_batches(args.memory_batches)
    with PeakMemory(variant.device) as peak:
        result = variant.run_epoch()
    print(MEMORY_TAG + json.dumps({**peak.as_dict(), **result}), flush=True)


def measure_memory(args, labels: list[str]) -> dict:
    """One fresh subprocess per variant; ``{label: PeakMemory.as_dict() + epoch_s}``."""
    out = {}
    for label in labels:
        cmd = [sys.executable, "-m", "benchmarks.epoch_time", "--memory-child", label,
               "--model", args.model, "--peer-model", args.peer_model, "--dataset", args.dataset,
               "--max-seq-len", str(args.max_seq_len),
               "--batch-size", str(args.batch_size), "--device", args.device, "--seed", str(args.seed),
               "--workdir", args.workdir]
        if args.memory_batches:
            cmd += ["--memory-batches", str(args.memory_batches)]
        if args.data_path:
            cmd += ["--data-path", os.path.abspath(args.data_path)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=args.workdir, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MEMORY_TAG)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory run of {label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        out[label] = json.loads(lines[-1][len(MEMORY_TAG):])
        mem = out[label]
        print(f"[memory] {label}: +{mem['peak_rss_delta_mib']:.0f} MiB over {mem['baseline_rss_mib']:.0f} MiB "
              f"after setup" + (f", CUDA +{mem['cuda_peak_delta_mib']:.0f} MiB" if mem.get("cuda_peak_delta_mib")
                                is not None else ""), flush=True)
    return out


def _median(values):
    return statistics.median(values) if values else None


def summarize(times: dict, memory: dict, reference: str = "uniform") -> dict:
    """Medians, per-round time ratios against ``reference``, memory ratios and the targets."""
    summary = {"variants": {}, "targets": []}
    labels = list(times or memory)
    cuda = any(m.get("cuda_peak_delta_mib") is not None for m in memory.values())
    mem_key = "cuda_peak_delta_mib" if cuda else "peak_rss_delta_mib"  # on a GPU, compare GPU memory
    for label in labels:
        entry = {}
        if label in times:
            entry.update({"epoch_s_median": _median(times[label]["epoch_s"]),
                          "fit_s_median": _median(times[label]["fit_s"])})
            if reference in times:
                per_round = [a / b for a, b in zip(times[label]["epoch_s"], times[reference]["epoch_s"])]
                entry[f"time_vs_{reference}"] = _median(per_round)
            if times[label].get("refresh_s"):
                entry["refresh_share"] = _median([r / e for r, e in zip(times[label]["refresh_s"],
                                                                        times[label]["epoch_s"])])
        if label in memory:
            entry["peak_delta_mib"] = memory[label]["peak_rss_delta_mib"]
            if memory[label].get("cuda_peak_delta_mib") is not None:
                entry["cuda_peak_delta_mib"] = memory[label]["cuda_peak_delta_mib"]
            if reference in memory and memory[reference][mem_key]:
                entry[f"memory_vs_{reference}"] = memory[label][mem_key] / memory[reference][mem_key]
        summary["variants"][label] = entry
    for variant, ref, quantity, relation, bound in TARGETS:
        value = None
        refs = ref if isinstance(ref, tuple) else (ref,)
        if quantity == "time" and variant in times and all(r in times for r in refs):
            ref_s = [sum(round_s) for round_s in zip(*(times[r]["epoch_s"] for r in refs))]
            value = _median([a / b for a, b in zip(times[variant]["epoch_s"], ref_s)])
            ref = " + ".join(refs)
        elif quantity == "memory" and variant in memory and ref in memory and memory[ref][mem_key]:
            value = memory[variant][mem_key] / memory[ref][mem_key]
        if value is None:
            continue
        ok = value <= bound if relation == "<=" else value >= bound
        summary["targets"].append({"variant": variant, "reference": ref, "quantity": quantity,
                                   "ratio": value, "relation": relation, "bound": bound, "met": ok})
    return summary


def render(summary: dict, times: dict, memory: dict, reference: str = "uniform") -> str:
    lines = ["| variant | epoch s (median) | per round | fit s | time / uniform | peak MiB added by the epoch "
             "| memory / uniform |",
             "|---|---|---|---|---|---|---|"]
    for label, entry in summary["variants"].items():
        rounds = " ".join(f"{t:.2f}" for t in times.get(label, {}).get("epoch_s", []))
        def fmt(key, spec):
            return format(entry[key], spec) if entry.get(key) is not None else "–"
        mem = fmt("peak_delta_mib", ".0f")
        if entry.get("cuda_peak_delta_mib") is not None:
            mem += f" (CUDA {entry['cuda_peak_delta_mib']:.0f})"
        lines.append(f"| {label} | {fmt('epoch_s_median', '.2f')} | {rounds or '–'} | {fmt('fit_s_median', '.2f')} "
                     f"| {fmt(f'time_vs_{reference}', '.2f')}{'x' if entry.get(f'time_vs_{reference}') is not None else ''} | {mem} "
                     f"| {fmt(f'memory_vs_{reference}', '.2f')}{'x' if entry.get(f'memory_vs_{reference}') is not None else ''} |")
    lines.append("")
    for label, entry in summary["variants"].items():
        if entry.get("refresh_share") is not None:
            lines.append(f"- {label}: epoch-end k-DPP refresh = {entry['refresh_share']:.1%} of the epoch")
    for t in summary["targets"]:
        if t["relation"] == "<=":
            text = (f"{t['variant']} time / ({t['reference']}) time = {t['ratio']:.2f}x "
                    f"(target {t['relation']} {t['bound']}x)")
        else:
            what = "faster" if t["quantity"] == "time" else "less peak memory"
            text = f"{t['reference']} is {t['ratio']:.2f}x {what} than {t['variant']} (target {t['relation']} {t['bound']}x)"
        lines.append(f"- {'MET' if t['met'] else 'NOT MET'}: {text}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SASRec")
    parser.add_argument("--peer-model", default="GRU4Rec", help="peer of the mdcns variant, model of peer-uniform")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-path", default=None, help="folder holding <dataset>/ (ml-100k ships with RecBole)")
    parser.add_argument("--max-seq-len", type=int, default=50, help="MAX_ITEM_LIST_LENGTH (RecBole's default 50)")
    parser.add_argument("--batch-size", type=int, default=2048, help="train_batch_size (RecBole's default 2048)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed epochs of every variant before the rounds (worth 1 on a GPU)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}, or full-sequence "
                             f"({','.join(FULL_SEQUENCE_VARIANTS)}), baselines-all, anomaly")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--memory-batches", type=int, default=None,
                        help="memory runs train only the first N batches (all batches have the same size, so "
                             "the peak is the epoch's; default: the whole epoch)")
    parser.add_argument("--skip-memory", action="store_true", help="time only")
    parser.add_argument("--skip-time", action="store_true", help="memory only")
    parser.add_argument("--json", default=None, help="also write the measurement to this JSON file")
    parser.add_argument("--workdir", default=None, help="scratch folder for RecBole's logs (default: a temp dir)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    _silence()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    labels = [v.strip() for v in args.variants.split(",") if v.strip()]
    if labels == ["full-sequence"]:  # all positions against prefix rows
        labels = list(FULL_SEQUENCE_VARIANTS)
    elif labels == ["baselines-all"]:  # the baselines against uniform, all positions
        labels = list(BASELINE_VARIANTS)
    elif labels == ["anomaly"]:
        labels = list(ANOMALY_VARIANTS)
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.json:
        args.json = os.path.abspath(args.json)
    if args.data_path:  # before the chdir below
        args.data_path = os.path.abspath(args.data_path)
    with tempfile.TemporaryDirectory(prefix="epoch_time-") as tmp:
        args.workdir = os.path.abspath(args.workdir or tmp)
        os.makedirs(args.workdir, exist_ok=True)
        os.chdir(args.workdir)  # RecBole writes log/ and log_tensorboard/ into the working directory
        if args.memory_child:
            memory_child(args)
            return None
        command = command_line(argv, "benchmarks.epoch_time")
        print(f"$ {command}", flush=True)
        git = git_state()  # the code this run starts with
        start = perf_counter()
        times = {} if args.skip_time else measure_times(args, labels)
        memory = {} if args.skip_memory else measure_memory(args, labels)
        summary = summarize(times, memory)
        import torch

        record = {"command": command, "settings": {k: v for k, v in vars(args).items()
                                                   if k not in ("memory_child", "workdir", "json")},
                  "device": describe_device(args.device), "versions": versions(), "git": git,
                  "wall_s": perf_counter() - start, "times": times, "memory": memory, "summary": summary,
                  "torch_threads": torch.get_num_threads()}
    table = render(summary, times, memory)
    print(f"\n{args.model} on {args.dataset}, MAX_ITEM_LIST_LENGTH={args.max_seq_len}, "
          f"train_batch_size={args.batch_size}, device={args.device}, torch threads={record['torch_threads']}, "
          f"{args.rounds} interleaved round(s), wall {record['wall_s']:.0f}s\n")
    print(table, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2, default=str)
    return record


if __name__ == "__main__":
    main()
