"""The weighted mixed model (``weights=``) against lme4's ``lmer(weights = w)`` + lmerTest.

Reference: tests/reference/weighted_lmm (44 simulated pseudobulk samples from 16
donors, 24 genes, log-normal precision weights; ``(1|donor)`` and ``(1|donor) +
(1|plate)``, REML and ML; lme4 with bobyqa at ``rhoend = 1e-12``).  Observed
agreement: coefficients 1.5e-8, SEs 2.2e-8 relative, log-likelihood within
1e-12 either way, Satterthwaite df 9e-8 relative (lmerTest's df come from a
numerical Hessian, accurate to about 1e-6).  The tolerances are the parity
targets of issue 17 (coefficients 1e-6, SEs 1e-5, df 2e-3, log-likelihood never
below lme4's beyond 1e-6), far below what a modelling difference makes: leaving
out the weights moves the coefficients by 1e-2 and the log-likelihood by 10.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import flashmm
from flashmm._errors import DataError, DesignError
from flashmm._memory import MemoryBudgetError

REF = Path(__file__).resolve().parent / "reference" / "weighted_lmm"
TERMS = ["Intercept", "trtcase", "celltypec1", "celltypec2"]
MODELS = {"donor": {"groups": "donor"},
          "donor_plate": {"vc_formula": {"donor": "0 + C(donor)", "plate": "0 + C(plate)"}}}


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    samples = pd.read_csv(REF / "samples.csv", index_col=0)
    samples["trt"] = pd.Categorical(samples["trt"], ["ctrl", "case"])
    return (samples, pd.read_csv(REF / "expr.csv", index_col=0),
            pd.read_csv(REF / "weights.csv", index_col=0))


def _fit(data, model: str, reml: bool, weights=None) -> flashmm.MultiGeneMixedLMResults:
    samples, Y, W = data
    m = flashmm.MultiGeneMixedLM.from_formula("~ trt + celltype", samples, endog=Y,
                                              weights=W if weights is None else weights,
                                              **MODELS[model])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # singular fits are expected for some genes
        return m.fit(reml=reml)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("reml", [True, False])
def test_matches_lmer_with_weights(data, model, reml):
    ref = pd.read_csv(REF / f"lmer_{model}_{'REML' if reml else 'ML'}.csv", index_col=0)
    res = _fit(data, model, reml)

    def cols(q: str) -> np.ndarray:
        return ref[[f"{q}_{t}" for t in TERMS]].to_numpy()

    np.testing.assert_allclose(res.fe_params.to_numpy(), cols("coef"), rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.bse_fe.to_numpy(), cols("se"), rtol=1e-5)
    assert np.all(res.llf.to_numpy() >= ref["loglik"].to_numpy() - 1e-6)
    np.testing.assert_allclose(res.llf.to_numpy(), ref["loglik"].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.df_satterthwaite.to_numpy(), cols("df"), rtol=2e-3)
    np.testing.assert_allclose(res.pvalues.to_numpy(), cols("p"), rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(res.scale.to_numpy(), ref["sigma2"].to_numpy(), rtol=1e-5)
    for comp in res.component_names:
        np.testing.assert_allclose(res.vcomp[comp].to_numpy(), ref[f"var_{comp}"].to_numpy(),
                                   rtol=1e-4, atol=1e-7)
    assert np.all(res.boundary.to_numpy() == ref["singular"].to_numpy())


def test_contrast_blups_and_fitted_values(data):
    ref = pd.read_csv(REF / "lmer_donor_REML.csv", index_col=0)
    res = _fit(data, "donor", True)
    tt = res.t_test([0, 1, 0.5, -0.5])
    np.testing.assert_allclose(tt.effect.to_numpy().ravel(), ref["contrast_est"], atol=1e-6)
    np.testing.assert_allclose(tt.sd.to_numpy().ravel(), ref["contrast_se"], rtol=1e-5)
    np.testing.assert_allclose(tt.df_denom.to_numpy().ravel(), ref["contrast_df"], rtol=2e-3)
    np.testing.assert_allclose(res.random_effects["donor"]["D00"].to_numpy(), ref["blup_D00"],
                               atol=1e-6)
    np.testing.assert_allclose(res.predict().iloc[0].to_numpy(), ref["fitted_S00"], atol=1e-6)
    np.testing.assert_allclose(res.random_effects_cov["donor"]["D00"].to_numpy(),
                               ref["condvar_D00"], rtol=1e-5, atol=1e-9)   # lme4's postVar
    table = res.anova()                          # type 3 F-tests: trt has 1 df, as its t-test
    p_trt = table.xs("trt", level="term")["pvalue"].to_numpy()
    np.testing.assert_allclose(p_trt, ref["p_trtcase"], rtol=1e-4)


def test_unit_weights_equal_the_unweighted_fit(data):
    samples, Y, _ = data
    res = _fit(data, "donor", True, weights=np.ones(len(samples)))
    plain = flashmm.MultiGeneMixedLM.from_formula("~ trt + celltype", samples, endog=Y,
                                                  groups="donor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = plain.fit()
    np.testing.assert_allclose(res.fe_params.to_numpy(), plain.fe_params.to_numpy(), atol=1e-7)
    np.testing.assert_allclose(res.llf.to_numpy(), plain.llf.to_numpy(), atol=1e-8)
    ok = ~plain.boundary.to_numpy()
    np.testing.assert_allclose(res.df_satterthwaite.to_numpy()[ok],
                               plain.df_satterthwaite.to_numpy()[ok], rtol=1e-5)


def test_weights_matter(data):
    # the test can fail: unweighted estimates are far from lmer(weights = w)
    samples, Y, W = data
    ref = pd.read_csv(REF / "lmer_donor_REML.csv", index_col=0)
    res = _fit(data, "donor", True, weights=np.ones(len(samples)))
    assert np.max(np.abs(res.fe_params.to_numpy() - ref[[f"coef_{t}" for t in TERMS]].to_numpy())
                  ) > 1e-2


def test_array_constructor_and_scale_invariance(data):
    samples, Y, W = data
    X = np.column_stack([np.ones(len(samples)), samples["trt"] == "case",
                         samples["celltype"] == "c1", samples["celltype"] == "c2"]).astype(float)
    m = flashmm.MultiGeneMixedLM(Y.to_numpy() * 1e6, X, groups=samples["donor"].to_numpy(),
                                 weights=W.to_numpy() * 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = m.fit()
    ref = pd.read_csv(REF / "lmer_donor_REML.csv", index_col=0)
    # scaling the weights by 3 rescales sigma^2 only; y by 1e6 scales b and the SEs
    np.testing.assert_allclose(res.fe_params.to_numpy() / 1e6,
                               ref[[f"coef_{t}" for t in TERMS]].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(res.bse_fe.to_numpy() / 1e6,
                               ref[[f"se_{t}" for t in TERMS]].to_numpy(), rtol=1e-5)


@pytest.mark.parametrize("bad, count, kind", [(0.0, 2, "zero"), (-1.0, 2, "negative"),
                                               (np.nan, 2, "NaN")])
def test_bad_weights_are_counted(data, bad, count, kind):
    samples, Y, W = data
    W = W.copy()
    W.iloc[0, 0] = W.iloc[3, 5] = bad
    with pytest.raises(DataError, match=f"{count} of {W.size} are not .*{count} {kind}"):
        flashmm.MultiGeneMixedLM.from_formula("~ trt", samples, endog=Y, weights=W,
                                              groups="donor")


def test_weights_shape_and_unsupported_models(data):
    samples, Y, W = data
    with pytest.raises(DataError, match="transposed"):
        flashmm.MultiGeneMixedLM.from_formula("~ trt", samples, endog=Y, weights=W.T,
                                              groups="donor")
    with pytest.raises(DesignError, match="random slopes"):
        flashmm.MultiGeneMixedLM.from_formula("~ trt", samples.assign(x=np.arange(len(samples))),
                                              endog=Y, weights=W, groups="donor",
                                              re_formula="~ 1 + x")
    same = flashmm.MultiGeneMixedLM.from_formula(      # two relabellings of one partition
        "~ trt", samples.assign(d2=samples["donor"]), endog=Y, weights=W,
        vc_formula={"donor": "0 + C(donor)", "d2": "0 + C(d2)"})
    with pytest.raises(DesignError):
        same.fit()
    res = _fit(data, "donor", True)
    for call in (lambda: res.ranova(), lambda: res.conf_int_re(), lambda: res.save("x.npz")):
        with pytest.raises(NotImplementedError):
            call()


def test_memory_budget_refuses_with_the_bytes_needed(data):
    samples, Y, W = data
    m = flashmm.MultiGeneMixedLM.from_formula("~ trt", samples, endog=Y, weights=W,
                                              groups="donor")
    with pytest.raises(MemoryBudgetError, match="per gene"):
        m.fit(max_memory=1000)
    from flashmm._weighted_stats import WeightedStats

    with pytest.raises(MemoryBudgetError, match="per-gene weighted statistics need"):
        WeightedStats.from_design(m.design, Y, W.to_numpy(), list(Y.columns), max_memory=1000)


def test_diagonal_path_equals_dense_path(data):
    # one random intercept uses the O(q p^2) diagonal criterion; the dense one must agree
    from flashmm._fit_weighted import WeightedCriterion, is_diagonal

    samples, Y, W = data
    m = flashmm.MultiGeneMixedLM.from_formula("~ trt + celltype", samples, endog=Y, weights=W,
                                              groups="donor")
    ws = m.weighted
    assert is_diagonal(ws)
    g = np.column_stack([np.linspace(0.0, 3.0, ws.n_genes)])
    for reml in (True, False):
        diag = WeightedCriterion(ws, reml)
        dense = WeightedCriterion(ws, reml, force_dense=True)
        assert diag.diagonal and not dense.diagonal
        for a, b in zip(diag.newton_terms(g), dense.newton_terms(g), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
        pa, pb = diag.parts(g), dense.parts(g)
        np.testing.assert_allclose(diag.information(g, pa), dense.information(g, pb), rtol=1e-10,
                                   atol=1e-10)
        np.testing.assert_allclose(diag.cov_derivatives(pa), dense.cov_derivatives(pb),
                                   rtol=1e-10, atol=1e-12)


def test_exact_hessian_matches_finite_differences(data):
    from flashmm._fit_weighted import WeightedCriterion

    samples, Y, W = data
    m = flashmm.MultiGeneMixedLM.from_formula("~ trt + celltype", samples, endog=Y, weights=W,
                                              **MODELS["donor_plate"])
    crit = WeightedCriterion(m.weighted, True)
    g = np.full((m.weighted.n_genes, 2), 0.4)
    f, grad, hess = crit.newton_terms(g)
    h = 1e-6
    for j in range(2):
        e = np.zeros(2)
        e[j] = h
        fp, gp, _ = crit.newton_terms(g + e)
        fm, gm, _ = crit.newton_terms(g - e)
        np.testing.assert_allclose(grad[:, j], (fp - fm) / (2 * h), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(hess[:, :, j], (gp - gm) / (2 * h), rtol=1e-5, atol=1e-5)


def test_missing_drop_takes_the_weights_along_and_e_bayes_works(data):
    samples, Y, W = data
    Yn = Y.copy()
    Yn.iloc[5, 2] = np.nan
    with pytest.warns(UserWarning, match="1"):
        m = flashmm.MultiGeneMixedLM.from_formula("~ trt + celltype", samples, endog=Yn,
                                                  weights=W, groups="donor", missing="drop")
    keep = np.arange(len(samples)) != 5
    ref = flashmm.MultiGeneMixedLM.from_formula("~ trt + celltype", samples[keep],
                                                endog=Y[keep], weights=W[keep], groups="donor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = m.fit(), ref.fit()
    np.testing.assert_allclose(a.fe_params.to_numpy(), b.fe_params.to_numpy(), rtol=1e-10, atol=1e-12)
    eb = flashmm.e_bayes(a)                   # moderation of the weight-1 residual variances
    assert eb.t.shape == (Y.shape[1], 4) and np.all(np.isfinite(eb.t))


@pytest.mark.parametrize("model", list(MODELS))
def test_kenward_roger_matches_pbkrtest_with_the_weights(data, model):
    """kr_weighted_reference.R: pbkrtest's vcovAdj_internal with G_res = diag(1/w) at lme4's
    REML estimates (pbkrtest's vcovAdj itself ignores the weights).  As for the unweighted
    adjustment (tests/test_kenward_roger.py): 1e-6 of the largest entry, df 1e-5 relative;
    the fits agree to 2e-8, and the adjustment is far above that."""
    ref = pd.read_csv(REF / "kr_weighted.csv")
    ref = ref[ref.model == model]
    res = _fit(data, model, True)
    res.df_method = "kenward-roger"
    names = {"(Intercept)": "Intercept", "trtcase": "trt[T.case]",
             "celltypec1": "celltype[T.c1]", "celltypec2": "celltype[T.c2]"}
    df = res.contrast_df(np.eye(res.k_fe))
    for pos, gene in enumerate(res.gene_names):
        tab = ref[ref.gene == gene]
        idx = [res.exog_names.index(names[x]) for x in tab.row.unique()]
        p = len(idx)
        want = tab.vcov_adj.to_numpy().reshape(p, p, order="F")
        ours = res.cov_params_kr(gene).to_numpy()[np.ix_(idx, idx)]
        err = np.max(np.abs(ours - want))
        assert err < 1e-6 * np.max(np.abs(want))
        adjustment = np.max(np.abs(want - tab.vcov.to_numpy().reshape(p, p, order="F")))
        assert err < 0.01 * adjustment
        want_df = tab.drop_duplicates("row").df_row.to_numpy()
        np.testing.assert_allclose(df[pos, idx], want_df, rtol=1e-5)
    assert res.anova().den_df.notna().all()


@pytest.mark.parametrize("reml", [True, False])
def test_schur_path_equals_dense_path(data, reml):
    # (1|donor) + (1|plate): the donors' diagonal block and a Schur complement on the plates
    from flashmm._fit_weighted import WeightedCriterion

    samples, Y, W = data
    m = flashmm.MultiGeneMixedLM.from_formula("~ trt + celltype", samples, endog=Y, weights=W,
                                              **MODELS["donor_plate"])
    fast = WeightedCriterion(m.weighted, reml)
    dense = WeightedCriterion(m.weighted, reml, force_dense=True)
    assert fast.split is not None and dense.split is None
    rng = np.random.default_rng(0)
    g = rng.uniform(0.0, 2.0, size=(m.weighted.n_genes, 2))
    g[::5, 1] = 0.0                                          # a component at the boundary
    for a, b in zip(fast.newton_terms(g), dense.newton_terms(g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    pa, pb = fast.parts(g), dense.parts(g)
    np.testing.assert_allclose(fast.information(g, pa), dense.information(g, pb), rtol=1e-9,
                               atol=1e-9)
    np.testing.assert_allclose(pa.Minv_diag, pb.Minv_diag, rtol=1e-10)
    np.testing.assert_allclose(pa.u, pb.u, rtol=1e-9, atol=1e-10)
