"""The converged evidence: choose each method's setting on validation, then compare 3 seeds.

    python -m benchmarks.converged --grid benchmarks/grids/converged_lastfm.yaml \
        --grid benchmarks/grids/converged_ml100k.yaml --out benchmarks/CONVERGED.md

A grid's ``selection:`` section declares the protocol (the grids' headers describe it):

* ``families`` -- each paper method and the grid labels that may stand for it. A family's setting is
  the member with the best validation ``metric`` on ``tuning_seed`` (never a test metric). An
  ablation family (``ablation_of: F``) is not chosen: its member is the one whose settings equal F's
  chosen setting except in the keys it lists under ``differs_in`` (the removed component's keys).
  A family may list its own ``seeds`` (e.g. ``[2020]``: a single cell the protocol asks for, run on
  the tuning seed alone); the report marks it, and no claim should rest on it.
  A choice at its grid's edge -- the largest or smallest value of a numeric key among at least two
  other members that differ from it in that key alone -- is named in the report, as an epoch cap
  that binds would be: the grid does not bracket the best value.
* ``role`` of a family -- ``proposed`` (the default; marked ``*`` in the report), ``baseline`` (a sampler
  the proposed ones are set against; the best of them by validation is the report's "best baseline"), or
  ``reference`` (a bar that is not a sampler, e.g. the full softmax: set against the samplers only through
  ``claims``, never the best baseline).
* ``claims`` -- ``[A, B]`` pairs, "A beats B": per-seed paired differences of the test metric over the
  seeds both have, their mean ± std and on how many seeds A is ahead.
* ``priority`` -- the order in which ``--run`` works through the families (default: as listed).

``--run`` drives the grid through the protocol, one cell at a time, resumable: it re-reads the
results after every cell and runs the first runnable one -- for each family in priority order, its
tuning cells, then (once chosen) its remaining seeds; an ablation waits for its parent's choice.
A cell that fails is not retried in the same invocation. ``--first FAMILY`` (repeatable) takes those
families before the grid's priority, e.g. cheap baselines' seeds while a long tuning waits.

Records are matched to labels by cell key (a hash of the full config), so a record counts only
while the grid still describes the run that made it. The report lists, per dataset: every tuning
cell (validation, test, best epoch, epochs run; MDCNS's peer and self+peer ensemble validation at
the self model's best epoch), each family's choice, the chosen settings over seeds with their paired
difference against the best baseline (the baseline family with the best mean validation), the
claims, and the ``benchmarks.run`` commands for the seeds still missing. One figure per dataset:
``<plots>/converged_<dataset>.png``.
"""
from __future__ import annotations

import argparse
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT, command_line
from benchmarks.report import Row, _bar_panel, _fmt, _mean_std, _save, _slug, load
from benchmarks.run import Cell, load_grid, read_grid

ROLES = ("proposed", "baseline", "reference")  # a family's role (module docstring)
DEFAULTS = {"metric": "ndcg@10", "tuning_seed": 2020, "seeds": [2020, 2021, 2022]}


@dataclass
class Family:
    """One paper method on one dataset: its candidate labels and, once chosen, its label and records."""

    name: str
    role: str
    members: list[str]
    ablation_of: str | None = None
    differs_in: list[str] = field(default_factory=list)
    seeds: list[int] | None = None  # the grid's seeds unless the family lists its own
    chosen: str | None = None
    why: str = ""
    records: dict[int, dict] = field(default_factory=dict)  # seed -> record

    def values(self, metric: str, split: str = "test") -> dict[int, float]:
        return {seed: r[split][metric] for seed, r in self.records.items() if (r.get(split) or {}).get(metric)
                is not None}


@dataclass
class Evidence:
    """One dataset of one grid: its cells by (label, seed), families, claims."""

    grid: str
    dataset: str
    model: str
    metric: str
    tuning_seed: int
    seeds: list[int]
    configs: dict[str, dict]  # label -> cell config (tuning seed)
    records: dict[tuple[str, int], dict]  # (label, seed) -> ok record
    cells: dict[tuple[str, int], Cell]  # (label, seed) -> the grid's cell
    families: "OrderedDict[str, Family]"
    claims: list[tuple[str, str]]
    priority: list[str] = field(default_factory=list)
    cap: int = 0
    patience: int = 0
    eval_step: int = 1

    title: str = ""  # the dataset, and the model where its grid has several

    def valid(self, label: str, seed: int | None = None) -> float | None:
        record = self.records.get((label, self.tuning_seed if seed is None else seed))
        return ((record or {}).get("valid") or {}).get(self.metric)


def _label_seed_records(cells, records_by_key) -> dict[tuple[str, int], dict]:
    return {(c.sampler, c.seed): records_by_key[c.key] for c in cells if c.key in records_by_key}


def protocol_seeds(raw: dict) -> list[int]:
    """Every seed a grid's ``selection:`` protocol runs: its tuning seed and the chosen settings' seeds."""
    spec = {**DEFAULTS, **(raw.get("selection") or {})}
    return sorted({int(spec["tuning_seed"]), *map(int, spec["seeds"])})


def build(grid_path: str, records_by_key: dict[str, dict]) -> list[Evidence]:
    """The evidence of every dataset (and model, where the grid has several) of one grid file, families
    chosen on validation."""
    raw = read_grid(grid_path)
    spec = {**DEFAULTS, **(raw.get("selection") or {})}
    if not spec.get("families"):
        raise ValueError(f"{grid_path}: no selection.families -- nothing to choose")
    cells = load_grid(grid_path, seeds=protocol_seeds(raw))
    labels = {c.sampler for c in cells}
    out = []
    models = list(OrderedDict.fromkeys(c.model_label for c in cells))
    for dataset, model in OrderedDict.fromkeys((c.dataset_label, c.model_label) for c in cells):
        mine = [c for c in cells if c.dataset_label == dataset and c.model_label == model]
        configs = {c.sampler: c.config for c in mine if c.seed == int(spec["tuning_seed"])}
        shared = next(iter(configs.values()))  # the protocol's settings, the same in every cell
        evidence = Evidence(grid=raw.get("name", Path(grid_path).stem), dataset=dataset, model=model,
                            title=dataset if len(models) == 1 else f"{dataset}, {model}", metric=spec["metric"],
                            tuning_seed=int(spec["tuning_seed"]), seeds=[int(s) for s in spec["seeds"]],
                            configs=configs, records=_label_seed_records(mine, records_by_key),
                            cells={(c.sampler, c.seed): c for c in mine},
                            families=OrderedDict(), claims=[tuple(pair) for pair in spec.get("claims") or []],
                            priority=list(spec.get("priority") or []),
                            cap=int(shared.get("epochs", 0)), patience=_patience_epochs(shared),
                            eval_step=int(shared.get("eval_step", 1)))
        for entry in spec["families"]:
            unknown = [m for m in entry["members"] if m not in labels]
            if unknown:
                raise ValueError(f"{grid_path}: family {entry['name']!r} names labels the grid lacks: {unknown}")
            if entry.get("role", "proposed") not in ROLES:
                raise ValueError(f"{grid_path}: family {entry['name']!r}: role must be one of {list(ROLES)}, "
                                 f"got {entry['role']!r}")
            evidence.families[entry["name"]] = Family(
                name=entry["name"], role=entry.get("role", "proposed"), members=list(entry["members"]),
                ablation_of=entry.get("ablation_of"), differs_in=list(entry.get("differs_in") or []),
                seeds=[int(s) for s in entry["seeds"]] if entry.get("seeds") else None)
        unknown = [name for name in evidence.priority + [n for pair in evidence.claims for n in pair]
                   if name not in evidence.families]
        if unknown:
            raise ValueError(f"{grid_path}: selection names families it does not define: {unknown}")
        for family in evidence.families.values():
            _choose(evidence, family)
        out.append(evidence)
    return out


def _same_except(a: dict, b: dict, keys: list[str]) -> bool:
    ignored = set(keys)
    return all(a.get(k) == b.get(k) for k in (set(a) | set(b)) - ignored)


def grid_edges(configs: dict[str, dict], members: list[str], chosen: str) -> list[str]:
    """The numeric keys along which ``chosen`` is its family's largest or smallest value, among the
    members that differ from it in that key alone (its neighbours on that axis; at least two of them,
    so a one-step axis such as ``mu: 0`` vs ``0.01`` is not an axis to extend)."""
    base, edges = configs[chosen], []
    for key in sorted({k for m in members for k in configs[m]} | set(base)):
        value = base.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        axis = [configs[m].get(key) for m in members
                if m != chosen and configs[m].get(key) != value and _same_except(configs[m], base, [key])]
        if len(axis) >= 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in axis) \
                and (value > max(axis) or value < min(axis)):
            edges.append(f"{key} ({value})")
    return edges


def _choose(evidence: Evidence, family: Family) -> None:
    if family.ablation_of:
        parent = evidence.families[family.ablation_of]
        if parent.chosen is None:
            family.why = f"waits for {parent.name}'s choice"
            return
        base = evidence.configs[parent.chosen]
        matches = [m for m in family.members if _same_except(evidence.configs[m], base, family.differs_in)]
        if not matches:
            family.why = (f"no cell equals {parent.chosen} except in {', '.join(family.differs_in)}: "
                          f"add one to the grid")
            return
        family.chosen, family.why = matches[0], f"{parent.chosen} without its component"
    else:
        scored = [(evidence.valid(m), m) for m in family.members]
        done = [(v, m) for v, m in scored if v is not None]
        if len(done) < len(scored):
            missing = [m for v, m in scored if v is None]
            family.why = f"tuning cells still to run: {', '.join(missing)}"
            return
        value, family.chosen = max(done, key=lambda vm: vm[0])
        family.why = (f"best validation of {len(done)}" if len(done) > 1 else "one setting")
        edges = grid_edges(evidence.configs, family.members, family.chosen)
        if edges:
            family.why += f"; at its grid's edge in {', '.join(edges)}: try a value beyond"
    if family.seeds:
        family.why += f"; seeds {', '.join(map(str, family.seeds))} only, by the grid"
    family.records = {seed: evidence.records[(family.chosen, seed)] for seed in family.seeds or evidence.seeds
                      if (family.chosen, seed) in evidence.records}


def _at_best(record: dict, view: str, metric: str) -> float | None:
    """``view``'s ('peer' / 'ensemble') validation metric at the self model's best epoch."""
    for entry in record.get("extra_valid_results") or []:
        if entry.get("epoch") == record.get("best_epoch"):
            return (entry.get(view) or {}).get(metric)
    return None


def paired(a: Family, b: Family, metric: str) -> tuple[list[float], list[int]]:
    """Per-seed differences ``a - b`` of the test ``metric`` over the seeds both have."""
    va, vb = a.values(metric), b.values(metric)
    seeds = sorted(set(va) & set(vb))
    return [va[s] - vb[s] for s in seeds], seeds


def user_values(ranks: list[int], metric: str) -> np.ndarray:
    """Per-user ``ndcg@k`` / ``recall@k`` from the held-out item's rank (0: below the top list), as
    RecBole computes them for one held-out item per user."""
    name, k = metric.split("@")
    rank = np.asarray(ranks)
    hit = (rank > 0) & (rank <= int(k))
    if name == "ndcg":
        return np.where(hit, 1.0 / np.log2(np.maximum(rank, 1) + 1.0), 0.0)
    if name in ("recall", "hit"):
        return hit.astype(float)
    raise ValueError(f"no per-user form for {metric!r}: ndcg@k, recall@k or hit@k")


def users_interval(a: Family, b: Family, metric: str, split: str = "test", resamples: int = 2000,
                   ) -> tuple[float, float, float, int, int] | None:
    """``a - b`` over users: each row's difference averaged over the seeds both have, its mean and a
    95% percentile bootstrap interval that resamples users -- a user with several rows (``<split>_users``
    in ``user_ranks``: the authors' prefix rows) with all of them -- as (mean, low, high, users, seeds).
    The users are the same on every seed, so more seeds do not shrink this part of the noise. ``None``
    unless every shared seed's two records hold per-user ranks (``user_ranks``) for ``split``."""
    seeds = sorted(set(a.records) & set(b.records))
    ranks = [((a.records[s].get("user_ranks") or {}).get(split), (b.records[s].get("user_ranks") or {}).get(split))
             for s in seeds]
    if not seeds or any(ra is None or rb is None for ra, rb in ranks):
        return None
    per_row = np.mean([user_values(ra, metric) - user_values(rb, metric) for ra, rb in ranks], axis=0)
    users = (a.records[seeds[0]]["user_ranks"].get(f"{split}_users") or list(range(len(per_row))))
    _, group = np.unique(np.asarray(users), return_inverse=True)
    sums, counts = np.bincount(group, weights=per_row), np.bincount(group).astype(float)
    rng = np.random.default_rng(0)
    drawn = rng.integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(per_row.mean()), float(low), float(high), len(sums), len(seeds)


def _fmt_interval(interval: tuple[float, float, float, int, int] | None) -> str:
    if interval is None:
        return "–"
    mean, low, high, users, seeds = interval
    return f"{mean + 0.0:+.4f} [{low + 0.0:+.4f}, {high + 0.0:+.4f}] ({users} users × {seeds} seeds)"


def _fmt_paired(diffs: list[float]) -> str:
    if not diffs:
        return "–"
    mean, std, n = _mean_std(diffs)
    mean = round(mean, 4) + 0.0  # no "-0.0000"
    ahead = sum(d > 0 for d in diffs)
    return f"{mean:+.4f} ± {std:.4f} ({ahead}/{n} seeds > 0)" if n > 1 else f"{mean:+.4f} (1 seed)"


def best_baseline(evidence: Evidence) -> Family | None:
    """The baseline family whose chosen setting has the best mean validation over its seeds."""
    scored = [(statistics.fmean(f.values(evidence.metric, "valid").values()), f)
              for f in evidence.families.values() if f.role == "baseline" and f.values(evidence.metric, "valid")]
    return max(scored, key=lambda vf: vf[0])[1] if scored else None


def _patience_epochs(config: dict) -> int:
    """Epochs a run goes on after its best: RecBole's ``stopping_step`` counts evaluations, one every ``eval_step``."""
    return int(config.get("stopping_step", 0)) * int(config.get("eval_step", 1))


def _best_epoch(e: Evidence, record: dict) -> str:
    """The record's best epoch, ``first!`` where validations are ``eval_step > 1`` epochs apart and the best was
    the first of them (after epoch ``eval_step - 1``): the peak may lie before it, the schedule is too coarse."""
    best = record.get("best_epoch")
    first = e.eval_step > 1 and best is not None and best < e.eval_step
    return f"{best} first!" if first else str(best)


def render_dataset(e: Evidence) -> list[str]:
    m = e.metric
    lines = [f"## {e.title} (grid `{e.grid}`)", "",
             f"### Tuning (seed {e.tuning_seed}): every cell", "",
             f"Chosen on validation {m.upper()}; `*` marks a family's choice. Peer / ensemble: MDCNS's peer and "
             f"self+peer ensemble validation {m.upper()} at the self model's best epoch. A run ends {e.patience} "
             f"epochs after its best (epoch cap {e.cap}: `cap!` where it bound"
             + (f"; `first!`: the best was the run's first validation, after epoch {e.eval_step - 1}, so the peak may "
                "lie before it" if e.eval_step > 1 else "") + ").", "",
             f"| cell | family | valid {m} | test {m} | best epoch | epochs | peer | ensemble |", "|---|---|---|---|---|---|---|---|"]
    family_of = OrderedDict()
    for f in e.families.values():
        for label in f.members:
            family_of.setdefault(label, []).append(f.name)
    chosen = {f.chosen for f in e.families.values() if f.chosen}
    for label in e.configs:
        record = e.records.get((label, e.tuning_seed))
        fams = ", ".join(family_of.get(label, ["–"]))
        if record is None:
            lines.append(f"| {label} | {fams} | pending | | | | | |")
            continue
        peer, ens = _at_best(record, "peer", m), _at_best(record, "ensemble", m)
        bound = " cap!" if e.cap and record.get("epochs", 0) >= e.cap else ""
        lines.append(f"| {label}{' *' if label in chosen else ''} | {fams} | {record['valid'][m]:.4f} | "
                     f"{record['test'][m]:.4f} | {_best_epoch(e, record)} | {record.get('epochs')}{bound} | "
                     f"{'' if peer is None else f'{peer:.4f}'} | {'' if ens is None else f'{ens:.4f}'} |")
    base = best_baseline(e)
    recall_at = "recall@" + m.split("@")[1]  # Recall at the selection metric's cutoff (@10 sequential, @20 general)
    lines += ["", f"### Chosen settings over seeds {', '.join(map(str, e.seeds))}", "",
              f"Test {m.upper()} and {recall_at.capitalize()}, mean ± std over the seeds run (n); validation "
              f"{m.upper()} likewise; best epochs per seed. Paired difference: test {m.upper()} minus the best "
              f"baseline's "
              f"(**{base.name if base else '–'}**, best mean validation among baselines) on the same seed.", "",
              f"| method | setting | test {m} | test {recall_at} | valid {m} | best epochs | vs best baseline |",
              "|---|---|---|---|---|---|---|"]
    for f in e.families.values():
        if f.chosen is None:
            lines.append(f"| {f.name} | – ({f.why}) | | | | | |")
            continue
        if not f.records:
            lines.append(f"| {f.name}{' *' if f.role == 'proposed' else ''} | `{f.chosen}` ({f.why}) | not run yet "
                         "| | | | |")
            continue
        test, valid = _mean_std(list(f.values(m).values())), _mean_std(list(f.values(m, "valid").values()))
        recall = _mean_std(list(f.values(recall_at).values()))
        epochs = ", ".join(_best_epoch(e, r) for _, r in sorted(f.records.items()))
        diff = "–" if base is None or f is base else _fmt_paired(paired(f, base, m)[0])
        lines.append(f"| {f.name}{' *' if f.role == 'proposed' else ''} | `{f.chosen}` ({f.why}) | "
                     f"{_fmt(*test)} (n={test[2]}) | {_fmt(*recall)} | {_fmt(*valid)} | {epochs} | {diff} |")
    if e.claims:
        lines += ["", "### Claims", "",
                  f"Paired test {m.upper()} differences over the seeds both have. Users: each test (validation) "
                  "user's difference averaged over those seeds, its mean and 95% bootstrap interval over users "
                  "(2,000 resamples), where both sides' records hold per-user ranks (`–`: a record predates them; "
                  "`python -m benchmarks.converged --user-ranks FAMILY` re-runs it). The users are the same on every "
                  "seed, so seeds do not shrink the part of the noise that comes from which users the test has.", "",
                  "| claim | per seed | mean ± std | holds | users: test | users: validation |",
                  "|---|---|---|---|---|---|"]
        for a, b in e.claims:
            fa, fb = e.families[a], e.families[b]
            diffs, seeds = paired(fa, fb, m)
            per_seed = ", ".join(f"{s}: {d:+.4f}" for s, d in zip(seeds, diffs)) or "–"
            holds = ("–" if not diffs else "yes" if all(d > 0 for d in diffs) else
                     "no" if all(d <= 0 for d in diffs) else "mixed")
            if diffs and len(diffs) < len(e.seeds):
                holds += f" (only {len(diffs)} of {len(e.seeds)} seeds)"
            lines.append(f"| {a} > {b} | {per_seed} | {_fmt_paired(diffs)} | {holds} | "
                         f"{_fmt_interval(users_interval(fa, fb, m))} | "
                         f"{_fmt_interval(users_interval(fa, fb, m, 'valid'))} |")
    todo = todo_commands(e)
    if todo:
        lines += ["", "### Still to run", "", "```bash"] + todo + ["```"]
    return lines + [""]


def next_cells(e: Evidence) -> list[tuple[str, int]]:
    """The cells the protocol can run now, ``(label, seed)``, first things first (see ``--run``)."""
    order = e.priority + [name for name in e.families if name not in e.priority]
    todo = []
    for name in order:
        family = e.families[name]
        if family.chosen is None:
            if not family.ablation_of:
                todo += [(m, e.tuning_seed) for m in family.members if (m, e.tuning_seed) not in e.records]
        else:
            todo += [(family.chosen, seed) for seed in family.seeds or e.seeds
                     if (family.chosen, seed) not in e.records]
    return list(OrderedDict.fromkeys(todo))


def drive(grids: list[str], results: list[str] | None, first: list[str] | None = None,
          allow_dirty: bool = False, keep_checkpoints: bool = False) -> None:
    """``--run``: one cell at a time through ``benchmarks.run``, the next one chosen anew after each;
    ``first`` names families to take before the grid's priority; ``allow_dirty`` and ``keep_checkpoints``
    as ``benchmarks.run``'s."""
    from benchmarks import run

    if results is not None and len(results) != 1:
        raise SystemExit(f"--run writes its records to one results file: give --results one file, got {results}")
    tried: set[tuple[str, str, int]] = set()
    while True:
        records, _, _ = load(results or _results_paths(grids))
        by_key = {r["key"]: r for r in records}
        pending = []
        for grid in grids:
            for e in build(grid, by_key):
                unknown = [name for name in first or [] if name not in e.families]
                if unknown:
                    raise SystemExit(f"--first {unknown}: not a family of {grid}; families: {list(e.families)}")
                e.priority = list(first or []) + [name for name in e.priority if name not in (first or [])]
                pending += [(grid, e, label, seed) for label, seed in next_cells(e)
                            if (e.title, label, seed) not in tried]
        if not pending:
            print("[converged] nothing left to run")
            return
        grid, e, label, seed = pending[0]
        tried.add((e.title, label, seed))
        print(f"[converged] {e.title}: {label}, seed {seed} ({len(pending)} runnable now)", flush=True)
        run.main(["--grid", grid, "--seeds", str(seed), "--only", f"{label} | {e.model} | {e.dataset} | *"]
                 + (["--results", results[0]] if results else []) + (["--allow-dirty"] if allow_dirty else [])
                 + (["--keep-checkpoints"] if keep_checkpoints else []))


def fill_user_ranks(grids: list[str], results: list[str] | None, families: list[str], command: str,
                    allow_dirty: bool = False) -> None:
    """``--user-ranks``: re-run, in a fresh process each, the records of these families' chosen settings
    that hold no per-user ranks. The new record (same key) supersedes the old one; same seed and config
    give the same run on a CPU, and this says whether the test metrics came out the same."""
    from benchmarks import run

    run.require_committed_package(allow_dirty)

    records, _, _ = load(results or _results_paths(grids))
    by_key = {r["key"]: r for r in records}
    for grid in grids:
        for e in build(grid, by_key):
            unknown = [name for name in families if name not in e.families]
            if unknown:
                raise SystemExit(f"--user-ranks {unknown}: not a family of {grid}; families: {list(e.families)}")
            for name in families:
                family = e.families[name]
                for seed, old in sorted(family.records.items()):
                    if (old.get("user_ranks") or {}).get("test") is not None:
                        continue
                    print(f"[converged] {e.title}: {name} ({family.chosen}), seed {seed}: re-run for "
                          "per-user ranks", flush=True)
                    (new,) = run.run_grid([e.cells[(family.chosen, seed)]], command, again=True)
                    same = new.get("status") == "ok" and new.get("test") == old.get("test")
                    print(f"[converged]   test metrics {'the same' if same else 'DIFFER'}: "
                          f"{old['test'][e.metric]:.4f} -> {(new.get('test') or {}).get(e.metric)}", flush=True)


def _shown(path: str) -> str:
    """A results file as the page names it: from the repository root when inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(resolved)


def _results_paths(grids: list[str]) -> list[str]:
    return list(OrderedDict.fromkeys(str(load_grid(g)[0].results) for g in grids))


def todo_commands(e: Evidence) -> list[str]:
    """``benchmarks.run`` commands for the tuning cells and the chosen settings' seeds not yet run."""
    grid = f"benchmarks/grids/{e.grid}.yaml"
    runnable = next_cells(e)
    chosen = {f.chosen for f in e.families.values() if f.chosen}
    tuning = [label for label, _ in runnable if label not in chosen]
    seeds = OrderedDict((label, None) for label, _ in runnable if label in chosen)
    if not (tuning or seeds):
        return []
    lines = [f"# {len(tuning)} tuning cells runnable now; chosen settings still short of {len(e.seeds)} seeds: "
             f"{', '.join(seeds) or 'none'}",
             f"OMP_NUM_THREADS=1 python -m benchmarks.converged --run --grid {grid}"]
    return lines


def plot(e: Evidence, out_dir: Path) -> Path | None:
    """Two facets: the tuning cells' validation metric, and the chosen settings' test metric over seeds;
    None without matplotlib (the ``bench`` extra): the page then has no figures."""
    try:
        import matplotlib
    except ImportError:
        print("[converged] no plots: matplotlib is in the `bench` extra (pip install -e '.[bench]')")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuning = []
    for label in e.configs:
        record = e.records.get((label, e.tuning_seed))
        if record is not None:
            roles = {f.role for f in e.families.values() if label in f.members}
            role = next((r for r in ("baseline", "reference") if r in roles), "proposed")
            row = Row(label, role)
            row.records.append(record)
            tuning.append(row)
    chosen = []
    for f in e.families.values():
        if f.chosen and f.records:
            row = Row(f"{f.name}  ({f.chosen})", f.role)
            row.records = [f.records[s] for s in sorted(f.records)]
            chosen.append(row)
    if not tuning:
        return None
    tallest = max(len(tuning), len(chosen))
    fig, axes = plt.subplots(1, 2, figsize=(15, max(1.4 + 0.3 * tallest, 15 / 3.9)))  # under 4:1 after rounding to pixels
    _bar_panel(axes[0], tuning, f"tuning cells, seed {e.tuning_seed}", metric=e.metric, split="valid")
    if chosen:
        _bar_panel(axes[1], chosen, "chosen setting per method", metric=e.metric, split="test")
    else:
        axes[1].axis("off")
    path = out_dir / f"converged_{_slug(e.title)}.png"
    return _save(fig, f"{e.title}: {e.model}, converged runs (grey: baselines, blue: references, red: proposed; dashed: best baseline)",
                 path)


def report_page(grids: list[str], out: str | None, title: str | None) -> tuple[Path, str]:
    """The page a report goes to and its heading: ``--out`` / ``--title`` where given, else the grids'
    ``report: {page, title}`` (a page relative to the repository). Grids that name different pages, or none,
    need ``--out``, so one grid's run never overwrites another grid's page."""
    reports = [read_grid(grid).get("report") or {} for grid in grids]
    pages = {r.get("page") for r in reports}
    if out is None:
        if len(pages) != 1 or None in pages:
            raise SystemExit(f"--out: the grids' report.page differ or are missing ({sorted(map(str, pages))}); "
                             f"name the page to write with --out")
        out = str(REPO_ROOT / pages.pop())
    titles = {r["title"] for r in reports if r.get("title")}
    return Path(out).resolve(), title or (titles.pop() if len(titles) == 1 else "Converged evidence")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", action="append", required=True, help="grid YAML with a selection section")
    parser.add_argument("--results", nargs="+", help="results files (default: each grid's own)")
    parser.add_argument("--out", help="the page to write (default: the grids' report.page)")
    parser.add_argument("--plots", default=str(REPO_ROOT / "benchmarks" / "plots"))
    parser.add_argument("--title", help="the page's heading (default: the grids' report.title)")
    parser.add_argument("--run", action="store_true", help="run the protocol's next cells until none is left")
    parser.add_argument("--first", action="append", default=[], metavar="FAMILY",
                        help="with --run: take this family before the grid's priority (repeatable)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="with --run: keep each cell's RecBole checkpoint (to re-evaluate it later)")
    parser.add_argument("--user-ranks", action="append", default=[], metavar="FAMILY",
                        help="re-run this family's chosen records that hold no per-user ranks (repeatable)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="with --run / --user-ranks: run with uncommitted package code (see benchmarks.run)")
    args = parser.parse_args(argv)
    out, title = report_page(args.grid, args.out, args.title)  # before any training time is spent
    if args.user_ranks:
        fill_user_ranks(args.grid, args.results, args.user_ranks, command_line(argv, "benchmarks.converged"),
                        args.allow_dirty)
    if args.run:
        drive(args.grid, args.results, args.first, args.allow_dirty, args.keep_checkpoints)
    paths = args.results or _results_paths(args.grid)
    records, _, _ = load(paths)
    by_key = {r["key"]: r for r in records}
    evidence = [e for grid in args.grid for e in build(grid, by_key)]
    plot_dir = Path(args.plots).resolve()
    plot_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "",
             f"Generated by `{command_line(argv, 'benchmarks.converged')}` from "
             + ", ".join(f"`{_shown(p)}`" for p in paths) + ". "
             "The protocol is in each grid file's header; `benchmarks/REPRODUCTION.md` sets these figures beside "
             "the paper's.", ""]
    for e in evidence:
        lines += render_dataset(e)
        path = plot(e, plot_dir)
        if path is not None:
            lines += [f"![{e.title}]({Path(path).relative_to(out.parent)})", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
