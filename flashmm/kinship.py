"""Known covariance (kinship) among groups, heritability, and lmmlite-style GWAS fits.

The model is ``y = X b + Z u + e`` with ``u ~ N(0, s_g K)`` for a known positive
semi-definite ``K`` among the levels of ``groups`` and ``e ~ N(0, s I)``.  Give
``group_cov=K`` to :class:`~flashmm.MultiGeneMixedLM` (cells nested in samples of
related donors), or use :func:`fit_kinship` for the one-observation-per-individual
model of GWAS / QTL mapping (R/lmmlite's ``fitLMM``), which also fits phenotypes
with different missing patterns in one call.  See ``docs/kinship.rst``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._errors import DataError, DesignError
from .model import MultiGeneMixedLM
from .results import MultiGeneMixedLMResults

__all__ = [
    "fit_kinship",
    "fit_missing_patterns",
    "results_at_heritability",
    "MissingPatternResults",
    "lmmlite_loglik_offset",
]

_MISSING = ("drop", "none")


def _labels_of(Y: Any, K: Any, n: int) -> np.ndarray:
    """Individual labels: Y's index, else K's index (same order), else positions."""
    if isinstance(Y, (pd.DataFrame, pd.Series)):
        return np.array([str(i) for i in Y.index], dtype=object)
    if isinstance(K, pd.DataFrame) and len(K.index) == n:
        return np.array([str(i) for i in K.index], dtype=object)
    return np.array([str(i) for i in range(n)], dtype=object)


def _as_frame(Y: Any) -> pd.DataFrame:
    if isinstance(Y, pd.DataFrame):
        return Y
    if isinstance(Y, pd.Series):
        return Y.to_frame(name=Y.name if Y.name is not None else "y")
    arr = np.asarray(Y, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(f"Y must be individuals x phenotypes, got shape {arr.shape}.")
    return pd.DataFrame(arr, columns=[f"pheno{j}" for j in range(arr.shape[1])])


def lmmlite_loglik_offset(n: int, p: int, logdet_XX: float, reml: bool = True) -> float:
    """lmmlite's ``loglik`` minus the standard (lme4) log-likelihood at the same fit.

    R/lmmlite's ``calcLL`` drops constants and adds ``log|X'X|``:

    - ML: ``n/2 (1 + log(2 pi / n))``;
    - REML: ``n/2 log(2 pi / (n - p)) + (n - p)/2 + log|X'X| / 2``.

    Both depend only on the individuals included (``n`` and their covariates
    ``X``), never on the phenotype values or the kinship.

    Parameters
    ----------
    n, p : int
        Individuals and fixed-effect terms of the fit.
    logdet_XX : float
        ``log|X'X|`` of the covariates of those individuals (REML only).
    reml : bool
        REML (default) or ML.
    """
    if reml:
        return 0.5 * n * np.log(2 * np.pi / (n - p)) + 0.5 * (n - p) + 0.5 * logdet_XX
    return 0.5 * n * (1.0 + np.log(2 * np.pi / n))


def results_at_heritability(model: MultiGeneMixedLM, h2: Any,
                            reml: bool = True) -> MultiGeneMixedLMResults:
    """Estimates at a given heritability, like lmmlite's ``getMLsoln`` / ``calcLL``.

    ``s_g / s = h2 / (1 - h2)`` is fixed (per gene, or one value for all); the
    coefficients, the residual variance and the log-likelihood (lme4
    convention) are profiled as in the fit.  ``h2 = 1`` is the limit ``s = 0``.

    Parameters
    ----------
    model : MultiGeneMixedLM
        A model with one random component.
    h2 : float or array_like (n_genes,)
        Heritability in [0, 1].
    reml : bool
        REML (default) or ML profile.

    Returns
    -------
    MultiGeneMixedLMResults
        ``fe_params``, ``scale``, ``vcomp``, ``llf``, ... at ``h2``.
    """
    from ._engine import (
        STATUS_OK,
        EngineFit,
        _degenerate_status,
        _scale_and_llf,
        _top_limit_fit,
    )
    from ._reduce import reduce_stats

    stats = model.stats
    if len(stats.components) != 1:
        raise DesignError("results_at_heritability needs a model with one random component.")
    G = stats.n_genes
    h2 = np.broadcast_to(np.asarray(h2, dtype=np.float64), (G,)).copy()
    if np.any(~np.isfinite(h2) | (h2 < 0) | (h2 > 1)):
        raise ValueError("h2 must be in [0, 1].")
    with np.errstate(divide="ignore"):
        g = np.where(h2 >= 1.0, np.inf, h2 / np.where(h2 >= 1.0, 1.0, 1.0 - h2))
    red = reduce_stats(stats)
    status = _degenerate_status(stats, red.yRy)
    ok = np.flatnonzero(status == STATUS_OK)
    top = np.isinf(g)
    scale, llf = _scale_and_llf(stats, red, np.where(top, 0.0, g)[:, None], reml, ok)
    top_vcomp = _top_limit_fit(stats, red, reml, top, scale, llf) if top.any() else None
    eng = EngineFit(g[:, None], scale, llf, status == STATUS_OK, np.zeros(G, dtype=np.int64),
                    status.astype(str), reml, "fixed", None, top_vcomp)
    return MultiGeneMixedLMResults(model, eng)


def fit_missing_patterns(
    endog: Any,
    exog: Any,
    groups: Any,
    group_cov: Any,
    reml: bool = True,
    missing: str = "drop",
    *,
    exog_names: Sequence[str] | None = None,
    tol: float = 1e-10,
    maxiter: int = 200,
    df_method: str = "satterthwaite",
) -> MultiGeneMixedLMResults:
    """Fit ``group_cov`` models to responses measured on different subsets of rows.

    The columns of ``endog`` are grouped by their pattern of missing values; each
    pattern is fitted with its own sufficient statistics (the rows it observes,
    and the kinship restricted to their groups), all in one call.

    Parameters
    ----------
    endog : DataFrame or array_like, shape (n, n_responses)
        Responses (genes or phenotypes) in columns, NaN where not measured.
    exog : DataFrame or array_like, shape (n, p)
        Fixed-effects design (rows with NaN are dropped for every response with
        ``missing="drop"``).
    groups : array_like, shape (n,)
        Group (individual, donor) label of every row.
    group_cov : DataFrame or array_like
        Known covariance among the groups (see :class:`~flashmm.MultiGeneMixedLM`).
    reml : bool
        REML (default) or ML.
    missing : {"drop", "none"}
        ``"drop"``: fit each missing pattern on the rows it observes;
        ``"none"``: NaN in ``endog`` is an error.
    exog_names : sequence of str, optional
        Names of the fixed-effect terms when ``exog`` is not a DataFrame.
    tol, maxiter, df_method
        Passed to :meth:`MultiGeneMixedLM.fit`.

    Returns
    -------
    MultiGeneMixedLMResults or MissingPatternResults
        The plain results when there is a single pattern; otherwise a
        :class:`MissingPatternResults` with the responses in the original order.
    """
    if missing not in _MISSING:
        raise DesignError(f"missing must be one of {_MISSING}, got {missing!r}.")
    Y = _as_frame(endog)
    n = len(Y)
    names = [str(c) for c in Y.columns]
    if len(set(names)) != len(names):
        raise DataError("response (column) names must be unique.")
    Yv = Y.to_numpy(dtype=np.float64)
    Xdf = exog if isinstance(exog, pd.DataFrame) else None
    X = np.asarray(exog, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.shape[0] != n:
        raise DesignError(f"exog has {X.shape[0]} rows but endog has {n}; give one row per individual.")
    xnames = ([str(c) for c in Xdf.columns] if Xdf is not None else
              list(exog_names) if exog_names is not None else [f"x{j + 1}" for j in range(X.shape[1])])
    groups = np.asarray(groups, dtype=object)
    if groups.shape != (n,):
        raise DesignError(f"groups must have one label per row ({n}), got shape {groups.shape}.")
    if np.isinf(Yv).any():
        raise DataError(f"endog contains {int(np.isinf(Yv).sum())} infinite value(s).")
    nan = np.isnan(Yv)
    bad_x = ~np.all(np.isfinite(X), axis=1)
    if missing == "none":
        if nan.any() or bad_x.any():
            cols = int(np.sum(nan.any(axis=0)))
            xmsg = f"; {int(bad_x.sum())} rows have NaN or inf in exog" if bad_x.any() else ""
            raise DataError(
                f"{cols} of {len(names)} responses (genes/phenotypes) have missing values "
                f"(NaN) in {int(nan.any(axis=1).sum())} of {n} rows/cells ({int(nan.sum())} "
                f"values){xmsg}; use missing='drop' to fit each missing pattern on the rows "
                "it observes."
            )
    elif bad_x.any():
        warnings.warn(f"missing='drop': dropped {int(bad_x.sum())} of {n} rows with NaN or inf "
                      "in exog (for every response).", UserWarning, stacklevel=2)
    nan |= bad_x[:, None]
    pats, inverse = np.unique(nan.T, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    parts: list[MultiGeneMixedLMResults] = []
    for k in range(pats.shape[0]):
        cols = np.flatnonzero(inverse == k)
        rows = np.flatnonzero(~pats[k])
        if rows.size <= X.shape[1]:
            raise DataError(
                f"responses {[names[j] for j in cols[:5]]} are observed on {rows.size} rows, "
                f"not more than the {X.shape[1]} fixed-effect terms."
            )
        model = MultiGeneMixedLM(Yv[np.ix_(rows, cols)], X[rows], groups=groups[rows],
                                 group_cov=group_cov, exog_names=xnames,
                                 gene_names=[names[j] for j in cols])
        model.stats.info["missing_pattern"] = int(k)
        parts.append(model.fit(reml=reml, tol=tol, maxiter=maxiter, df_method=df_method))
    if len(parts) == 1:
        return parts[0]
    return MissingPatternResults(parts, names)


def fit_kinship(
    Y: Any,
    X: Any,
    K: Any,
    reml: bool = True,
    missing: str = "drop",
    *,
    tol: float = 1e-10,
    maxiter: int = 200,
    df_method: str = "satterthwaite",
) -> MultiGeneMixedLMResults:
    """Fit ``y = X b + g + e``, ``g ~ N(0, s_g K)``, ``e ~ N(0, s I)`` to every phenotype.

    The convenience of R/lmmlite's ``eigen_rotation`` + ``fitLMM`` (and pylmm) for
    GWAS / QTL mapping: one observation per individual, kinship ``K`` among the
    individuals, all phenotypes at once, heritability ``h2 = s_g / (s_g + s)``
    with the boundaries 0 and 1 checked explicitly.

    Parameters
    ----------
    Y : DataFrame, Series or array_like, shape (n, n_phenotypes)
        Phenotypes (columns) of the individuals (rows); NaN where missing. A
        DataFrame's index names the individuals.
    X : DataFrame or array_like, shape (n, p), or None
        Covariates, rows aligned with ``Y`` (include the intercept column);
        ``None`` for an intercept only.
    K : DataFrame or array_like, shape (n, n)
        Kinship: a DataFrame indexed and columned by the individual labels of
        ``Y`` (it may hold more individuals), or an array in the row order of ``Y``.
    reml : bool
        REML (default) or ML.
    missing : {"drop", "none"}
        ``"drop"`` (default): phenotypes are grouped by their missing pattern and
        each group is fitted on the individuals it observes, with the kinship
        submatrix of those individuals. ``"none"``: NaN is an error.
    tol, maxiter
        Convergence tolerance on ``log(s_g / s)`` and maximum iterations.
    df_method : {"satterthwaite", "kenward-roger", "residual", "normal"}
        Default df of the tests (Kenward-Roger: pbkrtest's, computed in the
        eigenbasis of the kinship, O(n) per phenotype).

    Returns
    -------
    MultiGeneMixedLMResults or MissingPatternResults
        Phenotypes as rows: ``heritability``, ``fe_params``, ``vcomp`` (``s_g``),
        ``scale`` (``s``), ``llf`` (lme4 convention; see
        :func:`lmmlite_loglik_offset`), ``random_effects`` (per individual), ...

    Examples
    --------
    >>> import numpy as np
    >>> from flashmm.kinship import fit_kinship
    >>> rng = np.random.default_rng(1)
    >>> G = rng.normal(size=(80, 200))
    >>> K = G @ G.T / 200
    >>> X = np.column_stack([np.ones(80), rng.integers(0, 2, 80)])
    >>> Y = rng.multivariate_normal(np.zeros(80), K + np.eye(80), size=3).T
    >>> res = fit_kinship(Y, X, K)
    >>> res.heritability.shape
    (3,)
    """
    Yf = _as_frame(Y)
    n = len(Yf)
    labels = _labels_of(Y, K, n)
    if X is None:
        X = pd.DataFrame({"intercept": np.ones(n)})
    if not isinstance(K, pd.DataFrame):
        arr = np.asarray(K, dtype=np.float64)
        if arr.shape != (n, n):
            raise DesignError(
                f"K given as an array must be n x n with n = {n} individuals (rows of Y), "
                f"got shape {arr.shape}; give a DataFrame indexed by the individuals otherwise."
            )
        if len(set(labels)) != n:
            raise DesignError("K given as an array needs unique individual labels (rows of Y).")
        K = pd.DataFrame(arr, index=labels, columns=labels)
    return fit_missing_patterns(Yf, X, labels, K, reml=reml, missing=missing, tol=tol,
                                maxiter=maxiter, df_method=df_method)


_TABLES = (
    "ratios", "scale", "vcomp", "cov_re", "heritability", "llf", "converged", "n_iter",
    "boundary", "status", "icc", "fe_params", "bse_fe", "bse_re", "se_vcomp", "params",
    "bse", "df_resid", "df_satterthwaite", "df_terms", "tvalues", "pvalues", "aic", "bic",
)


class MissingPatternResults(MultiGeneMixedLMResults):
    """Results of responses fitted in groups by missing pattern, in the original order.

    Every per-response table of :class:`~flashmm.MultiGeneMixedLMResults` (see
    ``_TABLES``: ``fe_params``, ``vcomp``, ``scale``, ``heritability``, ``llf``,
    ...) is available and stacks the fits of the patterns; ``nobs`` is a Series
    (observations per response); ``random_effects`` and ``random_effects_cov``
    have a column per group level (NaN where a pattern did not observe it).
    The fit of each pattern is in :attr:`parts`; contrasts (``t_test``,
    ``wald_test``) are run on a part (:meth:`part_of`).
    """

    saved_engine: str | None = None

    def __init__(self, parts: list[MultiGeneMixedLMResults], order: Sequence[str]) -> None:
        self.parts = parts
        self._order = pd.Index(list(order), name="gene")
        first = parts[0]
        self.model = None
        self.df_method = first.df_method
        self.reml = first.reml
        self.method = first.method
        self.optimizer = first.optimizer

    # -- basics ---------------------------------------------------------
    @property
    def stats(self) -> Any:  # noqa: D102
        raise AttributeError("MissingPatternResults has one set of statistics per missing "
                             "pattern: see results.parts[i].stats.")

    @property
    def gene_names(self) -> pd.Index:
        """Response names in the original column order."""
        return self._order

    @property
    def exog_names(self) -> list[str]:
        """Fixed-effect term names."""
        return self.parts[0].exog_names

    @property
    def component_names(self) -> list[str]:
        """Random component names."""
        return self.parts[0].component_names

    @property
    def k_fe(self) -> int:
        """Number of fixed-effect terms."""
        return self.parts[0].k_fe

    @property
    def n_genes(self) -> int:
        """Number of responses."""
        return len(self._order)

    @property
    def nobs(self) -> pd.Series:  # type: ignore[override]
        """Observations (rows) used for each response."""
        return self._stack([pd.Series(p.nobs, index=p.gene_names, name="nobs") for p in self.parts])

    @property
    def patterns(self) -> pd.Series:
        """Missing-pattern index of every response (position in :attr:`parts`)."""
        return self._stack([pd.Series(i, index=p.gene_names, name="pattern")
                            for i, p in enumerate(self.parts)])

    def part_of(self, name: str) -> MultiGeneMixedLMResults:
        """The fit (of one missing pattern) that holds response ``name``."""
        for p in self.parts:
            if name in p.gene_names:
                return p
        raise KeyError(f"{name!r} is not a response of these results.")

    def _stack(self, pieces: list[Any]) -> Any:
        out = pd.concat(pieces).reindex(self._order)
        out.index.name = "gene"
        return out

    def gene(self, name: str | int) -> Any:
        """One-response view (see :meth:`MultiGeneMixedLMResults.gene`)."""
        if isinstance(name, (int, np.integer)):
            name = self._order[int(name)]
        return self.part_of(str(name)).gene(name)

    def _stack_arrays(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Per-part arrays (responses first) in the original response order."""
        names = [g for p in self.parts for g in p.gene_names]
        return np.concatenate(arrays)[pd.Index(names).get_indexer(self._order)]

    def cov_params(self) -> np.ndarray:
        """Covariance of the fixed effects, array (responses, p, p)."""
        return self._stack_arrays([p.cov_params() for p in self.parts])

    def cov_params_kr(self, gene: str | int | None = None) -> np.ndarray | pd.DataFrame:
        """Kenward-Roger's adjusted covariance (see the base class), pattern by pattern."""
        if gene is not None:
            name = self._order[int(gene)] if isinstance(gene, (int, np.integer)) else str(gene)
            return self.part_of(name).cov_params_kr(name)
        return self._stack_arrays([p.cov_params_kr() for p in self.parts])

    def contrast_cov(self, df_method: str | None = None) -> np.ndarray:
        """Covariance of the fixed effects the tests with ``df_method`` use (see the base class)."""
        return self._stack_arrays([p.contrast_cov(df_method) for p in self.parts])

    def conf_int(self, alpha: float = 0.05, df_method: str | None = None) -> pd.DataFrame:
        """Confidence intervals of the fixed effects, one tidy row per response and term."""
        df = pd.concat([p.conf_int(alpha, df_method) for p in self.parts], ignore_index=True)
        rank = {g: i for i, g in enumerate(self._order)}
        key = df["gene"].map(rank) * self.k_fe + df.groupby("gene").cumcount()
        return df.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)

    def vcomp_test(self) -> pd.DataFrame:
        """One-sided z-test of the variance components (see the base class)."""
        return self._stack([p.vcomp_test() for p in self.parts])

    def _effects(self, attr: str) -> dict[str, pd.DataFrame]:
        tables = [getattr(p, attr) for p in self.parts]
        out: dict[str, pd.DataFrame] = {}
        for name in tables[0]:
            cols: list[str] = []
            for t in tables:
                cols += [c for c in t[name].columns if c not in set(cols)]
            out[name] = self._stack([t[name].reindex(columns=cols) for t in tables])
        return out

    @property
    def random_effects(self) -> dict[str, pd.DataFrame]:  # type: ignore[override]
        """BLUPs per component (responses x levels; NaN for unobserved levels)."""
        return self._effects("random_effects")

    @property
    def random_effects_cov(self) -> dict[str, pd.DataFrame]:  # type: ignore[override]
        """Conditional variances of the BLUPs (NaN for unobserved levels)."""
        return self._effects("random_effects_cov")

    def _unsupported(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "this operation needs one set of statistics; run it on a missing pattern: "
            "results.part_of(name) or results.parts[i]."
        )

    t_test = wald_test = f_test = compare_lr_test = contrast_df = contrast_df_rows = _unsupported
    kr_ftest = _unsupported
    anova = ls_means = _unsupported
    summary = summary_frame = _unsupported

    def __repr__(self) -> str:
        return (f"<MissingPatternResults: {self.n_genes} responses in {len(self.parts)} missing "
                f"patterns, {self.method}>")


def _make_table(name: str) -> property:
    def get(self: MissingPatternResults) -> Any:
        return self._stack([getattr(p, name) for p in self.parts])

    get.__doc__ = f"Stacked ``{name}`` of the missing patterns (original response order)."
    return property(get)


for _name in _TABLES:
    setattr(MissingPatternResults, _name, _make_table(_name))
del _name
