"""The profiled REML / ML criterion with per-gene weighted statistics, batched and dense.

Model of lme4's ``lmer(y ~ X + (1|f1) + ..., weights = w)``: ``e_n ~ N(0, s / w_n)``.
Whitening by ``W^1/2`` gives the unweighted model of MATH.md with the per-gene
statistics ``A = Z'WZ``, ``Z'WX``, ``X'WX``, ``Z'Wy``, ``X'Wy``, ``y'Wy``
(:mod:`flashmm._weighted_stats`).  With the ratios ``g`` repeated over every
component's effects, ``D = diag(sqrt(g))`` and ``M = I + D A D`` (q x q, per gene):

    y'H^-1 y = y'Wy - c'M^-1 c,   c = D Z'Wy;    X'H^-1 y, X'H^-1 X likewise (E = D Z'WX)
    S = y'Py = y'H^-1 y - (X'H^-1 y)' b,        b = (X'H^-1 X)^-1 X'H^-1 y
    f = m log S + log|M| (+ log|X'H^-1 X| for REML),   m = n - p (REML) or n (ML)
    log L = -1/2 [m (1 + log(2 pi S / m)) + log|M| (+ log|X'H^-1X|)] + 1/2 sum log w

(lme4's convention: its deviance subtracts ``sum log w``).  Derivatives in ``g``
come from ``u = Z'Py`` and ``Q = Z'PZ`` (``K = Z'H^-1 Z`` for ML's determinant):

    df/dg_i      = -m ||u_i||^2 / S + tr(B_ii)                (B = Q for REML, K for ML)
    d2f/dg_i dg_j = m [2 u_i'Q_ij u_j / S - ||u_i||^2 ||u_j||^2 / S^2] - ||B_ij||_F^2

(blocks indexed by component), so Newton's method has the exact Hessian.  Every
gene is optimised at once by the projected Newton of :mod:`flashmm._newton` over
``g >= 0``, from two starts (``g = 1``, lme4's ``theta = 1``, and ``g = 0.1``), keeping the
better one.  The cost per gene and evaluation is O(q^3) (batched Cholesky and
solves), which is what limits this path to the pseudobulk scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._newton import projected_newton
from ._weighted_stats import WeightedStats

__all__ = ["WeightedCriterion", "WeightedFitPieces", "fit_weighted_genes", "dense_bytes_per_gene"]

_STARTS = (1.0, 0.1)


def dense_bytes_per_gene(q: int, p: int, k: int) -> int:
    """Working memory of one gene in the batched criterion (bytes)."""
    return 8 * (14 * q * q + 8 * q * p + 4 * p * p + k * p * p + 8 * q)


@dataclass
class _Parts:
    """Everything the criterion and its derivatives need at one point (genes in rows)."""

    S: np.ndarray        # (G,)  y'Py at unit scale
    f: np.ndarray        # (G,)  the profiled criterion
    logdet: np.ndarray   # (G,)  log|M| (+ log|X'H^-1X| for REML)
    b: np.ndarray        # (G, p)
    C: np.ndarray        # (G, p, p) (X'H^-1 X)^-1
    u: np.ndarray        # (G, q)    Z'Py
    B: np.ndarray        # (G, q, q) Q (REML) or K (ML)
    Q: np.ndarray        # (G, q, q) Z'PZ
    ZHX: np.ndarray      # (G, q, p) Z'H^-1 X
    Minv_diag: np.ndarray  # (G, q)


class WeightedCriterion:
    """``f(g)`` of the module docstring for a chunk of genes (dense per-gene matrices)."""

    #: the exact Hessian costs about twice the value: projected_newton tries full steps with it
    cheap_hessian = True

    def __init__(self, ws: WeightedStats, reml: bool, idx: np.ndarray | None = None,
                 A: np.ndarray | None = None) -> None:
        self.ws = ws if idx is None else ws.subset(idx)
        self.A = self.ws.dense_ZZ(np.arange(self.ws.n_genes)) if A is None else A
        self.reml = reml
        self.m = ws.n - ws.k_fe if reml else ws.n
        k = int(ws.component_index.max()) + 1 if ws.k_re else 0
        self.E = np.eye(k)[ws.component_index]          # (q, k) effect -> component

    def subset(self, idx: np.ndarray) -> WeightedCriterion:
        """The criterion of the genes ``idx`` of this chunk."""
        out = WeightedCriterion.__new__(WeightedCriterion)
        out.ws, out.A, out.reml, out.m, out.E = (self.ws.subset(idx), self.A[idx], self.reml,
                                                 self.m, self.E)
        return out

    # ------------------------------------------------------------ evaluation
    def parts(self, g: np.ndarray, derivatives: bool = True) -> _Parts:
        """Evaluate at ratios ``g`` (G, k); NaN where ``X'H^-1 X`` or ``M`` is not PD."""
        ws, A = self.ws, self.A
        q = ws.k_re
        d = np.sqrt(np.maximum(g, 0.0) @ self.E.T)                  # (G, q)
        M = np.eye(q)[None] + d[:, :, None] * A * d[:, None, :]
        DA = d[:, :, None] * A                                      # D A
        c = d * ws.ZY
        Ex = d[:, :, None] * ws.ZX
        rhs = np.concatenate([c[:, :, None], Ex] + ([DA] if derivatives else []), axis=2)
        with np.errstate(all="ignore"):
            L = _chol(M)
            sol = _chol_solve(L, rhs)                               # M^-1 [c, E, DA]
        Mc, ME, MDA = sol[:, :, 0], sol[:, :, 1:1 + ws.k_fe], sol[:, :, 1 + ws.k_fe:]  # MDA: M^-1 D A
        logdet_M = 2.0 * np.sum(np.log(np.diagonal(L, axis1=1, axis2=2)), axis=1)
        XHX = ws.XX - np.einsum("gqa,gqb->gab", Ex, ME)
        XHy = ws.XY - np.einsum("gqa,gq->ga", Ex, Mc)
        yHy = ws.yy - np.einsum("gq,gq->g", c, Mc)
        with np.errstate(all="ignore"):
            Lx = _chol(XHX)
            C = _chol_solve(Lx, np.broadcast_to(np.eye(ws.k_fe), XHX.shape))
        C = 0.5 * (C + np.swapaxes(C, 1, 2))
        b = np.einsum("gab,gb->ga", C, XHy)
        S = yHy - np.einsum("ga,ga->g", XHy, b)
        logdet = logdet_M
        if self.reml:
            logdet = logdet + 2.0 * np.sum(np.log(np.diagonal(Lx, axis1=1, axis2=2)), axis=1)
        with np.errstate(all="ignore"):
            f = self.m * np.log(S) + logdet
        f = np.where(np.isfinite(f) & (S > 0), f, np.nan)
        if not derivatives:
            return _Parts(S, f, logdet, b, C, *(None,) * 5)
        ZHy = ws.ZY - np.einsum("gpq,gp->gq", DA, Mc)               # (DA)' = A D
        ZHX = ws.ZX - np.einsum("gpq,gpa->gqa", DA, ME)
        K = A - np.einsum("gpq,gpr->gqr", DA, MDA)
        u = ZHy - np.einsum("gqa,ga->gq", ZHX, b)
        Q = K - np.einsum("gqa,gab,grb->gqr", ZHX, C, ZHX, optimize=True)
        Minv_diag = np.diagonal(_chol_solve(L, np.broadcast_to(np.eye(q), M.shape)),
                                axis1=1, axis2=2).copy()
        return _Parts(S, f, logdet, b, C, u, Q if self.reml else K, Q, ZHX, Minv_diag)

    def value(self, g: np.ndarray) -> np.ndarray:
        """The criterion ``f`` at ratios ``g`` (G, k)."""
        return self.parts(g, derivatives=False).f

    def newton_terms(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``f``, its gradient (G, k) and exact Hessian (G, k, k) in ``g``."""
        pt = self.parts(g)
        E, m = self.E, self.m
        a2 = (pt.u * pt.u) @ E                                      # ||u_i||^2
        tr = np.diagonal(pt.B, axis1=1, axis2=2) @ E
        S = pt.S[:, None]
        grad = -m * a2 / S + tr
        uQu = np.einsum("ga,gab,gb,ai,bj->gij", pt.u, pt.Q, pt.u, E, E, optimize=True)
        BB = np.einsum("gab,ai,bj->gij", pt.B * pt.B, E, E, optimize=True)
        hess = m * (2.0 * uQu / S[:, :, None] - a2[:, :, None] * a2[:, None, :]
                    / (S * S)[:, :, None]) - BB
        return pt.f, grad, hess

    # -------------------------------------------------------------- inference
    def information(self, g: np.ndarray, pt: _Parts) -> np.ndarray:
        """Observed information of ``(g_1..g_k, s)`` at unit scale (``s = S / m`` scaled to 1).

        With ``y`` divided by ``sqrt(S / m)`` the scale is 1: ``u`` scales by
        ``1 / sqrt(s)`` and the information is that of :mod:`flashmm._satterthwaite`.
        """
        E, m = self.E, self.m
        s = pt.S / m
        k = E.shape[1]
        a2 = (pt.u * pt.u) @ E / s[:, None]
        uQu = np.einsum("ga,gab,gb,ai,bj->gij", pt.u, pt.Q, pt.u, E, E,
                        optimize=True) / s[:, None, None]
        BB = np.einsum("gab,ai,bj->gij", pt.B * pt.B, E, E, optimize=True)
        info = np.empty((g.shape[0], k + 1, k + 1))
        info[:, :k, :k] = 0.5 * (-BB + 2.0 * uQu)
        info[:, :k, k] = info[:, k, :k] = 0.5 * a2
        info[:, k, k] = 0.5 * m          # -m/2 + Q (= m) at the profiled optimum, unit scale
        return info

    def cov_derivatives(self, pt: _Parts) -> np.ndarray:
        """``d (X'H^-1X)^-1 / d g_i = C (X'H^-1 Z_i)(Z_i' H^-1 X) C``, (G, k, p, p)."""
        CX = np.einsum("gab,gqb->gqa", pt.C, pt.ZHX)                # rows: (Z'H^-1X C)_e
        return np.einsum("gqa,gqb,qi->giab", CX, CX, self.E, optimize=True)


def _chol(M: np.ndarray) -> np.ndarray:
    """Batched Cholesky factors; NaN for the matrices that are not positive definite."""
    try:
        return np.linalg.cholesky(M)
    except np.linalg.LinAlgError:
        out = np.full_like(M, np.nan)
        pd_ = np.all(np.isfinite(M), axis=(1, 2))
        pd_[pd_] = np.linalg.eigvalsh(M[pd_])[:, 0] > 0
        if pd_.any():
            out[pd_] = np.linalg.cholesky(M[pd_])
        return out


def _chol_solve(L: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``L L' x = rhs`` for stacks of factors (NaN factors give NaN)."""
    return np.linalg.solve(np.swapaxes(L, 1, 2), np.linalg.solve(L, rhs))


@dataclass
class WeightedFitPieces:
    """Per-gene output of the weighted fit (genes in rows), all that results need."""

    ratios: np.ndarray        # (G, k)
    scale: np.ndarray         # (G,)
    llf: np.ndarray           # (G,)
    converged: np.ndarray     # (G,)
    n_iter: np.ndarray        # (G,)
    fe_params: np.ndarray     # (G, p)
    cov_unscaled: np.ndarray  # (G, p, p)
    blup: np.ndarray          # (G, q)  absolute units
    condvar_unscaled: np.ndarray  # (G, q)  Var(u | y) / s
    info: np.ndarray          # (G, k+1, k+1) at unit scale
    dcov: np.ndarray          # (G, k, p, p)  d cov_unscaled / d g


def fit_weighted_genes(crit: WeightedCriterion, c: np.ndarray, tol: float, maxiter: int,
                       start: np.ndarray | None = None) -> WeightedFitPieces:
    """Optimise every gene of a chunk (criterion of ``y / c``) and collect the estimates."""
    G, k = crit.ws.n_genes, crit.E.shape[1]
    starts = [np.full((G, k), s0) for s0 in _STARTS]
    if start is not None:
        starts.append(np.broadcast_to(start, (G, k)).astype(float))
    best = None
    for x0 in starts:
        res = projected_newton(crit, x0, np.zeros(k), tol, maxiter)
        f = np.where(np.isfinite(res.criterion), crit.value(res.x), np.nan)
        if best is None:
            best, best_f = res, f
            continue
        better = np.isfinite(f) & ~(f >= best_f)
        best.x[better], best.converged[better] = res.x[better], res.converged[better]
        best.n_iter[better] = res.n_iter[better]
        best_f = np.where(better, f, best_f)
    g = best.x
    pt = crit.parts(g)
    m = crit.m
    s = pt.S / m
    llf = (-0.5 * (m * (1.0 + np.log(2.0 * np.pi * s)) + pt.logdet) + 0.5 * crit.ws.logw
           - m * np.log(c))
    gd = g @ crit.E.T
    return WeightedFitPieces(
        ratios=g, scale=s * c * c, llf=llf, converged=best.converged, n_iter=best.n_iter,
        fe_params=pt.b * c[:, None], cov_unscaled=pt.C, blup=gd * pt.u * c[:, None],
        condvar_unscaled=gd * pt.Minv_diag, info=crit.information(g, pt),
        dcov=crit.cov_derivatives(pt))
