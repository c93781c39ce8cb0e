"""Run a grid's unfinished cells as parallel processes, e.g. many small cells sharing one GPU.

    python -m benchmarks.parallel --grid benchmarks/grids/beauty_gpu.yaml --jobs 18 --cell-timeout 560
    python -m benchmarks.parallel --grid benchmarks/grids/beauty_gpu.yaml --dry-run     # the commands only

Each unfinished cell runs as ``python -m benchmarks.run --grid GRID --only '<cell name>'`` in a
process of its own, at most ``--jobs`` at a time, with its own scratch folder and log
(``benchmarks/.work/<grid>/parallel/<key>.log``). Records are appended to the grid's results file
under its lock, so resuming (re-run the same command) and ``benchmarks.report`` work unchanged.
``OMP_NUM_THREADS`` defaults to the CPU cores shared out among the jobs.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT
from benchmarks.run import _child_env, finished_keys, load_grid, require_committed_package


def commands(args) -> list[tuple[str, str, list[str]]]:
    """``(key, name, argv)`` of every unfinished cell of the grid, in the grid's order."""
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    cells = load_grid(args.grid, preset=args.preset, seeds=seeds, results=args.results)
    done = set()
    for results in {c.results for c in cells}:
        done |= finished_keys(results)
    out = []
    for cell in cells:
        if cell.key in done or (args.only and not any(fnmatch.fnmatch(cell.name, p) for p in args.only)):
            continue
        argv = [sys.executable, "-m", "benchmarks.run", "--grid", str(Path(args.grid).resolve()),
                "--only", glob.escape(cell.name), "--workdir", str(workdir(args, cell.grid) / cell.key)]
        for flag, value in (("--preset", args.preset), ("--results", args.results), ("--seeds", args.seeds),
                            ("--cell-timeout", args.cell_timeout)):
            if value is not None:
                argv += [flag, str(value)]
        if args.in_process:
            argv.append("--in-process")
        if args.allow_dirty:
            argv.append("--allow-dirty")
        out.append((cell.key, cell.name, argv))
    return out


def workdir(args, grid_name: str) -> Path:
    return Path(args.workdir).resolve() if args.workdir else REPO_ROOT / "benchmarks" / ".work" / grid_name / "parallel"


def run(todo: list[tuple[str, str, list[str]]], jobs: int, folder: Path) -> dict[str, int]:
    """Run ``todo`` at most ``jobs`` at a time; returns each cell's exit status by key."""
    folder.mkdir(parents=True, exist_ok=True)
    env = _child_env()
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, jobs))))
    pending, running, status = list(todo), {}, {}
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            key, name, argv = pending.pop(0)
            log = open(folder / f"{key}.log", "w")
            running[key] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env),
                            log, name)
            print(f"[parallel] start {name} ({key})", flush=True)
        for key, (proc, log, name) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                status[key] = proc.returncode
                del running[key]
                print(f"[parallel] {'done' if proc.returncode == 0 else f'exit {proc.returncode}'} {name} "
                      f"({time.perf_counter() - started:.0f}s)", flush=True)
        time.sleep(0.5)
    return status


def main(argv=None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--grid", required=True)
    parser.add_argument("--jobs", type=int, default=4, help="cells running at once")
    parser.add_argument("--preset")
    parser.add_argument("--results")
    parser.add_argument("--seeds", help="comma-separated, as benchmarks.run")
    parser.add_argument("--only", action="append", default=[], help="glob over 'sampler | model | dataset | seed N'")
    parser.add_argument("--cell-timeout", type=float, help="seconds before a cell's process is killed")
    parser.add_argument("--in-process", action="store_true",
                        help="each cell in its job's process (one process less per cell; see benchmarks.run)")
    parser.add_argument("--workdir", help="scratch folder (default benchmarks/.work/<grid>/parallel)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="run with uncommitted package code (see benchmarks.run)")
    args = parser.parse_args(argv)
    todo = commands(args)
    print(f"[parallel] {len(todo)} unfinished cells, {min(args.jobs, len(todo))} at a time", flush=True)
    if args.dry_run:
        for _, _, command in todo:
            print(" ".join(f"'{a}'" if " " in a or "|" in a else a for a in command))
        return {}
    require_committed_package(args.allow_dirty)  # once here, not in every cell's log
    grid_name = load_grid(args.grid)[0].grid if todo else ""
    status = run(todo, args.jobs, workdir(args, grid_name))
    failed = [key for key, code in status.items() if code != 0]
    print(f"[parallel] {len(status) - len(failed)} cells ended normally, {len(failed)} did not"
          + (f": {failed}" if failed else ""), flush=True)
    return status


if __name__ == "__main__":
    main()
