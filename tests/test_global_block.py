"""The exact Hessian of variance-component designs with a global (crossed) block.

Crossed ``(1|donor) + (1|batch)`` and three components ``(1|donor) +
(1|donor:ct) + (1|batch)`` put the batches in the global block; the criterion of
:mod:`flashmm._fit_global` gives value, gradient and Hessian in one pass.  The
reference is the general criterion (:class:`flashmm._fit_theta.ThetaCriterion`,
the block factorisation of ``M`` with its Schur complement): values and
gradients agree to round-off (1e-12 relative; 1e-9 of the largest gradient
entry for the gradients, whose entries near the optimum are differences of
O(n) terms); the Hessians of ``S`` and of the log-determinant term, and the
Hessian of the criterion, are compared with central differences of the general
criterion's analytic gradients (step 1e-5: truncation ~1e-10 relative to the
Hessian, round-off ~1e-11, so 1e-7 relative fails on any mutated term, whose
error is O(1) relative).  The designs are unbalanced (donors missing cell
types, so some slots are empty), have a cell-level covariate (X outside the
span of Z, so the REML projection enters every term) and a gene with a
component on its boundary.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flashmm import MultiGeneMixedLM


def _cells(seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The structured-engine test study (9 donors x 3 cell types, 5 batches), unbalanced:
    donor 1 keeps one cell type, donor 4 loses one (empty slots)."""
    from test_structured_engine import _cells as balanced

    data, Y = balanced(seed=seed, donors=9, celltypes=3, per=10)
    donor = data["donor"].to_numpy()
    ct = data["ct"].to_numpy()
    keep = ~(((donor == "d01") & (ct != "c2")) | ((donor == "d04") & (ct == "c0")))
    return data[keep].reset_index(drop=True), Y[keep]


VC = {"crossed": {"donor": "0 + C(donor)", "batch": "0 + C(batch)"},
      "three": {"donor": "0 + C(donor)", "dct": "0 + C(donor):C(ct)", "batch": "0 + C(batch)"}}


def _criteria(design: str, reml: bool):  # noqa: ANN202
    from flashmm._fit_arrowhead import specialise
    from flashmm._fit_global import GlobalVCCriterion
    from flashmm._fit_theta import ThetaCriterion
    from flashmm._structure import analyse_structure

    data, Y = _cells(seed=7)
    model = MultiGeneMixedLM.from_formula("~ 0 + ct + ct:trt + x", data, endog=Y,
                                          vc_formula=VC[design])
    stats = model.stats
    st = analyse_structure(stats.components, stats.ZZ)
    assert st.glob_cols.size == 5                         # the batches are global
    general = ThetaCriterion.from_stats(stats, st, reml, np.sqrt(stats.yy / stats.n))
    fast = specialise(general)
    assert isinstance(fast, GlobalVCCriterion)
    theta = np.random.default_rng(1).uniform(0.2, 1.5, (Y.shape[1], st.n_theta))
    theta[0, -1] = 0.0                                      # the batch variance at 0
    theta[1, 0] = 0.0                                       # the donor variance at 0
    return general, fast, theta


def _central(fn, theta: np.ndarray, h: float = 1e-5) -> np.ndarray:  # noqa: ANN001
    out = np.empty(theta.shape + (theta.shape[1],))
    for j in range(theta.shape[1]):
        e = np.zeros_like(theta)
        e[:, j] = h
        out[:, :, j] = (fn(theta + e) - fn(theta - e)) / (2 * h)
    return out


def _close(got: np.ndarray, want: np.ndarray, rel: float, what: str) -> None:
    scale = np.abs(want).max(axis=tuple(range(1, want.ndim)), keepdims=True)
    err = np.max(np.abs(got - want) / scale)
    assert err < rel, f"{what}: {err:.1e}"


@pytest.mark.parametrize("closed_form", [True, False])
@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("design", ["crossed", "three"])
def test_global_block_hessian_is_exact(design: str, reml: bool, closed_form: bool) -> None:
    """Both evaluations: arrowhead blocks in closed form, and dense s x s blocks."""
    import dataclasses

    general, fast, theta = _criteria(design, reml)
    assert fast.arrowg is not None                          # arrowhead blocks: closed form
    if not closed_form:
        fast = dataclasses.replace(fast, arrowg=None)
    f0, g0 = general.gradient(theta)
    f1, g1, H = fast.newton_terms(theta)
    np.testing.assert_allclose(f1, f0, rtol=1e-12)
    np.testing.assert_allclose(g1, g0, rtol=1e-9, atol=1e-9 * np.abs(g0).max())
    _close(H, _central(lambda th: general.gradient(th)[1], theta), 1e-7, "Hessian")
    S, dS, dL, d2S, d2L = fast.theta_derivatives(theta)
    S0, _, dS0, dL0 = general.parts(theta)
    np.testing.assert_allclose(S, S0, rtol=1e-12)
    _close(dS, dS0, 1e-9, "dS")
    _close(dL, dL0, 1e-9, "dL")
    _close(d2S, _central(lambda th: general.parts(th)[2], theta), 1e-7, "d2S")
    _close(d2L, _central(lambda th: general.parts(th)[3], theta), 1e-7, "d2L")


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("design", ["crossed", "three"])
def test_closed_form_gls_and_contrast_gradient(design: str, reml: bool) -> None:
    """GLS estimates, their covariance, BLUPs, conditional variances and the Satterthwaite
    contrast gradient in closed form (used with nested children, forced here for the crossed
    design too) equal the general factorisation's (round-off: the
    measured agreement is 5e-14 relative; a missing term is O(1) relative)."""
    from flashmm._fit_theta import ThetaCriterion

    general, fast, theta = _criteria(design, reml)
    want, got = ThetaCriterion.gls(general, theta), fast._gls_arrow(theta)
    for name in ("fe_params", "cov_unscaled", "blup_unscaled", "condvar_unscaled"):
        _close(getattr(got, name), getattr(want, name), 1e-11, name)
    Wc = np.random.default_rng(2).normal(size=(theta.shape[0], 3, general.XX.shape[0]))
    scale = np.linspace(0.5, 2.0, theta.shape[0])
    _close(fast._contrast_variance_gradient_arrow(theta, scale, Wc),
           ThetaCriterion.contrast_variance_gradient(general, theta, scale, Wc), 1e-11,
           "contrast variance gradient")
