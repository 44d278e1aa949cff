"""Profile-likelihood intervals of the variance parameters against lme4.

References (``tests/reference/profile``, made by ``profile_reference.R``; see its
README): for every model and gene, lme4's ``confint(profile(fit))`` and the exact
roots of the same profiled deviance found in R by a tight inner optimiser and
``uniroot`` (and the exact roots of the profiled REML criterion).

Tolerances.  flashmm finds the roots of the profile itself, so its limits are
compared with the exact roots at 1e-7 of the gene's largest standard deviation
(both sides solve the same equation with inner optimisers converged far below
that; the observed differences are about 1e-11).  The estimates are compared at
1e-6: an optimum is determined only to about the square root of the criterion's
tolerance where the likelihood is flat (Penicillin's six samples by REML differ
by 1.5e-7), while a limit, where the profile is steep, is not.

lme4's ``confint`` interpolates a spline through about 20 profile points of its
own ML refit.  Measured against the exact roots, its error for parameters off
the boundary is at most 4.5e-5 of the gene's largest standard deviation (1.5e-6
and 2.4e-6 on sleepstudy, 2.4e-5 on Penicillin, 1.7e-5 and 4.5e-5 on the
simulated genes; relative to a small limit itself it reaches 1e-3), so flashmm
must agree with it to 1e-4 of the gene's largest standard deviation there.  For
a parameter at the boundary, and where lme4 fell back to linear interpolation
(flagged in the reference), its error reaches 4.5e-4 of the gene's largest sd
(4e-3 of the limit); there flashmm must be no farther from lme4 than the exact
root is (plus 1e-7).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import LME4_FORMULA, REFERENCE

from flashmm import MultiGeneMixedLM

PROFILE = REFERENCE / "profile"
SIM_GENES = [f"g{i:02d}" for i in range(1, 7)]

#: against the exact roots of the same profile, relative to the gene's largest sd
EXACT_RTOL = 1e-7
#: the estimates (optima of flat criteria), relative to the gene's largest sd
ESTIMATE_RTOL = 1e-6
#: against lme4's spline interpolation of its profile (relative to the gene's largest sd)
LME4_RTOL = 1e-4


@pytest.fixture(scope="module")
def sleepstudy() -> pd.DataFrame:
    return pd.read_csv(REFERENCE / "sleepstudy" / "sleepstudy.csv")


@pytest.fixture(scope="module")
def penicillin() -> pd.DataFrame:
    return pd.read_csv(PROFILE / "penicillin.csv")


@pytest.fixture(scope="module")
def cells() -> pd.DataFrame:
    return pd.read_csv(REFERENCE / "lme4_sim" / "cells.csv")


def _sleep_fit(data: pd.DataFrame, model: str, reml: bool = True):  # noqa: ANN202
    kw: dict = {}
    if model == "sleepstudy_diag":
        kw = {"re_formula": "~ Days", "independent_re": True}
    elif model == "sleepstudy_diag_vc":
        kw = {"re_formula": "1", "vc_formula": {"Days": "0 + Days"}}
    mod = MultiGeneMixedLM.from_formula("~ Days", data, endog=data[["Reaction"]],
                                        groups="Subject", **kw)
    return mod.fit(reml=reml)


def _fit(model: str, data: dict[str, pd.DataFrame], reml: bool = True):  # noqa: ANN202
    if model.startswith("sleepstudy"):
        return _sleep_fit(data["sleepstudy"], model, reml)
    if model == "penicillin":
        pen = data["penicillin"]
        vc = {"plate": "0 + C(plate)", "sample": "0 + C(sample)"}
        return MultiGeneMixedLM.from_formula("~ 1", pen, endog=pen[["diameter"]],
                                             vc_formula=vc).fit(reml=reml)
    sim = data["cells"]
    if model == "sim_1comp":
        mod = MultiGeneMixedLM.from_formula(LME4_FORMULA, sim, endog=sim[SIM_GENES], groups="sam")
    else:
        mod = MultiGeneMixedLM.from_formula(LME4_FORMULA, sim, endog=sim[SIM_GENES],
                                            vc_formula={"sam": "0 + C(sam)", "loc": "0 + C(loc)"})
    return mod.fit(reml=reml)


@pytest.fixture(scope="module")
def datasets(sleepstudy: pd.DataFrame, penicillin: pd.DataFrame, cells: pd.DataFrame
             ) -> dict[str, pd.DataFrame]:
    return {"sleepstudy": sleepstudy, "penicillin": penicillin, "cells": cells}


def _merge(ci: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    out = ref.merge(ci, on=["gene", "parameter"], suffixes=("_ref", ""))
    assert len(out) == len(ref) == len(ci)
    out["yard"] = out.groupby("gene")["estimate_ref"].transform("max")
    return out


MODELS = ["sleepstudy_intercept", "sleepstudy_diag", "penicillin", "sim_1comp", "sim_2comp"]


@pytest.mark.parametrize("likelihood", ["ML", "REML"])
@pytest.mark.parametrize("model", MODELS)
def test_exact_profile_roots(datasets: dict, model: str, likelihood: str) -> None:
    """Limits and estimates equal the exact roots of the profiled criterion (fit by REML)."""
    res = _fit(model, datasets)
    ref = pd.read_csv(PROFILE / f"{model}_{likelihood}.csv")
    for level in (0.95, 0.8):
        part = ref[np.isclose(ref["level"], level)]
        m = _merge(res.conf_int_re(alpha=1 - level, likelihood=likelihood), part)
        tol = EXACT_RTOL * m["yard"]
        assert np.all(np.abs(m["estimate"] - m["estimate_ref"]) <= ESTIMATE_RTOL * m["yard"])
        assert np.all(np.abs(m["lower"] - m["root_lower"]) <= tol)
        assert np.all(np.abs(m["upper"] - m["root_upper"]) <= tol)


@pytest.mark.parametrize("model", MODELS)
def test_lme4_confint(datasets: dict, model: str) -> None:
    """lme4's confint(profile(fit)) within its own interpolation error."""
    res = _fit(model, datasets)
    ref = pd.read_csv(PROFILE / f"{model}_ML.csv")
    for level in (0.95, 0.8):
        part = ref[np.isclose(ref["level"], level)]
        m = _merge(res.conf_int_re(alpha=1 - level), part)
        # lme4's spline, off the boundary
        spline = m["lme4_spline"].astype(bool) & (m["estimate_ref"] > 1e-6 * m["yard"])
        for side in ("lower", "upper"):
            err = np.abs(m[side] - m[f"lme4_{side}"])
            interp = np.abs(m[f"root_{side}"] - m[f"lme4_{side}"])     # lme4's own error
            assert np.all(interp[spline] <= LME4_RTOL * m["yard"][spline])
            assert np.all(err[spline] <= LME4_RTOL * m["yard"][spline]), side
            assert np.all(err[~spline] <= interp[~spline] + EXACT_RTOL * m["yard"][~spline])


def test_boundary_genes_have_lower_limit_zero(datasets: dict) -> None:
    """Components estimated at 0 (lme4 singular fits) get a lower limit of exactly 0."""
    res = _fit("sim_2comp", datasets, reml=False)
    ci = res.conf_int_re().set_index(["gene", "parameter"])
    at0 = ci["estimate"] < 1e-8
    assert at0.sum() >= 3                                # g01, g05 (sam), g02, g04 (loc)
    assert np.all(ci.loc[at0, "lower"] == 0.0)
    assert np.all(ci.loc[at0, "upper"] > 0.0)
    # an interior estimate whose profile does not reach the cutoff at 0 (g06 loc)
    row = ci.loc[("g06", "loc")]
    assert row["estimate"] > 0.0 and row["lower"] == 0.0


def test_vc_formula_and_independent_slopes_agree(datasets: dict) -> None:
    """(1|Subject) + (0+Days|Subject) as a nested variance component or as independent slopes."""
    a = _fit("sleepstudy_diag", datasets).conf_int_re()
    b = _fit("sleepstudy_diag_vc", datasets).conf_int_re()
    np.testing.assert_array_equal(a["parameter"], b["parameter"])
    np.testing.assert_allclose(a[["estimate", "lower", "upper"]], b[["estimate", "lower", "upper"]],
                               rtol=1e-8)


def test_variance_scale_and_units(sleepstudy: pd.DataFrame) -> None:
    """The variance scale squares the limits; the limits scale with the units of y."""
    res = _sleep_fit(sleepstudy, "sleepstudy_intercept")
    sd = res.conf_int_re()
    var = res.conf_int_re(scale="var")
    np.testing.assert_allclose(var[["estimate", "lower", "upper"]],
                               sd[["estimate", "lower", "upper"]] ** 2, rtol=1e-14)
    data = sleepstudy.assign(Reaction=sleepstudy["Reaction"] * 1e6)
    big = _sleep_fit(data, "sleepstudy_intercept").conf_int_re()
    np.testing.assert_allclose(big[["estimate", "lower", "upper"]],
                               sd[["estimate", "lower", "upper"]] * 1e6, rtol=1e-8)


def test_wald_intervals_remain(sleepstudy: pd.DataFrame) -> None:
    """method="wald": estimate -+ z se from se_vcomp (delta method on the sd scale)."""
    res = _sleep_fit(sleepstudy, "sleepstudy_diag")
    var = res.conf_int_re(method="wald", scale="var").set_index("parameter")
    se = res.se_vcomp.iloc[0]
    z = 1.959963984540054
    assert var.loc["residual", "estimate"] == pytest.approx(res.scale.iloc[0])
    assert var.loc["Days", "upper"] - var.loc["Days", "estimate"] == pytest.approx(z * se["Days Var"])
    sd = res.conf_int_re(method="wald").set_index("parameter")
    est = np.sqrt(var.loc["Subject", "estimate"])
    assert sd.loc["Subject", "estimate"] == pytest.approx(est)
    assert sd.loc["Subject", "lower"] == pytest.approx(est - z * se["Subject Var"] / (2 * est))
    # the profile interval is asymmetric, the Wald interval symmetric
    prof = res.conf_int_re(likelihood="REML").set_index("parameter")
    assert prof.loc["Subject", "upper"] - prof.loc["Subject", "estimate"] > \
        prof.loc["Subject", "estimate"] - prof.loc["Subject", "lower"]


def test_correlated_slopes_raise(sleepstudy: pd.DataFrame) -> None:
    """Profiles of correlated random effects are not implemented; Wald intervals are."""
    mod = MultiGeneMixedLM.from_formula("~ Days", sleepstudy, endog=sleepstudy[["Reaction"]],
                                        groups="Subject", re_formula="~ Days")
    res = mod.fit()
    with pytest.raises(NotImplementedError, match="correlated random effects"):
        res.conf_int_re()
    wald = res.conf_int_re(method="wald")
    assert list(wald["parameter"]) == ["Subject", "Days", "residual"]
    assert np.all(np.isfinite(wald[["lower", "upper"]]))


def test_unfitted_gene_and_options(cells: pd.DataFrame) -> None:
    """A gene that cannot be fitted gets NaN rows; bad options are refused."""
    Y = cells[SIM_GENES[:3]].assign(zero=0.0)
    with pytest.warns(Warning):
        res = MultiGeneMixedLM.from_formula(LME4_FORMULA, cells, endog=Y, groups="sam").fit()
    ci = res.conf_int_re().set_index(["gene", "parameter"])
    assert ci.loc["zero"].isna().all().all()
    assert np.all(np.isfinite(ci.drop(index="zero", level=0)[["lower", "upper"]]))
    for bad in ({"alpha": 1.5}, {"method": "boot"}, {"scale": "log"}, {"likelihood": "x"}):
        with pytest.raises(ValueError):
            res.conf_int_re(**bad)


def _dense_deviance(y: np.ndarray, X: np.ndarray, ZKZ: np.ndarray, sg: float, s: float,
                    reml: bool) -> float:
    """``-2 log L`` (up to a constant) of ``y ~ N(X b, sg ZKZ' + s I)``, b profiled."""
    V = sg * ZKZ + s * np.eye(y.size)
    Vi = np.linalg.inv(V)
    XVX = X.T @ Vi @ X
    b = np.linalg.solve(XVX, X.T @ Vi @ y)
    r = y - X @ b
    dev = np.linalg.slogdet(V)[1] + r @ Vi @ r
    return dev + (np.linalg.slogdet(XVX)[1] if reml else 0.0)


@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
def test_known_covariance_against_dense_profile(reml: bool) -> None:
    """Kinship (group_cov): the limits solve the dense profiled deviance's equation."""
    from scipy import optimize

    rng = np.random.default_rng(7)
    n_groups, per = 15, 3
    A = rng.normal(size=(n_groups, n_groups))
    K = A @ A.T / n_groups + 0.1 * np.eye(n_groups)
    groups = np.repeat(np.arange(n_groups), per)
    X = np.column_stack([np.ones(groups.size), rng.normal(size=groups.size)])
    Lk = np.linalg.cholesky(K)
    Y = np.column_stack([X @ [1.0, 0.5] + np.sqrt(h) * (Lk @ rng.normal(size=n_groups))[groups]
                         + np.sqrt(1 - h) * rng.normal(size=groups.size) for h in (0.2, 0.6, 0.9)])
    res = MultiGeneMixedLM(Y, X, groups=groups, group_cov=K).fit(reml=reml)
    ci = res.conf_int_re(likelihood="REML" if reml else "ML")
    Z = np.eye(n_groups)[groups]
    ZKZ = Z @ K @ Z.T
    z2 = 1.959963984540054 ** 2
    for j, gene in enumerate(res.gene_names):
        y = Y[:, j]
        rows = ci[ci["gene"] == gene].set_index("parameter")
        sd_hat, sig_hat = rows["estimate"]
        base = _dense_deviance(y, X, ZKZ, sd_hat ** 2, sig_hat ** 2, reml)
        for name, k in ((res.component_names[0], 0), ("residual", 1)):
            for side in ("lower", "upper"):
                x = rows.loc[name, side]
                if x == 0.0:         # the profile at 0 stays within the cutoff
                    continue

                def held(logv: float, x: float = x, k: int = k, y: np.ndarray = y) -> float:
                    other = np.exp(logv)
                    sg, s = (x * x, other) if k == 0 else (other, x * x)
                    return _dense_deviance(y, X, ZKZ, sg, s, reml)

                centre = 2 * np.log(sig_hat if k == 0 else max(sd_hat, 1e-3 * sig_hat))
                prof = optimize.minimize_scalar(held, bounds=(centre - 12, centre + 6),
                                                method="bounded", options={"xatol": 1e-10}).fun
                if k == 1:                                  # the component may be at 0
                    prof = min(prof, _dense_deviance(y, X, ZKZ, 0.0, x * x, reml))
                assert prof - base == pytest.approx(z2, abs=1e-6), (gene, name, side)
