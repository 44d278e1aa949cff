"""Correlated random intercepts and slopes (``exog_re`` / ``re_formula``).

References and tolerances
-------------------------
* statsmodels' own lme4 reference suite (``lme00.csv`` .. ``lme11.csv`` and
  ``lme_r_results.py`` shipped with statsmodels): statsmodels' ``test_lme.py``
  uses ``decimal=4`` (fe, cov_re, scale), ``decimal=3`` (vcov, BLUPs,
  conditional covariance) and ``decimal=2`` (llf).  The R numbers there are
  printed with 7 significant digits, so we use absolute 5e-6 for fe, cov_re,
  scale, BLUPs and conditional covariances, 1e-7 for the fixed-effect
  covariance and 1e-4 for llf (observed maxima: 5e-7, 8e-7, 6e-7, 2e-7, 5e-7,
  5e-9, 5e-5).
* lme4's sleepstudy (``tests/reference/sleepstudy``), fitted with bobyqa at
  ``rhoend = 1e-12``: lme4's theta is accurate to about 1e-7 relative (the
  criterion is flat to 1e-14 there), so variances and covariances are compared
  at 2e-6 relative (covariance entries at 2e-6 of the product of the standard
  deviations), fixed effects at 1e-9, standard errors and BLUPs at 1e-6,
  logLik at 1e-9 absolute and lmerTest's Satterthwaite df at 1e-6 relative
  (lmerTest's own finite differences are accurate to about 3e-7).
* Many genes against statsmodels ``MixedLM(..., exog_re=...)`` gene by gene.
"""

from __future__ import annotations

import csv
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flashmm import MultiGeneMixedLM

HERE = Path(__file__).resolve().parent
SLEEP = HERE / "reference" / "sleepstudy"


# ------------------------------------------------------------ statsmodels suite
def _sm_results_dir() -> Path | None:
    try:
        import statsmodels
    except ImportError:  # pragma: no cover
        return None
    path = Path(statsmodels.__path__[0]) / "regression" / "tests" / "results"
    return path if (path / "lme_r_results.py").is_file() else None


def _lme_r_results():  # noqa: ANN202
    rdir = _sm_results_dir()
    if rdir is None:
        pytest.skip("statsmodels' lme reference files are not installed")
    spec = importlib.util.spec_from_file_location("lme_r_results", rdir / "lme_r_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return rdir, mod


def _read_lme(rdir: Path, ds: int) -> dict[str, np.ndarray]:
    with open(rdir / f"lme{ds:02d}.csv", encoding="utf-8") as fid:
        rdr = csv.reader(fid)
        header = next(rdr)
        data = np.asarray([[float(x) for x in line] for line in rdr])
    return {
        "endog": data[:, header.index("endog")],
        "groups": data[:, header.index("groups")],
        "exog_fe": data[:, [i for i, h in enumerate(header) if h.startswith("exog_fe")]],
        "exog_re": data[:, [i for i, h in enumerate(header) if h.startswith("exog_re")]],
    }


LME_CASES = [(ds, reml, irf) for ds in range(12) for reml in (False, True)
             for irf in (False, True) if not (irf and ds < 6)]


@pytest.mark.parametrize("ds,reml,irf", LME_CASES)
def test_statsmodels_lme_reference(ds: int, reml: bool, irf: bool) -> None:
    rdir, lr = _lme_r_results()
    d = _read_lme(rdir, ds)
    name = f"_{'reml' if reml else 'ml'}_{'irf' if irf else 'drf'}_{ds}"
    res = MultiGeneMixedLM(d["endog"][:, None], d["exog_fe"], groups=d["groups"],
                           exog_re=d["exog_re"], independent_re=irf).fit(reml=reml)
    assert res.converged.all()
    g = res.gene(0)
    np.testing.assert_allclose(g.fe_params.to_numpy(), getattr(lr, "coef" + name), atol=5e-6)
    np.testing.assert_allclose(g.cov_re.to_numpy(), getattr(lr, "cov_re" + name), atol=5e-6)
    np.testing.assert_allclose(g.scale, getattr(lr, "scale" + name)[0], atol=5e-6)
    np.testing.assert_allclose(g.cov_params().to_numpy(), getattr(lr, "vcov" + name), atol=1e-7)
    np.testing.assert_allclose(g.llf, getattr(lr, "loglike" + name)[0], atol=1e-4)
    if hasattr(lr, "ranef_mean" + name):
        g0 = str(np.unique(d["groups"])[0])
        np.testing.assert_allclose(g.random_effects[g0].to_numpy(),
                                   getattr(lr, "ranef_mean" + name), atol=5e-6)
        np.testing.assert_allclose(g.random_effects_cov[g0].to_numpy(),
                                   np.atleast_2d(getattr(lr, "ranef_condvar" + name)), atol=5e-6)


# ------------------------------------------------------------------ sleepstudy
@pytest.fixture(scope="module")
def sleepstudy() -> pd.DataFrame:
    return pd.read_csv(SLEEP / "sleepstudy.csv")


@pytest.mark.parametrize("kind", ["corr", "diag"])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_sleepstudy_lme4(sleepstudy: pd.DataFrame, kind: str, method: str) -> None:
    reml = method == "REML"
    model = MultiGeneMixedLM.from_formula(
        "~ Days", sleepstudy, endog=sleepstudy[["Reaction"]], groups="Subject",
        re_formula="~ 1 + Days", independent_re=kind == "diag")
    res = model.fit(reml=reml)
    vc = pd.read_csv(SLEEP / f"sleepstudy_{kind}_{method}_vc.csv").iloc[0]
    fe = pd.read_csv(SLEEP / f"sleepstudy_{kind}_{method}_fixef.csv")
    ranef = pd.read_csv(SLEEP / f"sleepstudy_{kind}_{method}_ranef.csv")
    g = res.gene("Reaction")
    assert g.converged and not g.boundary
    # names as statsmodels
    assert list(g.cov_re.index) == ["Subject", "Days"] == list(g.cov_re.columns)
    cov_names = ["Subject Var", "Subject x Days Cov", "Days Var"] if kind == "corr" else [
        "Subject Var", "Days Var"]
    assert list(res.cov_re.columns) == cov_names
    assert list(res.params.columns) == ["Intercept", "Days"] + cov_names
    theta = np.array([float(x) for x in vc["theta"].split(";")])
    np.testing.assert_allclose(res.theta.iloc[0].to_numpy(), theta, rtol=2e-6)
    C = g.cov_re.to_numpy()
    np.testing.assert_allclose(C[0, 0], vc["var_intercept"], rtol=2e-6)
    np.testing.assert_allclose(C[1, 1], vc["var_days"], rtol=2e-6)
    np.testing.assert_allclose(C[1, 0], vc["cov_intercept_days"],
                               atol=2e-6 * np.sqrt(vc["var_intercept"] * vc["var_days"]))
    np.testing.assert_allclose(g.scale, vc["residual"], rtol=2e-6)
    np.testing.assert_allclose(g.llf, vc["loglik"], atol=1e-9)
    np.testing.assert_allclose(g.fe_params.to_numpy(), fe["estimate"], rtol=1e-9)
    np.testing.assert_allclose(g.bse_fe.to_numpy(), fe["se"], rtol=1e-6)
    np.testing.assert_allclose(res.df_satterthwaite.iloc[0].to_numpy(), fe["df"], rtol=1e-6)
    np.testing.assert_allclose(g.pvalues.to_numpy(), fe["p"], rtol=1e-4)  # df to 3e-7
    re = g.random_effects
    recov = g.random_effects_cov
    subjects = [str(s) for s in ranef["Subject"]]
    blup = np.array([re[s].to_numpy() for s in subjects])
    np.testing.assert_allclose(blup, ranef[["intercept", "days"]].to_numpy(), rtol=1e-6,
                               atol=1e-6 * np.abs(blup).max())
    cc = np.array([recov[s].to_numpy()[[0, 1, 1], [0, 0, 1]] for s in subjects])
    np.testing.assert_allclose(
        cc, ranef[["condvar_intercept", "condcov_intercept_days", "condvar_days"]].to_numpy(),
        rtol=1e-6, atol=1e-6 * np.abs(cc).max())
    # the whole-fit tables agree with the one-gene view
    np.testing.assert_allclose(res.random_effects["Subject"].iloc[0].to_numpy(),
                               blup.ravel(), rtol=1e-12)
    assert isinstance(g.summary().as_text(), str)


def test_sleepstudy_array_api_matches_formula(sleepstudy: pd.DataFrame) -> None:
    X = np.column_stack([np.ones(len(sleepstudy)), sleepstudy["Days"]])
    a = MultiGeneMixedLM(sleepstudy[["Reaction"]].to_numpy(), X, groups=sleepstudy["Subject"],
                         exog_re=X).fit()
    b = MultiGeneMixedLM.from_formula("~ Days", sleepstudy, endog=sleepstudy[["Reaction"]],
                                      groups="Subject", re_formula="~ Days").fit()
    np.testing.assert_allclose(a.llf.to_numpy(), b.llf.to_numpy(), rtol=1e-12)
    assert list(a.cov_re.columns) == ["x_re1 Var", "x_re1 x x_re2 Cov", "x_re2 Var"]
    np.testing.assert_allclose(a.cov_re.to_numpy(), b.cov_re.to_numpy(), rtol=1e-9)


def test_random_intercept_only_matches_default_path(sleepstudy: pd.DataFrame) -> None:
    y = sleepstudy[["Reaction"]].to_numpy()
    X = np.column_stack([np.ones(len(sleepstudy)), sleepstudy["Days"]])
    for reml in (True, False):
        a = MultiGeneMixedLM(y, X, groups=sleepstudy["Subject"], exog_re=np.ones(len(y))).fit(
            reml=reml)
        b = MultiGeneMixedLM(y, X, groups=sleepstudy["Subject"]).fit(reml=reml)
        np.testing.assert_allclose(a.llf.to_numpy(), b.llf.to_numpy(), rtol=1e-11)
        np.testing.assert_allclose(a.cov_re.to_numpy()[:, 0], b.vcomp.to_numpy()[:, 0],
                                   rtol=1e-6)
        np.testing.assert_allclose(a.df_satterthwaite.to_numpy(),
                                   b.df_satterthwaite.to_numpy(), rtol=1e-5)
        # standard errors: delta method from (theta, sigma) vs the (ratio, scale)
        # information; equal at the optimum up to the finite-difference Hessian (1e-5)
        np.testing.assert_allclose(a.bse_re.to_numpy(), b.bse_re.to_numpy(), rtol=1e-5)
        np.testing.assert_allclose(a.se_vcomp[["x_re1 Var", "residual"]].to_numpy(),
                                   b.se_vcomp[["Group", "residual"]].to_numpy(), rtol=1e-5)


# -------------------------------------------------------------- many genes
def _simulate(n_genes: int = 32, n_groups: int = 15, seed: int = 7
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(12, 30, size=n_groups)
    grp = np.repeat(np.arange(n_groups), sizes)
    n = grp.size
    data = pd.DataFrame({"grp": [f"S{g:02d}" for g in grp], "x": rng.normal(size=n),
                         "trt": np.where(grp % 2 == 0, "A", "B")})
    Y = np.empty((n, n_genes))
    for j in range(n_genes):
        sd0, sd1 = rng.uniform(0.2, 1.5), rng.uniform(0.0, 0.8) * (j % 5 != 0)
        rho = rng.uniform(-0.9, 0.9)
        cov = np.array([[sd0 ** 2, rho * sd0 * sd1], [rho * sd0 * sd1, sd1 ** 2]])
        u = rng.multivariate_normal(np.zeros(2), cov, size=n_groups)
        e = rng.normal(scale=rng.uniform(0.5, 2.0), size=n)
        Y[:, j] = (1.0 + 0.5 * data["x"] + 0.3 * (data["trt"] == "B")
                   + u[grp, 0] + u[grp, 1] * data["x"] + e)
    return data, pd.DataFrame(Y, columns=[f"g{j:02d}" for j in range(n_genes)])


def _gls_se(X: np.ndarray, Xre: np.ndarray, groups: np.ndarray, f) -> np.ndarray:  # noqa: ANN001
    """``sqrt(diag((X'V^-1 X)^-1))`` at a statsmodels fit's covariance parameters (dense V)."""
    V = f.scale * np.eye(len(groups))
    for g in np.unique(groups):
        ix = np.flatnonzero(groups == g)
        V[np.ix_(ix, ix)] += Xre[ix] @ np.asarray(f.cov_re) @ Xre[ix].T
    return np.sqrt(np.diag(np.linalg.inv(X.T @ np.linalg.solve(V, X))))


def test_many_genes_against_statsmodels() -> None:
    sm = pytest.importorskip("statsmodels.api")
    data, Y = _simulate()
    res = MultiGeneMixedLM.from_formula("~ x + trt", data, endog=Y, groups="grp",
                                        re_formula="~ 1 + x").fit()
    assert res.converged.all()
    X = res.model.design.exog
    Xre = np.column_stack([np.ones(len(data)), data["x"]])
    n_match = n_worse_sm = 0
    for gene in Y.columns:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                f = sm.MixedLM(Y[gene].to_numpy(), X, data["grp"], exog_re=Xre).fit(
                    reml=True, gtol=1e-8)
                failed = False
            except Exception:  # noqa: BLE001 - statsmodels failure: nothing to compare
                failed = True
        if failed:
            continue
        warned = len(w) > 0 or not f.converged
        ours = res.gene(gene)
        assert ours.llf >= f.llf - 1e-6, (gene, ours.llf, f.llf)
        if warned or ours.llf > f.llf + 1e-6:
            n_worse_sm += 1
            continue
        n_match += 1
        se = ours.bse_fe.to_numpy()
        np.testing.assert_allclose(ours.fe_params.to_numpy(), f.fe_params, rtol=1e-4,
                                   atol=1e-4 * se.min())
        # statsmodels' bse_fe inverts its joint observed Hessian of (fe, cov_re) and
        # differs from lme4's sqrt(diag(scale (X'V^-1 X)^-1)) (here by up to ~20%);
        # flashmm reports lme4's: compare with it evaluated at statsmodels' estimates
        np.testing.assert_allclose(se, _gls_se(X, Xre, data["grp"].to_numpy(), f), rtol=1e-3)
        scale = ours.scale
        np.testing.assert_allclose(scale, f.scale, rtol=1e-3)
        np.testing.assert_allclose(ours.cov_re.to_numpy(), np.asarray(f.cov_re), rtol=1e-3,
                                   atol=1e-3 * scale)
    assert n_match >= len(Y.columns) // 2


def test_independent_and_boundary() -> None:
    data, Y = _simulate(n_genes=10, seed=3)
    res = MultiGeneMixedLM.from_formula("~ x", data, endog=Y, groups="grp",
                                        re_formula="~ x", independent_re=True).fit(reml=False)
    assert list(res.cov_re.columns) == ["grp Var", "x Var"]
    # a gene with no slope variance in the simulation: boundary is allowed and flagged
    theta = res.theta.to_numpy()
    at0 = np.any(theta < 1e-4, axis=1)
    np.testing.assert_array_equal(res.boundary.to_numpy(), at0)
    # correlated fit: a zero on the diagonal of T is a singular Psi (|corr| = 1)
    full0 = MultiGeneMixedLM.from_formula("~ x", data, endog=Y, groups="grp",
                                          re_formula="~ x").fit(reml=False)
    th = full0.theta.to_numpy()
    sing = th[:, 2] == 0.0
    assert sing.any() and full0.converged.all()
    assert full0.boundary.to_numpy()[sing].all()
    np.testing.assert_allclose(np.abs(full0.corr_re.to_numpy()[sing & (th[:, 1] != 0), 0]), 1.0,
                               rtol=1e-12)
    np.testing.assert_allclose(np.linalg.det(full0.cov_re_matrix()[sing]), 0.0, atol=1e-10)
    # the independent fit is never better than the unstructured one
    full = MultiGeneMixedLM.from_formula("~ x", data, endog=Y, groups="grp",
                                         re_formula="~ x").fit(reml=False)
    assert np.all(full.llf.to_numpy() >= res.llf.to_numpy() - 1e-8)
    lr = full.compare_lr_test(res)
    assert (lr["df"] == 1).all()


def test_with_variance_component_against_statsmodels() -> None:
    sm = pytest.importorskip("statsmodels.formula.api")
    data, Y = _simulate(n_genes=3, seed=11)
    rng = np.random.default_rng(1)
    data["batch"] = rng.choice(["b1", "b2", "b3"], size=len(data))
    eff = rng.normal(scale=0.8, size=(len(data["grp"].unique()) * 3,))
    key = pd.factorize(data["grp"] + data["batch"])[0]
    Y = Y.add(eff[key], axis=0)
    res = MultiGeneMixedLM.from_formula("~ x", data, endog=Y, groups="grp", re_formula="~ x",
                                        vc_formula={"batch": "0 + C(batch)"}).fit()
    assert list(res.params.columns)[-1] == "batch Var"
    for gene in Y.columns:
        df = data.assign(y=Y[gene])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = sm.mixedlm("y ~ x", df, groups="grp", re_formula="~ x",
                           vc_formula={"batch": "0 + C(batch)"}).fit(reml=True)
        ours = res.gene(gene)
        assert ours.llf >= f.llf - 1e-6
        if abs(ours.llf - f.llf) < 1e-5:
            np.testing.assert_allclose(ours.fe_params.to_numpy(), f.fe_params, rtol=1e-4)
            np.testing.assert_allclose(ours.vcomp, f.vcomp, rtol=2e-3, atol=1e-3 * ours.scale)


def test_results_api() -> None:
    data, Y = _simulate(n_genes=4, seed=5)
    res = MultiGeneMixedLM.from_formula("~ x + trt", data, endog=Y, groups="grp",
                                        re_formula="~ 1 + x").fit()
    assert res.cov_re_matrix().shape == (4, 2, 2)
    assert res.corr_re.shape == (4, 1)
    tt = res.t_test("x")
    assert np.all(np.isfinite(tt.pvalue.to_numpy()))
    wt = res.wald_test(["x = 0", "trt[T.B] = 0"])
    assert np.all(np.isfinite(wt["pvalue"].to_numpy()))
    assert res.summary_frame().shape[0] == 4 * 3
    assert res.random_effects["grp"].shape == (4, 2 * 15)
    assert res.se_theta.shape == (4, 4)
    assert res.aic.isna().all()
    str(res.summary())
    with pytest.raises(Exception, match="needs groups"):
        MultiGeneMixedLM(Y, np.ones((len(data), 1)), exog_re=np.ones(len(data)))


def test_saved_statistics_refit(tmp_path: Path, sleepstudy: pd.DataFrame) -> None:
    from flashmm.stats import SufficientStats

    model = MultiGeneMixedLM.from_formula("~ Days", sleepstudy, endog=sleepstudy[["Reaction"]],
                                          groups="Subject", re_formula="~ Days")
    model.stats.save(tmp_path / "ss")
    files = list(tmp_path.iterdir())
    loaded = SufficientStats.load(files[0])
    res = MultiGeneMixedLM.from_sufficient_stats(loaded).fit()
    np.testing.assert_allclose(res.llf.to_numpy(), model.fit().llf.to_numpy(), rtol=1e-12)
    assert list(res.cov_re.columns) == ["Subject Var", "Subject x Days Cov", "Days Var"]


def test_missing_drop_in_re_formula(sleepstudy: pd.DataFrame) -> None:
    d = sleepstudy.copy()
    d["z"] = d["Days"].astype(float)
    d.loc[3, "z"] = np.nan
    with pytest.warns(UserWarning, match="dropped 1 of 180"):
        m = MultiGeneMixedLM.from_formula("~ Days", d, endog=d[["Reaction"]], groups="Subject",
                                          re_formula="~ z", missing="drop")
    assert m.nobs == 179
    X = np.column_stack([np.ones(180), d["Days"]])
    with pytest.warns(UserWarning, match="dropped 1 of 180"):
        a = MultiGeneMixedLM(d[["Reaction"]], X, groups=d["Subject"],
                             exog_re=np.column_stack([np.ones(180), d["z"]]), missing="drop")
    np.testing.assert_allclose(a.fit().llf.to_numpy(), m.fit().llf.to_numpy(), rtol=1e-10)


def test_bse_re_is_the_delta_method_of_the_deviance(sleepstudy: pd.DataFrame) -> None:
    """``bse_re`` / ``se_vcomp`` equal ``sqrt(diag(2 H^-1))`` for the deviance written in
    ``(Psi / scale, sigma)`` and in ``(Psi, sigma)`` directly.

    Finite-difference steps of 1e-3 of each entry's scale: the FD Hessian is then
    accurate to ~2e-5 (checked against smaller and larger steps), so 1e-4."""
    res = MultiGeneMixedLM.from_formula("~ Days", sleepstudy, endog=sleepstudy[["Reaction"]],
                                        groups="Subject", re_formula="~ Days").fit()
    from flashmm._fit_theta import ThetaCriterion

    crit = ThetaCriterion.from_stats(res.stats, res._fit.structure, True)   # units of y
    sig0 = float(np.sqrt(res.scale.iloc[0]))
    P0 = res.cov_re_unscaled.to_numpy()[0]           # (P11, P21, P22)

    def deviance(par: np.ndarray, absolute: bool) -> float:
        p11, p21, p22, sig = par
        P = np.array([[p11, p21], [p21, p22]]) / (sig ** 2 if absolute else 1.0)
        T = np.linalg.cholesky(P)
        theta = np.array([[T[0, 0], T[1, 0], T[1, 1]]])
        S, logdet, _, _ = crit.parts(theta, grad=False)
        return float(crit.m * np.log(2 * np.pi * sig ** 2) + logdet[0] + S[0] / sig ** 2)

    for absolute, got in ((False, res.bse_re.to_numpy()[0]),
                          (True, res.se_vcomp[list(res.cov_re.columns)].to_numpy()[0])):
        par = np.append(P0 * (sig0 ** 2 if absolute else 1.0), sig0)
        h = 1e-3 * np.array([par[0], np.sqrt(par[0] * par[2]), par[2], par[3]])
        k = par.size
        H = np.empty((k, k))
        for i in range(k):
            for j in range(k):
                ei, ej = np.eye(k)[i] * h[i], np.eye(k)[j] * h[j]
                H[i, j] = (deviance(par + ei + ej, absolute) - deviance(par + ei - ej, absolute)
                           - deviance(par - ei + ej, absolute)
                           + deviance(par - ei - ej, absolute)) / (4 * h[i] * h[j])
        ref = np.sqrt(np.diag(2 * np.linalg.inv(H)))[:3]
        np.testing.assert_allclose(got, ref, rtol=1e-4)
    se_sigma = res.se_theta["sigma"].iloc[0]
    np.testing.assert_allclose(res.se_vcomp["residual"].iloc[0], 2 * sig0 * se_sigma, rtol=1e-12)


def test_write_results_stores_cov_re(tmp_path: Path) -> None:
    anndata = pytest.importorskip("anndata")
    import flashmm

    data, Y = _simulate(n_genes=5, seed=13)
    ad = anndata.AnnData(Y.to_numpy(), obs=data.set_index(data.index.astype(str)))
    ad.var_names = list(Y.columns)
    res = MultiGeneMixedLM.from_formula("~ x", data, endog=Y, groups="grp",
                                        re_formula="~ x").fit()
    flashmm.write_results(ad, res)
    ad.write_h5ad(tmp_path / "r.h5ad")
    back = anndata.read_h5ad(tmp_path / "r.h5ad")
    stored = pd.DataFrame(back.varm["flashmm_cov_re"], index=back.var_names)
    assert list(stored.columns) == ["grp Var", "grp x x Cov", "x Var"]
    np.testing.assert_allclose(stored.to_numpy(), res.cov_re.to_numpy(), rtol=1e-15)
    assert list(back.uns["flashmm"]["cov_re"]) == list(res.cov_re.columns)
    assert back.uns["flashmm"]["re_formula"] == "~ x"
    flashmm.write_results(back, res, overwrite=True)


@pytest.mark.parametrize(("exog_re", "match"), [
    (lambda x: np.column_stack([np.ones_like(x), np.zeros_like(x)]), "0 in every cell"),
    (lambda x: np.column_stack([x, 2 * x]), "linearly dependent"),
    (lambda x: np.column_stack([np.ones_like(x), np.where(np.isfinite(x), np.nan, 0)]), "NaN"),
])
def test_bad_exog_re_is_refused(exog_re, match: str) -> None:  # noqa: ANN001
    from flashmm import DesignError

    data, Y = _simulate(n_genes=2, seed=17)
    x = data["x"].to_numpy()
    with pytest.raises(DesignError, match=match):
        MultiGeneMixedLM(Y, np.column_stack([np.ones_like(x), x]), groups=data["grp"],
                         exog_re=exog_re(x))


def test_units_of_y_do_not_matter(sleepstudy: pd.DataFrame) -> None:
    """y and y * 1e+-150 give the same theta, df and relative SEs (genes are fitted at
    unit scale internally); absolute quantities scale as they must (round-off: 1e-9)."""
    y = sleepstudy["Reaction"]
    Y = pd.DataFrame({"a": y, "big": y * 1e150, "small": y * 1e-150})
    res = MultiGeneMixedLM.from_formula("~ Days", sleepstudy, endog=Y, groups="Subject",
                                        re_formula="~ Days").fit()
    assert res.converged.all()
    for name, k in (("big", 1e150), ("small", 1e-150)):
        for attr in ("theta", "df_satterthwaite", "bse_re", "cov_re_unscaled"):
            frame = getattr(res, attr)
            np.testing.assert_allclose(frame.loc[name], frame.loc["a"], rtol=1e-9)
        np.testing.assert_allclose(res.fe_params.loc[name], k * res.fe_params.loc["a"], rtol=1e-9)
        np.testing.assert_allclose(res.bse_fe.loc[name], k * res.bse_fe.loc["a"], rtol=1e-9)
        np.testing.assert_allclose(res.se_vcomp.loc[name] / k ** 2, res.se_vcomp.loc["a"],
                                   rtol=1e-9)
        np.testing.assert_allclose(res.se_theta.loc[name, "sigma"] / k,
                                   res.se_theta.loc["a", "sigma"], rtol=1e-9)
        np.testing.assert_allclose(res.random_effects["Subject"].loc[name] / k,
                                   res.random_effects["Subject"].loc["a"], rtol=1e-9)
        shift = -(len(y) - 2) * np.log(k)
        np.testing.assert_allclose(res.llf[name], res.llf["a"] + shift, rtol=1e-12)
