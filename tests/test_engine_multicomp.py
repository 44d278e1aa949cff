"""Several random components against lme4 / lmerTest (tests/reference/multicomp, made by R).

Designs: nested ``(1|donor) + (1|donor:celltype)``, crossed ``(1|donor) + (1|batch)`` and
"three" (donor + donor:celltype + batch), 24 genes each, REML and ML. lme4 was run with bobyqa
at rhoend 1e-12 and with nloptwrap at xtol_abs = ftol_abs = 1e-12, keeping the better fit; all
144 fits converged, and the two optimisers' logLiks agree to 4e-11.

Tolerances:
- ``llf`` never below lme4's by more than 1e-8 (lme4's own precision: its two tight optimisers
  and flashmm agree to ~1e-11), and equal to 1e-6 relative.
- Residual variance to 1e-6 relative.  A component that lme4 puts at 0 (below 1e-6 of the
  residual variance; lme4 stops at 0 to 4e-14) must be at most that in flashmm too (it is
  exactly 0).  Other components to 1e-6 relative, or to 5e-6 of their standard error where
  that is larger: the criterion is computed to ~1e-12 (a few ulps of -2 llf ~ 3e3) and
  changes by (dv / se)^2 near the optimum, so a variance much smaller than its SE is fixed by
  the data only to a few 1e-6 se, whichever program finds it.  For the 19 of 291 variances
  beyond 1e-6 relative (up to 2e-4, three ML g02 donor:celltype = 3e-5 of the residual), lme4's
  own deviance function changes by at most 5e-12 along the segment between the two estimates.
- Coefficients to 1e-6 relative to max(|b|, se); standard errors to 1e-6 relative.
- Satterthwaite df within 2e-3 relative of lmerTest (issue 14); lmerTest's numerical
  derivatives are good to ~1e-6, which is about what we see.  Genes with a non-finite
  lmerTest df would be skipped (there are none).
- REML contrasts (``contest1D``, and for the cell-type designs the joint ``contest`` F test of
  all celltype:trt terms): estimate as the coefficients, se and F to 1e-6, df and p to 2e-3
  relative (p follows the df).
- Boundary flags equal lme4's ``isSingular`` (tol 1e-4); every flashmm fit converges.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd
import pytest
from conftest import REFERENCE

from flashmm import MultiGeneMixedLM

MULTICOMP = REFERENCE / "multicomp"
FIXED = {"nested": "~ 0 + celltype + celltype:trt", "crossed": "~ trt + x",
         "three": "~ 0 + celltype + celltype:trt"}
RANDOM = {
    "nested": {"groups": "donor", "re_formula": "1", "vc_formula": {"dct": "0 + C(celltype)"}},
    "crossed": {"groups": None, "vc_formula": {"donor": "0 + C(donor)", "batch": "0 + C(batch)"}},
    "three": {"groups": None, "vc_formula": {"donor": "0 + C(donor)",
                                             "dct": "0 + C(donor):C(celltype)",
                                             "batch": "0 + C(batch)"}},
}
LME4_NAME = {"donor": "donor", "dct": "donor:celltype", "batch": "batch"}   # flashmm -> lme4
DESIGNS = list(FIXED)
METHODS = ["REML", "ML"]


def ref(design: str, what: str) -> pd.DataFrame:
    return pd.read_csv(MULTICOMP / f"{design}_{what}.csv")


def wide(design: str, method: str, what: str, value: str, columns: str = "term_patsy") -> pd.DataFrame:
    return ref(design, f"{method}_{what}").pivot(index="gene", columns=columns, values=value)


@cache
def fit(design: str, method: str):  # noqa: ANN201 - MultiGeneMixedLMResults
    cells, Y = ref(design, "cells"), ref(design, "Y")
    model = MultiGeneMixedLM.from_formula(FIXED[design], cells, endog=Y, **RANDOM[design])
    res = model.fit(reml=method == "REML")
    assert res.exog_names == ref(design, "terms")["term_patsy"].tolist()
    assert list(res.gene_names) == list(Y.columns)
    return res


def rel_err(ours: np.ndarray, theirs: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    theirs = np.asarray(theirs, dtype=float)
    return np.abs(np.asarray(ours, dtype=float) - theirs) / (np.abs(theirs) if scale is None else scale)


def report(label: str, **errs: float) -> None:
    print(f"\n{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("design", DESIGNS)
def test_loglik_variances_boundary(design, method):
    res = fit(design, method)
    ll = ref(design, f"{method}_loglik").set_index("gene").loc[res.gene_names]
    vc = wide(design, method, "vc", "variance", columns="component").loc[res.gene_names]
    assert (ll["converged"] == 1).all()      # every lme4 fit converged: no gene is exempt
    assert res.converged.all()

    llf, llf_ref = res.llf.to_numpy(), ll["loglik"].to_numpy()
    assert np.all(llf >= llf_ref - 1e-8), (res.gene_names[llf < llf_ref - 1e-8].tolist(),
                                           (llf - llf_ref).min())
    err_llf = rel_err(llf, llf_ref)
    assert err_llf.max() < 1e-6

    resid = vc["Residual"].to_numpy()
    err_s = rel_err(res.scale.to_numpy(), resid)
    assert err_s.max() < 1e-6, res.gene_names[np.argmax(err_s)]
    worst = {"rel": 0.0, "se": 0.0, "zero": 0.0}
    for comp in res.component_names:
        v, vref = res.vcomp[comp].to_numpy(), vc[LME4_NAME[comp]].to_numpy()
        at0 = vref < 1e-6 * resid
        zero_ours = v[at0] / res.scale.to_numpy()[at0]
        assert np.all(zero_ours <= 1e-6), (comp, res.gene_names[at0].tolist(), zero_ours)
        se_v = res.se_vcomp[comp].to_numpy()[~at0]
        err_rel = rel_err(v[~at0], vref[~at0])
        err_se = rel_err(v[~at0], vref[~at0], se_v)
        ok = (err_rel < 1e-6) | (err_se < 5e-6)
        assert ok.all(), pd.DataFrame({"gene": res.gene_names[~at0], "flashmm": v[~at0],
                                       "lme4": vref[~at0], "rel": err_rel, "per_se": err_se})[~ok]
        worst["rel"] = max(worst["rel"], err_rel.max())
        worst["se"] = max(worst["se"], err_se.max())
        worst["zero"] = max(worst["zero"], zero_ours.max(initial=0.0))
    report(f"{design} {method}", llf_min_diff=(llf - llf_ref).min(), llf_rel=err_llf.max(),
           scale=err_s.max(), var_rel=worst["rel"], var_per_se=worst["se"],
           flashmm_var_at_0=worst["zero"])
    np.testing.assert_array_equal(res.boundary.to_numpy(), ll["singular"].to_numpy() == 1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("design", DESIGNS)
def test_fixed_effects_and_satterthwaite(design, method):
    res = fit(design, method)
    names, genes = res.exog_names, res.gene_names
    b_ref = wide(design, method, "coef", "estimate").loc[genes, names].to_numpy()
    se_ref = wide(design, method, "coef", "se").loc[genes, names].to_numpy()
    df_ref = wide(design, method, "df", "df").loc[genes, names].to_numpy()

    err_b = rel_err(res.fe_params[names], b_ref, np.maximum(np.abs(b_ref), se_ref))
    err_se = rel_err(res.bse_fe[names], se_ref)
    finite = np.isfinite(df_ref)
    err_df = rel_err(res.df_satterthwaite[names].to_numpy()[finite], df_ref[finite])
    report(f"{design} {method}", coef=err_b.max(), se=err_se.max(), df=err_df.max(),
           df_median=np.median(err_df), df_nonfinite=float((~finite).sum()))
    assert err_b.max() < 1e-6, np.unravel_index(np.argmax(err_b), err_b.shape)
    assert err_se.max() < 1e-6, np.unravel_index(np.argmax(err_se), err_se.shape)
    assert err_df.max() < 2e-3


@pytest.mark.parametrize("design", DESIGNS)
def test_contrasts_match_contest(design):
    res = fit(design, "REML")
    genes = res.gene_names
    con = ref(design, "REML_contrast")
    vectors = ref(design, "contrasts").set_index("contrast")
    one = vectors.index[0]                                  # the 1-df contrast
    exp = con[con["contrast"] == one].set_index("gene").loc[genes]
    frame = res.t_test({one: vectors.loc[one].to_numpy()}).summary_frame().set_index("gene").loc[genes]
    err = {
        "estimate": rel_err(frame["effect"], exp["estimate"], np.maximum(np.abs(exp["estimate"]), exp["se"])),
        "se": rel_err(frame["se"], exp["se"]),
        "df": rel_err(frame["df"], exp["df"]),
        "p": rel_err(frame["pvalue"], exp["p"]),
    }
    joint_rows = [c for c in vectors.index if c.startswith("celltype_trt_all_row")]
    if joint_rows:
        jexp = con[con["contrast"] == "celltype_trt_all"].set_index("gene").loc[genes]
        wald = res.wald_test(vectors.loc[joint_rows].to_numpy()).loc[genes]
        assert (wald["df_num"] == jexp["numdf"]).all()
        err.update({"F": rel_err(wald["statistic"], jexp["F"]), "F_df": rel_err(wald["df_denom"], jexp["df"]),
                    "F_p": rel_err(wald["pvalue"], jexp["p"])})
    report(f"{design} REML contrasts", **{k: v.max() for k, v in err.items()})
    for key, tol in {"estimate": 1e-6, "se": 1e-6, "df": 2e-3, "p": 2e-3,
                     "F": 1e-6, "F_df": 2e-3, "F_p": 2e-3}.items():
        if key in err:
            assert err[key].max() < tol, (key, genes[np.argmax(err[key])], err[key].max())
