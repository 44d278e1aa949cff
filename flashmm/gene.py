"""One gene of a multi-gene fit, seen through statsmodels' ``MixedLMResults`` names."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from .contrasts import MultiGeneContrastResults

__all__ = ["GeneResults"]


class GeneResults:
    """Results of a single gene (a row of every table of the multi-gene results).

    Attributes mirror statsmodels' ``MixedLMResults``: ``params``,
    ``fe_params``, ``bse``, ``bse_fe``, ``tvalues``, ``pvalues``, ``cov_re``
    (the group intercept variance, when there is one), ``vcomp`` (the other
    components), ``scale``, ``llf``, ``converged``, ``random_effects`` (dict
    group -> Series) and ``random_effects_cov``.

    Inference comes from the multi-gene results, so it equals the gene's row
    there, with the same ``df_method`` choices: :meth:`t_test` and
    :meth:`wald_test` (statsmodels ``ContrastResults``), :meth:`conf_int`, the
    df of the coefficients (:attr:`df_terms`, :attr:`df_satterthwaite`,
    :attr:`df_resid`) and :meth:`summary`. Each call computes the test for
    every gene at once (milliseconds for thousands of genes); to test many
    genes, call the multi-gene method once.
    """

    def __init__(self, parent: Any, pos: int) -> None:
        self._parent = parent
        self._pos = pos
        self.name = str(parent.gene_names[pos])
        self.method = parent.method
        self.reml = parent.reml
        self.df_method = parent.df_method
        self.nobs = parent.nobs

    def _row(self, frame: pd.DataFrame) -> pd.Series:
        row = frame.iloc[self._pos].copy()
        row.name = self.name
        return row

    @property
    def params(self) -> pd.Series:
        """Fixed effects, then variance ratios (statsmodels' ``params``)."""
        return self._row(self._parent.params)

    @property
    def fe_params(self) -> pd.Series:
        return self._row(self._parent.fe_params)

    @property
    def bse_fe(self) -> pd.Series:
        return self._row(self._parent.bse_fe)

    @property
    def bse_re(self) -> pd.Series:
        return self._row(self._parent.bse_re)

    @property
    def bse(self) -> pd.Series:
        return self._row(self._parent.bse)

    @property
    def tvalues(self) -> pd.Series:
        return self._row(self._parent.tvalues)

    @property
    def pvalues(self) -> pd.Series:
        return self._row(self._parent.pvalues)

    @property
    def scale(self) -> float:
        return float(self._parent.scale.iloc[self._pos])

    @property
    def llf(self) -> float:
        return float(self._parent.llf.iloc[self._pos])

    @property
    def converged(self) -> bool:
        return bool(self._parent.converged.iloc[self._pos])

    @property
    def boundary(self) -> bool:
        return bool(self._parent.boundary.iloc[self._pos])

    @property
    def status(self) -> str:
        return str(self._parent.status.iloc[self._pos])

    def cov_params(self) -> pd.DataFrame:
        """Covariance of the fixed effects."""
        names = self._parent.exog_names
        return pd.DataFrame(self._parent.cov_params()[self._pos], index=names, columns=names)

    # ------------------------------------------------------------ inference
    @property
    def df_terms(self) -> pd.Series:
        """Denominator df of each coefficient under the fit's ``df_method`` (used by :attr:`pvalues`)."""
        return self._row(self._parent.df_terms)

    @property
    def df_satterthwaite(self) -> pd.Series:
        """Satterthwaite df of each coefficient."""
        return self._row(self._parent.df_satterthwaite)

    @property
    def df_resid(self) -> float:
        """Residual degrees of freedom ``n - p``."""
        return float(self._parent.df_resid.iloc[self._pos])

    def conf_int(self, alpha: float = 0.05, df_method: str | None = None) -> pd.DataFrame:
        """Confidence intervals of the fixed effects, as statsmodels' ``conf_int``.

        Parameters
        ----------
        alpha : float
            Two-sided level ``1 - alpha``.
        df_method : {"satterthwaite", "kenward-roger", "residual", "normal"}, optional
            Defaults to the fit's ``df_method``; any method the multi-gene
            results accept.

        Returns
        -------
        DataFrame
            Terms as index, columns ``0`` (lower) and ``1`` (upper): the gene's
            rows of the multi-gene ``conf_int``.
        """
        tidy = self._parent.conf_int(alpha, df_method=df_method)
        p = self._parent.k_fe
        rows = tidy.iloc[self._pos * p:(self._pos + 1) * p]       # one row per gene and term
        return pd.DataFrame(rows[["lower", "upper"]].to_numpy(), index=self._parent.exog_names,
                            columns=[0, 1])

    def t_test(self, contrast: Any, alternative: str = "two-sided",
               df_method: str | None = None) -> Any:
        """t-tests of linear contrasts of this gene's fixed effects.

        The gene's row of the multi-gene ``t_test`` (same contrast forms, df
        methods and alternatives), as statsmodels' ``ContrastResults``.

        Parameters
        ----------
        contrast : array_like, str, list of str or dict
            As :meth:`MultiGeneMixedLMResults.t_test`.
        alternative : {"two-sided", "larger", "smaller"}
        df_method : {"satterthwaite", "kenward-roger", "residual", "normal"}, optional
            Defaults to the fit's ``df_method``.

        Returns
        -------
        statsmodels.stats.contrast.ContrastResults
            ``effect, sd, tvalue, pvalue, df_denom`` (one value per contrast
            row; a t distribution with per-row df, the normal when
            ``df_method="normal"``), ``conf_int(alpha)``, ``summary()`` and
            ``summary_frame()`` with the contrast names.
        """
        multi = self._parent.t_test(contrast, alternative=alternative, df_method=df_method)
        return _contrast_row(multi, self._pos)

    def wald_test(self, hypothesis: Any, df_method: str | None = None) -> Any:
        """Joint test of several contrast rows for this gene (F, chi-square when normal).

        The gene's row of the multi-gene ``wald_test``, as statsmodels'
        ``ContrastResults``: ``fvalue``, ``df_num``, ``df_denom`` and ``pvalue``
        (F with lmerTest's Fai-Cornelius df for Satterthwaite), or ``statistic``
        with ``distribution="chi2"`` and ``df_denom`` = the number of rows for
        ``df_method="normal"``, as statsmodels' ``wald_test(use_f=False)``.
        """
        row = self._parent.wald_test(hypothesis, df_method=df_method).iloc[self._pos]
        return _wald_row(row)

    f_test = wald_test

    def _group_component(self) -> int | None:
        """Index of the random group-intercept component, if any."""
        comps = self._parent.stats.components
        gname = self._parent.stats.info.get("groups")
        for i, c in enumerate(comps):
            if c.groups is None and (c.name == gname or (gname is None and c.name == "Group")):
                return i
        return None

    @property
    def cov_re(self) -> pd.DataFrame:
        """Variance of the random group intercept (1 x 1), empty if none."""
        i = self._group_component()
        if i is None:
            return pd.DataFrame()
        name = self._parent.component_names[i]
        val = self._parent.vcomp.iloc[self._pos, i]
        return pd.DataFrame([[val]], index=[name], columns=[name])

    @property
    def vcomp(self) -> np.ndarray:
        """Variances of the variance components other than the group intercept."""
        i = self._group_component()
        vals = self._parent.vcomp.iloc[self._pos].to_numpy()
        return np.delete(vals, i) if i is not None else vals

    @property
    def random_effects(self) -> dict[str, pd.Series]:
        """BLUPs as statsmodels gives them: group label -> Series of effects."""
        return self._by_group(self._parent.random_effects)

    @property
    def random_effects_cov(self) -> dict[str, pd.Series]:
        """Conditional variances of the BLUPs by group (diagonals)."""
        return self._by_group(self._parent.random_effects_cov)

    def _by_group(self, tables: dict[str, pd.DataFrame]) -> dict[str, pd.Series]:
        out: dict[str, dict[str, float]] = {}
        gi = self._group_component()
        for i, comp in enumerate(self._parent.stats.components):
            values = tables[comp.name].iloc[self._pos].to_numpy()
            for j, level in enumerate(comp.levels if comp.cov_levels is None else comp.cov_levels):
                if i == gi:
                    group, label = level, comp.name
                elif comp.groups is not None:
                    group, label = comp.groups[j], f"{comp.name}[{comp.columns[j]}]"
                else:
                    group, label = "Group", f"{comp.name}[{level}]"
                out.setdefault(group, {})[label] = values[j]
        return {g: pd.Series(v, name=g) for g, v in out.items()}

    def summary(self, alpha: float = 0.05, df_method: str | None = None) -> Any:
        """statsmodels-style summary of this gene (``statsmodels.iolib.summary2.Summary``).

        With ``df_method="normal"`` the numbers equal statsmodels' ``MixedLM``
        summary for the same data; otherwise the test column is a t statistic
        with the chosen degrees of freedom.
        """
        from statsmodels.iolib import summary2

        parent = self._parent
        method = parent._check_df_method(df_method)
        smry = summary2.Summary()
        info = {
            "Model:": "MultiGeneMixedLM",
            "No. Observations:": str(self.nobs),
            "No. Groups:": str(_n_groups(parent)),
            "Dependent Variable:": self.name,
            "Method:": self.method,
            "Scale:": self.scale,
            "Log-Likelihood:": self.llf,
            "Converged:": "Yes" if self.converged else "No",
            "Df method:": method,
        }
        smry.add_dict(info)
        smry.add_title("Mixed Linear Model Regression Results")
        p = parent.k_fe
        names = parent.exog_names + [f"{c} Var" for c in parent.component_names]
        k = len(parent.component_names)
        sdf = np.full((p + k, 6), np.nan)
        b = self.fe_params.to_numpy()
        se = np.sqrt(np.diagonal(parent.contrast_cov(method)[self._pos]))
        if method == "satterthwaite" and self.df_method == "satterthwaite":
            df = parent.df_terms.iloc[self._pos].to_numpy()
        else:
            df = parent.contrast_df(np.eye(p), method)[self._pos]
        t = b / se
        normal = np.isinf(df)
        crit = sps.norm.ppf(1 - alpha / 2) if normal.all() else sps.t.ppf(1 - alpha / 2, df)
        pv = 2 * sps.norm.cdf(-np.abs(t)) if normal.all() else 2 * sps.t.sf(np.abs(t), df)
        sdf[:p, 0], sdf[:p, 1], sdf[:p, 2], sdf[:p, 3] = b, se, t, pv
        sdf[:p, 4], sdf[:p, 5] = b - crit * se, b + crit * se
        sdf[p:, 0] = parent.vcomp.iloc[self._pos].to_numpy()
        sdf[p:, 1] = np.sqrt(self.scale) * self.bse_re.to_numpy()
        smry.add_df(coefficient_table(sdf, names, bool(normal.all()), alpha), align="r")
        return smry

    def __repr__(self) -> str:
        return f"<GeneResults {self.name!r}: {self.method}, converged={self.converged}>"


def _contrast_row(multi: MultiGeneContrastResults, pos: int) -> Any:
    """One gene (row ``pos``) of multi-gene t-tests as statsmodels' ``ContrastResults``.

    The p-values are the multi-gene ones (any ``alternative``); statsmodels'
    own would be two-sided.
    """
    from statsmodels.stats.contrast import ContrastResults

    effect = multi.effect.iloc[pos].to_numpy()
    sd = multi.sd.iloc[pos].to_numpy()
    tvalue = multi.tvalue.iloc[pos].to_numpy()
    df = multi.df_denom.iloc[pos].to_numpy()
    if np.all(np.isinf(df)):
        out = ContrastResults(effect=effect, sd=sd, statistic=tvalue, distribution="norm")
        out.df_denom = df
    else:
        out = ContrastResults(t=tvalue, effect=effect, sd=sd, df_denom=df)
    out.pvalue = np.squeeze(multi.pvalue.iloc[pos].to_numpy())
    out.c_names = list(multi.contrast_names)
    out.alternative = multi.alternative
    return out


def _wald_row(row: pd.Series) -> Any:
    """One gene's row of ``wald_test`` as statsmodels' ``ContrastResults``."""
    from statsmodels.stats.contrast import ContrastResults

    r = int(row["df_num"])
    if np.isinf(row["df_denom"]):
        out = ContrastResults(statistic=float(row["statistic"]), df_denom=r, distribution="chi2",
                              dist_args=(r,))
    else:
        out = ContrastResults(F=float(row["statistic"]), df_num=r, df_denom=float(row["df_denom"]))
    out.pvalue = float(row["pvalue"])
    return out


def coefficient_table(values: np.ndarray, names: list[str], normal: bool,
                      alpha: float) -> pd.DataFrame:
    """statsmodels' coefficient block: 3-decimal strings, blanks for NaN."""
    stat = "z" if normal else "t"
    frame = pd.DataFrame(values, index=names, columns=[
        "Coef.", "Std.Err.", stat, f"P>|{stat}|", f"[{alpha / 2}", f"{1 - alpha / 2}]"])
    for col in frame.columns:
        frame[col] = [f"{x:.3f}" if np.isfinite(x) else "" for x in frame[col]]
    return frame


def _n_groups(parent: Any) -> int:
    comps = parent.stats.components
    groups = {g for c in comps if c.groups is not None for g in c.groups}
    if groups:
        return len(groups)
    if len(comps) == 1 and comps[0].cov_levels is not None:
        return len(comps[0].cov_levels)
    return comps[0].size if len(comps) == 1 else 1
