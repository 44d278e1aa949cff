"""The user-facing model: :class:`MultiGeneMixedLM`.

Holds the sufficient statistics of one design and many genes; ``fit()`` runs the
batched optimiser and returns a :class:`~flashmm.results.MultiGeneMixedLMResults`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._design import (
    Design,
    build_design,
    build_formula_design,
    check_missing_option,
    missing_design_cells,
    missing_formula_cells,
    report_dropped,
    take_rows,
)
from ._df_method import check_df_method
from ._endog import (
    DEFAULT_CHUNK_CELLS,
    Transform,
    check_orientation,
    endog_shape,
    nonfinite_cells,
    take_cells,
)
from ._engine import fit_variance_ratios
from ._errors import DesignError
from ._exog_re import SLOPES_KEY
from .results import MultiGeneMixedLMResults
from .stats import SufficientStats

__all__ = ["MultiGeneMixedLM"]



def _rows_of_weights(weights: Any, keep: np.ndarray) -> Any:
    """The weights of the kept cells (``missing="drop"``); vectors and matrices alike."""
    if weights is None:
        return None
    if hasattr(weights, "E") and hasattr(weights, "weights"):     # VoomResult: genes x samples
        return np.asarray(weights.weights, dtype=float).T[keep]
    w = np.asarray(weights.to_numpy() if hasattr(weights, "to_numpy") else weights, dtype=float)
    return w[keep]


class MultiGeneMixedLM:
    """Linear mixed model fitted to many responses (genes) that share one design.

    ``y_g = X b_g + Z_1 u_1g + ... + Z_k u_kg + e_g`` for every gene ``g``, with
    ``u_ig ~ N(0, s_ig I)`` and ``e_g ~ N(0, s_g I)``.  The model is built on
    sufficient statistics computed in one chunked pass over the cells.

    Parameters
    ----------
    endog : array_like, scipy.sparse matrix or DataFrame, shape (n_cells, n_genes)
        Responses, cells in rows (as statsmodels and AnnData). DataFrame columns
        name the genes. Sparse input stays sparse.
    exog : array_like or DataFrame, shape (n_cells, p)
        Fixed-effects design; DataFrame columns name the terms.
    groups : array_like, optional
        Group labels. Without ``exog_vc`` each group gets a random intercept;
        with ``exog_vc`` the variance components are nested within groups
        (statsmodels' rule). With ``groups=None`` all cells form one group and
        the components are crossed.
    exog_vc : dict, optional
        Variance components: name -> labels (one random intercept per level)
        or an n_cells x d block (d effects sharing one variance).
    exog_re : array_like or DataFrame, shape (n_cells, r), optional
        Correlated random effects per group, statsmodels' ``exog_re`` (a column
        of ones is the random intercept): an unstructured r x r covariance per
        gene, alongside any ``exog_vc`` components. Needs ``groups``. See
        ``docs/random_slopes.rst``.
    independent_re : bool
        With ``exog_re``: independent random effects (diagonal covariance, as
        statsmodels' ``free`` argument or lme4's ``(1 + x || g)``).
    transform : {None, "log2p1", "log1p"} or callable, optional
        Applied to the responses chunk by chunk (``"log2p1"`` is FLASHMM's
        ``is.counts``).
    gene_names, exog_names : sequence of str, optional
        Names when the inputs are not labelled.
    chunk_size : int
        Cells per chunk in the pass over ``endog``.
    missing : {"none", "drop"}
        ``"none"`` (default): NaN or inf in any input raises a clear error.
        ``"drop"``: drop every cell with NaN or inf in ``exog``, ``groups``,
        an ``exog_vc`` block or any gene of ``endog`` (as statsmodels'
        ``missing="drop"``); one warning reports how many, stored in
        ``model.n_dropped`` and ``model.stats.info["n_dropped"]``.
    make_unique : bool
        Duplicate gene names raise a :class:`~flashmm.DataError` by default;
        ``make_unique=True`` renames them like anndata's
        ``var_names_make_unique`` (``"A", "A-1", "A-2"``) with a warning.
    group_cov : DataFrame or array_like, optional
        Known covariance (kinship) ``K`` among the levels of ``groups``
        (DataFrame indexed and columned by the labels, or an array in sorted
        label order): group intercepts ``u ~ N(0, s_g K)``. See
        :mod:`flashmm.kinship` and ``docs/kinship.rst``.
    weights : array_like, DataFrame or VoomResult, optional
        Precision weights per observation and gene, shape (n_cells, n_genes)
        (the orientation of ``endog``), or one per observation (length
        n_cells), or a :class:`~flashmm.VoomResult` (its ``weights``, genes x
        samples, are transposed).  lme4's ``lmer(..., weights = w)``: the
        residual variance of observation ``i`` is ``scale / w_i``; the
        log-likelihood is lme4's (it includes ``sum(log w) / 2``).  Weights
        must be positive and finite (else a :class:`~flashmm.DataError` that
        counts them).  Per-gene weights give every gene its own statistics
        (see ``docs/guide/weights.rst`` for the memory and time this costs);
        variance components only (no ``exog_re`` / ``group_cov``).

    Examples
    --------
    >>> import numpy as np
    >>> from flashmm import MultiGeneMixedLM
    >>> rng = np.random.default_rng(0)
    >>> groups = np.repeat(np.arange(10), 30)
    >>> X = np.column_stack([np.ones(300), rng.normal(size=300)])
    >>> Y = rng.normal(size=(300, 5)) + rng.normal(size=(10, 5))[groups]
    >>> res = MultiGeneMixedLM(Y, X, groups=groups).fit()
    >>> res.fe_params.shape
    (5, 2)
    """

    def __init__(
        self,
        endog: Any,
        exog: Any,
        groups: Any = None,
        exog_vc: Mapping[str, Any] | None = None,
        exog_re: Any = None,
        *,
        independent_re: bool = False,
        transform: Transform = None,
        gene_names: Sequence[str] | None = None,
        exog_names: Sequence[str] | None = None,
        chunk_size: int = DEFAULT_CHUNK_CELLS,
        missing: str = "none",
        make_unique: bool = False,
        group_cov: Any = None,
        weights: Any = None,
    ) -> None:
        check_missing_option(missing)
        n, _ = endog_shape(endog)
        exog_rows = endog_shape(exog)[0] if hasattr(exog, "shape") else len(exog)
        if exog_rows != n:
            check_orientation(endog, exog_rows)
        n_dropped = 0
        if missing == "drop":
            bad = missing_design_cells(exog, n, groups, exog_vc) | nonfinite_cells(endog, chunk_size)
            if exog_re is not None:
                bad |= missing_design_cells(exog_re, n)
            n_dropped = int(bad.sum())
            if n_dropped:
                keep = report_dropped(bad)
                endog, exog = take_cells(endog, keep), take_rows(exog, keep)
                groups = None if groups is None else take_rows(groups, keep)
                exog_vc = {k: take_rows(v, keep) for k, v in (exog_vc or {}).items()} or None
                exog_re = None if exog_re is None else take_rows(exog_re, keep)
                weights = _rows_of_weights(weights, keep)
                n = keep.size
        design = build_design(exog, n, groups=groups, exog_vc=exog_vc, exog_names=exog_names,
                              exog_re=exog_re, independent_re=independent_re,
                              group_cov=group_cov)
        stats = SufficientStats.from_design(
            design, endog, transform=transform, chunk_size=chunk_size, gene_names=gene_names,
            make_unique=make_unique,
        )
        stats.info["n_dropped"] = n_dropped
        self._init_from(stats, design)
        self.n_dropped = n_dropped
        self._add_weights(weights, endog, transform, chunk_size)

    def _init_from(self, stats: SufficientStats, design: Design | None) -> None:
        self.stats = stats
        self.design = design
        #: formula models: what builds the designs of new cells (see flashmm.predict)
        self.formula_spec = None if design is None else design.formula_spec
        #: per-gene weighted statistics when the model has ``weights=`` (else None)
        self.weighted = None

    def _add_weights(self, weights: Any, endog: Any, transform: Transform,
                     chunk_size: int) -> None:
        """Build the per-gene weighted statistics (``weights=``); see :mod:`flashmm._weighted_stats`."""
        if weights is None:
            return
        from ._weighted_stats import WeightedStats, weights_array

        if SLOPES_KEY in self.stats.info or any(c.cov_factor is not None
                                                 for c in self.stats.components):
            raise DesignError("weights= is available for variance components (random "
                              "intercepts, nested or crossed), not with random slopes "
                              "(exog_re / re_formula) or a known covariance (group_cov).")
        w = weights_array(weights, self.stats.n, self.stats.n_genes)
        self.weighted = WeightedStats.from_design(self.design, endog, w, self.stats.gene_names,
                                                  transform, chunk_size)

    # ------------------------------------------------------------ builders
    @classmethod
    def from_sufficient_stats(cls, stats: SufficientStats) -> MultiGeneMixedLM:
        """Build a model directly from (saved or merged) sufficient statistics."""
        if not isinstance(stats, SufficientStats):
            raise TypeError(f"expected SufficientStats, got {type(stats).__name__}.")
        model = cls.__new__(cls)
        model._init_from(stats, None)
        return model

    @classmethod
    def from_formula(
        cls,
        formula: str,
        data: Any,
        endog: Any = None,
        groups: Any = None,
        vc_formula: Mapping[str, str] | None = None,
        re_formula: str | None = None,
        transform: Transform = None,
        *,
        independent_re: bool = False,
        gene_names: Sequence[str] | None = None,
        chunk_size: int = DEFAULT_CHUNK_CELLS,
        layer: str | None = None,
        missing: str = "none",
        make_unique: bool = False,
        group_cov: Any = None,
        weights: Any = None,
    ) -> MultiGeneMixedLM:
        """Build the model from a one-sided patsy formula for the fixed effects.

        Parameters
        ----------
        formula : str
            One-sided formula, e.g. ``"~ 0 + np.log(libsize) + cls + cls:trt"``.
            Term names are those of statsmodels' ``MixedLM.from_formula``.
        data : DataFrame, AnnData, or path
            One row per cell with the variables of the formulas; or an AnnData
            (see ``layer``); or the path (str or PathLike) of an ``.h5ad`` file
            (opened backed, read chunk by chunk, closed afterwards) or of a
            ``.zarr`` store (``anndata.read_zarr``), read as that AnnData.
        endog : array_like, scipy.sparse matrix or DataFrame
            Expression, cells x genes (required unless ``data`` is an AnnData or a path).
        groups : str or array_like, optional
            Column name or labels of the grouping factor.
        vc_formula : dict, optional
            Name -> one-sided formula (statsmodels' meaning), e.g.
            ``{"celltype": "0 + C(cls)"}``; nested within ``groups`` if given.
        re_formula : str, optional
            ``"1"`` adds a random group intercept alongside ``vc_formula``;
            e.g. ``"~ 1 + x"`` gives correlated random intercepts and slopes per
            group (statsmodels' meaning; see ``docs/random_slopes.rst``).
        independent_re : bool
            With a random-slope ``re_formula``: independent random effects
            (lme4's ``(1 + x || g)``).
        transform : {None, "log2p1", "log1p"} or callable
            Transform of the responses, applied chunk by chunk.
        layer : str, optional
            With an AnnData ``data``: use ``data.layers[layer]`` instead of ``data.X``.
            (An AnnData ``data``, in memory or backed, supplies ``obs`` as the
            covariates, the expression matrix and ``var_names`` as gene names.)
        missing : {"none", "drop"}
            ``"drop"`` drops every cell with NaN or inf in a variable of the
            formulas, in ``groups`` or in any gene of ``endog`` (one warning;
            the count is ``model.n_dropped``); ``"none"`` raises instead.
        make_unique : bool
            Rename duplicate gene names like anndata's ``var_names_make_unique``
            (``"A", "A-1", "A-2"``) with a warning instead of raising.
        group_cov : DataFrame or array_like, optional
            Known covariance (kinship) ``K`` among the levels of ``groups``
            (DataFrame indexed and columned by the labels, or an array in sorted
            label order): group intercepts ``u ~ N(0, s_g K)``. See
            :mod:`flashmm.kinship` and ``docs/kinship.rst``.
        weights : array_like, DataFrame or VoomResult, optional
            Precision weights, cells x genes (or one per cell, or a
            :class:`~flashmm.VoomResult`), as in :class:`MultiGeneMixedLM`:
            lme4's ``lmer(..., weights = w)``.
        """
        from ._anndata import anndata_inputs, is_anndata, open_anndata

        if isinstance(data, (str, os.PathLike)):
            with open_anndata(data) as adata:
                return cls.from_formula(
                    formula, adata, endog=endog, groups=groups, vc_formula=vc_formula,
                    re_formula=re_formula, transform=transform, independent_re=independent_re,
                    gene_names=gene_names, chunk_size=chunk_size, layer=layer, missing=missing,
                    make_unique=make_unique, group_cov=group_cov, weights=weights,
                )
        if is_anndata(data):
            if endog is not None:
                raise DesignError("with an AnnData, leave endog=None (the expression is X or a layer).")
            data, endog, names = anndata_inputs(data, layer)
            gene_names = names if gene_names is None else gene_names
        if endog is None:
            raise DesignError("from_formula needs endog (the cells x genes expression matrix).")
        check_missing_option(missing)
        if isinstance(data, pd.DataFrame):
            check_orientation(endog, len(data))
        n_dropped = 0
        if missing == "drop":
            bad = missing_formula_cells(formula, data, groups, vc_formula)
            if re_formula is not None and re_formula.strip().lstrip("~").strip() != "1":
                bad |= missing_formula_cells(re_formula, data)
            bad |= nonfinite_cells(endog, chunk_size)
            n_dropped = int(bad.sum())
            if n_dropped:
                keep = report_dropped(bad)
                data, endog = data.iloc[keep], take_cells(endog, keep)
                groups = groups if groups is None or isinstance(groups, str) else take_rows(groups, keep)
                weights = _rows_of_weights(weights, keep)
        design = build_formula_design(formula, data, groups=groups, vc_formula=vc_formula,
                                      re_formula=re_formula, independent_re=independent_re,
                                      group_cov=group_cov)
        stats = SufficientStats.from_design(
            design, endog, transform=transform, chunk_size=chunk_size, gene_names=gene_names,
            make_unique=make_unique,
        )
        stats.info["n_dropped"] = n_dropped
        model = cls.__new__(cls)
        model._init_from(stats, design)
        model.n_dropped = n_dropped
        model._add_weights(weights, endog, transform, chunk_size)
        return model

    # ---------------------------------------------------------------- info
    @property
    def exog_names(self) -> list[str]:
        """Fixed-effect term names."""
        return list(self.stats.exog_names)

    @property
    def gene_names(self) -> list[str]:
        """Gene names."""
        return list(self.stats.gene_names)

    @property
    def nobs(self) -> int:
        """Number of cells."""
        return int(self.stats.n)

    def __repr__(self) -> str:
        return f"MultiGeneMixedLM({self.stats!r})"

    # ----------------------------------------------------------------- fit
    def fit(
        self,
        reml: bool = True,
        start_params: Any = None,
        maxiter: int = 200,
        tol: float = 1e-10,
        allow_negative_variance: bool = False,
        df_method: str = "satterthwaite",
        *,
        n_jobs: int | None = None,
        max_memory: int | float | str | None = None,
    ) -> MultiGeneMixedLMResults:
        """Fit every gene at once.

        Parameters
        ----------
        reml : bool
            REML (default) or ML.
        start_params : array_like, optional
            Starting variance ratios ``s_i / s`` (length k, or genes x k) for the
            several-component optimiser, tried besides its default start (with
            random slopes: lme4's ``theta``). The one-component path needs none.
        maxiter : int
            Maximum iterations of the optimiser.
        tol : float
            Convergence tolerance (log-ratio step for one component, Newton
            decrement of ``-2 log L`` for several).
        allow_negative_variance : bool
            Reproduce R FLASHMM's unconstrained Fisher-scoring estimates
            (variances may be negative).
        df_method : {"satterthwaite", "kenward-roger", "residual", "normal"}
            Default reference distribution of the tests (overridable per test).
            Kenward-Roger (pbkrtest's, as lmerTest's ``ddf="Kenward-Roger"``)
            also adjusts the covariance of the fixed effects the tests use
            (:meth:`~flashmm.MultiGeneMixedLMResults.cov_params_kr`); it
            needs ``reml=True``.
        n_jobs : int, optional
            Threads for the structured engine (several components, random
            slopes); default (or -1): every core; -2 all but one, and so on,
            as joblib counts.
        max_memory : int, float or str, optional
            Memory the fit may use, in bytes or as ``"2GB"`` (default: half of
            the machine's RAM).  Gene chunks are sized to it; a model that
            cannot fit within it is refused before anything is allocated
            (:class:`~flashmm.MemoryBudgetError`, saying what it needs).

        Returns
        -------
        MultiGeneMixedLMResults
            A :class:`~flashmm.WeightedMixedLMResults` for a model with
            ``weights=`` (fitted from per-gene weighted statistics in gene
            chunks sized by ``max_memory``; ``n_jobs`` does not apply).
        """
        df_method = check_df_method(df_method, reml)
        start = None if start_params is None else np.asarray(start_params, dtype=float)
        if self.weighted is not None:
            if allow_negative_variance:
                raise DesignError("allow_negative_variance=True is not available with weights=.")
            from ._weighted_results import fit_weighted

            return fit_weighted(self, reml=reml, start_params=start, maxiter=maxiter, tol=tol,
                                df_method=df_method, max_memory=max_memory)
        structured = SLOPES_KEY in self.stats.info or len(self.stats.components) > 1
        if structured and not allow_negative_variance:   # block engine: see _structure.py
            from ._slopes import fit_structured

            return fit_structured(self, reml=reml, start_params=start, maxiter=maxiter,
                                  tol=tol, df_method=df_method, n_jobs=n_jobs,
                                  max_memory=max_memory)
        if allow_negative_variance and SLOPES_KEY in self.stats.info:
            raise DesignError("allow_negative_variance=True is not available with exog_re / "
                              "re_formula random slopes.")
        eng = fit_variance_ratios(
            self.stats, reml=reml, tol=tol, maxiter=maxiter,
            allow_negative_variance=allow_negative_variance, max_memory=max_memory,
        )
        return MultiGeneMixedLMResults(self, eng, df_method=df_method)
