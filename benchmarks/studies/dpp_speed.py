"""Question: How much faster is the batched exact k-DPP than one-user-at-a-time dppy?
Result: printed; findings: benchmarks/studies/capped_evidence.md (DivNS).

Benchmark batched ``sample_k_dpp`` against one-user-at-a-time exact k-DPP sampling with dppy.

Each user has its own quality-weighted cosine kernel ``L_u = diag(q) S diag(q)`` over ``m``
cached items (``S`` from rank-``d`` unit embeddings). Both samplers are exact and pay for the
eigendecomposition of every user's kernel; torch is pinned to ``--threads`` threads (default 1,
like dppy's scalar loops) so the ratio is per core. Run from the repo root:

    python -m benchmarks.studies.dpp_speed --b 512 --m 40 --k 10
"""

import argparse
import time

import numpy as np
import torch
from dppy.finite_dpps import FiniteDPP

from recbole_mdcns.dpp import sample_k_dpp


def make_kernels(b: int, m: int, d: int, seed: int) -> torch.Tensor:
    """``[b, m, m]`` float64 quality-weighted cosine kernels."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, m, d, generator=g, dtype=torch.float64), dim=-1)
    quality = torch.exp(0.5 * torch.randn(b, m, generator=g, dtype=torch.float64))
    return quality[:, :, None] * (emb @ emb.transpose(1, 2)) * quality[:, None, :]


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_dppy(L: np.ndarray, k: int, seed: int) -> float:
    """Seconds to draw one exact k-DPP sample per user with dppy, users one at a time."""
    rng = np.random.RandomState(seed)
    FiniteDPP("likelihood", L=L[0]).sample_exact_k_dpp(size=k, mode="GS", random_state=rng)  # warm-up
    t0 = time.perf_counter()
    for L_u in L:
        FiniteDPP("likelihood", L=L_u).sample_exact_k_dpp(size=k, mode="GS", random_state=rng)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b", type=int, default=512, help="users in the batch")
    parser.add_argument("--m", type=int, default=40, help="cached items per user")
    parser.add_argument("--k", type=int, default=10, help="items sampled per user")
    parser.add_argument("--d", type=int, default=64, help="embedding rank of the cosine kernel")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the batched call")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="kernel dtype for torch")
    parser.add_argument("--device", default="cpu", help="torch device for sample_k_dpp")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    L = make_kernels(args.b, args.m, args.d, args.seed)
    L_dev = L.to(device=args.device, dtype=getattr(torch, args.dtype))
    g = torch.Generator(device=L_dev.device).manual_seed(args.seed)
    t_torch = median_seconds(lambda: sample_k_dpp(L_dev, args.k, generator=g), L_dev.device, args.repeats)
    t_eigh = median_seconds(lambda: torch.linalg.eigh(L_dev), L_dev.device, args.repeats)  # a spectral floor
    t_dppy = time_dppy(L.numpy(), args.k, args.seed)
    print(
        f"k-DPP b={args.b} m={args.m} k={args.k} ({args.device} {args.dtype}, {args.threads} thread(s)): "
        f"sample_k_dpp {t_torch * 1e3:.1f} ms | dppy loop {t_dppy * 1e3:.1f} ms | "
        f"speed-up {t_dppy / t_torch:.1f}x\n"
        f"  batched eigh alone {t_eigh * 1e3:.1f} ms ({t_eigh / t_torch:.0%} of sample_k_dpp): "
        f"a spectral sampler's speed-up is at most {t_dppy / t_eigh:.1f}x here"
    )


if __name__ == "__main__":
    main()
