"""The user-facing model: :class:`MultiGeneMixedLM`.

Holds the sufficient statistics of one design and many genes; ``fit()`` runs the
batched optimiser and returns a :class:`~flashmm.results.MultiGeneMixedLMResults`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._design import Design, build_design, build_formula_design
from ._endog import DEFAULT_CHUNK_CELLS, Transform, check_orientation, endog_shape
from ._engine import fit_variance_ratios
from ._errors import DesignError
from .results import MultiGeneMixedLMResults
from .stats import SufficientStats

__all__ = ["MultiGeneMixedLM"]

_DF_METHODS = ("satterthwaite", "residual", "normal")


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
    transform : {None, "log2p1", "log1p"} or callable, optional
        Applied to the responses chunk by chunk (``"log2p1"`` is FLASHMM's
        ``is.counts``).
    gene_names, exog_names : sequence of str, optional
        Names when the inputs are not labelled.
    chunk_size : int
        Cells per chunk in the pass over ``endog``.

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
        *,
        transform: Transform = None,
        gene_names: Sequence[str] | None = None,
        exog_names: Sequence[str] | None = None,
        chunk_size: int = DEFAULT_CHUNK_CELLS,
    ) -> None:
        n, _ = endog_shape(endog)
        exog_rows = endog_shape(exog)[0] if hasattr(exog, "shape") else len(exog)
        if exog_rows != n:
            check_orientation(endog, exog_rows)
        design = build_design(exog, n, groups=groups, exog_vc=exog_vc, exog_names=exog_names)
        stats = SufficientStats.from_design(
            design, endog, transform=transform, chunk_size=chunk_size, gene_names=gene_names
        )
        self._init_from(stats, design)

    def _init_from(self, stats: SufficientStats, design: Design | None) -> None:
        self.stats = stats
        self.design = design

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
        gene_names: Sequence[str] | None = None,
        chunk_size: int = DEFAULT_CHUNK_CELLS,
    ) -> MultiGeneMixedLM:
        """Build the model from a one-sided patsy formula for the fixed effects.

        Parameters
        ----------
        formula : str
            One-sided formula, e.g. ``"~ 0 + np.log(libsize) + cls + cls:trt"``.
            Term names are those of statsmodels' ``MixedLM.from_formula``.
        data : DataFrame
            One row per cell with the variables of the formulas.
        endog : array_like, scipy.sparse matrix or DataFrame
            Expression, cells x genes (required).
        groups : str or array_like, optional
            Column name or labels of the grouping factor.
        vc_formula : dict, optional
            Name -> one-sided formula (statsmodels' meaning), e.g.
            ``{"celltype": "0 + C(cls)"}``; nested within ``groups`` if given.
        re_formula : {"1", None}
            ``"1"`` adds a random group intercept alongside ``vc_formula``.
        transform : {None, "log2p1", "log1p"} or callable
            Transform of the responses, applied chunk by chunk.
        """
        if endog is None:
            raise DesignError("from_formula needs endog (the cells x genes expression matrix).")
        if isinstance(data, pd.DataFrame):
            check_orientation(endog, len(data))
        design = build_formula_design(formula, data, groups=groups, vc_formula=vc_formula,
                                      re_formula=re_formula)
        stats = SufficientStats.from_design(
            design, endog, transform=transform, chunk_size=chunk_size, gene_names=gene_names
        )
        model = cls.__new__(cls)
        model._init_from(stats, design)
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
    ) -> MultiGeneMixedLMResults:
        """Fit every gene at once.

        Parameters
        ----------
        reml : bool
            REML (default) or ML.
        start_params : array_like, optional
            Starting variance ratios ``s_i / s`` (length k, or genes x k) for the
            several-component optimiser. The one-component path needs none.
        maxiter : int
            Maximum iterations of the optimiser.
        tol : float
            Convergence tolerance (log-ratio step for one component, Newton
            decrement of ``-2 log L`` for several).
        allow_negative_variance : bool
            Reproduce R FLASHMM's unconstrained Fisher-scoring estimates
            (variances may be negative).
        df_method : {"satterthwaite", "residual", "normal"}
            Default reference distribution of the tests (overridable per test).

        Returns
        -------
        MultiGeneMixedLMResults
        """
        if df_method not in _DF_METHODS:
            raise ValueError(f"df_method must be one of {_DF_METHODS}, got {df_method!r}.")
        start = None if start_params is None else np.asarray(start_params, dtype=float)
        eng = fit_variance_ratios(
            self.stats, reml=reml, start_ratios=start, tol=tol, maxiter=maxiter,
            allow_negative_variance=allow_negative_variance,
        )
        return MultiGeneMixedLMResults(self, eng, df_method=df_method)
