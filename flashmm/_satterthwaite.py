"""Satterthwaite degrees of freedom for contrasts of the fixed effects.

Works in the parameterisation ``(g_1, ..., g_k, s)`` (ratios and residual
variance), where the REML log-likelihood is

    l(g, s) = -1/2 [ m log s + D(g) + Q(g) / s ],   Q = y'Py s,  D = log|I + G W|

with ``m = n - p``, ``W = ZRZ`` (REML) or ``m = n``, ``W = ZZ`` (ML), and

    dQ/dg_i = -||a_i||^2,  d2Q/dg_i dg_j = 2 a_i' B_ij a_j,  d2D/dg_i dg_j = -||B_ij||_F^2.

The observed information ``-Hessian`` is inverted, ``v = c' Cov(b) c`` is
differentiated with ``dv/ds = v / s`` and
``dv/dg_i = s ||[(I + ZZ G)^-1 ZX W c]_i||^2`` (``W = (X'H^-1 X)^-1``), and
``df = 2 v^2 / (grad' A grad)`` as in lmerTest.  At the optimum the value does
not depend on the parameterisation.  Components at the boundary (``g_i = 0``)
are left out, which gives ``df = n - p`` when every component is at 0.
"""

from __future__ import annotations

import numpy as np

from ._fit_eigen import EigenCriterion
from ._reduce import Reduced, symmetric_eigh
from .stats import SufficientStats

__all__ = ["satterthwaite_df", "information_gs"]


def information_gs(stats: SufficientStats, red: Reduced, ratios: np.ndarray, scale: np.ndarray,
                   reml: bool) -> np.ndarray:
    """Observed information of ``(g_1..g_k, s)`` per gene, shape (G, k+1, k+1)."""
    G, k = ratios.shape
    m = red.n - red.p if reml else red.n
    if k == 1:
        a2, aBa, BB = _pieces_eigen(stats, red, ratios[:, 0], reml)
        a2, aBa, BB = a2[:, None], aBa[:, None, None], BB[:, None, None]
    else:
        a2, aBa, BB = _pieces_dense(stats, red, ratios, reml)
    s = scale
    Q = m * s  # at the profiled optimum Q / s = m
    info = np.empty((G, k + 1, k + 1))
    info[:, :k, :k] = 0.5 * (-BB + 2.0 * aBa / s[:, None, None])
    info[:, :k, k] = info[:, k, :k] = 0.5 * a2 / (s * s)[:, None]
    info[:, k, k] = 0.5 * (-m / s**2 + 2.0 * Q / s**3)
    return info


def _pieces_eigen(stats: SufficientStats, red: Reduced, g: np.ndarray, reml: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``||a||^2 = -S'``, ``a'Ba = S''/2`` and ``||B||_F^2 = -L''`` from the eigen path."""
    crit = EigenCriterion.from_matrices(red.ZRZ, red.ZRy, red.yRy, stats.ZZ, reml, m=1.0)
    _, S1, S2, _, _, L2 = crit.terms(g)
    return -S1, 0.5 * S2, -L2


def _pieces_dense(stats: SufficientStats, red: Reduced, ratios: np.ndarray, reml: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    E = np.eye(ratios.shape[1])[stats.component_index]
    gd = ratios @ E.T
    q = red.ZRZ.shape[0]
    eye = np.eye(q)
    A = eye[None] + red.ZRZ[None] * gd[:, None, :]                   # I + ZRZ G
    a = np.linalg.solve(A, red.ZRy.T[:, :, None])[:, :, 0]
    W = red.ZRZ if reml else stats.ZZ
    Aw = eye[None] + gd[:, :, None] * W[None]                         # I + G W
    B = np.swapaxes(np.linalg.solve(np.swapaxes(Aw, 1, 2), np.broadcast_to(W, Aw.shape)), 1, 2)
    B = 0.5 * (B + np.swapaxes(B, 1, 2))
    if not reml:
        Ar = eye[None] + gd[:, :, None] * red.ZRZ[None]
        Br = np.swapaxes(np.linalg.solve(np.swapaxes(Ar, 1, 2),
                                         np.broadcast_to(red.ZRZ, Ar.shape)), 1, 2)
        Br = 0.5 * (Br + np.swapaxes(Br, 1, 2))
    else:
        Br = B
    a2 = (a * a) @ E
    aBa = E.T @ (a[:, :, None] * Br * a[:, None, :]) @ E
    BB = E.T @ (B * B) @ E
    return a2, aBa, BB


def _vgrad(stats: SufficientStats, ratios: np.ndarray, scale: np.ndarray,
           cov_unscaled: np.ndarray, L: np.ndarray,
           eig_ZZ: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``v`` (G, r) and its gradient (G, r, k+1) for contrast rows ``L`` (r, p) or (G, r, p)."""
    G, k = ratios.shape
    Lg = np.broadcast_to(L, (G,) + L.shape[-2:])
    Wc = L @ cov_unscaled                       # rows c'(X'H^-1X)^-1 (cov is symmetric)
    v = scale[:, None] * np.sum(Lg * Wc, axis=2)
    grad = np.empty(v.shape + (k + 1,))
    grad[..., k] = v / scale[:, None]
    ZXWc = Wc @ stats.ZX.T                      # G x r x q
    if k == 1:
        mu, Qm = eig_ZZ if eig_ZZ is not None else symmetric_eigh(stats.ZZ)
        rot = (ZXWc @ Qm) / (1.0 + ratios[:, None, :1] * mu)
        grad[..., 0] = scale[:, None] * np.sum(rot * rot, axis=2)
    else:
        E = np.eye(k)[stats.component_index]
        gd = ratios @ E.T
        A = np.eye(stats.k_re)[None] + stats.ZZ[None] * gd[:, None, :]   # I + ZZ G
        sol = np.linalg.solve(A, np.swapaxes(ZXWc, 1, 2))               # G x q x r
        grad[..., :k] = scale[:, None, None] * np.einsum("gqr,qk->grk", sol * sol, E)
    return v, grad


def satterthwaite_df(stats: SufficientStats, red: Reduced, ratios: np.ndarray, scale: np.ndarray,
                     cov_unscaled: np.ndarray, L: np.ndarray, reml: bool,
                     info: np.ndarray | None = None,
                     eig_ZZ: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Satterthwaite df per gene (rows) and contrast row of ``L`` (columns).

    ``L`` is r x p (the same contrasts for every gene) or G x r x p; ``eig_ZZ``
    is ``symmetric_eigh(stats.ZZ)`` if already computed (one component).
    """
    G, k = ratios.shape
    out = np.full((G, L.shape[-2]), np.nan)
    ok = np.flatnonzero(np.isfinite(scale) & np.all(np.isfinite(ratios), axis=1))
    if ok.size == 0:
        return out
    per_gene = stats.k_re * L.shape[-2] + (stats.k_re * stats.k_re if k > 1 else 0)
    block = max(1, 4_000_000 // max(1, per_gene))
    if k == 1 and eig_ZZ is None:
        eig_ZZ = symmetric_eigh(stats.ZZ)
    for s0 in range(0, ok.size, block):
        idx = ok[s0:s0 + block]
        rat = ratios[idx]
        inf = info[idx] if info is not None else information_gs(
            stats, red.subset(idx), rat, scale[idx], reml)
        Lb = L if L.ndim == 2 else L[idx]
        v, grad = _vgrad(stats, rat, scale[idx], cov_unscaled[idx], Lb, eig_ZZ)
        free = np.concatenate([rat > 0.0, np.ones((idx.size, 1), dtype=bool)], axis=1)
        inf = inf * (free[:, :, None] & free[:, None, :])
        inf[:, np.arange(k + 1), np.arange(k + 1)] += ~free
        A = np.linalg.inv(inf)
        grad = grad * free[:, None, :]
        denom = np.einsum("gri,gij,grj->gr", grad, A, grad)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[idx] = 2.0 * v * v / denom
    return out
