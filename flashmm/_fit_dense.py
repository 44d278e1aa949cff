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

    def derivatives(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        res = _projected_newton(crit.subset(idx), g0[idx], tol, maxiter)
        out_g[idx], conv[idx], iters[idx], fval[idx] = res.g, res.converged, res.n_iter, res.criterion
    return RatioFit(out_g, conv, iters, fval)


def _projected_newton(crit: DenseCriterion, g: np.ndarray, tol: float, maxiter: int) -> RatioFit:
    G, k = g.shape
    g = np.maximum(g, 0.0)
    converged = np.zeros(G, dtype=bool)
    n_iter = np.zeros(G, dtype=np.int64)
    fval = np.full(G, np.nan)
    active = np.ones(G, dtype=bool)
    for it in range(maxiter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        sub = crit.subset(idx)
        f, grad, hess = sub.derivatives(g[idx])
        fval[idx] = f
        held = (g[idx] <= 0.0) & (grad > 0.0)             # boundary, pushing outwards
        step = _newton_direction(grad, hess, held)
        decrement = -np.sum(grad * step, axis=1)
        done = decrement < tol
        n_iter[idx] = it + 1
        # inside the quadratic region: one last full Newton step polishes the
        # estimate far below the criterion's own round-off (flat likelihoods)
        g[idx[done]] = np.maximum(g[idx[done]] + step[done], 0.0)
        converged[idx[done]] = True
        active[idx[done]] = False
        todo = ~done
        if not todo.any():
            break
        new_g, new_f = _line_search(sub.subset(np.flatnonzero(todo)), g[idx][todo],
                                    step[todo], grad[todo], f[todo])
        g[idx[todo]] = new_g
        fval[idx[todo]] = new_f
    return RatioFit(g, converged, n_iter, fval)


def _newton_direction(grad: np.ndarray, hess: np.ndarray, held: np.ndarray) -> np.ndarray:
    """Newton step on the free components, with the Hessian made positive definite."""
    G, k = grad.shape
    free = ~held
    H = hess * (free[:, :, None] & free[:, None, :])
    H[:, np.arange(k), np.arange(k)] += held.astype(float)
    vals, vecs = np.linalg.eigh(H)
    floor = 1e-8 * np.maximum(np.max(np.abs(vals), axis=1, keepdims=True), 1e-300)
    vals = np.maximum(np.abs(vals), floor)
    rhs = np.where(free, -grad, 0.0)
    step = np.einsum("gij,gj,gkj,gk->gi", vecs, 1.0 / vals, vecs, rhs)
    return np.where(free, step, 0.0)


def _line_search(crit: DenseCriterion, g: np.ndarray, step: np.ndarray, grad: np.ndarray,
                 f: np.ndarray, max_halvings: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Backtracking on the projected path ``max(g + alpha step, 0)`` (Armijo)."""
    alpha = np.ones(g.shape[0])
    new_g = g.copy()
    new_f = f.copy()
    pending = np.ones(g.shape[0], dtype=bool)
    for _ in range(max_halvings):
        idx = np.flatnonzero(pending)
        if idx.size == 0:
            break
        trial = np.maximum(g[idx] + alpha[idx, None] * step[idx], 0.0)
        ft = crit.subset(idx).value(trial)
        ok = ft <= f[idx] + 1e-4 * np.sum(grad[idx] * (trial - g[idx]), axis=1)
        new_g[idx[ok]] = trial[ok]
        new_f[idx[ok]] = ft[ok]
        pending[idx[ok]] = False
        alpha[idx[~ok]] *= 0.5
    return new_g, new_f
