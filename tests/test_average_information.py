"""The average-information Newton for variance components with a wide crossed block.

Designs whose global block is wider than ``flashmm._fit_global.MAX_GLOBAL``
(lme4's InstEval: 1,156 crossed columns) are minimised over the ratios ``g``
with the average information matrix as the Newton Hessian
(:mod:`flashmm._fit_average_info`).  Here the switch is forced on a small
crossed design (students x lecturers x departments) so that everything can be
checked against dense n x n algebra (also with a student:service effect
nested in the students, group blocks of 3 slots):

* the gradient in ``g`` and the average information equal
  ``-m q_k / S + tr(R Z_k Z_k')`` (``R = P`` under REML, ``H^-1`` under ML) and
  ``(m / S) (w_k'P w_l - q_k q_l / S)``
  formed from ``H = I + sum g_k Z_k Z_k'`` directly, inside and at ``g_k = 0``
  (tolerance 1e-9 relative; measured 3e-15: both are exact);
* the fit reaches the optimum of the forward-difference Newton in ``theta``
  (the general criterion's own optimiser), including genes whose student
  variance is 0: criterion never higher than 1e-10 relative, variances within
  1e-5 relative (both stop at a Newton decrement of 1e-10).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import flashmm._fit_average_info as fit_ai
import flashmm._fit_global as fit_global
import flashmm._fit_theta as fit_theta
from flashmm import MultiGeneMixedLM

VC = {"s": "0 + C(s)", "d": "0 + C(d)", "dept": "0 + C(dept)"}
#: students with a student:service effect nested in them (group blocks of 3 slots)
NESTED = {"s": "0 + C(s)", "ss": "0 + C(s):C(service)", "d": "0 + C(d)", "dept": "0 + C(dept)"}


def _ratings(seed: int = 7, students: int = 60, lecturers: int = 40, per: int = 5
             ) -> tuple[pd.DataFrame, np.ndarray]:
    """Each student rates ``per`` lecturers; four genes, the last without student variance."""
    rng = np.random.default_rng(seed)
    s = np.repeat(np.arange(students), per)
    d = np.concatenate([rng.choice(lecturers, per, replace=False) for _ in range(students)])
    dept = d % 4
    service = rng.integers(0, 2, s.size)
    x = rng.normal(size=s.size)
    G = 4
    Y = (1.0 + 0.4 * service[:, None] + 0.2 * x[:, None]
         + rng.normal(0, 0.6, (students, G))[s] + rng.normal(0, 0.8, (lecturers, G))[d]
         + rng.normal(0, 0.4, (4, G))[dept] + rng.normal(size=(s.size, G)))
    Y[:, 3] = (1.0 + 0.4 * service + rng.normal(0, 0.8, lecturers)[d]
               + rng.normal(size=s.size))
    data = pd.DataFrame({"s": [f"s{i:03d}" for i in s], "d": [f"d{i:02d}" for i in d],
                         "dept": [f"p{i}" for i in dept], "service": service, "x": x})
    return data, Y


def _model(monkeypatch: pytest.MonkeyPatch, sparse: bool, vc: dict[str, str] = VC
           ) -> tuple[MultiGeneMixedLM, pd.DataFrame, np.ndarray]:
    monkeypatch.setattr(fit_global, "MAX_GLOBAL", 0)          # the wide-block route
    monkeypatch.setattr(fit_theta, "SPARSE_GLOBAL_MIN", 0 if sparse else 10**9)
    monkeypatch.setattr(fit_theta, "SPARSE_GLOBAL_FILL", 1.0)
    data, Y = _ratings()
    return MultiGeneMixedLM.from_formula("~ service + x", data, endog=Y, vc_formula=vc), data, Y


def _labels(data: pd.DataFrame, name: str) -> pd.Series:
    """The level of component ``name`` of every cell."""
    return data["s"] + ":" + data["service"].astype(str) if name == "ss" else data[name]


def _dense_terms(data: pd.DataFrame, y: np.ndarray, names: list[str], g: np.ndarray,
                 reml: bool) -> tuple[np.ndarray, np.ndarray]:
    """Gradient in ``g`` and average information from n x n matrices."""
    n = len(data)
    X = np.column_stack([np.ones(n), data["service"], data["x"]])
    Z = [pd.get_dummies(_labels(data, name)).to_numpy(float) for name in names]
    H = np.eye(n) + sum(gk * Zk @ Zk.T for gk, Zk in zip(g, Z, strict=True))
    Hi = np.linalg.inv(H)
    P = Hi - Hi @ X @ np.linalg.solve(X.T @ Hi @ X, X.T @ Hi)
    m = n - X.shape[1] if reml else n
    Py = P @ y
    S = y @ Py
    W = np.column_stack([Zk @ (Zk.T @ Py) for Zk in Z])
    q = W.T @ Py
    proj = P if reml else Hi
    grad = -m * q / S + np.array([np.trace(Zk.T @ proj @ Zk) for Zk in Z])
    info = m / S * (W.T @ P @ W - np.outer(q, q) / S)
    return grad, info


@pytest.mark.parametrize("spelling", ["crossed", "nested"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("reml", [True, False])
def test_gradient_and_average_information_equal_dense_algebra(
        monkeypatch: pytest.MonkeyPatch, spelling: str, sparse: bool, reml: bool) -> None:
    vc = VC if spelling == "crossed" else NESTED
    model, data, Y = _model(monkeypatch, sparse, vc)
    res = model.fit(reml=reml)
    crit = res._fit.criterion
    assert isinstance(crit, fit_ai.AverageInformationCriterion)
    assert (crit.zz.pairs is not None) == sparse
    assert crit.st.block_size == (1 if spelling == "crossed" else 3)
    names = [model.stats.components[ci].name for ci in crit.st.vc_components]
    rng = np.random.default_rng(1)
    for zeros in ([], [0], [1, 2]):
        g = rng.uniform(0.1, 1.0, len(names))
        g[zeros] = 0.0
        for gene in (0, 3):
            _, grad, info = crit.subset(np.array([gene])).newton_terms_in_g(g[None])
            ref_grad, ref_info = _dense_terms(data, Y[:, gene], names, g, reml)
            np.testing.assert_allclose(grad[0], ref_grad, rtol=1e-9,
                                       atol=1e-9 * np.abs(ref_grad).max())
            np.testing.assert_allclose(info[0], ref_info, rtol=1e-9,
                                       atol=1e-9 * np.abs(ref_info).max())


@pytest.mark.parametrize("reml", [True, False])
def test_fit_reaches_the_forward_difference_optimum(monkeypatch: pytest.MonkeyPatch,
                                                    reml: bool) -> None:
    model, _, _ = _model(monkeypatch, True)
    ai = model.fit(reml=reml)
    assert isinstance(ai._fit.criterion, fit_ai.AverageInformationCriterion)
    # the same criterion through the general optimiser: theta, forward-difference Hessian
    monkeypatch.setattr(fit_ai.AverageInformationCriterion, "in_variances", None)
    fd = model.fit(reml=reml)
    assert np.all(ai.converged) and np.all(fd.converged)
    llf_ai, llf_fd = ai.llf.to_numpy(), fd.llf.to_numpy()
    assert np.all(llf_ai >= llf_fd - 1e-10 * np.abs(llf_fd))
    np.testing.assert_allclose(llf_ai, llf_fd, rtol=1e-10)
    v_ai, v_fd = ai.vcomp.to_numpy(), fd.vcomp.to_numpy()
    np.testing.assert_allclose(v_ai, v_fd, rtol=1e-5, atol=1e-6 * np.abs(v_fd).max())
    assert ai.vcomp["s"].iloc[3] == 0.0 and ai.vcomp["dept"].iloc[3] == 0.0   # boundary optima
