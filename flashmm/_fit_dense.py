"""Several random components: projected Newton on the profiled criterion.

No shared diagonalisation exists, so every gene carries q x q matrices; genes
are processed as stacked arrays (blocks of genes, batched Cholesky).  With
``D = diag(sqrt(g))`` per random effect and ``M = I + D ZRZ D``:

    S  = yRy - (D r)' M^-1 (D r)                        (= y'Py * s)
    a  = r - ZRZ D M^-1 D r                              (= (I + ZRZ G)^-1 r)
    B  = ZRZ - ZRZ D M^-1 D ZRZ                          (= ZRZ (I + G ZRZ)^-1)
    f  = m log S + log|M|
    df/dg_i     = -m ||a_i||^2 / S + tr(B_ii)
    d2f/dg_i dg_j = m (2 a_i' B_ij a_j / S - ||a_i||^2 ||a_j||^2 / S^2) - ||B_ij||_F^2

(ML: ``m = n`` and the determinant and ``B`` use ``ZZ``.)  The ratios stay
``>= 0``: a component whose gradient pushes past 0 is held at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._fit_eigen import RatioFit
from ._newton import projected_newton

__all__ = ["DenseCriterion", "fit_ratios_dense"]


@dataclass
class DenseCriterion:
    """Profiled criterion for k components in the dense q x q form."""

    ZRZ: np.ndarray        # (q, q)
    r: np.ndarray          # (G, q)  ZRy, genes in rows
    yRy: np.ndarray        # (G,)
    det_mat: np.ndarray    # (q, q)  ZRZ (REML) or ZZ (ML)
    E: np.ndarray          # (q, k)  one-hot component membership
    m: float

    @property
    def k(self) -> int:
        return self.E.shape[1]

    def subset(self, idx: np.ndarray) -> DenseCriterion:
        return DenseCriterion(self.ZRZ, self.r[idx], self.yRy[idx], self.det_mat, self.E, self.m)

    def _logdet(self, mat: np.ndarray, d: np.ndarray) -> np.ndarray:
        """``log|I + D mat D|`` per gene (Cholesky of an SPD matrix)."""
        q = mat.shape[0]
        M = d[:, :, None] * mat[None] * d[:, None, :]
        M[:, np.arange(q), np.arange(q)] += 1.0
        L = np.linalg.cholesky(M)
        return 2.0 * np.sum(np.log(np.diagonal(L, axis1=1, axis2=2)), axis=1)

    def _solve(self, mat: np.ndarray, gd: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """Solve ``(I + mat G) x = rhs`` for every gene (one LU each)."""
        q = mat.shape[0]
        A = mat[None] * gd[:, None, :]
        A[:, np.arange(q), np.arange(q)] += 1.0
        return np.linalg.solve(A, rhs)

    def value(self, g: np.ndarray) -> np.ndarray:
        """Criterion at ratios ``g`` (G, k)."""
        gd = g @ self.E.T
        a = self._solve(self.ZRZ, gd, self.r[:, :, None])[:, :, 0]
        S = self.yRy - np.sum(gd * self.r * a, axis=1)
        logdet = self._logdet(self.det_mat, np.sqrt(gd))
        return self.m * np.log(np.maximum(S, np.finfo(float).tiny)) + logdet

    def newton_terms(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``f``, gradient (G, k) and Hessian (G, k, k) at ``g``."""
        gd = g @ self.E.T
        G, q = gd.shape
        rhs = np.concatenate([self.r[:, :, None], np.broadcast_to(self.ZRZ, (G, q, q))], axis=2)
        sol = self._solve(self.ZRZ, gd, rhs)
        a, Br = sol[:, :, 0], sol[:, :, 1:]              # (I + ZRZ G)^-1 r, ZRZ (I + G ZRZ)^-1
        Br = 0.5 * (Br + np.swapaxes(Br, 1, 2))
        S = np.maximum(self.yRy - np.sum(gd * self.r * a, axis=1), np.finfo(float).tiny)
        if self.det_mat is self.ZRZ:
            B = Br
        else:
            B = self._solve(self.det_mat, gd, np.broadcast_to(self.det_mat, (G, q, q)))
            B = 0.5 * (B + np.swapaxes(B, 1, 2))
        a2 = (a * a) @ self.E                              # ||a_i||^2
        f = self.m * np.log(S) + self._logdet(self.det_mat, np.sqrt(gd))
        grad = -self.m * a2 / S[:, None] + np.diagonal(B, axis1=1, axis2=2) @ self.E
        aBa = self.E.T @ (a[:, :, None] * Br * a[:, None, :]) @ self.E
        BB = self.E.T @ (B * B) @ self.E
        hess = (self.m * (2.0 * aBa / S[:, None, None]
                          - a2[:, :, None] * a2[:, None, :] / (S * S)[:, None, None]) - BB)
        return f, grad, hess


def fit_ratios_dense(
    crit: DenseCriterion,
    start: np.ndarray | None = None,
    tol: float = 1e-10,
    maxiter: int = 200,
    block: int = 512,
) -> RatioFit:
    """Minimise the criterion over ``g >= 0`` (G, k) for all genes, in gene blocks."""
    G = crit.yRy.shape[0]
    g0 = np.full((G, crit.k), 0.1) if start is None else np.array(start, dtype=float)
    out_g = np.empty((G, crit.k))
    conv = np.zeros(G, dtype=bool)
    iters = np.zeros(G, dtype=np.int64)
    fval = np.empty(G)
    for s in range(0, G, block):
        idx = np.arange(s, min(G, s + block))
        res = projected_newton(crit.subset(idx), g0[idx], np.zeros(crit.k), tol, maxiter)
        out_g[idx], conv[idx], iters[idx], fval[idx] = res.x, res.converged, res.n_iter, res.criterion
    return RatioFit(out_g, conv, iters, fval)
