"""results.predict and resid_for: against a direct computation and statsmodels.

The direct computation looks every cell's random effects up by label in
``results.random_effects`` (its documented level names) and adds them to
``X b`` from ``results.fe_params``: the same sums in another order, so the
agreement is to round-off (1e-12 relative to the size of the terms).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import simulate_study

from flashmm import DesignError, MultiGeneMixedLM, SufficientStats

pytestmark = pytest.mark.filterwarnings("ignore::flashmm.ConvergenceWarning")

FORMULA = "~ x + trt"
RTOL = 1e-12


@pytest.fixture(scope="module")
def study() -> tuple[pd.DataFrame, pd.DataFrame]:
    return simulate_study(n_genes=6, n_groups=10, cells_per_group=(20, 40), seed=7, n_loc=4)


def _fit(study, **kw):  # noqa: ANN001, ANN202
    data, Y = study
    return MultiGeneMixedLM.from_formula(FORMULA, data, endog=Y, **kw).fit()


def _population(res, data: pd.DataFrame) -> np.ndarray:  # noqa: ANN001
    b = res.fe_params
    return (b["Intercept"].to_numpy()[None] + data["x"].to_numpy()[:, None] * b["x"].to_numpy()
            + (data["trt"] == "B").to_numpy()[:, None] * b["trt[T.B]"].to_numpy())


def _lookup(frame: pd.DataFrame, labels) -> np.ndarray:  # noqa: ANN001
    """(cells, genes) effects of the given level labels."""
    return frame[list(labels)].to_numpy().T


def _direct(res, data: pd.DataFrame, kind: str) -> np.ndarray:  # noqa: ANN001
    re = res.random_effects
    out = _population(res, data)
    g = data["grp"].astype(str)
    if kind == "one component":
        out = out + _lookup(re["grp"], g)
    elif kind == "nested":
        out = out + _lookup(re["grp"], g + ":0") + _lookup(re["ct"], g + ":C(ct)[" + data["ct"] + "]")
    elif kind == "crossed":
        out = (out + _lookup(re["grp"], "C(grp)[" + g + "]")
               + _lookup(re["loc"], "C(loc)[" + data["loc"] + "]"))
    elif kind == "slopes":
        out = (out + _lookup(re["grp"], g + ":grp")
               + data["x"].to_numpy()[:, None] * _lookup(re["grp"], g + ":x"))
    return out


KINDS = {
    "one component": dict(groups="grp"),
    "nested": dict(groups="grp", vc_formula={"ct": "0 + C(ct)"}, re_formula="1"),
    "crossed": dict(groups=None, vc_formula={"grp": "0 + C(grp)", "loc": "0 + C(loc)"}),
    "slopes": dict(groups="grp", re_formula="~ 1 + x"),
}


def _close(a, b) -> None:  # noqa: ANN001
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.max(np.abs(b)))


@pytest.mark.parametrize("kind", list(KINDS))
def test_predict_is_xb_plus_zu(study, kind: str) -> None:
    data, Y = study
    res = _fit(study, **KINDS[kind])
    new = data.sample(frac=0.3, random_state=1)           # a shuffled subset of labelled cells
    pred = res.predict(new)
    assert list(pred.index) == list(new.index) and list(pred.columns) == list(Y.columns)
    _close(pred, _direct(res, new, kind))
    _close(res.predict(new, random_effects=False), _population(res, new))
    fitted = res.predict()                                  # the fitting cells
    _close(fitted, _direct(res, data, kind))
    _close(fitted.to_numpy()[data.index.get_indexer(new.index)], pred)


def test_genes_subset_and_single_gene(study) -> None:
    data, Y = study
    res = _fit(study, groups="grp")
    full = res.predict(data.iloc[:20])
    sub = res.predict(data.iloc[:20], genes=[Y.columns[3], Y.columns[1]])
    pd.testing.assert_frame_equal(sub, full[[Y.columns[3], Y.columns[1]]])
    pd.testing.assert_frame_equal(res.predict(data.iloc[:20], genes=2), full[[Y.columns[2]]])
    with pytest.raises(KeyError, match="nope"):
        res.predict(data.iloc[:5], genes=["nope"])


def test_unknown_levels(study) -> None:
    data, _ = study
    res = _fit(study, groups="grp", vc_formula={"ct": "0 + C(ct)"}, re_formula="1")
    new = data.iloc[:4].copy()
    new["grp"] = ["G01", "NEW1", "G02", "NEW2"]
    with pytest.raises(DesignError, match=r"\['NEW1:0', 'NEW2:0'\].*random_effects='known'"):
        res.predict(new)
    known = res.predict(new, random_effects="known").to_numpy()
    pop = res.predict(new, random_effects=False).to_numpy()
    _close(known[[1, 3]], pop[[1, 3]])                       # unknown group: population level
    _close(known[[0, 2]], _direct(res, new.iloc[[0, 2]], "nested"))
    ct = data.iloc[:2].copy()
    ct["ct"] = ["zz", "a"]                                   # a level unknown to the component
    with pytest.raises(DesignError, match="zz"):
        res.predict(ct)
    with pytest.raises(ValueError, match="random_effects"):
        res.predict(new, random_effects="yes")


def test_unknown_fixed_level_and_missing_columns(study) -> None:
    data, _ = study
    res = _fit(study, groups="grp")
    bad = data.iloc[:3].assign(trt=["A", "C", "B"])
    with pytest.raises(DesignError, match="levels seen in the fit"):
        res.predict(bad)
    with pytest.raises(DesignError, match="group of every new cell"):
        res.predict(data.drop(columns="grp").iloc[:3])
    pd.testing.assert_frame_equal(res.predict(data.drop(columns="grp").iloc[:3], random_effects=False),
                                  res.predict(data.iloc[:3], random_effects=False))
    groups = data["grp"].iloc[:3].to_numpy()[::-1]          # groups= overrides the column
    _close(res.predict(data.iloc[:3], groups=groups),
           _population(res, data.iloc[:3]) + _lookup(res.random_effects["grp"], groups))


def test_array_built_models(study) -> None:
    data, Y = study
    X = np.column_stack([np.ones(len(data)), data["x"], data["trt"] == "B"])
    names = ["Intercept", "x", "trt[T.B]"]
    res = MultiGeneMixedLM(Y, X, groups=data["grp"], exog_vc={"ct": data["ct"].to_numpy()},
                           exog_names=names).fit()
    new = np.arange(0, len(data), 5)
    pred = res.predict(X[new], data["grp"].to_numpy()[new], exog_vc={"ct": data["ct"].to_numpy()[new]})
    g = data["grp"].iloc[new]
    direct = (_population(res, data.iloc[new]) + _lookup(res.random_effects["ct"],
                                                         g + ":" + data["ct"].iloc[new]))
    _close(pred, direct)
    _close(res.predict().to_numpy()[new], direct)
    with pytest.raises(DesignError, match="variance component 'ct'"):
        res.predict(X[new], data["grp"].to_numpy()[new])
    with pytest.raises(DesignError, match="3 fixed-effect columns"):
        res.predict(X[new, :2])
    slopes = MultiGeneMixedLM(Y, X, groups=data["grp"], exog_re=X[:, :2], exog_names=names).fit()
    direct = (_population(slopes, data.iloc[new])
              + _lookup(slopes.random_effects["Group"], g + ":x_re1")
              + X[new, 1][:, None] * _lookup(slopes.random_effects["Group"], g + ":x_re2"))
    _close(slopes.predict(X[new], g.to_numpy(), exog_re=X[new, :2]), direct)


def test_known_covariance_blups_on_the_levels(study) -> None:
    data, Y = study
    levels = sorted(data["grp"].unique())
    rng = np.random.default_rng(2)
    A = rng.normal(size=(len(levels), 4))                   # rank 4 < 10 groups
    K = pd.DataFrame(A @ A.T, index=levels, columns=levels)
    X = np.column_stack([np.ones(len(data)), data["x"]])
    res = MultiGeneMixedLM(Y, X, groups=data["grp"], group_cov=K).fit()
    b = res.fe_params.to_numpy()
    direct = X @ b.T + _lookup(res.random_effects["Group"], data["grp"])
    _close(res.predict(X, data["grp"]), direct)
    _close(res.predict(), direct)


def test_population_level_against_statsmodels(study) -> None:
    """statsmodels' MixedLMResults.predict is X b: the designs of new cells must agree.

    flashmm's fe_params agree with statsmodels' to its optimiser's tolerance
    (1e-4 relative, see test_engine_statsmodels), so the predictions do; with
    statsmodels' own fe_params the two designs give the same numbers to round-off.
    """
    sm = pytest.importorskip("statsmodels.api")
    data, Y = study
    formula = "~ x + C(trt) + ct"
    res = MultiGeneMixedLM.from_formula(formula, data, endog=Y, groups="grp").fit()
    new = data.iloc[[3, 100, 7, 250]].assign(ct=["c", "a", "c", "b"])
    gene = Y.columns[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sm.MixedLM.from_formula("y " + formula, data.assign(y=Y[gene]), groups="grp").fit()
    sm_pred = np.asarray(fit.predict(new))
    ours = res.predict(new, random_effects=False, genes=[gene]).to_numpy()[:, 0]
    np.testing.assert_allclose(ours, sm_pred, rtol=1e-4, atol=1e-4 * np.max(np.abs(sm_pred)))
    columns = {"Intercept": np.ones(4), "x": new["x"], "C(trt)[T.B]": new["trt"] == "B",
               "ct[T.b]": new["ct"] == "b", "ct[T.c]": new["ct"] == "c"}
    X_new = np.column_stack([np.asarray(columns[n], dtype=float) for n in res.exog_names])
    _close(sm_pred, X_new @ fit.fe_params[res.exog_names].to_numpy())
    _close(ours, X_new @ res.fe_params.loc[gene].to_numpy())


def test_fitted_values_against_statsmodels(study) -> None:
    """With the BLUPs, the fitting cells' predictions are statsmodels' fittedvalues.

    Both are X b + Z u at the estimated variances; statsmodels' estimates agree
    with flashmm's to 1e-3 relative (see test_engine_statsmodels), so the fitted
    values agree to 1e-3 of the response's SD.
    """
    sm = pytest.importorskip("statsmodels.api")
    data, Y = study
    res = _fit(study, groups="grp")
    fitted = res.predict()
    for gene in Y.columns[:3]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = sm.MixedLM.from_formula("y " + FORMULA, data.assign(y=Y[gene]),
                                          groups="grp").fit()
        np.testing.assert_allclose(fitted[gene].to_numpy(), fit.fittedvalues.to_numpy(),
                                   atol=1e-3 * Y[gene].std())


def test_resid_for(study) -> None:
    data, Y = study
    counts = np.exp(Y).round(3)
    res = MultiGeneMixedLM.from_formula(FORMULA, data, endog=counts, groups="grp",
                                        transform="log1p").fit()
    genes = [Y.columns[4], Y.columns[0]]
    expected = np.log1p(counts[genes].to_numpy()) - res.predict(genes=genes).to_numpy()
    for endog in (counts, counts.to_numpy(), counts[genes].to_numpy()):
        r = res.resid_for(genes, endog)
        assert list(r.columns) == genes
        _close(r, expected)
    _close(res.resid_for(genes, np.log1p(counts), transform=False), expected)
    pop = res.resid_for(genes, counts, data, random_effects=False)
    _close(pop, np.log1p(counts[genes].to_numpy()) - _population(res, data)[:, [4, 0]])
    with pytest.raises(DesignError, match="columns"):
        res.resid_for(genes, counts.to_numpy()[:, :3])
    anndata = pytest.importorskip("anndata")
    adata = anndata.AnnData(X=counts.to_numpy(), obs=data.set_axis([f"c{i}" for i in range(len(data))]),
                            var=pd.DataFrame(index=[str(g) for g in counts.columns]))
    _close(res.resid_for(genes, adata), expected)
    for name in ("fittedvalues", "resid"):
        with pytest.raises(AttributeError, match="not materialised"):
            getattr(res, name)


def test_fitting_cells_need_the_design(study) -> None:
    res = _fit(study, groups="grp")
    stats = res.stats
    refit = MultiGeneMixedLM.from_sufficient_stats(SufficientStats(**{
        f: getattr(stats, f) for f in ("XX", "ZX", "ZZ", "n", "XY", "ZY", "yy", "exog_names",
                                       "components", "gene_names")})).fit()
    with pytest.raises(DesignError, match="no design in memory"):
        refit.predict()
    X = res.model.design.exog[:5]
    _close(refit.predict(X, study[0]["grp"][:5].to_numpy()), res.predict().iloc[:5])
