"""Micro-benchmark of one domain's saturation curve and bootstrap kernels on
the structured route (`kernels.saturation.LowRankSystem`), at the default
model's sizes: D = 1536, r = 800 domain tokens, N_k = 34 facts, the default
grid (24 log-spaced n plus N_k).

  per_solve: mu on the grid and in brentq by one Woodbury solve per n, then
             the kernels by one Woodbury solve (N_k right-hand sides) per n
  spectral:  `LowRankSystem.forms` on [G; g] over the grid (one
             eigendecomposition, checked at the grid's ends) and the
             spectral mu for brentq

Both start from the same LowRankSystem (its B factorisation is not timed).
Prints the median of --repeats runs of each and the largest relative
difference between their curves and kernels.

  python benchmarks/bench_saturation.py
  python benchmarks/bench_saturation.py --case symmetric --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dowsing.kernels.saturation import LowRankSystem, mu_function, n_grid, saturation  # noqa: E402


def domain_system(dim: int, rank: int, n_k: int, n_total: int, case: str, seed: int = 0):
    """A domain as the engine builds it: B = (others + N_k Hbar)/M + lambda I.
    general: a fifth of the tokens have negative curvature, each on the input
    of a positive token (so d has both signs and diag(d) P needs eig);
    symmetric: d >= 0 (Gauss-Newton)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * dim, dim, generator=gen, dtype=torch.float64)
    others = x.T @ (x * torch.rand(4 * dim, 1, generator=gen, dtype=torch.float64)) / dim
    u = torch.randn(rank, dim, generator=gen, dtype=torch.float64)
    d = torch.rand(rank, generator=gen, dtype=torch.float64) / dim
    if case == "general":
        k = rank // 5
        u[:k], d[:k] = u[k:2 * k], -0.3 * d[k:2 * k]
    hbar = u.T @ (u * d.unsqueeze(-1))
    base = (others * (n_total - n_k) + n_k * hbar) / n_total + 1e-3 * torch.eye(dim, dtype=torch.float64)
    grads = (torch.randn(n_k, rank, generator=gen, dtype=torch.float64) + 1.0) @ u / rank ** 0.5 \
        + 0.1 * torch.randn(n_k, dim, generator=gen, dtype=torch.float64)
    return base, u, d, grads


def per_solve(system: LowRankSystem, grads: torch.Tensor, grid, mean: float):
    g = grads.mean(0)
    sat = saturation(lambda n: float(g @ system.solve(n, g)), system.n_k, mean, 24, 1000.0)
    gt = grads.T.contiguous()
    kernels = np.stack([(grads @ system.solve(float(n), gt)).numpy() for n in grid])
    return sat, kernels


def spectral(system: LowRankSystem, grads: torch.Tensor, grid, mean: float):
    g = grads.mean(0)
    forms = system.forms(grid, torch.vstack([grads, g.unsqueeze(0)]))
    sat = saturation(mu_function(system, g, grid), system.n_k, mean, 24, 1000.0, mus=forms[:, -1, -1])
    return sat, forms[:, :-1, :-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=800)
    parser.add_argument("--facts", type=int, default=34)
    parser.add_argument("--case", choices=("general", "symmetric"), default="general")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_total = 4 * args.facts
    base, u, d, grads = domain_system(args.dim, args.rank, args.facts, n_total, args.case)
    grid = n_grid(args.facts, 24, 1000.0)
    g = grads.mean(0)
    mean = float(g @ torch.linalg.solve(base, g))
    times = {"per_solve": [], "spectral": []}
    results = {}
    for _ in range(args.repeats):
        for name, run in (("per_solve", per_solve), ("spectral", spectral)):
            system = LowRankSystem(base, u, d, args.facts, n_total)
            t0 = time.perf_counter()
            results[name] = run(system, grads, grid, mean)
            times[name].append(time.perf_counter() - t0)
            if name == "spectral":
                results["spectral_used"] = system.spectral(grid, grads)
                results["how"] = system.spectrum.how
    (sat_a, k_a), (sat_b, k_b) = results["per_solve"], results["spectral"]
    mus_a, mus_b = np.array(sat_a["points"])[:, 1], np.array(sat_b["points"])[:, 1]
    print(f"D = {args.dim}, r = {args.rank}, N_k = {args.facts}, {len(grid)} grid points, case {args.case} "
          f"(spectral form used: {results['spectral_used']}, {results['how']}), torch threads {torch.get_num_threads()}")
    for name, ts in times.items():
        print(f"  {name:9s} median {statistics.median(ts):.3f} s  (runs: {', '.join(f'{t:.3f}' for t in ts)})")
    print(f"  max relative difference: curve {np.max(np.abs(mus_b - mus_a) / np.abs(mus_a)):.1e}, "
          f"kernels {np.abs(k_b - k_a).max() / np.abs(k_a).max():.1e}")
    for key in ("alpha", "n0", "c", "r2", "delta_n_10pct", "delta_n_direct"):
        print(f"  {key:15s} {sat_a[key]!s:>24s} {sat_b[key]!s:>24s}")


if __name__ == "__main__":
    main()
