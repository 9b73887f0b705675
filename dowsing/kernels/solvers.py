"""Solving (H + lambda I) z = g: conjugate gradient and a dense solve.

Both report how they ended, and the caller decides what to show.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class SolveReport:
    x: torch.Tensor  # float64
    method: str
    iterations: int
    rel_residual: float  # ||b - A x|| / ||b||, computed afresh at the end
    nonpositive_curvature: bool  # CG met p^T A p <= 0 / dense A is not positive definite
    converged: bool

    def summary(self) -> dict:
        return {
            "method": self.method,
            "iterations": self.iterations,
            "rel_residual": self.rel_residual,
            "nonpositive_curvature": self.nonpositive_curvature,
            "converged": self.converged,
        }


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, rtol: float = 1e-6,
                       maxiter: int | None = None, callback=None, x0: torch.Tensor | None = None) -> SolveReport:
    """Hestenes-Stiefel CG for A x = b with A symmetric, given only x -> A x.

    Stops when ||r|| <= rtol ||b||, after maxiter (default dim b) iterations,
    or on a direction of non-positive curvature p^T A p <= 0, where A is not
    positive definite and CG's iterate means nothing more: it then returns the
    iterate reached so far and says so. x0 warm-starts from a nearby solution.
    """
    b = b.to(torch.float64)
    maxiter = maxiter or b.numel()
    b_norm = float(b.norm())
    x = torch.zeros_like(b)
    if b_norm == 0.0:
        return SolveReport(x, "cg", 0, 0.0, False, True)
    r = b.clone()
    if x0 is not None:
        x = x0.to(torch.float64).clone()
        r = b - matvec(x)
    p = r.clone()
    rs = float(r @ r)
    iterations, nonpositive, converged = 0, False, False
    for iterations in range(1, maxiter + 1):
        ap = matvec(p)
        curvature = float(p @ ap)
        if curvature <= 0.0:
            nonpositive = True
            iterations -= 1
            break
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = float(r @ r)
        if callback is not None:
            callback(iterations, rs_new ** 0.5 / b_norm)
        if rs_new ** 0.5 <= rtol * b_norm:
            converged = True
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    rel = float((b - matvec(x)).norm()) / b_norm
    return SolveReport(x, "cg", iterations, rel, nonpositive, converged and rel <= 10 * rtol)


def dense_solve(a: torch.Tensor, b: torch.Tensor, method: str = "exact") -> SolveReport:
    """Direct solve of A x = b in float64: Cholesky when A is positive
    definite (which the factorisation itself tells), LU otherwise."""
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(a)
    positive_definite = int(info) == 0
    if positive_definite:
        x = torch.cholesky_solve(b.unsqueeze(-1), factor).squeeze(-1)
    else:
        x = torch.linalg.solve(a, b)
    b_norm = float(b.norm())
    rel = float((a @ x - b).norm()) / b_norm if b_norm > 0 else 0.0
    return SolveReport(x, method, 0, rel, not positive_definite, bool(torch.isfinite(x).all()))


def damped(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    return matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)


def lissa(matvec: Callable[[torch.Tensor, int], torch.Tensor], b: torch.Tensor, scale: float, depth: int = 1000,
          repeats: int = 1, rtol: float = 0.0, full_matvec: Callable[[torch.Tensor], torch.Tensor] | None = None,
          callback=None) -> SolveReport:
    """LiSSA (Agarwal et al. 2017; as in pyDVL and dattri): a stochastic
    Neumann series for A^-1 b with A = H + lambda I symmetric positive definite.

    z_0 = b, z_{j+1} = b + (I - A_j / scale) z_j, estimate x = z_J / scale,
    where A_j p = matvec(p, j) is a minibatch estimate of A p at step j
    (pass the exact product for a deterministic series). Averaged over
    `repeats` independent series. It converges when 0 < eig(A) < 2 * scale,
    at the rate (1 - eig_min(A) / scale) per step, so scale must bound the
    largest eigenvalue. With full_matvec the report holds the true relative
    residual ||b - A x|| / ||b||, and the series stops early once the residual
    of its current estimate is <= rtol (checked every 50 steps).
    """
    b = b.to(torch.float64)
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return SolveReport(torch.zeros_like(b), "lissa", 0, 0.0, False, True)
    estimates, steps = [], 0
    for r in range(repeats):
        z = b.clone()
        for j in range(depth):
            z = b + z - matvec(z, r * depth + j) / scale
            steps += 1
            if not torch.isfinite(z).all() or float(z.norm()) > 1e12 * b_norm * scale:
                break  # diverged: an eigenvalue of A / scale lies outside (0, 2)
            if full_matvec is not None and rtol > 0 and (j + 1) % 50 == 0:
                residual = float((b - full_matvec(z / scale)).norm()) / b_norm
                if callback is not None:
                    callback(steps, residual)
                if residual <= rtol:
                    break
        estimates.append(z / scale)
    x = torch.stack(estimates).mean(dim=0)
    finite = bool(torch.isfinite(x).all())
    rel = float((b - full_matvec(x)).norm()) / b_norm if full_matvec is not None and finite else float("nan")
    converged = finite and (rel <= max(rtol, 1e-3) if full_matvec is not None else True)
    return SolveReport(x, "lissa", steps, rel, not finite, converged)
