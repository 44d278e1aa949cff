"""Kenward-Roger (``df_method="kenward-roger"``) against pbkrtest and lmerTest (tests/reference/kr).

``kr_reference.R`` fits the six genes of the anova study (tests/reference/anova: 10 donors,
300 cells, trt at donor level, 3 cell types, 3 batches) by REML with ``ct * trt + x`` in the
designs one component, nested ``+ (1|donor:ct)``, crossed ``+ (1|batch)``, all three, one
component and nested on the first 6 donors only (3 vs 3), and random slopes ``(1 + x | donor)``
(five of the six slope fits are singular: a correlation of +-1).  It writes pbkrtest's
``vcovAdj`` and ``Lb_ddf`` and lmerTest's ``anova(ddf = "Kenward-Roger")`` (types 1-3),
``ls_means`` and ``difflsmeans``.

Tolerances.  pbkrtest's adjustment is analytic (no numerical derivative): it differs from ours
only through the REML estimates, which lme4 (bobyqa, rhoend 1e-12) and flashmm fix to about
1e-7 relative.  lme4's own ``vcov`` agrees with ours to at most 3e-7 relative (of the largest
entry), and the adjusted one to the same (largest seen 8.6e-7, crossed, whose three batches
fix the batch variance weakly).  Hence 1e-6 relative (of the largest entry) on ``vcovAdj``,
and 1e-5 relative on the df and F (largest seen 4e-7); sums of squares and least-squares means
1e-6 relative.
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np
import pandas as pd
import pytest
from conftest import DONOR_DESIGNS, REFERENCE

from flashmm import MultiGeneMixedLM
from flashmm._kenward_roger import kr_pieces
from flashmm._memory import MemoryBudget, MemoryBudgetError

KR = REFERENCE / "kr"
GENES = [f"g{i:02d}" for i in range(1, 7)]
DESIGNS = dict(DONOR_DESIGNS)
DESIGNS["one6"], DESIGNS["nested6"] = DESIGNS["one"], DESIGNS["nested"]
DESIGNS["slopes"] = {"groups": "donor", "re_formula": "~ 1 + x"}
VCOV_RTOL = 1e-6
DF_RTOL = 1e-5
SS_RTOL = 1e-6


def r_name(name: str) -> str:
    """R's model.matrix name -> patsy's (``ctB:trtT`` -> ``ct[T.B]:trt[T.T]``)."""
    name = name.replace("(Intercept)", "Intercept")
    name = re.sub(r"ct([BC])", r"ct[T.\1]", name)
    return name.replace("trtT", "trt[T.T]")


@cache
def fit(design: str):  # noqa: ANN201 - results
    obs = pd.read_csv(REFERENCE / "anova" / "cells.csv")
    if design.endswith("6"):
        obs = obs[obs.donor.isin([f"D{i:02d}" for i in range(1, 7)])].reset_index(drop=True)
    model = MultiGeneMixedLM.from_formula("~ ct * trt + x", obs, endog=obs[GENES], **DESIGNS[design])
    return model.fit(df_method="kenward-roger")


@cache
def reference(what: str) -> pd.DataFrame:
    return pd.read_csv(KR / f"{what}.csv")


def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.abs(a - b) / np.abs(b)


@pytest.mark.parametrize("design", list(DESIGNS))
def test_adjusted_covariance_matches_vcovadj(design: str) -> None:
    res = fit(design)
    ref = reference("vcov")
    names = res.exog_names
    for gene in GENES:
        tab = ref[(ref.design == design) & (ref.gene == gene)]
        idx = [names.index(r_name(x)) for x in tab.row.unique()]
        p = len(idx)
        want = tab.vcov_adj.to_numpy().reshape(p, p, order="F")
        ours = res.cov_params_kr(gene).to_numpy()[np.ix_(idx, idx)]
        err = np.max(np.abs(ours - want))
        assert err < VCOV_RTOL * np.max(np.abs(want))
        # the adjustment itself is resolved, not only lme4's vcov (it is small with 30 cells
        # per donor, 1e-5 relative for one component): our error is a tenth of it at most
        unadjusted = tab.vcov.to_numpy().reshape(p, p, order="F")
        assert err < 0.1 * np.max(np.abs(want - unadjusted))


@pytest.mark.parametrize("design", list(DESIGNS))
def test_contrast_df_and_variance_match_lb_ddf(design: str) -> None:
    res = fit(design)
    ref = reference("lbddf")
    ref = ref[ref.design == design]
    contrasts = {r_name(c): c for c in ref.contrast.unique()}   # coefficients and expressions
    tests = res.t_test({name: name for name in contrasts})
    for name, rname in contrasts.items():
        want = ref[ref.contrast == rname].set_index("gene").loc[GENES]
        assert rel(tests.df_denom[name], want.df).max() < DF_RTOL, name
        assert rel(tests.sd[name] ** 2, want.var_adj).max() < SS_RTOL, name
        assert (np.abs(tests.effect[name] - want.estimate) / np.sqrt(want["var"])).max() < 1e-5


@pytest.mark.parametrize("type_", [1, 2, 3])
@pytest.mark.parametrize("design", list(DESIGNS))
def test_anova_matches_lmertest_kenward_roger(design: str, type_: int) -> None:
    ref = reference("anova")
    ref = ref[(ref.design == design) & (ref.type == type_)].copy()
    ref["term"] = [":".join(sorted(t.split(":"))) for t in ref.term]
    if type_ == 1:   # R orders ct, trt, x, ct:trt; patsy ct, trt, ct:trt, x: the first two agree
        ref = ref[ref.term.isin(["ct", "trt"])]
    ref = ref.set_index(["gene", "term"])
    ours = fit(design).anova(type=type_)
    ours.index = pd.MultiIndex.from_tuples([(g, ":".join(sorted(t.split(":"))))
                                            for g, t in ours.index])
    ours = ours.loc[ref.index]
    assert (ours.num_df == ref.num_df).all()
    assert rel(ours.den_df, ref.den_df).max() < DF_RTOL
    assert rel(ours.F, ref.F).max() < DF_RTOL
    assert rel(ours.sum_sq, ref.sum_sq).max() < SS_RTOL
    np.testing.assert_allclose(ours.pvalue, ref.pvalue, rtol=DF_RTOL, atol=1e-12)


@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("design", ["one", "nested", "crossed", "one6"])
def test_ls_means_match_lmertest_kenward_roger(design: str, pairwise: bool) -> None:
    ref = reference("lsmeans")
    ref = ref[(ref.design == design) & (ref.pairwise == pairwise)].set_index(
        ["gene", "term", "level"])
    ours = fit(design).ls_means(["trt", "ct:trt"], pairwise=pairwise).loc[ref.index]
    scale = np.maximum(np.abs(ref.estimate), ref.se)
    assert (np.abs(ours.estimate - ref.estimate) / scale).max() < SS_RTOL
    assert rel(ours.se, ref.se).max() < SS_RTOL
    assert rel(ours.df, ref.df).max() < DF_RTOL


def test_kenward_roger_reaches_every_test() -> None:
    res = fit("nested")
    b = res.fe_params.to_numpy()
    se = np.sqrt(np.diagonal(res.cov_params_kr(), axis1=1, axis2=2))
    df = res.contrast_df(np.eye(res.k_fe))
    # summary / pvalues use the adjusted standard errors and KR df, bse_fe stays lme4's
    np.testing.assert_allclose(res.tvalues.to_numpy(), b / se)
    assert np.all(se > res.bse_fe.to_numpy())
    ci = res.conf_int(alpha=0.1)
    from scipy import stats

    half = stats.t.ppf(0.95, df) * se
    np.testing.assert_allclose(ci.upper.to_numpy(), (b + half).ravel())
    sat = res.t_test("trt[T.T]", df_method="satterthwaite")
    kr = res.t_test("trt[T.T]")
    assert kr.df_method == "kenward-roger" and sat.df_method == "satterthwaite"
    assert not np.allclose(kr.df_denom, sat.df_denom)
    # the joint test of one row is the t-test squared, with the same df
    w = res.wald_test("trt[T.T] = 0")
    np.testing.assert_allclose(w.statistic, kr.tvalue["trt[T.T]"] ** 2, rtol=1e-10)
    np.testing.assert_allclose(w.df_denom, kr.df_denom["trt[T.T]"], rtol=1e-10)


def tiny_one_component_fit():  # noqa: ANN201 - results
    """Two cells per donor and cell type, 6 donors: a visible adjustment (2% of the SE)."""
    obs = pd.read_csv(REFERENCE / "anova" / "cells.csv")
    obs = obs[obs.donor.isin([f"D{i:02d}" for i in range(1, 7)])]
    obs = obs.groupby(["donor", "ct"]).head(2).reset_index(drop=True)
    return MultiGeneMixedLM.from_formula("~ ct * trt + x", obs, endog=obs[GENES],
                                         groups="donor").fit(df_method="kenward-roger")


@pytest.mark.parametrize("design", ["tiny", "slopes"])
def test_gene_summary_shows_adjusted_standard_errors(design: str) -> None:
    # one component: the ratio engine's GeneResults; slopes: the structured view
    res = tiny_one_component_fit() if design == "tiny" else fit(design)
    for pos in range(len(GENES)):
        column = res.gene(pos).summary().tables[1]["Std.Err."]
        printed = column.iloc[:res.k_fe].astype(float).to_numpy()
        adjusted = np.sqrt(np.diagonal(res.cov_params_kr()[pos]))
        np.testing.assert_allclose(printed, adjusted, atol=5e-4)   # 3 decimals
    # the adjustment shows at that precision somewhere (the test can tell the two apart)
    gap = np.abs(np.sqrt(np.diagonal(res.cov_params_kr(), axis1=1, axis2=2)) - res.bse_fe)
    assert gap.to_numpy().max() > 1e-3


def test_kenward_roger_spellings_and_refusals() -> None:
    res = fit("one")
    a = res.t_test("trt[T.T]", df_method="KR").df_denom
    b = res.t_test("trt[T.T]", df_method="Kenward-Roger").df_denom
    pd.testing.assert_frame_equal(a, b)
    obs = pd.read_csv(REFERENCE / "anova" / "cells.csv")
    model = MultiGeneMixedLM.from_formula("~ ct * trt + x", obs, endog=obs[GENES], groups="donor")
    with pytest.raises(ValueError, match="needs a REML fit"):
        model.fit(reml=False, df_method="kenward-roger")
    ml = model.fit(reml=False)
    with pytest.raises(ValueError, match="needs a REML fit"):
        ml.cov_params_kr()
    with pytest.raises(ValueError, match="df_method must be one of"):
        res.t_test("trt[T.T]", df_method="kenward")


def test_crossed_design_within_a_memory_budget() -> None:
    from flashmm._kenward_roger import _floats_per_gene, _patterns

    res = fit("three")
    design, theta, _ = res._kr_parameters()
    assert not design.blocked                 # batches cross the donors: a global border
    with pytest.raises(MemoryBudgetError, match="Kenward-Roger for this design"):
        kr_pieces(design, theta, budget=MemoryBudget(2_000))
    # two genes at a time give the same numbers as all at once
    per_gene = 8 * _floats_per_gene(design.st, res.k_fe, len(_patterns(design.st, False)) + 1)
    zz = design.zz
    shared = 8 * (zz.A.size + zz.B.size + zz.C.size + zz.ZX1.size + zz.ZX2.size)
    whole = kr_pieces(design, theta).cov_adj
    small = kr_pieces(design, theta, budget=MemoryBudget(shared + 2 * per_gene + 8)).cov_adj
    np.testing.assert_allclose(small, whole, rtol=1e-12)


def test_known_covariance_matches_pbkrtest() -> None:
    """Kinship: ``V = s_g K + s I`` on the recla mice (kr_kinship.R, at R/lmmlite's REML
    estimates; ours agree with those to 1e-5 relative in the parameters, and give lme4-free
    pbkrtest's vcov to 4e-7 of its largest entry)."""
    from conftest import RECLA

    from flashmm import fit_kinship

    lb = reference("kinship_lbddf")
    vc = reference("kinship_vcov")
    phenotypes = list(lb.phenotype.unique())
    res = fit_kinship(pd.read_csv(RECLA / "pheno.csv", index_col=0)[phenotypes],
                      pd.read_csv(RECLA / "covar.csv", index_col=0),
                      pd.read_csv(RECLA / "kinship.csv.gz", index_col=0), df_method="KR")
    df = res.df_terms.loc[phenotypes]
    want = lb.pivot(index="phenotype", columns="term", values="df").loc[phenotypes]
    assert rel(df.to_numpy(), want[df.columns].to_numpy()).max() < DF_RTOL
    for ph in phenotypes:
        ref = vc[vc.phenotype == ph]
        want_adj = ref.vcov_adj.to_numpy().reshape(2, 2, order="F")
        err = np.max(np.abs(res.cov_params_kr(ph).to_numpy() - want_adj))
        assert err < VCOV_RTOL * np.max(np.abs(want_adj))


def test_save_and_load_keep_kenward_roger(tmp_path) -> None:  # noqa: ANN001
    from flashmm import load_results

    for design in ("one", "nested"):
        res = fit(design)
        res.save(tmp_path / f"{design}.npz")
        back = load_results(tmp_path / f"{design}.npz")
        assert back.df_method == "kenward-roger"
        np.testing.assert_array_equal(back.cov_params_kr(), res.cov_params_kr())
        pd.testing.assert_frame_equal(back.anova(), res.anova())
        pd.testing.assert_frame_equal(back.ls_means("trt"), res.ls_means("trt"))


def test_fit_summary_reports_the_df_method_and_adjusted_errors() -> None:
    res = fit("one6")
    text = str(res.summary())
    assert "kenward-roger" in text
    assert "satterthwaite" in str(res.summary(df_method="satterthwaite"))
    kr = res.t_test(np.eye(res.k_fe))
    table = res.summary().tables[1]
    median_se = np.nanmedian(kr.sd.to_numpy(), axis=0)
    np.testing.assert_allclose(table["Median Std.Err."].astype(float), median_se, rtol=5e-3)
