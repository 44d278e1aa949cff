"""Known covariance among groups (kinship): recla vs R/lmmlite, dense checks, API."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import RECLA
from scipy import optimize

import flashmm
from flashmm import DataError, DesignError, MultiGeneMixedLM, SufficientStats
from flashmm.kinship import (
    MissingPatternResults,
    fit_kinship,
    lmmlite_loglik_offset,
    results_at_heritability,
)

REF = Path(__file__).parent / "reference" / "lmmlite"
RTOL = 1e-5


# ----------------------------------------------------------------- recla data
@pytest.fixture(scope="module")
def recla() -> dict[str, pd.DataFrame]:
    return {
        "K": pd.read_csv(RECLA / "kinship.csv.gz", index_col=0),
        "pheno": pd.read_csv(RECLA / "pheno.csv", index_col=0),
        "covar": pd.read_csv(RECLA / "covar.csv", index_col=0),
    }


@pytest.fixture(scope="module", params=[True, False], ids=["REML", "ML"])
def recla_fit(request: pytest.FixtureRequest, recla: dict) -> tuple:
    reml = request.param
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every phenotype converges, no warning
        res = fit_kinship(recla["pheno"], recla["covar"], recla["K"], reml=reml)
    ref = pd.read_csv(REF / ("lmmlite_reml.csv" if reml else "lmmlite_ml.csv"),
                      index_col="phenotype")
    return reml, res, ref


def _close(ours: np.ndarray, ref: np.ndarray, rtol: float = RTOL) -> None:
    """Relative agreement; a reference 0 (boundary) must be matched exactly."""
    ours, ref = np.asarray(ours, float), np.asarray(ref, float)
    zero = ref == 0
    assert np.all(ours[zero] == 0), (ours[zero], ref[zero])
    np.testing.assert_allclose(ours[~zero], ref[~zero], rtol=rtol, atol=0)


def test_recla_matches_lmmlite(recla_fit: tuple) -> None:
    reml, res, ref = recla_fit
    assert isinstance(res, MissingPatternResults)
    assert list(res.gene_names) == list(ref.index)          # original column order
    assert res.converged.all()
    assert (res.nobs.to_numpy() == ref["n"].to_numpy()).all()
    _close(res.heritability, ref["hsq"])
    # lmmlite divides the residual sum of squares by n - p also for ML; flashmm's
    # ML variances are the maximum-likelihood ones (rss / n)
    factor = 1.0 if reml else ref["n"] / (ref["n"] - 2)
    _close(res.vcomp["Group"] * factor, ref["sigmasq_g"])
    _close(res.scale * factor, ref["sigmasq_e"])
    _close(res.fe_params["intercept"], ref["beta_intercept"])
    _close(res.fe_params["sex"], ref["beta_sex"])
    # the boundaries of lmmlite's check_boundary, both present in recla
    assert set(ref["boundary"]) == {"interior", "h2=0", "h2=1"}
    top = (ref["boundary"] == "h2=1").to_numpy()
    assert np.all(res.heritability.to_numpy()[top] == 1.0)
    assert np.all(res.boundary.to_numpy()[top])
    assert np.all(np.isfinite(res.fe_params.to_numpy()))
    assert np.all(np.isfinite(res.bse_fe.to_numpy()))


def test_recla_loglik_relation(recla_fit: tuple, recla: dict) -> None:
    """lmmlite's loglik = lme4 llf + a term depending only on the mice included."""
    reml, res, ref = recla_fit
    X = recla["covar"].to_numpy()
    offsets = []
    for ph in ref.index:
        keep = recla["pheno"][ph].notna().to_numpy()
        logdet = np.linalg.slogdet(X[keep].T @ X[keep])[1]
        offsets.append(lmmlite_loglik_offset(int(keep.sum()), 2, logdet, reml))
    converted = res.llf.to_numpy() + np.array(offsets)
    np.testing.assert_allclose(converted, ref["loglik"], rtol=0, atol=1e-7)
    # the offset is the same for all phenotypes with the same missing pattern
    for _, grp in pd.Series(offsets, index=ref.index).groupby(res.patterns):
        assert np.ptp(grp.to_numpy()) == 0


def test_recla_vignette_published(recla: dict) -> None:
    """lmmlite vignette, first phenotype, REML, default tol (1e-4 on h2)."""
    pheno = recla["pheno"][["OF_distance_first4"]]
    model = MultiGeneMixedLM(pheno, recla["covar"], groups=pheno.index.astype(str),
                             group_cov=recla["K"])
    # at lmmlite's estimate h2 = 0.7642841 (calcLL / getMLsoln), printed precision
    at = results_at_heritability(model, 0.7642841)
    b = at.fe_params.iloc[0]
    assert round(b["intercept"], 5) == 1417.98330
    assert round(b["sex"], 5) == -23.24218
    assert round(float(at.scale.iloc[0] + at.vcomp.iloc[0, 0]), 1) == 295340.5
    assert round(float(at.vcomp.iloc[0, 0]), 1) == 225724.1
    assert round(float(at.scale.iloc[0]), 2) == 69616.46
    logdet = np.linalg.slogdet(recla["covar"].T @ recla["covar"])[1]
    lite = float(at.llf.iloc[0]) + lmmlite_loglik_offset(261, 2, logdet)
    assert round(lite, 2) == -2332.84
    # our optimum is within lmmlite's tolerance of the published one, and better
    fit = model.fit()
    assert abs(fit.heritability.iloc[0] - 0.7642841) < 1e-4
    assert fit.llf.iloc[0] >= at.llf.iloc[0]
    # and the reference script reproduces the vignette at the default tolerance
    vig = pd.read_csv(REF / "lmmlite_default_tol.csv").iloc[0]
    assert round(vig["hsq"], 7) == 0.7642841
    assert round(vig["beta_intercept"], 5) == 1417.98330
    assert round(vig["loglik"], 2) == -2332.84


def test_recla_missing_patterns_equal_separate_fits(recla_fit: tuple, recla: dict) -> None:
    reml, res, _ = recla_fit
    assert res.patterns.nunique() == 4   # 11, 10, 3 and 2 phenotypes
    for ph in ("OF_distance_first4", "LD_light_pct"):   # 261 and 258 mice
        keep = recla["pheno"][ph].notna()
        one = fit_kinship(recla["pheno"].loc[keep, [ph]], recla["covar"][keep], recla["K"],
                          reml=reml)
        assert type(one) is flashmm.MultiGeneMixedLMResults
        np.testing.assert_allclose(res.heritability[ph], one.heritability[ph], rtol=1e-9)
        np.testing.assert_allclose(res.fe_params.loc[ph], one.fe_params.loc[ph], rtol=1e-9)
        np.testing.assert_allclose(res.llf[ph], one.llf[ph], rtol=1e-9)
        ranef = res.random_effects["Group"].loc[ph]
        assert ranef.isna().sum() == (~keep).sum()
        np.testing.assert_allclose(ranef.dropna(), one.random_effects["Group"].iloc[0], rtol=1e-6)
    assert res.cov_params().shape == (26, 2, 2)
    ci = res.conf_int()
    assert list(ci["gene"].unique()) == list(res.gene_names)
    with pytest.raises(NotImplementedError, match="part_of"):
        res.t_test([0, 1])
    frame = res.part_of("LD_light_pct").t_test([0, 1]).summary_frame()
    assert "LD_light_pct" in set(frame["gene"])


def test_recla_nan_without_drop_is_an_error(recla: dict) -> None:
    with pytest.raises(DataError, match=r"16 of 26 responses .* in 8 of 261 rows"):
        fit_kinship(recla["pheno"], recla["covar"], recla["K"], missing="none")


# ----------------------------------------------------- dense reference fits
def _dense_llf(y: np.ndarray, X: np.ndarray, ZKZ: np.ndarray, sg: float, s: float,
               reml: bool) -> tuple[float, np.ndarray]:
    """lme4 log-likelihood of V = sg ZKZ' + s I, with the GLS coefficients."""
    n, p = X.shape
    V = sg * ZKZ + s * np.eye(n)
    c = np.linalg.cholesky(V)
    Xi, yi = np.linalg.solve(c, X), np.linalg.solve(c, y)
    XVX = Xi.T @ Xi
    b = np.linalg.solve(XVX, Xi.T @ yi)
    r = yi - Xi @ b
    logdetV = 2 * np.sum(np.log(np.diag(c)))
    if reml:
        return -0.5 * ((n - p) * np.log(2 * np.pi) + logdetV + np.linalg.slogdet(XVX)[1] + r @ r), b
    return -0.5 * (n * np.log(2 * np.pi) + logdetV + r @ r), b


def _dense_fit(y: np.ndarray, X: np.ndarray, ZKZ: np.ndarray, reml: bool) -> dict[str, float]:
    """Maximise over (sg, s) >= 0: several starts in log scale plus both boundaries."""
    v = np.var(y)
    best = {"llf": -np.inf}

    def consider(sg: float, s: float) -> None:
        try:
            llf, b = _dense_llf(y, X, ZKZ, sg, s, reml)
        except np.linalg.LinAlgError:
            return
        if llf > best["llf"]:
            best.update(llf=llf, sg=sg, s=s, b=b)

    for start in [(-3, 0), (0, 0), (0, -3), (2, -2), (-1, 1)]:
        f = lambda t: -_dense_llf(y, X, ZKZ, *np.exp(t) * v, reml)[0]  # noqa: E731
        opt = optimize.minimize(f, np.array(start, float), method="Nelder-Mead",
                                options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 4000})
        consider(*(np.exp(opt.x) * v))
    for which in (0, 1):   # sg = 0, and s = 0 (finite only if ZKZ' is non-singular)
        def pair(t: float, which: int = which) -> tuple[float, float]:
            return (0.0, np.exp(t) * v) if which == 0 else (np.exp(t) * v, 0.0)

        try:
            opt = optimize.minimize(lambda t: -_dense_llf(y, X, ZKZ, *pair(t[0]), reml)[0],
                                    np.zeros(1), method="Nelder-Mead",
                                    options={"xatol": 1e-12, "fatol": 1e-14})
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(opt.fun):
            consider(*pair(opt.x[0]))
    return best


def _problem(rng: np.random.Generator, n_groups: int, per: int, rank: int | None,
             h2: float, noise: bool = True) -> tuple:
    n = n_groups * per
    G = rng.normal(size=(n_groups, rank if rank is not None else 3 * n_groups))
    K = G @ G.T / G.shape[1]
    labels = np.array([f"id{i:02d}" for i in range(n_groups)])
    groups = np.repeat(labels, per)
    Z = (groups[:, None] == labels[None, :]).astype(float)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    L = np.linalg.cholesky(K + 1e-12 * np.eye(n_groups)) if rank is None else G / np.sqrt(G.shape[1])
    y = X @ [1.0, 0.5] + np.sqrt(h2) * Z @ L @ rng.normal(size=L.shape[1])
    if noise:
        y = y + np.sqrt(1 - h2) * rng.normal(size=n)
    return y, X, Z, pd.DataFrame(K, index=labels, columns=labels), groups


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("case", ["gwas", "rank-deficient", "cells-in-donors"])
def test_dense_likelihood(case: str, reml: bool) -> None:
    rng = np.random.default_rng({"gwas": 1, "rank-deficient": 2, "cells-in-donors": 3}[case])
    n_groups, per, rank = {"gwas": (40, 1, None), "rank-deficient": (40, 1, 8),
                           "cells-in-donors": (12, 5, None)}[case]
    Ys, dense = [], []
    for h2 in (0.3, 0.7):
        y, X, Z, K, groups = _problem(rng, n_groups, per, rank, h2)
        Ys.append(y)
    Y = np.column_stack(Ys)
    res = MultiGeneMixedLM(Y, X, groups=groups, group_cov=K).fit(reml=reml)
    assert res.converged.all()
    ZKZ = Z @ K.to_numpy() @ Z.T
    for j in range(Y.shape[1]):
        dense = _dense_fit(Y[:, j], X, ZKZ, reml)
        assert res.llf.iloc[j] >= dense["llf"] - 1e-8
        np.testing.assert_allclose(res.llf.iloc[j], dense["llf"], rtol=0, atol=1e-6)
        llf_here, b = _dense_llf(Y[:, j], X, ZKZ, float(res.vcomp.iloc[j, 0]),
                                 float(res.scale.iloc[j]), reml)
        np.testing.assert_allclose(llf_here, res.llf.iloc[j], rtol=0, atol=1e-9)
        np.testing.assert_allclose(res.fe_params.iloc[j], b, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res.vcomp.iloc[j, 0], dense["sg"], rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(res.scale.iloc[j], dense["s"], rtol=2e-3, atol=1e-6)


def test_blups_on_original_levels() -> None:
    rng = np.random.default_rng(5)
    y, X, Z, K, groups = _problem(rng, 10, 4, None, 0.6)
    res = MultiGeneMixedLM(y, X, groups=groups, group_cov=K).fit()
    sg, s = float(res.vcomp.iloc[0, 0]), float(res.scale.iloc[0])
    Kv = K.to_numpy()
    V = sg * Z @ Kv @ Z.T + s * np.eye(len(y))
    b = res.fe_params.iloc[0].to_numpy()
    u = sg * Kv @ Z.T @ np.linalg.solve(V, y - X @ b)
    condvar = np.diag(sg * Kv - sg * sg * Kv @ Z.T @ np.linalg.solve(V, Z @ Kv))
    re = res.random_effects["Group"]
    assert list(re.columns) == list(K.index)
    np.testing.assert_allclose(re.iloc[0], u, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(res.random_effects_cov["Group"].iloc[0], condvar, rtol=1e-8)
    one = res.gene(0).random_effects
    assert set(one) == set(K.index)
    assert res.heritability.name == "heritability"
    assert isinstance(res.heritability, pd.Series)


def _spread_problem(seed: int, n: int = 30) -> tuple:
    """y ~ N(X b, K) exactly (no residual), K with eigenvalues from 1e-3 to 10."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    d = np.logspace(-3, 1, n)
    labels = [f"i{i:02d}" for i in range(n)]
    K = pd.DataFrame((Q * d) @ Q.T, index=labels, columns=labels)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = X @ [1.0, 0.5] + (Q * np.sqrt(d)) @ rng.normal(size=n)
    return y, X, K, np.array(labels), rng


def test_h2_one_full_rank_is_a_converged_boundary() -> None:
    """Z spans R^n (one observation per individual, full-rank K): s -> 0 can be optimal."""
    y, X, K, groups, rng = _spread_problem(2)
    Y = np.column_stack([y, y + 0.3 * rng.normal(size=30)])
    for reml in (True, False):
        res = MultiGeneMixedLM(Y, X, groups=groups, group_cov=K).fit(reml=reml)
        assert res.converged.all()
        assert res.heritability.iloc[0] == 1.0 and res.scale.iloc[0] == 0.0
        assert res.boundary.iloc[0] and not res.boundary.iloc[1]
        assert 0 < res.heritability.iloc[1] < 1
        sg = float(res.vcomp.iloc[0, 0])
        llf, b = _dense_llf(y, X, K.to_numpy(), sg, 0.0, reml)   # V = sg K
        np.testing.assert_allclose(res.llf.iloc[0], llf, rtol=0, atol=1e-8)
        np.testing.assert_allclose(res.fe_params.iloc[0], b, rtol=1e-9)
        # the profiled s_g at s = 0: r'K^-1 r / m
        r = y - X @ b
        m = 28 if reml else 30
        np.testing.assert_allclose(sg, r @ np.linalg.solve(K.to_numpy(), r) / m, rtol=1e-9)
        # every interior h2 is worse
        for h in (0.9, 0.99, 0.9999):
            at = results_at_heritability(res.model, h, reml=reml)
            assert at.llf.iloc[0] < res.llf.iloc[0]
        assert np.isfinite(res.bse_fe.iloc[0]).all()
        assert (res.df_terms.iloc[0] == 28).all()
        assert np.all(res.random_effects_cov["Group"].iloc[0] == 0)
        np.testing.assert_allclose(res.random_effects["Group"].iloc[0], y - X @ b, atol=1e-8)


def test_h2_one_is_not_an_optimum_with_rank_deficient_k() -> None:
    """With rank(K) < n - p the likelihood at s -> 0 is not finite and bounded."""
    rng = np.random.default_rng(8)
    y, X, Z, K, groups = _problem(rng, 30, 1, 6, 0.95)
    res = MultiGeneMixedLM(y, X, groups=groups, group_cov=K).fit()
    assert res.converged.all() and 0 < res.heritability.iloc[0] < 1
    assert res.model.stats.k_re == 6              # eigen-directions of the rank-6 K
    # noise-free data in the span of K: the likelihood is unbounded (exact fit),
    # which is reported as not converged, never as a finite h2 = 1 fit
    y0, X0, _, K0, g0 = _problem(rng, 30, 1, 6, 1.0, noise=False)
    with pytest.warns(flashmm.ConvergenceWarning):
        bad = MultiGeneMixedLM(y0, X0, groups=g0, group_cov=K0).fit()
    assert not bad.converged.iloc[0]


def test_h2_near_one_interior_matches_dense() -> None:
    y, X, K, groups, _ = _spread_problem(0)
    res = MultiGeneMixedLM(y, X, groups=groups, group_cov=K).fit()
    assert res.converged.iloc[0] and 0.999 < res.heritability.iloc[0] < 1
    dense = _dense_fit(y, X, K.to_numpy(), True)
    assert res.llf.iloc[0] >= dense["llf"] - 1e-8
    np.testing.assert_allclose(res.llf.iloc[0], dense["llf"], atol=1e-6)


def test_array_kinship_and_formula() -> None:
    rng = np.random.default_rng(11)
    y, X, Z, K, groups = _problem(rng, 8, 6, None, 0.5)
    data = pd.DataFrame({"x": X[:, 1], "donor": groups})
    a = MultiGeneMixedLM(y, X, groups=groups, group_cov=K.to_numpy()).fit()
    b = MultiGeneMixedLM.from_formula("~ x", data, endog=y, groups="donor", group_cov=K).fit()
    # a larger, shuffled DataFrame is aligned by label
    big = pd.DataFrame(np.eye(10), index=[*K.index, "x1", "x2"], columns=[*K.index, "x1", "x2"])
    big.iloc[:8, :8] = K.to_numpy()
    order = list(big.index[::-1])
    c = MultiGeneMixedLM(y, X, groups=groups, group_cov=big.loc[order, order]).fit()
    for r in (b, c):
        np.testing.assert_allclose(r.heritability, a.heritability, rtol=1e-10)
        np.testing.assert_allclose(r.fe_params.to_numpy(), a.fe_params.to_numpy(), rtol=1e-10)
        np.testing.assert_allclose(r.random_effects["Group" if r is c else "donor"].to_numpy(),
                                   a.random_effects["Group"].to_numpy(), rtol=1e-8)


def test_stats_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    y, X, Z, K, groups = _problem(rng, 9, 3, 5, 0.5)
    model = MultiGeneMixedLM(np.column_stack([y, -y]), X, groups=groups, group_cov=K)
    path = tmp_path / "stats.npz"
    model.stats.save(path)
    loaded = SufficientStats.load(path)
    assert loaded.components[0].cov_levels == tuple(K.index)
    a, b = model.fit(), MultiGeneMixedLM.from_sufficient_stats(loaded).fit()
    pd.testing.assert_frame_equal(a.random_effects["Group"], b.random_effects["Group"])
    pd.testing.assert_frame_equal(a.random_effects_cov["Group"], b.random_effects_cov["Group"])
    both = model.stats + loaded
    assert both.n == 2 * model.stats.n


def test_errors() -> None:
    rng = np.random.default_rng(13)
    y, X, Z, K, groups = _problem(rng, 6, 2, None, 0.5)
    bad = K.to_numpy().copy()
    bad[0, 1] = bad[1, 0] = 5.0
    with pytest.raises(DesignError, match="group_cov is not positive semi-definite"):
        MultiGeneMixedLM(y, X, groups=groups, group_cov=pd.DataFrame(bad, K.index, K.columns))
    with pytest.raises(DesignError, match=r"no row/column for 2 group label\(s\).*'id04', 'id05'"):
        MultiGeneMixedLM(y, X, groups=groups, group_cov=K.iloc[:4, :4])
    with pytest.raises(DesignError, match="6 x 6"):
        MultiGeneMixedLM(y, X, groups=groups, group_cov=np.eye(5))
    with pytest.raises(DesignError, match="not symmetric"):
        MultiGeneMixedLM(y, X, groups=groups, group_cov=np.triu(K.to_numpy()))
    with pytest.raises(DesignError, match="needs groups"):
        MultiGeneMixedLM(y, X, exog_vc={"a": groups}, group_cov=K)
    Y = np.column_stack([y, y, y])
    Y[[0, 3], 1] = np.nan
    with pytest.raises(DataError, match=r"1 of 3 responses .* in 2 of 12 rows"):
        fit_missing_patterns_none(Y, X, groups, K)


def fit_missing_patterns_none(Y: np.ndarray, X: np.ndarray, groups: np.ndarray,
                              K: pd.DataFrame) -> None:
    from flashmm.kinship import fit_missing_patterns

    fit_missing_patterns(Y, X, groups, K, missing="none")


def test_fit_kinship_arrays_and_rank_deficient() -> None:
    rng = np.random.default_rng(14)
    y, X, Z, K, groups = _problem(rng, 25, 1, 10, 0.5)
    Y = np.column_stack([y, y + rng.normal(size=25)])
    Y[3, 1] = np.nan
    res = fit_kinship(Y, X, K.to_numpy(), reml=False)
    assert list(res.gene_names) == ["pheno0", "pheno1"]
    assert res.nobs.tolist() == [25, 24]
    assert np.isfinite(res.heritability).all()
    single = fit_kinship(Y[:, 0], X, K.to_numpy(), reml=False)
    np.testing.assert_allclose(single.heritability.iloc[0], res.heritability.iloc[0], rtol=1e-12)
