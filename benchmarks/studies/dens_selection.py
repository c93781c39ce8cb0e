"""Question: What does DENS's selection cost per batch, chunked and fused, beside DNS's pool scoring?
Result: --json (committed: benchmarks/results/bench_dens_selection-cpu*.json); findings: benchmarks/studies/epoch_time.md.

What DENS's selection costs per batch, beside its floor and beside DNS's pool scoring.

DENS picks, from each row's pool of N candidates, the argmax of ``h . ((1 - w) e_n - g_n e_n)`` with the
gate ``g_n = sigmoid(W_n e_n + W_p e_p^r)`` -- a ``d``-dimensional gate per (row, candidate), so an exact
selection evaluates ``R x N x d`` sigmoids a batch, where DNS computes ``R x N`` dot products. Timed
interleaved, medians over ``--repeats`` (one thread, random tensors at LastFM's sizes, no gradient):

* ``straightforward`` -- ``gates.negative`` on the gathered ``[R, N, d]`` pool, then the scores;
* ``selection`` -- :func:`recbole_mdcns.methods.dens.pool_selection_scores`, the chunked path
  (``dens_compile: false``);
* ``fused selection`` -- the same with ``fused=True``, one kernel compiled by ``torch.compile`` (``dens_compile:
  true``, the default; compiled before the timing, its one-off compile time printed);
* ``sigmoid floor`` -- the ``[R, N, d]`` sigmoids alone, in the same chunks (a lower bound of any exact path);
* ``dns scoring`` -- DNS's pool scores, ``(h @ E.T).gather`` (what DENS's selection replaces);
* ``contrastive`` -- DENS's positive / negative gates and four contrastive terms, forward and backward.

    python -m benchmarks.studies.dens_selection --json benchmarks/results/bench_dens_selection-cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from recbole_mdcns.methods.dens import (SELECTION_CHUNK_ELEMENTS, DisentangleGates, contrastive_loss,
                                        factor_aware_scores, pool_selection_scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="targets per batch")
    parser.add_argument("--pool", type=int, default=100, help="N, candidates per row")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--items", type=int, default=3646, help="catalogue size (LastFM)")
    parser.add_argument("--weight", type=float, default=0.5, help="DENS's relevance weight w")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    R, N, d = args.rows, args.pool, args.dim
    gates = DisentangleGates(d)
    table = torch.nn.Embedding(args.items, d)
    h = torch.randn(R, d)
    index = torch.randint(0, args.items, (R, N))
    positives, negatives = torch.randint(0, args.items, (R,)), torch.randint(0, args.items, (R, 1))
    with torch.no_grad():
        pos_relevant = gates.positive(h, table(positives))
    chunk_rows = max(1, SELECTION_CHUNK_ELEMENTS // (N * d))
    buffer = torch.randn(chunk_rows * N, d)

    def straightforward():
        with torch.no_grad():
            e = table.weight[index]
            return factor_aware_scores(h, e, gates.negative(e, pos_relevant), args.weight)

    def selection():
        with torch.no_grad():
            return pool_selection_scores(gates, h, pos_relevant, table.weight, index, args.weight)

    def fused_selection():
        with torch.no_grad():
            return pool_selection_scores(gates, h, pos_relevant, table.weight, index, args.weight, fused=True)

    def sigmoid_floor():
        for _ in range(0, R, chunk_rows):
            buffer.sigmoid_()

    def dns_scoring():
        with torch.no_grad():
            return (h @ table.weight.T).gather(1, index)

    def contrastive():
        rep = h.clone().requires_grad_(True)
        e_pos, e_neg = table(positives), table(negatives)
        pos_rel = gates.positive(rep, e_pos)
        contrastive_loss(rep, e_pos, pos_rel, e_neg, gates.negative(e_neg, pos_rel)).backward()

    start = time.perf_counter()
    fused_selection()
    compile_s = time.perf_counter() - start
    print(f"fused selection: compiled and run once in {compile_s:.1f} s")
    cases = {"straightforward": straightforward, "selection": selection, "fused selection": fused_selection,
             "sigmoid floor": sigmoid_floor,
             "dns scoring": dns_scoring, "contrastive": contrastive}
    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(args.repeats):  # interleaved: each round times every case once
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"R={R} rows, N={N}, d={d}, {args.items} items, w={args.weight}, {args.threads} thread(s); "
          f"median ms over {args.repeats} interleaved rounds")
    print("| case | ms / batch | x sigmoid floor |\n|---|---|---|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.1f} | {ms / medians['sigmoid floor']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "median_ms": medians, "first_fused_call_s": compile_s,
                       "times_ms": times}, f, indent=1)


if __name__ == "__main__":
    main()
