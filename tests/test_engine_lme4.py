"""The engine against lme4 reference numbers (tests/reference/lme4_sim, made by R).

Tolerances: lme4 was run with bobyqa at rhoend 1e-12; its variance estimates are
then good to about 1e-7 absolute, so fixed effects are compared to 1e-6
relative (floor: 1e-3 of the standard error, the scale below which a
coefficient's digits are noise of the variance estimate), standard errors and
variances to 1e-5 relative (variances below 1e-4 absolute to 1e-7 absolute).
The relative error of a coefficient uses ``max(|b|, 0.01 se)`` as denominator: a
coefficient near 0 (e.g. -0.002 with se 0.3) is known to lme4 only to ~1e-9
absolute, the precision of its variance estimate.  The criterion is flat to 1e-12 over
the last digits of lme4's variance ratios (they differ from flashmm's by up to
1e-6 relative at equal criterion), so coefficients are compared to 2e-6 at the
two optima, and to 1e-8 when flashmm's GLS step is evaluated at lme4's own
variance estimates (``test_gls_at_lme4_variances``).
``llf`` to 1e-6 absolute. Where lme4 stopped short (flashmm's llf higher by more
than 1e-9) estimates are compared to 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fit_lme4_study, lme4_ref, r_to_patsy


@pytest.mark.parametrize("model", ["1comp", "2comp"])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_matches_lme4(lme4_cells, model, method):
    res = fit_lme4_study(lme4_cells, model, method)
    coef = lme4_ref(model, method, "coef")
    order = [r_to_patsy(c) for c in coef.columns]
    se = lme4_ref(model, method, "se").to_numpy()
    vc = lme4_ref(model, method, "vc")
    llf_ref = lme4_ref(model, method, "loglik")["loglik"].to_numpy()
    comps = ["sam"] if model == "1comp" else ["sam", "loc"]

    llf = res.llf.to_numpy()
    assert np.all(llf >= llf_ref - 1e-9), "flashmm found a worse optimum than lme4"
    b = res.fe_params[order].to_numpy()
    err_b = np.abs(b - coef.to_numpy()) / np.maximum(np.abs(coef.to_numpy()), 1e-2 * se)
    err_se = np.abs(res.bse_fe[order].to_numpy() - se) / se
    v, vref = res.vcomp[comps].to_numpy(), vc[comps].to_numpy()
    err_v = np.where(vref > 1e-4, np.abs(v - vref) / np.maximum(vref, 1e-300), np.abs(v - vref) / 1e-7 * 1e-5)
    err_s = np.abs(res.scale.to_numpy() - vc["residual"].to_numpy()) / vc["residual"].to_numpy()
    exact = ((err_b.max(axis=1) < 2e-6) & (err_se.max(axis=1) < 1e-5) & (err_v.max(axis=1) < 1e-5)
             & (err_s < 1e-5) & (np.abs(llf - llf_ref) < 1e-6))
    flat = ~exact   # lme4 stopped short on a flat likelihood: flashmm's llf is not lower
    print(f"\n{model} {method}: max rel err coef {err_b.max():.2e}, se {err_se.max():.2e}, "
          f"var {err_v.max():.2e}, scale {err_s.max():.2e}, llf diff {np.abs(llf - llf_ref).max():.2e}; "
          f"{flat.sum()} genes outside the strict tolerances (llf(flashmm) - llf(lme4) there: "
          f"{(llf - llf_ref)[flat].min() if flat.any() else 0:.1e})")
    assert flat.sum() <= 0.2 * len(flat)
    if model == "1comp":
        assert not flat.any()
    assert np.all(err_b[flat] < 1e-3) and np.all(err_v[flat] < 1e-3) and np.all(err_se[flat] < 1e-3)
    # boundary flags agree with lme4's singular fits
    np.testing.assert_array_equal(res.boundary.to_numpy(), vc["singular"].to_numpy() == 1)
    assert res.converged.all()


@pytest.mark.parametrize("model", ["1comp", "2comp"])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_blups_match_lme4(lme4_cells, model, method):
    res = fit_lme4_study(lme4_cells, model, method)
    if model == "1comp":
        pairs = [("sam", "ranef", "condvar")]
    else:
        pairs = [(c, f"ranef_{c}", f"condvar_{c}") for c in ("sam", "loc")]
    for comp, rname, cname in pairs:
        ref = lme4_ref(model, method, rname)
        cref = lme4_ref(model, method, cname)
        ours = res.random_effects[comp]
        ours.columns = [c.split("[")[-1].rstrip("]") for c in ours.columns]
        ours_cv = res.random_effects_cov[comp]
        ours_cv.columns = ours.columns
        ref = ref[ours.columns]
        cref = cref[ours.columns]
        scale = np.maximum(np.abs(ref.to_numpy()).max(axis=1, keepdims=True), 1e-3)
        assert np.max(np.abs(ours.to_numpy() - ref.to_numpy()) / scale) < 1e-4
        cscale = np.maximum(cref.to_numpy(), 1e-6)
        assert np.max(np.abs(ours_cv.to_numpy() - cref.to_numpy()) / cscale) < 1e-4


@pytest.mark.parametrize("model", ["1comp", "2comp"])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_gls_at_lme4_variances(lme4_cells, model, method):
    """At lme4's variance estimates, flashmm's coefficients and SEs are lme4's."""
    from flashmm._gls import gls_estimates

    res = fit_lme4_study(lme4_cells, model, method)
    stats = res.stats
    vc = lme4_ref(model, method, "vc")
    comps = [c.name for c in stats.components]
    ratios = np.maximum(vc[comps].to_numpy(), 0.0) / vc["residual"].to_numpy()[:, None]
    est = gls_estimates(stats, ratios[:, stats.component_index])
    coef = lme4_ref(model, method, "coef")
    se = lme4_ref(model, method, "se").to_numpy()
    pos = [stats.exog_names.index(r_to_patsy(c)) for c in coef.columns]
    b = est.fe_params[:, pos]
    resid = vc["residual"].to_numpy()[:, None]
    ours_se = np.sqrt(np.diagonal(est.cov_unscaled, axis1=1, axis2=2)[:, pos] * resid)
    err_b = np.abs(b - coef.to_numpy()) / np.maximum(np.abs(coef.to_numpy()), 1e-2 * se)
    print(f"\n{model} {method} at lme4's variances: coef {err_b.max():.2e}, "
          f"se {np.max(np.abs(ours_se - se) / se):.2e}")
    assert err_b.max() < 1e-8
    assert np.max(np.abs(ours_se - se) / se) < 1e-8
