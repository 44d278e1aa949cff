"""Correlated random effects (random slopes): lme4's relative covariance factor.

The random effects of one gene are ``u ~ N(0, s Lambda Lambda')`` with a
block-diagonal relative covariance factor

    Lambda(theta) = blockdiag(I_m kron T(theta_re), sqrt(g_1) I_{d_1}, ...)

where ``T`` is the r x r lower-triangular factor of the per-group covariance
``Psi / s = T T'`` (r(r+1)/2 parameters stored column by column, as lme4's
``theta``; only the diagonal with ``independent_re=True``) and the ``sqrt(g_i)``
are the variance components.  ``Lambda`` is linear in ``theta``: every entry is
one ``theta_j`` or 0, so ``Lambda = sum_j theta_j Lambda_j`` with 0/1 patterns
``Lambda_j`` of disjoint support.

Profiled criterion (``-2 log L`` up to constants), with ``r = ZRy``:

    M_W = I + Lambda' W Lambda,  W = ZRZ (REML) or ZZ (ML),  m = n - p or n
    S   = yRy - r' Lambda M_R^-1 Lambda' r,   M_R = I + Lambda' ZRZ Lambda
    f   = m log S + log|M_W|

and its gradient, with ``u = M_R^-1 Lambda' r``, ``a = r - ZRZ Lambda u`` and
``P = W Lambda M_W^-1``:

    dS/dtheta_j      = -2 sum_{(k,l) in supp Lambda_j} a_k u_l
    dlog|M_W|/dtheta_j = 2 sum_{(k,l) in supp Lambda_j} P_kl

The Hessian is the central difference of this analytic gradient.  All genes are
optimised at once (projected Newton with an Armijo line search on the bounds
``theta_diag >= 0``, lme4's lower bounds), from several starting points.

Cost: every evaluation forms and factorises a dense q x q matrix per gene, so
one iteration is O(G q^3) (q = m r + sum d_i).  This is meant for a moderate
number of random effects (tens to a few hundred; sleepstudy: q = 36).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._design import RandomComponent
from ._newton import projected_newton

__all__ = [
    "ThetaStructure",
    "ThetaCriterion",
    "ThetaFitResult",
    "theta_structure",
    "minimise_theta",
    "gls_theta",
    "satterthwaite_theta",
]


@dataclass
class ThetaStructure:
    """Where every ``theta_j`` sits in ``Lambda`` (shared by all genes).

    Attributes
    ----------
    q : int
        Number of random effects (columns of Z).
    rows, cols, pidx : ndarray
        Non-zero pattern of ``Lambda``: entry ``(rows[i], cols[i])`` equals
        ``theta[pidx[i]]``.
    lower : ndarray, shape (t,)
        Lower bound of each ``theta_j`` (0 for standard deviations, -inf otherwise).
    re_dim : int
        r, the number of correlated random effects per group.
    re_pairs : list of (int, int)
        ``(a, b)`` position in ``T`` of the first ``len(re_pairs)`` thetas.
    vc_components : list of int
        For every variance component (after the random-slope block): its index
        among the model's components; its theta follows the T entries.
    """

    q: int
    rows: np.ndarray
    cols: np.ndarray
    pidx: np.ndarray
    lower: np.ndarray
    re_dim: int
    re_pairs: list[tuple[int, int]]
    vc_components: list[int]
    onehot: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.onehot = np.zeros((self.pidx.size, self.n_theta))
        self.onehot[np.arange(self.pidx.size), self.pidx] = 1.0

    @property
    def n_theta(self) -> int:
        """Number of covariance parameters t."""
        return self.lower.size

    @property
    def bounded(self) -> np.ndarray:
        """Mask of the parameters bounded below by 0."""
        return np.isfinite(self.lower)

    def lam(self, theta: np.ndarray) -> np.ndarray:
        """Dense ``Lambda`` per gene, shape (G, q, q)."""
        out = np.zeros((theta.shape[0], self.q, self.q))
        out[:, self.rows, self.cols] = theta[:, self.pidx]
        return out

    def tfactor(self, theta: np.ndarray) -> np.ndarray:
        """The r x r factor ``T`` per gene, shape (G, r, r)."""
        r = self.re_dim
        T = np.zeros((theta.shape[0], r, r))
        for j, (a, b) in enumerate(self.re_pairs):
            T[:, a, b] = theta[:, j]
        return T

    def start(self, value: float, G: int) -> np.ndarray:
        """Starting point ``T = value I``, variance-component factors ``value``."""
        th = np.zeros((G, self.n_theta))
        for j, (a, b) in enumerate(self.re_pairs):
            if a == b:
                th[:, j] = value
        th[:, len(self.re_pairs):] = value
        return th


def theta_structure(components: tuple[RandomComponent, ...], re_dim: int,
                    independent: bool) -> ThetaStructure:
    """Build the ``Lambda`` pattern: component 0 is the random-slope block.

    Parameters
    ----------
    components : tuple of RandomComponent
        All components; the first holds ``m * r`` effects ordered group by group
        (r consecutive columns per group).
    re_dim : int
        r, effects per group in the first component.
    independent : bool
        Diagonal ``T`` (independent random effects) instead of lower-triangular.
    """
    sizes = [c.size for c in components]
    q = int(sum(sizes))
    r = re_dim
    m = sizes[0] // r
    pairs = [(a, b) for b in range(r) for a in range(b, r) if (a == b or not independent)]
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    pidx: list[np.ndarray] = []
    base = np.arange(m) * r
    lower = []
    for j, (a, b) in enumerate(pairs):
        rows.append(base + a)
        cols.append(base + b)
        pidx.append(np.full(m, j))
        lower.append(0.0 if a == b else -np.inf)
    off = sizes[0]
    vc = []
    for ci, d in enumerate(sizes[1:], start=1):
        j = len(lower)
        rows.append(off + np.arange(d))
        cols.append(off + np.arange(d))
        pidx.append(np.full(d, j))
        lower.append(0.0)
        vc.append(ci)
        off += d
    return ThetaStructure(q, np.concatenate(rows), np.concatenate(cols),
                          np.concatenate(pidx), np.asarray(lower), r, pairs, vc)


def _gene_chunks(G: int, q: int, budget: int = 6_000_000) -> list[np.ndarray]:
    size = max(1, budget // max(1, 4 * q * q))
    return [np.arange(s, min(G, s + size)) for s in range(0, G, size)]


def _logdet_pd(M: np.ndarray) -> np.ndarray:
    L = np.linalg.cholesky(M)
    return 2.0 * np.sum(np.log(np.diagonal(L, axis1=1, axis2=2)), axis=1)


@dataclass
class ThetaCriterion:
    """Profiled criterion ``f(theta) = m log S + log|M_W|`` for a set of genes."""

    st: ThetaStructure
    ZRZ: np.ndarray        # (q, q)
    r: np.ndarray          # (G, q)  ZRy, genes in rows
    yRy: np.ndarray        # (G,)
    W: np.ndarray          # (q, q)  ZRZ (REML) or ZZ (ML)
    m: float
    reml: bool

    def subset(self, idx: np.ndarray) -> ThetaCriterion:
        """The criterion of genes ``idx``."""
        return ThetaCriterion(self.st, self.ZRZ, self.r[idx], self.yRy[idx], self.W, self.m,
                              self.reml)

    def parts(self, theta: np.ndarray, grad: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``S``, ``log|M_W|`` and (optionally) their gradients (G, t)."""
        G, q = theta.shape[0], self.st.q
        S = np.empty(G)
        logdet = np.empty(G)
        dS = np.empty((G, self.st.n_theta)) if grad else None
        dld = np.empty((G, self.st.n_theta)) if grad else None
        eye = np.eye(q)
        rows, cols = self.st.rows, self.st.cols
        for idx in _gene_chunks(G, q):
            lam = self.st.lam(theta[idx])
            r = self.r[idx]
            ZL = self.ZRZ @ lam                                    # ZRZ Lambda
            MR = eye + np.swapaxes(lam, 1, 2) @ ZL
            Ltr = np.einsum("gkl,gk->gl", lam, r)
            u = np.linalg.solve(MR, Ltr[:, :, None])[:, :, 0]
            S[idx] = self.yRy[idx] - np.sum(Ltr * u, axis=1)
            if self.reml:
                WL, MW = ZL, MR
            else:
                WL = self.W @ lam
                MW = eye + np.swapaxes(lam, 1, 2) @ WL
            logdet[idx] = _logdet_pd(MW)
            if grad:
                a = r - np.einsum("gkl,gl->gk", ZL, u)
                dS[idx] = -2.0 * (a[:, rows] * u[:, cols]) @ self.st.onehot
                Pt = np.linalg.solve(MW, np.swapaxes(WL, 1, 2))        # P' = M^-1 (W Lambda)'
                dld[idx] = 2.0 * Pt[:, cols, rows] @ self.st.onehot
        return S, logdet, dS, dld

    def value(self, theta: np.ndarray) -> np.ndarray:
        """Criterion per gene."""
        S, logdet, _, _ = self.parts(theta, grad=False)
        return self.m * np.log(np.maximum(S, np.finfo(float).tiny)) + logdet

    def gradient(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Criterion and its gradient (G, t)."""
        S, logdet, dS, dld = self.parts(theta)
        S = np.maximum(S, np.finfo(float).tiny)
        return self.m * np.log(S) + logdet, self.m * dS / S[:, None] + dld

    def newton_terms(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Criterion, analytic gradient and finite-difference Hessian."""
        f, grad = self.gradient(theta)
        return f, grad, self.hessian(theta)

    def hessian(self, theta: np.ndarray, rel_step: float = 1e-5) -> np.ndarray:
        """Central difference of the analytic gradient, symmetrised (G, t, t)."""
        G, t = theta.shape
        H = np.empty((G, t, t))
        h = rel_step * np.maximum(1.0, np.abs(theta))
        for j in range(t):
            e = np.zeros_like(theta)
            e[:, j] = h[:, j]
            gp = self.gradient(theta + e)[1]
            gm = self.gradient(theta - e)[1]
            H[:, :, j] = (gp - gm) / (2.0 * h[:, j, None])
        return 0.5 * (H + np.swapaxes(H, 1, 2))


@dataclass
class ThetaFitResult:
    """Optimiser output for a set of genes."""

    theta: np.ndarray
    criterion: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray


def minimise_theta(crit: ThetaCriterion, starts: list[float] | None = None, tol: float = 1e-10,
                   maxiter: int = 200, start_theta: np.ndarray | None = None) -> ThetaFitResult:
    """Minimise the criterion for all genes from several starts; keep the best.

    Parameters
    ----------
    crit : ThetaCriterion
    starts : list of float
        Scales ``c`` of the starting points ``T = c I`` (lme4 starts at 1).
    tol : float
        Stop when the Newton decrement of ``f`` (``-2 log L`` scale) is below ``tol``.
    maxiter : int
        Newton iterations per start.
    start_theta : ndarray, optional
        An extra user starting point (t,) or (G, t).
    """
    G = crit.yRy.shape[0]
    starts = [1.0, 0.2] if starts is None else starts
    points = [crit.st.start(c, G) for c in starts]
    if start_theta is not None:
        points.insert(0, np.array(np.broadcast_to(start_theta, (G, crit.st.n_theta)), dtype=float))
    best: ThetaFitResult | None = None
    for th0 in points:
        res = _projected_newton(crit, th0, tol, maxiter)
        res = _escape_boundary(crit, res, tol, maxiter)
        if best is None:
            best = res
            continue
        better = res.criterion < best.criterion - 1e-12
        better |= ~np.isfinite(best.criterion) & np.isfinite(res.criterion)
        for name in ("theta", "criterion", "converged", "n_iter"):
            getattr(best, name)[better] = getattr(res, name)[better]
    assert best is not None
    return best


def _escape_boundary(crit: ThetaCriterion, res: ThetaFitResult, tol: float, maxiter: int,
                     rounds: int = 3) -> ThetaFitResult:
    """Leave boundary saddle points: try moving each bounded ``theta_j = 0`` inwards.

    With a diagonal ``T`` the criterion is even in every ``theta_j``, so its
    gradient vanishes at ``theta_j = 0`` even when 0 is a local maximum in
    that direction; Newton cannot leave such a point by itself.  For every
    gene with a bounded parameter at 0, the criterion is evaluated with that
    parameter set to 1e-5, 1e-4, ..., 0.5, 1 and 2 (theta is a ratio of
    standard deviations, so these are scale-free); Newton restarts from the best point
    if it is lower, and the result is kept only if it improves the criterion.
    """
    bounded = np.flatnonzero(crit.st.bounded)
    for _ in range(rounds):
        at0 = res.theta[:, bounded] <= 1e-6
        genes = np.flatnonzero(at0.any(axis=1))
        if genes.size == 0:
            break
        sub = crit.subset(genes)
        best_th = res.theta[genes].copy()
        best_f = res.criterion[genes].copy()
        for jj, j in enumerate(bounded):
            rows = np.flatnonzero(at0[genes, jj])
            if rows.size == 0:
                continue
            for v in (1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0):
                trial = res.theta[genes[rows]].copy()
                trial[:, j] = v
                ft = sub.subset(rows).value(trial)
                better = np.isfinite(ft) & (ft < best_f[rows] - 1e-12)
                best_th[rows[better]] = trial[better]
                best_f[rows[better]] = ft[better]
        moved = np.flatnonzero(np.any(best_th != res.theta[genes], axis=1))
        if moved.size == 0:
            break
        new = _projected_newton(sub.subset(moved), best_th[moved], tol, maxiter)
        g = genes[moved]
        take = new.criterion < res.criterion[g]
        res.theta[g[take]] = new.theta[take]
        res.criterion[g[take]] = new.criterion[take]
        res.converged[g[take]] = new.converged[take]
        res.n_iter[g[take]] += new.n_iter[take]
        if not take.any():
            break
    return res


def _projected_newton(crit: ThetaCriterion, theta: np.ndarray, tol: float, maxiter: int
                      ) -> ThetaFitResult:
    res = projected_newton(crit, theta, crit.st.lower, tol, maxiter)
    return ThetaFitResult(res.x, res.criterion, res.converged, res.n_iter)


# ---------------------------------------------------------------- GLS at theta
@dataclass
class ThetaGLS:
    """GLS quantities at ``theta`` (genes in rows)."""

    fe_params: np.ndarray      # (G, p)
    cov_unscaled: np.ndarray   # (G, p, p)  (X'H^-1 X)^-1
    blup_unscaled: np.ndarray  # (G, q)     T (ZY - ZX b) with T = Lambda M^-1 Lambda'
    condcov_unscaled: np.ndarray  # (G, q, q) T = Cov(u | y) / s


def gls_theta(stats: Any, st: ThetaStructure, theta: np.ndarray) -> ThetaGLS:
    """Fixed effects, their covariance and BLUPs at ``theta`` (G, t) (all genes).

    ``H = I + Z Lambda Lambda' Z'`` and ``T = Lambda (I + Lambda' ZZ Lambda)^-1 Lambda'``
    (the relative conditional covariance of the random effects):
    ``X'H^-1 X = XX - ZX' T ZX``, ``X'H^-1 y = XY - ZX' T ZY`` and
    ``u = T (ZY - ZX b)``.  O(q^3 + q^2 p) per gene.
    """
    G, p, q = theta.shape[0], stats.k_fe, st.q
    b = np.empty((G, p))
    cov = np.empty((G, p, p))
    blup = np.empty((G, q))
    condcov = np.empty((G, q, q))
    eye = np.eye(q)
    for idx in _gene_chunks(G, q):
        lam = st.lam(theta[idx])
        lt = np.swapaxes(lam, 1, 2)
        M = eye + lt @ stats.ZZ @ lam
        T = lam @ np.linalg.solve(M, lt)
        T = 0.5 * (T + np.swapaxes(T, 1, 2))
        TZX = T @ stats.ZX
        XHX = stats.XX[None] - np.einsum("qa,gqb->gab", stats.ZX, TZX)
        XHy = stats.XY[:, idx].T - np.einsum("gqa,qg->ga", TZX, stats.ZY[:, idx])
        c = np.linalg.inv(XHX)
        c = 0.5 * (c + np.swapaxes(c, 1, 2))
        cov[idx] = c
        b[idx] = np.einsum("gij,gj->gi", c, XHy)
        resid = stats.ZY[:, idx].T - b[idx] @ stats.ZX.T
        blup[idx] = np.einsum("gij,gj->gi", T, resid)
        condcov[idx] = T
    return ThetaGLS(b, cov, blup, condcov)


# ------------------------------------------------------------- Satterthwaite
def varpar_information(crit: ThetaCriterion, theta: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Hessian of the deviance ``-2 l`` in ``(theta, sigma)`` per gene, (G, t+1, t+1).

    ``-2 l = m log(2 pi sigma^2) + log|M_W| + S(theta) / sigma^2 (+ const)``: the
    theta block is the central difference of the analytic gradients of
    ``log|M_W|`` and ``S``; the sigma entries are analytic.  (lmerTest uses
    the same Hessian, by finite differences of the deviance.)
    """
    G, t = theta.shape
    h = 1e-5 * np.maximum(1.0, np.abs(theta))
    S, _, dS, _ = crit.parts(theta)
    Hth = np.empty((G, t, t))
    s2 = sigma * sigma
    for j in range(t):
        e = np.zeros_like(theta)
        e[:, j] = h[:, j]
        _, _, dSp, dlp = crit.parts(theta + e)
        _, _, dSm, dlm = crit.parts(theta - e)
        Hth[:, :, j] = (dlp - dlm + (dSp - dSm) / s2[:, None]) / (2.0 * h[:, j, None])
    H = np.empty((G, t + 1, t + 1))
    H[:, :t, :t] = 0.5 * (Hth + np.swapaxes(Hth, 1, 2))
    H[:, :t, t] = H[:, t, :t] = -2.0 * dS / (s2 * sigma)[:, None]
    H[:, t, t] = -2.0 * crit.m / s2 + 6.0 * S / (s2 * s2)
    return H


def satterthwaite_theta(stats: Any, st: ThetaStructure, crit: ThetaCriterion,
                        theta: np.ndarray, scale: np.ndarray, cov_unscaled: np.ndarray,
                        L: np.ndarray, info: np.ndarray | None = None) -> np.ndarray:
    """Satterthwaite df (G, r) for contrast rows ``L`` (r, p) or (G, r, p), as lmerTest.

    ``df = 2 v^2 / (grad' A grad)`` with ``v = c' Cov(b) c``, ``A = 2 H^-1`` the
    covariance of ``(theta, sigma)`` from the deviance Hessian ``H`` and the
    analytic gradient of ``v``: with ``K = Lambda M^-1``,
    ``N = I - K Lambda' ZZ`` and ``w = ZX (X'H^-1 X)^-1 c``,
    ``dv/dtheta_j = 2 s sum_{(k,l) in supp Lambda_j} (N'w)_k (K'w)_l`` and
    ``dv/dsigma = 2 v / sigma``.  Parameters at their lower bound (a singular
    fit) are left out.
    """
    G, t = theta.shape
    sigma = np.sqrt(scale)
    if info is None:
        info = varpar_information(crit, theta, sigma)
    Lg = np.broadcast_to(L, (G,) + L.shape[-2:])
    Wc = np.einsum("gab,grb->gra", cov_unscaled, Lg)
    v = scale[:, None] * np.einsum("grb,grb->gr", Lg, Wc)
    grad = np.empty(v.shape + (t + 1,))
    grad[..., t] = 2.0 * v / sigma[:, None]
    q = st.q
    eye = np.eye(q)
    for idx in _gene_chunks(G, q):
        lam = st.lam(theta[idx])
        lt = np.swapaxes(lam, 1, 2)
        M = eye + lt @ stats.ZZ @ lam
        K = np.swapaxes(np.linalg.solve(M, lt), 1, 2)          # Lambda M^-1 (M symmetric)
        N = eye - K @ lt @ stats.ZZ
        w = np.einsum("qa,gra->grq", stats.ZX, Wc[idx])
        Nw = np.einsum("gkq,grk->grq", N, w)                    # N' w
        Kw = np.einsum("gkq,grk->grq", K, w)                    # K' w
        prod = Nw[:, :, st.rows] * Kw[:, :, st.cols]
        grad[idx, :, :t] = 2.0 * scale[idx, None, None] * (prod @ st.onehot)
    free = np.concatenate([~(st.bounded[None] & (theta <= 0.0)),
                           np.ones((G, 1), dtype=bool)], axis=1)
    H = info * (free[:, :, None] & free[:, None, :])
    H[:, np.arange(t + 1), np.arange(t + 1)] += ~free
    out = np.full(v.shape, np.nan)
    ok = np.all(np.isfinite(H), axis=(1, 2))
    if ok.any():
        A = 2.0 * np.linalg.pinv(H[ok])
        gr = grad[ok] * free[ok][:, None, :]
        denom = np.einsum("gri,gij,grj->gr", gr, A, gr)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[ok] = 2.0 * v[ok] ** 2 / denom
    return out
