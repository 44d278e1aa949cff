"""Batched fit: sufficient statistics in, per-gene variance estimates out.

Chooses the optimiser for the ratio models (the eigen path for one component,
FLASHMM's scoring when negative variances are allowed; several components and
random slopes go to the structured engine, :mod:`flashmm._structure`), flags genes
that cannot be fitted, and returns plain arrays: the numerical core never sees
pandas.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

from ._errors import ConvergenceWarning
from ._fit_eigen import EigenCriterion, fit_ratio_eigen
from ._fit_scoring import ScoringProblem, fisher_scoring
from ._gls import logdet_ratio
from ._memory import MemoryBudget
from ._reduce import Reduced, reduce_stats
from .stats import SufficientStats

__all__ = ["EngineFit", "fit_variance_ratios", "STATUS_OK"]

STATUS_OK = "ok"
STATUS_ALL_ZERO = "all zero"
STATUS_EXACT = "no residual variance (constant or fitted exactly)"


@dataclass
class EngineFit:
    """Per-gene output of the variance optimisation (genes in rows)."""

    ratios: np.ndarray      # (G, k)  s_i / s
    scale: np.ndarray       # (G,)    residual variance s
    llf: np.ndarray         # (G,)    lme4/statsmodels log-likelihood
    converged: np.ndarray   # (G,)
    n_iter: np.ndarray      # (G,)
    status: np.ndarray      # (G,) str
    reml: bool
    method: str             # "eigen", "newton" or "flashmm-scoring"
    se_theta: np.ndarray | None = None  # FLASHMM's se(theta) (scoring only)
    # (G,) variance of the single component where the fit is at h2 = 1 (ratio inf,
    # residual variance 0): the limit of ratio * scale; NaN elsewhere
    top_vcomp: np.ndarray | None = None


def _degenerate_status(stats: SufficientStats, yRy: np.ndarray) -> np.ndarray:
    """Genes that have nothing to fit: all zero, or zero residual ``yRy`` after X."""
    status = np.full(stats.n_genes, STATUS_OK, dtype=object)
    allzero = stats.yy <= 0.0
    exact = yRy <= 1e-12 * np.maximum(stats.yy, np.finfo(float).tiny)
    status[exact] = STATUS_EXACT
    status[allzero] = STATUS_ALL_ZERO
    return status


def fit_variance_ratios(
    stats: SufficientStats,
    reml: bool = True,
    tol: float = 1e-10,
    maxiter: int = 200,
    allow_negative_variance: bool = False,
    scoring_epsilon: float = 1e-5,
    scoring_maxiter: int = 50,
    max_memory: int | float | str | None = None,
) -> EngineFit:
    """Estimate the variance ratios of every gene; see the module docstring.

    Except for FLASHMM's scoring (whose stopping rule is on the absolute scale
    and is reproduced as is), every gene is first rescaled by
    ``c = sqrt(yy / n)`` so that the optimiser and the log-likelihood work at
    unit scale whatever the units of ``y`` (1e-150 or 1e150): the ratios are
    scale-free, the residual variance is multiplied back by ``c**2`` and the
    log-likelihood shifted by ``-m log c`` (``m = n - p`` for REML, ``n`` for ML).

    Genes that could not be fitted (all zero, no residual variance; see
    ``status``) and genes that did not converge are each reported with one
    aggregated :class:`~flashmm.ConvergenceWarning`.
    """
    c = None if allow_negative_variance else _gene_scale(stats)
    orig = stats
    if c is not None:
        stats = dataclasses.replace(stats, XY=stats.XY / c, ZY=stats.ZY / c, yy=stats.yy / (c * c))
    red = reduce_stats(stats)
    status = _degenerate_status(stats, red.yRy)
    ok = np.flatnonzero(status == STATUS_OK)
    G, k = stats.n_genes, len(stats.components)
    m = red.n - red.p if reml else red.n
    ratios = np.full((G, k), np.nan)
    converged = np.zeros(G, dtype=bool)
    n_iter = np.zeros(G, dtype=np.int64)
    E = np.eye(k)[stats.component_index]
    se_theta = None
    q = stats.k_re
    if allow_negative_variance:
        method = "flashmm-scoring"
        per_gene = 8 * q * q * (6 + 2 * k)       # I + ZRZ G, I + G W, solutions, FIM blocks
        size = MemoryBudget.of(max_memory).genes_per_chunk(
            8 * 3 * q * q, per_gene, 1, what=f"FLASHMM's scoring with {q} random effects",
            advice="It works with dense q x q matrices per gene (as R FLASHMM); raise max_memory "
                   "or fit without allow_negative_variance (the structured engine).",
            target=max(1, 64_000_000 // per_gene))
        prob = ScoringProblem(red.ZRZ, red.ZRy[:, ok].T, red.yRy[ok],
                              red.ZRZ if reml else stats.ZZ, E, m, red.n - red.p)
        se_theta = np.full((G, k + 1), np.nan)
        for a in range(0, ok.size, size):
            rows = np.arange(a, min(ok.size, a + size))
            res = fisher_scoring(prob.subset(rows), scoring_epsilon, scoring_maxiter)
            idx = ok[rows]
            ratios[idx] = res.theta[:, :k] / res.theta[:, k:]
            converged[idx], n_iter[idx] = res.converged, res.n_iter
            se_theta[idx] = np.sqrt(np.abs(np.diagonal(np.linalg.pinv(res.fim), axis1=1, axis2=2)))
    elif k == 1:
        method = "eigen"
        MemoryBudget.of(max_memory).genes_per_chunk(
            8 * 5 * q * q, 8 * 8 * q, 1, what=f"the eigen path with {q} random effects",
            advice="Raise max_memory.", target=1)
        crit = EigenCriterion.from_matrices(red.ZRZ, red.ZRy[:, ok], red.yRy[ok], stats.ZZ, reml, m)
        res = fit_ratio_eigen(crit, tol=tol, maxiter=maxiter)
        ratios[ok], converged[ok], n_iter[ok] = res.g, res.converged, res.n_iter
    else:
        raise ValueError("several random components are fitted by the structured engine "
                         "(MultiGeneMixedLM.fit); fit_variance_ratios takes one component or "
                         "allow_negative_variance=True.")
    top = np.isinf(ratios[:, 0]) if k == 1 else np.zeros(G, dtype=bool)
    scale, llf = _scale_and_llf(stats, red, np.where(top[:, None], 0.0, ratios), reml, ok)
    top_vcomp = _top_limit_fit(stats, red, reml, top, scale, llf) if top.any() else None
    if c is not None:
        scale = scale * (c * c)
        llf = llf - m * np.log(c)
        top_vcomp = None if top_vcomp is None else top_vcomp * (c * c)
    _warn_degenerate(status)
    _warn_not_converged(converged[ok], orig.n_genes)
    return EngineFit(ratios, scale, llf, converged, n_iter, status.astype(str), reml, method, se_theta,
                     top_vcomp)


def _top_limit_fit(stats: SufficientStats, red: Reduced, reml: bool, top: np.ndarray,
                   scale: np.ndarray, llf: np.ndarray) -> np.ndarray:
    """Fill residual variance 0 and the limit log-likelihood of the genes at ``h2 = 1``.

    Returns the variance of the component there (``lim g S(g) / m``), NaN elsewhere.
    """
    idx = np.flatnonzero(top)
    m = red.n - red.p if reml else red.n
    crit = EigenCriterion.from_matrices(red.ZRZ, red.ZRy[:, idx], red.yRy[idx], stats.ZZ, reml, m)
    f_top, cc = crit.top_limit()
    scale[idx] = 0.0
    llf[idx] = -0.5 * (m * (1.0 + np.log(2.0 * np.pi / m)) + f_top
                       + (red.logdet_XX if reml else 0.0))
    out = np.full(stats.n_genes, np.nan)
    out[idx] = cc / m
    return out


def _gene_scale(stats: SufficientStats) -> np.ndarray:
    """Per-gene rescaling factor ``sqrt(yy / n)`` (1 where it is 0 or not finite)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        c = np.sqrt(stats.yy / max(int(stats.n), 1))
    return np.where(np.isfinite(c) & (c > 0), c, 1.0)


def _warn_degenerate(status: np.ndarray) -> None:
    """One aggregated warning for all genes that could not be fitted, counted by status."""
    bad = status[status != STATUS_OK].astype(str)
    if bad.size:
        kinds, counts = np.unique(bad, return_counts=True)
        what = ", ".join(f"{c} {k}" for k, c in zip(kinds, counts, strict=True))
        warnings.warn(
            f"{bad.size} of {status.size} genes could not be fitted: {what}; their estimates "
            "are NaN, see results.status.",
            ConvergenceWarning,
            stacklevel=4,   # the caller of MultiGeneMixedLM.fit
        )


def _warn_not_converged(converged: np.ndarray, n_genes: int) -> None:
    """One aggregated warning for all genes that did not converge."""
    bad = int(np.sum(~converged))
    if bad:
        warnings.warn(
            f"{bad} of {n_genes} genes did not converge; see results.converged "
            "(try a larger maxiter).",
            ConvergenceWarning,
            stacklevel=3,
        )


def quadratic_form(red: Reduced, gdiag: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """``S = yRy - ZRy' G (I + ZRZ G)^-1 ZRy`` at per-effect ratios (any sign)."""
    q = red.ZRZ.shape[0]
    out = np.empty(genes.size)
    step = max(1, 4_000_000 // max(1, q * q))
    for s in range(0, genes.size, step):
        idx = genes[s:s + step]
        gd = gdiag[s:s + step]
        A = np.eye(q)[None] + red.ZRZ[None] * gd[:, None, :]
        r = red.ZRy[:, idx].T
        a = np.linalg.solve(A, r[:, :, None])[:, :, 0]
        out[s:s + step] = red.yRy[idx] - np.sum(gd * r * a, axis=1)
    return out


def _quad_and_logdet(stats: SufficientStats, red: Reduced, ratios: np.ndarray, reml: bool,
                     ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``S`` and the log-determinant term at the given ratios (genes ``ok``)."""
    if len(stats.components) == 1:
        m = red.n - red.p if reml else red.n
        crit = EigenCriterion.from_matrices(red.ZRZ, red.ZRy[:, ok], red.yRy[ok], stats.ZZ, reml, m)
        g = ratios[ok, 0]
        return crit.S(g), np.sum(np.log(np.abs(1.0 + g[:, None] * crit.det_eigs)), axis=1)
    gdiag = ratios[ok][:, stats.component_index]
    return quadratic_form(red, gdiag, ok), logdet_ratio(red.ZRZ if reml else stats.ZZ, gdiag)


def _scale_and_llf(stats: SufficientStats, red: Reduced, ratios: np.ndarray, reml: bool,
                   ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Profiled residual variance and the standard log-likelihood per gene."""
    G = stats.n_genes
    scale = np.full(G, np.nan)
    llf = np.full(G, np.nan)
    if ok.size == 0:
        return scale, llf
    S, logdet = _quad_and_logdet(stats, red, ratios, reml, ok)
    m = red.n - red.p if reml else red.n
    s = S / m
    if reml:
        logdet = logdet + red.logdet_XX
    scale[ok] = s
    llf[ok] = -0.5 * (m * (1.0 + np.log(2.0 * np.pi * s)) + logdet)
    return scale, llf
