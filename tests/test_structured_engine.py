"""The structured engine from the user's side: every spelling, memory budgets, bad designs.

The same model written in different ways must reach the same engine and the
same numbers (log-likelihoods to 1e-9 absolute, variances to 1e-6 relative:
two runs of the same optimiser from the same start on layouts that differ
only in column order); a model that does not fit the memory budget is
refused before allocating; designs whose components cannot be separated get
an error naming them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from flashmm import DesignError, MemoryBudgetError, MultiGeneMixedLM


def _cells(seed: int = 0, donors: int = 10, celltypes: int = 3, per: int = 12
           ) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(donors), celltypes * per)
    ct = np.tile(np.repeat(np.arange(celltypes), per), donors)
    n = donor.size
    batch = (donor + rng.integers(0, 3, n)) % 5
    data = pd.DataFrame({"donor": [f"d{d:02d}" for d in donor], "ct": [f"c{c}" for c in ct],
                         "batch": [f"b{b}" for b in batch], "trt": np.where(donor % 2, "B", "A"),
                         "x": rng.normal(size=n)})
    G = 8
    Y = (rng.normal(size=(n, G)) + rng.normal(scale=0.6, size=(donors, G))[donor]
         + rng.normal(scale=0.4, size=(donors * celltypes, G))[donor * celltypes + ct]
         + rng.normal(scale=0.3, size=(5, G))[batch])
    return data, Y


FORMULA = "~ 0 + ct + ct:trt"


def _nested_spellings(data: pd.DataFrame, Y: np.ndarray) -> list[MultiGeneMixedLM]:
    """(1|donor) + (1|donor:ct) written three ways."""
    sm = MultiGeneMixedLM.from_formula(FORMULA, data, endog=Y, groups="donor", re_formula="1",
                                       vc_formula={"dct": "0 + C(ct)"})
    crossed = MultiGeneMixedLM.from_formula(FORMULA, data, endog=Y, vc_formula={
        "donor": "0 + C(donor)", "dct": "0 + C(donor):C(ct)"})
    X = sm.design.exog
    arrays = MultiGeneMixedLM(Y, X, groups=data["donor"].to_numpy(),
                              exog_re=np.ones((len(data), 1)),
                              exog_vc={"dct": data["ct"].to_numpy()})
    return [sm, crossed, arrays]


@pytest.mark.parametrize("reml", [True, False])
def test_every_spelling_of_the_nested_model_agrees(reml: bool) -> None:
    data, Y = _cells()
    fits = [m.fit(reml=reml) for m in _nested_spellings(data, Y)]
    ref = fits[0]
    for res in fits[1:]:
        np.testing.assert_allclose(res.llf, ref.llf, rtol=0, atol=1e-9)
        np.testing.assert_allclose(res.scale, ref.scale, rtol=1e-6)
        np.testing.assert_allclose(res.fe_params, ref.fe_params, rtol=1e-6, atol=1e-8)
    # the variances under their own names
    np.testing.assert_allclose(fits[1].vcomp["donor"], ref.vcomp["donor"], rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(fits[1].vcomp["dct"], ref.vcomp["dct"], rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(fits[2].cov_re.iloc[:, 0], ref.vcomp["donor"], rtol=1e-6,
                               atol=1e-10)
    np.testing.assert_allclose(fits[2].vcomp["dct"], ref.vcomp["dct"], rtol=1e-6, atol=1e-10)
    # the layout: one arrowhead block per donor, nothing global
    for res in fits[:2]:
        assert res._st.n_groups == 10 and res._st.glob_cols.size == 0
        assert res._crit.zz.arrowhead


def test_crossed_batches_use_the_schur_block() -> None:
    data, Y = _cells(1)
    res = MultiGeneMixedLM.from_formula("~ trt + x", data, endog=Y, vc_formula={
        "donor": "0 + C(donor)", "batch": "0 + C(batch)"}).fit()
    st = res._st
    assert st.n_groups == 10 and st.glob_cols.size == 5       # donors block, batches global
    assert res.converged.all() and np.isfinite(res.df_satterthwaite.to_numpy()).all()


def test_small_budget_gives_the_same_fit_in_smaller_chunks() -> None:
    data, Y = _cells(2)
    model = _nested_spellings(data, Y)[0]
    ref = model.fit()
    small = model.fit(max_memory=200_000, n_jobs=1)          # one or two genes per chunk
    assert small._crit.chunk < ref._crit.chunk
    np.testing.assert_allclose(small.llf, ref.llf, rtol=0, atol=1e-10)
    np.testing.assert_allclose(small.vcomp, ref.vcomp, rtol=1e-8, atol=1e-12)


def test_n_jobs_counts_threads_as_joblib(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashmm import _fit_theta

    monkeypatch.setattr(_fit_theta.os, "cpu_count", lambda: 4)
    counts = {n: _fit_theta.thread_count(n) for n in (None, -1, -2, -4, -9, 1, 3)}
    assert counts == {None: 4, -1: 4, -2: 3, -4: 1, -9: 1, 1: 1, 3: 3}
    data, Y = _cells(2)
    model = _nested_spellings(data, Y)[0]
    every = model.fit(n_jobs=-1)
    assert every._fit.workers == 4                      # -1 is every core, not one thread
    np.testing.assert_array_equal(every.llf, model.fit(n_jobs=1).llf)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=rf"n_jobs={bad!r}: give a positive number"):
            model.fit(n_jobs=bad)


def test_a_model_over_the_budget_is_refused_before_fitting() -> None:
    data, Y = _cells(3)
    model = _nested_spellings(data, Y)[0]
    with pytest.raises(MemoryBudgetError, match=r"needs at least .* more than max_memory=1\.0 KB"):
        model.fit(max_memory="1KB")
    with pytest.raises(MemoryBudgetError, match="allow_negative_variance"):
        model.fit(allow_negative_variance=True, max_memory="1KB")
    with pytest.raises(ValueError, match="max_memory"):
        model.fit(max_memory="lots")


def test_components_that_cannot_be_separated_are_named() -> None:
    data, Y = _cells(4)
    data["donor2"] = data["donor"].str.upper()                # a relabelling of donor
    with pytest.raises(DesignError, match=r"'donor' and 'donor2' group the cells identically"):
        MultiGeneMixedLM.from_formula(FORMULA, data, endog=Y, vc_formula={
            "donor": "0 + C(donor)", "donor2": "0 + C(donor2)"}).fit()
    with pytest.raises(DesignError, match=r"'ctvar' lies in the span of the fixed effects"):
        MultiGeneMixedLM.from_formula(FORMULA, data, endog=Y, vc_formula={
            "donor": "0 + C(donor)", "ctvar": "0 + C(ct)"}).fit()
    with pytest.raises(DesignError, match=r"'one' has 1 level"):
        MultiGeneMixedLM.from_formula(FORMULA, data.assign(k="a"), endog=Y, vc_formula={
            "donor": "0 + C(donor)", "one": "0 + C(k)"})


def test_a_gene_that_cannot_be_fitted_does_not_stop_the_others() -> None:
    data, Y = _cells(5)
    Y = Y.copy()
    Y[:, 0] = 0.0
    Y[:, 1] = 3.0
    model = _nested_spellings(data, Y)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = model.fit()
    assert any("could not be fitted" in str(w.message) for w in caught)
    assert res.status.iloc[0] == "all zero" and res.status.iloc[1] != "ok"
    assert res.llf.iloc[:2].isna().all() and res.llf.iloc[2:].notna().all()
    tab = res.t_test("ct[c0]:trt[T.B]").summary_frame()
    assert tab["padj"].iloc[:2].isna().all() and tab["padj"].iloc[2:].notna().all()


def test_a_trial_point_that_breaks_positive_definiteness_is_nan_not_an_error() -> None:
    """Cancellation in X'H^-1X at huge ratios gives NaN for that gene (the line search
    rejects the step) instead of a LinAlgError that would stop every gene."""
    from flashmm._fit_theta import _logdet_pd, _spd_inv

    good = np.array([[2.0, 0.5], [0.5, 1.0]])
    bad = np.array([[1.0, 2.0], [2.0, 1.0]])                  # indefinite
    ld = _logdet_pd(np.stack([good, bad, good]))
    np.testing.assert_allclose(ld[[0, 2]], np.log(np.linalg.det(good)), rtol=1e-14)
    assert np.isnan(ld[1])
    inv = _spd_inv(np.stack([good, np.zeros((2, 2))]))
    np.testing.assert_allclose(inv[0], np.linalg.inv(good), rtol=1e-12)
    assert np.isnan(inv[1]).all()


def test_saved_statistics_and_lr_test(tmp_path) -> None:
    """Statistics saved to .npz refit to the same numbers; LR test against one component."""
    from flashmm import SufficientStats

    data, Y = _cells(6)
    model = _nested_spellings(data, Y)[0]
    ref = model.fit(reml=False)
    model.stats.save(tmp_path / "st.npz")
    back = MultiGeneMixedLM.from_sufficient_stats(SufficientStats.load(tmp_path / "st.npz"))
    res = back.fit(reml=False)
    np.testing.assert_array_equal(res.llf, ref.llf)
    one = MultiGeneMixedLM.from_formula(FORMULA, data, endog=Y, groups="donor").fit(reml=False)
    lr = ref.compare_lr_test(one)
    assert (lr["df"] == 1).all()
    np.testing.assert_allclose(lr["statistic"], np.maximum(2 * (ref.llf - one.llf), 0), rtol=1e-12)
    # the nested model contains the one-component model: its likelihood is never lower
    assert (ref.llf >= one.llf - 1e-8).all()


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("arrowhead", [True, False])
def test_block_criterion_derivatives_match_the_general_criterion(reml: bool,
                                                                 arrowhead: bool) -> None:
    """The exact Hessian of the block criterion against central differences.

    The reference is the general criterion's analytic gradient, differenced
    centrally (step 1e-5: error ~1e-10 relative to the Hessian, round-off
    ~1e-11); a cell-level covariate ``x`` keeps X outside the span of Z, so the
    REML projection enters ``d2S`` in ML too.  Without ``arrowhead`` the second
    nested component crosses the first within donors (batch within donor),
    so the blocks are full.
    """
    from flashmm._fit_arrowhead import ArrowheadCriterion, specialise
    from flashmm._fit_theta import ThetaCriterion
    from flashmm._fit_vc import VCBlockCriterion
    from flashmm._structure import analyse_structure

    data, Y = _cells(seed=3)
    vc = {"dct": "0 + C(ct)", "db": "0 + C(batch)"} if not arrowhead else {"dct": "0 + C(ct)"}
    model = MultiGeneMixedLM.from_formula(FORMULA + " + x", data, endog=Y, groups="donor",
                                          re_formula="1", vc_formula=vc)
    stats = model.stats
    st = analyse_structure(stats.components, stats.ZZ)
    general = ThetaCriterion.from_stats(stats, st, reml, np.sqrt(stats.yy / stats.n))
    block = specialise(general)
    assert isinstance(block, VCBlockCriterion)
    assert block.zz.arrowhead == arrowhead
    assert isinstance(block, ArrowheadCriterion) == arrowhead
    theta = np.random.default_rng(1).uniform(0.2, 1.5, (Y.shape[1], st.n_theta))
    theta[0, -1] = 0.0                                      # a component on its boundary
    f0, g0 = general.gradient(theta)
    f1, g1, H = block.newton_terms(theta)
    np.testing.assert_allclose(f1, f0, rtol=1e-12)
    np.testing.assert_allclose(g1, g0, rtol=1e-9, atol=1e-9 * np.abs(g0).max())
    h = 1e-5
    Hfd = np.empty_like(H)
    for j in range(st.n_theta):
        e = np.zeros_like(theta)
        e[:, j] = h
        Hfd[:, :, j] = (general.gradient(theta + e)[1] - general.gradient(theta - e)[1]) / (2 * h)
    scale = np.abs(H).max(axis=(1, 2), keepdims=True)
    assert np.max(np.abs(H - Hfd) / scale) < 1e-7


#: Nested components of the arrowhead tests: one, or two whose columns share no cells
#: (cell types c0, c1 and c2, c3 within donor: two parameters among the children).
_ARROW_VC = {"one": {"dct": "0 + C(ct)"},
             "two": {"dlo": "0 + I((ct == 'c0') * 1.0) + I((ct == 'c1') * 1.0)",
                     "dhi": "0 + I((ct == 'c2') * 1.0) + I((ct == 'c3') * 1.0)"}}


@pytest.mark.parametrize("vc", ["one", "two"])
@pytest.mark.parametrize("reml", [True, False])
def test_arrowhead_closed_form_matches_the_dense_blocks(reml: bool, vc: str) -> None:
    """The closed-form arrowhead kernel against the same formulas on dense s x s blocks.

    Both are exact, so they agree to round-off (observed 4e-15 relative; 1e-10
    leaves room for the cancellation in ``S`` and the REML terms).  The design is
    unbalanced: donors without some cell types (empty slots), one donor with a
    single cell type, a cell-level covariate, and genes with a component at 0;
    with ``two`` the children's slots belong to two parameters.
    """
    from flashmm._fit_arrowhead import ArrowheadCriterion, specialise
    from flashmm._fit_theta import ThetaCriterion
    from flashmm._fit_vc import VCBlockCriterion
    from flashmm._structure import analyse_structure

    data, Y = _cells(seed=5, donors=9, celltypes=4)
    keep = ~(((data["donor"] == "d01") & (data["ct"] != "c2"))
             | ((data["donor"].isin(["d03", "d04"])) & (data["ct"] == "c0")))
    if vc == "two":        # a missing cell type would move the other component's slots
        keep = ~((data["donor"] == "d03") & (data["ct"] == "c3"))
    data, Y = data[keep.to_numpy()].reset_index(drop=True), Y[keep.to_numpy()]
    model = MultiGeneMixedLM.from_formula(FORMULA + " + x", data, endog=Y, groups="donor",
                                          re_formula="1", vc_formula=_ARROW_VC[vc])
    stats = model.stats
    st = analyse_structure(stats.components, stats.ZZ)
    general = ThetaCriterion.from_stats(stats, st, reml, np.sqrt(stats.yy / stats.n))
    closed = specialise(general)
    assert isinstance(closed, ArrowheadCriterion)
    assert np.any(st.slot_cols < 0)                          # empty slots are exercised
    assert len(set(closed.arrow.par[1:]) - {-1}) == len(_ARROW_VC[vc])
    dense = VCBlockCriterion.of(general)
    theta = np.random.default_rng(2).uniform(0.1, 2.0, (Y.shape[1], st.n_theta))
    theta[0, 0] = theta[1, 1] = theta[2, -1] = 0.0
    genes = np.arange(Y.shape[1])
    for order in (0, 1, 2):
        ref, got = dense._evaluate(theta, genes, order), closed._evaluate(theta, genes, order)
        for name in ("S", "logdet", "dS", "dL", "d2S", "d2L"):
            want = getattr(ref, name)
            if want is None:
                continue
            # each gene against its own largest entry (a small gene's error stays visible)
            scale = np.max(np.abs(want.reshape(len(genes), -1)), axis=1)
            err = np.abs(getattr(got, name) - want).reshape(len(genes), -1).max(axis=1)
            assert np.all(err <= 1e-10 * scale), f"{name} (order {order}): {np.max(err / scale):.1e}"


def test_arrowhead_gls_and_satterthwaite_match_the_general_path() -> None:
    """BLUPs, conditional variances, ``Cov(b)`` and Satterthwaite df in closed form.

    The reference is the general block path (``M`` factorised block by block)
    on the same unbalanced nested design; both are exact, so they agree to
    round-off (1e-10 relative).
    """
    from flashmm._fit_arrowhead import ArrowheadCriterion, specialise
    from flashmm._fit_theta import ThetaCriterion, gls_theta, satterthwaite_theta, varpar_information
    from flashmm._structure import analyse_structure

    data, Y = _cells(seed=7, donors=8, celltypes=3)
    keep = ~((data["donor"] == "d02") & (data["ct"] == "c1")).to_numpy()
    model = MultiGeneMixedLM.from_formula(FORMULA + " + x", data[keep], endog=Y[keep],
                                          groups="donor", re_formula="1",
                                          vc_formula={"dct": "0 + C(ct)"})
    stats = model.stats
    st = analyse_structure(stats.components, stats.ZZ)
    general = ThetaCriterion.from_stats(stats, st, True, np.ones(Y.shape[1]))
    closed = specialise(general)
    assert isinstance(closed, ArrowheadCriterion)
    theta = np.random.default_rng(3).uniform(0.1, 1.5, (Y.shape[1], st.n_theta))
    theta[0, 1] = 0.0
    ref, got = gls_theta(general, theta), gls_theta(closed, theta)
    for name in ("fe_params", "cov_unscaled", "blup_unscaled", "condvar_unscaled"):
        want = getattr(ref, name)
        np.testing.assert_allclose(getattr(got, name), want, rtol=0,
                                   atol=1e-10 * np.max(np.abs(want)), err_msg=name)
    scale = np.full(Y.shape[1], 0.7)
    info = varpar_information(closed, theta, np.sqrt(scale))
    L = np.eye(ref.fe_params.shape[1])[[0, 3, 5]]
    df_ref = satterthwaite_theta(general, theta, scale, ref.cov_unscaled, L, info)
    df_got = satterthwaite_theta(closed, theta, scale, ref.cov_unscaled, L, info)
    np.testing.assert_allclose(df_got, df_ref, rtol=1e-10)


def test_boundary_check_flags_descent_directions_only() -> None:
    """``_inward_descent``: a variance set to 0 away from its optimum is flagged; a fitted 0 is not.

    Genes whose donor-by-cell-type variance is clearly positive are moved to
    ``theta_dct = 0``: the criterion decreases inwards there, so the check must
    flag them (and the line search finds a lower criterion).  Genes the fit put on
    the boundary satisfy the bound's optimality condition and must not be flagged.
    """
    from flashmm._fit_arrowhead import specialise
    from flashmm._fit_theta import ThetaCriterion, _inward_descent
    from flashmm._structure import analyse_structure

    data, Y = _cells(seed=11, donors=12)
    rng = np.random.default_rng(0)
    Y = np.column_stack([Y, rng.normal(size=(len(data), 4))])      # no donor variation at all
    model = MultiGeneMixedLM.from_formula(FORMULA, data, endog=Y, groups="donor", re_formula="1",
                                          vc_formula={"dct": "0 + C(ct)"})
    res = model.fit()
    stats = model.stats
    st = analyse_structure(stats.components, stats.ZZ)
    crit = specialise(ThetaCriterion.from_stats(stats, st, True, res._c))
    theta = res._fit.theta
    bounded = np.flatnonzero(st.bounded)
    fitted0 = theta[:, bounded] == 0.0
    assert fitted0.any()                                   # the pure-noise genes hit the bound
    assert not _inward_descent(crit, theta, bounded)[fitted0].any()
    inner = np.flatnonzero(theta[:, 1] > 0.2)
    assert inner.size
    moved = theta[inner].copy()
    moved[:, 1] = 0.0
    flags = _inward_descent(crit.subset(inner), moved, bounded)
    assert flags[:, list(bounded).index(1)].all()


@pytest.mark.parametrize("order", ["C", "F"])
def test_nonzero_pattern_is_numpys_nonzero(order: str) -> None:
    """The structure analysis' scan of ``Z'Z`` returns ``np.nonzero``'s pairs, in its order."""
    from flashmm._structure import nonzero_pattern

    rng = np.random.default_rng(0)
    ZZ = np.where(rng.random((37, 37)) < 0.1, rng.normal(size=(37, 37)), 0.0)
    ZZ = np.asarray(ZZ + ZZ.T, order=order)
    ZZ[3, 5] = 1.0                                   # and one asymmetric entry
    rows, cols = nonzero_pattern(ZZ)
    want = np.nonzero(ZZ)
    np.testing.assert_array_equal(rows, want[0])
    np.testing.assert_array_equal(cols, want[1])
