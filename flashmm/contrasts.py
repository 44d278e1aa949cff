"""Contrasts of the fixed effects: parsing, t-tests and joint Wald/F tests.

Hypotheses are parsed with patsy's constraint parser, so statsmodels strings
(``"a - b = 0"``) and FLASHMM ``contrast.matrix`` expressions (``"A-(B+C)/2"``)
both work.  Tests are computed for all genes as arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from ._errors import FlashmmError

__all__ = ["build_contrasts", "contrast_matrix", "MultiGeneContrastResults", "wald_test_matrix",
           "bh_adjust"]

_ALTERNATIVES = ("two-sided", "larger", "smaller")


class ContrastError(FlashmmError):
    """A contrast is malformed or names unknown terms."""


def contrast_matrix(contrasts: Mapping[str, str] | list[str], exog_names: list[str]) -> pd.DataFrame:
    """Contrast matrix from expressions over term names (FLASHMM's ``contrast.matrix``).

    Returns a DataFrame with one column per contrast and the terms as index.
    """
    names, L, _ = build_contrasts(contrasts, exog_names)
    return pd.DataFrame(L.T, index=list(exog_names), columns=names)


def build_contrasts(contrast: Any, exog_names: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Turn any supported contrast specification into ``(names, L, q)``.

    ``L`` is r x p and ``q`` (length r) the hypothesised values of ``L b``.
    """
    p = len(exog_names)
    if isinstance(contrast, Mapping):
        names: list[str] = []
        rows, rhs = [], []
        for key, spec in contrast.items():
            sub_names, L, q = build_contrasts(spec, exog_names)
            names += [str(key)] if L.shape[0] == 1 else [f"{key}[{n}]" for n in sub_names]
            rows.append(L)
            rhs.append(q)
        if not rows:
            raise ContrastError("empty contrast dictionary.")
        return names, np.vstack(rows), np.concatenate(rhs)
    if isinstance(contrast, pd.DataFrame):
        if list(contrast.index) == list(exog_names):     # terms x contrasts
            return [str(c) for c in contrast.columns], contrast.to_numpy(float).T, np.zeros(contrast.shape[1])
        return _from_array(contrast.to_numpy(float), p, exog_names, [str(i) for i in contrast.index])
    if isinstance(contrast, pd.Series):
        vec = contrast.reindex(exog_names)
        if vec.isna().any():
            unknown = sorted(set(contrast.index) - set(exog_names))
            if unknown:
                raise ContrastError(f"contrast names unknown term(s) {unknown}; terms are {exog_names}.")
            vec = vec.fillna(0.0)
        return [str(contrast.name or "contrast")], vec.to_numpy(float)[None], np.zeros(1)
    if isinstance(contrast, str):
        return _from_string(contrast, exog_names)
    if isinstance(contrast, (list, tuple)) and contrast and all(isinstance(c, str) for c in contrast):
        parts = [_from_string(c, exog_names) for c in contrast]
        return ([n for part in parts for n in part[0]], np.vstack([x[1] for x in parts]),
                np.concatenate([x[2] for x in parts]))
    return _from_array(np.asarray(contrast, dtype=float), p, exog_names)


def _from_array(arr: np.ndarray, p: int, exog_names: list[str],
                names: list[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != p:
        raise ContrastError(
            f"contrast has shape {arr.shape}, but there are {p} fixed-effect terms "
            f"{exog_names}; give a vector of length {p} or an r x {p} matrix."
        )
    names = names or ([ "contrast"] if arr.shape[0] == 1 else [f"c{i}" for i in range(arr.shape[0])])
    return names, arr, np.zeros(arr.shape[0])


def _from_string(expr: str, exog_names: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    import patsy

    try:
        lc = patsy.DesignInfo(list(exog_names)).linear_constraint(expr)
    except patsy.PatsyError as err:
        raise ContrastError(
            f"cannot parse contrast {expr!r}: {str(err).splitlines()[0]}. Terms are "
            f"{list(exog_names)}."
        ) from None
    L = np.asarray(lc.coefs, dtype=float)
    q = np.asarray(lc.constants, dtype=float).ravel()
    parts = [s.strip() for s in expr.split(",")] if L.shape[0] > 1 else [expr.strip()]
    if len(parts) != L.shape[0]:
        parts = [f"{expr}[{i}]" for i in range(L.shape[0])]
    return parts, L, q


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjustment of each column, NaN left out."""
    from statsmodels.stats.multitest import multipletests

    out = np.full(p.shape, np.nan)
    for j in range(p.shape[1]):
        ok = np.isfinite(p[:, j])
        if ok.any():
            out[ok, j] = multipletests(p[ok, j], method="fdr_bh")[1]
    return out


class MultiGeneContrastResults:
    """Contrast estimates and t-tests for every gene (genes x contrasts tables).

    Tidy tables: :meth:`summary_frame` (with confidence intervals),
    :meth:`conf_int` and :meth:`to_pertpy` (pertpy's column names); a printable
    overview with the top genes: :meth:`summary`.

    Attributes
    ----------
    effect, sd, tvalue, pvalue, df_denom : DataFrame
        Estimate ``L b - q``, its standard error, t statistic, p-value and
        denominator degrees of freedom.
    padj : DataFrame
        Benjamini-Hochberg adjusted p-values within each contrast.
    """

    def __init__(self, gene_names: pd.Index, names: list[str], L: np.ndarray, q: np.ndarray,
                 effect: np.ndarray, sd: np.ndarray, df: np.ndarray, alternative: str,
                 df_method: str, converged: np.ndarray) -> None:
        if alternative not in _ALTERNATIVES:
            raise ValueError(f"alternative must be one of {_ALTERNATIVES}, got {alternative!r}.")
        self.contrast_names = names
        self.L, self.q = L, q
        self.alternative = alternative
        self.df_method = df_method
        self._genes = gene_names
        self._converged = converged
        self.effect = self._frame(effect)
        self.sd = self._frame(sd)
        self.df_denom = self._frame(df)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.tvalue = self._frame(effect / sd)

    @classmethod
    def from_fit(cls, res: Any, names: list[str], L: np.ndarray,
                 q: np.ndarray, alternative: str, df_method: str) -> MultiGeneContrastResults:
        b = res.fe_params.to_numpy()
        cov = res.contrast_cov(df_method)
        effect = b @ L.T - q
        var = np.einsum("rp,gpk,rk->gr", L, cov, L)
        df = res.contrast_df(L, df_method)
        return cls(res.gene_names, names, L, q, effect, np.sqrt(var), df, alternative,
                   df_method, res.converged.to_numpy())

    def _frame(self, values: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(values, index=self._genes, columns=self.contrast_names)

    @cached_property
    def pvalue(self) -> pd.DataFrame:
        """p-values for the chosen alternative."""
        t = self.tvalue.to_numpy()
        df = self.df_denom.to_numpy()
        with np.errstate(invalid="ignore"):
            normal = np.isinf(df)
            dist_df = np.where(normal, 1.0, df)
            upper = np.where(normal, sps.norm.sf(t), sps.t.sf(t, dist_df))
            lower = np.where(normal, sps.norm.cdf(t), sps.t.cdf(t, dist_df))
        if self.alternative == "larger":
            p = upper
        elif self.alternative == "smaller":
            p = lower
        else:
            p = 2 * np.minimum(upper, lower)
        return self._frame(p)

    @cached_property
    def padj(self) -> pd.DataFrame:
        """Benjamini-Hochberg adjusted p-values within each contrast."""
        return self._frame(bh_adjust(self.pvalue.to_numpy()))

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Tidy confidence intervals: gene, contrast, lower, upper."""
        low, high = self._interval(alpha)
        return self._tidy({"lower": low, "upper": high})

    def _tidy(self, columns: dict[str, np.ndarray]) -> pd.DataFrame:
        G, r = self.effect.shape
        data = {"gene": np.repeat(self._genes.to_numpy(), r),
                "contrast": np.tile(self.contrast_names, G)}
        data.update({k: np.asarray(v).ravel() for k, v in columns.items()})
        return pd.DataFrame(data)

    def _interval(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Two-sided ``1 - alpha`` interval ends at the test's df (genes x contrasts)."""
        crit = t_quantile(1 - alpha / 2, self.df_denom.to_numpy())
        e, s = self.effect.to_numpy(), self.sd.to_numpy()
        return e - crit * s, e + crit * s

    def summary_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """One tidy row per gene and contrast.

        Parameters
        ----------
        alpha : float
            The intervals ``ci_low, ci_high`` are two-sided at level
            ``1 - alpha``, with the same t df as the p-value (the normal where
            ``df`` is inf), as :meth:`conf_int`.

        Returns
        -------
        DataFrame
            Columns ``gene, contrast, effect, se, t, df, pvalue, padj, ci_low,
            ci_high, converged``. ``padj`` is Benjamini-Hochberg within each
            contrast; genes that could not be fitted are NaN and left out of the
            adjustment.
        """
        r = self.effect.shape[1]
        low, high = self._interval(alpha)
        return self._tidy({
            "effect": self.effect.to_numpy(), "se": self.sd.to_numpy(),
            "t": self.tvalue.to_numpy(), "df": self.df_denom.to_numpy(),
            "pvalue": self.pvalue.to_numpy(), "padj": self.padj.to_numpy(),
            "ci_low": low, "ci_high": high,
            "converged": np.repeat(self._converged[:, None], r, axis=1),
        })

    def summary(self, top: int | None = 10, alpha: float = 0.05, fdr: float = 0.05) -> Any:
        """A statsmodels ``Summary`` of the tests: counts per contrast, then the top genes.

        Parameters
        ----------
        top : int or None
            Rows of the gene table: the ``top`` (gene, contrast) pairs with the
            smallest ``padj`` (Benjamini-Hochberg within each contrast), ties
            by p-value. None lists every gene and contrast.
        alpha : float
            Level of the intervals of the gene table (``1 - alpha``, two-sided).
        fdr : float
            FDR level of the counts per contrast (``Genes FDR<fdr``, ``up``,
            ``down``).

        Returns
        -------
        statsmodels.iolib.summary2.Summary
            Print it, or use ``as_text()``, ``as_html()``, ``as_latex()``; the
            tables are in ``.tables`` (strings).
        """
        from .summary import contrast_summary

        return contrast_summary(self, top=top, alpha=alpha, fdr=fdr)

    def to_pertpy(self) -> pd.DataFrame:
        """The tests as pertpy's differential-expression tables (``test_contrasts``).

        Columns, with pertpy's names: ``variable`` (gene), ``p_value``,
        ``t_value``, ``sd`` (standard error), ``log_fc`` (the contrast
        estimate, on the scale of the fitted values: a log2 fold change for
        ``log2(1 + x)`` data), ``adj_p_value`` (Benjamini-Hochberg within each
        contrast) and ``contrast``; then ``df``. One row per gene and contrast,
        contrasts in their order and genes by ``p_value`` within each, as
        pertpy's ``test_contrasts`` returns them, so that pertpy's plots
        (``plot_volcano``: ``log_fc``, ``adj_p_value``, ``variable``) accept it.

        Returns
        -------
        DataFrame
        """
        frame = self.summary_frame()
        table = pd.DataFrame({
            "variable": frame["gene"], "p_value": frame["pvalue"], "t_value": frame["t"],
            "sd": frame["se"], "log_fc": frame["effect"], "adj_p_value": frame["padj"],
            "contrast": frame["contrast"], "df": frame["df"],
        })
        G, r = self.effect.shape
        table = table.assign(_order=np.tile(np.arange(r), G))        # contrast position
        table = table.sort_values(["_order", "p_value"], kind="stable").drop(columns="_order")
        return table.reset_index(drop=True)

    def __repr__(self) -> str:
        return (f"<MultiGeneContrastResults: {self.effect.shape[0]} genes x "
                f"{len(self.contrast_names)} contrasts, df={self.df_method}>")


def wald_test_matrix(res: Any, L: np.ndarray, q: np.ndarray,
                     df_method: str) -> pd.DataFrame:
    """Joint Wald test of ``L b = q`` per gene.

    With ``"normal"`` the statistic is chi-square on r df; otherwise F on
    (r, df_denom), where the Satterthwaite denominator df follows lmerTest
    (Fai and Cornelius: t-df of the decorrelated contrasts combined) and
    Kenward-Roger follows pbkrtest's ``KRmodcomp`` (the Wald statistic on the
    adjusted covariance, its df, and the F scaled by its factor).
    """
    b = res.fe_params.to_numpy()
    cov = res.contrast_cov(df_method)
    r = L.shape[0]
    diff = b @ L.T - q
    V = np.einsum("rp,gpk,sk->grs", L, cov, L)
    G = b.shape[0]
    stat = np.full(G, np.nan)
    ok = np.all(np.isfinite(V), axis=(1, 2))
    stat[ok] = np.einsum("gr,gr->g", diff[ok], np.linalg.solve(V[ok], diff[ok][:, :, None])[:, :, 0])
    if df_method == "normal":
        return pd.DataFrame({"statistic": stat, "df_num": r, "df_denom": np.inf,
                             "pvalue": sps.chi2.sf(stat, r)}, index=res.gene_names)
    F = stat / r
    if df_method == "kenward-roger":
        dfd, scaling = res.kr_ftest(L)
        F = scaling * F
    elif df_method == "residual":
        dfd = np.full(G, float(res.nobs - res.k_fe))
    else:
        dfd = _fai_cornelius_df(res, L, V, ok)
    return pd.DataFrame({"statistic": F, "df_num": r, "df_denom": dfd,
                         "pvalue": sps.f.sf(F, r, dfd)}, index=res.gene_names)


def _fai_cornelius_df(res: Any, L: np.ndarray, V: np.ndarray,
                      ok: np.ndarray) -> np.ndarray:
    """lmerTest's multi-df Satterthwaite: decorrelate, combine the 1-df nu's."""
    G, r = V.shape[0], L.shape[0]
    dfd = np.full(G, np.nan)
    if not ok.any():
        return dfd
    vals, vecs = np.linalg.eigh(V[ok])                        # V = P diag(d) P'
    rows = np.einsum("gsr,sp->grp", vecs, L)                    # rotated contrasts
    idx = np.flatnonzero(ok)
    full_rows = np.zeros((G, r, L.shape[1]))
    full_rows[idx] = rows
    nu = res.contrast_df_rows(full_rows)[idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        E = np.sum(np.where(nu > 2, nu / (nu - 2), 0.0), axis=1)
        dfd[idx] = np.where(E > r, 2 * E / (E - r), np.nan)
    return dfd


def t_quantile(prob: float, df: np.ndarray) -> np.ndarray:
    """Quantile of t with ``df`` degrees of freedom (the normal where df is inf)."""
    df = np.asarray(df, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(df), sps.norm.ppf(prob), sps.t.ppf(prob, np.where(np.isinf(df), 1, df)))


def two_sided_p(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Two-sided p-values of t statistics (normal where df is inf)."""
    df = np.broadcast_to(np.asarray(df, dtype=float), t.shape)
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(df), 2 * sps.norm.sf(np.abs(t)),
                        2 * sps.t.sf(np.abs(t), np.where(np.isinf(df), 1, df)))
