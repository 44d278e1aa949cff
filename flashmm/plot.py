"""Diagnostic plots: volcano and p-value QQ plots, method-comparison plots (matplotlib, optional).

matplotlib is imported inside the functions, so ``import flashmm.plot`` works
without it; calling a plot function without matplotlib raises ImportError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .contrasts import MultiGeneContrastResults

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["volcano", "qq", "calibration_qq", "power_fdp"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("flashmm.plot needs matplotlib: pip install 'flashmm[plot]'.") from err
    return plt


def _tidy(obj: Any, contrast: Any) -> pd.DataFrame:
    """A tidy frame (gene, contrast, effect, pvalue, padj) from any accepted input."""
    if isinstance(obj, pd.DataFrame):
        frame = obj
    elif isinstance(obj, MultiGeneContrastResults):
        frame = obj.summary_frame()
    elif hasattr(obj, "t_test"):
        if contrast is None:
            raise ValueError("volcano of a fit needs contrast= (a term name or contrast expression).")
        frame = obj.t_test(contrast).summary_frame()
        contrast = None
    else:
        raise TypeError(
            "volcano expects a MultiGeneContrastResults, a MultiGeneMixedLMResults with "
            f"contrast=, or a tidy DataFrame; got {type(obj).__name__}."
        )
    missing = [c for c in ("effect", "pvalue") if c not in frame.columns]
    if missing:
        raise ValueError(f"the table lacks column(s) {missing}; expected summary_frame() columns.")
    if contrast is not None:
        if "contrast" not in frame.columns:
            raise ValueError("the table has no 'contrast' column to select from.")
        wanted = [contrast] if isinstance(contrast, str) else list(contrast)
        unknown = sorted(set(wanted) - set(frame["contrast"].unique()))
        if unknown:
            raise ValueError(f"contrast(s) {unknown} not in the table; available: "
                             f"{sorted(frame['contrast'].unique())}.")
        frame = frame[frame["contrast"].isin(wanted)]
    return frame


def volcano(
    results_or_frame: Any,
    contrast: Any = None,
    ax: Axes | None = None,
    alpha: float = 0.05,
    label_top: int = 0,
    **scatter_kws: Any,
) -> Axes:
    """Volcano plot: effect against ``-log10(p)``, significant genes highlighted.

    Parameters
    ----------
    results_or_frame : MultiGeneContrastResults, MultiGeneMixedLMResults or DataFrame
        Contrast results; a fit (then ``contrast`` is required and passed to
        ``t_test``); or a tidy table with ``effect`` and ``pvalue`` columns
        (and ``padj`` and ``contrast`` optionally), like ``summary_frame()``.
    contrast : str or list of str, optional
        Contrast(s) to plot; default all rows of the table.
    ax : matplotlib Axes, optional
        Axes to draw on (default: a new figure).
    alpha : float
        Genes with adjusted p-value (``padj``, else ``pvalue``) below ``alpha``
        are drawn in red.
    label_top : int
        Annotate this many most significant genes with their names.
    **scatter_kws
        Passed to ``ax.scatter``.

    Returns
    -------
    matplotlib.axes.Axes
        One point per finite (effect, p-value) row, in at most two collections
        (not significant, significant).
    """
    plt = _pyplot()
    frame = _tidy(results_or_frame, contrast)
    effect = frame["effect"].to_numpy(dtype=float)
    p = frame["pvalue"].to_numpy(dtype=float)
    padj = frame["padj"].to_numpy(dtype=float) if "padj" in frame.columns else p
    ok = np.isfinite(effect) & np.isfinite(p)
    with np.errstate(divide="ignore"):
        y = -np.log10(np.clip(p, np.finfo(float).tiny, 1.0))
    sig = ok & (padj < alpha)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4.5))
    kws = {"s": 6, "linewidths": 0} | scatter_kws
    ax.scatter(effect[ok & ~sig], y[ok & ~sig], color="0.6", label="not significant", **kws)
    if sig.any():
        ax.scatter(effect[sig], y[sig], color="tab:red", label=f"FDR < {alpha:g}", **kws)
    if label_top and "gene" in frame.columns:
        order = np.argsort(np.where(ok, p, np.inf))[:label_top]
        genes = frame["gene"].to_numpy()
        for i in order:
            if ok[i]:
                ax.annotate(str(genes[i]), (effect[i], y[i]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.axvline(0.0, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("effect")
    ax.set_ylabel(r"$-\log_{10}(p)$")
    if contrast is not None and isinstance(contrast, str):
        ax.set_title(contrast)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return ax


def qq(pvalues: Any, ax: Axes | None = None, **scatter_kws: Any) -> Axes:
    """QQ plot of p-values against the uniform distribution (``-log10`` scale).

    Parameters
    ----------
    pvalues : array_like, Series or DataFrame
        p-values; NaNs are dropped (a DataFrame is flattened).
    ax : matplotlib Axes, optional
        Axes to draw on (default: a new figure).
    **scatter_kws
        Passed to ``ax.scatter``.

    Returns
    -------
    matplotlib.axes.Axes
        One point per finite p-value, plus the identity line.
    """
    plt = _pyplot()
    p = np.asarray(pvalues, dtype=float).ravel()
    p = np.sort(p[np.isfinite(p)])
    n = p.size
    expected = -np.log10((np.arange(1, n + 1) - 0.5) / max(n, 1))
    observed = -np.log10(np.clip(p, np.finfo(float).tiny, 1.0))
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    kws = {"s": 6, "linewidths": 0, "color": "tab:blue"} | scatter_kws
    ax.scatter(expected, observed, **kws)
    top = float(expected.max()) if n else 1.0
    ax.plot([0, top], [0, top], color="0.5", lw=0.8)
    ax.set_xlabel(r"expected $-\log_{10}(p)$")
    ax.set_ylabel(r"observed $-\log_{10}(p)$")
    return ax


# ------------------------------------------------------- method comparisons
def _one_design(frame: pd.DataFrame, design: str | None, what: str) -> pd.DataFrame:
    """The rows of one design (``design=None``: the only one there is)."""
    designs = list(dict.fromkeys(frame["design"])) if "design" in frame.columns else []
    if design is None:
        if len(designs) > 1:
            raise ValueError(f"{what} has several designs {designs}; choose one with design=.")
        return frame
    if design not in designs:
        raise ValueError(f"design {design!r} is not in the {what}; it has {designs}.")
    return frame[frame["design"] == design]


def _method_labels(frame: pd.DataFrame, methods: Any) -> list[tuple[str, str]]:
    """(method, label) pairs in table order, restricted to ``methods`` if given."""
    labels = frame.groupby("method", sort=False)["label"].first() if "label" in frame.columns \
        else pd.Series(frame["method"].unique(), index=frame["method"].unique())
    if methods is not None:
        unknown = sorted(set(methods) - set(labels.index))
        if unknown:
            raise ValueError(f"method(s) {unknown} are not in the results; they have "
                             f"{list(labels.index)}.")
        labels = labels.loc[list(methods)]
    return list(labels.items())


def calibration_qq(comparison: Any, design: str | None = None, methods: Any = None,
                   ax: Axes | None = None, band: float = 0.95, ymax: float | None = None,
                   **scatter_kws: Any) -> Axes:
    """Calibration QQ plot: observed against expected ``-log10(p)`` of the null genes, per method.

    Parameters
    ----------
    comparison : flashmm.compare.Comparison or DataFrame
        A comparison, or its tidy ``pvalues`` table (columns ``method``,
        ``pvalue``, ``is_de`` and optionally ``design``, ``label``).
    design : str, optional
        Which design to plot (needed when there are several).
    methods : list of str, optional
        Methods to draw (default: all, in table order).
    ax : matplotlib Axes, optional
        Axes to draw on (default: a new figure).
    band : float
        Pointwise probability band of uniform order statistics (Beta
        quantiles) drawn in grey around the identity; 0 draws none.
    ymax : float, optional
        Upper limit of the observed axis.  Default: twice the largest expected
        value, so that a badly calibrated method does not flatten the others
        (its points leave the axes); ``numpy.inf`` shows every point.
    **scatter_kws
        Passed to ``ax.scatter``.

    Returns
    -------
    matplotlib.axes.Axes
        One point collection per method (null genes pooled over the datasets),
        the identity line and the band.
    """
    from scipy import stats as sps

    plt = _pyplot()
    frame = getattr(comparison, "pvalues", comparison)
    if not isinstance(frame, pd.DataFrame) or not {"method", "pvalue", "is_de"} <= set(frame):
        raise TypeError("calibration_qq expects a flashmm.compare.Comparison or its pvalues table "
                        "(columns method, pvalue, is_de).")
    frame = _one_design(frame, design, "p-value table")
    null = frame[~frame["is_de"].to_numpy(dtype=bool)]
    if ax is None:
        _, ax = plt.subplots(figsize=(4.8, 4.5))
    top = 1.0
    kws = {"s": 5, "linewidths": 0} | scatter_kws
    band_drawn = not band
    for method, label in _method_labels(frame, methods):
        p = null.loc[null["method"] == method, "pvalue"].to_numpy(dtype=float)
        p = np.sort(p[np.isfinite(p)])
        n = p.size
        if n == 0:
            continue
        expected = -np.log10((np.arange(1, n + 1) - 0.5) / n)
        ax.scatter(expected, -np.log10(np.clip(p, np.finfo(float).tiny, 1.0)), label=label, **kws)
        top = max(top, float(expected[0]))
        if not band_drawn:          # one band, for the first method's number of null genes
            i = np.arange(1, n + 1)
            lo = sps.beta.ppf((1 - band) / 2, i, n - i + 1)
            hi = sps.beta.ppf((1 + band) / 2, i, n - i + 1)
            ax.fill_between(expected, -np.log10(hi), -np.log10(lo), color="0.85", zorder=0, lw=0)
            band_drawn = True
    ax.plot([0, top], [0, top], color="0.4", lw=0.8, zorder=1)
    ymax = 2.0 * top if ymax is None else ymax
    if np.isfinite(ymax):
        ax.set_ylim(0, ymax)
    ax.set_xlabel(r"expected $-\log_{10}(p)$")
    ax.set_ylabel(r"observed $-\log_{10}(p)$, null tests")
    ax.legend(loc="upper left", fontsize=7, frameon=False, markerscale=2)
    return ax


def power_fdp(comparison: Any, design: str | None = None, methods: Any = None,
              ax: Axes | None = None, fdr: float | None = None, fdp_max: float | None = None,
              **plot_kws: Any) -> Axes:
    """Power against observed false discovery proportion, per method (mean over datasets).

    Parameters
    ----------
    comparison : flashmm.compare.Comparison or DataFrame
        A comparison (its :meth:`~flashmm.compare.Comparison.power_fdp_curve`
        is drawn, and its table's power and FDP at the BH level as markers), or
        a curve table with columns ``method, fdp, power`` (and optionally
        ``design``, ``label``).
    design : str, optional
        Which design to plot (needed when there are several).
    methods : list of str, optional
        Methods to draw (default: all).
    ax : matplotlib Axes, optional
        Axes to draw on (default: a new figure).
    fdr : float, optional
        Draw a dotted vertical line at this FDP (default: the comparison's FDR).
    fdp_max : float, optional
        Right end of the FDP axis.  Default: 0.3, or past the largest marker.
    **plot_kws
        Passed to ``ax.plot``.

    Returns
    -------
    matplotlib.axes.Axes
        One line per method; with a Comparison one marker per method at the
        mean (FDP, power) of its Benjamini-Hochberg discoveries.
    """
    plt = _pyplot()
    table = None
    if hasattr(comparison, "power_fdp_curve"):
        curve = comparison.power_fdp_curve()
        table = _one_design(comparison.table, design, "comparison table")
        if fdr is None:
            fdr = getattr(comparison, "settings", {}).get("fdr")
    elif isinstance(comparison, pd.DataFrame) and {"method", "fdp", "power"} <= set(comparison):
        curve = comparison
    else:
        raise TypeError("power_fdp expects a flashmm.compare.Comparison or a curve table "
                        "(columns method, fdp, power).")
    curve = _one_design(curve, design, "curve table")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.8, 4.5))
    for method, label in _method_labels(curve, methods):
        part = curve[curve["method"] == method]
        (line,) = ax.plot(part["fdp"], part["power"], label=label, **({"lw": 1.4} | plot_kws))
        if table is not None:
            rows = table[table["method"] == method]
            ax.plot(rows["fdp"].mean(), rows["power"].mean(), "o", color=line.get_color(), ms=5)
    if fdr:
        ax.axvline(fdr, color="0.5", ls=":", lw=0.8)
    ax.set_xlabel("observed false discovery proportion")
    ax.set_ylabel("power")
    if fdp_max is None:
        fdp_max = 0.3 if table is None or table.empty else min(1.0, max(0.3, 1.1 * table["fdp"].max()))
    ax.set_xlim(0, fdp_max)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=7, frameon=False)
    return ax
