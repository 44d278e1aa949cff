"""The method-comparison harness (flashmm.compare): scores, reproducibility, registry, CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

anndata = pytest.importorskip("anndata")

import flashmm  # noqa: E402
import flashmm.compare as fc  # noqa: E402
from flashmm.cli import main  # noqa: E402

#: A small design: a study simulates and runs every method in well under a second.
SMALL = fc.SimulationDesign(n_per_arm=3, n_genes=150, cells_per_donor=30)
FAST = ["cells_lmm", "pb_voom"]
TIMING = ["seconds", "peak_mib", "seconds_traced", "warnings"]


# ------------------------------------------------------------------ scores
def _handmade() -> tuple[np.ndarray, np.ndarray]:
    """111 genes whose scores follow from the construction (see the test).

    10 DE genes: 8 with p = 1e-6 .. 8e-6, two with p = 0.995 and 0.999.
    101 null genes: one with p = 1e-7, and p = (k - 0.25) / 100 for k = 1..100.
    """
    p = np.r_[1e-6 * np.arange(1, 9), 0.995, 0.999, 1e-7, (np.arange(1, 101) - 0.25) / 100]
    de = np.r_[np.ones(10, bool), np.zeros(101, bool)]
    return p, de


def test_scores_of_a_handmade_case():
    p, de = _handmade()
    s = fc.score_pvalues(p, de)
    # null p < 0.05: the 1e-7 gene and k = 1..5; < 0.01: 1e-7 and 0.0075; < 0.001: 1e-7
    assert s["type1_0.05"] == pytest.approx(6 / 101)
    assert s["type1_0.01"] == pytest.approx(2 / 101)
    assert s["type1_0.001"] == pytest.approx(1 / 101)
    # BH at 0.05: the 9 smallest (q ~ 1e-4); the next, 0.0075, has q = 0.0075 * 111 / 10 > 0.05
    # and (k - 0.25) / 100 * 111 / (9 + k) > 0.05 for every k >= 1
    assert s["discoveries"] == 9
    assert s["power"] == pytest.approx(8 / 10)
    assert s["fdp"] == pytest.approx(1 / 9)
    # DE-null pairs won: 8 small DE beat 100 nulls; 0.995 beats the null 0.9975; 0.999 none
    assert s["auc"] == pytest.approx(801 / 1010)
    # every cut-off calls the 1e-7 null first: the best FDP is 1/9 (top 9)
    assert s["power_at_fdp"] == 0.0
    assert fc.power_at_fdp(p, de, 0.12) == pytest.approx(0.8)
    assert fc.power_at_fdp(p, de, 0.2) == pytest.approx(0.8)  # top 10: FDP 2/10, power 0.8
    assert s["n_failed"] == 0


def test_scores_with_untested_genes_and_ties():
    p, de = _handmade()
    p = np.r_[p, np.nan, np.nan]                       # one DE and one null gene not tested
    de = np.r_[de, True, False]
    s = fc.score_pvalues(p, de)
    assert s["n_failed"] == 2
    assert s["type1_0.05"] == pytest.approx(6 / 101)   # among the tested null genes
    assert s["power"] == pytest.approx(8 / 11)         # out of all DE genes
    # NaN ranks last: the 10 tested DE genes beat the untested null, the two NaNs tie (1/2)
    assert s["auc"] == pytest.approx((801 + 10 + 0.5) / (11 * 102))
    # a tied DE and null gene are called together: FDP 1/2, then 1/3 (power 1), then 1/2
    tie_p, tie_de = np.array([0.01, 0.01, 0.5, 0.6]), np.array([True, False, True, False])
    assert fc.power_at_fdp(tie_p, tie_de, 0.3) == 0.0
    assert fc.power_at_fdp(tie_p, tie_de, 0.4) == 1.0


def test_scores_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="one length"):
        fc.score_pvalues(np.ones(3), np.ones(4, bool))


def test_power_fdp_curve_is_the_envelope_of_power_at_fdp():
    p, de = _handmade()
    frame = pd.DataFrame({"design": "d", "dataset": 0, "method": "m", "label": "m",
                          "pvalue": p, "is_de": de})
    curve = fc.power_fdp_curve(frame, grid=[0.05, 0.12, 0.2, 1.0])
    assert curve["power"].tolist() == pytest.approx([0.0, 0.8, 0.8, 1.0])


# ------------------------------------------------------------------ studies
def test_simulated_study_has_the_truth_and_design():
    study = SMALL.simulate(seed=1)
    assert study.counts.obs[fc.DONOR].nunique() == 6
    assert set(study.counts.obs[fc.TREATED]) == {0.0, 1.0}
    assert study.has_celltypes and study.tests == ["C1", "C2"]
    assert study.formula == "~ C(celltype) + treated_1 + treated_2"
    assert study.is_de.dtype == bool and study.is_de.shape == (len(study.genes), 2)
    # each simulated DE gene is DE in its one cell type
    assert study.is_de.sum(axis=1).max() == 1 and study.is_de.sum() > 0
    obs = study.counts.obs
    np.testing.assert_array_equal(obs["treated_2"], obs["treated"] * (obs["celltype"] == "C2"))
    assert np.all(np.asarray(study.counts.X.sum(axis=0)).ravel() >= SMALL.min_counts)


def test_study_from_anndata_aligns_the_truth_by_gene():
    ad = SMALL.simulate(seed=2).counts
    ad = anndata.AnnData(X=ad.X, obs=pd.DataFrame({"who": ad.obs["donor"].to_numpy(),
                                                   "arm": np.where(ad.obs["treated"] > 0, "tx", "ct")},
                                                  index=ad.obs_names), var=ad.var)
    truth = pd.Series(np.arange(ad.n_vars) % 7 == 0, index=ad.var_names)
    study = fc.Study.from_anndata(ad, truth.sample(frac=1.0, random_state=0), condition="arm",
                                  sample="who", treated="tx", min_counts=0)
    np.testing.assert_array_equal(study.is_de[:, 0], truth.to_numpy())
    assert (study.reference, study.treated) == ("ct", "tx") and study.terms == ["treated"]
    # with cell types: a truth per cell type, or one per gene for every cell type
    ad.obs["kind"] = np.where(np.arange(ad.n_obs) % 2, "b", "a")
    per_type = pd.DataFrame({"a": truth.to_numpy(), "b": ~truth.to_numpy()}, index=ad.var_names)
    study = fc.Study.from_anndata(ad, per_type, condition="arm", sample="who", celltype="kind",
                                  min_counts=0)
    np.testing.assert_array_equal(study.is_de, per_type.to_numpy())
    study = fc.Study.from_anndata(ad, truth, condition="arm", sample="who", celltype="kind",
                                  min_counts=0)
    np.testing.assert_array_equal(study.is_de, np.column_stack([truth, truth]))
    with pytest.raises(flashmm.DataError, match=r"no column for cell type\(s\) \['b'\]"):
        fc.Study.from_anndata(ad, per_type[["a"]], condition="arm", sample="who", celltype="kind")
    with pytest.raises(flashmm.DataError, match="lacks 1 gene"):
        fc.Study.from_anndata(ad, truth.iloc[1:], condition="arm", sample="who")
    with pytest.raises(flashmm.DataError, match="not a column"):
        fc.Study.from_anndata(ad, truth, condition="trt", sample="who")
    ad.obs["arm3"] = np.r_[["x"] * 10, ad.obs["arm"].to_numpy()[10:]]
    with pytest.raises(flashmm.DataError, match="3 levels"):
        fc.Study.from_anndata(ad, truth, condition="arm3", sample="who")


# ----------------------------------------------------------- reproducibility
def _scores(res: fc.Comparison) -> pd.DataFrame:
    return res.table.drop(columns=[c for c in TIMING if c in res.table])


def test_same_seed_same_table_and_pvalues():
    a = fc.run_studies(SMALL, 2, FAST, seed=5)
    b = fc.run_studies(SMALL, 2, FAST, seed=5)
    pd.testing.assert_frame_equal(_scores(a), _scores(b))
    pd.testing.assert_frame_equal(a.pvalues, b.pvalues)
    c = fc.run_studies(SMALL, 2, FAST, seed=6)
    assert not np.allclose(a.table["auc"], c.table["auc"])
    # dataset j is design.simulate([seed, j]), alone
    one = fc.compare(SMALL.simulate([5, 1]), FAST, design=SMALL.label, dataset=1)
    got = a.pvalues[a.pvalues["dataset"] == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, one.pvalues)


def test_parallel_processes_give_the_serial_results():
    designs = [SMALL, fc.SimulationDesign(n_per_arm=4, n_genes=150, cells_per_donor=30)]
    serial = fc.run_studies(designs, 2, FAST, seed=11)
    parallel = fc.run_studies(designs, 2, FAST, seed=11, workers=2)
    pd.testing.assert_frame_equal(_scores(serial), _scores(parallel))
    pd.testing.assert_frame_equal(serial.pvalues, parallel.pvalues)
    assert serial.table["design"].unique().tolist() == ["3 vs 3", "4 vs 4"]


def test_dask_client_gives_the_serial_results():
    distributed = pytest.importorskip("distributed")
    serial = fc.run_studies(SMALL, 2, ["pb_voom"], seed=4, memory=False)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1,
                            dashboard_address=":0") as client:
        on_dask = fc.run_studies(SMALL, 2, ["pb_voom"], seed=4, memory=False, client=client)
    pd.testing.assert_frame_equal(_scores(serial), _scores(on_dask))


def test_table_columns_and_summary():
    res = fc.run_studies(SMALL, 2, FAST, seed=1)
    t = res.table
    assert len(t) == 4 and t["method"].tolist() == FAST * 2
    for col in ("type1_0.05", "type1_0.01", "type1_0.001", "power", "fdp", "power_at_fdp", "auc",
                "seconds", "peak_mib", "n_failed", "info_median_df"):
        assert col in t.columns, col
    assert (t["peak_mib"] > 0).all() and (t["seconds"] > 0).all()
    s = res.summary()
    assert s["datasets"].tolist() == [2, 2]
    assert s.loc[0, "power"] == pytest.approx(t.loc[t["method"] == "cells_lmm", "power"].mean())
    # the per-gene p-values behind the table
    p = res.pvalues
    assert len(p) == t["n_tests"].sum() == 2 * t["n_genes"].sum()
    first = p[(p["dataset"] == 0) & (p["method"] == "cells_lmm")]
    assert fc.score_pvalues(first["pvalue"], first["is_de"])["auc"] == pytest.approx(t.loc[0, "auc"])


# ------------------------------------------------------------------ registry
@pytest.fixture
def fake_methods():
    names = []

    def add(name, **kw):
        fc.register_method(name, f"test {name}", lambda s: np.full(len(s.genes), 0.5), **kw)
        names.append(name)

    yield add
    for n in names:
        fc._REGISTRY.pop(n, None)


def test_unknown_and_unavailable_methods_are_refused(fake_methods):
    study = SMALL.simulate(seed=3)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        fc.compare(study, ["cells_lmm", "nope"])
    fake_methods("needs_x", requires=lambda: "needs flashmm.x, which this version lacks")
    assert "needs_x" not in fc.available_methods()
    assert not fc.methods_table().loc["needs_x", "available"]
    with pytest.raises(ValueError, match="'needs_x'.*not available.*needs flashmm.x"):
        fc.compare(study, ["needs_x"])
    with pytest.raises(ValueError, match="not available"):
        fc.run_studies(SMALL, 1, ["needs_x"])
    # the default set leaves unavailable methods out
    assert "needs_x" not in [m.name for m in fc._resolve_methods(None, study)]
    with pytest.raises(ValueError, match="already registered"):
        fc.register_method("cells_lmm", "again", lambda s: None)


def test_kenward_roger_method_runs_on_the_same_study():
    study = SMALL.simulate(seed=2)
    cmp = fc.compare(study, ["cells_lmm", "cells_lmm_kr"])
    p = cmp.pvalues.pivot_table(index=["gene", "test"], columns="method", values="pvalue")
    sat, kr = p["cells_lmm"].to_numpy(), p["cells_lmm_kr"].to_numpy()
    assert np.all((kr > 0) & (kr <= 1))
    # balanced donors: KR equals Satterthwaite away from the boundary, never both identical
    assert np.median(np.abs(kr - sat)) < 1e-3 and not np.array_equal(kr, sat)


def test_dream_method_runs_on_the_same_study():
    # pseudobulk dream: the weighted LMM on voom_with_dream_weights (tests/test_weighted_lmm.py
    # checks it against lmer); here it runs in the harness and tests every gene
    study = SMALL.simulate(seed=3)
    cmp = fc.compare(study, ["pb_voom_dupcor", "pb_dream"])
    p = cmp.pvalues.pivot_table(index=["gene", "test"], columns="method", values="pvalue")
    dream = p["pb_dream"].to_numpy()
    assert np.isfinite(dream).mean() > 0.95 and np.all((dream[np.isfinite(dream)] > 0)
                                                       & (dream[np.isfinite(dream)] <= 1))
    ok = np.isfinite(dream)
    assert np.corrcoef(np.log(dream[ok]), np.log(p["pb_voom_dupcor"].to_numpy()[ok]))[0, 1] > 0.8


def test_method_that_does_not_apply(fake_methods):
    one_type = fc.SimulationDesign(n_per_arm=3, n_genes=120, cells_per_donor=30, n_celltypes=1)
    study = one_type.simulate(seed=1)
    assert not study.has_celltypes
    with pytest.raises(ValueError, match="does not apply.*one sample per donor"):
        fc.compare(study, ["pb_voom_dupcor"])
    fake_methods("fake_ok")
    with pytest.warns(UserWarning, match="pb_voom_dupcor"):
        names = [m.name for m in fc._resolve_methods(None, study)]
    assert "pb_voom_dupcor" not in names and "fake_ok" in names


def test_bad_run_options():
    with pytest.raises(ValueError, match="n_datasets"):
        fc.run_studies(SMALL, 0, FAST)
    with pytest.raises(ValueError, match="same label"):
        fc.run_studies([SMALL, SMALL], 1, FAST)


# ------------------------------------------------------------------ plots, CLI
def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from flashmm.plot import calibration_qq, power_fdp

    res = fc.run_studies([SMALL, fc.SimulationDesign(n_per_arm=4, n_genes=150,
                                                     cells_per_donor=30)], 1, FAST, seed=2)
    with pytest.raises(ValueError, match="several designs"):
        calibration_qq(res)
    ax = calibration_qq(res, design="3 vs 3")
    assert len(ax.collections) == 3                 # two methods and the band
    ax = power_fdp(res, design="4 vs 4", methods=["pb_voom"])
    assert len(ax.lines) == 3                       # curve, BH marker, FDR line
    with pytest.raises(ValueError, match="not in the results"):
        power_fdp(res, design="4 vs 4", methods=["nope"])


def test_cli_compare(tmp_path, capsys):
    out, qq, pw = tmp_path / "t.csv", tmp_path / "qq.png", tmp_path / "pw.png"
    code = main(["compare", "--per-arm", "3", "--genes", "150", "--cells-per-donor", "30",
                 "--datasets", "1", "--methods", *FAST, "--out", str(out), "--seed", "2",
                 "--pvalues-out", str(tmp_path / "p.csv"), "--qq-plot", str(qq),
                 "--power-plot", str(pw)])
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out)
    expected = fc.run_studies(SMALL, 1, FAST, seed=2).table
    np.testing.assert_allclose(table["auc"], expected["auc"], rtol=1e-12)
    assert qq.stat().st_size > 0 and pw.stat().st_size > 0
    assert "cells_lmm" in capsys.readouterr().out
    assert main(["compare", "--methods", "nope", "--out", str(out)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["compare", "--list-methods"]) == 0
    assert "pb_voom_dupcor" in capsys.readouterr().out
