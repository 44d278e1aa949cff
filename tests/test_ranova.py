"""lmerTest's ``ranova`` against lmerTest (tests/reference/ranova, made by R).

``ranova_reference.R`` simulates 288 cells (12 donors, trt at donor level, 3 cell types, 4
batches crossed with donors, a cell covariate ``x``) and 8 genes, some without a donor:ct,
batch or slope variance (singular fits, LRT 0), and writes lmerTest's ``ranova`` for
``ct * trt + x`` with ``(1|donor)``, ``(1|donor) + (1|donor:ct)``, ``(1|donor) + (1|batch)``,
all three, ``(1 + x|donor)``, ``(1 + x|donor) + (1|donor:ct)`` and ``(1 + x||donor)`` by REML,
and the first two by ML (lme4 bobyqa, rhoend 1e-12).

Tolerances:
- logLik and LRT within 1e-5 absolute (AIC 2e-5): the log-likelihoods are about -450, and lme4's
  optimum is fixed to about 1e-9 relative (rhoend 1e-12), a few 1e-7 absolute at most; two runs
  of an lme4 reference script differ by about 1e-8 relative (threaded BLAS sums), i.e. up to 5e-6
  here.  We measure at most 1.9e-12 (tests/reference/ranova/README.md).
- p-values within 1e-4 relative where the LRT exceeds 0.1 (an LRT error of 1e-5 moves p by
  at most 6e-5 relative there); at the boundary (lmerTest's LRT below 1e-3, in fact 0 to
  2e-13) our LRT is below 1e-5 and p above 0.99 (a chi-square(1) p-value has an infinite
  slope at 0: 1e-5 in the LRT moves it by 2.5e-3).
- npar and Df exact.
"""

from __future__ import annotations

import warnings
from functools import cache

import numpy as np
import pandas as pd
import pytest
from conftest import DONOR_DESIGNS, REFERENCE
from scipy import stats as sps

from flashmm import MultiGeneMixedLM

RANOVA = REFERENCE / "ranova"
GENES = [f"g{i:02d}" for i in range(1, 9)]
FORMULA = "~ ct * trt + x"
RANDOM = {
    **DONOR_DESIGNS,
    "slopes": {"groups": "donor", "re_formula": "~ 1 + x"},
    "slopes_nested": {"groups": "donor", "re_formula": "~ 1 + x", "vc_formula": {"dct": "0 + C(ct)"}},
    "indep": {"groups": "donor", "re_formula": "~ 1 + x", "independent_re": True},
}
RANDOM["nested_ML"] = RANDOM["nested"]
RANDOM["one_ML"] = RANDOM["one"]
#: lmerTest's row names -> flashmm's (the components' names)
ROW_NAMES = {"<none>": "<none>", "(1 | donor)": "donor", "(1 | donor:ct)": "dct",
             "(1 | batch)": "batch", "x in (1 + x | donor)": "x in donor",
             "x in (0 + x | donor)": "x in donor"}
LL_ATOL = 1e-5
P_RTOL = 1e-4


@cache
def cells() -> pd.DataFrame:
    return pd.read_csv(RANOVA / "cells.csv")


@cache
def fit(design: str):  # noqa: ANN201 - results
    obs = cells()
    model = MultiGeneMixedLM.from_formula(FORMULA, obs, endog=obs[GENES], **RANDOM[design])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # no warning expected; singular fits are fine
        return model.fit(reml=not design.endswith("_ML"))


@cache
def reference(design: str) -> pd.DataFrame:
    tab = pd.read_csv(RANOVA / "ranova.csv")
    tab = tab[tab.design == design].copy()
    tab["term"] = tab["term"].map(ROW_NAMES)
    return tab.set_index(["gene", "term"])


@pytest.mark.parametrize("design", list(RANDOM))
def test_ranova_matches_lmertest(design: str) -> None:
    ref = reference(design)
    ours = fit(design).ranova()
    assert list(ours.index) == list(ref.index)
    np.testing.assert_array_equal(ours["npar"], ref["npar"])
    np.testing.assert_array_equal(ours["Df"], ref["Df"])
    np.testing.assert_allclose(ours["logLik"], ref["logLik"], rtol=0, atol=LL_ATOL)
    np.testing.assert_allclose(ours["AIC"], ref["AIC"], rtol=0, atol=2 * LL_ATOL)
    np.testing.assert_allclose(ours["LRT"], ref["LRT"], rtol=0, atol=LL_ATOL)
    big = ref["LRT"] > 0.1
    np.testing.assert_allclose(ours.loc[big, "pvalue"], ref.loc[big, "pvalue"], rtol=P_RTOL)
    edge = ref["LRT"] < 1e-3
    assert (np.abs(ours.loc[edge, "LRT"]) < LL_ATOL).all()
    assert (ours.loc[edge, "pvalue"] > 0.99).all()
    assert ours.xs("<none>", level="term")[["LRT", "Df", "pvalue", "padj"]].isna().all().all()


def test_reference_has_boundary_rows() -> None:
    """The reference covers singular fits (LRT 0) in every multi-component design."""
    for design in ("nested", "crossed", "three", "nested_ML"):
        assert (reference(design)["LRT"] < 1e-3).any(), design


def test_reduced_stats_equal_the_smaller_design() -> None:
    """Subsetting Z's columns gives the statistics of the model built without the component."""
    from flashmm.ranova import reduced_models

    obs = cells()
    full = MultiGeneMixedLM.from_formula(FORMULA, obs, endog=obs[GENES], **RANDOM["three"]).stats
    small = MultiGeneMixedLM.from_formula(
        FORMULA, obs, endog=obs[GENES], groups=None,
        vc_formula={"donor": "0 + C(donor)", "batch": "0 + C(batch)"}).stats
    red = {r.name: r.stats for r in reduced_models(full)}
    assert list(red) == ["donor", "dct", "batch"]
    for key in ("ZZ", "ZX", "ZY"):
        np.testing.assert_array_equal(getattr(red["dct"], key), getattr(small, key))
    assert [c.name for c in red["dct"].components] == ["donor", "batch"]


def test_reduced_fits_equal_direct_fits() -> None:
    """Each row's logLik is the llf of the smaller model fitted directly (same REML)."""
    obs = cells()
    rows = fit("three").ranova()["logLik"]
    nested = fit("nested").llf
    np.testing.assert_allclose(rows.xs("batch", level="term"), nested, rtol=1e-9)
    slopes = fit("slopes").ranova()["logLik"].xs("x in donor", level="term")
    np.testing.assert_allclose(slopes, fit("one").llf, rtol=1e-9)
    lm_row = fit("one").ranova()["logLik"].xs("donor", level="term")
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    for gene in GENES[:3]:
        ols = smf.ols(f"{gene} {FORMULA}", obs).fit()
        n, p = ols.nobs, ols.df_model + 1
        # R's logLik(lm, REML = TRUE)
        rss = float(np.sum(ols.resid ** 2))
        X = sm.add_constant(ols.model.exog, has_constant="skip")
        expect = (-0.5 * (n - p) * (1 + np.log(2 * np.pi * rss / (n - p)))
                  - 0.5 * np.linalg.slogdet(X.T @ X)[1])
        assert lm_row[gene] == pytest.approx(expect, rel=1e-12)


def test_mixture_pvalues() -> None:
    from flashmm.ranova import lrt_pvalue

    tab = fit("nested").ranova(mixture=True)
    plain = fit("nested").ranova()
    rows = tab.drop(index="<none>", level="term")
    at0 = rows["LRT"] < 1e-9 * 500                     # round-off of logLik about -450
    assert at0.any() and (rows.loc[at0, "pvalue"] == 1.0).all()
    np.testing.assert_allclose(rows.loc[~at0, "pvalue"], 0.5 * sps.chi2.sf(rows.loc[~at0, "LRT"], 1),
                               rtol=1e-12)
    pd.testing.assert_frame_equal(tab.drop(columns=["pvalue", "padj"]),
                                  plain.drop(columns=["pvalue", "padj"]))
    slope = fit("slopes").ranova(mixture=True).xs("x in donor", level="term")
    np.testing.assert_allclose(slope["pvalue"], 0.5 * (sps.chi2.sf(slope["LRT"], 1)
                                                      + sps.chi2.sf(slope["LRT"], 2)))
    p = lrt_pvalue(np.array([-1e-13, 0.0, 3.0, np.nan, 1e-13]), np.ones(5), True)
    np.testing.assert_allclose(p[[0, 1, 2, 4]], [1.0, 1.0, 0.5 * sps.chi2.sf(3.0, 1),
                                                 0.5 * sps.chi2.sf(1e-13, 1)])
    assert np.isnan(p[3])
    assert lrt_pvalue(np.array([1e-13]), np.ones(1), True, zero=1e-10)[0] == 1.0


@pytest.mark.parametrize("design", ["one", "nested"])
def test_unfitted_genes_stay_nan_and_out_of_padj(design: str) -> None:
    from statsmodels.stats.multitest import multipletests

    obs = cells()
    Y = obs[GENES].copy()
    Y["flat"] = 3.5
    Y["zero"] = 0.0
    with pytest.warns(UserWarning, match="could not be fitted"):
        res = MultiGeneMixedLM.from_formula(FORMULA, obs, endog=Y, **RANDOM[design]).fit()
    tab = res.ranova()
    assert tab.loc[["flat", "zero"]][["logLik", "LRT", "pvalue", "padj"]].isna().all().all()
    for term, part in tab.drop(index="<none>", level="term").groupby(level="term"):
        good = part.drop(index=["flat", "zero"], level="gene")
        np.testing.assert_allclose(good["padj"], multipletests(good["pvalue"], method="fdr_bh")[1],
                                   err_msg=term)


def test_lone_slope_is_dropped_entirely() -> None:
    """``(0 + x | donor)``: the reduced model is the linear model (lmerTest: ``(1 | donor)``)."""
    obs = cells()
    res = MultiGeneMixedLM.from_formula(FORMULA, obs, endog=obs[GENES[:2]], groups="donor",
                                        re_formula="~ 0 + x").fit()
    tab = res.ranova()
    assert list(tab.loc["g01"].index) == ["<none>", "x in donor"]
    lm = fit("one").ranova().xs("donor", level="term")
    rows = tab.xs("x in donor", level="term")
    np.testing.assert_allclose(rows["logLik"], lm["logLik"].loc[rows.index], rtol=1e-12)
    np.testing.assert_array_equal(rows["Df"], 2.0 - 1.0)


def test_independent_slopes_reduce_to_the_smaller_fits() -> None:
    """``(1 + x || donor)``: dropping the intercept leaves ``(0 + x | donor)``, the slope ``(1 | donor)``."""
    obs = cells()
    tab = fit("indep").ranova()["logLik"]
    slope_only = MultiGeneMixedLM.from_formula(FORMULA, obs, endog=obs[GENES], groups="donor",
                                               re_formula="~ 0 + x").fit().llf
    np.testing.assert_allclose(tab.xs("donor", level="term"), slope_only, rtol=1e-9)
    np.testing.assert_allclose(tab.xs("x in donor", level="term"), fit("one").llf, rtol=1e-9)


def test_ranova_after_save_and_load(tmp_path) -> None:  # noqa: ANN001
    from flashmm import load_results

    res = fit("nested")
    res.save(tmp_path / "res.npz")
    again = load_results(tmp_path / "res.npz")
    pd.testing.assert_frame_equal(again.ranova(), res.ranova(), rtol=1e-9)


def test_flashmm_scoring_fit_refits_the_same_way() -> None:
    obs = cells()
    res = MultiGeneMixedLM.from_formula(FORMULA, obs, endog=obs[GENES[:3]],
                                        **RANDOM["nested"]).fit(allow_negative_variance=True)
    tab = res.ranova()
    assert np.isfinite(tab.drop(index="<none>", level="term")["LRT"]).all()
    assert list(tab.loc["g01"].index) == ["<none>", "donor", "dct"]
