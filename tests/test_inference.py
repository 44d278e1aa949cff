"""Inference: Satterthwaite df against lmerTest, contrasts, summaries, null calibration."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import fit_lme4_study, lme4_ref, r_to_patsy, simulate_study

from flashmm import MultiGeneMixedLM


@pytest.mark.parametrize("model", ["1comp", "2comp"])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_satterthwaite_matches_lmertest(lme4_cells, model, method):
    """df within 2e-3 relative of lmerTest (issue); lmerTest's numerical
    derivatives are good to ~1e-6, which is what we actually see."""
    res = fit_lme4_study(lme4_cells, model, method)
    ref = lme4_ref(model, method, "df")
    ours = res.df_satterthwaite[[r_to_patsy(c) for c in ref.columns]].to_numpy()
    rel = np.abs(ours - ref.to_numpy()) / ref.to_numpy()
    print(f"\nSatterthwaite {model} {method}: max rel diff {rel.max():.2e}, median {np.median(rel):.1e}")
    assert rel.max() < 2e-3
    # contrasts, t and p
    con = lme4_ref(model, method, "contrast")
    spec = {"B1vsB2": "cls[c1]:trt[T.B] - cls[c2]:trt[T.B]",
            "Bavg": "(cls[c1]:trt[T.B] + cls[c2]:trt[T.B] + cls[c3]:trt[T.B]) / 3"}
    test = res.t_test(spec)
    for name in spec:
        np.testing.assert_allclose(test.effect[name], con[f"{name}_estimate"], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(test.df_denom[name], con[f"{name}_df"], rtol=2e-3)
        np.testing.assert_allclose(test.pvalue[name], con[f"{name}_p"], rtol=2e-3, atol=1e-8)


def test_contrast_forms_agree(lme4_cells):
    res = fit_lme4_study(lme4_cells, "1comp", "REML")
    names = res.exog_names
    i, j = names.index("cls[c1]:trt[T.B]"), names.index("cls[c2]:trt[T.B]")
    vec = np.zeros(len(names))
    vec[i], vec[j] = 1, -1
    by_vec = res.t_test(vec)
    by_str = res.t_test("cls[c1]:trt[T.B] - cls[c2]:trt[T.B] = 0")
    by_list = res.t_test(["cls[c1]:trt[T.B] - cls[c2]:trt[T.B]"])
    by_mat = res.t_test(vec[None, :])
    for other in (by_str, by_list, by_mat):
        np.testing.assert_allclose(other.pvalue.to_numpy(), by_vec.pvalue.to_numpy(), rtol=1e-12)
    frame = by_vec.summary_frame()
    assert list(frame.columns) == ["gene", "contrast", "effect", "se", "t", "df", "pvalue", "padj",
                                   "ci_low", "ci_high", "converged"]
    # one-sided alternatives split the two-sided p-value
    up = res.t_test(vec, alternative="larger").pvalue.to_numpy()
    down = res.t_test(vec, alternative="smaller").pvalue.to_numpy()
    np.testing.assert_allclose(up + down, 1.0, rtol=1e-12)
    np.testing.assert_allclose(2 * np.minimum(up, down), by_vec.pvalue.to_numpy(), rtol=1e-10)


def test_conf_int_uses_test_df(lme4_cells):
    from scipy import stats

    res = fit_lme4_study(lme4_cells, "1comp", "REML")
    ci = res.conf_int(0.05)
    assert list(ci.columns) == ["gene", "term", "lower", "upper"]
    b = res.fe_params.to_numpy().ravel()
    se = res.bse_fe.to_numpy().ravel()
    df = res.df_satterthwaite.to_numpy().ravel()
    np.testing.assert_allclose(ci["upper"], b + stats.t.ppf(0.975, df) * se, rtol=1e-12)


def test_wald_test_single_row_equals_t_squared(lme4_cells):
    res = fit_lme4_study(lme4_cells, "1comp", "REML")
    c = "cls[c1]:trt[T.B] - cls[c2]:trt[T.B]"
    w = res.wald_test(c)
    t = res.t_test(c)
    np.testing.assert_allclose(w["statistic"], t.tvalue.iloc[:, 0] ** 2, rtol=1e-10)
    np.testing.assert_allclose(w["df_denom"], t.df_denom.iloc[:, 0], rtol=1e-6)
    np.testing.assert_allclose(w["pvalue"], t.pvalue.iloc[:, 0], rtol=1e-8)
    joint = res.wald_test(["cls[c1]:trt[T.B]", "cls[c2]:trt[T.B]", "cls[c3]:trt[T.B]"])
    assert (joint["df_num"] == 3).all() and np.all(joint["pvalue"].between(0, 1))
    chi = res.wald_test(["cls[c1]:trt[T.B]", "cls[c2]:trt[T.B]"], df_method="normal")
    assert np.isinf(chi["df_denom"]).all()


def test_gene_summary_equals_statsmodels():
    sm = pytest.importorskip("statsmodels.api")
    data, Y = simulate_study(n_genes=3, n_groups=12, seed=11)
    res = MultiGeneMixedLM.from_formula("~ x + C(trt)", data, endog=Y, groups="grp").fit()
    gene = res.gene("gene001")
    fit = sm.MixedLM.from_formula("y ~ x + C(trt)", data.assign(y=Y["gene001"]), groups="grp").fit()
    ours = gene.summary(df_method="normal").tables[1]
    theirs = fit.summary().tables[1]
    # same rows, same formatted fixed-effect numbers (3 decimals)
    fe = res.exog_names
    cols = ["Coef.", "Std.Err.", "z", "P>|z|"]
    pd.testing.assert_frame_equal(ours.loc[fe, cols], theirs.loc[fe, cols], check_names=False)
    # interval ends: equal to the printed precision (last digit may round differently)
    for col in ours.columns[4:]:
        np.testing.assert_allclose(ours.loc[fe, col].astype(float), theirs.loc[fe, col].astype(float),
                                   atol=1.01e-3)
    assert ours.loc["grp Var", "Coef."] == theirs.loc["grp Var", "Coef."]
    text = gene.summary().as_text()
    assert "Mixed Linear Model Regression Results" in text and "grp Var" in text
    np.testing.assert_allclose(gene.llf, fit.llf, atol=1e-5)
    np.testing.assert_allclose(gene.params[fe], fit.fe_params[fe], rtol=1e-4)
    assert set(gene.random_effects) == set(fit.random_effects)


def test_fit_summary_object(lme4_cells):
    res = fit_lme4_study(lme4_cells, "2comp", "REML")
    smry = res.summary()
    text = smry.as_text()
    assert "Genes converged" in text and "Genes at boundary" in text
    assert "<table" in smry.as_html()
    assert len(smry.tables) == 3
    assert int(smry.tables[0].iloc[2, 3]) == res.boundary.sum() or "Genes at boundary" in text


def test_vcomp_tests_icc_and_lr(lme4_cells):
    full = fit_lme4_study(lme4_cells, "2comp", "ML")
    one = fit_lme4_study(lme4_cells, "1comp", "ML")
    icc = full.icc
    assert np.all((icc.to_numpy() >= 0) & (icc.to_numpy() <= 1))
    lr = full.compare_lr_test(one)
    assert (lr["df"] == 1).all()
    assert np.all(lr["statistic"] >= 0)
    # an LR statistic is 0 exactly where the extra component sits at the boundary
    at0 = full.vcomp["loc"].to_numpy() == 0
    assert np.allclose(lr["statistic"].to_numpy()[at0], 0, atol=1e-6)
    pz = full.vcomp_test()
    assert np.all(pz.to_numpy()[full.vcomp.to_numpy() == 0] == 1)
    reml = fit_lme4_study(lme4_cells, "2comp", "REML")
    with pytest.raises(ValueError, match="REML"):
        reml.compare_lr_test(one)


def _null_study(seed, n_genes=400, n_per_arm=6, cells=300):
    rng = np.random.default_rng(seed)
    n_groups = 2 * n_per_arm
    grp = np.repeat(np.arange(n_groups), cells)
    data = pd.DataFrame({"grp": grp.astype(str), "trt": np.where(grp < n_per_arm, "A", "B")})
    Y = rng.normal(scale=np.sqrt(0.3), size=(n_groups, n_genes))[grp] + rng.normal(size=(grp.size, n_genes))
    return data, Y


def test_null_rejection_rates_satterthwaite():
    """6 vs 6 samples, sample-level treatment, no true effect (issue numbers):
    with Satterthwaite df the rejection rate at 0.05 must lie in [3.5%, 6.5%]
    and at 0.001 be at most 0.25%; n - p and z are anti-conservative."""
    p_s, p_r = [], []
    for seed in range(5):
        data, Y = _null_study(seed)
        res = MultiGeneMixedLM.from_formula("~ C(trt)", data, endog=Y, groups="grp").fit()
        t = res.t_test("C(trt)[T.B]")
        p_s.append(t.pvalue.to_numpy().ravel())
        p_r.append(res.t_test("C(trt)[T.B]", df_method="residual").pvalue.to_numpy().ravel())
    p_s, p_r = np.concatenate(p_s), np.concatenate(p_r)
    rate05, rate001 = np.mean(p_s < 0.05), np.mean(p_s < 0.001)
    print(f"\nnull: Satterthwaite {rate05:.2%} at 0.05, {rate001:.2%} at 0.001; "
          f"residual df {np.mean(p_r < 0.05):.2%} at 0.05 ({p_s.size} genes)")
    assert 0.035 <= rate05 <= 0.065
    assert rate001 <= 0.0025
    assert np.mean(p_r < 0.05) > 0.07
