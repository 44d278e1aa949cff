"""The one-gene view and the contrast results: tests, intervals, df, summaries, pertpy tables.

Every number of the one-gene view (``res.gene(g)``) is checked against the
gene's row of the multi-gene results, for a random intercept, two variance
components and correlated random slopes, under each df method.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from conftest import simulate_study
from scipy import stats

from flashmm import MultiGeneMixedLM

DF_METHODS = ["satterthwaite", "residual", "normal"]
CONTRASTS = {"diff": "x - C(trt)[T.B]", "trt": "C(trt)[T.B]"}
JOINT = ["x = 0", "C(trt)[T.B] = 0"]


@pytest.fixture(scope="module")
def study() -> tuple[pd.DataFrame, pd.DataFrame]:
    return simulate_study(n_genes=8, n_groups=12, seed=3, n_loc=4)


@pytest.fixture(scope="module", params=["intercept", "components", "slopes"])
def fit(request, study):  # noqa: ANN001, ANN201 - a MultiGeneMixedLMResults
    data, Y = study
    kind = request.param
    if kind == "intercept":
        model = MultiGeneMixedLM.from_formula("~ x + C(trt)", data, endog=Y, groups="grp")
    elif kind == "components":
        model = MultiGeneMixedLM.from_formula(
            "~ x + C(trt)", data, endog=Y, vc_formula={"grp": "0 + C(grp)", "loc": "0 + C(loc)"})
    else:
        model = MultiGeneMixedLM.from_formula("~ x + C(trt)", data, endog=Y, groups="grp",
                                              re_formula="~ 1 + x")
    return model.fit()


GENES = ["gene000", "gene005"]   # gene000 has no group variance (often at the boundary)


# ------------------------------------------------------------ one gene: df
def test_gene_exposes_the_parent_df(fit):
    for name in GENES:
        g = fit.gene(name)
        pd.testing.assert_series_equal(g.df_terms, fit.df_terms.loc[name], check_names=False)
        pd.testing.assert_series_equal(g.df_satterthwaite, fit.df_satterthwaite.loc[name],
                                       check_names=False)
        assert g.df_resid == fit.df_resid.loc[name] == fit.nobs - fit.k_fe
        assert list(g.df_terms.index) == fit.exog_names


# ------------------------------------------------------- one gene: t_test
@pytest.mark.parametrize("df_method", DF_METHODS)
def test_gene_t_test_equals_the_parent_row(fit, df_method):
    multi = fit.t_test(CONTRASTS, df_method=df_method)
    for name in GENES:
        one = fit.gene(name).t_test(CONTRASTS, df_method=df_method)
        np.testing.assert_array_equal(one.effect, multi.effect.loc[name].to_numpy())
        np.testing.assert_array_equal(one.sd, multi.sd.loc[name].to_numpy())
        np.testing.assert_array_equal(one.tvalue, multi.tvalue.loc[name].to_numpy())
        np.testing.assert_array_equal(one.df_denom, multi.df_denom.loc[name].to_numpy())
        np.testing.assert_allclose(one.pvalue, multi.pvalue.loc[name].to_numpy(), rtol=1e-14)
        # two-sided intervals at the test's df, as the multi-gene conf_int
        ci = multi.conf_int(0.1).set_index(["gene", "contrast"]).loc[name]
        np.testing.assert_allclose(one.conf_int(0.1), ci[["lower", "upper"]].to_numpy(), rtol=1e-13)
        frame = one.summary_frame(alpha=0.1)
        assert list(frame.index) == list(CONTRASTS)
        assert one.distribution == ("norm" if df_method == "normal" else "t")
        assert "diff" in str(one.summary())


def test_gene_t_test_one_sided_and_default_df(fit):
    name = GENES[1]
    for alternative in ("larger", "smaller"):
        multi = fit.t_test("x", alternative=alternative)
        one = fit.gene(name).t_test("x", alternative=alternative)
        np.testing.assert_allclose(one.pvalue, multi.pvalue.loc[name, "x"], rtol=1e-14)
        assert one.alternative == alternative
    # without df_method: the fit's, so the coefficient tests are the gene's pvalues
    terms = np.eye(fit.k_fe)
    one = fit.gene(name).t_test(terms)
    np.testing.assert_allclose(one.pvalue, fit.gene(name).pvalues[fit.exog_names], rtol=1e-12)
    np.testing.assert_allclose(one.df_denom, fit.gene(name).df_terms, rtol=1e-12)


# ------------------------------------------------------ one gene: conf_int
@pytest.mark.parametrize("df_method", [None, *DF_METHODS])
def test_gene_conf_int_equals_the_parent(fit, df_method):
    tidy = fit.conf_int(0.2, df_method=df_method).set_index(["gene", "term"])
    for name in GENES:
        ci = fit.gene(name).conf_int(0.2, df_method=df_method)
        assert list(ci.index) == fit.exog_names and list(ci.columns) == [0, 1]
        np.testing.assert_array_equal(ci.to_numpy(), tidy.loc[name, ["lower", "upper"]].to_numpy())
    # the interval is the one of the gene's t-test at the same df
    g = fit.gene(GENES[1])
    test = g.t_test(np.eye(fit.k_fe), df_method=df_method)
    np.testing.assert_allclose(g.conf_int(0.2, df_method=df_method).to_numpy(), test.conf_int(0.2),
                               rtol=1e-12)


# ----------------------------------------------------- one gene: wald_test
@pytest.mark.parametrize("df_method", DF_METHODS)
def test_gene_wald_test_equals_the_parent_row(fit, df_method):
    multi = fit.wald_test(JOINT, df_method=df_method)
    for name in GENES:
        one = fit.gene(name).wald_test(JOINT, df_method=df_method)
        row = multi.loc[name]
        np.testing.assert_allclose(one.statistic, row["statistic"], rtol=1e-14)
        np.testing.assert_allclose(one.pvalue, row["pvalue"], rtol=1e-14)
        if df_method == "normal":
            assert one.distribution == "chi2" and one.df_denom == row["df_num"] == 2
        else:
            assert one.distribution == "F"
            assert one.df_num == row["df_num"] == 2
            np.testing.assert_allclose(one.df_denom, row["df_denom"], rtol=1e-14)
            # statsmodels' own p-value from the stored F and df agrees
            np.testing.assert_allclose(one.pvalue, stats.f.sf(one.fvalue, 2, one.df_denom),
                                       rtol=1e-12)
    assert fit.gene(GENES[0]).f_test(JOINT).pvalue == fit.gene(GENES[0]).wald_test(JOINT).pvalue


def test_gene_t_test_equals_statsmodels():
    """With normal df, a gene's t_test is statsmodels' ``MixedLMResults.t_test``."""
    sm = pytest.importorskip("statsmodels.api")
    data, Y = simulate_study(n_genes=2, n_groups=12, seed=11)
    res = MultiGeneMixedLM.from_formula("~ x + C(trt)", data, endog=Y, groups="grp").fit()
    fit = sm.MixedLM.from_formula("y ~ x + C(trt)", data.assign(y=Y["gene001"]), groups="grp").fit()
    c = np.zeros((1, len(fit.fe_params)))
    c[0, list(fit.fe_params.index).index("x")] = 1.0
    theirs = fit.t_test(c)
    ours = res.gene("gene001").t_test("x", df_method="normal")
    np.testing.assert_allclose(ours.effect, theirs.effect, rtol=1e-4)
    np.testing.assert_allclose(ours.sd, theirs.sd.ravel(), rtol=1e-3)
    np.testing.assert_allclose(ours.pvalue, theirs.pvalue, rtol=1e-2, atol=1e-12)
    np.testing.assert_allclose(ours.conf_int(), theirs.conf_int(), rtol=1e-3)


# ---------------------------------------------- contrast results: intervals
@pytest.mark.parametrize("df_method", DF_METHODS)
def test_summary_frame_intervals_use_the_test_df(fit, df_method):
    tests = fit.t_test(CONTRASTS, df_method=df_method)
    for alpha in (0.05, 0.2):
        frame = tests.summary_frame(alpha=alpha)
        assert ["ci_low", "ci_high"] == [c for c in frame.columns if c.startswith("ci_")]
        quantile = np.where(np.isinf(frame["df"]), stats.norm.ppf(1 - alpha / 2),
                            stats.t.ppf(1 - alpha / 2, np.where(np.isinf(frame["df"]), 1, frame["df"])))
        np.testing.assert_allclose(frame["ci_high"], frame["effect"] + quantile * frame["se"],
                                   rtol=1e-12)
        np.testing.assert_allclose(frame["ci_low"], frame["effect"] - quantile * frame["se"],
                                   rtol=1e-12)
        # duality: a two-sided p-value below alpha exactly when 0 is outside the interval
        ok = np.isfinite(frame["pvalue"])
        outside = (frame["ci_low"] > 0) | (frame["ci_high"] < 0)
        assert ((frame["pvalue"] < alpha) == outside)[ok].all()
    # the default is alpha = 0.05
    pd.testing.assert_frame_equal(tests.summary_frame(), tests.summary_frame(alpha=0.05))


def test_results_summary_frame_has_intervals(fit):
    frame = fit.summary_frame(alpha=0.1)
    ci = fit.conf_int(0.1)
    np.testing.assert_allclose(frame["ci_low"], ci["lower"], rtol=1e-12)
    np.testing.assert_allclose(frame["ci_high"], ci["upper"], rtol=1e-12)


# ------------------------------------------------ contrast results: summary
def _table_floats(table: pd.DataFrame, column: str) -> np.ndarray:
    return np.array([float(x) if x.strip() else np.nan for x in table[column]])


def test_contrast_summary_top_genes_by_padj(fit):
    tests = fit.t_test(CONTRASTS)
    smry = tests.summary(top=5, fdr=0.2)
    text = smry.as_text()
    assert "Contrast" in text and "padj" in text
    overview, top = smry.tables[1], smry.tables[2]
    # per-contrast counts at the FDR level
    padj, effect = tests.padj, tests.effect
    for name in CONTRASTS:
        assert int(overview.loc[name, "Genes FDR<0.2"]) == int((padj[name] < 0.2).sum())
        assert int(overview.loc[name, "up"]) == int(((padj[name] < 0.2) & (effect[name] > 0)).sum())
    # the best five (gene, contrast) pairs, in padj order
    frame = tests.summary_frame().sort_values(["padj", "pvalue"])
    assert len(top) == 5
    assert list(top.index) == list(frame["gene"].head(5))
    assert list(top["Contrast"]) == list(frame["contrast"].head(5))
    shown = _table_floats(top, "padj")
    assert np.all(np.diff(shown) >= 0)
    # top=None: every gene and contrast
    every = tests.summary(top=None).tables[2]
    assert len(every) == fit.n_genes * len(CONTRASTS)
    _rule_is_the_widest_line(tests.summary(top=3).as_text())


def test_contrast_summary_normal_and_intervals(fit):
    tests = fit.t_test("x", df_method="normal")
    top = tests.summary(top=2, alpha=0.1).tables[2]
    assert "P>|z|" in top.columns and "[0.05" in top.columns and "0.95]" in top.columns
    frame = tests.summary_frame(alpha=0.1).sort_values(["padj", "pvalue"]).head(2)
    np.testing.assert_allclose(_table_floats(top, "[0.05"), frame["ci_low"], rtol=1e-3)


# ------------------------------------------------- contrast results: pertpy
def test_to_pertpy_columns_and_values(fit):
    tests = fit.t_test(CONTRASTS)
    table = tests.to_pertpy()
    assert list(table.columns[:7]) == ["variable", "p_value", "t_value", "sd", "log_fc",
                                       "adj_p_value", "contrast"]
    assert len(table) == fit.n_genes * len(CONTRASTS)
    assert list(table.index) == list(range(len(table)))
    # contrasts in their order, genes by p-value within each (pertpy's test_contrasts)
    assert list(dict.fromkeys(table["contrast"])) == list(CONTRASTS)
    for name, part in table.groupby("contrast", sort=False):
        assert np.all(np.diff(part["p_value"].to_numpy()) >= 0)
        ours = part.set_index("variable")
        np.testing.assert_array_equal(ours["log_fc"], tests.effect.loc[ours.index, name])
        np.testing.assert_array_equal(ours["sd"], tests.sd.loc[ours.index, name])
        np.testing.assert_array_equal(ours["t_value"], tests.tvalue.loc[ours.index, name])
        np.testing.assert_array_equal(ours["p_value"], tests.pvalue.loc[ours.index, name])
        np.testing.assert_array_equal(ours["adj_p_value"], tests.padj.loc[ours.index, name])


# ------------------------------------------------------- whole-fit summary
def _rule_is_the_widest_line(text: str) -> None:
    lines = text.splitlines()
    rule = max(len(line) for line in lines if set(line) == {"="})
    wide = [line for line in lines if len(line.rstrip()) > rule]
    assert not wide, f"lines wider than the summary ({rule}):\n" + "\n".join(wide)


def test_fit_summary_tables_are_aligned(fit):
    _rule_is_the_widest_line(fit.summary().as_text())


def _without_exponent(column: pd.Series) -> bool:
    return not any(re.search(r"\de[+-]", str(x)) for x in column)


def test_fit_summary_df_without_exponent(study):
    data, Y = study
    model = MultiGeneMixedLM.from_formula("~ x + C(trt)", data, endog=Y, groups="grp")
    res = model.fit(df_method="residual")
    table = res.summary().tables[1]
    assert _without_exponent(table["Median df"])
    assert table.loc["x", "Median df"].strip() == f"{res.nobs - res.k_fe:.1f}"
    normal = model.fit(df_method="normal").summary().tables[1]
    assert set(normal["Median df"].str.strip()) == {"inf"}


def test_fit_summary_counts_only_the_terms_asked(fit):
    smry = fit.summary(fdr=0.2, terms=["C(trt)[T.B]"])
    table = smry.tables[1]
    col = "Genes FDR<0.2"
    assert table.loc["Intercept", col].strip() == "" and table.loc["x", col].strip() == ""
    expected = int((fit.t_test("C(trt)[T.B]").padj.to_numpy() < 0.2).sum())
    assert int(table.loc["C(trt)[T.B]", col]) == expected
    assert "coefficient" in smry.as_text()          # the count is explained under the table
    every = fit.summary(fdr=0.2).tables[1]
    assert all(x.strip() for x in every[col])
    with pytest.raises(ValueError, match="unknown"):
        fit.summary(terms=["nope"])
