"""The block-structured random-slope criterion against dense n x n formulas.

flashmm never forms ``Z Lambda Lambda' Z'`` or a q x q matrix per gene for
random slopes: it works group block by group block (plus a Schur complement
for components that are not nested).  These tests build small problems with
every kind of block -- r correlated effects per group, nested variance
components with unequal numbers of levels per group (empty slots), and a
crossed component in the global block -- and compare with the textbook
formulas on the n x n covariance ``V = I + Z Lambda Lambda' Z'``.  The same
checks cover models of variance components only (diagonal ``Lambda``,
arrowhead group blocks), with the layout found from the pattern of ``Z'Z``.

Tolerances: criterion values, GLS estimates, BLUPs and conditional
covariances agree to round-off (1e-9 relative; the dense formulas lose a few
digits in ``log|V|`` and ``V^-1``); gradients are compared with central
differences of the dense criterion (step 1e-6, truncation error ~1e-8, so 1e-5
relative to the gradient's scale); Satterthwaite df with a finite-difference
Hessian and gradient of the dense deviance at 1e-4 relative (FD error ~1e-6).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from flashmm._design import RandomComponent
from flashmm._fit_theta import (
    ThetaCriterion,
    condcov_groups,
    gls_theta,
    satterthwaite_theta,
    theta_structure,
    varpar_information,
)
from flashmm._structure import analyse_structure


def _problem(seed: int, nested: bool = True, crossed: bool = True, r: int = 2, G: int = 3
             ) -> tuple[SimpleNamespace, tuple[RandomComponent, ...], np.ndarray, np.ndarray,
                        np.ndarray]:
    """Cells in 6 groups, r effects per group, a nested and a crossed component."""
    rng = np.random.default_rng(seed)
    m = 6
    sizes = rng.integers(8, 16, size=m)
    grp = np.repeat(np.arange(m), sizes)
    n = grp.size
    x = rng.normal(size=n)
    X = np.column_stack([np.ones(n), x, rng.normal(size=n)])
    E = np.column_stack([np.ones(n), x, x ** 2][:r])
    blocks = []
    Z1 = np.zeros((n, m * r))
    for k in range(r):
        Z1[np.arange(n), grp * r + k] = E[:, k]
    blocks.append(Z1)
    labels = [f"G{g}" for g in range(m)]
    comps = [RandomComponent("grp", tuple(f"{labels[g]}:{k}" for g in range(m) for k in range(r)),
                             tuple(labels[g] for g in range(m) for _ in range(r)),
                             tuple(str(k) for _ in range(m) for k in range(r)))]
    if nested:
        # 1 to 3 batches per group: unequal block sizes, so some slots are empty
        nb = np.array([1, 3, 2, 3, 1, 2])
        batch = np.array([rng.integers(nb[g]) for g in grp])
        cols, lev, grps = [], [], []
        for g in range(m):
            for b in range(nb[g]):
                cols.append((grp == g) & (batch == b))
                lev.append(f"{labels[g]}:b{b}")
                grps.append(labels[g])
        blocks.append(np.column_stack(cols).astype(float))
        comps.append(RandomComponent("batch", tuple(lev), tuple(grps), tuple(lev)))
    if crossed:
        plate = rng.integers(4, size=n)
        blocks.append((plate[:, None] == np.arange(4)[None]).astype(float))
        comps.append(RandomComponent("plate", tuple(f"p{j}" for j in range(4))))
    Z = np.hstack(blocks)
    Y = X @ rng.normal(size=(3, G)) + Z @ rng.normal(scale=0.7, size=(Z.shape[1], G))
    Y += rng.normal(size=(n, G))
    stats = SimpleNamespace(XX=X.T @ X, XY=X.T @ Y, ZX=Z.T @ X, ZY=Z.T @ Y, ZZ=Z.T @ Z,
                            yy=np.sum(Y * Y, axis=0), n=n, n_genes=G, k_fe=3)
    return stats, tuple(comps), X, Z, Y


def _dense_lambda(st, theta: np.ndarray) -> np.ndarray:  # noqa: ANN001
    lam = np.zeros((st.q, st.q))
    blocks = st.lam(theta[None])
    B = np.broadcast_to(blocks.blocks[0], (st.n_groups,) + blocks.blocks.shape[-2:])
    for g in range(st.n_groups):
        cols = st.slot_cols[g]
        ok = cols >= 0
        lam[np.ix_(cols[ok], cols[ok])] = B[g][np.ix_(ok, ok)]
    lam[st.glob_cols, st.glob_cols] = theta[st.glob_theta]
    return lam


def _dense(st, X, Z, y, theta, reml):  # noqa: ANN001, ANN202
    """Criterion, GLS estimate, its covariance, BLUPs and Cov(u|y)/s on n x n matrices."""
    n, p = X.shape
    lam = _dense_lambda(st, theta)
    V = np.eye(n) + Z @ lam @ lam.T @ Z.T
    Vi = np.linalg.inv(V)
    XVX = X.T @ Vi @ X
    C = np.linalg.inv(XVX)
    b = C @ X.T @ Vi @ y
    res = y - X @ b
    S = res @ Vi @ res
    m = n - p if reml else n
    f = m * np.log(S) + np.linalg.slogdet(V)[1] + (np.linalg.slogdet(XVX)[1] if reml else 0.0)
    blup = lam @ lam.T @ Z.T @ Vi @ res
    M = np.eye(st.q) + lam.T @ Z.T @ Z @ lam
    condcov = lam @ np.linalg.solve(M, lam.T)
    return f, b, C, blup, condcov, S


def _theta(st, rng: np.random.Generator) -> np.ndarray:  # noqa: ANN001
    th = rng.uniform(0.3, 1.2, size=st.n_theta)
    for j, (a, bb) in enumerate(st.re_pairs):
        if a != bb:
            th[j] = rng.normal(scale=0.5)
    return th


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("layout", ["nested+crossed", "nested", "crossed", "slopes-only"])
def test_criterion_and_gls_match_dense(reml: bool, layout: str) -> None:
    stats, comps, X, Z, Y = _problem(3, nested="nested" in layout, crossed="crossed" in layout)
    st = theta_structure(comps, 2, False, stats.ZZ)
    assert st.block_size == (5 if "nested" in layout else 2)
    assert st.glob_cols.size == (4 if "crossed" in layout else 0)
    crit = ThetaCriterion.from_stats(stats, st, reml)
    rng = np.random.default_rng(0)
    theta = np.vstack([_theta(st, rng) for _ in range(stats.n_genes)])
    f = crit.value(theta)
    gls = gls_theta(crit, theta)
    for gi in range(stats.n_genes):
        fd, b, C, blup, condcov, _ = _dense(st, X, Z, Y[:, gi], theta[gi], reml)
        np.testing.assert_allclose(f[gi], fd, rtol=1e-11)
        np.testing.assert_allclose(gls.fe_params[gi], b, rtol=1e-9)
        np.testing.assert_allclose(gls.cov_unscaled[gi], C, rtol=1e-9)
        np.testing.assert_allclose(gls.blup_unscaled[gi], blup, rtol=1e-9,
                                   atol=1e-11 * np.abs(blup).max())
        np.testing.assert_allclose(gls.condvar_unscaled[gi], np.diag(condcov), rtol=1e-9,
                                   atol=1e-13)
        blocks = condcov_groups(crit.subset(np.array([gi])), theta[gi])
        for g in range(st.n_groups):
            ok = st.slot_cols[g] >= 0
            cols = st.slot_cols[g][ok]
            np.testing.assert_allclose(blocks[g][np.ix_(ok, ok)], condcov[np.ix_(cols, cols)],
                                       rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("reml", [True, False])
def test_gradient_matches_dense_differences(reml: bool) -> None:
    stats, comps, X, Z, Y = _problem(5)
    st = theta_structure(comps, 2, False, stats.ZZ)
    crit = ThetaCriterion.from_stats(stats, st, reml)
    rng = np.random.default_rng(1)
    theta = np.vstack([_theta(st, rng) for _ in range(stats.n_genes)])
    _, grad = crit.gradient(theta)
    h = 1e-6
    for gi in range(stats.n_genes):
        fd = np.empty(st.n_theta)
        for j in range(st.n_theta):
            e = np.zeros(st.n_theta)
            e[j] = h
            fp = _dense(st, X, Z, Y[:, gi], theta[gi] + e, reml)[0]
            fm = _dense(st, X, Z, Y[:, gi], theta[gi] - e, reml)[0]
            fd[j] = (fp - fm) / (2 * h)
        np.testing.assert_allclose(grad[gi], fd, rtol=1e-5, atol=1e-5 * np.abs(fd).max())


def test_nested_layout_equals_global_layout() -> None:
    """The same model with the nested component in group blocks or in the Schur block."""
    stats, comps, *_ = _problem(7, crossed=False)
    st_nested = theta_structure(comps, 2, False, stats.ZZ)
    flat = (comps[0], RandomComponent("batch", comps[1].levels))   # no group labels
    st_glob = theta_structure(flat, 2, False)           # no Z'Z: nothing to detect nesting from
    assert st_nested.block_size == 5 and st_nested.glob_cols.size == 0
    # from the pattern of Z'Z alone the unlabelled component is found nested
    st_found = theta_structure(flat, 2, False, stats.ZZ)
    np.testing.assert_array_equal(st_found.slot_cols, st_nested.slot_cols)
    np.testing.assert_array_equal(st_found.slot_theta, st_nested.slot_theta)
    assert st_glob.block_size == 2 and st_glob.glob_cols.size == comps[1].size
    rng = np.random.default_rng(2)
    theta = np.vstack([_theta(st_nested, rng) for _ in range(stats.n_genes)])
    a = ThetaCriterion.from_stats(stats, st_nested, True).gradient(theta)
    b = ThetaCriterion.from_stats(stats, st_glob, True).gradient(theta)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-9, atol=1e-9 * np.abs(a[1]).max())


def test_mislabelled_nesting_falls_back_to_the_global_block() -> None:
    """Group labels that contradict Z'Z (cross products between groups) are not trusted."""
    stats, comps, *_ = _problem(9, crossed=False)
    wrong = RandomComponent("batch", comps[1].levels, tuple(reversed(comps[1].groups)),
                            comps[1].columns)
    st = theta_structure((comps[0], wrong), 2, False, stats.ZZ)
    assert st.block_size == 2 and st.glob_cols.size == comps[1].size


def test_satterthwaite_matches_dense_differences() -> None:
    """lmerTest's recipe on the dense deviance: FD Hessian in (theta, sigma), FD gradient of v."""
    stats, comps, X, Z, Y = _problem(11, crossed=True, G=2)
    st = theta_structure(comps, 2, False, stats.ZZ)
    crit = ThetaCriterion.from_stats(stats, st, True)
    rng = np.random.default_rng(3)
    theta = np.vstack([_theta(st, rng) for _ in range(stats.n_genes)])
    gls = gls_theta(crit, theta)
    S = crit.parts(theta, grad=False)[0]
    scale = S / crit.m
    L = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, -1.0]])
    info = varpar_information(crit, theta, np.sqrt(scale))
    df = satterthwaite_theta(crit, theta, scale, gls.cov_unscaled, L, info)
    n, p = X.shape

    def deviance(par: np.ndarray, y: np.ndarray) -> float:
        th, sig = par[:-1], par[-1]
        f, _, _, _, _, Sd = _dense(st, X, Z, y, th, True)
        logdet = f - (n - p) * np.log(Sd)
        return (n - p) * np.log(2 * np.pi * sig ** 2) + logdet + Sd / sig ** 2

    def v(par: np.ndarray, y: np.ndarray, c: np.ndarray) -> float:
        C = _dense(st, X, Z, y, par[:-1], True)[2]
        return par[-1] ** 2 * c @ C @ c

    h = 1e-4
    for gi in range(stats.n_genes):
        par = np.append(theta[gi], np.sqrt(scale[gi]))
        k = par.size
        H = np.empty((k, k))
        for i in range(k):
            for j in range(k):
                ei, ej = np.eye(k)[i] * h, np.eye(k)[j] * h
                H[i, j] = (deviance(par + ei + ej, Y[:, gi]) - deviance(par + ei - ej, Y[:, gi])
                           - deviance(par - ei + ej, Y[:, gi])
                           + deviance(par - ei - ej, Y[:, gi])) / (4 * h * h)
        np.testing.assert_allclose(info[gi], H, rtol=1e-4, atol=1e-4 * np.abs(H).max())
        A = 2 * np.linalg.inv(H)
        for ri, c in enumerate(L):
            g = np.array([(v(par + e, Y[:, gi], c) - v(par - e, Y[:, gi], c)) / (2 * h)
                          for e in np.eye(k) * h])
            ref = 2 * v(par, Y[:, gi], c) ** 2 / (g @ A @ g)
            np.testing.assert_allclose(df[gi, ri], ref, rtol=1e-4)


def _unlabelled(comps: tuple[RandomComponent, ...]) -> tuple[RandomComponent, ...]:
    return tuple(RandomComponent(c.name, c.levels) for c in comps)


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("labelled", [True, False])
def test_variance_component_layouts_match_dense(reml: bool, labelled: bool) -> None:
    """Variance components only: a group intercept, a nested and a crossed component.

    With the group labels (statsmodels' spelling) or without (groups=None), the
    analysis must find the same layout from Z'Z: arrowhead group blocks
    (intercept, then the nested batches) and the crossed plates in the global
    block; criterion, gradient and GLS then match the dense formulas.
    """
    stats, comps, X, Z, Y = _problem(13, r=1)
    comps = comps if labelled else _unlabelled(comps)
    st = analyse_structure(comps, stats.ZZ)
    assert st.re_dim == 0 and st.n_groups == 6
    assert st.block_size == 4 and st.glob_cols.size == 4
    np.testing.assert_array_equal(st.slot_cols[:, 0], np.arange(6))   # the intercepts first
    crit = ThetaCriterion.from_stats(stats, st, reml)
    assert crit.zz.arrowhead
    rng = np.random.default_rng(4)
    theta = rng.uniform(0.2, 1.5, size=(stats.n_genes, st.n_theta))
    theta[0, 1] = 0.0                                  # a component at the boundary
    f, grad = crit.gradient(theta)
    gls = gls_theta(crit, theta)
    h = 1e-6
    for gi in range(stats.n_genes):
        fd, b, C, blup, _, _ = _dense(st, X, Z, Y[:, gi], theta[gi], reml)
        np.testing.assert_allclose(f[gi], fd, rtol=1e-11)
        np.testing.assert_allclose(gls.fe_params[gi], b, rtol=1e-9)
        np.testing.assert_allclose(gls.cov_unscaled[gi], C, rtol=1e-9)
        np.testing.assert_allclose(gls.blup_unscaled[gi], blup, rtol=1e-9,
                                   atol=1e-11 * np.abs(blup).max())
        g_fd = np.array([(_dense(st, X, Z, Y[:, gi], theta[gi] + e, reml)[0]
                          - _dense(st, X, Z, Y[:, gi], theta[gi] - e, reml)[0]) / (2 * h)
                         for e in np.eye(st.n_theta) * h])
        np.testing.assert_allclose(grad[gi], g_fd, rtol=1e-5, atol=1e-5 * np.abs(g_fd).max())


def test_blocking_factor_leaves_the_fewest_global_columns() -> None:
    """Without labels, donor (with donor:celltype nested in it) blocks, not donor:celltype."""
    rng = np.random.default_rng(8)
    donor = np.repeat(np.arange(5), 12)
    ct = rng.integers(0, 3, size=donor.size)
    dct = donor * 3 + ct
    _, dct = np.unique(dct, return_inverse=True)
    Z = np.hstack([(donor[:, None] == np.arange(5)).astype(float),
                   (dct[:, None] == np.arange(dct.max() + 1)).astype(float)])
    comps = (RandomComponent("dct", tuple(map(str, range(dct.max() + 1)))),
             RandomComponent("donor", tuple(map(str, range(5)))))
    Z = np.hstack([Z[:, 5:], Z[:, :5]])               # the larger factor first in Z
    st = analyse_structure(comps, Z.T @ Z)
    assert st.n_groups == 5 and st.glob_cols.size == 0
    np.testing.assert_array_equal(np.sort(st.slot_cols[:, 0]), comps[0].size + np.arange(5))
