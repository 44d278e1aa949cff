"""Least-squares means and their pairwise differences (lmerTest's ``ls_means`` / ``difflsmeans``).

The least-squares mean of a level (combination) of a factor term is the model's
prediction averaged with equal weights over the levels of every other factor
in the model, numerical covariates at their mean over the cells (lmerTest's
reference grid).  Each is a contrast ``c'b`` of the fixed effects, built once
from the term structure (:mod:`flashmm._terms`) and tested for every gene as
arrays with the results' degrees of freedom.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from ._errors import TermError
from ._terms import Term, TermStructure, structure_of
from .contrasts import bh_adjust, t_quantile, two_sided_p

__all__ = ["ls_means_table", "lsmeans_contrasts", "pairwise_contrasts"]

COLUMNS = ["estimate", "se", "df", "t", "pvalue", "padj", "lower", "upper"]


def _factor_term(st: TermStructure, name: str) -> Term:
    term = st.term(name)
    if st.is_numeric_term(term):
        valid = [t.name for t in st.model_terms if not st.is_numeric_term(t)]
        raise TermError(
            f"least-squares means are defined for terms of factors only; {name!r} involves a "
            f"numerical variable. Factor terms are {valid}."
        )
    return term


def lsmeans_contrasts(st: TermStructure, term: Term) -> tuple[list[str], np.ndarray]:
    """Level labels and contrast rows of a factor term's least-squares means.

    lmerTest's ``lsmeans_contrasts``: rows of the design on the reference grid
    (every level combination, numerical factors at their mean), averaged over
    the grid rows of each level of the term.

    Parameters
    ----------
    st : TermStructure
        The term structure of the design.
    term : Term
        A term of factors only.

    Returns
    -------
    labels : list of str
        One per level (combination), ``"A"`` or ``"A:T"``; the first factor varies fastest.
    L : ndarray, shape (levels, p)
        The contrast of each mean over the fixed-effect coefficients.
    """
    grid = st.mean_grid()
    rows = st.model_rows(grid)
    ind = st.full_dummy_rows(term, grid)                     # grid rows x levels of the term
    weights = ind / ind.sum(axis=0)
    return st.full_dummy_labels(term), weights.T @ rows


def pairwise_contrasts(labels: list[str], L: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Differences of every pair of rows, in lmerTest's order (``"a - b"`` for a before b).

    Parameters
    ----------
    labels : list of str
        Names of the rows of ``L``.
    L : ndarray, shape (k, p)
        Contrast rows.

    Returns
    -------
    names : list of str
        ``"a - b"`` for every pair, ``a`` before ``b`` in ``labels``.
    rows : ndarray, shape (k (k - 1) / 2, p)
        The differences ``L[a] - L[b]``.
    """
    pairs = list(combinations(range(len(labels)), 2))
    names = [f"{labels[i]} - {labels[j]}" for i, j in pairs]
    rows = np.array([L[i] - L[j] for i, j in pairs]).reshape(len(pairs), L.shape[1])
    return names, rows


def ls_means_table(res: Any, term: str | list[str], pairwise: bool = False, alpha: float = 0.05,
                   df_method: str | None = None) -> pd.DataFrame:
    """Least-squares means (or their pairwise differences) of every gene.

    Parameters
    ----------
    res : MultiGeneMixedLMResults
        A fit of a model built with ``from_formula``.
    term : str or list of str
        Term(s) of factors only.
    pairwise : bool
        Differences of the means instead of the means.
    alpha : float
        Confidence intervals at level ``1 - alpha``.
    df_method : {"satterthwaite", "kenward-roger", "residual", "normal"}, optional
        Defaults to the fit's ``df_method``.

    Returns
    -------
    DataFrame
        See :meth:`flashmm.MultiGeneMixedLMResults.ls_means`.
    """
    method = res._check_df_method(df_method)
    st = structure_of(res.stats.info)
    names = [term] if isinstance(term, str) else list(term)
    if not names:
        raise TermError(f"give at least one term; factor terms are {st.term_names}.")
    parts = [_one_term(res, st, name, pairwise, alpha, method) for name in names]
    return pd.concat(parts).sort_index(level="gene", sort_remaining=False, kind="stable")


def _one_term(res: Any, st: TermStructure, name: str, pairwise: bool, alpha: float,
              method: str) -> pd.DataFrame:
    labels, L = lsmeans_contrasts(st, _factor_term(st, name))
    if pairwise:
        labels, L = pairwise_contrasts(labels, L)
    b = res.fe_params.to_numpy()
    est = b @ L.T
    se = np.sqrt(np.einsum("rp,gpk,rk->gr", L, res.contrast_cov(method), L))
    df = res.contrast_df(L, method)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = est / se
    pvalue = two_sided_p(t, df)
    crit = t_quantile(1 - alpha / 2, df)
    cols = {"estimate": est, "se": se, "df": df, "t": t, "pvalue": pvalue,
            "padj": bh_adjust(pvalue), "lower": est - crit * se, "upper": est + crit * se}
    index = pd.MultiIndex.from_product([res.gene_names, [name], labels],
                                       names=["gene", "term", "level"])
    return pd.DataFrame({k: np.asarray(cols[k]).ravel() for k in COLUMNS}, index=index)
