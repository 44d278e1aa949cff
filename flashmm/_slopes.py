"""Fit and results of the structured engine: random slopes and several variance components.

:func:`fit_structured` analyses the block layout (:mod:`flashmm._structure`), runs
the batched optimiser of :mod:`flashmm._fit_theta` and returns
:class:`RandomSlopesResults`, a :class:`MultiGeneMixedLMResults` whose
covariance parameters are an unstructured (or diagonal) r x r ``Psi`` when
there are random slopes, plus the variance components, named as in
statsmodels.  The design of ``exog_re`` is in :mod:`flashmm._exog_re`.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from ._engine import (
    STATUS_OK,
    EngineFit,
    _degenerate_status,
    _gene_scale,
    _warn_degenerate,
    _warn_not_converged,
)
from ._exog_re import SLOPES_KEY
from ._fit_arrowhead import specialise
from ._fit_theta import (
    ThetaCriterion,
    ThetaGLS,
    ThetaStructure,
    condcov_groups,
    free_parameters,
    gls_theta,
    minimise_theta,
    over_gene_parts,
    satterthwaite_theta,
    thread_count,
    varpar_covariance,
    varpar_information,
)
from ._kenward_roger import KRDesign
from ._memory import MemoryBudget
from ._reduce import residual_ss
from ._structure import analyse_structure, check_identifiable
from .gene import GeneResults, coefficient_table
from .results import MultiGeneMixedLMResults

__all__ = ["fit_structured", "RandomSlopesResults",
           "RandomSlopesGeneResults", "SLOPES_KEY"]


#: lme4's ``isSingular`` tolerance on the bounded thetas.
BOUNDARY_TOL = 1e-4


def cov_param_names(names: list[str], independent: bool) -> list[str]:
    """statsmodels' names of the lower triangle of ``Psi`` (row by row)."""
    ii, jj = _tril_rows(len(names), independent)
    return [f"{names[i]} Var" if i == j else f"{names[j]} x {names[i]} Cov"
            for i, j in zip(ii, jj, strict=True)]


def _tril_rows(r: int, independent: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every estimated entry of ``Psi``'s lower triangle, row by row."""
    pairs = [(i, j) for i in range(r) for j in range(i + 1) if i == j or not independent]
    return (np.array([i for i, _ in pairs], dtype=int), np.array([j for _, j in pairs], dtype=int))


# --------------------------------------------------------------------- fit
@dataclasses.dataclass
class ThetaEngineFit(EngineFit):
    """:class:`EngineFit` plus lme4's ``theta`` per gene and its structure.

    ``ratios`` holds the variance-component ratios followed by nothing else:
    the random-slope covariance is in ``theta`` (``Psi / s = T T'``).
    """

    theta: np.ndarray | None = None
    structure: ThetaStructure | None = None
    criterion: ThetaCriterion | None = None     # on genes divided by gene_scale
    gene_scale: np.ndarray | None = None        # c = sqrt(yy / n) per gene
    workers: int | None = None                  # threads for the per-gene inference


def fit_structured(model: Any, reml: bool = True, start_params: Any = None,
                   maxiter: int = 200, tol: float = 1e-10,
                   df_method: str = "satterthwaite", n_jobs: int | None = None,
                   max_memory: Any = None) -> RandomSlopesResults:
    """Fit every gene through the structured engine (see :mod:`flashmm._fit_theta`).

    Covers random slopes (``exog_re`` / ``re_formula``) and several variance
    components, nested or crossed, in any combination; the block layout of
    ``M`` is chosen by :func:`flashmm._structure.analyse_structure`.

    ``start_params``, if given, is tried in addition to the default starts:
    with random slopes, lme4's ``theta`` (length t or genes x t: the lower
    triangle of ``T`` column by column, then ``sqrt`` of every
    variance-component ratio); otherwise the variance ratios ``s_i / s``
    (length k or genes x k), as for the other optimisers.
    """
    stats = model.stats
    meta = stats.info.get(SLOPES_KEY)
    st = structure_of(stats)
    c = _gene_scale(stats)
    sc = dataclasses.replace(stats, XY=stats.XY / c, ZY=stats.ZY / c, yy=stats.yy / (c * c))
    status = _degenerate_status(sc, residual_ss(sc))
    ok = np.flatnonzero(status == STATUS_OK)
    G, t = stats.n_genes, st.n_theta
    workers = thread_count(n_jobs)
    crit = criterion_of(stats, st, reml, c, max_memory, workers)
    m = crit.m
    theta = np.full((G, t), np.nan)
    converged = np.zeros(G, dtype=bool)
    n_iter = np.zeros(G, dtype=np.int64)
    scale = np.full(G, np.nan)
    llf = np.full(G, np.nan)
    if ok.size:
        sub = crit.subset(ok)
        start = None
        if start_params is not None:
            start = np.asarray(start_params, dtype=float)
            start = np.broadcast_to(start if meta is not None else np.sqrt(start), (G, t))[ok]
        res = minimise_theta(sub, tol=tol, maxiter=maxiter, start_theta=start, n_jobs=workers)
        theta[ok], converged[ok], n_iter[ok] = res.theta, res.converged, res.n_iter
        S, logdet = _parts_at(sub, res.theta, workers)
        s = S / m
        scale[ok] = s * c[ok] ** 2
        llf[ok] = -0.5 * (m * (1.0 + np.log(2.0 * np.pi * s)) + logdet) - m * np.log(c[ok])
    _warn_degenerate(status)
    _warn_not_converged(converged[ok], G)
    k = len(stats.components)
    ratios = np.full((G, k), np.nan)
    if st.re_dim:
        ratios[:, 0] = np.sum(theta[:, :1] ** 2, axis=1)
    for j, ci in enumerate(st.vc_components):
        ratios[:, ci] = theta[:, len(st.re_pairs) + j] ** 2
    fit = ThetaEngineFit(ratios=ratios, scale=scale, llf=llf, converged=converged,
                         n_iter=n_iter, status=status.astype(str), reml=reml,
                         method="theta-newton", theta=theta, structure=st, criterion=crit,
                         gene_scale=c, workers=workers)
    return RandomSlopesResults(model, fit, df_method=df_method)


def _parts_at(crit: ThetaCriterion, theta: np.ndarray, workers: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """``S`` and the log-determinant term at ``theta``, on the fit's threads."""
    both = over_gene_parts(
        lambda part: np.stack(crit.subset(part).parts(theta[part], grad=False)[:2], axis=1),
        np.arange(theta.shape[0]), workers)
    return both[:, 0], both[:, 1]


def structure_of(stats: Any) -> ThetaStructure:
    """Block layout of the statistics' ``Z'Z`` (identifiability checked for components)."""
    meta = stats.info.get(SLOPES_KEY)
    if meta is None:
        check_identifiable(stats.components, stats.ZZ, stats.ZX, stats.XX)
        return analyse_structure(stats.components, stats.ZZ)
    return analyse_structure(stats.components, stats.ZZ, re_dim=int(meta["dim"]),
                             independent=bool(meta["independent"]))


def criterion_of(stats: Any, st: ThetaStructure, reml: bool, c: np.ndarray,
                 max_memory: Any = None, workers: int | None = None) -> ThetaCriterion:
    """The (specialised) criterion of every gene divided by ``c``, as the fit uses it."""
    workers = thread_count(workers)
    return specialise(ThetaCriterion.from_stats(stats, st, reml, c, MemoryBudget.of(max_memory),
                                                workers))


# ----------------------------------------------------------------- results
class RandomSlopesResults(MultiGeneMixedLMResults):
    """Results with correlated random effects per group (statsmodels' ``exog_re``).

    Covariance parameters follow statsmodels' ``MixedLMResults``:

    * :attr:`cov_re`: genes x lower-triangle entries of ``Psi`` (absolute
      units), columns named like statsmodels' params (``"Group Var"``,
      ``"Group x x Cov"``, ``"x Var"``); :meth:`cov_re_matrix` gives the
      r x r matrices and ``results.gene(name).cov_re`` one of them.
    * :attr:`vcomp`: the variance components (``vc_formula`` / ``exog_vc``)
      other than ``Psi``, absolute units.
    * :attr:`params`: fixed effects, then ``Psi / scale`` (lower triangle)
      and the variance-component ratios, statsmodels' order and names.
    * :attr:`theta`: lme4's ``theta`` per gene.
    """

    saved_engine: str | None = "structured"

    _fit: ThetaEngineFit

    @property
    def _meta(self) -> dict[str, Any]:
        """The random-slope description (empty for variance components only)."""
        return self.stats.info.get(SLOPES_KEY) or {"names": [], "independent": False}

    @property
    def _st(self) -> ThetaStructure:
        assert self._fit.structure is not None
        return self._fit.structure

    @property
    def exog_re_names(self) -> list[str]:
        """Names of the r correlated random effects (statsmodels' ``exog_re_names``)."""
        return list(self._meta["names"])

    @property
    def component_names(self) -> list[str]:
        """Names of the variance components (other than a random-slope block)."""
        return [self.stats.components[ci].name for ci in self._st.vc_components]

    @property
    def cov_re_names(self) -> list[str]:
        """statsmodels' names of the ``Psi`` parameters."""
        return cov_param_names(self.exog_re_names, bool(self._meta["independent"]))

    @property
    def _k_cov_params(self) -> int:
        return self._st.n_theta

    @cached_property
    def theta(self) -> pd.DataFrame:
        """lme4's ``theta``: lower triangle of ``T`` by column, then variance-component factors."""
        st = self._st
        names = self.exog_re_names
        cols = [f"{names[b]}" if a == b else f"{names[a]}.{names[b]}" for a, b in st.re_pairs]
        cols = [f"{self._meta.get('group_name')}.{c}" for c in cols] + self.component_names
        return self._frame(self._fit.theta, cols)

    def _psi_unscaled(self) -> np.ndarray:
        T = self._st.tfactor(self._fit.theta)
        return T @ np.swapaxes(T, 1, 2)

    def cov_re_matrix(self) -> np.ndarray:
        """``Psi`` per gene, array (genes, r, r), absolute units."""
        return self._psi_unscaled() * self._fit.scale[:, None, None]

    @cached_property
    def cov_re(self) -> pd.DataFrame:  # type: ignore[override]
        """Lower triangle of ``Psi`` (absolute units), genes x entries.

        Without random slopes, the variances of the components (:attr:`vcomp`).
        """
        if not self._st.re_dim:
            return self.vcomp
        ii, jj = _tril_rows(self._st.re_dim, bool(self._meta["independent"]))
        return self._frame(self.cov_re_matrix()[:, ii, jj], self.cov_re_names)

    @cached_property
    def cov_re_unscaled(self) -> pd.DataFrame:
        """Lower triangle of ``Psi / scale`` (statsmodels' ``cov_re_unscaled``)."""
        ii, jj = _tril_rows(self._st.re_dim, bool(self._meta["independent"]))
        return self._frame(self._psi_unscaled()[:, ii, jj], self.cov_re_names)

    @cached_property
    def corr_re(self) -> pd.DataFrame:
        """Correlations of the random effects (off-diagonal entries of ``Psi``)."""
        P = self._psi_unscaled()
        d = np.sqrt(np.diagonal(P, axis1=1, axis2=2))
        names = self.exog_re_names
        cols, vals = [], []
        for i in range(len(names)):
            for j in range(i):
                cols.append(f"{names[j]} x {names[i]} Corr")
                with np.errstate(invalid="ignore", divide="ignore"):
                    vals.append(P[:, i, j] / (d[:, i] * d[:, j]))
        return self._frame(np.column_stack(vals) if vals else np.empty((self.n_genes, 0)), cols)

    @property
    def ratios(self) -> pd.DataFrame:
        """Variance-component ratios ``s_i / s`` (other than ``Psi``)."""
        return self._frame(self._vc_ratios(), self.component_names)

    def _vc_ratios(self) -> np.ndarray:
        j0 = len(self._st.re_pairs)
        return self._fit.theta[:, j0:] ** 2

    @cached_property
    def vcomp(self) -> pd.DataFrame:
        """Variance components other than ``Psi`` (absolute units)."""
        return self._frame(self._vc_ratios() * self._fit.scale[:, None], self.component_names)

    @cached_property
    def boundary(self) -> pd.Series:
        """Singular fit: a bounded ``theta`` below lme4's ``isSingular`` tolerance 1e-4.

        Covers a zero variance and a correlation of +-1 in ``Psi`` (a zero on the
        diagonal of ``T``) and a variance component at 0.
        """
        th = self._fit.theta[:, self._st.bounded]
        return self._series(np.any(th < BOUNDARY_TOL, axis=1) & self._usable, "boundary")

    @cached_property
    def icc(self) -> pd.DataFrame:
        """Share of the variance components in ``vcomp + Psi[0, 0] + scale``."""
        v = self.vcomp.to_numpy()
        psi00 = self.cov_re_matrix()[:, 0, 0] if self._st.re_dim else 0.0
        total = v.sum(axis=1) + psi00 + self._fit.scale
        return self._frame(v / total[:, None], self.component_names)

    # ------------------------------------------------------------- GLS
    @property
    def _crit(self) -> ThetaCriterion:
        """The criterion on genes divided by ``c = sqrt(yy / n)`` (unit scale)."""
        assert self._fit.criterion is not None
        return self._fit.criterion

    @property
    def _c(self) -> np.ndarray:
        assert self._fit.gene_scale is not None
        return self._fit.gene_scale

    @property
    def _scale_per_unit(self) -> np.ndarray:
        """Residual variance of every gene divided by ``c**2`` (see :attr:`_crit`)."""
        return self._fit.scale / self._c ** 2

    def _in_parts(self, fn: Any, genes: np.ndarray) -> Any:
        """``fn`` over parts of ``genes`` on the fit's threads (arrays or a ThetaGLS)."""
        return over_gene_parts(fn, genes, getattr(self._fit, "workers", None))

    @cached_property
    def _gls(self) -> ThetaGLS:
        return self._estimate(random_effects=True)

    @cached_property
    def _gls_fixed(self) -> ThetaGLS:
        return self._estimate(random_effects=False)

    @property
    def _fixed(self) -> ThetaGLS:
        """The fixed effects alone unless the BLUPs were computed already: tests and tables
        need no (genes, q) arrays."""
        return self.__dict__.get("_gls") or self._gls_fixed

    def _estimate(self, random_effects: bool) -> ThetaGLS:
        theta = np.where(self._usable[:, None], self._fit.theta, 0.0)
        est = self._in_parts(lambda part: gls_theta(self._crit.subset(part), theta[part],
                                                    random_effects), np.arange(self.n_genes))
        est.fe_params *= self._c[:, None]              # y / c: scale b and BLUPs back
        est.blup_unscaled *= self._c[:, None]
        bad = ~self._usable
        for arr in (est.fe_params, est.cov_unscaled, est.blup_unscaled, est.condvar_unscaled):
            arr[bad] = np.nan
        return est

    def condcov_blocks(self, gene: str | int) -> np.ndarray:
        """Conditional covariance of every group's random effects for one gene.

        Returns an array (groups, s, s) in absolute units: group ``g``'s r
        correlated effects, then its nested variance-component effects (see
        ``gene(name).random_effects_cov`` for labelled blocks).  Computed block
        by block, without forming the q x q matrix.
        """
        pos = self.gene(gene)._pos
        if not self._usable[pos]:
            s = self._st.block_size
            return np.full((self._st.n_groups, s, s), np.nan)
        blocks = condcov_groups(self._crit.subset(np.array([pos])), self._fit.theta[pos])
        return blocks * self._fit.scale[pos]

    # ------------------------------------------------------ inference
    @cached_property
    def _info(self) -> np.ndarray:
        """Deviance Hessian in ``(theta, sigma / c)`` per gene (lmerTest's, at unit scale).

        Degrees of freedom and the theta block do not depend on the units of y;
        at unit scale they stay finite for data from 1e-150 to 1e150.
        """
        t = self._st.n_theta
        out = np.full((self.n_genes, t + 1, t + 1), np.nan)
        ok = np.flatnonzero(self._usable)
        if ok.size:
            sigma = np.sqrt(self._scale_per_unit)
            out[ok] = self._in_parts(lambda part: varpar_information(
                self._crit.subset(part), self._fit.theta[part], sigma[part]), ok)
        return out

    @cached_property
    def _varpar_cov(self) -> np.ndarray:
        """Covariance of ``(theta, sigma / c)``: ``2 H^-1`` on the parameters off their bound."""
        return varpar_covariance(self._info, free_parameters(self._st, self._fit.theta))

    def _satterthwaite(self, L: np.ndarray) -> np.ndarray:
        out = np.full((self.n_genes, L.shape[-2]), np.nan)
        ok = np.flatnonzero(self._usable)
        if ok.size:
            cov, info, scale = self._fixed.cov_unscaled, self._info, self._scale_per_unit
            out[ok] = self._in_parts(lambda part: satterthwaite_theta(
                self._crit.subset(part), self._fit.theta[part], scale[part], cov[part],
                L if L.ndim == 2 else L[part], info[part]), ok)
        return out

    def contrast_df(self, L: np.ndarray, df_method: str | None = None) -> np.ndarray:
        """Denominator df of every contrast row of ``L`` (genes x rows)."""
        method = self._check_df_method(df_method)
        if method != "satterthwaite":
            return super().contrast_df(L, method)
        return self._satterthwaite(L)

    def contrast_df_rows(self, L: np.ndarray) -> np.ndarray:
        """Satterthwaite df for gene-specific contrast rows ``L`` (genes, r, p)."""
        return self._satterthwaite(L)

    def _kr_parameters(self) -> tuple[KRDesign, np.ndarray, bool]:
        """The fit's block layout and ``theta`` (Kenward-Roger reads ``Lambda`` from them)."""
        stats = self.stats
        design = KRDesign.of(self._st, stats.ZZ, stats.ZX, stats.XX, stats.n)
        return design, self._fit.theta, bool(self._meta["independent"])

    def _delta_se(self, jac: np.ndarray) -> np.ndarray:
        """Delta-method standard errors: ``jac`` (G, k, t + 1) d(quantity)/d(theta, sigma)."""
        cov = jac @ self._varpar_cov @ np.swapaxes(jac, 1, 2)
        return np.sqrt(np.abs(np.diagonal(cov, axis1=1, axis2=2)))

    def _psi_jacobian(self) -> np.ndarray:
        """d(lower triangle of T T')/d theta, (G, entries, t) (``Psi / scale``, row by row)."""
        st = self._st
        T = st.tfactor(self._fit.theta)
        ii, jj = _tril_rows(st.re_dim, bool(self._meta["independent"]))
        J = np.zeros((self.n_genes, ii.size, st.n_theta))
        for j, (a, b) in enumerate(st.re_pairs):
            # d(T T')_{il} / d T_ab = [i == a] T_lb + [l == a] T_ib
            J[:, :, j] = (np.where(ii == a, 1.0, 0.0) * T[:, jj, b]
                          + np.where(jj == a, 1.0, 0.0) * T[:, ii, b])
        return J

    def _singular(self) -> np.ndarray:
        """Genes whose ``T`` has a zero on its diagonal (a singular ``Psi``)."""
        st = self._st
        diag = [j for j, (a, b) in enumerate(st.re_pairs) if a == b]
        return np.any(self._fit.theta[:, diag] <= 0.0, axis=1)

    @cached_property
    def bse_re(self) -> pd.DataFrame:
        """Standard errors of the covariance parameters in :attr:`params` (``Psi / scale``, ratios).

        Delta method from the deviance Hessian in ``(theta, sigma)`` (the
        ratios do not depend on ``sigma``, so this is the profiled covariance).
        NaN where ``Psi`` is singular (for its entries) or a component is at 0.
        """
        st = self._st
        t, j0, k = st.n_theta, st.n_pairs, len(st.vc_components)
        n_psi = len(self.cov_re_names)
        J = np.zeros((self.n_genes, n_psi + k, t + 1))     # no dependence on sigma
        J[:, :n_psi, :t] = self._psi_jacobian()
        J[:, n_psi + np.arange(k), j0 + np.arange(k)] = 2.0 * self._fit.theta[:, j0:]
        se = self._delta_se(J)
        se[:, :n_psi][self._singular()] = np.nan
        se[:, n_psi:][self._fit.theta[:, j0:] <= 0.0] = np.nan
        cols = self.cov_re_names + [f"{c} Var" for c in self.component_names]
        return self._frame(se, cols)

    @cached_property
    def se_theta(self) -> pd.DataFrame:
        """Standard errors of ``(theta, sigma)`` from the deviance Hessian (NaN at the boundary)."""
        cols = list(self.theta.columns) + ["sigma"]
        se = np.sqrt(np.abs(np.diagonal(self._varpar_cov, axis1=1, axis2=2)))
        se[:, -1] *= self._c                                   # sigma / c -> sigma
        return self._frame(np.where(free_parameters(self._st, self._fit.theta), se, np.nan), cols)

    @cached_property
    def se_vcomp(self) -> pd.DataFrame:
        """Standard errors of the variances ``(s_1, ..., s_k, s)`` and of ``Psi``'s entries.

        Columns: the variance components (absolute units), ``"residual"``, then
        :attr:`cov_re`'s entries.  Delta method from the deviance Hessian in
        ``(theta, sigma)``; NaN at the boundary as in :attr:`bse_re`.
        """
        st = self._st
        t = st.n_theta
        th, sig = self._fit.theta, np.sqrt(self._scale_per_unit)     # unit scale, see _info
        s2 = sig * sig
        j0, k = st.n_pairs, len(st.vc_components)
        Jvc = np.zeros((self.n_genes, k + 1, t + 1))
        Jvc[:, np.arange(k), j0 + np.arange(k)] = 2.0 * s2[:, None] * th[:, j0:]
        Jvc[:, np.arange(k), t] = 2.0 * sig[:, None] * th[:, j0:] ** 2
        Jvc[:, k, t] = 2.0 * sig
        psi = self.cov_re_unscaled.to_numpy()
        Jpsi = np.concatenate([s2[:, None, None] * self._psi_jacobian(),
                               (2.0 * sig[:, None] * psi)[:, :, None]], axis=2)
        se = self._delta_se(np.concatenate([Jvc, Jpsi], axis=1)) * self._c[:, None] ** 2
        se[:, :k][th[:, j0:] <= 0.0] = np.nan
        se[:, k + 1:][self._singular()] = np.nan
        cols = self.component_names + ["residual"] + list(self.cov_re_names)
        return self._frame(se, cols)

    @cached_property
    def params(self) -> pd.DataFrame:
        """Fixed effects, ``Psi / scale`` (lower triangle), variance-component ratios."""
        cols = self.exog_names + self.cov_re_names + [f"{c} Var" for c in self.component_names]
        vals = np.hstack([self._fixed.fe_params, self.cov_re_unscaled.to_numpy(), self._vc_ratios()])
        return self._frame(vals, cols)

    @cached_property
    def aic(self) -> pd.Series:
        """Akaike information criterion (NaN for REML, as statsmodels)."""
        k = self.k_fe + self._k_cov_params + 1
        vals = -2 * self.llf.to_numpy() + 2 * k if not self.reml else np.full(self.n_genes, np.nan)
        return self._series(vals, "aic")

    @cached_property
    def bic(self) -> pd.Series:
        """Bayesian information criterion (NaN for REML, as statsmodels)."""
        k = self.k_fe + self._k_cov_params + 1
        vals = (-2 * self.llf.to_numpy() + np.log(self.nobs) * k if not self.reml
                else np.full(self.n_genes, np.nan))
        return self._series(vals, "bic")

    def compare_lr_test(self, restricted: MultiGeneMixedLMResults) -> pd.DataFrame:
        """Likelihood-ratio test against a nested fit (e.g. random intercept only).

        The chi-square df is the difference in the number of parameters; at the
        boundary (a variance of 0 under the null) the p-value is conservative.
        """
        if self.reml != restricted.reml:
            raise ValueError("cannot compare a REML fit with an ML fit; refit both the same way.")
        if list(self.gene_names) != list(restricted.gene_names):
            raise ValueError("the two fits have different genes.")
        if self.reml and self.exog_names != restricted.exog_names:
            raise ValueError("REML likelihoods of models with different fixed effects are not "
                             "comparable; refit both with reml=False.")
        k_rest = restricted.k_fe + getattr(restricted, "_k_cov_params",
                                           len(restricted.component_names))
        dfd = self.k_fe + self._k_cov_params - k_rest
        if dfd <= 0:
            raise ValueError("the restricted model must have fewer parameters than this one.")
        from scipy import stats as sps

        stat = np.maximum(2.0 * (self.llf.to_numpy() - restricted.llf.to_numpy()), 0.0)
        return pd.DataFrame({"statistic": stat, "df": dfd, "pvalue": sps.chi2.sf(stat, dfd)},
                            index=self.gene_names)

    # ---------------------------------------------------------------- BLUPs
    def gene(self, name: str | int) -> GeneResults:
        """A one-gene view with statsmodels ``MixedLMResults`` attribute names."""
        base = super().gene(name)
        return RandomSlopesGeneResults(self, base._pos) if self._st.re_dim else base

    def __repr__(self) -> str:
        what = (f"random effects {self.exog_re_names} by {self._meta['group_name']}"
                if self._st.re_dim else f"components {self.component_names}")
        return (f"<MultiGeneMixedLMResults: {self.n_genes} genes, {self.nobs} cells, {self.method}, "
                f"{what}, {int(self.converged.sum())} converged>")


class RandomSlopesGeneResults(GeneResults):
    """One gene of a random-slopes fit, with statsmodels' names.

    ``cov_re`` is the r x r ``Psi`` (index and columns ``exog_re_names``),
    ``random_effects`` maps every group to a Series over ``exog_re_names``
    (then any nested variance-component effects) and ``random_effects_cov``
    to the matching conditional covariance matrix.
    """

    _parent: RandomSlopesResults

    @property
    def cov_re(self) -> pd.DataFrame:
        """``Psi`` (r x r), as statsmodels' ``MixedLMResults.cov_re``."""
        names = self._parent.exog_re_names
        return pd.DataFrame(self._parent.cov_re_matrix()[self._pos], index=names, columns=names)

    @property
    def cov_re_unscaled(self) -> pd.DataFrame:
        """``Psi / scale``."""
        return self.cov_re / self.scale

    @property
    def vcomp(self) -> np.ndarray:
        """Variances of the variance components (statsmodels' ``vcomp``)."""
        return self._parent.vcomp.iloc[self._pos].to_numpy()

    def _group_columns(self) -> dict[str, tuple[list[int], list[str]]]:
        out: dict[str, tuple[list[int], list[str]]] = {}
        start = 0
        for ci, comp in enumerate(self._parent.stats.components):
            for j in range(comp.size):
                g = comp.groups[j] if comp.groups is not None else "Group"
                if ci == 0:
                    label = comp.columns[j]
                else:
                    col = comp.columns[j] if comp.columns is not None else comp.levels[j]
                    label = f"{comp.name}[{col}]"
                cols, labels = out.setdefault(g, ([], []))
                cols.append(start + j)
                labels.append(label)
            start += comp.size
        return out

    @property
    def random_effects(self) -> dict[str, pd.Series]:
        """BLUPs: group -> Series over the random effects of the group."""
        u = self._parent._gls.blup_unscaled[self._pos]
        return {g: pd.Series(u[c], index=lab, name=g)
                for g, (c, lab) in self._group_columns().items()}

    @property
    def random_effects_cov(self) -> dict[str, pd.DataFrame]:
        """Conditional covariance of every group's random effects (statsmodels' layout)."""
        parent = self._parent
        st = parent._st
        blocks = parent.condcov_blocks(self._pos)
        slot = {int(col): (g, k) for (g, k), col in np.ndenumerate(st.slot_cols) if col >= 0}
        out = {}
        for g, (cols, lab) in self._group_columns().items():
            if all(c in slot for c in cols) and len({slot[c][0] for c in cols}) == 1:
                gi = slot[cols[0]][0]
                ks = [slot[c][1] for c in cols]
                C = blocks[gi][np.ix_(ks, ks)]
            else:  # columns outside the group blocks: their conditional variances only
                C = np.diag(parent._gls.condvar_unscaled[self._pos, cols] * self.scale)
            out[g] = pd.DataFrame(C, index=lab, columns=lab)
        return out

    def summary(self, alpha: float = 0.05, df_method: str | None = None) -> Any:
        """statsmodels-style summary: fixed effects with the chosen df, then ``Psi`` and vcomp."""
        from scipy import stats as sps
        from statsmodels.iolib import summary2

        parent = self._parent
        method = parent._check_df_method(df_method)
        smry = summary2.Summary()
        smry.add_dict({
            "Model:": "MultiGeneMixedLM", "No. Observations:": str(self.nobs),
            "No. Groups:": str(parent._meta["n_groups"]), "Dependent Variable:": self.name,
            "Method:": self.method, "Scale:": self.scale, "Log-Likelihood:": self.llf,
            "Converged:": "Yes" if self.converged else "No", "Df method:": method,
        })
        smry.add_title("Mixed Linear Model Regression Results")
        p = parent.k_fe
        b = self.fe_params.to_numpy()
        se = np.sqrt(np.diagonal(parent.contrast_cov(method)[self._pos]))
        df = parent.contrast_df(np.eye(p), method)[self._pos]
        t = b / se
        normal = bool(np.all(np.isinf(df)))
        crit = sps.norm.ppf(1 - alpha / 2) if normal else sps.t.ppf(1 - alpha / 2, df)
        pv = 2 * sps.norm.sf(np.abs(t)) if normal else 2 * sps.t.sf(np.abs(t), df)
        cov = np.concatenate([parent.cov_re.iloc[self._pos].to_numpy(), self.vcomp])
        names = parent.exog_names + list(parent.cov_re.columns) + [
            f"{c} Var" for c in parent.component_names]
        sdf = np.full((len(names), 6), np.nan)
        sdf[:p] = np.column_stack([b, se, t, pv, b - crit * se, b + crit * se])
        sdf[p:, 0] = cov
        smry.add_df(coefficient_table(sdf, names, bool(normal), alpha), align="r")
        return smry
