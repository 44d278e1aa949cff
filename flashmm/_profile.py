"""Profile-likelihood confidence intervals of the variance parameters, every gene at once.

lme4's ``confint(method = "profile")`` for the standard deviations of the random
effects and the residual ``sigma``.  The deviance is written in those parameters
(the fixed effects profiled out as always),

    D(sd_1, ..., sd_k, sigma) = L(theta) + m log sigma^2 + S(theta) / sigma^2,
    theta_j = sd_j / sigma,

with ``S`` and ``L`` the quadratic form and log-determinant term of the fit's
criterion (``m = n`` and ``L = log|M|`` for the ML deviance, ``m = n - p`` and
``L = log|M| + log|X'V^-1X|`` for the REML criterion; constants dropped).  The
profile of parameter ``j`` at value ``c`` is ``D`` minimised over the other
parameters with ``j`` held at ``c``; its signed root

    zeta(c) = sign(c - c_hat) sqrt(D_j(c) - D_hat)

is compared with the normal quantile: the interval is where
``|zeta| <= qnorm(1 - alpha / 2)``.  When the profile of a standard deviation does
not reach ``-qnorm`` at ``sd = 0`` the lower limit is 0 (lme4's convention), and
so it is for an estimate at the boundary.

The limits are found by a bracketed root search (geometric expansion, then the
Illinois variant of regula falsi) run as array operations over all genes and
both sides at once; every step evaluates the profiled deviance of all pending
genes together:

* one component (the eigen path): the inner problem is one-dimensional in the
  ratio ``g = theta^2`` and solved in closed form on the eigen basis (a grid on
  ``log g`` and a bracketed Newton iteration);
* several components (variance components, independent random slopes): the
  inner problem is a Newton minimisation over ``theta`` with ``sigma`` tied to
  the profiled value (``sigma = c / theta_j``) or held at it, started from the
  previous point of the same gene, with the exact Hessian of
  :class:`flashmm._fit_vc.VCBlockCriterion` (and its arrowhead form) where it applies.

lme4's ``profile`` always profiles the ML deviance (it refits a REML fit by
ML); :func:`conf_int_re` does the same by default and profiles the REML
criterion on request.  Correlated random effects (lme4's correlation
parameters) are not profiled (:class:`ProfileNotImplemented`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from scipy import stats as sps

from ._engine import _gene_scale
from ._fit_arrowhead import specialise
from ._fit_eigen import EigenCriterion, fit_ratio_eigen
from ._fit_theta import ThetaCriterion, forward_hessian, minimise_theta
from ._newton import projected_newton
from ._reduce import reduce_stats
from ._structure import analyse_structure

__all__ = ["ProfileIntervals", "ProfileNotImplemented", "conf_int_re", "profile_eigen",
           "profile_limits", "profile_theta", "re_parameter_names", "wald_intervals"]

#: Newton decrement at which the inner minimisations stop (``-2 log L`` scale).
INNER_TOL = 1e-12
#: Relative width (to the gene's largest parameter) at which a root search stops.
ROOT_XTOL = 1e-11
#: Bracket expansions before an upper limit is reported as infinite.
MAX_EXPANSIONS = 60
#: Root-search iterations after bracketing.
MAX_ROOT_ITER = 100
#: Bounded thetas are started at least this far from 0 (a zero has zero gradient).
START_FLOOR = 1e-3

_LOG_G_GRID = np.arange(-18.0, 18.01, 0.25)


class ProfileNotImplemented(NotImplementedError):
    """The model has parameters that :mod:`flashmm._profile` does not profile."""


@dataclass
class ProfileIntervals:
    """Profile intervals on the standard-deviation scale (unit scale undone), genes in rows.

    Attributes
    ----------
    estimate, lower, upper : ndarray (G, P)
        Optimum of the profiled criterion and the interval limits, for the
        standard deviations of the random effects then the residual sigma.
    """

    estimate: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


class _Problem(Protocol):
    """Profiled deviance of one parameter, for rows (gene, value) at once."""

    def deviance(self, j: int, values: np.ndarray, genes: np.ndarray, state: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]: ...

    def initial_state(self, j: int, values: np.ndarray, genes: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------- root search
@dataclass
class _Rows:
    """Root searches, one row per (gene, side): ``f(x) = zeta(x) -+ z`` increasing in ``x``."""

    genes: np.ndarray      # (R,)
    target: np.ndarray     # (R,) -z (lower limit) or +z (upper limit)
    a: np.ndarray          # (R,) f(a) < 0
    fa: np.ndarray
    b: np.ndarray          # (R,) f(b) > 0
    fb: np.ndarray
    state: np.ndarray      # (R, k) inner optimum of the last evaluation (warm start)
    root: np.ndarray       # (R,) result (NaN while pending)


def _signed_root(dev: np.ndarray, base: np.ndarray, x: np.ndarray, est: np.ndarray) -> np.ndarray:
    """``sign(x - est) sqrt(max(D(x) - D_hat, 0))`` (NaN deviance stays NaN)."""
    diff = np.maximum(dev - base, 0.0)
    return np.sign(x - est) * np.sqrt(np.where(np.isfinite(dev), diff, np.inf))


def _evaluate(problem: _Problem, j: int, x: np.ndarray, rows: np.ndarray, r: _Rows,
              est: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``f`` at ``x`` for the rows ``rows`` (and their warm starts updated)."""
    genes = r.genes[rows]
    dev, state = problem.deviance(j, x, genes, r.state[rows])
    if state.shape[1]:
        r.state[rows] = state
    return _signed_root(dev, base[genes], x, est[genes]) - r.target[rows]


def profile_limits(problem: _Problem, j: int, est: np.ndarray, base: np.ndarray, z: float,
                   yard: np.ndarray, is_sd: bool) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper limit of parameter ``j`` for every gene (NaN where ``est`` is NaN).

    Parameters
    ----------
    problem : the profiled deviance
    j : int
        Parameter index.
    est, base : ndarray (G,)
        The parameter at the optimum and the optimal deviance.
    z : float
        ``qnorm(1 - alpha / 2)``.
    yard : ndarray (G,)
        A positive size of the gene's parameters (first steps and tolerances).
    is_sd : bool
        A standard deviation of a random effect (may be 0; lower limit 0 when
        the profile at 0 stays above ``-z``) rather than the residual sigma.
    """
    G = est.size
    lower = np.full(G, np.nan)
    upper = np.full(G, np.nan)
    ok = np.flatnonzero(np.isfinite(est) & np.isfinite(base))
    lower[ok[est[ok] <= 0.0]] = 0.0
    low = ok[est[ok] > 0.0]
    genes = np.concatenate([low, ok])
    target = np.concatenate([np.full(low.size, -z), np.full(ok.size, z)])
    r = _Rows(genes, target, *(np.full(genes.size, np.nan) for _ in range(4)),
              problem.initial_state(j, est[genes], genes), np.full(genes.size, np.nan))
    is_low = target < 0
    _bracket_upper(problem, j, r, np.flatnonzero(~is_low), est, base, yard)
    if is_sd:
        _bracket_lower_sd(problem, j, r, np.flatnonzero(is_low), est, base)
    else:
        _bracket_lower_sigma(problem, j, r, np.flatnonzero(is_low), est, base)
    _illinois(problem, j, r, est, base, yard)
    lower[genes[is_low]] = r.root[is_low]
    upper[genes[~is_low]] = r.root[~is_low]
    return lower, upper


def _bracket_upper(problem: _Problem, j: int, r: _Rows, rows: np.ndarray, est: np.ndarray,
                   base: np.ndarray, yard: np.ndarray) -> None:
    """Step up from the estimate, doubling the step, until ``zeta >= z`` (else ``inf``)."""
    g = r.genes[rows]
    r.a[rows], r.fa[rows] = est[g], -r.target[rows]
    step = 0.5 * np.maximum(est[g], 0.05 * yard[g])
    pending = np.ones(rows.size, dtype=bool)
    for _ in range(MAX_EXPANSIONS):
        idx = np.flatnonzero(pending)
        if idx.size == 0:
            break
        x = r.a[rows[idx]] + step[idx]
        f = _evaluate(problem, j, x, rows[idx], r, est, base)
        hit = f >= 0.0
        r.b[rows[idx[hit]]], r.fb[rows[idx[hit]]] = x[hit], f[hit]
        miss = idx[~hit & np.isfinite(f)]
        r.a[rows[miss]], r.fa[rows[miss]] = x[~hit & np.isfinite(f)], f[~hit & np.isfinite(f)]
        step[miss] *= 2.0
        pending[idx[hit | ~np.isfinite(f)]] = False
    r.root[rows[pending]] = np.inf
    _mark_done(r, rows)


def _bracket_lower_sd(problem: _Problem, j: int, r: _Rows, rows: np.ndarray, est: np.ndarray,
                      base: np.ndarray) -> None:
    """The profile at ``sd = 0``: the limit is 0 unless ``zeta(0) < -z``."""
    if rows.size == 0:
        return
    g = r.genes[rows]
    f0 = _evaluate(problem, j, np.zeros(rows.size), rows, r, est, base)
    r.a[rows], r.fa[rows] = 0.0, f0
    r.b[rows], r.fb[rows] = est[g], -r.target[rows]
    r.root[rows[f0 >= 0.0]] = 0.0
    _mark_done(r, rows)


def _bracket_lower_sigma(problem: _Problem, j: int, r: _Rows, rows: np.ndarray,
                         est: np.ndarray, base: np.ndarray) -> None:
    """Halve sigma from the estimate until ``zeta <= -z`` (0 if it never does)."""
    g = r.genes[rows]
    r.b[rows], r.fb[rows] = est[g], -r.target[rows]
    x = 0.5 * est[g]
    pending = np.ones(rows.size, dtype=bool)
    for _ in range(MAX_EXPANSIONS):
        idx = np.flatnonzero(pending)
        if idx.size == 0:
            break
        f = _evaluate(problem, j, x[idx], rows[idx], r, est, base)
        hit = f <= 0.0
        r.a[rows[idx[hit]]], r.fa[rows[idx[hit]]] = x[idx[hit]], f[hit]
        r.b[rows[idx[~hit]]], r.fb[rows[idx[~hit]]] = x[idx[~hit]], f[~hit]
        x[idx[~hit]] *= 0.5
        pending[idx[hit]] = False
    r.root[rows[pending]] = 0.0
    _mark_done(r, rows)


def _mark_done(r: _Rows, rows: np.ndarray) -> None:
    """Rows whose bracket already ends on the root (``f = 0`` exactly)."""
    exact = rows[np.isnan(r.root[rows]) & (r.fb[rows] == 0.0)]
    r.root[exact] = r.b[exact]


def _illinois(problem: _Problem, j: int, r: _Rows, est: np.ndarray, base: np.ndarray,
              yard: np.ndarray) -> None:
    """Regula falsi with the Illinois modification on every bracketed row."""
    todo = np.isnan(r.root) & np.isfinite(r.fa) & np.isfinite(r.fb)
    last = np.zeros(r.root.size, dtype=np.int8)     # side replaced last: -1 a, +1 b
    xtol = ROOT_XTOL * yard[r.genes]
    for _ in range(MAX_ROOT_ITER):
        rows = np.flatnonzero(todo)
        if rows.size == 0:
            break
        a, b, fa, fb = r.a[rows], r.b[rows], r.fa[rows], r.fb[rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            x = a - fa * (b - a) / (fb - fa)
        bad = ~np.isfinite(x) | (x <= a) | (x >= b)
        x = np.where(bad, 0.5 * (a + b), x)
        f = _evaluate(problem, j, x, rows, r, est, base)
        left = f < 0.0
        same_a = left & (last[rows] == -1)
        same_b = ~left & (last[rows] == 1)
        r.fb[rows[same_a]] *= 0.5
        r.fa[rows[same_b]] *= 0.5
        r.a[rows[left]], r.fa[rows[left]] = x[left], f[left]
        r.b[rows[~left]], r.fb[rows[~left]] = x[~left], f[~left]
        last[rows] = np.where(left, -1, 1)
        done = (f == 0.0) | (r.b[rows] - r.a[rows] <= xtol[rows]) | ~np.isfinite(f)
        r.root[rows[done]] = np.where(np.isfinite(f[done]), x[done], np.nan)
        todo[rows[done]] = False
    rows = np.flatnonzero(todo)        # not converged: the midpoint of the last bracket
    r.root[rows] = 0.5 * (r.a[rows] + r.b[rows])


# ---------------------------------------------------------- one component
@dataclass
class EigenProfile:
    """One component on the eigen basis: ``D(g, s) = L(g) + m log s + S(g) / s``.

    Parameter 0 is the standard deviation of the component (``sqrt(g s)``),
    parameter 1 the residual sigma (``sqrt(s)``); genes at unit scale.
    """

    crit: EigenCriterion

    def initial_state(self, j: int, values: np.ndarray, genes: np.ndarray) -> np.ndarray:
        """The inner problem needs no start (an empty state)."""
        return np.empty((genes.size, 0))

    def deviance(self, j: int, values: np.ndarray, genes: np.ndarray, state: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Profiled deviance at parameter ``j`` = ``values`` for the genes ``genes``."""
        sub = _subset_eigen(self.crit, genes)
        v = values * values
        if j == 1:
            dev = sub.m * np.log(v) + _min_over_ratio(sub, _SigmaFixedRatio(v), allow_zero=True)
            return dev, state
        dev = np.full(genes.size, np.nan)
        zero = v <= 0.0
        if zero.any():
            s0 = self.crit.yRy[genes[zero]] / sub.m
            dev[zero] = sub.m * np.log(s0) + sub.m
        pos = np.flatnonzero(~zero)
        if pos.size:
            sp = _subset_eigen(sub, pos)
            dev[pos] = sub.m * np.log(v[pos]) + _min_over_ratio(sp, _SdFixedRatio(v[pos]),
                                                                allow_zero=False)
        return dev, state


def _subset_eigen(c: EigenCriterion, rows: np.ndarray) -> EigenCriterion:
    """The criterion of the rows ``rows`` (genes, possibly repeated)."""
    return EigenCriterion(c.lam, c.w2[rows], c.yRy[rows], c.det_eigs, c.m)


@dataclass
class _SigmaFixedRatio:
    """``h(g) = L(g) + S(g) / s`` at fixed residual variance ``s``."""

    s: np.ndarray

    def subset(self, rows: np.ndarray) -> _SigmaFixedRatio:
        return _SigmaFixedRatio(self.s[rows])

    def on_grid(self, S: np.ndarray, L: np.ndarray, g: np.ndarray, m: float) -> np.ndarray:
        return L + S / self.s[:, None]

    def derivatives(self, terms: tuple[np.ndarray, ...], g: np.ndarray, m: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        S, S1, S2, L, L1, L2 = terms
        return L + S / self.s, L1 + S1 / self.s, L2 + S2 / self.s


@dataclass
class _SdFixedRatio:
    """``h(g) = L(g) - m log g + g S(g) / v`` at fixed component variance ``v = g s``."""

    v: np.ndarray

    def subset(self, rows: np.ndarray) -> _SdFixedRatio:
        return _SdFixedRatio(self.v[rows])

    def on_grid(self, S: np.ndarray, L: np.ndarray, g: np.ndarray, m: float) -> np.ndarray:
        return L - m * np.log(g) + g * S / self.v[:, None]

    def derivatives(self, terms: tuple[np.ndarray, ...], g: np.ndarray, m: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        S, S1, S2, L, L1, L2 = terms
        v = self.v
        return (L - m * np.log(g) + g * S / v, L1 - m / g + (S + g * S1) / v,
                L2 + m / (g * g) + (2.0 * S1 + g * S2) / v)


def _min_over_ratio(crit: EigenCriterion, obj: Any, allow_zero: bool,
                    tol: float = 1e-13, maxiter: int = 100) -> np.ndarray:
    """Minimum over the ratio ``g > 0`` (and ``g = 0`` if allowed) of ``obj``, per row.

    A grid on ``log g`` finds the basin (one shared grid: ``S`` is a matrix
    product), then a Newton iteration on ``log g`` safeguarded by the bracket
    of the neighbouring grid points polishes it.
    """
    R = crit.yRy.shape[0]
    grid = np.exp(_LOG_G_GRID)
    frac = grid[:, None] / (1.0 + grid[:, None] * crit.lam)
    Lg = np.sum(np.log1p(grid[:, None] * crit.det_eigs), axis=1)
    Sg = np.maximum(crit.yRy[:, None] - crit.w2 @ frac.T, np.finfo(float).tiny)
    vals = obj.on_grid(Sg, Lg[None], grid[None], crit.m)
    best = np.argmin(np.where(np.isfinite(vals), vals, np.inf), axis=1)
    lo = _LOG_G_GRID[np.maximum(best - 1, 0)]
    hi = _LOG_G_GRID[np.minimum(best + 1, _LOG_G_GRID.size - 1)]
    t = _LOG_G_GRID[best].copy()
    active = np.ones(R, dtype=bool)
    for _ in range(maxiter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        g = np.exp(t[idx])
        _, f1, f2 = obj.subset(idx).derivatives(_subset_eigen(crit, idx).terms(g), g, crit.m)
        h1 = g * f1
        h2 = g * f1 + g * g * f2
        lo[idx] = np.where(h1 < 0, t[idx], lo[idx])
        hi[idx] = np.where(h1 > 0, t[idx], hi[idx])
        with np.errstate(invalid="ignore", divide="ignore"):
            new = t[idx] - np.where(h2 > 0, h1 / h2, np.nan)
        out = ~np.isfinite(new) | (new <= lo[idx]) | (new >= hi[idx])
        new = np.where(out, 0.5 * (lo[idx] + hi[idx]), new)
        done = (np.abs(new - t[idx]) < tol) | (hi[idx] - lo[idx] < tol)
        t[idx] = new
        active[idx[done]] = False
    g = np.exp(t)
    f = obj.derivatives(crit.terms(g), g, crit.m)[0]
    if allow_zero:
        zero_terms = crit.terms(np.zeros(R))
        f = np.minimum(f, obj.derivatives(zero_terms, np.zeros(R), crit.m)[0])
    return f


def profile_eigen(stats: Any, reml: bool, z: float, usable: np.ndarray, gene_scale: np.ndarray
                  ) -> ProfileIntervals:
    """Profile intervals of a one-component model (component sd, residual sigma).

    Parameters
    ----------
    stats : SufficientStats
    reml : bool
        Profile the REML criterion (else the ML deviance, as lme4).
    z : float
        ``qnorm(1 - alpha / 2)``.
    usable : ndarray of bool (G,)
        Genes that were fitted (the others get NaN).
    gene_scale : ndarray (G,)
        The per-gene unit ``c`` the statistics are divided by (``sqrt(yy / n)``).
    """
    c = gene_scale
    red = reduce_stats(stats)
    m = red.n - red.p if reml else red.n
    crit = EigenCriterion.from_matrices(red.ZRZ, red.ZRy / c, red.yRy / (c * c), stats.ZZ,
                                        reml, m)
    fit = fit_ratio_eigen(crit)
    g = fit.g[:, 0]
    good = usable & np.isfinite(g) & fit.converged
    gs = np.where(good, g, 0.0)
    s = np.where(good, crit.S(gs) / m, 1.0)
    base = np.sum(np.log1p(gs[:, None] * crit.det_eigs), axis=1) + m * np.log(s) + m
    base = np.where(good, base, np.nan)
    est = np.column_stack([np.sqrt(gs * s), np.sqrt(s)])
    est[~good] = np.nan
    return _run(EigenProfile(crit), est, base, z, c, n_sd=1)


def _run(problem: _Problem, est: np.ndarray, base: np.ndarray, z: float, c: np.ndarray,
         n_sd: int) -> ProfileIntervals:
    """Limits of every parameter (the first ``n_sd`` are random-effect sds)."""
    P = est.shape[1]
    yard = np.nanmax(np.where(np.isfinite(est), est, np.nan), axis=1, initial=0.0)
    yard = np.where(np.isfinite(yard) & (yard > 0), yard, 1.0)
    lower, upper = np.full_like(est, np.nan), np.full_like(est, np.nan)
    for j in range(P):
        lower[:, j], upper[:, j] = profile_limits(problem, j, est[:, j], base, z, yard,
                                                  is_sd=j < n_sd)
    return ProfileIntervals(est * c[:, None], lower * c[:, None], upper * c[:, None])


# ------------------------------------------------------ several components
@dataclass
class _TiedSigma:
    """``D`` with ``sd_j = c`` held: ``sigma = c / theta_j``, minimised over all of theta.

    ``P(theta) = L + m log c^2 - m log theta_j^2 + theta_j^2 S / c^2``.
    """

    crit: ThetaCriterion
    j: int
    c2: np.ndarray

    def subset(self, idx: np.ndarray) -> _TiedSigma:
        return _TiedSigma(self.crit.subset(idx), self.j, self.c2[idx])

    def _combine(self, theta: np.ndarray, S: np.ndarray, L: np.ndarray) -> np.ndarray:
        tj2 = theta[:, self.j] ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            f = L + self.crit.m * np.log(self.c2 / tj2) + tj2 * S / self.c2
        return np.where(np.isfinite(f) & (S > 0), f, np.nan)

    def value(self, theta: np.ndarray) -> np.ndarray:
        """``P`` per row (NaN where the criterion is not defined)."""
        S, L, _, _ = self.crit.parts(theta, grad=False)
        return self._combine(theta, S, L)

    def _grad(self, theta: np.ndarray, S: np.ndarray, dS: np.ndarray, dL: np.ndarray
              ) -> np.ndarray:
        """``dP / dtheta`` from the gradients of ``S`` and ``L``."""
        j, m = self.j, self.crit.m
        tj = theta[:, j]
        grad = dL + (tj * tj / self.c2)[:, None] * dS
        grad[:, j] += -2.0 * m / tj + 2.0 * tj * S / self.c2
        return grad

    def gradient(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``P`` and its analytic gradient."""
        S, L, dS, dL = self.crit.parts(theta, grad=True)
        return self._combine(theta, S, L), self._grad(theta, S, dS, dL)

    def newton_terms(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``P``, gradient, Hessian (exact for block variance components, else differences)."""
        if not hasattr(self.crit, "theta_derivatives"):
            f, grad = self.gradient(theta)
            return f, grad, forward_hessian(self.gradient, theta, grad)
        S, dS, dL, d2S, d2L = self.crit.theta_derivatives(theta)
        L = self.crit.parts(theta, grad=False)[1]
        j, m = self.j, self.crit.m
        tj, c2 = theta[:, j], self.c2
        grad = self._grad(theta, S, dS, dL)
        hess = d2L + (tj * tj / c2)[:, None, None] * d2S
        cross = (2.0 * tj / c2)[:, None] * dS
        hess[:, :, j] += cross
        hess[:, j, :] += cross
        hess[:, j, j] += 2.0 * m / (tj * tj) + 2.0 * S / c2
        return self._combine(theta, S, L), grad, hess


@dataclass
class _HeldSigma:
    """``D`` with ``sigma^2 = s`` held: ``P(theta) = L + m log s + S / s``."""

    crit: ThetaCriterion
    s: np.ndarray

    def subset(self, idx: np.ndarray) -> _HeldSigma:
        return _HeldSigma(self.crit.subset(idx), self.s[idx])

    def value(self, theta: np.ndarray) -> np.ndarray:
        S, L, _, _ = self.crit.parts(theta, grad=False)
        f = L + self.crit.m * np.log(self.s) + S / self.s
        return np.where(np.isfinite(f) & (S > 0), f, np.nan)

    def gradient(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        S, L, dS, dL = self.crit.parts(theta, grad=True)
        f = L + self.crit.m * np.log(self.s) + S / self.s
        return np.where(np.isfinite(f) & (S > 0), f, np.nan), dL + dS / self.s[:, None]

    def newton_terms(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``P``, gradient, Hessian (exact for block variance components, else differences)."""
        if not hasattr(self.crit, "theta_derivatives"):
            f, grad = self.gradient(theta)
            return f, grad, forward_hessian(self.gradient, theta, grad)
        S, dS, dL, d2S, d2L = self.crit.theta_derivatives(theta)
        f = self.value(theta)
        s = self.s
        return f, dL + dS / s[:, None], d2L + d2S / s[:, None, None]


@dataclass
class _HeldZero:
    """The profiled criterion ``m log S + L`` with ``theta_j = 0`` held (``sd_j = 0``)."""

    crit: ThetaCriterion
    j: int

    def subset(self, idx: np.ndarray) -> _HeldZero:
        return _HeldZero(self.crit.subset(idx), self.j)

    def full(self, x: np.ndarray) -> np.ndarray:
        return np.insert(x, self.j, 0.0, axis=1)

    def value(self, x: np.ndarray) -> np.ndarray:
        return self.crit.value(self.full(x))

    def newton_terms(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f, grad, hess = self.crit.newton_terms(self.full(x))
        keep = np.delete(np.arange(grad.shape[1]), self.j)
        return f, grad[:, keep], hess[:, keep][:, :, keep]


@dataclass
class ThetaProfile:
    """Several components (diagonal ``Lambda``): ``sd_j = theta_j sigma``, then sigma.

    The state of a row is its last inner optimum ``(theta, sigma)``: the warm
    start of its next evaluation (``sigma`` kept, ``theta_j`` set to match).
    """

    crit: ThetaCriterion
    theta_hat: np.ndarray     # (G, t)
    sigma_hat: np.ndarray     # (G,) unit scale

    @property
    def t(self) -> int:
        return self.theta_hat.shape[1]

    def initial_state(self, j: int, values: np.ndarray, genes: np.ndarray) -> np.ndarray:
        """The optimum ``(theta, sigma)``, bounded thetas at least :data:`START_FLOOR` from 0."""
        return np.column_stack([np.maximum(self.theta_hat[genes], START_FLOOR),
                                self.sigma_hat[genes]])

    def deviance(self, j: int, values: np.ndarray, genes: np.ndarray, state: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Profiled deviance ``D`` at parameter ``j`` = ``values``; the new inner optima."""
        sub = self.crit.subset(genes)
        t = self.t
        free = np.full(t, -np.inf)
        theta0 = np.maximum(np.abs(state[:, :t]), START_FLOOR)
        sigma0 = state[:, t]
        if j == t:                                        # residual sigma held
            res = projected_newton(_HeldSigma(sub, values * values), theta0, free, INNER_TOL, 200)
            return res.criterion, np.column_stack([np.abs(res.x), values])
        dev = np.full(genes.size, np.nan)
        out = state.copy()
        zero = np.flatnonzero(values <= 0.0)
        pos = np.flatnonzero(values > 0.0)
        if zero.size:
            dev[zero], out[zero] = self._at_zero(sub.subset(zero), j, theta0[zero])
        if pos.size:
            start = theta0[pos].copy()
            start[:, j] = values[pos] / sigma0[pos]
            res = projected_newton(_TiedSigma(sub.subset(pos), j, values[pos] ** 2), start, free,
                                   INNER_TOL, 200)
            th = np.abs(res.x)
            dev[pos] = res.criterion
            out[pos] = np.column_stack([th, values[pos] / th[:, j]])
        return dev, out

    def _at_zero(self, sub: ThetaCriterion, j: int, start: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``D`` at ``sd_j = 0`` (theta_j = 0, the others and sigma re-optimised), the optimum."""
        m = sub.m
        theta = start.copy()
        theta[:, j] = 0.0
        if self.t > 1:
            held = _HeldZero(sub, j)
            res = projected_newton(held, np.delete(start, j, axis=1),
                                   np.full(self.t - 1, -np.inf), INNER_TOL, 200)
            theta = np.abs(held.full(res.x))
        S, L, _, _ = sub.parts(theta, grad=False)
        return L + m * np.log(S / m) + m, np.column_stack([theta, np.sqrt(S / m)])


def profile_theta(stats: Any, structure: Any, theta: np.ndarray | None, reml: bool, z: float,
                  usable: np.ndarray, gene_scale: np.ndarray, budget: Any = None
                  ) -> ProfileIntervals:
    """Profile intervals of a several-component model (component sds, residual sigma).

    Parameters
    ----------
    stats : SufficientStats
    structure : ThetaStructure
        The fit's block layout; every ``theta`` must be bounded (a standard-deviation
        ratio): variance components and independent random slopes.
    theta : ndarray (G, t) or None
        The optimum of the profiled criterion (the fit's ``theta`` when it was
        fitted with this criterion); None: found here.
    reml : bool
        Profile the REML criterion (else the ML deviance, as lme4).
    z : float
        ``qnorm(1 - alpha / 2)``.
    usable : ndarray of bool (G,)
    gene_scale : ndarray (G,)
        The per-gene unit ``c`` (``sqrt(yy / n)``) of the fit.
    budget : MemoryBudget, optional
        Sizes the gene chunks of the criterion.
    """
    if not np.all(structure.bounded):
        raise ProfileNotImplemented(
            "profile intervals of correlated random effects (the covariances of "
            "re_formula / exog_re, lme4's correlation parameters) are not implemented; "
            "fit with independent_re=True, or use method='wald'.")
    c = gene_scale
    crit = specialise(ThetaCriterion.from_stats(stats, structure, reml, c, budget))
    if theta is None:
        theta = np.full((usable.size, structure.n_theta), np.nan)
        idx = np.flatnonzero(usable)
        if idx.size:
            theta[idx] = minimise_theta(crit.subset(idx), tol=1e-12).theta
    ok = np.flatnonzero(usable & np.all(np.isfinite(theta), axis=1))
    th = np.where(usable[:, None] & np.isfinite(theta), theta, 0.0)
    m = crit.m
    S, L, _, _ = crit.parts(th, grad=False)
    s = S / m
    base = np.full(th.shape[0], np.nan)
    base[ok] = L[ok] + m * np.log(s[ok]) + m
    sig = np.sqrt(s)
    est = np.column_stack([th * sig[:, None], sig])
    est[np.setdiff1d(np.arange(th.shape[0]), ok)] = np.nan
    return _run(ThetaProfile(crit, th, sig), est, base, z, c, n_sd=th.shape[1])


# -------------------------------------------------------------------- Wald
def wald_intervals(variances: np.ndarray, se: np.ndarray, z: float, scale: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wald intervals ``estimate -+ z se`` on the variance or (delta method) sd scale.

    Parameters
    ----------
    variances, se : ndarray (G, P)
        Variance estimates and their standard errors.
    z : float
    scale : {"sd", "var"}

    Returns
    -------
    estimate, lower, upper : ndarray (G, P)
    """
    if scale == "var":
        return variances, variances - z * se, variances + z * se
    sd = np.sqrt(variances)
    with np.errstate(divide="ignore", invalid="ignore"):
        se_sd = np.where(sd > 0, se / (2.0 * sd), np.nan)
    return sd, sd - z * se_sd, sd + z * se_sd


# ----------------------------------------------------------- results table
_METHODS = ("profile", "wald")
_SCALES = ("sd", "var")
_LIKELIHOODS = ("ML", "REML")


def _check_options(alpha: float, method: str, scale: str, likelihood: str) -> str:
    """Validate the options of :func:`conf_int_re`; returns the likelihood in upper case."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}.")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}.")
    lik = str(likelihood).upper()
    if lik not in _LIKELIHOODS:
        raise ValueError(f"likelihood must be 'ML' or 'REML', got {likelihood!r}.")
    return lik


def re_parameter_names(results: Any) -> list[str]:
    """Names of the random-effect standard deviations, in ``theta`` order.

    The variances of correlated or independent random slopes (``exog_re``) by
    their effect names, then the variance components; the residual is
    ``"residual"``.
    """
    st = getattr(results._fit, "structure", None)
    if st is None:
        return list(results.component_names)
    names = list(getattr(results, "exog_re_names", []))
    return [names[a] for a, b in st.re_pairs if a == b] + list(results.component_names)


def _profile_arrays(results: Any, reml: bool, z: float) -> ProfileIntervals:
    """Dispatch to the eigen path (one component) or the theta path."""
    fit, stats = results._fit, results.stats
    usable = np.asarray(results._usable)
    if np.any(np.isinf(fit.ratios) & usable[:, None]):     # h2 = 1: no residual variance
        usable = usable & ~np.any(np.isinf(fit.ratios), axis=1)
    st = getattr(fit, "structure", None)
    if st is None and len(stats.components) == 1:
        return profile_eigen(stats, reml, z, usable, _gene_scale(stats))
    if st is None:                                          # FLASHMM's scoring fit
        st = analyse_structure(stats.components, stats.ZZ)
    theta = fit.theta if getattr(fit, "theta", None) is not None and fit.reml == reml else None
    c = fit.gene_scale if getattr(fit, "gene_scale", None) is not None else _gene_scale(stats)
    return profile_theta(stats, st, theta, reml, z, usable, c)


def _wald_arrays(results: Any, names: list[str], z: float, scale: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wald intervals from the fit's variances and :attr:`se_vcomp`."""
    comps = list(results.component_names)
    slopes = names[:len(names) - len(comps)]
    var = [results.cov_re[f"{n} Var"].to_numpy() for n in slopes]
    var += [results.vcomp[c].to_numpy() for c in comps] + [results.scale.to_numpy()]
    se_tab = results.se_vcomp
    se = [se_tab[f"{n} Var"].to_numpy() for n in slopes]
    se += [se_tab[c].to_numpy() for c in comps] + [se_tab["residual"].to_numpy()]
    return wald_intervals(np.column_stack(var), np.column_stack(se), z, scale)


def conf_int_re(results: Any, alpha: float = 0.05, method: str = "profile", scale: str = "sd",
                likelihood: str = "ML") -> pd.DataFrame:
    """Confidence intervals of the variance parameters (see ``MultiGeneMixedLMResults.conf_int_re``).

    Returns a tidy DataFrame with columns ``gene, parameter, estimate, lower,
    upper``, one row per gene and parameter.
    """
    reml = _check_options(alpha, method, scale, likelihood) == "REML"
    z = float(sps.norm.ppf(1.0 - alpha / 2.0))
    names = re_parameter_names(results) + ["residual"]
    if method == "wald":
        est, lo, hi = _wald_arrays(results, names[:-1], z, scale)
    else:
        out = _profile_arrays(results, reml, z)
        est, lo, hi = out.estimate, out.lower, out.upper
        if scale == "var":
            est, lo, hi = est ** 2, lo ** 2, hi ** 2
    G, P = est.shape
    return pd.DataFrame({
        "gene": np.repeat(np.asarray(results.gene_names), P),
        "parameter": np.tile(names, G),
        "estimate": est.ravel(),
        "lower": lo.ravel(),
        "upper": hi.ravel(),
    })
