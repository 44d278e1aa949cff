"""limma-style gene-wise models (flashmm.limma): from-scratch checks and pylimma parity."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from flashmm import MultiGeneMixedLM
from flashmm._errors import DataError
from flashmm.limma import LimmaFit, duplicate_correlation, e_bayes, lm_fit

FIELDS = ("coefficients", "stdev_unscaled", "sigma", "df_residual")


def _rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.nanmax(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


@pytest.fixture(scope="module")
def study() -> dict:
    """Genes x samples, 8 blocks of 3 samples, 3 groups and a covariate."""
    rng = np.random.default_rng(1)
    G, nb, per = 300, 8, 3
    n = nb * per
    block = np.repeat(np.arange(nb), per)
    grp = np.tile([0, 1, 2], nb)
    X = np.column_stack([np.ones(n), grp == 1, grp == 2, rng.normal(size=n)]).astype(float)
    Y = 8.0 + rng.normal(size=(G, nb))[:, block] * np.sqrt(0.3) + rng.normal(size=(G, n)) * np.sqrt(0.7)
    Y[:10] += 1.5 * X[:, 1]
    w = rng.uniform(0.5, 2.0, size=n)
    W = rng.uniform(0.5, 2.0, size=(G, n))
    return {"Y": Y, "X": X, "block": block, "w": w, "W": W, "rho": 0.27}


# ------------------------------------------------------------ from scratch
def _dense_gls(y, X, block, rho, w):
    """limma's definitions with the explicit n x n covariance."""
    same = (block[:, None] == block[None, :]).astype(float)
    C = np.where(same > 0, rho, 0.0)
    np.fill_diagonal(C, 1.0)
    V = C / np.sqrt(np.outer(w, w))
    Vi = np.linalg.inv(V)
    cov = np.linalg.inv(X.T @ Vi @ X)
    b = cov @ X.T @ Vi @ y
    r = y - X @ b
    df = len(y) - X.shape[1]
    return b, np.sqrt(np.diag(cov)), np.sqrt(r @ Vi @ r / df)


def test_ols_matches_lstsq(study):
    Y, X = study["Y"], study["X"]
    fit = lm_fit(Y, X)
    b, *_ = np.linalg.lstsq(X, Y.T, rcond=None)
    assert _rel(fit.coefficients, b.T) < 1e-9
    resid = Y.T - X @ b
    df = X.shape[0] - X.shape[1]
    assert _rel(fit.sigma, np.sqrt(np.sum(resid**2, axis=0) / df)) < 1e-10
    assert _rel(fit.stdev_unscaled[0], np.sqrt(np.diag(np.linalg.inv(X.T @ X)))) < 1e-12
    assert np.all(fit.df_residual == df)
    assert np.allclose(fit.Amean, Y.mean(axis=1))


@pytest.mark.parametrize("weighted", [False, True])
def test_block_gls_matches_dense(study, weighted):
    Y, X, block, rho = study["Y"], study["X"], study["block"], study["rho"]
    w = study["w"] if weighted else np.ones(X.shape[0])
    fit = lm_fit(Y, X, block=block, correlation=rho, weights=w if weighted else None)
    for i in (0, 5, 17, 299):
        b, su, sig = _dense_gls(Y[i], X, block, rho, w)
        assert _rel(fit.coefficients[i], b) < 1e-9
        assert _rel(fit.stdev_unscaled[i], su) < 1e-10
        assert _rel(fit.sigma[i], sig) < 1e-10


def test_gene_weights_and_missing_match_dense(study):
    Y, X, block, rho, W = study["Y"].copy(), study["X"], study["block"], study["rho"], study["W"]
    Y[7, 2] = np.nan
    Y[3, 5] = np.nan                     # observations are left out as missing values
    fit = lm_fit(Y, X, block=block, correlation=rho, weights=W)
    for i in (0, 3, 7, 42):
        keep = np.isfinite(Y[i]) & (W[i] > 0)
        b, su, sig = _dense_gls(Y[i, keep], X[keep], block[keep], rho, W[i, keep])
        assert _rel(fit.coefficients[i], b) < 1e-9
        assert _rel(fit.stdev_unscaled[i], su) < 1e-10
        assert _rel(fit.sigma[i], sig) < 1e-10
        assert fit.df_residual[i] == keep.sum() - X.shape[1]
    # gene weights that are all equal reproduce the array-weight fast path
    same = lm_fit(study["Y"], X, block=block, correlation=rho,
                  weights=np.tile(study["w"], (Y.shape[0], 1)))
    fast = lm_fit(study["Y"], X, block=block, correlation=rho, weights=study["w"])
    for k in FIELDS:
        assert _rel(same[k], fast[k]) < 1e-9


def test_block_gls_equals_mixed_model_at_fixed_ratio(study):
    """The GLS coefficients are flashmm's at the shared ratio g = rho / (1 - rho)."""
    from flashmm._gls import gls_estimates

    Y, X, block, rho = study["Y"], study["X"], study["block"], study["rho"]
    model = MultiGeneMixedLM(Y.T, X, groups=block)
    g = np.full((Y.shape[0], 1), rho / (1 - rho))
    est = gls_estimates(model.stats, g)
    fit = lm_fit(Y, X, block=block, correlation=rho)
    assert _rel(fit.coefficients, est.fe_params) < 1e-8
    su = np.sqrt((1 - rho) * np.diagonal(est.cov_unscaled, axis1=1, axis2=2))
    assert _rel(fit.stdev_unscaled, su) < 1e-10


def test_duplicate_correlation_recovers_rho(study):
    dc = duplicate_correlation(study["Y"], study["X"], study["block"])
    assert abs(dc.cor - 0.3) < 0.06
    assert dc["consensus_correlation"] == dc.cor
    # per-gene ratios are flashmm's unconstrained REML; the constrained fit is >= 0
    con = duplicate_correlation(study["Y"], study["X"], study["block"], allow_negative=False)
    assert np.all(con.ratios[np.isfinite(con.ratios)] >= 0)
    assert con.cor >= dc.cor - 1e-6


def test_duplicate_correlation_block_in_design():
    rng = np.random.default_rng(0)
    block = np.repeat(np.arange(4), 3)
    X = np.column_stack([np.ones(12), block == 1, block == 2, block == 3]).astype(float)
    with pytest.warns(UserWarning, match="already encoded"):
        dc = duplicate_correlation(rng.normal(size=(5, 12)), X, block)
    assert dc.cor == 0.0


def test_e_bayes_from_scratch(study):
    fit = lm_fit(study["Y"], study["X"])
    eb = e_bayes(fit)
    d0, s0 = eb.df_prior, eb.s2_prior
    post = (fit.df_residual * fit.sigma**2 + d0 * s0) / (fit.df_residual + d0)
    assert _rel(eb.s2_post, post) < 1e-12
    t = fit.coefficients / fit.stdev_unscaled / np.sqrt(post)[:, None]
    assert _rel(eb.t, t) < 1e-12
    assert _rel(eb.p_value, 2 * sps.t.sf(np.abs(t), (fit.df_residual + d0)[:, None])) < 1e-10
    assert 0 < d0 < np.inf and eb.lods.shape == t.shape
    tab = eb.table("x1", sort_by="p")
    assert list(tab.columns) == ["logFC", "AveExpr", "t", "P.Value", "adj.P.Val", "B"]
    assert len(set(tab.index[:10]) & {f"gene{i}" for i in range(10)}) >= 5


def test_e_bayes_on_mixed_model(study):
    Y, X, block = study["Y"], study["X"], study["block"]
    res = MultiGeneMixedLM(Y.T, X, groups=block).fit()
    eb = e_bayes(res)
    assert eb.method == "mixedlm"
    assert eb.t.shape == (Y.shape[0], X.shape[1])
    su = np.sqrt(np.diagonal(res.cov_params(), axis1=1, axis2=2) / res.scale.to_numpy()[:, None])
    assert _rel(eb.t, res.fe_params.to_numpy() / su / np.sqrt(eb.s2_post)[:, None]) < 1e-12
    assert np.all(eb.df_residual == X.shape[0] - X.shape[1])


def test_anndata_formula_and_uns(study):
    ad = pytest.importorskip("anndata")
    Y, block = study["Y"], study["block"]
    obs = pd.DataFrame({"grp": [f"g{i}" for i in np.tile([0, 1, 2], 8)],
                        "x": study["X"][:, 3], "sam": [f"s{b}" for b in block]},
                       index=[f"c{i}" for i in range(Y.shape[1])])
    adata = ad.AnnData(Y.T.copy(), obs=obs)
    fit = lm_fit(adata, "~ grp + x", block="sam", correlation=0.27, key="lim")
    assert isinstance(fit, LimmaFit) and "lim" in adata.uns
    assert fit.coef_names == ["Intercept", "grp[T.g1]", "grp[T.g2]", "x"]
    ref = lm_fit(Y, study["X"], block=block, correlation=0.27)
    for k in FIELDS:
        assert _rel(adata.uns["lim"][k], ref[k]) < 1e-10
    e_bayes(adata, key="lim")
    assert "t" in adata.uns["lim"]
    # the same through design_data with array input
    fit2 = lm_fit(Y, "~ grp + x", block="sam", correlation=0.27, design_data=obs)
    assert _rel(fit2.coefficients, fit.coefficients) < 1e-12


def test_bad_inputs(study):
    Y, X = study["Y"], study["X"]
    with pytest.raises(ValueError, match="correlation"):
        lm_fit(Y, X, block=study["block"], correlation=1.0)
    with pytest.raises(Exception, match="weights"):
        lm_fit(Y, X, weights=np.ones(5))
    W = study["W"].copy()
    W[3, 5], W[4, 0], W[0, 1] = 0.0, -1.0, np.nan
    for f in (lm_fit, duplicate_correlation):
        with pytest.raises(DataError, match=r"3 of 7200 are not \(1 NaN, 1 zero, 1 negative\)"):
            f(Y, X, block=study["block"], weights=W)
    with pytest.raises(Exception, match="rank deficient"):
        lm_fit(Y, np.column_stack([X, X[:, 1]]))
    with pytest.raises(NotImplementedError):
        e_bayes(lm_fit(Y, X), robust=True)


# ------------------------------------------------------------ pylimma parity
@pytest.fixture(scope="module")
def pylimma():
    mod = pytest.importorskip("pylimma")
    warnings.filterwarnings("ignore", module="pylimma")
    return mod


@pytest.fixture(scope="module")
def ref_rho(study, pylimma) -> float:
    """pylimma's consensus correlation (computed once: its per-gene loop is slow)."""
    return pylimma.duplicate_correlation(study["Y"], study["X"], block=study["block"])[
        "consensus_correlation"]


@pytest.mark.parametrize("case", ["ols", "array_weights", "block", "block_array_weights",
                                  "block_gene_weights"])
def test_lm_fit_parity(study, pylimma, ref_rho, case):
    Y, X, block, rho = study["Y"], study["X"], study["block"], ref_rho
    kw = {
        "ols": {}, "array_weights": {"weights": study["w"]},
        "block": {"block": block, "correlation": rho},
        "block_array_weights": {"block": block, "correlation": rho, "weights": study["w"]},
        "block_gene_weights": {"block": block, "correlation": rho, "weights": study["W"][:60]},
    }[case]
    if case == "block_gene_weights":   # pylimma loops over genes here: keep it small
        Y = Y[:60]
    ours, ref = lm_fit(Y, X, **kw), pylimma.lm_fit(Y, X, **kw)
    for k in FIELDS + ("cov_coefficients", "Amean"):
        assert _rel(ours[k], ref[k]) < 1e-8, k


def test_duplicate_correlation_parity(study, pylimma, ref_rho):
    ours = duplicate_correlation(study["Y"], study["X"], study["block"])
    assert abs(ours.cor - ref_rho) < 1e-3
    w = study["w"]
    ours_w = duplicate_correlation(study["Y"], study["X"], study["block"], weights=w)
    ref_w = pylimma.duplicate_correlation(study["Y"], study["X"], block=study["block"], weights=w)
    assert abs(ours_w.cor - ref_w["consensus_correlation"]) < 1e-3


@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("trend", [False, True])
def test_e_bayes_parity(study, pylimma, block, trend):
    Y, X = study["Y"], study["X"]
    kw = {"block": study["block"], "correlation": study["rho"]} if block else {}
    ours = e_bayes(lm_fit(Y, X, **kw), trend=trend)
    ref = pylimma.e_bayes(pylimma.lm_fit(Y, X, **kw), trend=trend)
    assert _rel(ours.t, ref["t"]) < 1e-6
    assert _rel(ours.p_value, ref["p_value"]) < 1e-6
    assert _rel(ours.lods, ref["lods"]) < 1e-6
    assert _rel(ours.df_prior, ref["df_prior"]) < 1e-8
