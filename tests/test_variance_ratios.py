"""Variance components optimised over the ratios ``g = theta^2 >= 0``.

The exact-Hessian criteria of :mod:`flashmm._fit_vc` (nested blocks, closed
arrowheads, a global crossed block) are minimised by projected Newton in ``g``
with the bound 0 (:meth:`~flashmm._fit_vc.VCBlockCriterion.in_variances`); the
reference is the same criterion minimised in ``theta`` without bounds, with the
boundary snapping and saddle-point escape that path needs.  The genes are
simulated with some components truly 0, so that many optima lie on the boundary.

What must hold, per gene: the criterion is never above the reference's by more
than its round-off (1e-11 relative: the criterion is ``n log S`` plus
log-determinants, evaluated to ~1e-14 relative, and both optimisers stop at a
Newton decrement of 1e-10); the ratios agree where the criterion determines
them (1e-4 absolute in ``theta``, the reference's snapping tolerance); and the
optimality conditions of the bound hold: at a ratio of 0 the slope ``df/dg`` is
not negative, at a positive ratio it vanishes (both to 1e-5 of the criterion's
curvature scale, far below the O(1) slopes a wrong boundary decision leaves).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flashmm import MultiGeneMixedLM

DESIGNS = {
    "nested": {"groups": "donor", "re_formula": "1", "vc_formula": {"dct": "0 + C(ct)"}},
    "crossed": {"vc_formula": {"donor": "0 + C(donor)", "batch": "0 + C(batch)"}},
    "three": {"vc_formula": {"donor": "0 + C(donor)", "dct": "0 + C(donor):C(ct)",
                             "batch": "0 + C(batch)"}},
}


def _study(seed: int = 5, donors: int = 14, celltypes: int = 3, per: int = 9, genes: int = 24
           ) -> tuple[pd.DataFrame, np.ndarray]:
    """Cells of donors x cell types spread over 6 batches; gene k has donor, donor:ct and batch
    standard deviations from (0, 0.05, 0.5), so that about a third of each are truly 0."""
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(donors), celltypes * per)
    ct = np.tile(np.repeat(np.arange(celltypes), per), donors)
    n = donor.size
    batch = (donor + rng.integers(0, 3, n)) % 6
    data = pd.DataFrame({"donor": [f"d{d:02d}" for d in donor], "ct": [f"c{c}" for c in ct],
                         "batch": [f"b{b}" for b in batch], "trt": np.where(donor % 2, "B", "A"),
                         "x": rng.normal(size=n)})
    sd = np.array([0.0, 0.05, 0.5])[rng.integers(0, 3, (3, genes))]
    Y = (rng.normal(size=(n, genes)) + 2.0 * data["x"].to_numpy()[:, None]
         + (sd[0] * rng.normal(size=(donors, genes)))[donor]
         + (sd[1] * rng.normal(size=(donors * celltypes, genes)))[donor * celltypes + ct]
         + (sd[2] * rng.normal(size=(6, genes)))[batch])
    return data, Y


def _criterion(design: str, reml: bool):  # noqa: ANN202
    from flashmm._fit_arrowhead import specialise
    from flashmm._fit_theta import ThetaCriterion
    from flashmm._structure import analyse_structure

    data, Y = _study()
    model = MultiGeneMixedLM.from_formula("~ 0 + ct + ct:trt + x", data, endog=Y,
                                          **DESIGNS[design])
    stats = model.stats
    st = analyse_structure(stats.components, stats.ZZ)
    crit = specialise(ThetaCriterion.from_stats(stats, st, reml, np.sqrt(stats.yy / stats.n)))
    assert crit.in_variances() is not None
    return crit


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("design", list(DESIGNS))
def test_ratios_reach_the_optimum_of_the_theta_path(design: str, reml: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from flashmm._fit_theta import minimise_theta_block
    from flashmm._fit_vc import VCBlockCriterion

    crit = _criterion(design, reml)
    got = minimise_theta_block(crit)
    with monkeypatch.context() as mp:
        mp.setattr(VCBlockCriterion, "in_variances", None)     # Newton in theta, as before
        ref = minimise_theta_block(crit)
    assert got.converged.all() and ref.converged.all()
    f = np.abs(ref.criterion)
    excess = (got.criterion - ref.criterion) / f
    assert excess.max() < 1e-11, f"criterion above the theta path by {excess.max():.1e}"
    # a bad boundary decision costs O(1) in the criterion; both reach the same optima
    assert np.abs(excess).max() < 1e-9
    assert np.sum(got.theta == 0.0) >= 0.2 * got.theta.size, "too few boundary optima"
    flat = np.abs(got.theta - ref.theta)
    assert flat.max() < 1e-4, f"theta differs by {flat.max():.1e}"


@pytest.mark.parametrize("design", list(DESIGNS))
def test_ratios_satisfy_the_bound_conditions(design: str) -> None:
    from flashmm._fit_theta import minimise_theta_block

    crit = _criterion(design, reml=True)
    res = minimise_theta_block(crit)
    _, grad, hess = crit.newton_terms_in_g(res.theta)
    scale = np.sqrt(np.abs(np.diagonal(hess, axis1=1, axis2=2))) + 1.0
    at0 = res.theta == 0.0
    assert at0.any() and (~at0).any()
    slope = grad / scale
    assert slope[at0].min() > -1e-5, "a ratio at 0 along which the criterion still decreases"
    assert np.abs(slope[~at0]).max() < 1e-5, "a positive ratio that is not stationary"
