"""Helpers shared by the benchmarks: peak-memory probes, device and provenance records.

Peak memory on CPU is the process's resident-set high-water mark (``VmHWM`` in
``/proc/self/status``). On Linux it can be reset (``echo 5 > /proc/self/clear_refs``),
so the peak of one phase -- a training epoch, one grid cell -- is measured as
``VmHWM after - VmRSS at the reset``: everything torch, numpy and Python allocate
is counted (``tracemalloc`` does not see torch's allocator). Where the reset is not
available, :class:`PeakMemory` polls the RSS from a thread every millisecond instead.
On CUDA the figure is ``torch.cuda.max_memory_allocated`` after a reset.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_mib() -> float | None:
    """Current resident set size of this process, MiB."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss / MIB
    except ImportError:
        return None


def lifetime_peak_rss_mib() -> float:
    """``ru_maxrss`` of this process: the peak over its whole life, MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MIB if sys.platform == "darwin" else 1024)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class PeakMemory:
    """Peak memory of the code inside ``with``: CPU resident set, and CUDA when given a CUDA device.

    After the block: ``baseline_mib`` (RSS when entering), ``peak_mib`` (highest RSS inside),
    ``delta_mib`` (``peak - baseline``), ``method`` (how it was measured), and for CUDA
    ``cuda_peak_mib`` / ``cuda_delta_mib`` (allocated tensors, PyTorch's allocator).
    """

    def __init__(self, device=None, poll_seconds: float = 0.001) -> None:
        self.cuda = device is not None and str(device).startswith("cuda")
        self.poll_seconds = poll_seconds
        self.baseline_mib = self.peak_mib = self.delta_mib = None
        self.cuda_peak_mib = self.cuda_delta_mib = None
        self.method = None
        self._stop = threading.Event()
        self._thread = None
        self._polled = 0.0

    def __enter__(self) -> "PeakMemory":
        import gc

        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        self.baseline_mib = rss_mib()
        if _reset_hwm():
            self.method = "VmHWM after clear_refs reset"
        else:
            self.method = f"RSS polled every {self.poll_seconds * 1000:g} ms"
            self._polled = self.baseline_mib or 0.0
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._polled = max(self._polled, rss_mib() or 0.0)
            time.sleep(self.poll_seconds)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.cuda_peak_mib = torch.cuda.max_memory_allocated() / MIB
            self.cuda_delta_mib = (torch.cuda.max_memory_allocated() - self._cuda_base) / MIB
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self._polled, rss_mib() or 0.0)
        else:
            self.peak_mib = _status_kib("VmHWM") / 1024
        if self.baseline_mib is not None:
            self.delta_mib = self.peak_mib - self.baseline_mib

    def as_dict(self) -> dict:
        return {"baseline_rss_mib": self.baseline_mib, "peak_rss_mib": self.peak_mib,
                "peak_rss_delta_mib": self.delta_mib, "cuda_peak_mib": self.cuda_peak_mib,
                "cuda_peak_delta_mib": self.cuda_delta_mib, "memory_method": self.method}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_identity() -> dict:
    """The processor beyond its name: a virtual machine may name different processors alike ("AMD EPYC"), and
    their float kernels need not round alike. ``cpu_id``: vendor, family, model, stepping; ``cpu_simd``: the vector
    instruction sets it has (``/proc/cpuinfo``; ``None`` where that is not available)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        return {"cpu_id": None, "cpu_simd": None}
    simd = sorted(flag for flag in fields.get("flags", "").split() if re.fullmatch(r"avx\w*|fma|amx\w*", flag))
    ident = " ".join([fields.get("vendor_id", "")] + [f"{label} {fields[key]}" for key, label in
                                                      (("cpu family", "family"), ("model", "model"),
                                                       ("stepping", "stepping")) if key in fields]).strip()
    return {"cpu_id": ident or None, "cpu_simd": " ".join(simd) or None}


def describe_device(device=None) -> dict:
    """What ran the benchmark: the torch device, CPU model (:func:`cpu_identity`), the instruction set torch's
    CPU kernels use (``cpu_capability``: DEFAULT / AVX2 / AVX512 ...) and threads, GPU name."""
    import torch

    info = {"device": str(device) if device is not None else None, "cpu": cpu_name(), **cpu_identity(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "recbole", "pytorch-lightning", "recbole-mdcns", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# What a grid cell's numbers depend on: the package and the harness modules that build, run and record a cell.
# A record is reproducible from its commit only when none of these had uncommitted changes; results files,
# documents and grid files (a cell's settings are in its record) may change while grids run.
PACKAGE_PATHS = ("recbole_mdcns", "config_yamls", "pyproject.toml", "benchmarks/__init__.py", "benchmarks/run.py",
                 "benchmarks/presets.py", "benchmarks/common.py", "benchmarks/probe.py", "benchmarks/epoch_time.py")


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=30)


def package_changes(root: Path = REPO_ROOT) -> list[str]:
    """The files under :data:`PACKAGE_PATHS` that differ from the checkout's commit: modified, staged,
    deleted or new (untracked, not ignored), as paths relative to ``root``."""
    out = _git(root, "status", "--porcelain", "-z", "--untracked-files=all", "--", *PACKAGE_PATHS).stdout.decode()
    entries = out.split("\0")
    files, i = [], 0
    while i < len(entries):
        entry = entries[i]
        if entry:
            files.append(entry[3:])
            if entry[0] in "RC":  # a rename or copy: the next entry is its source, changed as well
                i += 1
                files.append(entries[i])
        i += 1
    return sorted(set(files))


def package_diff_sha256(files: list[str], root: Path = REPO_ROOT) -> str:
    """SHA-256 of the package's uncommitted changes: ``git diff HEAD`` over ``files``, then each new file's
    path and bytes -- the same edits give the same hash, so a record can be matched to a patch."""
    digest = hashlib.sha256(_git(root, "diff", "HEAD", "--binary", "--", *PACKAGE_PATHS).stdout)
    tracked = set(_git(root, "ls-files", "-z", "--", *files).stdout.decode().split("\0"))
    for name in files:
        path = root / name
        if name not in tracked and path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def git_state(root: Path = REPO_ROOT) -> dict:
    """Commit of the checkout; ``dirty``: any uncommitted change in the tree (results and documents too);
    ``package_dirty``: the changed files of :data:`PACKAGE_PATHS` (``[]``: the commit alone reproduces the run);
    ``diff_sha256``: the hash of those changes (:func:`package_diff_sha256`), ``None`` when there are none."""
    unknown = {"commit": None, "dirty": None, "package_dirty": None, "diff_sha256": None}
    try:
        commit = _git(root, "rev-parse", "HEAD").stdout.decode().strip()
        if not re.fullmatch(r"[0-9a-f]{40}", commit):
            return unknown  # not a git checkout (e.g. a copied tree)
        changed = package_changes(root)
        return {"commit": commit, "dirty": bool(_git(root, "status", "--porcelain").stdout.strip()),
                "package_dirty": changed, "diff_sha256": package_diff_sha256(changed, root) if changed else None}
    except (OSError, subprocess.SubprocessError):
        return unknown


def command_line(argv: list[str] | None = None, module: str | None = None) -> str:
    """The command as a person would type it again (``python -m module args``)."""
    argv = sys.argv[1:] if argv is None else argv
    head = ["python", "-m", module] if module else ["python", sys.argv[0]]
    return " ".join(shlex.quote(a) for a in head + list(argv))


def to_jsonable(value):
    """JSON-safe copy of configs and results (numpy scalars, tensors, devices, enums, sets)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return to_jsonable(value.item())
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    return str(value)


def dumps(value) -> str:
    return json.dumps(to_jsonable(value), sort_keys=True)


def quiet_warnings() -> None:
    """RecBole 1.2.1 on pandas 2 prints FutureWarnings on every dataset load."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="pytorch_lightning")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning_fabric")
