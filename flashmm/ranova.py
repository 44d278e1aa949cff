"""lmerTest's ``ranova``: likelihood-ratio tests of the random effects, every gene at once.

:func:`ranova_table` (``results.ranova()``) drops each random-effects term in
turn, refits the smaller model from the same sufficient statistics (the
columns of ``Z`` that stay: ``Z'Z``, ``Z'X`` and ``Z'Y`` are subset, no pass over
the cells) and compares the log-likelihoods, as lmerTest's ``ranova`` with its
default ``reduce.terms = TRUE``:

* a variance component (a random intercept ``(1 | g)``, a nested or crossed
  component) is dropped; dropping the only one leaves the fixed-effects linear
  model, whose REML (or ML) log-likelihood is R's ``logLik(lm, REML = TRUE)``,
  the limit of the mixed model's at variance 0 (the same convention as
  ``results.llf``);
* correlated random slopes ``(1 + x | g)`` are reduced one slope at a time,
  ``(1 + x | g)`` to ``(1 | g)`` (lmerTest's row ``x in (1 + x | g)``; here
  ``"x in g"``), dropping the slope's variance and its covariances; with
  independent effects ``(1 + x || g)``, which lme4 splits into ``(1 | g) + (0 +
  x | g)``, the intercept (row ``"g"``, lmerTest's ``(1 | g)``) and each slope
  (``"x in g"``, lmerTest's ``x in (0 + x | g)``) are dropped in turn.  A lone
  slope ``(0 + x | g)`` is dropped entirely: lmerTest replaces it by ``(1 | g)``
  instead, which is not a reduction of the model (its ``Df`` is 0).

``npar`` counts the fixed effects, the covariance parameters and the residual
variance (R's ``attr(logLik, "df")``); ``AIC = -2 logLik + 2 npar`` (REML or ML,
as lmerTest), ``LRT = 2 (logLik_full - logLik_reduced)`` (not truncated at 0)
and ``Df`` the difference of ``npar``.  The p-value is lmerTest's chi-square on
``Df``; ``mixture=True`` gives the 50:50 mixture of chi-square(Df - 1) and
chi-square(Df) instead (Self and Liang 1987, Stram and Lee 1994), the
asymptotic null distribution when the dropped variance lies on the boundary of
its space: ``p = P(chi2_1 >= LRT) / 2`` for one variance, and p = 1 for an LRT of
0 (below ``1e-9 max(1, |logLik|)``, the round-off of the log-likelihoods).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from ._components import RandomComponent
from ._errors import ConvergenceWarning
from ._exog_re import SLOPES_KEY
from ._reduce import residual_ss
from .contrasts import bh_adjust

__all__ = ["ranova_table", "reduced_models", "linear_model_llf", "COLUMNS"]

COLUMNS = ["npar", "logLik", "AIC", "LRT", "Df", "pvalue", "padj"]
#: with ``mixture=True``, an LRT below this times ``max(1, |logLik|)`` counts as 0 (round-off)
ZERO_LRT = 1e-9
NONE_ROW = "<none>"


@dataclasses.dataclass(frozen=True)
class ReducedModel:
    """One single-term deletion: its row name and sufficient statistics (None: no random effects)."""

    name: str
    stats: Any


# --------------------------------------------------------------- reductions
def subset_columns(stats: Any, keep: np.ndarray, components: tuple[RandomComponent, ...],
                   info: dict[str, Any]) -> Any:
    """The statistics with only the random-effect columns ``keep`` (in order).

    Parameters
    ----------
    stats : SufficientStats
        The full model's statistics.
    keep : ndarray of int
        Columns of ``Z`` that stay.
    components : tuple of RandomComponent
        The components of the kept columns, in their order.
    info : dict
        Provenance of the reduced statistics.
    """
    return dataclasses.replace(stats, ZZ=stats.ZZ[np.ix_(keep, keep)], ZX=stats.ZX[keep],
                               ZY=stats.ZY[keep], components=components, info=info)


def _offsets(stats: Any) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(stats.sizes)]).astype(int)


def drop_component(stats: Any, i: int) -> Any:
    """Statistics without component ``i`` (None when it is the only one)."""
    if len(stats.components) == 1:
        return None
    off = _offsets(stats)
    keep = np.concatenate([np.arange(off[j], off[j + 1]) for j in range(len(stats.components))
                           if j != i])
    comps = tuple(c for j, c in enumerate(stats.components) if j != i)
    info = dict(stats.info)
    if i == 0:
        info.pop(SLOPES_KEY, None)       # the random-slope block was component 0
    return subset_columns(stats, keep, comps, info)


def drop_slope(stats: Any, k: int) -> Any:
    """Statistics with random effect ``k`` (position in ``exog_re``) removed from ``Psi``.

    Component 0 holds ``r`` consecutive columns per group; column ``k`` of every
    group goes.  When only the group intercept is left the component becomes a
    plain group intercept, otherwise the statistics keep ``r - 1`` random effects
    per group (correlated or independent as before).
    """
    meta = dict(stats.info[SLOPES_KEY])
    r, names = int(meta["dim"]), list(meta["names"])
    comp = stats.components[0]
    stay = [j for j in range(r) if j != k]
    own = np.arange(comp.size).reshape(-1, r)[:, stay].ravel()
    rest = np.arange(comp.size, stats.k_re)
    info = dict(stats.info)
    groups = tuple(comp.groups[j] for j in own)
    cols = tuple(comp.columns[j] for j in own)
    if [names[j] for j in stay] == [meta["group_name"]]:
        del info[SLOPES_KEY]
        if len(stats.components) == 1:
            new = RandomComponent(comp.name, groups)
        else:   # nested within groups, as re_formula="1" spells the group intercept
            new = RandomComponent(comp.name, tuple(f"{g}:0" for g in groups), groups,
                                  ("0",) * len(groups))
    else:
        info[SLOPES_KEY] = {**meta, "names": [names[j] for j in stay], "dim": len(stay)}
        new = RandomComponent(comp.name, tuple(f"{g}:{c}" for g, c in zip(groups, cols,
                                                                         strict=True)),
                              groups, cols)
    return subset_columns(stats, np.concatenate([own, rest]), (new,) + stats.components[1:],
                          info)


def reduced_models(stats: Any) -> list[ReducedModel]:
    """lmerTest's single-term deletions of the random effects, with their names.

    Variance components are dropped (row: the component's name); random
    effects per group ``(1 + x | g)`` lose one slope at a time (row ``"x in
    g"``), and with independent effects ``(1 + x || g)`` (lme4's ``(1 | g) +
    (0 + x | g)``) the intercept can go too (row ``"g"``).  A single random
    slope ``(0 + x | g)`` is dropped entirely (row ``"x in g"``).
    """
    meta = stats.info.get(SLOPES_KEY)
    out = []
    for i, comp in enumerate(stats.components):
        if i == 0 and meta is not None:
            out += _slope_reductions(stats, meta)
            continue
        out.append(ReducedModel(comp.name, drop_component(stats, i)))
    return out


def _slope_reductions(stats: Any, meta: dict[str, Any]) -> list[ReducedModel]:
    names, group = list(meta["names"]), str(meta["group_name"])
    if len(names) == 1:
        return [ReducedModel(f"{names[0]} in {group}", drop_component(stats, 0))]
    out = []
    for k, name in enumerate(names):
        if name != group:
            out.append(ReducedModel(f"{name} in {group}", drop_slope(stats, k)))
        elif meta["independent"]:        # lme4's separate term (1 | g)
            out.append(ReducedModel(group, drop_slope(stats, k)))
    return out


# ---------------------------------------------------------------- likelihoods
def linear_model_llf(stats: Any, reml: bool) -> np.ndarray:
    """Log-likelihood of the fixed-effects linear model of every gene (R's ``logLik.lm``).

    ``-((n - p)(1 + log(2 pi RSS / (n - p))) + log det X'X) / 2`` for REML,
    ``-n (1 + log(2 pi RSS / n)) / 2`` for ML: the mixed model's
    log-likelihood with every variance component at 0.
    """
    n, p = int(stats.n), stats.k_fe
    rss = residual_ss(stats)
    m = n - p if reml else n
    with np.errstate(divide="ignore", invalid="ignore"):
        llf = -0.5 * m * (1.0 + np.log(2.0 * np.pi * rss / m))
    if reml:
        llf = llf - 0.5 * np.linalg.slogdet(stats.XX)[1]
    return llf


def n_cov_params(res: Any) -> int:
    """Covariance parameters of a fit (``Psi``'s entries plus the variance components)."""
    return int(getattr(res, "_k_cov_params", len(res.component_names)))


# ---------------------------------------------------------------------- table
def ranova_table(res: Any, refit: Callable[[Any], Any], mixture: bool = False) -> pd.DataFrame:
    """lmerTest's ``ranova`` table of every gene (see :meth:`~flashmm.MultiGeneMixedLMResults.ranova`).

    Parameters
    ----------
    res : MultiGeneMixedLMResults
        The full fit.
    refit : callable
        Fits statistics of a reduced model the way ``res`` was fitted (same
        REML/ML) and returns its results.
    mixture : bool
        p-values from the 50:50 mixture of chi-square(Df - 1) and chi-square(Df)
        (variance on the boundary) instead of lmerTest's chi-square(Df).

    Returns
    -------
    DataFrame
        Indexed by (gene, row), rows ``"<none>"`` then one per deleted term;
        columns ``npar, logLik, AIC, LRT, Df, pvalue, padj`` (``padj``:
        Benjamini-Hochberg within each row over the fitted genes).
    """
    stats = res.stats
    reductions = reduced_models(stats)
    usable = np.asarray(res.status == "ok")
    npar = [res.k_fe + n_cov_params(res) + 1]
    llf = [np.where(usable, res.llf.to_numpy(), np.nan)]
    for red in reductions:
        n_red, ll_red = _fit_reduced(red, stats, res.reml, refit)
        npar.append(res.k_fe + n_red + 1)
        llf.append(np.where(usable, ll_red, np.nan))
    return _assemble(res.gene_names, [NONE_ROW] + [r.name for r in reductions],
                     np.array(npar, dtype=float), np.column_stack(llf), mixture)


def _fit_reduced(red: ReducedModel, full: Any, reml: bool, refit: Callable[[Any], Any]
                 ) -> tuple[int, np.ndarray]:
    """Covariance parameters and log-likelihood of one reduced model."""
    if red.stats is None:          # no random effects left: the linear model of X'X, X'Y, yy
        return 0, linear_model_llf(full, reml)
    with warnings.catch_warnings():
        # genes that cannot be fitted were reported by the full fit; non-convergence is below
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = refit(red.stats)
    bad = int(np.sum(~fit.converged.to_numpy() & (fit.status.to_numpy() == "ok")))
    if bad:
        warnings.warn(f"ranova: the reduced model without {red.name!r} did not converge for "
                      f"{bad} genes; see their LRT with care.", ConvergenceWarning, stacklevel=4)
    return n_cov_params(fit), fit.llf.to_numpy()


def _assemble(genes: pd.Index, rows: list[str], npar: np.ndarray, llf: np.ndarray,
              mixture: bool) -> pd.DataFrame:
    G, R = llf.shape
    NPAR = np.broadcast_to(npar, (G, R)).astype(float)
    LRT = np.full((G, R), np.nan)
    DF = np.full((G, R), np.nan)
    LRT[:, 1:] = 2.0 * (llf[:, :1] - llf[:, 1:])
    DF[:, 1:] = npar[0] - npar[1:]
    P = lrt_pvalue(LRT, DF, mixture, zero=ZERO_LRT * np.maximum(1.0, np.abs(llf[:, :1])))
    cols = {"npar": NPAR, "logLik": llf, "AIC": -2.0 * llf + 2.0 * NPAR, "LRT": LRT, "Df": DF,
            "pvalue": P, "padj": bh_adjust(P)}
    index = pd.MultiIndex.from_product([genes, rows], names=["gene", "term"])
    return pd.DataFrame({k: cols[k].ravel() for k in COLUMNS}, index=index)


def lrt_pvalue(lrt: np.ndarray, df: np.ndarray, mixture: bool = False,
               zero: np.ndarray | float = 0.0) -> np.ndarray:
    """Upper-tail p-value of the LRT: chi-square(df), or the 50:50 chi-square(df - 1, df) mixture.

    Parameters
    ----------
    lrt, df : ndarray
        Statistics and their degrees of freedom (broadcast together).
    mixture : bool
        The mixture instead of chi-square(df).  chi-square(0) is the point
        mass at 0, so an LRT of 0 (a variance estimated at 0 in the full
        model) gives p = 1 where any positive LRT gives at most 1/2.
    zero : ndarray or float
        With ``mixture``: an LRT at most this counts as 0 (the round-off of
        the log-likelihoods, about 1e-13 for a log-likelihood of 500, must
        not turn p = 1 into 1/2).

    Returns
    -------
    ndarray
        p-values; a negative LRT (the reduced model fits better within the
        optimiser's precision) gives p = 1, as R's ``pchisq``.
    """
    with np.errstate(invalid="ignore"):
        plain = sps.chi2.sf(lrt, np.where(df > 0, df, np.nan))
        if not mixture:
            return plain
        lower = np.where(df > 1, sps.chi2.sf(lrt, np.where(df > 1, df - 1, 1.0)),
                         np.where(lrt > 0, 0.0, 1.0))
        out = 0.5 * plain + 0.5 * lower
    return np.where(np.isnan(lrt) | np.isnan(df), np.nan, np.where(lrt > zero, out, 1.0))
