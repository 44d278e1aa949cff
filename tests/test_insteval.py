"""lme4's InstEval as one response: crossed students x lecturers, 4,128 random effects.

``y ~ service + (1|s) + (1|d) + (1|dept:service)`` against lme4 fitted at tight
tolerance (``tests/reference/multicomp/insteval_tight.R``: bobyqa, rhoend 1e-12).
Tolerances: log-likelihood equal to 1e-9 relative and never lower than lme4's
by more than 1e-7 (measured: 4.5e-10 lower, round-off of a criterion of 2.4e5);
variances to 5e-5 relative (measured up to 2.4e-5, dept:service under ML; 2.7e-6 for the
student and lecturer variances: the likelihood is flat to
1e-9 along the lecturer and student variances, so both optimisers stop within
that); coefficients and standard errors, which follow the variances, to 1e-5
and 3e-5 relative (measured up to 2.7e-6 and 1.0e-5, ML).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flashmm import MultiGeneMixedLM

REF = Path(__file__).parent / "reference" / "multicomp"
VC = {"s": "0 + C(s)", "d": "0 + C(d)", "dept:service": "0 + C(dept):C(service)"}


@pytest.fixture(scope="module")
def model() -> MultiGeneMixedLM:
    data = pd.read_csv(REF / "insteval.csv.gz", dtype={"s": str, "d": str, "dept": str,
                                                        "service": str})
    return MultiGeneMixedLM.from_formula("~ service", data, endog=data[["y"]].to_numpy(float),
                                         vc_formula=VC)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_insteval_matches_lme4(model: MultiGeneMixedLM, method: str) -> None:
    ref = pd.read_csv(REF / f"insteval_tight_{method}.csv", keep_default_na=False)
    val = {(q, n): v for q, n, v in ref[["quantity", "name", "value"]].itertuples(index=False)}
    res = model.fit(reml=method == "REML")
    st = res._st
    assert st.n_groups == 2972 and st.glob_cols.size == 1128 + 28   # students block, rest global
    llf, llf_ref = float(res.llf.iloc[0]), float(val[("loglik", "")])
    assert llf >= llf_ref - 1e-7
    np.testing.assert_allclose(llf, llf_ref, rtol=1e-9)
    for name in VC:
        np.testing.assert_allclose(res.vcomp[name].iloc[0], float(val[("variance", name)]),
                                   rtol=5e-5)
    np.testing.assert_allclose(res.scale.iloc[0], float(val[("variance", "Residual")]), rtol=5e-5)
    np.testing.assert_allclose(res.fe_params.iloc[0].to_numpy(),
                               [float(val[("fixef", "(Intercept)")]),
                                float(val[("fixef", "service1")])], rtol=1e-5)
    np.testing.assert_allclose(res.bse_fe.iloc[0].to_numpy(),
                               [float(val[("se", "(Intercept)")]),
                                float(val[("se", "service1")])], rtol=3e-5)
