"""ANOVA tables and least-squares means against lmerTest (tests/reference/anova, made by R).

``anova_reference.R`` simulates 300 cells (10 donors, trt at donor level, 3 cell types,
3 batches crossed with donors, a cell covariate ``x``) and 6 genes, and fits every gene by
REML with lme4 (bobyqa, rhoend 1e-12) in four random-effects designs: one component
``(1|donor)``, nested ``+ (1|donor:ct)``, crossed ``+ (1|batch)`` and all three, and the
nested design by ML too (``nested_ML``, formula ``main`` only).  No fit is singular.
Formulas: ``ct * trt + x`` (types 2, 3, ls_means, difflsmeans), ``ct * trt + x:trt`` (R's
term order equals patsy's, so type 1 too), and in the one-component and nested designs
``0 + ct + ct:trt``, ``ct + ct:trt + x`` and ``x + ct + ct:trt`` for the deliberate
differences from lmerTest (user guide, Tests and degrees of freedom).

Tolerances (the reference's own precision):
- F within 3e-4 relative, sums of squares within 3e-4 relative: F is a quadratic form in
  lme4's estimates, whose optimum is fixed to about 1e-9 relative (the same model fitted in
  three parameterisations gives residual variances that agree to 3e-9), far inside; 3e-4 is
  the bound we hold to; we measure at most 7e-7 (tests/reference/anova/README.md).  Two runs
  of the R script differ by about 1e-8 relative (threaded BLAS sums in lme4).
- Denominator df within 2e-3 relative: lmerTest differentiates the covariance of the fixed
  effects numerically (numDeriv, about 1e-6 relative; sleepstudy gives 17.0000052 for an
  exact 17), and the df of a multi-row F combine several such df.
- p-values within 2e-3 relative (they follow the df) or 1e-12 absolute (tiny p).
- Least-squares means and differences: estimates (relative to max(|estimate|, SE)) and SEs
  within 1e-6 relative: exact linear algebra on the two fits' estimates.  The residual
  variances agree to 1.2e-8, but the SE of a between-donor mean also depends on the donor and
  batch variances, which three batches fix only weakly: the largest SE difference is 4.8e-7
  (crossed, g06).  df within 2e-3 as above.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd
import pytest
from conftest import DONOR_DESIGNS, REFERENCE

from flashmm import MultiGeneMixedLM, TermError

ANOVA = REFERENCE / "anova"
RANDOM = dict(DONOR_DESIGNS)
RANDOM["nested_ML"] = RANDOM["nested"]                 # the nested design fitted by ML
FIXED = {"main": "~ ct * trt + x", "order": "~ ct * trt + x:trt", "nointercept": "~ 0 + ct + ct:trt",
         "nomain": "~ ct + ct:trt + x", "xfirst": "~ x + ct + ct:trt"}
F_RTOL = 3e-4
DF_RTOL = 2e-3
LS_RTOL = 1e-6
GENES = [f"g{i:02d}" for i in range(1, 7)]


@cache
def cells() -> pd.DataFrame:
    return pd.read_csv(ANOVA / "cells.csv")


@cache
def fit(design: str, formula: str):  # noqa: ANN201 - results
    obs = cells()
    model = MultiGeneMixedLM.from_formula(FIXED[formula], obs, endog=obs[GENES], **RANDOM[design])
    return model.fit(reml=not design.endswith("_ML"))


@cache
def reference(what: str) -> pd.DataFrame:
    return pd.read_csv(ANOVA / f"{what}.csv")


def canonical(term: str) -> str:
    """R writes ``trt:x`` where patsy writes ``x:trt``: compare by the set of factors."""
    return ":".join(sorted(term.split(":")))


def ref_anova(design: str, formula: str, type_: int) -> pd.DataFrame:
    tab = reference("anova")
    tab = tab[(tab.design == design) & (tab.formula == formula) & (tab.type == type_)].copy()
    tab["term"] = tab["term"].map(canonical)
    return tab.set_index(["gene", "term"])


def ours_anova(design: str, formula: str, type_: int) -> pd.DataFrame:
    tab = fit(design, formula).anova(type=type_).reset_index()
    tab["term"] = tab["term"].map(canonical)
    return tab.set_index(["gene", "term"])


def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.abs(a - b) / np.abs(b)


def assert_anova_close(ours: pd.DataFrame, ref: pd.DataFrame) -> None:
    ours = ours.loc[ref.index]
    np.testing.assert_array_equal(ours["num_df"], ref["num_df"])
    assert rel(ours["F"], ref["F"]).max() < F_RTOL
    assert rel(ours["sum_sq"], ref["sum_sq"]).max() < F_RTOL
    assert rel(ours["den_df"], ref["den_df"]).max() < DF_RTOL
    np.testing.assert_allclose(ours["pvalue"], ref["pvalue"], rtol=DF_RTOL, atol=1e-12)


CASES = [(d, f, t) for d in RANDOM for f in ("main", "order") for t in (1, 2, 3)
         if not (f == "main" and t == 1) and not (d == "nested_ML" and f == "order")]


@pytest.mark.parametrize(("design", "formula", "type_"), CASES)
def test_anova_matches_lmertest(design: str, formula: str, type_: int) -> None:
    ref = ref_anova(design, formula, type_)
    ours = ours_anova(design, formula, type_)
    assert sorted(set(ours.index)) == sorted(set(ref.index))
    assert_anova_close(ours, ref)


@pytest.mark.parametrize("design", list(RANDOM))
def test_type1_is_sequential_in_patsy_order(design: str) -> None:
    """``ct * trt + x``: patsy puts x last, R before ct:trt; the first two rows agree."""
    ref = ref_anova(design, "main", 1)
    ours = ours_anova(design, "main", 1)
    first = ref[ref.index.get_level_values("term").isin(["ct", "trt"])]
    assert_anova_close(ours, first)
    assert list(fit(design, "main").anova(type=1).loc["g01"].index) == ["ct", "trt", "ct:trt", "x"]


@pytest.mark.parametrize("design", ["one", "nested"])
@pytest.mark.parametrize("type_", [2, 3])
def test_no_intercept_interaction_term_matches(design: str, type_: int) -> None:
    """``0 + ct + ct:trt``: the ct:trt row (contained in nothing) is lmerTest's."""
    ref = ref_anova(design, "nointercept", type_)
    ref = ref[ref.index.get_level_values("term") == "ct:trt"]
    assert_anova_close(ours_anova(design, "nointercept", type_), ref)


@pytest.mark.parametrize("design", ["one", "nested"])
def test_no_intercept_main_effect_is_averaged_over_margin(design: str) -> None:
    """Type 3 of ct in ``0 + ct + ct:trt`` tests the cell-type means averaged over trt.

    lmerTest does not see ct as contained in ct:trt (R codes ct without contrasts there)
    and tests the means at the reference trt instead; flashmm's hypothesis is the
    reference's ``contestMD`` with ``L = [I, I/2]``, and its type 2 row is ct first,
    i.e. lmerTest's type 1 row.
    """
    con = reference("contest")
    con = con[(con.design == design) & (con.formula == "nointercept")].set_index("gene")
    ours = fit(design, "nointercept").anova(type=3).xs("ct", level="term")
    assert rel(ours.loc[con.index, "F"], con["F"]).max() < F_RTOL
    assert rel(ours.loc[con.index, "den_df"], con["den_df"]).max() < DF_RTOL
    assert (ours["num_df"] == 3).all()
    ref1 = ref_anova(design, "nointercept", 1)
    ref1 = ref1[ref1.index.get_level_values("term") == "ct"]
    assert_anova_close(ours_anova(design, "nointercept", 2), ref1)


@pytest.mark.parametrize("design", ["one", "nested"])
def test_interaction_without_main_effect(design: str) -> None:
    """``ct + ct:trt + x`` (no trt): ct is contained in ct:trt.

    Type 3 of ct is then lmerTest's type 3 of ct in ``ct * trt + x`` (the same model and
    the same hypothesis, averaged over trt); type 2 of ct is lmerTest's type 1 of ct after
    x (``x + ct + ct:trt``); the ct:trt and x rows are lmerTest's own.
    """
    ours3 = ours_anova(design, "nomain", 3)
    ref_main = ref_anova(design, "main", 3)
    assert_anova_close(ours3, ref_main[ref_main.index.get_level_values("term") == "ct"])
    ref_own = ref_anova(design, "nomain", 3)
    assert_anova_close(ours3, ref_own[ref_own.index.get_level_values("term") != "ct"])
    ref_seq = ref_anova(design, "xfirst", 1)
    assert_anova_close(ours_anova(design, "nomain", 2),
                       ref_seq[ref_seq.index.get_level_values("term") == "ct"])


# ------------------------------------------------------------- least-squares means
def ref_lsmeans(design: str, pairwise: bool) -> pd.DataFrame:
    tab = reference("lsmeans")
    tab = tab[(tab.design == design) & (tab.pairwise == pairwise)]
    return tab.set_index(["gene", "term", "level"])


@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("design", list(RANDOM))
def test_ls_means_match_lmertest(design: str, pairwise: bool) -> None:
    ref = ref_lsmeans(design, pairwise)
    ours = fit(design, "main").ls_means(["ct", "trt", "ct:trt"], pairwise=pairwise)
    assert sorted(ours.index) == sorted(ref.index)
    ours = ours.loc[ref.index]
    scale = np.maximum(np.abs(ref["estimate"]), ref["se"])
    assert (np.abs(ours["estimate"] - ref["estimate"]) / scale).max() < LS_RTOL
    assert rel(ours["se"], ref["se"]).max() < LS_RTOL
    assert rel(ours["df"], ref["df"]).max() < DF_RTOL
    for col in ("lower", "upper"):
        assert (np.abs(ours[col] - ref[col]) / ref["se"]).max() < DF_RTOL
    np.testing.assert_allclose(ours["pvalue"], ref["pvalue"], rtol=DF_RTOL, atol=1e-12)


# ------------------------------------------------------------------ behaviour
def small_study(formula: str = "~ ct * trt + x", constant_gene: bool = False, **random):  # noqa: ANN201
    obs = cells()
    Y = obs[GENES].copy()
    if constant_gene:
        Y["flat"] = 3.5                      # fitted exactly by the intercept: status not ok
        Y["zero"] = 0.0
    kw = random or RANDOM["one"]
    with pytest.warns(UserWarning) if constant_gene else _no_warning():
        return MultiGeneMixedLM.from_formula(formula, obs, endog=Y, **kw).fit()


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_unfitted_genes_stay_nan_and_out_of_padj() -> None:
    from statsmodels.stats.multitest import multipletests

    res = small_study(constant_gene=True)
    tab = res.anova()
    bad = tab.loc[["flat", "zero"]]
    assert bad.isna().all().all()
    for term, part in tab.groupby(level="term"):
        good = part.drop(index=["flat", "zero"], level="gene")
        assert np.isfinite(good["pvalue"]).all(), term
        np.testing.assert_allclose(good["padj"], multipletests(good["pvalue"], method="fdr_bh")[1])
    ls = res.ls_means("ct")
    assert ls.loc[["flat", "zero"]].isna().all().all()
    for _, part in ls.groupby(level="level"):
        good = part.drop(index=["flat", "zero"], level="gene")
        np.testing.assert_allclose(good["padj"], multipletests(good["pvalue"], method="fdr_bh")[1])


@pytest.mark.parametrize("random", ["one", "three", "slopes"])
def test_anova_agrees_with_wald_test_statistic(random: str) -> None:
    """The type 3 F of ct:trt is the joint Wald F of its coefficients (no other term contains it).

    Also for correlated random slopes (``re_formula="~ 1 + x"``), which lmerTest treats alike.
    """
    kw = {"groups": "donor", "re_formula": "~ 1 + x"} if random == "slopes" else RANDOM[random]
    obs = cells()
    res = MultiGeneMixedLM.from_formula(FIXED["main"], obs, endog=obs[GENES], **kw).fit()
    F = res.anova().xs("ct:trt", level="term")["F"]
    wald = res.wald_test(["ct[T.B]:trt[T.T] = 0", "ct[T.C]:trt[T.T] = 0"])
    np.testing.assert_allclose(F.loc[wald.index], wald["statistic"], rtol=1e-10)
    assert np.isfinite(res.anova()["den_df"]).all()


def test_type3_does_not_depend_on_the_coding() -> None:
    """Sum coding of ct gives lmerTest's type 3 hypotheses mapped to it: the same tests."""
    treat = fit("one", "main").anova(type=3)
    summed = small_study("~ C(ct, Sum) * trt + x").anova(type=3).reset_index()
    summed["term"] = summed["term"].str.replace("C(ct, Sum)", "ct", regex=False)
    summed = summed.set_index(["gene", "term"]).loc[treat.index]
    for col in ("F", "den_df", "num_df"):
        np.testing.assert_allclose(summed[col], treat[col], rtol=1e-8)


def test_df_methods() -> None:
    res = fit("one", "main")
    sat = res.anova()
    resid = res.anova(df_method="residual")
    normal = res.anova(df_method="normal")
    np.testing.assert_allclose(resid["F"], sat["F"])
    assert (resid["den_df"] == res.nobs - res.k_fe).all()
    assert np.isinf(normal["den_df"]).all()
    from scipy import stats

    np.testing.assert_allclose(normal["pvalue"], stats.chi2.sf(normal["F"] * normal["num_df"],
                                                               normal["num_df"]))
    ls = res.ls_means("ct", df_method="normal")
    assert np.isinf(ls["df"]).all()
    with pytest.raises(ValueError, match="kenward-roger.*needs a REML fit"):
        fit("nested_ML", "main").anova(df_method="kenward-roger")
    with pytest.raises(ValueError, match="needs a REML fit"):
        fit("nested_ML", "main").ls_means("ct", df_method="Kenward-Roger")
    with pytest.raises(ValueError, match="df_method"):
        res.anova(df_method="lme4")
    with pytest.raises(ValueError, match="type must be"):
        res.anova(type=4)


def test_bad_term_names_the_term_and_lists_valid_ones() -> None:
    res = fit("one", "main")
    with pytest.raises(TermError, match=r"'cell' is not a term of the model; terms are "
                                        r"\['ct', 'trt', 'ct:trt', 'x'\]"):
        res.ls_means("cell")
    with pytest.raises(TermError, match=r"'x' involves a numerical variable.*\['ct', 'trt', 'ct:trt'\]"):
        res.ls_means("x")


def test_model_without_formula_says_what_is_needed() -> None:
    obs = cells()
    X = np.column_stack([np.ones(len(obs)), obs["x"]])
    res = MultiGeneMixedLM(obs[GENES], X, groups=obs["donor"]).fit()
    with pytest.raises(TermError, match="from_formula"):
        res.anova()


def test_term_structure_rebuilds_the_design_and_survives_save(tmp_path) -> None:  # noqa: ANN001
    from flashmm._terms import TermStructure
    from flashmm.stats import SufficientStats

    obs = cells()
    for formula in ("~ ct * trt + x", "~ 0 + ct + ct:trt", "~ ct:trt", "~ C(ct, Sum) * trt + x:ct",
                    "~ np.log(x ** 2) * trt"):
        model = MultiGeneMixedLM.from_formula(formula, obs, endog=obs[GENES], groups="donor")
        st = TermStructure.from_info(model.stats.info["terms"])
        values = {}
        for name, fac in st.factors.items():
            if fac.kind == "categorical":
                col = name[2:4] if name.startswith("C(") else name
                values[name] = pd.Categorical(obs[col], categories=fac.levels).codes.astype(int)
            else:
                values[name] = np.log(obs["x"].to_numpy() ** 2)[:, None] if "log" in name \
                    else obs[[name]].to_numpy()
        np.testing.assert_allclose(st.model_rows(values), model.design.exog, atol=1e-12)
    res = fit("nested", "main")
    path = tmp_path / "stats.npz"
    res.stats.save(path)
    loaded = MultiGeneMixedLM.from_sufficient_stats(SufficientStats.load(path))
    again = loaded.fit().anova()
    pd.testing.assert_frame_equal(again, res.anova(), rtol=1e-8)


def test_zero_intercept_and_interaction_only_designs_run() -> None:
    """Designs lmerTest handles specially: single term, interaction only, no intercept."""
    one = small_study("~ ct").anova(type=3)
    seq = small_study("~ ct").anova(type=1)
    pd.testing.assert_frame_equal(one, seq)                # one term: lmerTest uses type 1
    assert (one["num_df"] == 2).all()
    noint = small_study("~ 0 + ct").anova()
    assert (noint["num_df"] == 3).all()                    # the means themselves: 3 df
    inter = small_study("~ ct:trt").anova(type=2)
    assert (inter["num_df"] == 5).all()                    # all 6 cells around the intercept
    pd.testing.assert_frame_equal(small_study("~ ct:trt").anova(type=3), inter)
    # patsy codes ct:trt here with a trt[T.T] column, not a cell indicator; contained in no
    # term, its type 3 hypothesis is its own coefficients (lmerTest's rule) all the same
    res = small_study("~ x + ct:trt")
    own = [c for c in res.exog_names if "trt" in c]
    assert len(own) == 5
    wald = res.wald_test([f"{c} = 0" for c in own])
    F = res.anova(type=3).xs("ct:trt", level="term")["F"]
    np.testing.assert_allclose(F.loc[wald.index], wald["statistic"], rtol=1e-10)


def test_combined_df_follows_lmertest_rules() -> None:
    """``get_Fstat_ddf``: one df as is, equal df their mean, any df <= 2 gives 2, else 2E/(E-q)."""
    from flashmm.anova import combine_satterthwaite_df

    nu = np.array([[12.0, 7.0, 99.0], [5.0, 5.0, 5.0], [30.0, 1.5, 8.0], [9.0, 6.0, 4.0]])
    pos = np.array([[True, False, False], [True, True, True], [True, True, True],
                    [True, True, False]])
    E = 9 / 7 + 6 / 4
    np.testing.assert_allclose(combine_satterthwaite_df(nu, pos), [12.0, 5.0, 2.0, 2 * E / (E - 2)])


def test_doolittle_rows_factor_xx() -> None:
    """``U`` is unit upper triangular and ``X'X = U' D U`` with D diagonal (LDL')."""
    from flashmm.anova import doolittle_rows

    XX = fit("one", "main").stats.XX
    U = doolittle_rows(XX)
    np.testing.assert_allclose(np.diag(U), 1.0)
    assert np.allclose(np.tril(U, -1), 0.0)
    D = np.linalg.solve(U.T, XX) @ np.linalg.inv(U)
    np.testing.assert_allclose(D, np.diag(np.diag(D)), atol=1e-6 * np.abs(XX).max())


def test_ls_means_interval_at_alpha() -> None:
    from scipy import stats

    ls = fit("nested", "main").ls_means("ct:trt", pairwise=True, alpha=0.1)
    half = stats.t.ppf(0.95, ls["df"]) * ls["se"]
    np.testing.assert_allclose(ls["upper"] - ls["estimate"], half, rtol=1e-10)
    np.testing.assert_allclose(ls["estimate"] - ls["lower"], half, rtol=1e-10)
    assert ls.index.get_level_values("level")[0] == "A:C - B:C"
    assert len(ls.loc["g01"]) == 15                       # 6 cells: 15 pairs
