"""Projected Newton for box-constrained criteria, every gene at once.

Shared by the several-component optimiser (ratios ``g >= 0``) and the
random-slope optimiser (lme4's ``theta``, run without bounds: see
``flashmm._fit_theta._newton_canonical``).  A criterion
offers ``subset(idx)``, ``value(x)`` and ``newton_terms(x) -> (f, grad, hess)``
for stacked parameter rows ``x`` (genes x parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["NewtonFit", "projected_newton", "newton_direction"]


class Criterion(Protocol):
    """What :func:`projected_newton` needs from a criterion."""

    def subset(self, idx: np.ndarray) -> Criterion: ...

    def value(self, x: np.ndarray) -> np.ndarray: ...

    def newton_terms(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass
class NewtonFit:
    """Minimiser per gene with its criterion value and diagnostics."""

    x: np.ndarray
    criterion: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray


def projected_newton(crit: Criterion, x: np.ndarray, lower: np.ndarray, tol: float,
                     maxiter: int) -> NewtonFit:
    """Minimise ``crit`` over ``x >= lower`` for every row of ``x``.

    Parameters held at their bound with the gradient pushing outwards are
    fixed for the step; the Newton direction on the others uses the Hessian
    made positive definite; an Armijo backtracking search runs along the
    projected path. A row converges when its Newton decrement is below
    ``tol``; one last full Newton step then polishes it well below the
    criterion's own round-off (flat likelihoods). A row whose line search can
    make no progress (no step lowers the criterion: its round-off level, which
    grows with the number of cells) stops, converged if its decrement is below 1e-6.
    """
    G = x.shape[0]
    x = np.maximum(np.array(x, dtype=float), lower)
    converged = np.zeros(G, dtype=bool)
    n_iter = np.zeros(G, dtype=np.int64)
    fval = np.full(G, np.nan)
    active = np.ones(G, dtype=bool)
    for it in range(maxiter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        sub = crit.subset(idx)
        xi = x[idx]
        f, grad, hess = sub.newton_terms(xi)
        fval[idx] = f
        held = (xi <= lower) & (grad > 0.0)             # at the bound, pushing outwards
        step = newton_direction(grad, hess, held)
        decrement = -np.sum(grad * step, axis=1)
        done = decrement < tol
        n_iter[idx] = it + 1
        x[idx[done]] = np.maximum(xi[done] + step[done], lower)
        converged[idx[done]] = True
        active[idx[done]] = False
        todo = np.flatnonzero(~done)
        if todo.size == 0:
            break
        new, newf, moved = _line_search(sub.subset(todo), xi[todo], step[todo], grad[todo],
                                        f[todo], lower)
        x[idx[todo]] = new
        fval[idx[todo]] = newf
        stuck = todo[~moved | (newf >= f[todo])]        # no decrease left: round-off level
        converged[idx[stuck]] = decrement[stuck] < 1e-6
        active[idx[stuck]] = False
    return NewtonFit(x, fval, converged, n_iter)


def newton_direction(grad: np.ndarray, hess: np.ndarray, held: np.ndarray) -> np.ndarray:
    """Newton step on the free parameters with the Hessian made positive definite."""
    k = grad.shape[1]
    free = ~held
    H = hess * (free[:, :, None] & free[:, None, :])
    H[:, np.arange(k), np.arange(k)] += held.astype(float)
    H = np.where(np.isfinite(H), H, 0.0)
    vals, vecs = np.linalg.eigh(H)
    floor = 1e-8 * np.maximum(np.max(np.abs(vals), axis=1, keepdims=True), 1e-300)
    vals = np.maximum(np.abs(vals), floor)
    rhs = np.where(free, -grad, 0.0)
    step = np.einsum("gij,gj,gkj,gk->gi", vecs, 1.0 / vals, vecs, rhs)
    return np.where(free, step, 0.0)


def _line_search(crit: Criterion, x: np.ndarray, step: np.ndarray, grad: np.ndarray,
                 f: np.ndarray, lower: np.ndarray, max_halvings: int = 50
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Armijo backtracking on the projected path ``max(x + alpha step, lower)``."""
    G = x.shape[0]
    alpha = np.ones(G)
    new = x.copy()
    newf = f.copy()
    pending = np.ones(G, dtype=bool)
    moved = np.zeros(G, dtype=bool)
    for _ in range(max_halvings):
        idx = np.flatnonzero(pending)
        if idx.size == 0:
            break
        trial = np.maximum(x[idx] + alpha[idx, None] * step[idx], lower)
        ft = crit.subset(idx).value(trial)
        ok = np.isfinite(ft) & (ft <= f[idx] + 1e-4 * np.sum(grad[idx] * (trial - x[idx]), axis=1))
        new[idx[ok]] = trial[ok]
        newf[idx[ok]] = ft[ok]
        moved[idx[ok]] = True
        pending[idx[ok]] = False
        alpha[idx[~ok]] *= 0.5
    return new, newf, moved
