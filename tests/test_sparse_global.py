"""A wide crossed (global) block through the sparse products of ``B``.

Designs like lme4's InstEval (students crossed with 1,128 lecturers) put a wide
global block beside many small group blocks.  :class:`flashmm._fit_theta.GlobalPairs`
then forms the Schur complement, the solves and the selected inverse from the
sparse ``B`` instead of the dense ``m x s x d`` products, and the general
criterion (forward-difference Hessian) fits it, the block being wider than
``flashmm._fit_global.MAX_GLOBAL``.  Here both switches are forced on small
crossed designs (students x lecturers x departments; students with a
student:service effect nested in them, crossed with lecturers) and every result
is compared with the dense factorisation of the same criterion: both are exact,
so they agree to round-off along the whole fit, the standard errors, both df
methods, the fixed-effect covariance, the BLUPs and their conditional
variances.  Tolerances 1e-9 relative (1e-12 for the log-likelihoods, 1e-7 for
the df, which come from central differences of gradients); measured:
log-likelihoods 5e-16, variances 2.5e-12, coefficients 1.8e-13, Satterthwaite
df 9e-11.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import flashmm._fit_global as fit_global
import flashmm._fit_theta as fit_theta
from flashmm import MultiGeneMixedLM


def _ratings(seed: int = 3, students: int = 70, lecturers: int = 30, per: int = 6
             ) -> tuple[pd.DataFrame, np.ndarray]:
    """Each student rates ``per`` of the lecturers; a lecturer belongs to one of 4 departments."""
    rng = np.random.default_rng(seed)
    s = np.repeat(np.arange(students), per)
    d = np.concatenate([rng.choice(lecturers, per, replace=False) for _ in range(students)])
    dept = d % 4
    x = rng.normal(size=s.size)
    service = rng.integers(0, 2, s.size)
    G = 4
    u_s = rng.normal(0, 0.5, (students, G))
    u_d = rng.normal(0, 0.7, (lecturers, G))
    u_x = rng.normal(0, 0.3, (students, G))
    Y = (1.0 + 0.4 * service[:, None] + u_s[s] + u_d[d] + u_x[s] * x[:, None]
         + rng.normal(size=(s.size, G)))
    Y[:, 3] = 1.0 + 0.4 * service + u_d[d, 3] + rng.normal(size=s.size)   # no student variance
    data = pd.DataFrame({"s": [f"s{i:03d}" for i in s], "d": [f"d{i:02d}" for i in d],
                         "dept": [f"p{i}" for i in dept], "service": service, "x": x})
    return data, Y


SPELLINGS = {
    "crossed": dict(vc_formula={"s": "0 + C(s)", "d": "0 + C(d)", "dept": "0 + C(dept)"}),
    "nested": dict(vc_formula={"s": "0 + C(s)", "ss": "0 + C(s):C(service)", "d": "0 + C(d)"}),
}


def _fit(spelling: str, sparse: bool, reml: bool, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    monkeypatch.setattr(fit_theta, "SPARSE_GLOBAL_MIN", 0 if sparse else 10**9)
    monkeypatch.setattr(fit_theta, "SPARSE_GLOBAL_FILL", 1.0)
    monkeypatch.setattr(fit_global, "MAX_GLOBAL", 0)       # the general criterion, as InstEval
    data, Y = _ratings()
    model = MultiGeneMixedLM.from_formula("~ service + x", data, endog=Y, **SPELLINGS[spelling])
    res = model.fit(reml=reml)
    assert (res._fit.criterion.zz.pairs is not None) == sparse
    return res


@pytest.mark.parametrize("spelling", ["crossed", "nested"])
@pytest.mark.parametrize("reml", [True, False])
def test_sparse_global_block_equals_dense(spelling: str, reml: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    dense = _fit(spelling, False, reml, monkeypatch)
    sparse = _fit(spelling, True, reml, monkeypatch)
    assert dense._st.glob_cols.size == (34 if spelling == "crossed" else 30)
    assert dense._st.block_size == (1 if spelling == "crossed" else 3)
    assert np.all(dense.converged) and np.all(sparse.converged)
    np.testing.assert_allclose(sparse.llf, dense.llf, rtol=1e-12)
    for name in ("fe_params", "bse_fe", "vcomp", "scale"):
        np.testing.assert_allclose(np.asarray(getattr(sparse, name)),
                                   np.asarray(getattr(dense, name)), rtol=1e-9, atol=1e-12,
                                   err_msg=name)
    np.testing.assert_allclose(sparse.df_satterthwaite, dense.df_satterthwaite, rtol=1e-7)
    if reml:
        kr_s = sparse.t_test(np.eye(3), df_method="kenward-roger").summary_frame()
        kr_d = dense.t_test(np.eye(3), df_method="kenward-roger").summary_frame()
        np.testing.assert_allclose(kr_s[["effect", "se", "df"]].to_numpy(float),
                                   kr_d[["effect", "se", "df"]].to_numpy(float), rtol=1e-7)
    for name in ("blup_unscaled", "condvar_unscaled", "cov_unscaled"):
        np.testing.assert_allclose(getattr(sparse._gls, name), getattr(dense._gls, name),
                                   rtol=1e-8, atol=1e-12, err_msg=name)
