"""Variance components with a wide crossed block: Newton on the average information.

Designs such as lme4's InstEval (2,972 students crossed with 1,128 lecturers)
put a global block of more than :data:`flashmm._fit_global.MAX_GLOBAL` columns
beside the group blocks.  Their exact Hessian needs whole off-diagonal blocks
of ``M^-1`` (``tr(P Z_i Z_i' P Z_j Z_j')``, students against students): far
more than the selected inverse the gradient uses.  The general criterion
(:class:`~flashmm._fit_theta.ThetaCriterion`) therefore took a forward-difference
Hessian, t extra gradients per Newton step.

This module minimises the same criterion over the ratios ``g = theta^2 >= 0``
with the *average information* matrix instead (the Hessian approximation of
AI-REML, Gilmour, Thompson and Cullis 1995), which costs a few solves with the
factor the gradient already holds.  With ``H = I + sum_k g_k Z_k Z_k'``,
``P = H^-1 - H^-1 X (X'H^-1X)^-1 X'H^-1``, ``S = y'Py`` and ``m = n - p``
(REML) or ``n`` (ML), the Hessian of ``f = m log S + log|H| (+ log|X'H^-1X|)``
is

    d2f/dg_k dg_l = m [2 w_k'P w_l / S - q_k q_l / S^2] - tr(R Z_k Z_k' R Z_l Z_l'),
    w_k = Z_k Z_k' P y,   q_k = y'P w_k = ||Z_k'P y||^2,

with ``R = P`` (REML) or ``H^-1`` (ML).  Replacing the trace by
``m w_k'P w_l / S`` (under REML its expectation, ``E[w_k'P w_l] = sigma^2
tr(P Z_k Z_k' P Z_l Z_l')``) leaves

    AI_kl = (m / S) [w_k'P w_l - q_k q_l / S],

the Schur complement of ``y`` in the Gram matrix of ``[y, w_1, ...]`` under
``P``: positive semi-definite everywhere (where the true Hessian is not, far
from the optimum) and, under REML, equal to the Hessian in expectation.  Under
ML the same matrix serves as the Hessian approximation (the gradient, which
decides the optimum, is exact in both).  Everything is
a block vector of ``Z'`` space: ``a = Z'Py`` is the gradient's score
(:meth:`~flashmm._fit_theta.ThetaCriterion.derivatives`), ``t_k`` its part on
component k, and

    w_k'P w_l = t_k' Z'PZ t_l,   Z'PZ = Z'H^-1Z - Z'H^-1X C X'H^-1Z,
    Z'H^-1Z t = ZZ t - ZZ Lambda M^-1 Lambda ZZ t,

one product with ``Z'Z`` and one solve with ``M`` for t right-hand sides.

On InstEval (REML) this takes 9 Newton steps from lme4's start against the 11
forward-difference ones, each costing one gradient instead of four.

The gradient in ``g`` is the analytic gradient in ``theta`` divided by
``2 theta``, evaluated with every ``theta_j`` at least :data:`THETA_FLOOR`: the
criterion is even and smooth in ``theta_j``, so there its value and its
``g``-gradient differ from those at 0 by ``O(THETA_FLOOR^2)`` relative, far
below round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._fit_theta import ThetaCriterion, _flat, _Solved, _sym, working_set_floats

__all__ = ["AverageInformationCriterion", "AverageInformation", "THETA_FLOOR"]

#: Smallest ``theta_j`` at which the criterion is evaluated (a ratio of 1e-16).
THETA_FLOOR = 1e-8


def _block_inner(x: tuple[np.ndarray, np.ndarray], y: tuple[np.ndarray, np.ndarray]
                 ) -> np.ndarray:
    """``x'y`` (G, kx, ky) for block vectors ``((G, m, s, k), (G, d, k))``."""
    return (np.swapaxes(_flat(x[0]), 1, 2) @ _flat(y[0])
            + np.swapaxes(x[1], 1, 2) @ y[1])


@dataclass
class AverageInformationCriterion(ThetaCriterion):
    """:class:`~flashmm._fit_theta.ThetaCriterion` of variance components (``Lambda``
    diagonal), minimised over the ratios with the average information (module docstring)."""

    @classmethod
    def of(cls, crit: ThetaCriterion) -> AverageInformationCriterion:
        """The same criterion of the same genes."""
        if crit.st.re_dim:
            raise ValueError("the average information applies to variance components only")
        st, p = crit.st, crit.XX.shape[0]
        base = working_set_floats(st, p)
        extra = 5 * st.n_theta * (st.n_groups * st.block_size + st.glob_cols.size)
        chunk = max(1, crit._chunk_size() * base // (base + extra))   # the t-column vectors
        return cls(crit.st, crit.zz, crit.XX, crit.XY, crit.ZY, crit.yy, crit.n, crit.reml,
                   chunk)

    def subset(self, idx: np.ndarray) -> AverageInformationCriterion:
        """The criterion of genes ``idx``."""
        return AverageInformationCriterion(self.st, self.zz, self.XX, self.XY[idx],
                                           self.ZY[idx], self.yy[idx], self.n, self.reml,
                                           self.chunk)

    def in_variances(self) -> AverageInformation:
        """The criterion as a function of the ratios ``g = theta^2 >= 0``."""
        return AverageInformation(self)

    def newton_terms_in_g(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Criterion, gradient in ``g`` and average information (G, t, t) at the ratios ``g``."""
        theta = floored_theta(g)
        G, t = theta.shape
        f, grad, info = np.empty(G), np.empty((G, t)), np.empty((G, t, t))
        for idx in self.chunks():
            sol = self.solve(theta[idx], idx)
            dS, dld, a = self.derivatives(sol)
            S = np.maximum(sol.S, np.finfo(float).tiny)
            f[idx] = self.m * np.log(S) + sol.logdet
            grad[idx] = (self.m * dS / S[:, None] + dld) / (2.0 * theta[idx])
            info[idx] = self._average_information(sol, a, S)
        return f, grad, info

    def _average_information(self, sol: _Solved, a: tuple[np.ndarray, np.ndarray],
                             S: np.ndarray) -> np.ndarray:
        """``(m / S) [t_k' Z'PZ t_l - q_k q_l / S]`` (module docstring) for one chunk."""
        st, zz = self.st, self.zz
        k = np.arange(st.n_theta)
        T = (a[0] * (st.slot_theta[..., None] == k), a[1] * (st.glob_theta[:, None] == k))
        ZZT = zz.matvec(*T)
        LZZT = sol.lam.t(*ZZT)
        tHt = _block_inner(T, ZZT) - _block_inner(LZZT, sol.fac.solve(*LZZT))
        Wx = (sol.W[0][..., 1:], sol.W[1][..., 1:])                  # M^-1 Lambda ZX
        xHt = _block_inner(zz.zx(S.size), T) - _block_inner(Wx, LZZT)
        tPt = tHt - np.swapaxes(xHt, 1, 2) @ sol.C @ xHt
        q = np.einsum("gkk->gk", _block_inner(T, T))
        return _sym((self.m / S)[:, None, None]
                    * (tPt - q[:, :, None] * q[:, None, :] / S[:, None, None]))


def floored_theta(g: np.ndarray) -> np.ndarray:
    """``theta = sqrt(g)``, at least :data:`THETA_FLOOR`."""
    return np.sqrt(np.maximum(g, THETA_FLOOR * THETA_FLOOR))


@dataclass
class AverageInformation:
    """An :class:`AverageInformationCriterion` over the ratios ``g``, bounded by 0: what
    :func:`~flashmm._newton.projected_newton` minimises."""

    crit: AverageInformationCriterion

    #: the average information costs little more than the gradient: full steps are
    #: tried with the Newton terms
    cheap_hessian = True

    def subset(self, idx: np.ndarray) -> AverageInformation:
        """The criterion of genes ``idx``."""
        return AverageInformation(self.crit.subset(idx))

    def value(self, g: np.ndarray) -> np.ndarray:
        """Criterion per gene at the ratios ``g`` (G, t)."""
        return self.crit.value(floored_theta(g))

    def newton_terms(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Criterion, gradient and average information in ``g``."""
        return self.crit.newton_terms_in_g(g)
