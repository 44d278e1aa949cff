"""Estimates at given variance ratios: GLS coefficients, their covariance, BLUPs.

With ``T = G (I + ZZ G)^-1`` (per gene):

    X'H^-1 X = XX - ZX' T ZX,     X'H^-1 y = XY - ZX' T ZY
    b = (X'H^-1 X)^-1 X'H^-1 y,   Cov(b) = s (X'H^-1 X)^-1,   u = T (ZY - ZX b)

One component uses ``ZZ = Q diag(mu) Q'`` so that ``T = Q diag(g / (1 + g mu)) Q'``
(O(q p^2) per gene); several components solve q x q systems per gene.  Both
accept negative ratios (FLASHMM's unconstrained estimates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._reduce import symmetric_eigh
from .stats import SufficientStats

__all__ = ["GLSEstimates", "gls_estimates", "logdet_ratio", "condvar_levels"]


@dataclass
class GLSEstimates:
    """Per-gene GLS quantities (genes in rows)."""

    fe_params: np.ndarray      # (G, p)
    cov_unscaled: np.ndarray   # (G, p, p)  (X'H^-1 X)^-1
    blup_unscaled: np.ndarray  # (G, q)     T (ZY - ZX b)
    logdet_ZZ: np.ndarray      # (G,)       log|I + G ZZ|
    condvar_unscaled: np.ndarray  # (G, q)  diag(T): Var(u | y) / s


def _gene_blocks(G: int, per_gene: int, budget: int = 8_000_000) -> list[np.ndarray]:
    size = max(1, budget // max(1, per_gene))
    return [np.arange(s, min(G, s + size)) for s in range(0, G, size)]


def gls_estimates(stats: SufficientStats, gdiag: np.ndarray) -> GLSEstimates:
    """GLS estimates at per-effect ratios ``gdiag`` (G, q), all genes.

    ``gdiag`` holds, for every random effect, the ratio of its component.
    """
    if len(stats.components) == 1:
        return _gls_eigen(stats, gdiag[:, 0])
    return _gls_dense(stats, gdiag)


def _solve_fixed(XHX: np.ndarray, XHy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cov = np.linalg.inv(XHX)
    cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))
    b = np.einsum("gij,gj->gi", cov, XHy)
    return b, cov


def _gls_eigen(stats: SufficientStats, g: np.ndarray) -> GLSEstimates:
    mu, Q = symmetric_eigh(stats.ZZ)
    C = Q.T @ stats.ZX                  # q x p
    V = (Q.T @ stats.ZY).T              # G x q
    G, p, q = g.shape[0], stats.k_fe, stats.k_re
    b = np.empty((G, p))
    cov = np.empty((G, p, p))
    blup = np.empty((G, q))
    condvar = np.empty((G, q))
    for idx in _gene_blocks(G, p * q + p * p):
        t = _eigen_t(g[idx], mu)                                          # G x q
        XHX = stats.XX[None] - C.T[None] @ (t[:, :, None] * C[None])
        XHy = stats.XY[:, idx].T - (t * V[idx]) @ C
        b[idx], cov[idx] = _solve_fixed(XHX, XHy)
        blup[idx] = (t * (V[idx] - b[idx] @ C.T)) @ Q.T
        condvar[idx] = t @ (Q * Q).T
    top = np.flatnonzero(np.isinf(g))
    if top.size:  # h2 = 1: the limit of g X'H^-1 X is C' diag(1/mu^2) C (Z spans R^n)
        with np.errstate(divide="ignore"):
            w = np.where(mu > 0, 1.0 / np.where(mu > 0, mu, 1.0) ** 2, np.nan)
        XMX = np.broadcast_to((C.T * w) @ C, (top.size, p, p))
        XMy = (V[top] * w) @ C
        b[top], cov[top] = _solve_fixed(np.array(XMX), XMy)
        # here cov_unscaled is relative to the component variance (scale = 0)
        blup[top] = (_eigen_t(g[top], mu) * (V[top] - b[top] @ C.T)) @ Q.T
    logdet = np.sum(np.log(np.abs(1.0 + g[:, None] * mu)), axis=1)
    return GLSEstimates(b, cov, blup, logdet, condvar)


def _eigen_t(g: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """``g / (1 + g mu)`` per gene and eigenvalue, with its limit ``1 / mu`` at ``g = inf``."""
    gi = np.where(np.isinf(g), 0.0, g)[:, None]
    with np.errstate(divide="ignore"):
        lim = np.where(mu > 0, 1.0 / np.where(mu > 0, mu, 1.0), np.inf)
    return np.where(np.isinf(g)[:, None], lim[None, :], gi / (1.0 + gi * mu))


def _gls_dense(stats: SufficientStats, gdiag: np.ndarray) -> GLSEstimates:
    G, p, q = gdiag.shape[0], stats.k_fe, stats.k_re
    b = np.empty((G, p))
    cov = np.empty((G, p, p))
    blup = np.empty((G, q))
    logdet = np.empty(G)
    condvar = np.empty((G, q))
    eye = np.eye(q)
    for idx in _gene_blocks(G, 2 * q * q + p * q):
        gd = gdiag[idx]
        A = eye[None] + gd[:, :, None] * stats.ZZ[None]                # I + G ZZ
        T = np.linalg.solve(A, gd[:, :, None] * eye[None])             # (I + G ZZ)^-1 G
        T = 0.5 * (T + np.swapaxes(T, 1, 2))
        TZX = T @ stats.ZX                                             # G x q x p
        XHX = stats.XX[None] - np.einsum("qa,gqb->gab", stats.ZX, TZX)
        XHy = stats.XY[:, idx].T - np.einsum("gqa,qg->ga", TZX, stats.ZY[:, idx])
        b[idx], cov[idx] = _solve_fixed(XHX, XHy)
        resid = stats.ZY[:, idx].T - b[idx] @ stats.ZX.T               # G x q
        blup[idx] = np.einsum("gij,gj->gi", T, resid)
        logdet[idx] = np.linalg.slogdet(A)[1]
        condvar[idx] = np.diagonal(T, axis1=1, axis2=2)
    return GLSEstimates(b, cov, blup, logdet, condvar)


def logdet_ratio(mat: np.ndarray, gdiag: np.ndarray) -> np.ndarray:
    """``log|I + G mat|`` per gene for per-effect ratios ``gdiag`` (G, q)."""
    q = mat.shape[0]
    out = np.empty(gdiag.shape[0])
    for idx in _gene_blocks(gdiag.shape[0], q * q):
        A = np.eye(q)[None] + gdiag[idx, :, None] * mat[None]
        out[idx] = np.linalg.slogdet(A)[1]
    return out


def condvar_levels(stats: Any, ratios: np.ndarray, usable: np.ndarray) -> dict[int, np.ndarray]:
    """Unscaled conditional variances ``diag(L T_cc L')`` of components with a known covariance.

    ``T = G (I + ZZ G)^-1`` (``Var(v | y) / s`` as in :mod:`flashmm._gls`); for one
    component ``T = Q diag(g / (1 + g mu)) Q'`` and the diagonal is
    ``((L Q)^2) t`` with its limit ``t = 1 / mu`` at ``g = inf`` (``h2 = 1``).
    A known covariance is accepted for a model with that one component only.

    Returns
    -------
    dict
        Component position -> (genes x levels) array (NaN for unusable genes).
    """
    comps = stats.components
    out: dict[int, np.ndarray] = {}
    starts = np.concatenate([[0], np.cumsum(stats.sizes)])
    G = ratios.shape[0]
    for i, comp in enumerate(comps):
        if comp.cov_factor is None:
            continue
        L = comp.cov_factor
        res = np.full((G, L.shape[0]), np.nan)
        ok = np.flatnonzero(usable)
        mu, Q = symmetric_eigh(stats.ZZ[starts[i]:starts[i + 1], starts[i]:starts[i + 1]])
        res[ok] = _eigen_t(ratios[ok, i], mu) @ ((L @ Q) ** 2).T
        out[i] = res
    return out
