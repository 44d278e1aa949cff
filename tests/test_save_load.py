"""results.save / flashmm.load_results: exact round trips, damaged files, AnnData, designs.

Round trips are compared bitwise (``np.array_equal``): the reloaded results
derive every number from the same arrays by the same code, so any difference
is a bug, not round-off.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import simulate_study

import flashmm
from flashmm import DesignError, MultiGeneMixedLM, ResultsFileError, load_results

pytestmark = pytest.mark.filterwarnings("ignore::flashmm.ConvergenceWarning")

FORMULA = "~ x + trt"

MODELS = {
    "one component": dict(groups="grp"),
    "nested components": dict(groups="grp", vc_formula={"ct": "0 + C(ct)"}, re_formula="1"),
    "crossed components": dict(groups=None, vc_formula={"grp": "0 + C(grp)", "loc": "0 + C(loc)"}),
    "random slopes": dict(groups="grp", re_formula="~ 1 + x"),
    "independent slopes and a component": dict(groups="grp", re_formula="~ 1 + x",
                                               vc_formula={"ct": "0 + C(ct)"},
                                               independent_re=True),
}

TABLES = ["params", "fe_params", "bse", "bse_fe", "bse_re", "tvalues", "pvalues", "df_terms",
          "df_satterthwaite", "scale", "llf", "vcomp", "cov_re", "se_vcomp", "converged",
          "boundary", "status", "aic", "bic", "icc"]


@pytest.fixture(scope="module")
def study() -> tuple[pd.DataFrame, pd.DataFrame]:
    data, Y = simulate_study(n_genes=8, n_groups=10, cells_per_group=(20, 40), seed=4, n_loc=4)
    Y.iloc[:, 0] = 0.0                      # a gene that cannot be fitted (NaN estimates)
    return data, Y


def _fit(study, reml: bool = True, **kw):  # noqa: ANN001, ANN202
    data, Y = study
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MultiGeneMixedLM.from_formula(FORMULA, data, endog=Y, **kw).fit(reml=reml)


def _same(a, b) -> bool:  # noqa: ANN001
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fc":
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return np.array_equal(a, b)


def assert_same_results(r1, r2, data: pd.DataFrame) -> None:  # noqa: ANN001
    """Every table, test, ANOVA, mean, summary and prediction of r2 equals r1's exactly."""
    assert type(r1) is type(r2)
    assert list(r1.gene_names) == list(r2.gene_names)
    for name in TABLES:
        a, b = getattr(r1, name), getattr(r2, name)
        assert list(a.index) == list(b.index) and _same(a, b), name
    for name, frame in r1.random_effects.items():
        assert _same(frame, r2.random_effects[name]), name
    for name, frame in r1.random_effects_cov.items():
        assert _same(frame, r2.random_effects_cov[name]), name
    assert _same(r1.cov_params(), r2.cov_params())
    pd.testing.assert_frame_equal(r1.conf_int(), r2.conf_int())
    pd.testing.assert_frame_equal(r1.conf_int(0.1, "residual"), r2.conf_int(0.1, "residual"))
    contrast = {"trt": "trt[T.B]", "x_minus_trt": "x - trt[T.B]"}
    pd.testing.assert_frame_equal(r1.t_test(contrast).summary_frame(),
                                  r2.t_test(contrast).summary_frame())
    pd.testing.assert_frame_equal(r1.wald_test(["x", "trt[T.B]"]), r2.wald_test(["x", "trt[T.B]"]))
    assert str(r1.summary()) == str(r2.summary())
    for kind in (1, 2, 3):
        pd.testing.assert_frame_equal(r1.anova(type=kind), r2.anova(type=kind))
    pd.testing.assert_frame_equal(r1.ls_means("trt"), r2.ls_means("trt"))
    pd.testing.assert_frame_equal(r1.ls_means("trt", pairwise=True),
                                  r2.ls_means("trt", pairwise=True))
    for g in (1, r1.gene_names[3]):
        assert str(r1.gene(g).summary()) == str(r2.gene(g).summary())
        assert _same(r1.gene(g).params, r2.gene(g).params)
    pd.testing.assert_frame_equal(r1.predict(data), r2.predict(data))
    pd.testing.assert_frame_equal(r1.predict(data.iloc[::7], random_effects=False),
                                  r2.predict(data.iloc[::7], random_effects=False))


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("kind", list(MODELS))
def test_round_trip_is_exact(study, kind: str, reml: bool, tmp_path: Path) -> None:
    res = _fit(study, reml=reml, **MODELS[kind])
    path = tmp_path / "res.npz"
    res.save(path)
    back = load_results(path)
    assert back.reml == reml and back.df_method == res.df_method
    assert_same_results(res, back, study[0])
    if kind != "one component":
        assert _same(res.theta, back.theta)


def test_round_trip_of_array_built_and_special_fits(study, tmp_path: Path) -> None:
    """Array-built, kinship (known covariance) and FLASHMM's scoring fits round trip too."""
    data, Y = study
    X = np.column_stack([np.ones(len(data)), data["x"]])
    groups = data["grp"].to_numpy()
    levels = sorted(set(groups))
    rng = np.random.default_rng(1)
    A = rng.normal(size=(len(levels), len(levels)))
    K = pd.DataFrame(A @ A.T / len(levels) + np.eye(len(levels)), index=levels, columns=levels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits = [MultiGeneMixedLM(Y, X, groups=groups).fit(df_method="residual"),
                MultiGeneMixedLM(Y, X, groups=groups, group_cov=K).fit(),
                MultiGeneMixedLM(Y, X, groups=groups).fit(allow_negative_variance=True)]
    for i, res in enumerate(fits):
        res.save(tmp_path / f"r{i}.npz")
        back = load_results(tmp_path / f"r{i}.npz")
        assert back.df_method == res.df_method and back.optimizer == res.optimizer
        for name in TABLES:
            assert _same(getattr(res, name), getattr(back, name)), (i, name)
        for name, frame in res.random_effects.items():
            assert _same(frame, back.random_effects[name]), (i, name)
        pd.testing.assert_frame_equal(res.predict(X[:40], groups[:40]),
                                      back.predict(X[:40], groups[:40]))
        assert str(res.summary()) == str(back.summary())


def test_file_is_npz_without_pickle_with_json_metadata(study, tmp_path: Path) -> None:
    res = _fit(study, **MODELS["random slopes"])
    res.save(tmp_path / "r.npz")
    with np.load(tmp_path / "r.npz", allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)
        meta = json.loads(str(f["meta"]))
        assert sorted(k for k in f.files if k != "meta") == meta["arrays"]
    assert meta["format"] == "flashmm-results" and meta["version"] == 1
    assert meta["engine"] == "structured" and meta["design"]["re_formula"] == "~ 1 + x"
    assert meta["design"]["variables"]["trt"] == {"kind": "categorical", "levels": ["A", "B"]}


# ------------------------------------------------------------ bad files
def _rewrite(path: Path, out: Path, change) -> None:  # noqa: ANN001
    with np.load(path, allow_pickle=False) as f:
        contents = {k: f[k] for k in f.files}
    meta = json.loads(str(contents.pop("meta")))
    meta, contents = change(meta, contents)
    np.savez(out, meta=np.array(json.dumps(meta)), **contents)


@pytest.fixture(scope="module")
def saved(study, tmp_path_factory) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("saved") / "res.npz"
    _fit(study, **MODELS["nested components"]).save(path)
    return path


def _bump_value(meta, contents):  # noqa: ANN001, ANN202
    contents["fit_theta"] = contents["fit_theta"].copy()
    contents["fit_theta"][2, 0] = np.nextafter(contents["fit_theta"][2, 0], 1.0)
    return meta, contents


def _edit_meta(meta, contents):  # noqa: ANN001, ANN202
    meta["df_method"] = "residual"
    return meta, contents


def _drop_array(meta, contents):  # noqa: ANN001, ANN202
    contents.pop("stats_ZY")
    return meta, contents


def _add_array(meta, contents):  # noqa: ANN001, ANN202
    contents["extra"] = np.zeros(3)
    return meta, contents


def _new_version(meta, contents):  # noqa: ANN001, ANN202
    meta["version"] = 99
    return meta, contents


@pytest.mark.parametrize("change, match", [
    (_bump_value, "checksum"), (_edit_meta, "checksum"), (_drop_array, r"lacks the arrays \['stats_ZY'\]"),
    (_add_array, "does not list"), (_new_version, "format version 99"),
])
def test_modified_file_is_refused(saved: Path, tmp_path: Path, change, match: str) -> None:  # noqa: ANN001
    out = tmp_path / "bad.npz"
    _rewrite(saved, out, change)
    with pytest.raises(ResultsFileError, match=match):
        load_results(out)


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_file_is_refused(saved: Path, tmp_path: Path, keep: float) -> None:
    raw = saved.read_bytes()
    out = tmp_path / "cut.npz"
    out.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ResultsFileError, match="not a readable .npz"):
        load_results(out)


def test_other_files_are_refused(study, tmp_path: Path) -> None:
    res = _fit(study, **MODELS["one component"])
    res.stats.save(tmp_path / "stats.npz")
    with pytest.raises(ResultsFileError, match="SufficientStats.load"):
        load_results(tmp_path / "stats.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(ResultsFileError, match="no metadata"):
        load_results(tmp_path / "plain.npz")
    with zipfile.ZipFile(tmp_path / "junk.npz", "w") as z:
        z.writestr("meta.npy", b"not an array")
    with pytest.raises(ResultsFileError):
        load_results(tmp_path / "junk.npz")


# ---------------------------------------------------------------- designs
def test_numeric_factor_and_categorical_levels_are_rebuilt(study, tmp_path: Path) -> None:
    """C(batch) of an integer column, and a pandas categorical with an unused category."""
    data, Y = study
    data = data.assign(batch=np.arange(len(data)) % 3 + 1,
                       ctc=pd.Categorical(data["ct"], categories=["c", "b", "a", "z"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # the all-zero column of level "z"
        res = MultiGeneMixedLM.from_formula("~ x + C(batch) + ctc", data, endog=Y,
                                            groups="grp").fit()
    res.save(tmp_path / "r.npz")
    back = load_results(tmp_path / "r.npz")
    new = data.iloc[[5, 1, 200, 3]]
    pd.testing.assert_frame_equal(res.predict(new), back.predict(new))
    assert "ctc[T.z]" not in res.exog_names            # dropped at the fit, ignored here


def test_stateful_transform_is_refused_at_save(study, tmp_path: Path) -> None:
    data, Y = study
    res = MultiGeneMixedLM.from_formula("~ center(x) + trt", data, endog=Y, groups="grp").fit()
    with pytest.raises(DesignError, match="stateful transform"):
        res.save(tmp_path / "r.npz")
    assert not (tmp_path / "r.npz").exists()
    res.save(tmp_path / "r.npz", design=False)             # no formula: predictions from arrays
    back = load_results(tmp_path / "r.npz")
    assert back.model.formula_spec is None
    X = res.model.design.exog[:30]
    pd.testing.assert_frame_equal(res.predict(X, data["grp"][:30].to_numpy()),
                                  back.predict(X, data["grp"][:30].to_numpy()))


def test_numpy_functions_in_formulas_are_rebuilt(study, tmp_path: Path) -> None:
    data, Y = study
    res = MultiGeneMixedLM.from_formula("~ np.exp(x) + np.log(x + 10) + I(x ** 2)", data,
                                        endog=Y, groups="grp").fit()
    res.save(tmp_path / "r.npz")
    back = load_results(tmp_path / "r.npz")
    pd.testing.assert_frame_equal(res.predict(data.iloc[:9]), back.predict(data.iloc[:9]))


def test_reloaded_results_need_new_cells_to_predict(saved: Path) -> None:
    with pytest.raises(DesignError, match="no design in memory"):
        load_results(saved).predict()


# ---------------------------------------------------------------- AnnData
def test_anndata_results_reload_when_written_reloadable(study, tmp_path: Path) -> None:
    anndata = pytest.importorskip("anndata")
    data, Y = study
    obs = data.set_axis([f"c{i}" for i in range(len(data))])
    adata = anndata.AnnData(X=Y.to_numpy(), obs=obs,
                            var=pd.DataFrame(index=[str(g) for g in Y.columns]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = MultiGeneMixedLM.from_formula(FORMULA, adata, groups="grp",
                                            re_formula="~ 1 + x").fit()
    flashmm.write_results(adata, res)
    with pytest.raises(ResultsFileError, match=r"reloadable=True.*results.save"):
        load_results(adata)
    flashmm.write_results(adata, res, overwrite=True, reloadable=True)
    adata.write_h5ad(tmp_path / "a.h5ad")
    for source in (adata, tmp_path / "a.h5ad", anndata.read_h5ad(tmp_path / "a.h5ad")):
        assert_same_results(res, load_results(source), adata.obs)
    with pytest.raises(ResultsFileError, match="no flashmm results under key 'other'"):
        load_results(adata, key="other")
