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
    cache = _TermsCache.empty(G, x.shape[1]) if getattr(crit, "cheap_hessian", False) else None
    for it in range(maxiter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        sub = crit.subset(idx)
        xi = x[idx]
        f, grad, hess = _terms(sub, xi, idx, cache)
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
        new, newf, moved = _step(sub.subset(todo), xi[todo], step[todo], grad[todo], f[todo],
                                 lower, None if cache is None else (cache, idx[todo]))
        x[idx[todo]] = new
        fval[idx[todo]] = newf
        stuck = todo[~moved | (newf >= f[todo])]        # no decrease left: round-off level
        converged[idx[stuck]] = decrement[stuck] < 1e-6
        active[idx[stuck]] = False
    return NewtonFit(x, fval, converged, n_iter)


@dataclass
class _TermsCache:
    """Criterion, gradient and Hessian already computed at the current point of some rows."""

    f: np.ndarray
    grad: np.ndarray
    hess: np.ndarray
    valid: np.ndarray

    @classmethod
    def empty(cls, G: int, k: int) -> _TermsCache:
        return cls(np.empty(G), np.empty((G, k)), np.empty((G, k, k)), np.zeros(G, dtype=bool))

    def store(self, rows: np.ndarray, f: np.ndarray, grad: np.ndarray, hess: np.ndarray) -> None:
        self.f[rows], self.grad[rows], self.hess[rows] = f, grad, hess
        self.valid[rows] = True


def _terms(crit: Criterion, x: np.ndarray, rows: np.ndarray, cache: _TermsCache | None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``newton_terms`` at ``x`` (rows ``rows`` of the fit), reusing what the line search left."""
    if cache is None:
        return crit.newton_terms(x)
    need = np.flatnonzero(~cache.valid[rows])
    if need.size:
        cache.store(rows[need], *crit.subset(need).newton_terms(x[need]))
    cache.valid[rows] = False                           # the next point is new
    return cache.f[rows].copy(), cache.grad[rows].copy(), cache.hess[rows].copy()


def _step(crit: Criterion, x: np.ndarray, step: np.ndarray, grad: np.ndarray, f: np.ndarray,
          lower: np.ndarray, cached: tuple[_TermsCache, np.ndarray] | None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The line search; with a cheap Hessian the full step is tried with the Newton terms.

    When the Hessian costs little more than the value (exact block Hessians),
    the full Newton step -- accepted by nearly every row -- is evaluated with
    :meth:`newton_terms`, whose result then serves the next iteration; the
    rows that reject it backtrack on values from half the step.
    """
    if cached is None:
        return _line_search(crit, x, step, grad, f, lower)
    cache, rows = cached
    trial = np.maximum(x + step, lower)
    ft, gt, ht = crit.newton_terms(trial)
    ok = _armijo(ft, f, grad, trial - x)
    cache.store(rows[ok], ft[ok], gt[ok], ht[ok])
    new, newf, moved = trial.copy(), ft.copy(), ok.copy()
    back = np.flatnonzero(~ok)
    if back.size:
        new[back], newf[back], moved[back] = _line_search(
            crit.subset(back), x[back], step[back], grad[back], f[back], lower, alpha0=0.5)
    return new, newf, moved


def _armijo(ft: np.ndarray, f: np.ndarray, grad: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Sufficient decrease (and a finite value) at the trial points."""
    return np.isfinite(ft) & (ft <= f + 1e-4 * np.sum(grad * dx, axis=1))


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


#: Relative resolution of a criterion value (a few units of round-off): a line search
#: whose predicted decrease is below it stops.
RESOLUTION = 4.0 * np.finfo(float).eps


def _line_search(crit: Criterion, x: np.ndarray, step: np.ndarray, grad: np.ndarray,
                 f: np.ndarray, lower: np.ndarray, max_halvings: int = 50, alpha0: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Armijo backtracking on the projected path ``max(x + alpha step, lower)``.

    A row stops (not moved) once the decrease its step predicts, ``alpha |grad'step|``,
    is below :data:`RESOLUTION` of its criterion: no trial can then show a decrease
    that is not round-off (such rows used to run to ``max_halvings``).
    """
    G = x.shape[0]
    alpha = np.full(G, alpha0)
    new = x.copy()
    newf = f.copy()
    pending = np.ones(G, dtype=bool)
    moved = np.zeros(G, dtype=bool)
    slope = np.abs(np.sum(grad * step, axis=1))
    resolution = RESOLUTION * np.abs(f)
    for _ in range(max_halvings):
        pending &= ~(alpha * slope < resolution)
        idx = np.flatnonzero(pending)
        if idx.size == 0:
            break
        trial = np.maximum(x[idx] + alpha[idx, None] * step[idx], lower)
        ft = crit.subset(idx).value(trial)
        ok = _armijo(ft, f[idx], grad[idx], trial - x[idx])
        new[idx[ok]] = trial[ok]
        newf[idx[ok]] = ft[ok]
        moved[idx[ok]] = True
        pending[idx[ok]] = False
        alpha[idx[~ok]] *= 0.5
    return new, newf, moved
