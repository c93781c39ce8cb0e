"""Question: Which way of scoring a [B, N] candidate pool is cheaper, forward and backward?
Result: printed; findings: benchmarks/studies/epoch_time.md (MDCNS section).

Forward + backward cost of scoring a ``[B, K]`` candidate pool by ``h · E[items]``, both ways.

``gather``: the item vectors of the pool are gathered (``[B, K, d]``) and multiplied with ``h``
(``bmm``; ``einsum`` is what the scorer used before); ``catalogue``: one ``h @ E.T`` matmul over the
whole catalogue, then a gather of the pool's columns. ``recbole_mdcns.scoring.FULL_CATALOGUE_RATIO``
picks between them. Run from the repo root (one thread, as the project's grid cells):

    python -m benchmarks.studies.pool_scoring
"""

import argparse
import time

import torch


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b", type=int, default=2048, help="rows in the batch")
    parser.add_argument("--k", type=int, default=101, help="pool items per row (positive + N = 100)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--items", default="1683,3646,12101", help="catalogue sizes (ml-100k, LastFM, Beauty)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.b, args.d, generator=g, requires_grad=True)
    for n in (int(x) for x in args.items.split(",")):
        table = torch.nn.Embedding(n, args.d)
        items = torch.randint(1, n, (args.b, args.k), generator=g)
        ways = {
            "einsum": lambda: torch.einsum("bd,bkd->bk", h, table(items)),
            "gather (bmm)": lambda: torch.bmm(table(items), h.unsqueeze(-1)).squeeze(-1),
            "catalogue": lambda: (h @ table.weight.T).gather(1, items),
        }
        cells = [f"{name} {median_ms(lambda f=f: f().sum().backward(), args.repeats):.1f} ms"
                 for name, f in ways.items()]
        print(f"B={args.b} K={args.k} d={args.d} n_items={n} (fwd+bwd, {args.threads} thread): " + " | ".join(cells))


if __name__ == "__main__":
    main()
