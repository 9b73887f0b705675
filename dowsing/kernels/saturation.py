"""Saturation (paper section 5): how many more examples until a domain's
marginal influence drops to 10% of its current value.

With Hbar_j the mean per-fact curvature of domain j in S_k, a corpus with n
facts of domain k has curvature H_k(n) = (sum_{j!=k} N_j Hbar_j + n Hbar_k)/M
= H_k + (n - N_k)/M Hbar_k, and the marginal influence is
mu_k(n) = g_k^T (H_k(n) + lambda I)^-1 g_k, so mu_k(N_k) = Mean_k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import optimize

TARGET_FRACTION = 0.1


class DenseSystem:
    """(H_k(n) + lambda I) x = rhs by a dense solve; base = H_k + lambda I (float64)."""

    def __init__(self, base: torch.Tensor, hbar_k: torch.Tensor, n_k: int, n_total: int):
        self.base, self.hbar_k, self.n_k, self.n_total = base, hbar_k, n_k, n_total

    def solve(self, n: float, rhs: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.base + ((n - self.n_k) / self.n_total) * self.hbar_k, rhs)

    def forms(self, ns, left: torch.Tensor) -> np.ndarray:
        """forms[q] = left (H_k(n_q) + lambda I)^-1 left^T, one solve per n."""
        return _forms_by_solves(self, ns, left)


def _forms_by_solves(system, ns, left: torch.Tensor) -> np.ndarray:
    lt = left.T.contiguous()
    return np.stack([(left @ system.solve(float(n), lt)).cpu().numpy() for n in ns])


# The spectral form is used only where, at both ends of the range of n it is
# asked for, every row of its forms matches the Woodbury solve's to this
# relative error (2-norm of the row).
SPECTRAL_RTOL = 1e-10


@dataclass
class PencilSpectrum:
    """c (I + c diag(d) P)^-1 diag(d) = V diag(c / (1 + c lam)) R for every c,
    from one eigendecomposition (P = U B^-1 U^T, symmetric):

    * d of one sign s ("symmetric"): with h = sqrt(|d|), h P h = W diag(l) W^T
      (eigh) gives V = diag(h) W, R = s V^T, lam = s l, because
      (I + c D P)^-1 D = s H (I + c s H P H)^-1 H for D = s H^2;
    * otherwise ("general"): diag(d) P = V diag(lam) V^-1 (eig; lam and V may
      be complex), R = V^-1 diag(d), applied through the LU factors of V.
    """

    v: torch.Tensor
    lam: torch.Tensor
    how: str
    sign: float = 1.0
    v_lu: tuple | None = None
    d: torch.Tensor | None = None

    def weights(self, c: float) -> torch.Tensor:
        """c / (1 + c lam), one per eigenvalue."""
        return c / (1.0 + c * self.lam)

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """R x."""
        if self.v_lu is None:
            return self.sign * (self.v.T @ x)
        return torch.linalg.lu_solve(*self.v_lu, (self.d.unsqueeze(-1) * x).to(self.v.dtype))


def pencil_spectrum(p: torch.Tensor, d: torch.Tensor) -> PencilSpectrum:
    """The PencilSpectrum of (P, diag(d)): symmetric where d has one sign,
    general otherwise."""
    if bool((d >= 0).all()) or bool((d <= 0).all()):
        sign = 1.0 if bool((d >= 0).all()) else -1.0
        h = d.abs().sqrt()
        lam, w = torch.linalg.eigh(0.5 * (p + p.T) * h.unsqueeze(-1) * h)
        return PencilSpectrum(h.unsqueeze(-1) * w, sign * lam, "symmetric", sign=sign)
    lam, v = torch.linalg.eig(d.unsqueeze(-1) * p)
    return PencilSpectrum(v, lam, "general", v_lu=torch.linalg.lu_factor(v), d=d)


class LowRankSystem:
    """The same solves through the Woodbury identity, for Hbar_k = U^T diag(d) U of rank r.

    (B + U^T C U)^-1 = B^-1 - B^-1 U^T (I + C P)^-1 C U B^-1, P = U B^-1 U^T,
    so each n costs an r x r solve instead of a D x D one. C = (n-N_k)/M diag(d)
    needs no inverse, so tokens with zero or negative curvature are fine.

    `forms` and `mu_function` go further with a `PencilSpectrum`: with
    c = (n - N_k)/M and c (I + C P)^-1 diag(d) = V diag(c / (1 + c lam)) R,
    left A(n)^-1 left^T = K0 - (left B^-1 U^T V) diag(c / (1 + c lam)) (R U B^-1 left^T),
    K0 = left B^-1 left^T, so after one r x r eigendecomposition each n costs
    O(r N^2) for N rows of left, not an r x r solve.
    """

    def __init__(self, base: torch.Tensor, u: torch.Tensor, d: torch.Tensor, n_k: int, n_total: int):
        self.lu = torch.linalg.lu_factor(base)
        self.u, self.d, self.n_k, self.n_total = u, d, n_k, n_total
        self.binv_ut = torch.linalg.lu_solve(*self.lu, u.T.contiguous())
        self.p = u @ self.binv_ut
        self.eye = torch.eye(u.shape[0], dtype=base.dtype, device=base.device)
        self.spectrum: PencilSpectrum | None = None
        self._trusted: bool | None = None

    def solve(self, n: float, rhs: torch.Tensor) -> torch.Tensor:
        column = rhs.dim() == 1
        rhs2 = rhs.unsqueeze(-1) if column else rhs
        binv_rhs = torch.linalg.lu_solve(*self.lu, rhs2)
        cd = ((n - self.n_k) / self.n_total) * self.d
        inner = torch.linalg.solve(self.eye + cd.unsqueeze(-1) * self.p, cd.unsqueeze(-1) * (self.u @ binv_rhs))
        out = binv_rhs - self.binv_ut @ inner
        return out.squeeze(-1) if column else out

    def _spectral_parts(self, left: torch.Tensor):
        """(K0, left B^-1 U^T V, R U B^-1 left^T) of the spectral form."""
        binv_lt = torch.linalg.lu_solve(*self.lu, left.T.contiguous())
        v = self.spectrum.v
        return left @ binv_lt, (left @ self.binv_ut).to(v.dtype) @ v, self.spectrum.right(self.u @ binv_lt)

    def _forms_spectral(self, ns, left: torch.Tensor) -> np.ndarray:
        k0, lf, rf = self._spectral_parts(left)
        w = torch.stack([self.spectrum.weights((float(n) - self.n_k) / self.n_total) for n in ns])
        return (k0 - torch.einsum("im,qm,mj->qij", lf, w, rf).real).cpu().numpy()

    def spectral(self, ns, left: torch.Tensor) -> bool:
        """Whether the spectral form is used: at the smallest and the largest
        of ns (the ends of the range of n asked for), every row of its forms
        for `left` matches the Woodbury solve's to SPECTRAL_RTOL (relative
        2-norm). Decided at the first call; where it fails (an eigenvector
        basis too ill-conditioned, a defective diag(d) P) every n is a solve."""
        if self._trusted is None:
            try:
                self.spectrum = pencil_spectrum(self.p, self.d)
            except RuntimeError:  # the eigenvalue iteration did not converge
                self._trusted = False
                return False
            ends = [float(np.min(ns)), float(np.max(ns))]
            direct = _forms_by_solves(self, ends, left)
            fast = self._forms_spectral(ends, left)
            self._trusted = bool(np.all(np.linalg.norm(fast - direct, axis=-1)
                                        <= SPECTRAL_RTOL * np.linalg.norm(direct, axis=-1)))
        return self._trusted

    def forms(self, ns, left: torch.Tensor) -> np.ndarray:
        """forms[q] = left (H_k(n_q) + lambda I)^-1 left^T: by the spectral form
        where it is used (`spectral`), else by one Woodbury solve per n."""
        if self.spectral(ns, left):
            return self._forms_spectral(ns, left)
        return _forms_by_solves(self, ns, left)

    def quadratic(self, g: torch.Tensor, ns) -> Callable | None:
        """n -> g^T (H_k(n) + lambda I)^-1 g in O(r) per n by the spectral form,
        or None where it is not used (`spectral`, asked with ns and g)."""
        if not self.spectral(ns, g.unsqueeze(0)):
            return None
        k0, lf, rf = self._spectral_parts(g.unsqueeze(0))
        mu0, lf, rf = float(k0), lf[0], rf[:, 0]
        return lambda n: mu0 - float(((lf * self.spectrum.weights((n - self.n_k) / self.n_total)) @ rf).real)


def mu_function(system, g: torch.Tensor, ns=None) -> Callable:
    """mu(n) = g^T (H_k(n) + lambda I)^-1 g. With ns (the n it will be asked
    for lie in [min ns, max ns]) a LowRankSystem gives it by its spectral form
    where that is used; otherwise each n is a solve."""
    if ns is not None and isinstance(system, LowRankSystem):
        fast = system.quadratic(g, ns)
        if fast is not None:
            return fast
    return lambda n: float(g @ system.solve(n, g))


def resampling_kernels(system, grads: torch.Tensor, grid) -> np.ndarray:
    """kernels[q] = G (H_k(n_q) + lambda I)^-1 G^T for the bootstrap: with counts
    m, the resampled mu(n_q) is m^T kernels[q] m / N_k^2."""
    return system.forms(grid, grads)


def n_grid(n_k: int, points: int, max_factor: float) -> np.ndarray:
    """Log-spaced n from N_k/10 to max_factor * N_k, with N_k itself included."""
    grid = np.geomspace(n_k / 10.0, max_factor * n_k, points)
    return np.unique(np.append(grid, float(n_k)))


@dataclass
class PowerLawFit:
    alpha: float
    n0: float
    c: float
    r2: float


def _linear_fit(log_n_shift: np.ndarray, log_mu: np.ndarray):
    slope, intercept = np.polyfit(log_n_shift, log_mu, 1)
    residual = log_mu - (intercept + slope * log_n_shift)
    return -slope, intercept, float(residual @ residual)


def fit_power_law(ns: np.ndarray, mus: np.ndarray) -> PowerLawFit:
    """Least squares in log space: log mu = log c - alpha log(n + N0), alpha > 0,
    N0 >= 0, c > 0. A grid over N0 gives the start (for fixed N0 the problem is
    linear), scipy's bounded least_squares refines all three."""
    ns = np.asarray(ns, dtype=float)
    mus = np.asarray(mus, dtype=float)
    if np.any(mus <= 0) or not np.all(np.isfinite(mus)):
        raise ValueError("mu(n) must be positive and finite to fit a power law")
    log_mu = np.log(mus)
    candidates = np.concatenate([[0.0], np.geomspace(ns.min() * 1e-3, ns.max() * 10, 60)])
    best = min(((n0,) + _linear_fit(np.log(ns + n0), log_mu) for n0 in candidates), key=lambda r: r[3])
    n0, alpha, log_c, _ = best

    def residuals(params):
        lc, a, shift = params
        return lc - a * np.log(ns + shift) - log_mu

    start = [log_c, max(alpha, 1e-6), n0]
    fit = optimize.least_squares(residuals, start, bounds=([-np.inf, 1e-12, 0.0], [np.inf, np.inf, np.inf]),
                                 x_scale="jac", xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=5000)
    lc, alpha, n0 = fit.x
    ss_res = float(fit.fun @ fit.fun)
    ss_tot = float(((log_mu - log_mu.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLawFit(alpha=float(alpha), n0=float(n0), c=float(math.exp(lc)), r2=float(r2))


def delta_n_from_fit(n: float, n0: float, alpha: float, fraction: float = TARGET_FRACTION) -> float:
    """Paper's formula: dn = (n + N0) * fraction^(-1/alpha) - N0 - n."""
    return (n + n0) * fraction ** (-1.0 / alpha) - n0 - n


def delta_n_on_curve(mu: Callable, n_k: int, ns: np.ndarray, mus: np.ndarray,
                     fraction: float = TARGET_FRACTION) -> float | None:
    """Root of mu(N_k + dn) = fraction * mu(N_k) on the computed curve (brentq
    inside the first bracketing grid interval); None if beyond the grid."""
    target = fraction * mu(n_k)
    above = [(n, m) for n, m in zip(ns, mus) if n >= n_k]
    for (n_lo, m_lo), (n_hi, m_hi) in zip(above, above[1:]):
        if m_lo > target >= m_hi:
            root = optimize.brentq(lambda n: mu(n) - target, n_lo, n_hi, xtol=1e-9 * n_hi, rtol=1e-12)
            return float(root - n_k)
    return None


def rise_reason(ns: np.ndarray, mus: np.ndarray, n_k: int, i: int) -> str:
    """Why there is no Δn when mu rises between grid points i and i+1: where it
    stops decreasing, and how far it had fallen by then. A rise means the
    domain's own curvature Hbar_k is not positive semi-definite along the
    solution (d mu/dn = -z(n)^T Hbar_k z(n) / M), which indefinite exact
    Hessians allow; no power law describes such a curve."""
    if i == 0:
        return "μ(n) rises with n from the start: more data of this kind is not predicted to saturate."
    at_n_k = float(np.interp(n_k, ns, mus))
    fallen = 100.0 * float(mus[i]) / at_n_k if at_n_k > 0 else float("nan")
    where = f"n ≈ {ns[i]:.3g}" + (f" (at {fallen:.0f}% of today's μ)" if math.isfinite(fallen) else "")
    return (f"μ(n) stops decreasing at {where} and rises after it: the domain's curvature is indefinite here, "
            "so no power law describes the curve.")


def saturation(mu: Callable, n_k: int, mean: float, points: int, max_factor: float, mus=None) -> dict:
    """Evaluate mu on the grid (or take mus, its values there, where the caller
    has them), fit the power law, and give both dn estimates or the reason
    there is none."""
    ns = n_grid(n_k, points, max_factor)
    mus = np.array([mu(float(n)) for n in ns]) if mus is None else np.asarray(mus, dtype=float)
    out = {
        "alpha": None, "n0": None, "c": None, "r2": None,
        "points": [[float(n), float(m)] for n, m in zip(ns, mus)],
        "delta_n_10pct": None, "delta_n_direct": None, "reason": None,
    }
    if not mean > 0:
        out["reason"] = "Mean influence is not positive: more data of this kind is not predicted to lower the loss."
        return out
    if np.any(mus <= 0) or not np.all(np.isfinite(mus)):
        out["reason"] = "μ(n) is not positive over the whole range (the damped curvature is indefinite)."
        return out
    rises = np.flatnonzero(np.diff(mus) > 1e-9 * np.abs(mus[:-1]))
    if rises.size:
        out["reason"] = rise_reason(ns, mus, n_k, int(rises[0]))
        return out
    out["delta_n_direct"] = delta_n_on_curve(mu, n_k, ns, mus)
    try:
        fit = fit_power_law(ns, mus)
    except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:
        out["reason"] = f"The power-law fit failed: {exc}."
        return out
    out.update(alpha=fit.alpha, n0=fit.n0, c=fit.c, r2=fit.r2)
    try:
        dn = delta_n_from_fit(n_k, fit.n0, fit.alpha)
    except OverflowError:  # 0.1^(-1/alpha) beyond floats: a slower decay than any finite dn
        dn = math.inf
    if not math.isfinite(dn):
        out["reason"] = f"The fitted decay is too slow (α = {fit.alpha:.2g}) for a finite Δn."
        return out
    out["delta_n_10pct"] = float(dn)
    return out
