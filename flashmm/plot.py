"""Diagnostic plots: volcano and p-value QQ plots (matplotlib, an optional extra).

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

__all__ = ["volcano", "qq"]


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
