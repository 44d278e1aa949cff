"""Store results in an AnnData and read them back as a tidy table.

:func:`write_results` puts the per-gene tables of a fit (coefficients, standard
errors, p-values, df, and optionally contrasts) into ``adata.varm``, per-gene
scalars into ``adata.var`` and the model description into ``adata.uns``, all in
types that survive ``write_h5ad`` / ``read_h5ad``.  :func:`get_results_df`
rebuilds the tidy table of ``results.t_test(...).summary_frame()`` from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._errors import FlashmmError
from ._version import __version__
from .contrasts import MultiGeneContrastResults, t_quantile

if TYPE_CHECKING:
    import anndata

    from .results import MultiGeneMixedLMResults

__all__ = ["write_results", "get_results_df"]

_TABLES = ("effect", "se", "t", "df", "pvalue", "padj")
_COEF_KEYS = {"effect": "coef", "se": "se", "t": "tvalue", "df": "df", "pvalue": "pvalue", "padj": "padj"}


def _aligned(frame: pd.DataFrame, var_names: pd.Index, what: str) -> pd.DataFrame:
    """Reindex a genes x columns table to ``var_names`` (missing genes -> NaN)."""
    index = pd.Index([str(g) for g in frame.index])
    if not index.is_unique:
        raise FlashmmError(f"{what}: gene names are not unique.")
    unknown = index.difference(var_names)
    if len(unknown):
        raise FlashmmError(
            f"{what}: {len(unknown)} gene(s) of the results are not in adata.var_names "
            f"(e.g. {list(unknown[:3])}); write the results into the AnnData they were fitted on."
        )
    out = pd.DataFrame(frame.to_numpy(), index=index, columns=[str(c) for c in frame.columns])
    out = out.reindex(var_names)
    out.index = var_names
    return out


def _keys_for(key: str) -> list[str]:
    return [f"{key}_coef", f"{key}_se", f"{key}_tvalue", f"{key}_df", f"{key}_pvalue",
            f"{key}_padj", f"{key}_contrast_effect", f"{key}_contrast_se",
            f"{key}_contrast_tvalue", f"{key}_contrast_df", f"{key}_contrast_pvalue",
            f"{key}_contrast_padj", f"{key}_cov_re"]


def write_results(
    adata: anndata.AnnData,
    results: MultiGeneMixedLMResults,
    key_added: str = "flashmm",
    contrasts: Any = None,
    overwrite: bool = False,
    reloadable: bool = False,
) -> None:
    """Store a fit's per-gene results in ``adata`` (in place).

    Parameters
    ----------
    adata : anndata.AnnData
        The AnnData the model was fitted on (genes are matched by ``var_names``;
        genes not in the results get NaN).
    results : MultiGeneMixedLMResults
        The fit.
    key_added : str
        Prefix of every key written.
    contrasts : MultiGeneContrastResults or contrast specification, optional
        Contrast results, or anything :meth:`MultiGeneMixedLMResults.t_test`
        accepts (e.g. ``{"B_vs_A": "cls[C1]:trt[T.B]"}``).
    overwrite : bool
        Replace results already stored under ``key_added``.
    reloadable : bool
        Also store what :func:`flashmm.load_results` needs to rebuild the
        results object (the sufficient statistics, the fitted covariance
        parameters and the formula description, as in
        :meth:`~flashmm.MultiGeneMixedLMResults.save`) in
        ``uns[key]["reloadable"]``: ``p + q + 1`` numbers per gene plus the
        shared ``(p + q)^2``.

    Notes
    -----
    Written keys (``key`` is ``key_added``):

    * ``varm[f"{key}_coef"]``, ``_se``, ``_tvalue``, ``_df``, ``_pvalue``,
      ``_padj``: genes x terms DataFrames indexed like ``var_names`` (``padj`` is
      Benjamini-Hochberg within each term);
    * ``varm[f"{key}_contrast_effect"]``, ``_contrast_se``, ``_contrast_tvalue``,
      ``_contrast_df``, ``_contrast_pvalue``, ``_contrast_padj`` when contrasts
      are given;
    * ``var[f"{key}_scale"]``, ``_llf``, ``_converged``, ``_boundary`` and one
      ``var[f"{key}_var_{component}"]`` per random component;
    * for random slopes, ``varm[f"{key}_cov_re"]``: genes x the lower triangle
      of ``Psi`` (absolute units, statsmodels' names as in ``results.cov_re``);
    * ``uns[key]``: formula, groups, vc_formula, re_formula, method, df_method,
      transform, flashmm version, term, component, ``cov_re`` and contrast names;
    * with ``reloadable=True``, ``uns[key]["reloadable"]``: the metadata (JSON
      string ``"meta"``) and arrays of a results file.

    Raises
    ------
    FlashmmError
        If results are already stored under ``key_added`` and ``overwrite`` is
        False, or the results' genes are not in ``adata``.
    """
    var_names = pd.Index([str(g) for g in adata.var_names])
    existing = [k for k in _keys_for(key_added) if k in adata.varm] + (
        [key_added] if key_added in adata.uns else []
    )
    if existing and not overwrite:
        raise FlashmmError(
            f"adata already holds results under key {key_added!r} ({existing[0]!r}); pass "
            "overwrite=True or another key_added."
        )
    if overwrite:
        for k in _keys_for(key_added):
            if k in adata.varm:
                del adata.varm[k]
        old = [c for c in adata.var.columns if str(c).startswith(f"{key_added}_")]
        if old:
            adata.var = adata.var.drop(columns=old)
    coef_tests = results.t_test(np.eye(results.k_fe))
    tables = _tables(coef_tests, results.exog_names)
    for name, frame in tables.items():
        adata.varm[f"{key_added}_{_COEF_KEYS[name]}"] = _aligned(frame, var_names, "coefficients")

    contrast_names: list[str] = []
    if contrasts is not None:
        con = contrasts if isinstance(contrasts, MultiGeneContrastResults) else results.t_test(contrasts)
        contrast_names = list(con.contrast_names)
        for name, frame in _tables(con, contrast_names).items():
            key = f"{key_added}_contrast_{_COEF_KEYS[name] if name != 'effect' else 'effect'}"
            adata.varm[key] = _aligned(frame, var_names, "contrasts")

    scalars = {
        "scale": results.scale.astype(float),
        "llf": results.llf.astype(float),
        "converged": results.converged.astype(bool),
        "boundary": results.boundary.astype(bool),
    }
    for comp in results.component_names:
        scalars[f"var_{comp}"] = results.vcomp[comp].astype(float)
    cov_re_names = list(getattr(results, "cov_re_names", []))
    if cov_re_names:   # random slopes: Psi per gene
        adata.varm[f"{key_added}_cov_re"] = _aligned(results.cov_re, var_names, "cov_re")
    for name, series in scalars.items():
        frame = _aligned(series.to_frame(), var_names, name).iloc[:, 0]
        if series.dtype == bool:
            frame = frame.fillna(False).astype(bool)
        adata.var[f"{key_added}_{name}"] = frame.to_numpy()

    info = dict(getattr(results.stats, "info", {}) or {})
    adata.uns[key_added] = {
        "formula": str(info.get("formula") or ""),
        "groups": str(info.get("groups") or ""),
        "vc_formula": {str(k): str(v) for k, v in dict(info.get("vc_formula") or {}).items()},
        "re_formula": str(info.get("re_formula") or ""),
        "method": str(results.method),
        "df_method": str(results.df_method),
        "transform": str(results.stats.transform or ""),
        "version": str(__version__),
        "n_cells": int(results.nobs),
        "n_genes": int(results.n_genes),
        "terms": np.array(results.exog_names, dtype=object),
        "components": np.array(results.component_names, dtype=object),
        "cov_re": np.array(cov_re_names, dtype=object),
        "contrasts": np.array(contrast_names, dtype=object),
    }
    if reloadable:
        import json

        from ._results_file import results_arrays

        meta, arrays = results_arrays(results)
        adata.uns[key_added]["reloadable"] = {"meta": json.dumps(meta), **arrays}


def _tables(con: MultiGeneContrastResults, columns: list[str]) -> dict[str, pd.DataFrame]:
    """effect, se, t, df, pvalue, padj tables (genes x columns) of a contrast result."""
    def frame(x: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(x.to_numpy(), index=x.index, columns=columns)

    return {
        "effect": frame(con.effect), "se": frame(con.sd), "t": frame(con.tvalue),
        "df": frame(con.df_denom), "pvalue": frame(con.pvalue), "padj": frame(con.padj),
    }


def get_results_df(
    adata: anndata.AnnData, key: str = "flashmm", contrast: str | list[str] | bool | None = None,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Tidy table of stored results, like ``results.t_test(...).summary_frame()``.

    Parameters
    ----------
    adata : anndata.AnnData
        AnnData with results written by :func:`write_results`.
    key : str
        The ``key_added`` used when writing.
    contrast : str, list of str or True, optional
        None (default): the coefficients. True: all stored contrasts. A name or
        list of names: those contrasts (or, if not contrasts, those terms).
    alpha : float
        Level of the intervals ``ci_low, ci_high`` (two-sided ``1 - alpha``,
        at the stored df, as ``summary_frame(alpha)``).

    Returns
    -------
    DataFrame
        Columns ``gene, contrast, effect, se, t, df, pvalue, padj, ci_low,
        ci_high, converged``, one row per gene and term/contrast, genes in
        ``var_names`` order.
    """
    if key not in adata.uns:
        raise KeyError(f"no flashmm results under key {key!r} in adata.uns; run write_results first.")
    uns = adata.uns[key]
    stored_contrasts = [str(c) for c in np.asarray(uns.get("contrasts", []), dtype=object).ravel()]
    use_contrasts = contrast is True
    names: list[str] | None = None
    if isinstance(contrast, (str, list, tuple)):
        names = [contrast] if isinstance(contrast, str) else [str(c) for c in contrast]
        use_contrasts = all(n in stored_contrasts for n in names)
    prefix = f"{key}_contrast_" if use_contrasts else f"{key}_"
    if use_contrasts and not stored_contrasts:
        raise KeyError(f"no contrasts stored under key {key!r}.")
    parts = {}
    for name in _TABLES:
        suffix = "effect" if (use_contrasts and name == "effect") else _COEF_KEYS[name]
        k = prefix + suffix
        if k not in adata.varm:
            raise KeyError(f"adata.varm lacks {k!r}; were the results written with write_results?")
        parts[name] = pd.DataFrame(adata.varm[k], index=adata.var_names)
    columns = [str(c) for c in parts["effect"].columns]
    if names is not None:
        missing = [n for n in names if n not in columns]
        if missing:
            raise KeyError(f"{missing} not stored; available: {columns}.")
        columns = names
    G, r = len(adata.var_names), len(columns)
    genes = np.asarray([str(g) for g in adata.var_names], dtype=object)
    data: dict[str, Any] = {"gene": np.repeat(genes, r), "contrast": np.tile(columns, G)}
    for name in _TABLES:
        data[name] = np.asarray(parts[name][columns].to_numpy(dtype=float)).ravel()
    crit = t_quantile(1 - alpha / 2, data["df"])
    data["ci_low"] = data["effect"] - crit * data["se"]
    data["ci_high"] = data["effect"] + crit * data["se"]
    conv_key = f"{key}_converged"
    conv = (np.asarray(adata.var[conv_key], dtype=bool) if conv_key in adata.var
            else np.ones(G, dtype=bool))
    data["converged"] = np.repeat(conv, r)
    return pd.DataFrame(data)
