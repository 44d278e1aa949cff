"""Property-based invariants of flashmm (hypothesis).

Examples run per test (``max_examples``, derandomized so every run draws the
same examples):

    test_chunks_add_up ............................. 25
    test_permutation_and_chunk_size_change_nothing .. 15
    test_genes_together_equal_genes_alone ........... 15
    test_equivariance ............................... 20
    test_llf_matches_dense_and_brute_force .......... 12   (x REML and ML, 2 genes each:
        48 gene fits compared with the dense n x n formula, 24 with the brute force)

87 examples in all; the file runs in about 20 s on an idle machine.  Run with
``-s`` to print the largest discrepancy against the dense reference (last run:
dense-formula relative difference 4.8e-15; the brute force never beat flashmm's
llf by more than 1.4e-11, i.e. 3.6e-13 relative, optimiser round-off).
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.linalg as sla
import scipy.optimize as so
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashmm import MultiGeneMixedLM, SufficientStats
from flashmm._design import build_design

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DISCREPANCY = {"dense_rel": 0.0, "brute_gain": -np.inf, "brute_gain_rel": -np.inf, "n": 0,
               "n_brute": 0}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(
        f"\n[test_invariants] {DISCREPANCY['n']} gene fits vs the dense n x n reference "
        f"({DISCREPANCY['n_brute']} also vs the brute force): largest "
        f"|llf(flashmm) - dense llf at the same parameters| / |llf| = "
        f"{DISCREPANCY['dense_rel']:.3e}; largest brute-force gain over flashmm's llf = "
        f"{DISCREPANCY['brute_gain']:.3e} (relative {DISCREPANCY['brute_gain_rel']:.3e}; "
        "negative = flashmm always better)"
    )


# ------------------------------------------------------------------ problems
def _labels(rng, levels: int, n: int) -> np.ndarray:
    lab = rng.integers(0, levels, n)
    lab[:levels] = np.arange(levels)          # every level present
    return lab


def random_problem(seed: int, kind: str, n: int, p: int, genes: int, vc_sizes=None):
    """A random design (X, exog_vc or groups) and responses with chosen variances.

    ``kind``: "one" (a random intercept), "crossed" (two crossed factors) or
    "nested" (B nested within A, both random).  Variances are drawn from a set
    that includes 0 and tiny values, so boundary and near-boundary fits occur.
    """
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n)] + [rng.normal(size=n) for _ in range(p - 1)])
    if kind == "one":
        g = _labels(rng, int(rng.integers(3, 8)), n)
        comps = {"g": g}
    elif kind == "crossed":
        comps = {"a": _labels(rng, int(rng.integers(2, 6)), n),
                 "b": _labels(rng, int(rng.integers(2, 6)), n)}
    else:
        a = _labels(rng, int(rng.integers(2, 5)), n)
        b = rng.integers(0, 3, n)
        comps = {"a": a, "ab": np.array([f"{i}:{j}" for i, j in zip(a, b, strict=True)])}
    design = build_design(X, n, exog_vc=comps) if kind != "one" else build_design(X, n, groups=comps["g"])
    Z = design.exog_re.toarray()
    idx = np.repeat(np.arange(len(design.components)), design.sizes)
    pool = np.array([0.0, 1e-4, 0.05, 0.5, 2.0])
    Y = np.empty((n, genes))
    for j in range(genes):
        v = pool[rng.integers(0, pool.size, len(design.components))] if vc_sizes is None else vc_sizes
        u = rng.normal(size=Z.shape[1]) * np.sqrt(np.asarray(v)[idx])
        Y[:, j] = X @ rng.normal(size=p) + Z @ u + rng.normal(size=n)
    return design, Y


problems = st.tuples(
    st.integers(0, 2**32 - 1),
    st.sampled_from(["one", "crossed", "nested"]),
    st.integers(20, 45),
    st.integers(1, 3),
)


def quiet_fit(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(**kw)


def _assert_stats_close(a: SufficientStats, b: SufficientStats, rtol: float) -> None:
    assert a.n == b.n
    for k in ("XX", "ZX", "ZZ", "XY", "ZY", "yy"):
        x, y = getattr(a, k), getattr(b, k)
        scale = max(float(np.max(np.abs(y))), 1e-300)
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale, err_msg=k)


# ------------------------------------------------------- additivity of stats
@settings(max_examples=25, **SETTINGS)
@given(problems, st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4), st.booleans())
def test_chunks_add_up(prob, cuts, sparse):
    seed, kind, n, p = prob
    design, Y = random_problem(seed, kind, n, p, genes=4)
    Y[np.abs(Y) < 0.5] = 0.0
    endog = sp.csr_matrix(Y) if sparse else Y
    whole = SufficientStats.from_design(design, endog)
    bounds = sorted({0, n} | {int(c * n) for c in cuts})
    parts = [SufficientStats.from_design(design.subset(np.arange(lo, hi)), endog[lo:hi])
             for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    _assert_stats_close(total, whole, 1e-12)
    # a real difference is detected: leaving one chunk out breaks the sum
    if len(parts) > 1:
        with pytest.raises(AssertionError):
            _assert_stats_close(total + parts[0], whole, 1e-12)


@settings(max_examples=15, **SETTINGS)
@given(problems, st.integers(1, 50))
def test_permutation_and_chunk_size_change_nothing(prob, chunk):
    seed, kind, n, p = prob
    design, Y = random_problem(seed, kind, n, p, genes=3)
    perm = np.random.default_rng(seed + 1).permutation(n)
    base = SufficientStats.from_design(design, Y)
    permuted = SufficientStats.from_design(design.subset(perm), Y[perm])
    chunked = SufficientStats.from_design(design, sp.csr_matrix(Y), chunk_size=chunk)
    _assert_stats_close(permuted, base, 1e-12)
    _assert_stats_close(chunked, base, 1e-12)
    r0 = quiet_fit(MultiGeneMixedLM.from_sufficient_stats(base))
    for other in (permuted, chunked):
        r = quiet_fit(MultiGeneMixedLM.from_sufficient_stats(other))
        np.testing.assert_allclose(r.llf, r0.llf, rtol=1e-10)
        np.testing.assert_allclose(r.fe_params, r0.fe_params, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(r.vcomp, r0.vcomp, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------- genes separately
@settings(max_examples=15, **SETTINGS)
@given(problems, st.booleans())
def test_genes_together_equal_genes_alone(prob, reml):
    seed, kind, n, p = prob
    design, Y = random_problem(seed, kind, n, p, genes=5)
    stats = SufficientStats.from_design(design, Y)
    together = quiet_fit(MultiGeneMixedLM.from_sufficient_stats(stats), reml=reml)
    for j in range(stats.n_genes):
        alone = quiet_fit(MultiGeneMixedLM.from_sufficient_stats(stats.subset_genes([j])), reml=reml)
        np.testing.assert_allclose(alone.llf.iloc[0], together.llf.iloc[j], rtol=1e-10)
        np.testing.assert_allclose(alone.fe_params.iloc[0], together.fe_params.iloc[j],
                                   rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(alone.vcomp.iloc[0], together.vcomp.iloc[j],
                                   rtol=1e-6, atol=1e-8)
        assert alone.status.iloc[0] == together.status.iloc[j]


def _close(actual, desired, rtol, atol):
    """Elementwise |actual - desired| <= rtol |desired| + atol (atol may be an array)."""
    err = np.abs(actual - desired) - rtol * np.abs(desired) - atol
    assert np.all(err <= 0), f"max excess {np.max(err):.3e}\n{actual}\n{desired}"


# ---------------------------------------------------------------- equivariance
@settings(max_examples=20, **SETTINGS)
@given(problems, st.sampled_from([-3.0, 0.01, 0.5, 7.0, 1e4]), st.booleans(), st.booleans())
def test_equivariance(prob, a, shift, reml):
    seed, kind, n, p = prob
    design, Y = random_problem(seed, kind, n, p, genes=3)
    c = np.random.default_rng(seed + 2).normal(size=(p, Y.shape[1])) * 5 if shift else np.zeros((p, 3))
    r0 = quiet_fit(MultiGeneMixedLM.from_sufficient_stats(SufficientStats.from_design(design, Y)),
                   reml=reml)
    r1 = quiet_fit(MultiGeneMixedLM.from_sufficient_stats(
        SufficientStats.from_design(design, a * Y + design.exog @ c)), reml=reml)
    v0 = r0.vcomp.to_numpy()
    tot = (v0.sum(axis=1) + r0.scale.to_numpy())[:, None]
    b0 = r0.fe_params.to_numpy()
    se0 = r0.bse_fe.to_numpy()
    if not shift:     # a Y alone: every statistic is scaled exactly, so is the fit
        _close(r1.vcomp.to_numpy() / (a * a), v0, 1e-6, 1e-8 * tot)
        np.testing.assert_allclose(r1.bse_fe.to_numpy(), abs(a) * se0, rtol=1e-6)
    else:
        # a Y + X c is summed before the fit: yy ~ |Xc|^2 >> S = y'Py loses
        # log10(kappa), kappa = yy / S, digits (up to ~6 here), so the shifted
        # criterion is known to ~(m / 2) eps kappa (absolute) only, and on flat genes its
        # optimum moves by up to ~1e-4 of the total variance.  What must hold is
        # that the shifted fit is an optimum of the unshifted problem to that
        # precision: its variances, scaled back, lose at most 4x that bound of
        # the unshifted log-likelihood (the dense n x n formula), plus 1e-12
        # relative, the optimiser's own round-off (module docstring: 3.6e-13).
        Y1 = a * Y + design.exog @ c
        kappa = (Y1 * Y1).sum(axis=0) / (n * r1.scale.to_numpy())
        X, Z = design.exog, design.exog_re.toarray()
        idx = np.repeat(np.arange(len(design.components)), design.sizes)
        ratios = r1.vcomp.to_numpy() / r1.scale.to_numpy()[:, None]
        for j in range(Y.shape[1]):
            at_shifted = dense_profile(X, Z, Y[:, j], ratios[j][idx], reml)
            slack = 2 * n * np.finfo(float).eps * kappa[j] + 1e-12 * abs(r0.llf.iloc[j])
            assert at_shifted >= r0.llf.iloc[j] - slack, (j, kappa[j], r0.llf.iloc[j] - at_shifted)
        _close(r1.vcomp.to_numpy() / (a * a), v0, 1e-4, 1e-4 * tot)
        np.testing.assert_allclose(r1.bse_fe.to_numpy(), abs(a) * se0, rtol=1e-4)
    _close(r1.fe_params.to_numpy(), a * b0 + c.T, 1e-6, 1e-6 * abs(a) * se0)
    m = n - p if reml else n
    np.testing.assert_allclose(r1.llf, r0.llf - m * np.log(abs(a)), rtol=1e-9)
    if not shift:
        np.testing.assert_allclose(r1.tvalues.to_numpy(), np.sign(a) * r0.tvalues.to_numpy(),
                                   rtol=1e-6, atol=1e-6)
    else:  # the t of the moved terms shift by c / se (se known to 1e-4, above)
        np.testing.assert_allclose(r1.tvalues.to_numpy() - np.sign(a) * r0.tvalues.to_numpy(),
                                   c.T / (abs(a) * se0), rtol=1e-4, atol=1e-5)


# ------------------------------------------------- dense n x n reference
def dense_llf(X, Z, y, gdiag, s, reml):
    """(Restricted) log-likelihood with V = s (I + Z G Z'), lme4's convention."""
    n, p = X.shape
    V = s * (np.eye(n) + (Z * gdiag) @ Z.T)
    cV = np.linalg.cholesky(V)
    Vi = np.linalg.inv(V)
    XVX = X.T @ Vi @ X
    b = np.linalg.solve(XVX, X.T @ Vi @ y)
    r = y - X @ b
    logdetV = 2.0 * np.sum(np.log(np.diag(cV)))
    quad = r @ Vi @ r
    if reml:
        return -0.5 * ((n - p) * np.log(2 * np.pi) + logdetV + np.linalg.slogdet(XVX)[1] + quad)
    return -0.5 * (n * np.log(2 * np.pi) + logdetV + quad)


def dense_profile(X, Z, y, gdiag, reml):
    """Dense likelihood with the residual variance at its optimum for these ratios.

    Same formula as :func:`dense_llf` (with ``s`` profiled out), written with one
    n x n Cholesky factor of ``H = I + Z G Z'`` to keep the brute force fast.
    """
    n, p = X.shape
    H = np.eye(n) + (Z * gdiag) @ Z.T
    cf = sla.cho_factor(H, lower=True, check_finite=False)
    Xy = np.column_stack([X, y])
    HiXy = sla.cho_solve(cf, Xy, check_finite=False)
    M = Xy.T @ HiXy                       # [X y]' H^-1 [X y]
    XHX, XHy, yHy = M[:p, :p], M[:p, p], M[p, p]
    quad = yHy - XHy @ np.linalg.solve(XHX, XHy)   # r' H^-1 r at the GLS estimate
    m = n - p if reml else n
    s = quad / m
    logdetV = n * np.log(s) + 2.0 * np.sum(np.log(np.diag(cf[0])))
    if reml:
        logdetXVX = np.linalg.slogdet(XHX)[1] - p * np.log(s)
        return -0.5 * ((n - p) * np.log(2 * np.pi) + logdetV + logdetXVX + quad / s)
    return -0.5 * (n * np.log(2 * np.pi) + logdetV + quad / s)


def brute_force(X, Z, y, idx, k, reml):
    """Maximise the dense likelihood over log ratios: every face of the boundary, 3 starts."""
    best = dense_profile(X, Z, y, np.zeros(Z.shape[1]), reml)   # all components at 0
    for r in range(1, k + 1):
        for active in itertools.combinations(range(k), r):
            active = list(active)

            def neg(lg, active=active):
                g = np.zeros(k)
                g[active] = np.exp(lg)
                return -dense_profile(X, Z, y, g[idx], reml)

            for start in (-3.0, 0.0, 2.0):
                opt = so.minimize(neg, np.full(r, start), method="Nelder-Mead",
                                  bounds=[(-25.0, 8.0)] * r,
                                  options={"xatol": 1e-9, "fatol": 1e-13, "maxiter": 4000})
                best = max(best, -opt.fun)
    return best


small_problems = st.tuples(
    st.integers(0, 2**32 - 1),
    st.sampled_from(["one", "crossed", "nested"]),
    st.integers(15, 35),
    st.integers(1, 3),
)


@settings(max_examples=12, **SETTINGS)
@given(small_problems, st.booleans())
def test_llf_matches_dense_and_brute_force(prob, near_boundary):
    seed, kind, n, p = prob
    k = 1 if kind == "one" else 2
    vc = [1e-3] * k if near_boundary else None
    design, Y = random_problem(seed, kind, n, p, genes=2, vc_sizes=vc)
    X, Z = design.exog, design.exog_re.toarray()
    idx = np.repeat(np.arange(k), design.sizes)
    model = MultiGeneMixedLM.from_sufficient_stats(SufficientStats.from_design(design, Y))
    for reml in (True, False):
        res = quiet_fit(model, reml=reml)
        assert (res.status == "ok").all() and res.converged.all()
        for j in range(Y.shape[1]):
            y = Y[:, j]
            g = res.ratios.iloc[j].to_numpy()
            llf = float(res.llf.iloc[j])
            dense = dense_llf(X, Z, y, g[idx], float(res.scale.iloc[j]), reml)
            rel = abs(dense - llf) / abs(llf)
            assert rel < 1e-10, (rel, llf, dense)
            DISCREPANCY["dense_rel"] = max(DISCREPANCY["dense_rel"], rel)
            DISCREPANCY["n"] += 1
            if j > 0:   # the brute force (the slow part) on the first gene only
                continue
            brute = brute_force(X, Z, y, idx, k, reml)
            gain = brute - llf
            assert gain < 1e-8 * max(1.0, abs(llf)), (gain, llf, brute, g)
            DISCREPANCY["brute_gain"] = max(DISCREPANCY["brute_gain"], gain)
            DISCREPANCY["brute_gain_rel"] = max(DISCREPANCY["brute_gain_rel"], gain / abs(llf))
            DISCREPANCY["n_brute"] += 1
