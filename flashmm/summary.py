"""Summaries of many genes at once as statsmodels ``Summary`` objects.

:func:`fit_summary` describes a whole fit (model information, then per fixed
term and per variance component); :func:`contrast_summary` the tests of
contrasts (counts per contrast, then the top genes).  Tables are padded to one
width (statsmodels' ``Summary`` widens tables with an index past its rules).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from statsmodels.iolib import summary2

__all__ = ["fit_summary", "contrast_summary", "AlignedSummary"]


# ------------------------------------------------------------ formatting
def _general(x: float) -> str:
    """Four significant digits, blank for NaN."""
    return f"{x:.4g}" if np.isfinite(x) else ""


def _df_text(x: float) -> str:
    """Degrees of freedom with one decimal (no exponent), ``inf`` for the normal."""
    if np.isinf(x):
        return "inf"
    return f"{x:.1f}" if np.isfinite(x) else ""


def _p_text(x: float) -> str:
    """A p-value with three significant digits (exponents are natural here)."""
    return f"{x:.3g}" if np.isfinite(x) else ""


def _count_text(x: float) -> str:
    return str(int(x)) if np.isfinite(x) else ""


def _formatted(table: pd.DataFrame, formats: dict[str, Any]) -> pd.DataFrame:
    """Every column as strings, through ``formats[column]`` (default :func:`_general`)."""
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        fmt = formats.get(col, _general)
        out[col] = [x if isinstance(x, str) else fmt(x) for x in table[col]]
    return out


# -------------------------------------------------------------- alignment
def _table_width(frame: pd.DataFrame, settings: dict[str, Any]) -> int:
    """Width of a table printed on its own by statsmodels' ``Summary``."""
    alone = summary2.Summary()
    alone.tables.append(frame)
    alone.settings.append(settings)
    return max(len(line) for line in alone.as_text().splitlines())


def _aligned_tables(tables: list[pd.DataFrame], settings: list[dict[str, Any]]) -> list[pd.DataFrame]:
    """Copies of ``tables``, those with an index widened to the width of the widest.

    statsmodels spreads the missing width over ``ncols - 1`` column gaps, but
    a table with an index has ``ncols`` of them, so it ends up wider than the
    summary's rules. Widening the columns ourselves leaves statsmodels
    nothing to spread. Headers are right-justified over their columns, as the
    numbers (statsmodels centres a header shorter than its column).
    """
    widths = [_table_width(t, s) for t, s in zip(tables, settings, strict=True)]
    target = max(widths, default=0)
    return [_widened(table, target - width) if setting["index"] else table
            for table, setting, width in zip(tables, settings, widths, strict=True)]


def _widened(table: pd.DataFrame, extra: int) -> pd.DataFrame:
    """``table`` with its columns ``extra`` (>= 0) characters wider in all, spread evenly.

    Each header is right-justified to its column's width plus its share, so
    the column grows by exactly that share.
    """
    k = table.shape[1]
    if k == 0:
        return table
    names = {}
    for i, col in enumerate(table.columns):
        share = extra // k + (1 if i < extra % k else 0)
        width = max([len(str(col))] + [len(str(v)) for v in table[col]])
        names[col] = str(col).rjust(width + share)
    return table.rename(columns=names)


class AlignedSummary(summary2.Summary):
    """statsmodels' ``Summary`` whose text keeps every table within its rules.

    ``as_text`` (and ``print``) pads the tables with an index to the width of
    the widest table; ``tables`` keep their own column names.
    """

    def as_text(self) -> str:
        """The summary as text, tables aligned."""
        tables = self.tables
        self.tables = _aligned_tables(tables, self.settings)
        try:
            return super().as_text()
        finally:
            self.tables = tables


# ------------------------------------------------------------ whole fit
def fit_summary(res: Any, alpha: float = 0.05, fdr: float = 0.05,
                terms: Sequence[str] | None = None, df_method: str | None = None) -> Any:
    """Summary of a whole fit: model information, fixed terms, variance components.

    Parameters
    ----------
    res : MultiGeneMixedLMResults
        The fit.
    alpha : float
        Unused; kept for the signature of ``summary``.
    fdr : float
        FDR level of the ``Genes FDR<fdr`` column: genes whose coefficient
        differs from 0 (t-test with the fit's ``df_method``, Benjamini-Hochberg
        within each term).
    terms : sequence of str, optional
        Terms for which that count is shown (the effects of interest); blank
        for the others. Default: every term. A test of a coefficient against 0
        means little for terms such as cell-type means, where every gene counts.
    df_method : str, optional
        df of the tests (and, for ``"kenward-roger"``, the adjusted standard
        errors); default the fit's.

    Returns
    -------
    statsmodels.iolib.summary2.Summary
    """
    shown = _check_terms(res, terms)
    method = res._check_df_method(df_method)
    smry = AlignedSummary()
    smry.add_dict(_fit_info(res, method))
    smry.add_title("Multi-gene Mixed Linear Model Results")
    smry.add_df(_term_table(res, fdr, shown, method), align="r")
    smry.add_df(_variance_table(res), align="r")
    what = "every term" if terms is None else "the effects of interest only (blank elsewhere)"
    smry.add_text(f"Genes FDR<{fdr:g}: genes whose coefficient differs from 0 (Benjamini-Hochberg "
                  f"within each term), shown for {what}.")
    return smry


def _check_terms(res: Any, terms: Sequence[str] | None) -> list[str]:
    if terms is None:
        return list(res.exog_names)
    terms = [terms] if isinstance(terms, str) else list(terms)
    unknown = [t for t in terms if t not in res.exog_names]
    if unknown:
        raise ValueError(f"unknown term(s) {unknown}; terms are {res.exog_names}.")
    return terms


def _fit_info(res: Any, df_method: str) -> dict[str, str]:
    comps = ", ".join(f"{c.name} ({c.size})" for c in res.stats.components)
    return {
        "Model:": "MultiGeneMixedLM",
        "Method:": res.method,
        "No. Cells:": str(res.nobs),
        "No. Genes:": str(res.n_genes),
        "Random components:": comps,
        "Df method:": df_method,
        "Genes converged:": str(int(res.converged.sum())),
        "Genes at boundary:": str(int(res.boundary.sum())),
        "Genes not fitted:": str(int((res.status != "ok").sum())),
        "Optimizer:": res.optimizer,
    }


def _term_table(res: Any, fdr: float, shown: list[str], df_method: str) -> pd.DataFrame:
    """Per fixed term: genes at the FDR (for ``shown``), median effect, SE and df."""
    tests = res.t_test(np.eye(res.k_fe), df_method=df_method)
    padj = tests.padj.to_numpy()
    count_col = f"Genes FDR<{fdr:g}"
    with np.errstate(invalid="ignore"):
        counts = np.sum(padj < fdr, axis=0).astype(float)
    counts[[t not in shown for t in res.exog_names]] = np.nan
    table = pd.DataFrame({
        count_col: counts,
        "Median effect": _median(res.fe_params.to_numpy()),
        "Median Std.Err.": _median(tests.sd.to_numpy()),
        "Median df": _median(tests.df_denom.to_numpy()),
    }, index=res.exog_names)
    return _formatted(table, {count_col: _count_text, "Median df": _df_text})


def _median(values: np.ndarray) -> np.ndarray:
    """Column medians over the genes, NaN left out (NaN for a column without numbers)."""
    if values.shape[0] == 0:
        return np.full(values.shape[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN column: NaN
        return np.nanmedian(values, axis=0)


def _variance_table(res: Any) -> pd.DataFrame:
    vc = res.vcomp
    table = pd.DataFrame({
        "Median variance": vc.median(),
        "Genes at 0": (vc == 0).sum().astype(float),
        "Median ICC": res.icc.median(),
    })
    table.loc["residual"] = [float(res.scale.median()), 0.0, np.nan]
    return _formatted(table, {"Genes at 0": _count_text})


# ------------------------------------------------------------- contrasts
def contrast_summary(con: Any, top: int | None = 10, alpha: float = 0.05,
                     fdr: float = 0.05) -> Any:
    """Summary of contrast tests for many genes: counts per contrast, then the top genes.

    Parameters
    ----------
    con : MultiGeneContrastResults
        The tests.
    top : int or None
        Number of (gene, contrast) rows of the second table, the smallest
        ``padj`` first (ties by p-value); None lists every gene and contrast.
    alpha : float
        Level of the confidence intervals (two-sided, at the test's df).
    fdr : float
        FDR level of the counts per contrast.

    Returns
    -------
    statsmodels.iolib.summary2.Summary
    """
    frame = con.summary_frame(alpha=alpha)
    smry = AlignedSummary()
    smry.add_dict(_contrast_info(con, frame, fdr))
    smry.add_title("Multi-gene Contrast Results")
    smry.add_df(_per_contrast_table(con, fdr), align="r")
    ranked = frame.sort_values(["padj", "pvalue"], kind="stable")
    rows = ranked if top is None else ranked.head(top)
    smry.add_df(_top_table(rows, alpha, normal=bool(np.all(np.isinf(frame["df"])))), align="r")
    which = "every gene and contrast" if top is None else f"the top {len(rows)} (gene, contrast) pairs"
    smry.add_text(f"Rows: {which}, by padj (Benjamini-Hochberg within each contrast), then p-value. "
                  f"Intervals at {1 - alpha:.0%}, two-sided, with the test's df.")
    return smry


def _contrast_info(con: Any, frame: pd.DataFrame, fdr: float) -> dict[str, str]:
    hits = frame["padj"].to_numpy() < fdr
    return {
        "No. Genes:": str(con.effect.shape[0]),
        "Contrasts:": str(len(con.contrast_names)),
        "Df method:": con.df_method,
        "Alternative:": con.alternative,
        f"Discoveries (FDR<{fdr:g}):": str(int(hits.sum())),
        "Genes not tested:": str(int(np.all(~np.isfinite(con.pvalue.to_numpy()), axis=1).sum())),
    }


def _per_contrast_table(con: Any, fdr: float) -> pd.DataFrame:
    with np.errstate(invalid="ignore"):
        hit = con.padj.to_numpy() < fdr
        effect = con.effect.to_numpy()
        table = pd.DataFrame({
            f"Genes FDR<{fdr:g}": hit.sum(axis=0).astype(float),
            "up": (hit & (effect > 0)).sum(axis=0).astype(float),
            "down": (hit & (effect < 0)).sum(axis=0).astype(float),
            "Median effect": _median(effect),
            "Median df": _median(con.df_denom.to_numpy()),
        }, index=con.contrast_names)
    counts = {c: _count_text for c in table.columns[:3]}
    return _formatted(table, {**counts, "Median df": _df_text})


def _top_table(rows: pd.DataFrame, alpha: float, normal: bool) -> pd.DataFrame:
    stat = "z" if normal else "t"
    table = pd.DataFrame({
        "Contrast": rows["contrast"].astype(str).to_numpy(),
        "Effect": rows["effect"].to_numpy(),
        "Std.Err.": rows["se"].to_numpy(),
        stat: rows["t"].to_numpy(),
        "df": rows["df"].to_numpy(),
        f"P>|{stat}|": rows["pvalue"].to_numpy(),
        "padj": rows["padj"].to_numpy(),
        f"[{alpha / 2:g}": rows["ci_low"].to_numpy(),
        f"{1 - alpha / 2:g}]": rows["ci_high"].to_numpy(),
    }, index=pd.Index(rows["gene"].astype(str).to_numpy()))
    return _formatted(table, {"df": _df_text, f"P>|{stat}|": _p_text, "padj": _p_text})
