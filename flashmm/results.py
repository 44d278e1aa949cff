"""Results of a multi-gene fit, with statsmodels' names, genes in rows.

Everything is derived lazily (and cached) from the per-gene variance ratios and
the sufficient statistics; nothing loops over genes in Python.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from ._df_method import KENWARD_ROGER, check_df_method
from ._engine import STATUS_OK, EngineFit
from ._fit_theta import over_gene_parts
from ._gls import GLSEstimates, condvar_levels, gls_estimates
from ._kenward_roger import (
    KRDesign,
    KRPieces,
    kr_contrast_df,
    kr_df,
    kr_n_parameters,
    kr_pieces,
)
from ._reduce import Reduced, reduce_stats, symmetric_eigh
from ._satterthwaite import information_gs, satterthwaite_df
from ._structure import analyse_structure
from .contrasts import (
    MultiGeneContrastResults,
    build_contrasts,
    t_quantile,
    two_sided_p,
    wald_test_matrix,
)

if TYPE_CHECKING:
    from .gene import GeneResults

__all__ = ["MultiGeneMixedLMResults"]


class MultiGeneMixedLMResults:
    """Per-gene estimates and inference of a :class:`MultiGeneMixedLM` fit.

    Per-gene tables are DataFrames with genes as rows (index = gene names) and
    terms or components as columns; per-gene scalars are Series.  Names follow
    statsmodels' ``MixedLMResults``.  Use :meth:`gene` for a one-gene view.
    """

    #: how ``save`` records the engine (:mod:`flashmm._results_file`); None: not saveable
    saved_engine: str | None = "one-component"

    def __init__(self, model: Any, fit: EngineFit, df_method: str = "satterthwaite") -> None:
        self.model = model
        self._fit = fit
        self.reml = fit.reml
        self.df_method = check_df_method(df_method, fit.reml)
        self.method = "REML" if fit.reml else "ML"
        self.optimizer = fit.method

    # ----------------------------------------------------------- basics
    @property
    def stats(self):  # noqa: ANN201 - SufficientStats
        """The sufficient statistics the fit was computed from."""
        return self.model.stats

    @property
    def gene_names(self) -> pd.Index:
        """Gene names (the row index of every per-gene table)."""
        return pd.Index(self.stats.gene_names, name="gene")

    @property
    def exog_names(self) -> list[str]:
        """Fixed-effect term names."""
        return list(self.stats.exog_names)

    @property
    def component_names(self) -> list[str]:
        """Random component names."""
        return [c.name for c in self.stats.components]

    @property
    def k_fe(self) -> int:
        """Number of fixed-effect terms."""
        return self.stats.k_fe

    @property
    def nobs(self) -> int:
        """Number of cells."""
        return int(self.stats.n)

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return self.stats.n_genes

    def _series(self, values: np.ndarray, name: str) -> pd.Series:
        return pd.Series(values, index=self.gene_names, name=name)

    def _frame(self, values: np.ndarray, columns: list[str]) -> pd.DataFrame:
        return pd.DataFrame(values, index=self.gene_names, columns=columns)

    @cached_property
    def _usable(self) -> np.ndarray:
        return self._fit.status == STATUS_OK

    @cached_property
    def _reduced(self) -> Reduced:
        return reduce_stats(self.stats)

    @property
    def _fixed(self) -> Any:
        """The fixed effects and their covariance (``fe_params``, ``cov_unscaled``): here
        :attr:`_gls`; engines whose BLUPs cost more than the fixed effects give them alone."""
        return self._gls

    @cached_property
    def _gls(self) -> GLSEstimates:
        ratios = np.where(self._usable[:, None], self._fit.ratios, 0.0)
        est = gls_estimates(self.stats, ratios[:, self.stats.component_index])
        bad = ~self._usable
        for arr in (est.fe_params, est.cov_unscaled, est.blup_unscaled, est.condvar_unscaled):
            arr[bad] = np.nan
        return est

    # --------------------------------------------------- variance parameters
    @property
    def ratios(self) -> pd.DataFrame:
        """Variance ratios ``s_i / s`` (statsmodels' unscaled parameters)."""
        return self._frame(self._fit.ratios, self.component_names)

    @cached_property
    def scale(self) -> pd.Series:
        """Residual variance per gene."""
        return self._series(self._fit.scale, "scale")

    @cached_property
    def vcomp(self) -> pd.DataFrame:
        """Variance of every random component, absolute units (genes x components)."""
        with np.errstate(invalid="ignore"):
            v = self._fit.ratios * self._fit.scale[:, None]
        top = getattr(self._fit, "top_vcomp", None)
        if top is not None:  # h2 = 1: ratio inf, residual variance 0, finite limit
            v = np.where(np.isinf(self._fit.ratios), top[:, None], v)
        return self._frame(v, self.component_names)

    @cached_property
    def heritability(self) -> pd.Series | pd.DataFrame:
        """Share of the variance due to the random component(s): ``s_g / (s_g + s)``.

        For a model with a known covariance (``group_cov``, kinship) this is the
        (narrow-sense) heritability ``h2`` of lmmlite / pylmm.  A Series with one
        component, otherwise a DataFrame ``s_i / (sum_j s_j + s)`` (= :attr:`icc`).
        ``h2 = 1`` is a legitimate boundary fit (residual variance 0).
        """
        if len(self.component_names) == 1:
            return self._series(self.icc.to_numpy()[:, 0], "heritability")
        return self.icc

    @property
    def cov_re(self) -> pd.DataFrame:
        """Random-effect variances (genes x components); alias of :attr:`vcomp`."""
        return self.vcomp

    @cached_property
    def llf(self) -> pd.Series:
        """Log-likelihood (REML or ML) in the lme4 / statsmodels convention."""
        return self._series(self._fit.llf, "llf")

    @cached_property
    def converged(self) -> pd.Series:
        """Whether the optimiser converged for each gene."""
        return self._series(self._fit.converged & self._usable, "converged")

    @cached_property
    def n_iter(self) -> pd.Series:
        """Iterations used per gene."""
        return self._series(self._fit.n_iter, "n_iter")

    @cached_property
    def boundary(self) -> pd.Series:
        """True where a variance component is estimated at 0 (lme4's singular fit)."""
        at = (self._fit.ratios == 0.0) | np.isinf(self._fit.ratios)
        return self._series(np.any(at, axis=1) & self._usable, "boundary")

    @cached_property
    def status(self) -> pd.Series:
        """Per-gene status: ``"ok"`` or why the gene could not be fitted."""
        return self._series(self._fit.status, "status")

    @cached_property
    def icc(self) -> pd.DataFrame:
        """Fraction of the total variance due to each component (intra-class correlation)."""
        v = self.vcomp.to_numpy()
        total = v.sum(axis=1) + self._fit.scale
        return self._frame(v / total[:, None], self.component_names)

    # -------------------------------------------------------- fixed effects
    @cached_property
    def fe_params(self) -> pd.DataFrame:
        """Fixed-effect estimates (genes x terms)."""
        return self._frame(self._fixed.fe_params, self.exog_names)

    def cov_params(self) -> np.ndarray:
        """Covariance of the fixed effects, array (genes, p, p)."""
        scale = self._fit.scale
        top = getattr(self._fit, "top_vcomp", None)
        if top is not None:  # h2 = 1: relative to the component variance (see _gls)
            scale = np.where(np.isinf(self._fit.ratios[:, 0]), top, scale)
        return self._fixed.cov_unscaled * scale[:, None, None]

    @cached_property
    def bse_fe(self) -> pd.DataFrame:
        """Standard errors of the fixed effects."""
        cov = self.cov_params()
        return self._frame(np.sqrt(np.diagonal(cov, axis1=1, axis2=2)), self.exog_names)

    @cached_property
    def _unit_scale(self) -> tuple[Reduced, np.ndarray, np.ndarray]:
        """Reduced statistics of every gene divided by its residual SD.

        Degrees of freedom and the ratio block of the information do not depend
        on the units of y; working with ``s = 1`` keeps them finite for any
        scale of the data (1e-150 to 1e150). Returns (reduced, unit scale, c2)
        with ``c2`` the per-gene divisor of the variances.
        """
        scale = self._fit.scale
        c2 = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        red = self._reduced
        return red.per_unit(c2), scale / c2, c2

    @cached_property
    def _info(self) -> np.ndarray:
        """Observed information of (ratios, scale / c2), per gene (see ``_unit_scale``)."""
        ok = self._usable & np.all(np.isfinite(self._fit.ratios), axis=1)
        out = np.full((self.n_genes,) + (len(self.component_names) + 1,) * 2, np.nan)
        if ok.any():
            red, unit, _ = self._unit_scale
            out[ok] = information_gs(self.stats, red.subset(ok), self._fit.ratios[ok], unit[ok],
                                     self.reml)
        return out

    @cached_property
    def bse_re(self) -> pd.DataFrame:
        """Standard errors of the ratios ``s_i / s`` (statsmodels' ``bse_re``).

        From the observed information of the profiled log-likelihood; NaN,
        without a warning, for a component at the boundary and wherever the
        inverse information gives no finite, non-negative variance (at the
        boundary the information need not be positive definite).
        """
        k = len(self.component_names)
        with np.errstate(invalid="ignore"):
            # profile out the scale: the ratio block of the inverse information
            cov = _safe_inv(self._info)[:, :k, :k]
            se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))   # NaN where negative
        se = np.where(self._fit.ratios > 0, se, np.nan)
        return self._frame(se, [f"{c} Var" for c in self.component_names])

    @cached_property
    def se_vcomp(self) -> pd.DataFrame:
        """Standard errors of the variances ``(s_1, ..., s_k, s)`` (FLASHMM's ``se.theta``).

        With ``allow_negative_variance=True`` these are FLASHMM's values (inverse
        expected information at its estimate); otherwise the inverse observed
        information of ``(s_1, ..., s_k, s)``, NaN for components at 0.
        """
        cols = self.component_names + ["residual"]
        if self._fit.se_theta is not None:
            return self._frame(self._fit.se_theta, cols)
        k = len(self.component_names)
        finite = np.where(np.isinf(self._fit.ratios), 0.0, self._fit.ratios)   # h2 = 1: NaN info
        J = _jacobian_to_variances(finite, self._fit.scale)             # d theta / d(g, s)
        J[:, :, k] *= self._unit_scale[2][:, None]                      # information is per unit s
        cov_gs = _safe_inv(self._info)
        cov = J @ cov_gs @ np.swapaxes(J, 1, 2)
        se = np.sqrt(np.abs(np.diagonal(cov, axis1=1, axis2=2)))
        se[:, :k] = np.where(self._fit.ratios > 0, se[:, :k], np.nan)
        se[np.any(np.isinf(self._fit.ratios), axis=1)] = np.nan
        return self._frame(se, cols)

    def vcomp_test(self) -> pd.DataFrame:
        """One-sided z-test of each variance component against 0.

        Returns a DataFrame (genes x components) of p-values
        ``P(Z > s_i / se(s_i))``; a component at 0 gets p = 1. This Wald test
        is approximate near the boundary; :meth:`compare_lr_test` against the
        model without the component is the better test.
        """
        k = len(self.component_names)
        z = self.vcomp.to_numpy() / self.se_vcomp.to_numpy()[:, :k]
        p = np.where(self.vcomp.to_numpy() > 0, sps.norm.sf(z), 1.0)
        p[~self._usable] = np.nan
        return self._frame(p, self.component_names)

    @cached_property
    def params(self) -> pd.DataFrame:
        """Fixed effects, then the variance ratios ``"<name> Var"`` (statsmodels' params)."""
        ratios = self._fit.ratios
        cols = self.exog_names + [f"{c} Var" for c in self.component_names]
        return self._frame(np.hstack([self._fixed.fe_params, ratios]), cols)

    @cached_property
    def bse(self) -> pd.DataFrame:
        """Standard errors of :attr:`params`."""
        return pd.concat([self.bse_fe, self.bse_re], axis=1)

    # ------------------------------------------------------ degrees of freedom
    @cached_property
    def df_resid(self) -> pd.Series:
        """Residual degrees of freedom ``n - p`` (FLASHMM's df)."""
        return self._series(np.full(self.n_genes, float(self.nobs - self.k_fe)), "df_resid")

    def _check_df_method(self, df_method: str | None) -> str:
        return check_df_method(self.df_method if df_method is None else df_method, self.reml)

    def contrast_df(self, L: np.ndarray, df_method: str | None = None) -> np.ndarray:
        """Denominator df of every contrast row of ``L`` (genes x rows)."""
        method = self._check_df_method(df_method)
        G, r = self.n_genes, L.shape[0]
        if method == "normal":
            return np.full((G, r), np.inf)
        if method == "residual":
            return np.full((G, r), float(self.nobs - self.k_fe))
        if method == KENWARD_ROGER:
            return kr_contrast_df(self._kr, L)
        return self._satterthwaite(L)

    def contrast_cov(self, df_method: str | None = None) -> np.ndarray:
        """Covariance of the fixed effects that tests with ``df_method`` use, (genes, p, p).

        Kenward-Roger's adjusted covariance (:meth:`cov_params_kr`) for
        ``"kenward-roger"``, as lmerTest; :meth:`cov_params` otherwise.
        """
        if self._check_df_method(df_method) == KENWARD_ROGER:
            return self.cov_params_kr()
        return self.cov_params()

    def contrast_df_rows(self, L: np.ndarray) -> np.ndarray:
        """Satterthwaite df for gene-specific contrast rows ``L`` (genes, r, p)."""
        return self._satterthwaite(L)

    @cached_property
    def _eig_ZZ(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Eigen-decomposition of the shared ``Z'Z`` (one component), for every df request."""
        return symmetric_eigh(self.stats.ZZ) if len(self.component_names) == 1 else None

    def _satterthwaite(self, L: np.ndarray) -> np.ndarray:
        top = np.any(np.isinf(self._fit.ratios), axis=1)
        red, unit, _ = self._unit_scale
        if not top.any():
            return satterthwaite_df(self.stats, red, self._fit.ratios, unit,
                                    self._fixed.cov_unscaled, L, self.reml, info=self._info,
                                    eig_ZZ=self._eig_ZZ)
        # h2 = 1 (residual variance 0): Cov(b) is proportional to the one remaining
        # variance, estimated on n - p (REML) degrees of freedom: df = n - p
        ratios = np.where(top[:, None], 0.0, self._fit.ratios)
        scale = np.where(top, 1.0, unit)
        with np.errstate(all="ignore"):
            df = satterthwaite_df(self.stats, red, ratios, scale, self._fixed.cov_unscaled, L,
                                  self.reml, info=self._info, eig_ZZ=self._eig_ZZ)
        df[top] = float(self.nobs - self.k_fe)
        return df

    # ------------------------------------------------------ Kenward-Roger
    def _kr_parameters(self) -> tuple[KRDesign, np.ndarray, bool]:
        """The design in block layout, lme4's ``theta`` per gene, and whether slopes are
        independent, for Kenward-Roger.

        The ratio engine's components are variance components: ``theta`` is the
        square root of each ratio (NaN where a ratio is negative: FLASHMM's
        unconstrained fits have no Kenward-Roger adjustment).  One component is
        taken in the eigenbasis of ``Z'Z`` (:meth:`KRDesign.one_component`).
        """
        stats = self.stats
        with np.errstate(invalid="ignore"):
            theta = np.sqrt(self._fit.ratios)
        if len(stats.components) == 1:
            return KRDesign.one_component(stats.ZZ, stats.ZX, stats.XX, stats.n), theta, False
        st = analyse_structure(stats.components, stats.ZZ)
        return (KRDesign.of(st, stats.ZZ, stats.ZX, stats.XX, stats.n), theta[:, st.vc_components],
                False)

    @cached_property
    def _kr(self) -> KRPieces:
        """Kenward-Roger pieces of every fitted gene at unit scale (NaN elsewhere)."""
        design, theta, independent = self._kr_parameters()
        G, p, k = self.n_genes, self.k_fe, kr_n_parameters(design.st, independent)
        out = KRPieces(np.full((G, p, p), np.nan), np.full((G, p, p), np.nan),
                       np.full((G, k, p, p), np.nan), np.full((G, k, k), np.nan))
        ok = np.flatnonzero(self._usable & np.all(np.isfinite(theta), axis=1))
        if ok.size:
            workers = getattr(self._fit, "workers", None)
            got = over_gene_parts(lambda part: kr_pieces(design, theta[part], independent,
                                                         workers=workers or 1), ok, workers)
            for name in ("cov", "cov_adj", "P", "W"):
                getattr(out, name)[ok] = getattr(got, name)
        return out

    def cov_params_kr(self, gene: str | int | None = None) -> np.ndarray | pd.DataFrame:
        """Kenward-Roger's adjusted covariance of the fixed effects (pbkrtest's ``vcovAdj``).

        Computed from the sufficient statistics at the REML estimates, block by
        block (see :mod:`flashmm._kenward_roger`); never from the covariance of
        the cells.

        Parameters
        ----------
        gene : str or int, optional
            One gene: its p x p matrix as a DataFrame (terms as index and
            columns).  Without it, every gene as an array (genes, p, p).

        Raises
        ------
        ValueError
            For an ML fit (Kenward-Roger needs REML, as in pbkrtest).
        """
        check_df_method(KENWARD_ROGER, self.reml)
        cov = self._kr.cov_adj * self._fit.scale[:, None, None]
        if gene is None:
            return cov
        names = self.exog_names
        return pd.DataFrame(cov[self.gene(gene)._pos], index=names, columns=names)

    def kr_ftest(self, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Kenward-Roger denominator df and F scaling of the joint test ``L b = 0`` per gene.

        ``L`` (r, p) has full row rank (r = the numerator df).
        """
        return kr_df(self._kr, L)

    @cached_property
    def df_satterthwaite(self) -> pd.DataFrame:
        """Satterthwaite df of every fixed-effect coefficient (genes x terms)."""
        return self._frame(self.contrast_df(np.eye(self.k_fe), "satterthwaite"), self.exog_names)

    @cached_property
    def df_terms(self) -> pd.DataFrame:
        """Denominator df of each coefficient under the fit's ``df_method``."""
        if self.df_method == "satterthwaite":
            return self.df_satterthwaite
        return self._frame(self.contrast_df(np.eye(self.k_fe)), self.exog_names)

    @cached_property
    def _bse_tests(self) -> pd.DataFrame:
        """Standard errors the tests use: :attr:`bse_fe`, Kenward-Roger's adjusted ones under KR."""
        if self.df_method != KENWARD_ROGER:
            return self.bse_fe
        se = np.sqrt(np.diagonal(self.contrast_cov(), axis1=1, axis2=2))
        return self._frame(se, self.exog_names)

    @cached_property
    def tvalues(self) -> pd.DataFrame:
        """Estimate / standard error of every fixed effect.

        Under ``df_method="kenward-roger"`` the standard error is the adjusted
        one (:meth:`cov_params_kr`), as lmerTest's summary; :attr:`bse_fe`
        stays lme4's.
        """
        return self.fe_params / self._bse_tests

    @cached_property
    def pvalues(self) -> pd.DataFrame:
        """Two-sided p-values of the fixed effects with the fit's ``df_method``."""
        return self._frame(two_sided_p(self.tvalues.to_numpy(), self.df_terms.to_numpy()),
                           self.exog_names)

    def conf_int(self, alpha: float = 0.05, df_method: str | None = None) -> pd.DataFrame:
        """Confidence intervals of the fixed effects, one tidy row per gene and term.

        Returns
        -------
        DataFrame with columns ``gene, term, lower, upper`` (the df and standard
        errors of the tests with ``df_method``).
        """
        method = self._check_df_method(df_method)
        df = (self.df_terms.to_numpy() if method == self.df_method
              else self.contrast_df(np.eye(self.k_fe), method))
        crit = t_quantile(1 - alpha / 2, df)
        b = self.fe_params.to_numpy()
        se = np.sqrt(np.diagonal(self.contrast_cov(method), axis1=1, axis2=2))
        G, p = b.shape
        return pd.DataFrame({
            "gene": np.repeat(self.gene_names.to_numpy(), p),
            "term": np.tile(self.exog_names, G),
            "lower": (b - crit * se).ravel(),
            "upper": (b + crit * se).ravel(),
        })

    def conf_int_re(self, alpha: float = 0.05, method: str = "profile", scale: str = "sd",
                    likelihood: str = "ML") -> pd.DataFrame:
        """Confidence intervals of the variance parameters, one tidy row per gene and parameter.

        Profile-likelihood intervals as lme4's ``confint(fit, method = "profile")``
        for the standard deviation of every random effect and the residual
        sigma (lme4's ``.sig01, ..., .sigma``), computed for all genes at once;
        or the cheap Wald intervals. See ``docs/guide/inference.rst``.

        Parameters
        ----------
        alpha : float
            The intervals have coverage ``1 - alpha``.
        method : {"profile", "wald"}
            ``"profile"``: where the signed root of the profiled deviance,
            ``sign(x - x_hat) sqrt(D(x) - D_hat)``, equals ``-+ qnorm(1 - alpha / 2)``,
            the other variance parameters re-optimised at every point; the lower
            limit of a standard deviation is 0 when the profile does not reach the
            cutoff at 0 (always for an estimate at the boundary).  ``"wald"``:
            ``estimate -+ z se`` from :attr:`se_vcomp` (delta method for the sd
            scale), symmetric, not truncated at 0 and NaN at the boundary.
        scale : {"sd", "var"}
            Standard deviations (lme4's scale) or variances (profile limits squared).
        likelihood : {"ML", "REML"}
            The criterion profiled.  ``"ML"`` (default) is lme4's convention: its
            profile refits a REML fit by ML, so the intervals surround the ML
            estimates.  ``"REML"`` profiles the REML criterion instead.  Wald
            intervals always use the fit's own estimates.

        Returns
        -------
        DataFrame
            Columns ``gene, parameter, estimate, lower, upper``; ``parameter``
            names the random effects as :attr:`vcomp` (or the ``exog_re`` effects)
            and ``"residual"`` the residual; ``estimate`` is the optimum of the
            profiled criterion (``method="profile"``) or the fit's estimate.
            NaN for genes that were not fitted; an upper limit the profile never
            reaches is ``inf``.

        Raises
        ------
        NotImplementedError
            For ``method="profile"`` with correlated random effects (an
            unstructured ``exog_re`` / ``re_formula`` covariance).
        """
        from ._profile import conf_int_re

        return conf_int_re(self, alpha, method, scale, likelihood)

    # ------------------------------------------------------------- tests
    def t_test(self, contrast: Any, alternative: str = "two-sided",
               df_method: str | None = None) -> MultiGeneContrastResults:
        """Test linear contrasts of the fixed effects for every gene.

        Parameters
        ----------
        contrast : array_like, str, list of str or dict
            A vector of length p, a matrix (r x p), a patsy/statsmodels
            hypothesis string or list of strings
            (``"cls[1]:trt[T.B] - cls[2]:trt[T.B] = 0"``), a FLASHMM
            ``contrast.matrix``-style expression over term names
            (``"A - (B + C) / 2"``), or a dict name -> any of these.
        alternative : {"two-sided", "larger", "smaller"}
        df_method : {"satterthwaite", "kenward-roger", "residual", "normal"}, optional
            Defaults to the fit's ``df_method``.
        """
        names, L, q = build_contrasts(contrast, self.exog_names)
        method = self._check_df_method(df_method)
        return MultiGeneContrastResults.from_fit(self, names, L, q, alternative, method)

    def wald_test(self, hypothesis: Any, df_method: str | None = None) -> pd.DataFrame:
        """Joint test of several contrast rows (F with df, chi-square when normal).

        Returns a DataFrame per gene: ``statistic, df_num, df_denom, pvalue``.
        """
        names, L, q = build_contrasts(hypothesis, self.exog_names)
        method = self._check_df_method(df_method)
        return wald_test_matrix(self, L, q, method)

    f_test = wald_test

    def anova(self, type: int | str = 3, df_method: str | None = None) -> pd.DataFrame:
        """lmerTest's ANOVA table of the fixed-effect terms, for every gene.

        Parameters
        ----------
        type : {3, 2, 1} or {"III", "II", "I"}
            Type 3 (default, lmerTest's), 2 (marginal over the terms that do not
            contain the term) or 1 (sequential, in the design's term order).
        df_method : {"satterthwaite", "kenward-roger", "residual", "normal"}, optional
            Denominator df of the F-tests; defaults to the fit's ``df_method``.

        Returns
        -------
        DataFrame
            Indexed by (gene, term) with patsy's term names (no intercept row);
            columns ``sum_sq, mean_sq, num_df, den_df, F, pvalue, padj``
            (``padj``: Benjamini-Hochberg within each term, over the fitted
            genes).  Needs a model built with ``from_formula``; see
            :mod:`flashmm.anova` and the user guide (Tests and degrees of freedom).
        """
        from .anova import anova_table

        return anova_table(self, type=type, df_method=self.df_method if df_method is None
                           else df_method)

    def ls_means(self, term: str | list[str], pairwise: bool = False, alpha: float = 0.05,
                 df_method: str | None = None) -> pd.DataFrame:
        """Least-squares means of a factor term (lmerTest's ``ls_means`` / ``difflsmeans``).

        Parameters
        ----------
        term : str or list of str
            Term(s) of factors only, patsy's names (``"ct"``, ``"ct:trt"``).
        pairwise : bool
            Pairwise differences of the means (``"A - B"``) instead of the means.
        alpha : float
            The confidence intervals ``lower, upper`` are at level ``1 - alpha``.
        df_method : {"satterthwaite", "kenward-roger", "residual", "normal"}, optional
            Defaults to the fit's ``df_method``.

        Returns
        -------
        DataFrame
            Indexed by (gene, term, level); columns ``estimate, se, df, t,
            pvalue, padj, lower, upper`` (``padj``: Benjamini-Hochberg within each
            level or difference, over the fitted genes).  Means weigh the levels
            of the other factors equally, with numerical covariates at their
            mean over the cells (see :mod:`flashmm.lsmeans`).
        """
        from .lsmeans import ls_means_table

        return ls_means_table(self, term, pairwise=pairwise, alpha=alpha, df_method=df_method)

    def ranova(self, mixture: bool = False, **fit_kwargs: Any) -> pd.DataFrame:
        """lmerTest's ``ranova``: a likelihood-ratio test for dropping each random-effects term.

        Every reduced model is refitted from the same sufficient statistics
        (no pass over the cells), with this fit's REML or ML: dropping the only
        component leaves the fixed-effects linear model; dropping one of several
        leaves the others; random slopes ``(1 + x | g)`` are reduced to ``(1 | g)``
        (row ``"x in g"``), as lmerTest's default ``reduce.terms``, and with
        independent effects ``(1 + x || g)`` the intercept is dropped too (row
        ``"g"``).

        Parameters
        ----------
        mixture : bool
            False (default, lmerTest's): p-values from chi-square(Df).  True: from
            the 50:50 mixture of chi-square(Df - 1) and chi-square(Df), the
            asymptotic null distribution of a variance on its boundary (0);
            for a single variance ``p = P(chi2_1 >= LRT) / 2`` (1 for an LRT of 0).
        **fit_kwargs
            Passed to the reduced fits (``maxiter``, ``tol``, ``n_jobs``,
            ``max_memory``).  A fit with ``allow_negative_variance=True``
            (FLASHMM's scoring) refits the reduced models the same way.

        Returns
        -------
        DataFrame
            Indexed by (gene, term): ``"<none>"`` (this model) and one row per
            deleted term, named as :attr:`component_names` (``"x in g"`` for a
            random slope); columns ``npar, logLik, AIC, LRT, Df, pvalue, padj``
            (``padj``: Benjamini-Hochberg within each row, over the fitted
            genes).  See :mod:`flashmm.ranova`.
        """
        from .ranova import ranova_table

        negative = self.optimizer == "flashmm-scoring"      # FLASHMM's unconstrained fit

        def refit(stats: Any) -> MultiGeneMixedLMResults:
            return type(self.model).from_sufficient_stats(stats).fit(
                reml=self.reml, df_method=self.df_method, allow_negative_variance=negative,
                **fit_kwargs)

        return ranova_table(self, refit, mixture=mixture)

    def compare_lr_test(self, restricted: MultiGeneMixedLMResults) -> pd.DataFrame:
        """Likelihood-ratio test against a nested (restricted) fit, gene by gene.

        REML fits can only be compared when the fixed designs are identical
        (REML likelihoods of different fixed designs are not comparable); refit
        both with ``reml=False`` to compare fixed effects.

        Returns a DataFrame per gene: ``statistic, df, pvalue``. With fewer
        variance parameters in the restricted model, the p-value uses a
        chi-square with the difference in parameters (conservative at the
        boundary, as in statsmodels).
        """
        if self.reml != restricted.reml:
            raise ValueError("cannot compare a REML fit with an ML fit; refit both the same way.")
        if list(self.gene_names) != list(restricted.gene_names):
            raise ValueError("the two fits have different genes.")
        if self.reml and self.exog_names != restricted.exog_names:
            raise ValueError(
                "REML likelihoods of models with different fixed effects are not comparable "
                f"({self.k_fe} vs {restricted.k_fe} terms); refit both with reml=False."
            )
        k_full = self.k_fe + len(self.component_names)
        k_rest = restricted.k_fe + len(restricted.component_names)
        dfd = k_full - k_rest
        if dfd <= 0:
            raise ValueError("the restricted model must have fewer parameters than this one.")
        stat = 2.0 * (self.llf.to_numpy() - restricted.llf.to_numpy())
        stat = np.maximum(stat, 0.0)
        return pd.DataFrame({"statistic": stat, "df": dfd, "pvalue": sps.chi2.sf(stat, dfd)},
                            index=self.gene_names)

    # ------------------------------------------------------- information
    @cached_property
    def aic(self) -> pd.Series:
        """Akaike information criterion (NaN for REML, as statsmodels)."""
        k = self.k_fe + len(self.component_names) + 1
        vals = -2 * self.llf.to_numpy() + 2 * k if not self.reml else np.full(self.n_genes, np.nan)
        return self._series(vals, "aic")

    @cached_property
    def bic(self) -> pd.Series:
        """Bayesian information criterion (NaN for REML, as statsmodels)."""
        k = self.k_fe + len(self.component_names) + 1
        vals = (-2 * self.llf.to_numpy() + np.log(self.nobs) * k if not self.reml
                else np.full(self.n_genes, np.nan))
        return self._series(vals, "bic")

    # ---------------------------------------------------------------- BLUPs
    @cached_property
    def random_effects(self) -> dict[str, pd.DataFrame]:
        """BLUPs: component name -> DataFrame (genes x levels).

        For a component with a known covariance ``K = L L'`` (``group_cov``) the
        BLUPs are reported on the original group levels, ``u = L v``.
        """
        out = self._split_effects(self._gls.blup_unscaled)
        for comp in self.stats.components:
            if comp.cov_factor is not None:
                from ._kinship import to_levels

                out[comp.name] = self._frame(to_levels(comp, out[comp.name].to_numpy()),
                                             list(comp.cov_levels))
        return out

    @cached_property
    def random_effects_cov(self) -> dict[str, pd.DataFrame]:
        """Conditional variances of the BLUPs (statsmodels' ``ranef_condvar``).

        With a known covariance ``K = L L'`` these are ``diag(L Var(v | y) L')`` on
        the original group levels.
        """
        out = self._split_effects(self._gls.condvar_unscaled * self._fit.scale[:, None])
        if any(c.cov_factor is not None for c in self.stats.components):
            ratios = np.where(self._usable[:, None], self._fit.ratios, 0.0)
            for i, cv in condvar_levels(self.stats, ratios, self._usable).items():
                comp = self.stats.components[i]
                out[comp.name] = self._frame(cv * self._fit.scale[:, None], list(comp.cov_levels))
        return out

    def _split_effects(self, values: np.ndarray) -> dict[str, pd.DataFrame]:
        out: dict[str, pd.DataFrame] = {}
        start = 0
        for comp in self.stats.components:
            stop = start + comp.size
            out[comp.name] = self._frame(values[:, start:stop], list(comp.levels))
            start = stop
        return out

    # ---------------------------------------------------------- one gene
    def gene(self, name: str | int) -> GeneResults:
        """A one-gene view with statsmodels ``MixedLMResults`` attribute names."""
        from .gene import GeneResults

        if isinstance(name, (int, np.integer)):
            pos = int(name)
        else:
            try:
                pos = self.gene_names.get_loc(name)
            except KeyError:
                raise KeyError(f"gene {name!r} is not in the results.") from None
        return GeneResults(self, pos)

    # ---------------------------------------------------------- summaries
    def summary(self, alpha: float = 0.05, fdr: float = 0.05,
                terms: list[str] | None = None, df_method: str | None = None) -> Any:
        """A statsmodels ``Summary`` of the whole fit (see :func:`flashmm.summary.fit_summary`).

        Per fixed term: genes whose coefficient differs from 0 at ``fdr``
        (only for ``terms``, the effects of interest, when given), median
        effect, standard error and df of the tests with ``df_method`` (default
        the fit's); then the variance components.
        """
        from .summary import fit_summary

        return fit_summary(self, alpha=alpha, fdr=fdr, terms=terms, df_method=df_method)

    def summary_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """Tidy table of every coefficient (``contrast`` holds the term name).

        Columns as :meth:`MultiGeneContrastResults.summary_frame` (intervals at
        ``alpha``); ``padj`` is Benjamini-Hochberg within each term.
        """
        terms = pd.DataFrame(np.eye(self.k_fe), index=self.exog_names, columns=self.exog_names)
        return self.t_test(terms).summary_frame(alpha=alpha)

    # ------------------------------------------ predictions and persistence
    def predict(self, exog: Any = None, groups: Any = None, random_effects: bool | str = True,
                *, exog_vc: Any = None, exog_re: Any = None, genes: Any = None) -> pd.DataFrame:
        """Predicted responses of cells, cells x genes (see :mod:`flashmm.predict`).

        Parameters
        ----------
        exog : DataFrame or array_like, optional
            Covariates of the cells to predict: for ``from_formula`` models a
            DataFrame with the formulas' columns (and the group column), built
            through the fit's patsy design; for array-built models the fixed
            design (cells x terms). None: the fitting cells (while the model's
            design is in memory).
        groups : array_like or str, optional
            Group labels of the new cells (default: the group column of a
            formula model's data).
        random_effects : {True, False, "known"}
            True: add the BLUPs of the cells' groups (an unknown level is an
            error); False: population level ``X b``; ``"known"``: BLUPs where the
            level was fitted, population level (random effect 0) elsewhere.
        exog_vc, exog_re : optional
            Array-built models: the new cells' variance-component blocks and
            random-slope covariates, as given to :class:`MultiGeneMixedLM`.
        genes : sequence of str or int, optional
            Genes to predict (default all; memory is cells x genes requested).

        Returns
        -------
        DataFrame
            Cells (the index of ``exog`` if a DataFrame) x genes.
        """
        from .predict import predict

        return predict(self, exog, groups, random_effects, exog_vc=exog_vc, exog_re=exog_re,
                       genes=genes)

    def resid_for(self, genes: Any, endog: Any, exog: Any = None, groups: Any = None,
                  random_effects: bool | str = True, **kwargs: Any) -> pd.DataFrame:
        """Residuals ``y - fitted`` of a few genes (statsmodels' ``resid``: with the BLUPs).

        ``endog`` is the cells x genes expression (a DataFrame with the genes'
        columns, an array of all the fit's genes or of just ``genes``, or an
        AnnData), before the fit's transform, which is applied here.  The other
        arguments are those of :meth:`predict` (plus ``transform=`` to give a
        callable transform or ``False`` for transformed responses).
        """
        from .predict import resid_for

        return resid_for(self, genes, endog, exog, groups, random_effects, **kwargs)

    @property
    def fittedvalues(self) -> pd.DataFrame:
        """Not materialised: cells x genes; use :meth:`predict` (``genes=`` for a subset)."""
        raise AttributeError("fittedvalues is not materialised (cells x genes: 160 GB for an "
                             "atlas of 10^6 cells and 2 x 10^4 genes); use "
                             "results.predict(genes=[...]).")

    @property
    def resid(self) -> pd.DataFrame:
        """Not materialised: cells x genes; use :meth:`resid_for` for a few genes."""
        raise AttributeError("resid is not materialised (cells x genes: 160 GB for an atlas of "
                             "10^6 cells and 2 x 10^4 genes); use "
                             "results.resid_for(genes, endog).")

    def save(self, path: Any, design: bool = True) -> None:
        """Write the results to one ``.npz`` file (no pickle); see :func:`flashmm.load_results`."""
        from ._results_file import save_results

        save_results(self, path, design=design)

    def __repr__(self) -> str:
        return (f"<MultiGeneMixedLMResults: {self.n_genes} genes, {self.nobs} cells, "
                f"{self.method}, {int(self.converged.sum())} converged>")


def _safe_inv(mats: np.ndarray) -> np.ndarray:
    out = np.full_like(mats, np.nan)
    ok = np.all(np.isfinite(mats), axis=(1, 2))
    if ok.any():
        out[ok] = np.linalg.pinv(mats[ok])
    return out


def _jacobian_to_variances(ratios: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Jacobian of ``(s_1..s_k, s) = (g_1 s, ..., g_k s, s)`` w.r.t. ``(g, s)``."""
    G, k = ratios.shape
    J = np.zeros((G, k + 1, k + 1))
    J[:, np.arange(k), np.arange(k)] = scale[:, None]
    J[:, :k, k] = ratios
    J[:, k, k] = 1.0
    return J
