"""One random component: the exact eigen path (MATH.md), all genes as arrays.

With ``ZRZ = U diag(lam) U'`` and ``w = U' ZRy`` the profiled criterion of the
variance ratio ``g = s_1 / s`` is a closed-form sum over the q eigenvalues:

    f(g) = m log S(g) + sum_j log(1 + g d_j),   S(g) = yRy - sum_j g w_j^2 / (1 + g lam_j)

(``m = n - p`` and ``d = lam`` for REML, ``m = n`` and ``d = eig(ZZ)`` for ML;
``-f/2`` is the log-likelihood up to a constant).  It is minimised for all genes
at once: a grid over ``log g`` finds the basin, a bracketed Newton iteration
polishes it, and the boundaries ``g = 0`` and ``g = inf`` (heritability 1,
residual variance 0; a finite limit only when ``Z`` spans everything ``X`` leaves,
see :meth:`EigenCriterion.top_limit`) are compared explicitly, as lmmlite does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._reduce import symmetric_eigh

__all__ = ["EigenCriterion", "fit_ratio_eigen", "RatioFit"]

_LOG_G_GRID = np.arange(-18.0, 18.01, 0.5)


@dataclass
class EigenCriterion:
    """The profiled criterion of one gene block in the eigen basis.

    Attributes
    ----------
    lam : ndarray (q,)
        Eigenvalues of ZRZ.
    w2 : ndarray (G, q)
        Squared rotated ``U' ZRy``.
    yRy : ndarray (G,)
    det_eigs : ndarray (q,)
        Eigenvalues entering the determinant (``lam`` for REML, ``eig(ZZ)`` for ML).
    m : float
        ``n - p`` (REML) or ``n`` (ML).
    """

    lam: np.ndarray
    w2: np.ndarray
    yRy: np.ndarray
    det_eigs: np.ndarray
    m: float

    @classmethod
    def from_matrices(cls, ZRZ: np.ndarray, ZRy: np.ndarray, yRy: np.ndarray, ZZ: np.ndarray,
                      reml: bool, m: float) -> EigenCriterion:
        """Rotate by the eigenvectors of ``ZRZ``; ``ZRy`` is q x G (genes as columns).

        The determinant uses the eigenvalues of ``ZRZ`` (REML) or of ``ZZ`` (ML).
        """
        lam, U = symmetric_eigh(ZRZ)
        w = U.T @ ZRy
        w[lam == 0.0] = 0.0          # ZRy lies in the range of ZRZ: only round-off there
        det = lam if reml else symmetric_eigh(ZZ)[0]
        return cls(lam, (w * w).T, yRy, det, m)

    def S(self, g: np.ndarray) -> np.ndarray:
        """``y'Py * s`` at ratios ``g`` (shape (G,) or (G, K) for K trial values)."""
        g = np.asarray(g, dtype=float)
        if g.ndim == 1:
            return self.yRy - np.sum(self.w2 * (g[:, None] / (1.0 + g[:, None] * self.lam)), axis=1)
        frac = g[:, :, None] / (1.0 + g[:, :, None] * self.lam)   # G x K x q
        return self.yRy[:, None] - np.einsum("gkq,gq->gk", frac, self.w2)

    def value(self, g: np.ndarray) -> np.ndarray:
        """Criterion ``f(g)`` (minus twice the profiled log-likelihood, up to a constant)."""
        g = np.asarray(g, dtype=float)
        S = np.maximum(self.S(g), np.finfo(float).tiny)
        if g.ndim == 1:
            return self.m * np.log(S) + np.sum(np.log1p(g[:, None] * self.det_eigs), axis=1)
        return self.m * np.log(S) + np.sum(np.log1p(g[:, :, None] * self.det_eigs), axis=2)

    def terms(self, g: np.ndarray) -> tuple[np.ndarray, ...]:
        """``S, S', S''`` and ``L, L', L''`` (``L`` the log-determinant) at ``g`` (G,)."""
        den = 1.0 + g[:, None] * self.lam
        S = np.maximum(self.yRy - np.sum(self.w2 * g[:, None] / den, axis=1), np.finfo(float).tiny)
        S1 = -np.sum(self.w2 / den**2, axis=1)
        S2 = 2.0 * np.sum(self.w2 * self.lam / den**3, axis=1)
        dd = 1.0 + g[:, None] * self.det_eigs
        L = np.sum(np.log(dd), axis=1)
        L1 = np.sum(self.det_eigs / dd, axis=1)
        L2 = -np.sum((self.det_eigs / dd) ** 2, axis=1)
        return S, S1, S2, L, L1, L2

    def derivatives(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``f``, ``df/dg`` and ``d2f/dg2`` at ``g`` (shape (G,))."""
        S, S1, S2, L, L1, L2 = self.terms(g)
        f = self.m * np.log(S) + L
        f1 = self.m * S1 / S + L1
        f2 = self.m * (S2 / S - (S1 / S) ** 2) + L2
        return f, f1, f2

    def value_top_form(self, g: np.ndarray) -> np.ndarray:
        """Criterion at ``g`` (G,) with ``S(g) = sum_j w_j^2 / (lam_j (1 + g lam_j))``.

        Exact where ``S_inf = 0`` (see :meth:`top_limit`) and free of the
        cancellation of ``yRy - ...`` at large ``g``.
        """
        pos = self.lam > 0
        lam = self.lam[pos]
        with np.errstate(over="ignore", invalid="ignore"):
            S = np.sum(self.w2[:, pos] / (lam * (1.0 + g[:, None] * lam)), axis=1)
            S = np.maximum(S, np.finfo(float).tiny)
            return self.m * np.log(S) + np.sum(np.log1p(g[:, None] * self.det_eigs), axis=1)

    def top_limit(self, rel_tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
        """Criterion and ``g S(g)`` in the limit ``g -> infinity`` (residual variance 0).

        ``S(g) = S_inf + sum_j w_j^2 / (lam_j (1 + g lam_j))`` with
        ``S_inf = yRy - sum_j w_j^2 / lam_j`` (the part of ``y`` outside the span of
        ``Z`` after ``X``).  When ``S_inf = 0`` (``Z`` spans every direction left by
        ``X``: one observation per individual and a full-rank kinship) and the
        determinant has exactly ``m`` non-zero eigenvalues, ``f`` has the finite
        limit ``m log c + sum log d_j`` with ``c = lim g S(g) = sum w_j^2 / lam_j^2``;
        otherwise the limit is ``+inf`` (never the optimum) and returned as such.

        Returns
        -------
        f_top : ndarray (G,)
            Limit of the criterion (``inf`` where there is no finite limit).
        c : ndarray (G,)
            ``lim g S(g)``: ``m`` times the variance of the component at ``h2 = 1``.
        """
        pos = self.lam > 0
        inv = 1.0 / self.lam[pos]
        S_inf = self.yRy - self.w2[:, pos] @ inv
        c = self.w2[:, pos] @ (inv * inv)
        d = self.det_eigs[self.det_eigs > 0]
        valid = (np.abs(S_inf) <= rel_tol * self.yRy) & (c > 0) & (d.size == self.m)
        with np.errstate(divide="ignore", invalid="ignore"):
            f_top = self.m * np.log(c) + np.sum(np.log(d))
        return np.where(valid, f_top, np.inf), c


@dataclass
class RatioFit:
    """Variance ratios found by an optimiser, with per-gene diagnostics."""

    g: np.ndarray          # (G, k)
    converged: np.ndarray  # (G,) bool
    n_iter: np.ndarray     # (G,) int
    criterion: np.ndarray  # (G,) minimised criterion


def fit_ratio_eigen(crit: EigenCriterion, tol: float = 1e-10, maxiter: int = 100) -> RatioFit:
    """Minimise the criterion over ``g >= 0`` for all genes at once.

    Parameters
    ----------
    crit : EigenCriterion
    tol : float
        Convergence tolerance on ``log g`` (and on the bracket width).
    maxiter : int
        Maximum number of Newton/bisection steps.
    """
    G = crit.yRy.shape[0]
    best = _grid_argmin(crit)
    lo_idx = np.maximum(best - 1, 0)
    hi_idx = np.minimum(best + 1, _LOG_G_GRID.size - 1)
    lo = _LOG_G_GRID[lo_idx].copy()
    hi = _LOG_G_GRID[hi_idx].copy()
    t = _LOG_G_GRID[best].copy()
    converged = np.zeros(G, dtype=bool)
    n_iter = np.zeros(G, dtype=np.int64)
    active = np.ones(G, dtype=bool)
    for it in range(maxiter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        sub = _subset(crit, idx)
        g = np.exp(t[idx])
        _, f1, f2 = sub.derivatives(g)
        h = g * f1                      # df/dt
        h2 = g * f1 + g * g * f2        # d2f/dt2
        # shrink the bracket with the sign of the derivative
        lo[idx] = np.where(h < 0, t[idx], lo[idx])
        hi[idx] = np.where(h > 0, t[idx], hi[idx])
        step = np.where(h2 > 0, -h / np.where(h2 > 0, h2, 1.0), np.nan)
        new = t[idx] + step
        outside = ~np.isfinite(new) | (new <= lo[idx]) | (new >= hi[idx])
        new = np.where(outside, 0.5 * (lo[idx] + hi[idx]), new)
        done = (np.abs(new - t[idx]) < tol) | (hi[idx] - lo[idx] < tol)
        t[idx] = new
        n_iter[idx] = it + 1
        converged[idx[done]] = True
        active[idx[done]] = False
    g = np.exp(t)
    # explicit boundary check: g = 0, and the grid edges (g -> 0 or infinity)
    f_int = crit.value(g)
    f_zero = crit.m * np.log(np.maximum(crit.yRy, np.finfo(float).tiny))
    at_zero = (f_zero <= f_int) | (t <= _LOG_G_GRID[0] + tol)
    g = np.where(at_zero, 0.0, g)
    converged = converged | at_zero
    f_best = np.where(at_zero, f_zero, f_int)
    # a ratio running off to the top of the grid means the residual variance -> 0:
    # a legitimate boundary fit (h2 = 1, g = inf) only where that limit is finite
    # and at least as good as the interior; otherwise not converged
    f_top, _ = crit.top_limit()
    fin = np.isfinite(f_top)
    if fin.any():  # near the top, S(g) in the cancellation-free form (S_inf = 0)
        f_best = np.where(fin, np.where(at_zero, f_zero, crit.value_top_form(g)), f_best)
    # the limit wins where the search ran to the top of the grid and the limit is
    # no worse, or where it is clearly better (a flat criterion keeps g = 0)
    ran_off = (t >= _LOG_G_GRID[-1] - 0.5) & ~at_zero
    at_top = fin & ((ran_off & (f_top <= f_best))
                    | (f_top < f_best - 1e-10 * np.maximum(1.0, np.abs(f_best))))
    converged &= ~(t >= _LOG_G_GRID[-1] - tol)
    g = np.where(at_top, np.inf, g)
    converged |= at_top
    return RatioFit(g[:, None], converged, n_iter, np.where(at_top, f_top, f_best))


def _grid_argmin(crit: EigenCriterion, max_entries: int = 4_000_000) -> np.ndarray:
    """Index of the best grid value of ``log g`` per gene.

    The grid is shared by all genes, so ``S`` on the grid is one
    (G x q) @ (q x K) product and the determinant term one K-vector.
    """
    grid_g = np.exp(_LOG_G_GRID)
    frac = grid_g[:, None] / (1.0 + grid_g[:, None] * crit.lam)           # K x q
    logdet = np.sum(np.log1p(grid_g[:, None] * crit.det_eigs), axis=1)     # K
    G = crit.yRy.shape[0]
    best = np.empty(G, dtype=np.int64)
    block = max(1, max_entries // grid_g.size)
    for start in range(0, G, block):
        sl = slice(start, min(G, start + block))
        S = np.maximum(crit.yRy[sl, None] - crit.w2[sl] @ frac.T, np.finfo(float).tiny)
        best[sl] = np.argmin(crit.m * np.log(S) + logdet, axis=1)
    return best


def _subset(crit: EigenCriterion, idx: np.ndarray) -> EigenCriterion:
    return EigenCriterion(crit.lam, crit.w2[idx], crit.yRy[idx], crit.det_eigs, crit.m)
