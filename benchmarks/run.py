"""Benchmark harness: run a grid of samplers x models x datasets x seeds through ``run_recbole``.

    python -m benchmarks.run --grid benchmarks/grids/cpu_baselines.yaml
    python -m benchmarks.run --grid benchmarks/grids/smoke.yaml --dry-run     # list cells and their state
    python -m benchmarks.run --grid benchmarks/grids/cpu_baselines.yaml --timing   # interleaved epoch-time ratios
    python -m benchmarks.report                                               # -> benchmarks/RESULTS.md
    python -m benchmarks.run --grid benchmarks/grids/converged_lastfm.yaml --verify --epochs 3 \
        --only 'dns-m10 | * | lastfm | seed 2020'      # rerun a recorded cell: MATCH or DIFFERS, per record

Each cell is one ``recbole_mdcns.run_recbole(model, dataset, config_dict=...)`` call,
by default in a fresh subprocess (clean peak-memory figures; a crash or an
out-of-memory kill costs that cell only). Its record is appended to the grid's
results file (JSON Lines) the moment the cell ends; re-running the same grid
skips every cell that already has an ``ok`` record, so a killed run loses at most
the cell it was in. Nothing is ever rewritten: a changed setting is a new cell
(cells are keyed by a hash of their full config), a failed cell is recorded as
``status: error`` and tried again on the next run.

A record names the commit it ran at (``git``). Cells run only from committed package code
(``recbole_mdcns/``, ``config_yamls/``, ``pyproject.toml`` and the harness modules that build and
record a cell, :data:`benchmarks.common.PACKAGE_PATHS`): with uncommitted changes there the run is
refused, naming the files, unless ``--allow-dirty`` -- then each record's ``git.package_dirty`` lists
them and ``git.diff_sha256`` hashes the changes. Results files, documents and grid files may change.
``--verify`` reruns recorded cells at the current commit (``--epochs N``: their first N epochs only)
and compares each record's validation curve and metrics; same commit, seed and machine give the same
numbers on a CPU, a different CPU need not (see benchmarks/REPRODUCIBILITY.md).

The grid file (YAML)::

    name: cpu_baselines                  # default: the file's stem
    preset: cpu                          # base settings from benchmarks/presets.py (smoke | cpu | paper)
    results: benchmarks/results/cpu.jsonl   # default: benchmarks/results/<preset or name>.jsonl
    config: {stopping_step: 5}           # RecBole settings for every cell, over the preset
    datasets:                            # label: settings (a list of names works too)
      ml-100k: {}                        # ships with RecBole
      lastfm: {data_path: ../shared/datasets}   # relative paths: from the directory you run in
    models:
      SASRec: {}
      GRU4Rec: {hidden_size: 64}
    samplers:                            # label: settings; the label names the row in the report
      uniform: {neg_sampler: uniform}
      dns: {neg_sampler: dns, candidate_num: 100}
    seeds: [2020, 2021, 2022]
    baselines: [uniform, dns]            # default: labels whose neg_sampler is uniform|popularity|dns|recbole

A dataset entry's ``user_split: {inter: PATH (or ml-100k), seed: S, ratios: [..], heldout: last|prefixes, max_len: N}``
(or ``assignment:`` in place of seed and ratios) runs it in the MDCNS authors' protocol: the options of
``python -m recbole_mdcns.user_split``, whose files are written once under ``benchmarks/.work/data/`` and
whose settings (benchmark files, ``eval_mask_history: true`` unless the grid sets it) every cell gets.
An entry's settings may name ``dataset:`` / ``model:`` to use a label other than
the RecBole name. Settings merge as preset < config < dataset < model < sampler < seed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import yaml

from benchmarks.common import (
    REPO_ROOT, PeakMemory, command_line, describe_device, dumps, git_state, lifetime_peak_rss_mib,
    package_changes, quiet_warnings, to_jsonable, versions,
)
from benchmarks.presets import preset as preset_settings

SCHEMA = 1
BASELINE_SAMPLERS = ("uniform", "popularity", "dns", "recbole")
# settings that change how a cell logs or where it writes, not what it computes: not part of its key
NON_SEMANTIC = ("checkpoint_dir", "state", "show_progress", "log_wandb", "worker")
RESULT_TAG = "BENCHMARK_CELL_DONE "
SPLIT_DATA = REPO_ROOT / "benchmarks" / ".work" / "data"  # user_split: datasets' files, rebuilt when absent
USER_SPLIT = "user_split"
USER_SPLIT_OPTIONS = ("inter", "seed", "ratios", "assignment", "heldout", "max_len")
# glibc keeps freed blocks up to 4 GiB in the heap instead of returning each large one to the kernel, which then
# zeroes fresh pages for it at the next step: a third of the CPU time of a SASRec run on prefix rows, whose epochs
# take 0.69x as long with both set (benchmarks/studies/cpu_malloc.md).
# Read when a process starts; ignored by other C libraries; the results do not depend on it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 32), "MALLOC_TRIM_THRESHOLD_": str(2 ** 32)}
PARKED = REPO_ROOT / "benchmarks" / "parked"  # unfinished cells' checkpoints, committed between sessions


@dataclass
class Cell:
    grid: str
    preset: str | None
    sampler: str
    model_label: str
    model: str
    dataset_label: str
    dataset: str
    seed: int
    role: str                       # "baseline" | "proposed"
    config: dict                    # as written in the grid (relative data_path kept)
    results: str                    # absolute path of the results file
    data_path: str | None = None    # absolute data_path (the config keeps the grid's spelling)
    split: dict | None = None       # a dataset's ``user_split:`` with an absolute ``inter`` (config: as written)
    key: str = field(default="")

    def __post_init__(self) -> None:
        if not self.key:
            self.key = cell_key(self)

    @property
    def name(self) -> str:
        return f"{self.sampler} | {self.model_label} | {self.dataset_label} | seed {self.seed}"

    @property
    def group(self) -> str:
        """Cells that differ only in their seed share a group (mean / std over seeds)."""
        config = {k: v for k, v in self.config.items() if k not in NON_SEMANTIC and k != "seed"}
        return _hash({"model": self.model, "dataset": self.dataset, "sampler": self.sampler, "config": config})

    def run_config(self, workdir: Path, resume: bool = True) -> dict:
        """The config dict handed to ``run_recbole``: paths made absolute, a private checkpoint dir;
        ``resume``: go on from a killed attempt's or a parked checkpoint, if there is one."""
        config = copy.deepcopy(self.config)
        if self.data_path:
            config["data_path"] = self.data_path
        if self.split is not None:
            written = user_split_config(self.dataset, config.pop(USER_SPLIT), self.split)
            written["load_col"] = {**(config.get("load_col") or {}), **written["load_col"]}  # + e.g. item features
            config.update({k: v for k, v in written.items() if not (k == "eval_mask_history" and k in self.config)})
        saved = workdir / self.key / "saved"
        config["checkpoint_dir"] = str(saved)
        resume = (last_checkpoint(saved) or unpark(self, saved)) if resume else None
        if resume is not None:  # an earlier attempt was killed (e.g. a session ended): go on from its last epoch
            config["resume_from"] = str(resume)
        return config


def _inter_path(inter: str) -> str:
    """A ``user_split: inter:`` as an absolute path: a file, or the name of a dataset RecBole ships (ml-100k)."""
    if not os.path.exists(inter) and os.sep not in inter:
        import recbole

        shipped = Path(recbole.__file__).parent / "dataset_example" / inter / f"{inter}.inter"
        if shipped.is_file():
            return str(shipped)
    return os.path.abspath(inter)


def user_split_config(dataset: str, spec: dict, resolved: dict) -> dict:
    """The RecBole settings that load a grid dataset's ``user_split:`` files (``spec`` as the grid writes it,
    ``resolved`` with an absolute ``inter``), written by ``python -m recbole_mdcns.user_split`` once into
    ``benchmarks/.work/data/<dataset>-<hash of spec>/`` and reused by every cell and driver after."""
    from recbole_mdcns import user_split

    out = SPLIT_DATA / f"{dataset}-{_hash(spec)}"
    settings = out / dataset / f"{dataset}.yaml"
    if not settings.exists():
        argv = ["--inter", resolved["inter"], "--out", str(out), "--name", dataset]
        for option in USER_SPLIT_OPTIONS[1:]:
            value = resolved.get(option)
            if value is not None:
                argv += [f"--{option.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
        try:
            with contextlib.redirect_stdout(sys.stderr):
                user_split.main(argv)
        except (SystemExit, OSError):
            if not settings.exists():  # not another driver writing the same split at the same time
                raise ValueError(f"datasets: {dataset}: python -m recbole_mdcns.user_split {' '.join(argv)} failed")
    with open(settings) as f:
        return yaml.safe_load(f)


def last_checkpoint(saved: Path) -> Path | None:
    """The newest ``last.ckpt`` a sampler run wrote under ``saved`` (one per attempt), if any."""
    found = sorted(saved.glob("*-lightning/last.ckpt"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def scratch_dir(cell: Cell, workdir: Path | None = None) -> Path:
    """Where a cell's process runs and writes (``--workdir``, default ``benchmarks/.work/<grid>``)."""
    return Path(workdir or REPO_ROOT / "benchmarks" / ".work" / cell.grid).resolve()


def parked_dir(cell: Cell, parked: Path | None = None) -> Path:
    return (parked or PARKED) / cell.grid / cell.key


def park(cells: list[Cell], workdir: Path | None = None, parked: Path | None = None) -> list[Cell]:
    """Copy each unfinished cell's checkpoints -- its newest ``last.ckpt`` and the best model it names --
    from the scratch folder into ``<parked>/<grid>/<key>/`` (``benchmarks/parked``, which is committed), so
    that a session on a fresh machine resumes the cell where this one stopped; drop the parked copy of each
    finished cell. Stop the drivers first (a copy taken mid-write would be torn). Returns the cells parked."""
    from recbole_mdcns.trainer import best_model_of

    done = set().union(*(finished_keys(results) for results in {c.results for c in cells}))
    kept = []
    for cell in cells:
        target = parked_dir(cell, parked)
        last = last_checkpoint(scratch_dir(cell, workdir) / cell.key / "saved")
        if cell.key not in done and last is None:
            continue  # never started here: what is parked (if anything) is still its newest
        shutil.rmtree(target, ignore_errors=True)
        if cell.key in done:
            continue
        best = Path(best_model_of(str(last)))
        (target / last.parent.name).mkdir(parents=True)
        shutil.copy2(last, target / last.parent.name / last.name)  # last.ckpt first: the best model is as new
        if best.exists():
            shutil.copy2(best, target / best.name)
        kept.append(cell)
    return kept


def unpark(cell: Cell, saved: Path, parked: Path | None = None) -> Path | None:
    """The cell's parked checkpoints (see :func:`park`) copied into its empty scratch folder ``saved``;
    returns the ``last.ckpt`` to resume from, or None when nothing is parked."""
    source = parked_dir(cell, parked)
    if not source.is_dir():
        return None
    shutil.copytree(source, saved, dirs_exist_ok=True)
    return last_checkpoint(saved)


def _hash(value) -> str:
    return hashlib.sha1(dumps(value).encode()).hexdigest()[:16]


def cell_key(cell: Cell) -> str:
    config = {k: v for k, v in cell.config.items() if k not in NON_SEMANTIC}
    return _hash({"model": cell.model, "dataset": cell.dataset, "sampler": cell.sampler,
                  "model_label": cell.model_label, "dataset_label": cell.dataset_label, "config": config})


# --------------------------------------------------------------------------------- grid file
def _entries(raw, name_key: str | None, what: str) -> list[tuple[str, str | None, dict]]:
    """``[(label, recbole_name, settings)]`` from a mapping or a list of names / one-key mappings."""
    if raw is None:
        raise ValueError(f"grid has no {what}")
    items = []
    if isinstance(raw, dict):
        items = list(raw.items())
    else:
        for entry in raw:
            if isinstance(entry, str):
                items.append((entry, {}))
            elif isinstance(entry, dict) and len(entry) == 1:
                items.append(next(iter(entry.items())))
            else:
                raise ValueError(f"{what}: each entry is a name or {{label: settings}}, got {entry!r}")
    out = []
    for label, settings in items:
        settings = copy.deepcopy(settings or {})
        if not isinstance(settings, dict):
            raise ValueError(f"{what} {label!r}: settings must be a mapping, got {settings!r}")
        recbole_name = settings.pop(name_key, label) if name_key else None
        out.append((str(label), recbole_name, settings))
    return out


def read_grid(path: str | Path) -> dict:
    """A grid file's mapping. ``extends: OTHER.yaml`` (beside it) takes every key of that grid but ``name``,
    this file's keys replacing its keys -- but ``config`` and ``samplers`` are merged into the other's (a sampler
    both name: this file's keys over the other's), and so is ``selection`` key by key, its ``families``,
    ``priority`` and ``claims`` lists appended to the other's."""
    path = Path(path)
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if "extends" not in raw:
        return raw
    parent = read_grid(path.parent / raw.pop("extends"))
    parent.pop("name", None)
    if "config" in raw and "config" in parent:
        raw["config"] = {**parent["config"], **raw["config"]}
    if "samplers" in raw and "samplers" in parent:
        samplers = parent["samplers"]
        raw["samplers"] = {**samplers, **{name: {**samplers.get(name, {}), **sampler}
                                          for name, sampler in raw["samplers"].items()}}
    if "selection" in raw and "selection" in parent:
        appended = {k: list(parent["selection"].get(k) or []) + list(raw["selection"][k])
                    for k in ("families", "priority", "claims") if k in raw["selection"]}
        raw["selection"] = {**parent["selection"], **raw["selection"], **appended}
    return {**parent, **raw}


def load_grid(path: str | Path, preset: str | None = None, seeds: list[int] | None = None,
              results: str | None = None) -> list[Cell]:
    """Every cell of a grid file, in run order (dataset, model, seed, sampler)."""
    path = Path(path)
    raw = read_grid(path)
    name = raw.get("name", path.stem)
    preset = preset or raw.get("preset")
    base = preset_settings(preset) if preset else {}
    base.update(copy.deepcopy(raw.get("config") or {}))
    results = os.path.abspath(results or raw.get("results") or f"benchmarks/results/{preset or name}.jsonl")
    seeds = seeds or raw.get("seeds") or [2020]
    samplers = _entries(raw.get("samplers"), None, "samplers")
    baselines = raw.get("baselines")
    cells = []
    for d_label, dataset, d_conf in _entries(raw.get("datasets"), "dataset", "datasets"):
        for m_label, model, m_conf in _entries(raw.get("models"), "model", "models"):
            for seed in seeds:
                for s_label, _, s_conf in samplers:
                    config = {**base, **d_conf, **m_conf, **s_conf, "seed": int(seed)}
                    config.setdefault("neg_sampler", "recbole")
                    if baselines is not None:
                        role = "baseline" if s_label in baselines else "proposed"
                    else:
                        role = "baseline" if config["neg_sampler"] in BASELINE_SAMPLERS else "proposed"
                    split = config.get(USER_SPLIT)
                    if split is not None:
                        if not isinstance(split, dict) or "inter" not in split or set(split) - set(USER_SPLIT_OPTIONS):
                            raise ValueError(f"{path}: datasets: {d_label}: {USER_SPLIT} takes inter (required) and "
                                             f"{list(USER_SPLIT_OPTIONS[1:])}, got {split!r}")
                        split = {**split, "inter": _inter_path(split["inter"])}
                    cells.append(Cell(grid=name, preset=preset, sampler=s_label, model_label=m_label, model=model,
                                      dataset_label=d_label, dataset=dataset, seed=int(seed), role=role,
                                      config=copy.deepcopy(config), results=results,
                                      data_path=os.path.abspath(config["data_path"]) if config.get("data_path")
                                      else None, split=split))
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: two cells have the same settings (duplicate labels or seeds?)")
    return cells


# ------------------------------------------------------------------------------ results file
def read_results(path: str | Path) -> list[dict]:
    """Every complete record of a JSON Lines results file (a torn last line is skipped)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"[results] {path}:{number}: skipping an incomplete line", file=sys.stderr)
    return records


def append_result(path: str | Path, record: dict) -> None:
    """Append one record as one line, under an exclusive lock, flushed to disk. A torn last
    line (a writer killed mid-write) is left as it is and skipped by :func:`read_results`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable(record), sort_keys=True) + "\n"
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a writer killed mid-line: start on a fresh line
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def cell_lock(base: Path, key: str):
    """Yields whether this process holds the cell's lock (``<base>/<key>.lock``, ``flock``); a cell another
    process is running is not started again, so several ``run``/``converged --run`` processes can share
    one grid. The lock goes with its process: a killed run's cell is free at once (and resumes)."""
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{key}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def finished_keys(path: str | Path) -> set[str]:
    return {r["key"] for r in read_results(path) if r.get("status") == "ok" and "key" in r}


# ----------------------------------------------------------------------------------- one cell
def _metrics(result: dict | None) -> dict | None:
    return None if result is None else {str(k): float(v) for k, v in dict(result).items()}


def run_cell(cell: Cell, workdir: Path, command: str, isolated: bool = False, resume: bool = True) -> dict:
    """Run one cell in this process and return its record (status ok or error).

    ``isolated``: this process exists for this cell alone (``peak_memory_mib`` is then its
    lifetime peak RSS; otherwise the peak RSS since the cell started, which also counts
    what the process held before it). ``resume``: see :meth:`Cell.run_config`."""
    import recbole_mdcns  # noqa: F401  (RecBole compat shims)
    from benchmarks.probe import TrainingProbe

    quiet_warnings()
    config = cell.run_config(workdir, resume=resume)
    record = {"schema": SCHEMA, "key": cell.key, "group": cell.group, "cell": _cell_fields(cell),
              "config": cell.config, "run_config": config, "command": command, "git": git_state(),
              "versions": versions(), "started_at": _now(), "resumed_from": config.get("resume_from"),
              "malloc_env": {name: os.environ.get(name) for name in MALLOC_ENV}}
    start = time.perf_counter()
    probe = TrainingProbe()
    peak = None
    try:
        device = "cuda" if config.get("use_gpu", True) and _cuda_available() else "cpu"
        with probe, PeakMemory(device) as peak:
            result = recbole_mdcns.run_recbole(model=cell.model, dataset=cell.dataset, config_dict=config, saved=True)
        info = probe.summary()
        train_info = result.get("train_info") if isinstance(result, dict) else None
        record.update(status="ok", **_result_fields(result, info, train_info))
        record["user_ranks"] = probe.user_ranks(record["best_epoch"])
    except Exception as error:  # noqa: BLE001 -- one failed cell must not stop the grid
        record.update(status="error", error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc()[-4000:], **{"probe": probe.summary()})
    record["wall_seconds"] = time.perf_counter() - start
    record["finished_at"] = _now()
    record["memory"] = peak.as_dict() if peak is not None and peak.peak_mib is not None else None
    record["isolation"] = "subprocess" if isolated else "in-process"
    if isolated:
        record["peak_memory_mib"] = lifetime_peak_rss_mib()
        record["peak_memory_method"] = "ru_maxrss of the cell's own process"
    else:
        record["peak_memory_mib"] = record["memory"]["peak_rss_mib"] if record["memory"] else None
        record["peak_memory_method"] = ("peak RSS of the harness process during the cell "
                                        f"({record['memory']['memory_method'] if record['memory'] else None})")
    if record["memory"] and record["memory"].get("cuda_peak_mib") is not None:
        record["peak_cuda_mib"] = record["memory"]["cuda_peak_mib"]
    record["resolved_config"] = probe.final_config()
    record["device"] = describe_device(info_device(probe))
    return record


def info_device(probe) -> str | None:
    return str(probe.config["device"]) if probe.config is not None else None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _cell_fields(cell: Cell) -> dict:
    fields = asdict(cell)
    fields.pop("config")
    return fields


def _result_fields(result: dict, info: dict, train_info: dict | None) -> dict:
    """Metrics from RecBole's result dict; training figures from ``result['train_info']`` (what
    recbole-mdcns returns for its samplers), else from the probe (RecBole's own trainer)."""
    train_info = dict(train_info or {})
    source = "train_info" if train_info.get("epoch_seconds") else ("probe" if info["epoch_seconds"] else None)
    train_seconds = train_info.get("epoch_seconds") or info["epoch_seconds"]
    history = train_info.get("negative_history") or result.get("negative_stats") or info["negative_history"]
    # A method's own epoch-end work (DivNS' k-DPP refresh) runs in the LightningModule's
    # on_train_epoch_end, after the trainer has taken the epoch's time: add it back.
    end_work = {}
    for entry in history or []:
        if isinstance(entry, dict) and entry.get("refresh_seconds") is not None:
            end_work[int(entry.get("epoch", len(end_work)))] = float(entry["refresh_seconds"])
    epoch_seconds = ([s + end_work.get(i, 0.0) for i, s in enumerate(train_seconds)]
                     if train_seconds else None)
    total = sum(epoch_seconds) if epoch_seconds else None
    sampling_seconds = train_info.get("sampling_seconds")
    if sampling_seconds is not None and total:
        sampling_share, sampling_source = sampling_seconds / total, "train_info"
    elif info["loader_sampling_seconds"] is not None and total:
        sampling_seconds = info["loader_sampling_seconds"]
        sampling_share, sampling_source = sampling_seconds / total, "loader"
    else:
        sampling_share, sampling_source = None, None
    return {
        "best_valid_score": float(result["best_valid_score"]),
        "valid": _metrics(result.get("best_valid_result")),
        "test": _metrics(result.get("test_result")),
        "epochs": train_info.get("epochs", info["epochs"]),
        "best_epoch": train_info.get("best_epoch", info["best_epoch"]),
        "epoch_seconds": epoch_seconds,
        "seconds_per_epoch": total / len(epoch_seconds) if epoch_seconds else None,
        "epoch_seconds_source": source,
        "epoch_end_seconds": sum(end_work.values()) if end_work else None,
        "valid_seconds": train_info.get("valid_seconds") or info["valid_seconds"],
        "valid_scores": train_info.get("valid_scores") or info["valid_scores"],
        "sampling_seconds": sampling_seconds,
        "sampling_share": sampling_share,
        "sampling_share_source": sampling_source,
        "negative_stats": history or None,
        "extra_valid_results": train_info.get("extra_valid_results") or info["extra_valid_results"],
        "train_info": train_info or None,
        "probe": {k: v for k, v in info.items() if k != "negative_history"},
        "result_keys": sorted(result),
    }


# ------------------------------------------------------------------------------- orchestration
def _child_env() -> dict:
    """The cells' environment: this one, the repository on ``PYTHONPATH``, and :data:`MALLOC_ENV` where unset."""
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH")]
    return {**MALLOC_ENV, **os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def run_cell_subprocess(cell: Cell, workdir: Path, command: str, timeout: float | None,
                        resume: bool = True) -> dict | None:
    """Run the cell in a fresh interpreter that appends its own record; returns that record,
    or an error record (appended here) when the child died without writing one."""
    cell_dir = workdir / cell.key
    cell_dir.mkdir(parents=True, exist_ok=True)
    spec = cell_dir / "cell.json"
    spec.write_text(json.dumps({"cell": asdict(cell), "command": command, "workdir": str(workdir),
                                "resume": resume}))
    log = cell_dir / "log.txt"  # appended to: a resumed cell keeps the killed attempt's lines
    offset = log.stat().st_size if log.exists() else 0
    start = time.perf_counter()
    with open(log, "a") as out:
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--run-cell", str(spec)],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=_child_env(),
                                  timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    with open(log, errors="replace") as handle:
        handle.seek(offset)
        text = handle.read()
    done = [line for line in text.splitlines() if line.startswith(RESULT_TAG)]
    if done:
        return json.loads(done[-1][len(RESULT_TAG):])
    record = {"schema": SCHEMA, "key": cell.key, "group": cell.group, "cell": _cell_fields(cell),
              "config": cell.config, "command": command, "status": "error",
              "error": f"cell process ended ({code}) without a result", "log_tail": text[-4000:],
              "wall_seconds": time.perf_counter() - start, "finished_at": _now()}
    append_result(cell.results, record)
    return record


def _child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cell = Cell(**spec["cell"])
    record = run_cell(cell, Path(spec["workdir"]), spec["command"], isolated=True, resume=spec.get("resume", True))
    append_result(cell.results, record)
    keys = ("key", "status", "error", "wall_seconds", "test", "epochs", "seconds_per_epoch")
    summary = {k: record.get(k) for k in keys}
    print(RESULT_TAG + json.dumps(to_jsonable(summary)), flush=True)


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _describe(record: dict) -> str:
    if record.get("status") != "ok":
        return f"ERROR {record.get('error')}"
    test = record.get("test") or {}
    metric = str((record.get("config") or {}).get("valid_metric", "NDCG@10"))
    spe = record.get("seconds_per_epoch")
    return (f"ok: test {metric} {test.get(metric.lower(), float('nan')):.4f}, epochs {record.get('epochs')}, "
            f"{'%.1f' % spe if spe else '?'} s/epoch, {record.get('wall_seconds', 0):.0f}s")


def run_grid(cells: list[Cell], command: str, in_process: bool = False, keep_checkpoints: bool = False,
             timeout: float | None = None, stop_on_error: bool = False, workdir: Path | None = None,
             again: bool = False) -> list[dict]:
    """Run the unfinished cells (``again``: every cell, a finished one gets a newer record) in order;
    returns the records written by this call."""
    written = []
    done = set()
    for results in () if again else {c.results for c in cells}:
        done |= finished_keys(results)
    todo = [c for c in cells if c.key not in done]
    print(f"[grid] {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run", flush=True)
    for index, cell in enumerate(todo, 1):
        base = scratch_dir(cell, workdir)
        with cell_lock(base, cell.key) as mine:
            if not mine or (not again and cell.key in finished_keys(cell.results)):
                print(f"[{index}/{len(todo)}] {cell.name} ({cell.key}): "
                      f"{'running in another process' if not mine else 'finished by another process'}, skipped",
                      flush=True)
                continue
            print(f"[{index}/{len(todo)}] {cell.name} ({cell.key}) ...", flush=True)
            if in_process:
                with _cwd(base):
                    record = run_cell(cell, base, command)
                append_result(cell.results, record)
            else:
                record = run_cell_subprocess(cell, base, command, timeout)
        written.append(record)
        print(f"[{index}/{len(todo)}] {_describe(record)}", flush=True)
        if not keep_checkpoints:
            shutil.rmtree(base / cell.key / "saved", ignore_errors=True)
        if stop_on_error and record.get("status") != "ok":
            break
    return written


# ------------------------------------------------------------------------------ timing mode
def run_timing(cells: list[Cell], rounds: int, command: str, reference: str | None = None,
               warmup: int = 0) -> list[dict]:
    """Per (model, dataset), one epoch of every sampler interleaved in this process
    (benchmarks.epoch_time's method); one record per (model, dataset) appended to
    ``<results>.timing.jsonl``, skipped when one with the same settings exists."""
    from benchmarks import epoch_time

    epoch_time._silence()
    written = []
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.results, cell.model_label, cell.dataset_label), [])
        if cell.seed == min(c.seed for c in cells):
            groups[(cell.results, cell.model_label, cell.dataset_label)].append(cell)
    for (results, model_label, dataset_label), group in groups.items():
        path = Path(results).with_suffix(".timing.jsonl")
        key = _hash({"rounds": rounds, "warmup": warmup, "cells": sorted(c.key for c in group)})
        if any(r.get("key") == key for r in read_results(path)):
            print(f"[timing] {model_label} on {dataset_label}: already measured ({key})")
            continue
        workdir = (REPO_ROOT / "benchmarks" / ".work" / group[0].grid / "timing").resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        labels = [c.sampler for c in group]
        with _cwd(workdir):
            variants = {c.sampler: epoch_time.Variant(c.sampler, {"epochs": 1}, c.run_config(workdir),
                                                      c.model, c.dataset) for c in group}
            for _ in range(warmup):
                for label in labels:
                    variants[label].run_epoch()
            times = {label: {"epoch_s": [], "fit_s": []} for label in labels}
            for rnd in range(rounds):
                order = labels[rnd % len(labels):] + labels[:rnd % len(labels)]
                for label in order:
                    for k, v in variants[label].run_epoch().items():
                        times[label][k].append(v)
                    print(f"[timing] round {rnd + 1}: {label} {times[label]['epoch_s'][-1]:.2f}s", flush=True)
        ref = reference or next((c.sampler for c in group if c.config.get("neg_sampler") == "uniform"), labels[0])
        summary = epoch_time.summarize(times, {}, reference=ref)
        device = next(iter(variants.values())).device
        record = {"schema": SCHEMA, "key": key, "grid": group[0].grid, "preset": group[0].preset,
                  "model": model_label, "dataset": dataset_label, "reference": ref, "rounds": rounds,
                  "warmup": warmup,
                  "cells": {c.sampler: c.key for c in group}, "times": times, "summary": summary,
                  "command": command, "device": describe_device(device), "git": git_state(),
                  "versions": versions(), "finished_at": _now()}
        append_result(path, record)
        written.append(record)
        print(epoch_time.render(summary, times, {}, reference=ref), flush=True)
    return written


# ------------------------------------------------------------------------- provenance
def require_committed_package(allow_dirty: bool, root: Path = REPO_ROOT) -> list[str]:
    """Refuse (``SystemExit``) to record cells while the package or the harness modules
    (:data:`benchmarks.common.PACKAGE_PATHS`) have uncommitted changes, naming the files, unless
    ``allow_dirty`` -- then each record's ``git.package_dirty`` lists them. Returns the changed files."""
    changed = package_changes(root)
    if changed and not allow_dirty:
        raise SystemExit("refusing to run: the package code has uncommitted changes, so the records could not be "
                         "reproduced from the commit:\n" + "".join(f"  {name}\n" for name in changed)
                         + "commit them (or stash them), or pass --allow-dirty to run anyway; each record's "
                         "git.package_dirty will then list these files (git.diff_sha256 hashes the changes)")
    if changed:
        print(f"[grid] --allow-dirty: uncommitted package changes in {', '.join(changed)}; "
              "the records say so (git.package_dirty)", file=sys.stderr, flush=True)
    return changed


# ------------------------------------------------------------------------------- verification
@dataclass
class Verdict:
    """A recorded cell against its rerun at the current commit."""

    cell: str                   # the cell's name
    key: str
    record_commit: str | None   # the record's git commit
    record_dirty: bool | None
    epochs: int | None          # the epochs compared (None: the whole run)
    differences: list[str]      # what differs, the first differing epoch first; [] = a match
    first_epoch: int | None     # the first epoch whose validation differs
    notes: list[str]            # what else differs between the two runs (machine, versions)

    @property
    def matches(self) -> bool:
        return not self.differences

    def line(self) -> str:
        commit = (self.record_commit or "?")[:7] + (" (dirty)" if self.record_dirty else "")
        span = "the whole run" if self.epochs is None else f"the first {self.epochs} epochs"
        head = f"{'MATCH' if self.matches else 'DIFFERS':<8} {self.cell} ({self.key}) vs record at {commit}, {span}"
        if self.differences:
            more = len(self.differences) - 1
            head += f": {self.differences[0]}"
            if more:
                head += f" (+{more} more: {'; '.join(self.differences[1:4])})"
        return head + "".join(f"\n         note: {note}" for note in self.notes)


def _close(a, b, tolerance: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or abs(a - b) <= tolerance
    return a == b


def compare_records(record: dict, rerun: dict, epochs: int | None = None,
                    tolerance: float = 0.0) -> tuple[list[str], int | None]:
    """What differs between a record and its rerun, and the first epoch whose validation score differs.

    Compared: each epoch's validation score (``valid_scores``); for the whole run (``epochs`` None, or at
    least the record's epochs) also the best epoch, the epochs run, the best validation score and every
    validation and test metric. Scores and metrics within ``tolerance`` count as equal (0: exactly)."""
    if rerun.get("status") != "ok":
        return [f"the rerun failed: {rerun.get('error')}"], None
    whole = epochs is None or (record.get("epochs") is not None and epochs >= record["epochs"])
    limit = None if whole else epochs
    want = {int(e): s for e, s in record.get("valid_scores") or [] if limit is None or e < limit}
    got = {int(e): s for e, s in rerun.get("valid_scores") or [] if limit is None or e < limit}
    differences, first = [], None
    for epoch in sorted(set(want) | set(got)):
        if epoch not in want and want and epoch < min(want):
            continue  # a resumed record holds only the epochs after its resume
        if epoch not in got or epoch not in want:
            message = "not validated by the rerun" if epoch not in got else f"valid {got[epoch]} (no record)"
        elif not _close(got[epoch], want[epoch], tolerance):
            message = f"valid {got[epoch]} (record {want[epoch]})"
        else:
            continue
        first = epoch if first is None else first
        differences.append(f"epoch {epoch}: {message}")
    if whole:
        for name in ("best_epoch", "epochs"):
            if record.get(name) != rerun.get(name):
                differences.append(f"{name} {rerun.get(name)} (record {record.get(name)})")
        if not _close(rerun.get("best_valid_score"), record.get("best_valid_score"), tolerance):
            differences.append(f"best_valid_score {rerun.get('best_valid_score')} "
                               f"(record {record.get('best_valid_score')})")
        for split in ("valid", "test"):
            want_metrics, got_metrics = record.get(split) or {}, rerun.get(split) or {}
            for metric in sorted(set(want_metrics) | set(got_metrics)):
                if not _close(got_metrics.get(metric), want_metrics.get(metric), tolerance):
                    differences.append(f"{split} {metric} {got_metrics.get(metric)} "
                                       f"(record {want_metrics.get(metric)})")
    return differences, first


def _environment_notes(record: dict, rerun: dict) -> list[str]:
    """Differences in what ran the two (CPU, its instruction sets, torch threads, package versions): same commit and
    seed give the same numbers on one machine, not across machines (CPU kernels round differently). A field the
    record predates is not compared."""
    notes = []
    old, new = record.get("device") or {}, rerun.get("device") or {}
    for name in ("device", "cpu", "cpu_id", "cpu_simd", "cpu_capability", "torch_threads", "gpu"):
        if name in old and old.get(name) != new.get(name):
            notes.append(f"{name}: record {old.get(name)!r}, rerun {new.get(name)!r}")
    old, new = record.get("versions") or {}, rerun.get("versions") or {}
    notes += [f"{name}: record {old.get(name)}, rerun {new.get(name)}" for name in sorted(set(old) | set(new))
              if old.get(name) != new.get(name)]
    git = record.get("git") or {}
    if git.get("package_dirty"):
        notes.append("the record's package code had uncommitted changes: " + ", ".join(git["package_dirty"]))
    elif git.get("dirty") and "package_dirty" not in git:
        notes.append("the record's tree had uncommitted changes (it predates git.package_dirty: which files, "
                     "package code or results, is not recorded)")
    if record.get("resumed_from"):
        notes.append("the record is of a resumed run: only its epochs after the resume were compared")
    return notes


def verify(cells: list[Cell], command: str, epochs: int | None = None, tolerance: float = 0.0,
           against: str | None = None, in_process: bool = False, workdir: Path | None = None,
           timeout: float | None = None, keep_checkpoints: bool = False) -> list[Verdict]:
    """Rerun each recorded cell at the current commit and compare it with each of its ``ok`` records (those made
    at a commit starting with ``against``, if given), printing one MATCH / DIFFERS line per record.

    ``epochs``: run only that many epochs and compare the first ``epochs`` validation scores (the whole run
    when the record ran no more). A rerun starts from scratch (never a parked or killed attempt's checkpoint)
    and its record goes to a scratch results file, ``<workdir>/verify-<time>-<random>/results.jsonl``, never to the
    grid's. ``keep_checkpoints``: leave the rerun's checkpoints in ``<that folder>/<cell key>/saved``."""
    verdicts = []
    for cell in cells:
        records = [r for r in read_results(cell.results) if r.get("key") == cell.key and r.get("status") == "ok"
                   and (against is None or str((r.get("git") or {}).get("commit") or "").startswith(against))]
        if not records:
            print(f"NO RECORD {cell.name} ({cell.key}) in {cell.results}"
                  + (f" made at {against}" if against else ""), flush=True)
            continue
        scratch_dir(cell, workdir).mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix=f"verify-{datetime.now():%Y%m%dT%H%M%S}-", dir=scratch_dir(cell, workdir)))
        rerun_cell = cell
        if epochs is not None and epochs < int(cell.config.get("epochs", epochs)):
            rerun_cell = replace(cell, config={**cell.config, "epochs": epochs}, key="")  # a key of its own
        rerun_cell = replace(rerun_cell, results=str(base / "results.jsonl"))
        print(f"[verify] {cell.name} ({cell.key}): {len(records)} record(s); rerunning "
              f"{'the whole run' if rerun_cell.key == cell.key else f'{epochs} epochs'} in {base}", flush=True)
        if in_process:
            base.mkdir(parents=True, exist_ok=True)
            with _cwd(base):
                rerun = run_cell(rerun_cell, base, command, resume=False)
            append_result(rerun_cell.results, rerun)
        else:
            summary = run_cell_subprocess(rerun_cell, base, command, timeout, resume=False)
            rerun = next((r for r in reversed(read_results(rerun_cell.results)) if r.get("key") == rerun_cell.key),
                         summary)  # the child's full record; only its summary came back on stdout
        for record in records:
            differences, first = compare_records(record, rerun, epochs, tolerance)
            git = record.get("git") or {}
            whole = epochs is None or (record.get("epochs") is not None and epochs >= record["epochs"])
            verdict = Verdict(cell.name, cell.key, git.get("commit"), git.get("dirty"), None if whole else epochs,
                              differences, first, _environment_notes(record, rerun))
            print(verdict.line(), flush=True)
            verdicts.append(verdict)
        if keep_checkpoints:
            print(f"[verify] kept the rerun's checkpoints in {base / rerun_cell.key / 'saved'}", flush=True)
        else:
            shutil.rmtree(base / rerun_cell.key / "saved", ignore_errors=True)
    return verdicts


# ---------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--grid", help="grid YAML file")
    parser.add_argument("--preset", help="override the grid's preset (smoke | cpu | paper)")
    parser.add_argument("--results", help="override the grid's results file")
    parser.add_argument("--seeds", help="override the grid's seeds, comma-separated")
    parser.add_argument("--only", action="append", default=[],
                        help="run only cells whose 'sampler | model | dataset | seed N' matches this glob "
                             "(repeatable, e.g. --only 'dns*')")
    parser.add_argument("--limit", type=int, help="run at most this many unfinished cells")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done")
    parser.add_argument("--in-process", action="store_true",
                        help="run cells in this process (faster start; peak memory then reset per cell)")
    parser.add_argument("--cell-timeout", type=float, help="seconds before a cell's process is killed")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each cell's (with --verify: each rerun's) RecBole checkpoint")
    parser.add_argument("--stop-on-error", action="store_true")
    parser.add_argument("--workdir", help="scratch folder (logs, checkpoints); default benchmarks/.work/<grid>")
    parser.add_argument("--timing", action="store_true",
                        help="instead of the grid: one epoch per sampler, interleaved, per model x dataset "
                             "(first seed), time ratios to <results>.timing.jsonl")
    parser.add_argument("--timing-rounds", type=int, default=2)
    parser.add_argument("--timing-warmup", type=int, default=0, help="untimed epochs per sampler first")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="run even though the package code (recbole_mdcns/, config_yamls/, pyproject.toml, "
                             "the harness modules) has uncommitted changes; each record's git.package_dirty "
                             "lists them")
    parser.add_argument("--verify", action="store_true",
                        help="rerun the selected cells that have records, at the current commit (into a scratch "
                             "results file), and say per record whether its metrics MATCH or it DIFFERS (first "
                             "differing epoch); exits 1 if any differs")
    parser.add_argument("--epochs", type=int, metavar="N",
                        help="with --verify: run only N epochs and compare the first N validation scores (cheap)")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="with --verify: scores and metrics within this absolute difference match (default 0: "
                             "exactly, as one CPU gives)")
    parser.add_argument("--against", metavar="COMMIT",
                        help="with --verify: only the records made at a commit starting with this")
    parser.add_argument("--park", action="store_true",
                        help="copy the unfinished cells' checkpoints to benchmarks/parked (commit it), so a fresh "
                             "machine resumes them; stop the drivers first")
    parser.add_argument("--run-cell", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.run_cell:
        _child_main(args.run_cell)
        return []
    if not args.grid:
        raise SystemExit("--grid GRID.yaml is required")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    if args.park and seeds is None and "selection" in (raw := read_grid(args.grid)):  # a converged grid's seeds too
        from benchmarks.converged import protocol_seeds

        seeds = sorted({*map(int, raw.get("seeds") or [2020]), *protocol_seeds(raw)})
    cells = load_grid(args.grid, preset=args.preset, seeds=seeds, results=args.results)
    if args.only:
        cells = [c for c in cells if any(fnmatch.fnmatch(c.name, pattern) for pattern in args.only)]
    command = command_line(argv, "benchmarks.run")
    if args.dry_run:
        done = set()
        for results in {c.results for c in cells}:
            done |= finished_keys(results)
        for cell in cells:
            print(f"{'done' if cell.key in done else 'todo'}  {cell.key}  {cell.name}  -> {cell.results}")
        return []
    if args.park:
        for cell in park(cells, Path(args.workdir).resolve() if args.workdir else None):
            print(f"parked  {cell.key}  {cell.name}  -> {parked_dir(cell)}")
        return []
    if (args.epochs is not None or args.against or args.tolerance) and not args.verify:
        raise SystemExit("--epochs, --tolerance and --against go with --verify")
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit("--epochs: at least 1")
    require_committed_package(args.allow_dirty)
    workdir = Path(args.workdir).resolve() if args.workdir else None
    if args.verify:
        verdicts = verify(cells, command, epochs=args.epochs, tolerance=args.tolerance, against=args.against,
                          in_process=args.in_process, workdir=workdir, timeout=args.cell_timeout,
                          keep_checkpoints=args.keep_checkpoints)
        if not verdicts:
            raise SystemExit("--verify: none of the selected cells has a record to verify")
        differ = [v for v in verdicts if not v.matches]
        print(f"[verify] {len(verdicts) - len(differ)} of {len(verdicts)} records match", flush=True)
        if differ:
            raise SystemExit(1)
        return [asdict(v) for v in verdicts]
    if args.timing:
        return run_timing(cells, args.timing_rounds, command, warmup=args.timing_warmup)
    if args.limit is not None:
        done = set()
        for results in {c.results for c in cells}:
            done |= finished_keys(results)
        cells = [c for c in cells if c.key not in done][:args.limit]
    return run_grid(cells, command, in_process=args.in_process, keep_checkpoints=args.keep_checkpoints,
                    timeout=args.cell_timeout, stop_on_error=args.stop_on_error, workdir=workdir)


if __name__ == "__main__":
    main()
