"""Fit and results of a mixed model with per-observation, per-gene precision weights.

:func:`fit_weighted` runs :mod:`flashmm._fit_weighted` over chunks of genes
sized by the memory budget; :class:`WeightedMixedLMResults` serves the
estimates, standard errors and Satterthwaite df of that fit through the usual
results interface.  Everything that needs the unweighted shared statistics and
has no weighted counterpart here (profile intervals, ``ranova``, saving) is
refused with an explanation rather than computed from the wrong statistics.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from ._df_method import check_df_method
from ._engine import (
    STATUS_ALL_ZERO,
    STATUS_EXACT,
    STATUS_OK,
    EngineFit,
    _warn_degenerate,
    _warn_not_converged,
)
from ._fit_weighted import (
    WeightedCriterion,
    WeightedFitPieces,
    dense_bytes_per_gene,
    fit_weighted_genes,
    is_diagonal,
    schur_split,
)
from ._gls import GLSEstimates
from ._kenward_roger import KRPieces, kr_pieces_per_gene
from ._memory import MemoryBudget
from ._structure import check_identifiable
from ._weighted_stats import WeightedStats
from .results import MultiGeneMixedLMResults, _safe_inv

__all__ = ["WeightedMixedLMResults", "fit_weighted"]


@dataclasses.dataclass
class WeightedEngineFit(EngineFit):
    """:class:`EngineFit` plus the per-gene GLS and inference pieces of the weighted fit."""

    pieces: WeightedFitPieces | None = None


def _status(ws: WeightedStats, S0: np.ndarray) -> np.ndarray:
    status = np.full(ws.n_genes, STATUS_OK, dtype=object)
    status[S0 <= 1e-12 * np.maximum(ws.yy, np.finfo(float).tiny)] = STATUS_EXACT
    status[ws.yy <= 0.0] = STATUS_ALL_ZERO
    return status


def _weighted_rss(ws: WeightedStats) -> np.ndarray:
    """``y'Wy - (X'Wy)'(X'WX)^-1 X'Wy`` per gene (zero: nothing left to fit)."""
    b = np.linalg.solve(ws.XX, ws.XY[:, :, None])[:, :, 0]
    return ws.yy - np.einsum("ga,ga->g", ws.XY, b)


def fit_weighted(model: Any, reml: bool = True, start_params: Any = None, maxiter: int = 200,
                 tol: float = 1e-10, df_method: str = "satterthwaite",
                 max_memory: int | float | str | None = None) -> WeightedMixedLMResults:
    """Fit every gene of a weighted model (see :mod:`flashmm._fit_weighted`)."""
    df_method = check_df_method(df_method, reml)
    ws: WeightedStats = model.weighted
    G, p, q = ws.n_genes, ws.k_fe, ws.k_re
    k = len(model.stats.components)
    if k > 1:                      # as the unweighted structured engine: separable components
        check_identifiable(model.stats.components, model.stats.ZZ, model.stats.ZX,
                           model.stats.XX)
    split = schur_split(ws)
    per_gene = dense_bytes_per_gene(q, p, k, is_diagonal(ws),
                                    None if split is None else split[1].size)
    size = MemoryBudget.of(max_memory).genes_per_chunk(
        0, per_gene, 1,
        what=f"the weighted mixed model with {q} random effects",
        advice="Per-gene weights need dense q x q matrices per gene (O(q^2) memory, O(q^3) "
               "time); raise max_memory, or aggregate to fewer random-effect levels.",
        target=max(1, 50_000_000 // per_gene))
    with np.errstate(all="ignore"):
        c = np.sqrt(ws.yy / ws.n)
    c = np.where(np.isfinite(c) & (c > 0), c, 1.0)
    wsc = ws.scaled(c)
    status = _status(wsc, _weighted_rss(wsc))
    ok = np.flatnonzero(status == STATUS_OK)
    out = _empty_pieces(G, k, p, q)
    start = None if start_params is None else np.asarray(start_params, dtype=float)
    # stacks of small matrices: multi-threaded BLAS only adds contention (10x slower
    # on a loaded 2-core machine, measured with benchmarks/bench_weighted.py)
    with threadpool_limits(limits=1, user_api="blas"):
        for a in range(0, ok.size, size):
            idx = ok[a:a + size]
            crit = WeightedCriterion(wsc, reml, idx)
            st = None if start is None else (start if start.ndim == 1 else start[idx])
            part = fit_weighted_genes(crit, c[idx], tol, maxiter, st)
            for f in dataclasses.fields(WeightedFitPieces):
                getattr(out, f.name)[idx] = getattr(part, f.name)
    _warn_degenerate(status)
    _warn_not_converged(out.converged[ok], G)
    fit = WeightedEngineFit(ratios=out.ratios, scale=out.scale, llf=out.llf,
                            converged=out.converged, n_iter=out.n_iter,
                            status=status.astype(str), reml=reml, method="weighted-newton",
                            pieces=out)
    return WeightedMixedLMResults(model, fit, df_method=df_method)


def _empty_pieces(G: int, k: int, p: int, q: int) -> WeightedFitPieces:
    nan = np.nan
    return WeightedFitPieces(
        ratios=np.full((G, k), nan), scale=np.full(G, nan), llf=np.full(G, nan),
        converged=np.zeros(G, dtype=bool), n_iter=np.zeros(G, dtype=np.int64),
        fe_params=np.full((G, p), nan), cov_unscaled=np.full((G, p, p), nan),
        blup=np.full((G, q), nan), condvar_unscaled=np.full((G, q), nan),
        info=np.full((G, k + 1, k + 1), nan), dcov=np.full((G, k, p, p), nan))


class WeightedMixedLMResults(MultiGeneMixedLMResults):
    """Results of a :class:`~flashmm.MultiGeneMixedLM` fitted with ``weights=``.

    The same interface as :class:`~flashmm.MultiGeneMixedLMResults` (estimates,
    ``bse_fe``, Satterthwaite df, ``t_test``, ``wald_test``, ``anova``,
    ``summary``, random effects).  Refused, because they need statistics the
    weighted fit does not keep: profile intervals (``conf_int_re``), ``ranova``,
    ``save``, residuals of new data (``resid_for``).  Kenward-Roger uses the
    weighted model's own covariance ``s W^-1 + Z Psi Z'`` (pbkrtest's
    ``vcovAdj`` would take the residual covariance to be the identity and
    ignore lmer's weights).  ``scale`` is the residual
    variance of an observation of weight 1 (lme4's ``sigma^2``).  ``stats``
    holds the unweighted statistics (names, design, term structure); the
    per-gene weighted ones are ``model.weighted``.
    """

    saved_engine: str | None = None
    _fit: WeightedEngineFit

    @property
    def _pieces(self) -> WeightedFitPieces:
        assert self._fit.pieces is not None
        return self._fit.pieces

    @cached_property
    def _reduced(self) -> Any:
        raise NotImplementedError("a weighted fit has no shared reduced statistics.")

    @cached_property
    def _gls(self) -> GLSEstimates:
        pc = self._pieces
        return GLSEstimates(pc.fe_params, pc.cov_unscaled, pc.blup,
                            np.full(self.n_genes, np.nan), pc.condvar_unscaled)

    @cached_property
    def _unit_scale(self) -> tuple[Any, np.ndarray, np.ndarray]:
        scale = self._fit.scale
        c2 = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        return None, scale / c2, c2

    @cached_property
    def _info(self) -> np.ndarray:
        return self._pieces.info

    def _satterthwaite(self, L: np.ndarray) -> np.ndarray:
        """lmerTest's Satterthwaite df (unit scale; components at 0 left out)."""
        pc = self._pieces
        k = pc.ratios.shape[1]
        Lg = np.broadcast_to(L, (self.n_genes,) + L.shape[-2:])
        v = np.einsum("gra,gab,grb->gr", Lg, pc.cov_unscaled, Lg)
        grad = np.empty((self.n_genes, L.shape[-2], k + 1))
        grad[:, :, :k] = np.einsum("gra,giab,grb->gri", Lg, pc.dcov, Lg)
        grad[:, :, k] = v
        free = np.concatenate([pc.ratios > 0, np.ones((self.n_genes, 1), dtype=bool)], axis=1)
        info = np.where(free[:, :, None] & free[:, None, :], pc.info, 0.0)
        diag = np.arange(k + 1)
        info[:, diag, diag] = np.where(free, info[:, diag, diag], 1.0)
        A = _safe_inv(info) * (free[:, :, None] & free[:, None, :])
        with np.errstate(all="ignore"):
            df = 2.0 * v * v / np.einsum("gri,gij,grj->gr", grad, A, grad)
        return np.where(self._usable[:, None], df, np.nan)

    @cached_property
    def _kr(self) -> KRPieces:
        """Kenward-Roger pieces from the per-gene weighted statistics (unit scale).

        See :func:`flashmm._kenward_roger.kr_pieces_per_gene`: the unweighted
        adjustment of ``W^1/2 y``, whose residual covariance is the identity.
        """
        ws: WeightedStats = self.model.weighted
        G, p, k = self.n_genes, self.k_fe, len(self.component_names) + 1
        out = KRPieces(np.full((G, p, p), np.nan), np.full((G, p, p), np.nan),
                       np.full((G, k, p, p), np.nan), np.full((G, k, k), np.nan))
        with np.errstate(invalid="ignore"):
            lam = np.sqrt(self._fit.ratios)[:, ws.component_index]
        ok = np.flatnonzero(self._usable & np.all(np.isfinite(lam), axis=1))
        if ok.size:
            with threadpool_limits(limits=1, user_api="blas"):
                got = kr_pieces_per_gene(lambda idx: ws.dense_ZZ(ok[idx]), ws.ZX[ok], ws.XX[ok],
                                         ws.n, lam[ok], ws.component_index)
            for name in ("cov", "cov_adj", "P", "W"):
                getattr(out, name)[ok] = getattr(got, name)
        return out

    # ------------------------------------------------------------- refused

    def conf_int_re(self, *args: Any, **kwargs: Any) -> pd.DataFrame:
        """Not available with weights (the profile needs the unweighted shared statistics)."""
        raise NotImplementedError("profile intervals of the variance parameters are not "
                                  "available for a weighted fit; use bse_re / se_vcomp (Wald).")

    def ranova(self, *args: Any, **kwargs: Any) -> pd.DataFrame:
        """Not available with weights; fit the reduced weighted model and use compare_lr_test."""
        raise NotImplementedError("ranova is not available for a weighted fit; fit the model "
                                  "without the term (with the same weights) and call "
                                  "full.compare_lr_test(reduced).")

    def save(self, path: Any, design: bool = True) -> None:
        """Not available with weights (the results file stores unweighted statistics)."""
        raise NotImplementedError("saving a weighted fit is not supported; save the "
                                  "tables you need (summary_frame(), fe_params, ...) instead.")

    def resid_for(self, *args: Any, **kwargs: Any) -> pd.DataFrame:
        """Not available with weights."""
        raise NotImplementedError("resid_for is not available for a weighted fit; compute "
                                  "endog - results.predict(...) for the genes you need.")

    def __repr__(self) -> str:
        return (f"<WeightedMixedLMResults: {self.n_genes} genes, {self.nobs} samples, "
                f"{self.method}, {int(self.converged.sum())} converged>")
