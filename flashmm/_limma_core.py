"""Numerical core of the limma-style gene-wise models: arrays in, arrays out.

Ordinary least squares and GLS with a compound-symmetric correlation within
blocks are computed from the sufficient statistics of MATH.md.  With ``Z`` the
n x q block indicator, ``ZZ = Z'Z = diag(m)`` (block sizes) and the correlation
``rho`` the sample covariance is ``C = (1 - rho) (I + g ZZ')`` with the variance
ratio ``g = rho / (1 - rho)`` shared by all genes, so that with
``t_b = g / (1 + g m_b)``::

    X'H^-1 X = XX - ZX' diag(t) ZX,     X'H^-1 y = XY - ZX' diag(t) ZY
    y'H^-1 y = yy - sum_b t_b ZY_b^2
    b = (X'H^-1 X)^-1 X'H^-1 y,        RSS_H = y'H^-1 y - b' X'H^-1 y

limma's ``gls.series`` whitens with ``C`` itself (a correlation matrix), so its
``stdev_unscaled`` is ``sqrt((1 - rho) diag((X'H^-1 X)^-1))`` and its
``sigma^2`` is ``RSS_H / ((1 - rho)(n - p))``.  Array weights ``w`` multiply the
rows of ``X`` and ``Y`` by ``sqrt(w)`` before the statistics are formed (``Z`` is
left alone, as ``V = W^-1/2 C W^-1/2``).  OLS is ``g = 0``.

Gene-specific weights (or missing values) give every gene its own statistics;
they are formed for chunks of genes with ``einsum`` (:func:`gls_per_gene`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special
from scipy import stats as sps

__all__ = [
    "GeneWiseFit",
    "block_indicator",
    "ones_coefficients",
    "gls_shared",
    "gls_per_gene",
    "block_correlation_per_gene",
    "statmod_block_correlation",
    "trigamma_inverse",
    "fit_f_dist",
    "tmixture",
]

_WEIGHT_TOL = 1e-15
_CHUNK_BUDGET = 4_000_000


@dataclass
class GeneWiseFit:
    """Per-gene least-squares output (genes in rows), limma's definitions."""

    coefficients: np.ndarray    # (G, p)
    stdev_unscaled: np.ndarray  # (G, p)
    sigma: np.ndarray           # (G,)
    df_residual: np.ndarray     # (G,)
    cov_coefficients: np.ndarray  # (p, p)


def block_indicator(block: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Dense n x q 0/1 indicator of the block labels and the (sorted) level names."""
    uniq, codes = np.unique(np.asarray(block), return_inverse=True)
    Z = np.zeros((codes.size, uniq.size))
    Z[np.arange(codes.size), codes] = 1.0
    return Z, [str(u) for u in uniq]


def ones_coefficients(X: np.ndarray) -> np.ndarray | None:
    """``c`` with ``X c = 1`` if the constant lies in the column space of ``X``, else None.

    A per-gene shift ``y -> y - a 1`` then moves every coefficient estimate
    (OLS or GLS) by ``-a c`` and leaves residuals unchanged, so the statistics
    can be formed from centred data without cancellation in ``yy - b'XY``.
    """
    ones = np.ones(X.shape[0])
    c, *_ = np.linalg.lstsq(X, ones, rcond=None)
    if np.max(np.abs(X @ c - ones)) > 1e-10:
        return None
    return c


def _limma_scaled(XHX: np.ndarray, XHy: np.ndarray, yHy: np.ndarray, rho: float,
                  df: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Coefficients, limma's stdev_unscaled and sigma from the H-weighted statistics.

    ``XHX`` is (p, p) or (G, p, p); ``XHy`` is (G, p); ``yHy`` and ``df`` are (G,).
    Returns also the (possibly per-gene) covariance ``(1 - rho) XHX^-1``.
    """
    inv = np.linalg.inv(XHX)
    inv = 0.5 * (inv + np.swapaxes(inv, -1, -2))
    if inv.ndim == 2:
        b = XHy @ inv
        su = np.broadcast_to(np.sqrt((1.0 - rho) * np.diag(inv)), b.shape).copy()
    else:
        b = np.einsum("gij,gj->gi", inv, XHy)
        su = np.sqrt((1.0 - rho) * np.diagonal(inv, axis1=1, axis2=2))
    rss = np.maximum(yHy - np.sum(b * XHy, axis=1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.where(df > 0, np.sqrt(rss / ((1.0 - rho) * df)), np.nan)
    return b, su, sigma, (1.0 - rho) * inv


def gls_shared(Y: np.ndarray, X: np.ndarray, Z: np.ndarray | None = None, rho: float = 0.0,
               w: np.ndarray | None = None) -> GeneWiseFit:
    """OLS / WLS / block GLS for all genes at once from shared statistics.

    Parameters
    ----------
    Y : ndarray (n, G)
        Expression, samples in rows, no missing values.
    X : ndarray (n, p)
        Full-rank design.
    Z : ndarray (n, q), optional
        Block indicator; ``None`` for OLS.
    rho : float
        Within-block correlation (ignored without ``Z``).
    w : ndarray (n,), optional
        Positive array weights.
    """
    n, p = X.shape
    c = ones_coefficients(X)
    shift = Y.mean(axis=0) if c is not None else np.zeros(Y.shape[1])
    sw = np.ones(n) if w is None else np.sqrt(w)
    Xw = X * sw[:, None]
    Yw = (Y - shift) * sw[:, None]
    # the sufficient statistics
    XX = Xw.T @ Xw
    XY = (Xw.T @ Yw).T                          # G x p
    yy = np.einsum("ng,ng->g", Yw, Yw)
    if Z is None:
        rho = 0.0
        XHX, XHy, yHy = XX, XY, yy
    else:
        g = rho / (1.0 - rho)
        ZX = Z.T @ Xw                           # q x p
        ZY = (Z.T @ Yw).T                       # G x q
        t = g / (1.0 + g * Z.sum(axis=0))       # q
        XHX = XX - ZX.T @ (t[:, None] * ZX)
        XHy = XY - (ZY * t) @ ZX
        yHy = yy - np.sum(t * ZY * ZY, axis=1)
    df = np.full(Y.shape[1], float(n - p))
    b, su, sigma, cov = _limma_scaled(XHX, XHy, yHy, rho, df)
    if c is not None:
        b = b + shift[:, None] * c
    return GeneWiseFit(b, su, sigma, df, cov)


def gls_per_gene(Y: np.ndarray, X: np.ndarray, Z: np.ndarray | None, rho: float,
                 W: np.ndarray) -> GeneWiseFit:
    """Gene-specific weights and/or missing values: per-gene statistics, chunked.

    ``W`` (n, G) holds the weights of every sample and gene; entries that are
    not finite, ``<= 1e-15``, or whose ``Y`` is missing drop that sample for that
    gene (as limma).  Within a chunk of genes, the statistics ``X'W_g X``,
    ``Z'W_g X``, ... are batched with ``einsum``; their cost is O(n p^2) per gene
    instead of O(n p) for the shared path, hence slower.

    Genes whose design becomes rank deficient over their observed samples get
    NaN (limma instead estimates the estimable coefficients).
    """
    n, p = X.shape
    G = Y.shape[1]
    obs = np.isfinite(Y) & np.isfinite(W) & (W > _WEIGHT_TOL)
    Wo = np.where(obs, W, 0.0)
    Y0 = np.where(obs, Y, 0.0)
    c = ones_coefficients(X)
    nobs = obs.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.where(nobs > 0, Y0.sum(axis=0) / np.maximum(nobs, 1), 0.0) if c is not None \
            else np.zeros(G)
    Yc = np.where(obs, Y0 - shift, 0.0)
    q = 0 if Z is None else Z.shape[1]
    g = 0.0 if Z is None else rho / (1.0 - rho)
    coef = np.full((G, p), np.nan)
    su = np.full((G, p), np.nan)
    sigma = np.full(G, np.nan)
    df = (nobs - p).astype(float)
    step = max(1, _CHUNK_BUDGET // max(1, n * (p + q) + q * p + p * p))
    for start in range(0, G, step):
        sl = slice(start, min(G, start + step))
        w = Wo[:, sl].T                                      # g x n
        wy = w * Yc[:, sl].T                                 # g x n
        XX = np.einsum("gn,na,nb->gab", w, X, X, optimize=True)
        XY = wy @ X                                          # g x p
        yy = np.sum(wy * Yc[:, sl].T, axis=1)
        if Z is None:
            XHX, XHy, yHy = XX, XY, yy
        else:
            sw = np.sqrt(w)
            ZX = np.einsum("gn,nq,na->gqa", sw, Z, X, optimize=True)   # Z'W^1/2 X
            ZY = (sw * Yc[:, sl].T) @ Z                                # Z'W^1/2 y, g x q
            m = obs[:, sl].T.astype(float) @ Z               # observed block sizes, g x q
            t = g / (1.0 + g * m)
            XHX = XX - np.einsum("gqa,gq,gqb->gab", ZX, t, ZX, optimize=True)
            XHy = XY - np.einsum("gq,gqa->ga", t * ZY, ZX)
            yHy = yy - np.sum(t * ZY * ZY, axis=1)
        ok = (df[sl] >= 0) & _well_conditioned(XHX)
        if not ok.any():
            continue
        idx = np.flatnonzero(ok)
        b, s_u, sig, _ = _limma_scaled(XHX[idx], XHy[idx], yHy[idx], 0.0 if Z is None else rho,
                                       df[sl][idx])
        rows = np.arange(sl.start, sl.stop)[idx]
        coef[rows] = b + (shift[rows, None] * c if c is not None else 0.0)
        su[rows], sigma[rows] = s_u, sig
    cov = _unweighted_cov(X, Z, rho)
    return GeneWiseFit(coef, su, sigma, np.maximum(df, 0.0), cov)


def _well_conditioned(M: np.ndarray) -> np.ndarray:
    """Per-matrix check that a batch of symmetric p x p matrices is invertible."""
    ev = np.linalg.eigvalsh(M)
    return ev[:, 0] > 1e-10 * np.maximum(ev[:, -1], np.finfo(float).tiny)


def _unweighted_cov(X: np.ndarray, Z: np.ndarray | None, rho: float) -> np.ndarray:
    """``(X' C^-1 X)^-1`` without weights (limma's ``cov.coefficients`` on its per-gene path)."""
    if Z is None:
        return np.linalg.inv(X.T @ X)
    g = rho / (1.0 - rho)
    t = g / (1.0 + g * Z.sum(axis=0))
    ZX = Z.T @ X
    return (1.0 - rho) * np.linalg.inv(X.T @ X - ZX.T @ (t[:, None] * ZX))


# ------------------------------------------- block correlation, gene weights
_GRID = 41
_GOLDEN_STEPS = 60


def _rotated_residuals(Y: np.ndarray, X: np.ndarray, Z: np.ndarray, W: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues ``d`` of ``Q2'ZZ'Q2`` and squared rotated residuals, per gene.

    ``Q2`` (n x (n - p)) spans the residual space of ``W_g^1/2 X`` (gene ``g``'s
    weighted design); ``y`` is weighted too but ``Z`` is not (statmod's
    ``mixedModel2Fit``).  Rotated by the eigenvectors of ``Q2'ZZ'Q2`` the
    residuals are independent with variances ``s_e + s_b d``.
    ``Y`` and ``W`` are (n, g); returns ``d`` and ``u^2``, both (g, n - p).
    """
    p = X.shape[1]
    sw = np.sqrt(W.T)                                           # g x n
    Q, _ = np.linalg.qr(sw[:, :, None] * X[None], mode="complete")
    Q2 = Q[:, :, p:]                                            # g x n x (n-p)
    r = np.einsum("gnk,gn->gk", Q2, sw * Y.T)
    A = np.einsum("gnk,nq->gkq", Q2, Z)
    d, V = np.linalg.eigh(A @ np.swapaxes(A, 1, 2))
    u2 = np.einsum("gkj,gk->gj", V, r) ** 2
    return np.maximum(d, 0.0), u2


def _profile_reml(rho: np.ndarray, d: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """-2 x profile REML log-likelihood (up to a constant) at correlations ``rho`` (g, k)."""
    g = rho / (1.0 - rho)
    v = 1.0 + g[:, :, None] * d[:, None, :]                      # genes x points x (n-p)
    m = d.shape[1]
    return m * np.log(np.mean(u2[:, None, :] / v, axis=2)) + np.sum(np.log(v), axis=2)


def _maximise_reml(d: np.ndarray, u2: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The REML correlation in ``[lo, hi]`` per gene: a grid, then golden sections."""
    G = d.shape[0]
    grid = np.linspace(lo, hi, _GRID)
    crit = _profile_reml(np.broadcast_to(grid, (G, _GRID)), d, u2)
    k = np.argmin(crit, axis=1)
    a = grid[np.maximum(k - 1, 0)]
    b = grid[np.minimum(k + 1, _GRID - 1)]
    phi = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(_GOLDEN_STEPS):
        c, e = b - phi * (b - a), a + phi * (b - a)
        fc, fe = _profile_reml(np.column_stack([c, e]), d, u2).T
        left = fc <= fe
        b = np.where(left, e, b)
        a = np.where(left, a, c)
    return 0.5 * (a + b)


def block_correlation_per_gene(Y: np.ndarray, X: np.ndarray, Z: np.ndarray, W: np.ndarray,
                               lo: float, hi: float = 0.99, method: str = "statmod") -> np.ndarray:
    """Per-gene within-block correlation with gene-specific weights, clipped to ``[lo, hi]``.

    The model of limma's ``duplicateCorrelation`` with weights (statmod's
    ``mixedModel2Fit``): ``sqrt(w) y = sqrt(w) X b + Z u + e`` with
    ``var(u) = s_b I``, ``var(e) = s_e I``, correlation ``s_b / (s_b + s_e)``,
    from the rotated residuals (:func:`_rotated_residuals`), vectorised over the
    genes of a chunk.  ``method="statmod"``: statmod's gamma-GLM iterations,
    stopped after 20 as limma does (:func:`statmod_block_correlation`; limma's
    numbers).  ``method="reml"``: the REML likelihood profiled over ``s_e`` and
    maximised over ``[lo, hi]`` (a grid, then golden sections; for a unimodal
    likelihood the clipped maximiser).

    Parameters
    ----------
    Y, W : ndarray (n, G)
        Expression and positive weights.
    X : ndarray (n, p)
        Design.
    Z : ndarray (n, q)
        Block indicator.
    lo, hi : float
        Bounds of the correlation (limma: ``1 / (1 - max block size) + 0.01`` and 0.99).
    method : {"statmod", "reml"}

    Returns
    -------
    ndarray (G,)
        Correlations; NaN for genes with no residual variation.
    """
    n, G = Y.shape
    rho = np.full(G, np.nan)
    step = max(1, _CHUNK_BUDGET // (4 * n * n))
    for start in range(0, G, step):
        sl = slice(start, min(G, start + step))
        d, u2 = _rotated_residuals(Y[:, sl], X, Z, W[:, sl])
        ok = np.mean(u2, axis=1) > 0
        if not ok.any():
            continue
        rows = np.arange(sl.start, sl.stop)[ok]
        if method == "statmod":
            rho[rows] = np.clip(statmod_block_correlation(d[ok], u2[ok]), lo, hi)
        else:
            rho[rows] = _maximise_reml(d[ok], u2[ok], lo, hi)
    return rho


def _gamma_deviance(y: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """statmod's gamma deviance per row (``inf`` where a fitted value is negative)."""
    skip = (y < 1e-15) & (mu < 1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(skip, 0.0, (y - mu) / mu - np.log(y / mu))
    dev = 2.0 * np.sum(term, axis=1)
    return np.where(np.any(mu < 0, axis=1), np.inf, dev)


def _glmgam_identity(d: np.ndarray, y: np.ndarray, beta: np.ndarray, tol: float,
                     maxit: int) -> np.ndarray:
    """statmod's ``glmgam.fit`` (gamma GLM, identity link, Levenberg damping), row-wise.

    The model is ``E y = beta_0 + beta_1 d`` for every row (gene) of ``d`` and
    ``y``; the iteration, its damping schedule, variance floor and stopping
    rules are statmod's, step for step, vectorised over the rows.
    """
    G = y.shape[0]
    X = np.stack([np.ones_like(d), d], axis=2)                       # (G, m, 2)
    mu = np.einsum("gmk,gk->gm", X, beta)
    dev = _gamma_deviance(y, mu)
    lam = np.zeros(G)
    active = np.ones(G, dtype=bool)
    eye = np.eye(2)
    for it in range(1, maxit + 2):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        v = mu[idx] ** 2
        v = np.maximum(v, np.max(v, axis=1, keepdims=True) / 1e3)
        Xi = X[idx]
        XVX = np.einsum("gmk,gm,gml->gkl", Xi, 1.0 / v, Xi)
        maxinfo = np.max(np.diagonal(XVX, axis1=1, axis2=2), axis=1)
        if it == 1:
            lam[idx] = np.abs(np.mean(np.diagonal(XVX, axis1=1, axis2=2), axis=1)) / 2.0
        dl = np.einsum("gmk,gm->gk", Xi, (y[idx] - mu[idx]) / v)
        beta_old, dev_old = beta[idx].copy(), dev[idx].copy()
        lev = np.zeros(idx.size, dtype=np.int64)
        dbeta = np.zeros((idx.size, 2))
        damping = np.ones(idx.size, dtype=bool)                        # inner loop running
        too_much = np.zeros(idx.size, dtype=bool)
        new_beta, new_mu, new_dev = beta_old.copy(), mu[idx].copy(), dev_old.copy()
        while damping.any():
            j = np.flatnonzero(damping)
            lev[j] += 1
            step = np.linalg.solve(XVX[j] + lam[idx[j], None, None] * eye, dl[j][:, :, None])[..., 0]
            b = beta_old[j] + step
            m = np.einsum("gmk,gk->gm", Xi[j], b)
            dv = _gamma_deviance(y[idx[j]], m)
            dbeta[j], new_beta[j], new_mu[j], new_dev[j] = step, b, m, dv
            with np.errstate(divide="ignore", invalid="ignore"):
                done = (dv <= dev_old[j]) | (dv / np.max(m, axis=1) < 1e-15)
            over = ~done & (lam[idx[j]] / maxinfo[j] > 1e15)
            new_beta[j[over]] = beta_old[j[over]]
            too_much[j[over]] = True
            lam[idx[j[~done & ~over]]] *= 2.0
            damping[j[done | over]] = False
        beta[idx], mu[idx], dev[idx] = new_beta, new_mu, new_dev
        stop = too_much | (lam[idx] / maxinfo > 1e15)
        lam[idx[(lev == 1) & ~stop]] /= 10.0
        with np.errstate(divide="ignore", invalid="ignore"):
            stop |= (np.sum(dl * dbeta, axis=1) < tol) | (new_dev / np.max(new_mu, axis=1) < 1e-15)
        stop |= it > maxit
        active[idx[stop]] = False
    return beta


def statmod_block_correlation(d: np.ndarray, u2: np.ndarray, maxit: int = 20,
                              tol: float = 1e-6) -> np.ndarray:
    """Per-gene within-block correlation as limma computes it (statmod's ``mixedModel2Fit``).

    ``d`` and ``u2`` are the eigenvalues and squared rotated residuals of
    :func:`_rotated_residuals` (any orthonormal basis gives the same numbers).
    The variance components ``(s_e, s_b)`` are the gamma GLM ``E u2 = s_e + s_b d``:
    least squares first, then -- when there are more than two residual degrees
    of freedom and ``d`` varies -- statmod's ``glmgam.fit`` from there (or from
    ``(mean(u2), 0)`` if the least-squares fit is negative somewhere), stopped
    after ``maxit`` iterations as limma's ``duplicateCorrelation`` asks.  Returns
    ``s_b / (s_e + s_b)``, unclipped (NaN where not estimable).
    """
    G, m = u2.shape
    X = np.stack([np.ones_like(d), d], axis=2)
    with np.errstate(all="ignore"):
        XtX = np.einsum("gmk,gml->gkl", X, X)
        Xty = np.einsum("gmk,gm->gk", X, u2)
        ls = np.full((G, 2), np.nan)
        okls = np.abs(np.linalg.det(XtX)) > 1e-300
        ls[okls] = np.linalg.solve(XtX[okls], Xty[okls][:, :, None])[..., 0]
    fitted = np.einsum("gmk,gk->gm", X, np.where(np.isfinite(ls), ls, 0.0))
    varies = (m > 2) & (np.sum(np.abs(d) > 1e-15, axis=1) > 1) & (np.var(d, axis=1, ddof=1) > 1e-15)
    coef = ls.copy()
    glm = np.flatnonzero(varies & okls & (np.max(u2, axis=1) > 0))
    if glm.size:
        start = np.where(np.all(fitted[glm] >= 0, axis=1)[:, None], ls[glm],
                         np.column_stack([u2[glm].mean(axis=1), np.zeros(glm.size)]))
        coef[glm] = _glmgam_identity(d[glm], u2[glm], start.copy(), tol, maxit)
    zero = varies & okls & (np.max(u2, axis=1) == 0)
    coef[zero] = 0.0
    with np.errstate(all="ignore"):
        return coef[:, 1] / (coef[:, 0] + coef[:, 1])


# ----------------------------------------------------------- empirical Bayes
def trigamma_inverse(x: np.ndarray) -> np.ndarray:
    """Solve ``trigamma(y) = x`` for ``y > 0`` (Newton's method on ``1 / trigamma``).

    Large ``x`` uses ``1 / sqrt(x)``, small ``x`` uses ``1 / x`` (limma's
    asymptotes); negative ``x`` gives NaN.
    """
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.full_like(x, np.nan)
    big, small = x > 1e7, (x < 1e-6) & (x >= 0)
    y[big] = 1.0 / np.sqrt(x[big])
    with np.errstate(divide="ignore"):
        y[small] = 1.0 / x[small]
    mid = np.isfinite(x) & (x >= 1e-6) & (x <= 1e7)
    if mid.any():
        xm = x[mid]
        ym = 0.5 + 1.0 / xm
        for _ in range(50):
            tri = special.polygamma(1, ym)
            dif = tri * (1.0 - tri / xm) / special.polygamma(2, ym)
            ym = ym + dif
            if np.max(-dif / ym) < 1e-8:
                break
        y[mid] = ym
    return y


def _logmdigamma(x: np.ndarray) -> np.ndarray:
    return np.log(x) - special.digamma(x)


def natural_spline_basis(x: np.ndarray, df: int, knots: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """A basis of the natural cubic splines of R's ``ns(x, df, intercept=TRUE)``.

    Knots (unless given): the range of ``x`` and ``df - 2`` interior knots at
    equally spaced quantiles.  Any basis of this space gives the same
    least-squares fit, so a truncated-power basis with the natural (linear
    beyond the boundary knots) constraints is used.  Returns the basis and the
    knots (to evaluate the same basis at other points).
    """
    x = np.asarray(x, dtype=float)
    if knots is None:
        n_int = df - 2
        interior = (np.quantile(x, np.linspace(0.0, 1.0, n_int + 2)[1:-1]) if n_int > 0
                    else np.empty(0))
        knots = np.concatenate([[np.min(x)], interior, [np.max(x)]])
    lo, hi = float(knots[0]), float(knots[-1])
    cols = [np.ones_like(x), x]
    K = knots.size
    if K > 2:
        span = (hi - lo) or 1.0

        def d(k: int) -> np.ndarray:
            return (np.maximum(x - knots[k], 0.0) ** 3 - np.maximum(x - knots[-1], 0.0) ** 3) / (
                (knots[-1] - knots[k]) * span**2)

        last = d(K - 2)
        cols += [d(k) - last for k in range(K - 2)]
    return np.column_stack(cols), knots


def fit_f_dist(x: np.ndarray, df1: np.ndarray, covariate: np.ndarray | None = None
               ) -> tuple[np.ndarray | float, float]:
    """Moment fit of a scaled F distribution to sample variances (limma's fitFDist).

    ``x ~ s0^2 F(df1, d0)``: on the log scale ``e = log x - digamma(df1/2) +
    log(df1/2)`` has mean ``log s0^2 - digamma(d0/2) + log(d0/2)`` and variance
    ``trigamma(df1/2) + trigamma(d0/2)``, inverted with :func:`trigamma_inverse`.
    With a covariate the mean is a natural-spline trend.

    Returns
    -------
    scale : float or ndarray
        Prior variance ``s0^2`` (per gene with a covariate).
    df2 : float
        Prior degrees of freedom ``d0`` (``inf`` when the variances are less
        dispersed than chi-square alone explains).
    """
    x = np.asarray(x, dtype=float)
    df1 = np.broadcast_to(np.asarray(df1, dtype=float), x.shape)
    n = x.size
    ok = np.isfinite(df1) & (df1 > 1e-15) & np.isfinite(x) & (x > -1e-15)
    nok = int(ok.sum())
    if nok == 0:
        return np.nan, np.nan
    if nok == 1:
        return float(x[ok][0]), 0.0
    xo, d1 = np.maximum(x[ok], 0.0), df1[ok]
    med = np.median(xo)
    if med == 0:
        med = 1.0
    xo = np.maximum(xo, 1e-5 * med)
    e = np.log(xo) + _logmdigamma(d1 / 2)
    splinedf = 0
    if covariate is not None:
        cov = np.asarray(covariate, dtype=float)
        splinedf = min(1 + int(nok >= 3) + int(nok >= 6) + int(nok >= 30),
                       np.unique(cov[ok]).size)
    if splinedf >= 2:
        B, knots = natural_spline_basis(cov[ok], splinedf)
        coef, *_ = np.linalg.lstsq(B, e, rcond=None)
        fitted = B @ coef
        rank = np.linalg.matrix_rank(B)
        emean = natural_spline_basis(cov, splinedf, knots)[0] @ coef
        emean[ok] = fitted
        evar = float(np.sum((e - fitted) ** 2) / (nok - rank))
    else:
        emean = float(np.mean(e))
        evar = float(np.var(e, ddof=1))
    evar -= float(np.mean(special.polygamma(1, d1 / 2)))
    if evar > 0:
        df2 = float(2.0 * trigamma_inverse(evar)[0])
        s20 = np.exp(emean - _logmdigamma(df2 / 2))
    else:
        df2 = np.inf
        s20 = np.exp(emean) if splinedf >= 2 else float(np.mean(xo))
    if covariate is not None and splinedf < 2:
        s20 = np.full(n, s20)
    return s20, df2


def tmixture(tstat: np.ndarray, stdev_unscaled: np.ndarray, df: np.ndarray, proportion: float,
             v0_lim: tuple[float, float] | None = None) -> np.ndarray:
    """Prior variance ``v0`` of the non-zero coefficients, per column (limma's tmixture).

    The top ``ceil(proportion / 2 * G)`` ``|t|`` of each coefficient are matched to
    the order statistics of the mixture ``(1 - p) t_df + p sqrt(1 + v0 / v1) t_df``.
    Statistics with fewer df are first mapped to the largest df by tail area.
    """
    G, k = tstat.shape
    out = np.full(k, np.nan)
    for j in range(k):                       # a loop over coefficients, not genes
        tj, vj = tstat[:, j], stdev_unscaled[:, j]
        dj = np.broadcast_to(df, (G,))
        keep = ~np.isnan(tj)
        tj, vj, dj = np.abs(tj[keep]), vj[keep], dj[keep].astype(float)
        ng = tj.size
        ntarget = int(np.ceil(proportion / 2 * ng))
        if ntarget < 1:
            continue
        p = max(ntarget / ng, proportion)
        maxdf = float(np.max(dj))
        low = dj < maxdf
        if low.any():
            tj = tj.copy()
            tj[low] = sps.t.isf(np.exp(sps.t.logsf(tj[low], dj[low])), maxdf)
        order = np.argsort(-tj, kind="stable")[:ntarget]
        tt, v1 = tj[order], vj[order] ** 2
        r = np.arange(1, ntarget + 1)
        p0 = 2.0 * sps.t.sf(tt, maxdf)
        ptarget = ((r - 0.5) / ng - (1.0 - p) * p0) / p
        v0 = np.zeros(ntarget)
        pos = ptarget > p0
        if pos.any():
            qtarget = sps.t.isf(ptarget[pos] / 2, maxdf)
            v0[pos] = v1[pos] * ((tt[pos] / qtarget) ** 2 - 1.0)
        if v0_lim is not None:
            v0 = np.clip(v0, v0_lim[0], v0_lim[1])
        out[j] = float(np.mean(v0))
    return out
