"""Bad input: clear errors raised early, and flagged (never silently wrong) results.

Every error test checks the exception class (flashmm's DesignError, DataError,
StatsError or another ValueError subclass) and that the message names the
offending input and says what to do.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import simulate_study

import flashmm
from flashmm import (
    ConvergenceWarning,
    DataError,
    DesignError,
    MultiGeneMixedLM,
    StatsError,
    SufficientStats,
)
from flashmm._design import build_design, check_full_rank
from flashmm._endog import make_names_unique


# ---------------------------------------------------------------- fixtures
def make_data(n_sam: int = 8, cells: int = 15, genes: int = 6, seed: int = 0):
    """Cells with a cell type, a treatment (samples nested in it) and genes."""
    rng = np.random.default_rng(seed)
    sam = np.repeat(np.arange(n_sam), cells)
    n = sam.size
    trt = np.where(sam < n_sam // 2, "A", "B")
    cls = rng.choice(["c1", "c2", "c3"], size=n)
    data = pd.DataFrame({"sam": [f"s{i}" for i in sam], "trt": trt, "cls": cls,
                         "x": rng.normal(size=n)})
    Y = (rng.normal(size=(n, genes)) + rng.normal(size=(n_sam, genes))[sam]
         + 0.3 * data["x"].to_numpy()[:, None])
    return data, Y


def simple_inputs(seed: int = 0):
    data, Y = make_data(seed=seed)
    X = np.column_stack([np.ones(len(data)), data["x"].to_numpy()])
    return Y, X, data["sam"].to_numpy(), data


def fit_quiet(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(**kw)


# ------------------------------------------------------- orientation, lengths
@pytest.mark.parametrize("kind", ["ndarray", "sparse", "dataframe"])
def test_transposed_endog(kind):
    Y, X, groups, _ = simple_inputs()
    Yt = Y.T
    if kind == "sparse":
        Yt = sp.csr_matrix(Yt)
    elif kind == "dataframe":
        Yt = pd.DataFrame(Yt)
    with pytest.raises(DataError, match=r"genes x cells.*endog\.T"):
        MultiGeneMixedLM(Yt, X, groups=groups)


def test_transposed_endog_from_formula():
    data, Y = make_data()
    with pytest.raises(DataError, match=r"genes x cells.*endog\.T"):
        MultiGeneMixedLM.from_formula("~ x", data, endog=sp.csc_matrix(Y.T), groups="sam")


def test_mismatched_lengths():
    Y, X, groups, data = simple_inputs()
    with pytest.raises(DataError, match=r"endog has \d+ rows but the design has \d+ cells"):
        MultiGeneMixedLM(Y[:-3], X, groups=groups)
    with pytest.raises(DesignError, match=r"groups has \d+ entries but there are \d+ cells"):
        MultiGeneMixedLM(Y, X, groups=groups[:-1])
    with pytest.raises(DesignError, match=r"exog_vc\['b'\] has \d+ entries"):
        MultiGeneMixedLM(Y, X, exog_vc={"a": groups, "b": groups[1:]})
    with pytest.raises(DataError, match=r"endog has \d+ rows but the design has \d+ cells"):
        MultiGeneMixedLM.from_formula("~ x", data.iloc[:-2], endog=Y, groups="sam")
    with pytest.raises(DesignError, match=r"groups has \d+ entries"):
        MultiGeneMixedLM.from_formula("~ x", data, endog=Y, groups=data["sam"].to_numpy()[:-1])


# ---------------------------------------------------------------- missing
def test_nan_inf_in_exog_groups_formula_raise():
    Y, X, groups, data = simple_inputs()
    Xb = X.copy()
    Xb[3, 1] = np.inf
    with pytest.raises(DesignError,
                       match=r"exog contains NaN or inf in column\(s\) \['x2'\].*missing='drop'"):
        MultiGeneMixedLM(Y, Xb, groups=groups)
    gb = groups.astype(object)
    gb[5] = None
    with pytest.raises(DesignError, match=r"groups contains 1 missing labels.*missing='drop'"):
        MultiGeneMixedLM(Y, X, groups=gb)
    gf = pd.factorize(groups)[0].astype(float)
    gf[0] = np.nan
    with pytest.raises(DesignError, match=r"groups contains 1 missing \(NaN\).*missing='drop'"):
        MultiGeneMixedLM(Y, X, groups=gf)
    d = data.copy()
    d.loc[4, "x"] = np.nan
    with pytest.raises(DesignError, match=r"formula 'x'.*missing values.*missing='drop'"):
        MultiGeneMixedLM.from_formula("~ x", d, endog=Y, groups="sam")
    d = data.copy()
    d.loc[4, "x"] = np.inf
    with pytest.raises(DesignError, match=r"NaN or inf.*\['x'\].*missing='drop'"):
        MultiGeneMixedLM.from_formula("~ x", d, endog=Y, groups="sam")


def test_missing_drop_arrays_matches_manual_subset():
    Y, X, groups, _ = simple_inputs()
    Xb, gb, Yb = X.copy(), groups.astype(object), Y.copy()
    Xb[3, 1] = np.nan
    Xb[7, 1] = -np.inf
    gb[10] = None
    Yb[20, 2] = np.nan
    Yb[21, 0] = np.inf
    bad = np.zeros(len(Y), dtype=bool)
    bad[[3, 7, 10, 20, 21]] = True
    with pytest.warns(UserWarning, match=r"dropped 5 of 120 cells") as rec:
        model = MultiGeneMixedLM(Yb, Xb, groups=gb, missing="drop")
    assert len([w for w in rec if "dropped" in str(w.message)]) == 1
    assert model.n_dropped == 5 and model.stats.info["n_dropped"] == 5
    ref = MultiGeneMixedLM(Y[~bad], X[~bad], groups=groups[~bad])
    assert model.nobs == ref.nobs == 115
    np.testing.assert_allclose(model.stats.XY, ref.stats.XY, rtol=1e-13)
    np.testing.assert_allclose(model.stats.yy, ref.stats.yy, rtol=1e-13)
    # sparse endog and an exog_vc block with NaN labels drop the same way
    vc = pd.factorize(groups)[0].astype(float)
    vc[10] = np.nan
    Ys = sp.csr_matrix(np.where(np.isfinite(Yb), Yb, 0.0))
    Ys.data[:] = Ys.data  # keep structure
    Ys = Ys.tolil()
    Ys[20, 2] = np.nan
    Ys[21, 0] = np.inf
    with pytest.warns(UserWarning, match=r"dropped 5 of 120"):
        m2 = MultiGeneMixedLM(Ys.tocsr(), Xb, exog_vc={"s": vc}, missing="drop")
    assert m2.n_dropped == 5 and m2.nobs == 115


def test_missing_drop_formula():
    data, Y = make_data()
    d = data.copy()
    d.loc[4, "x"] = np.nan
    d.loc[9, "x"] = np.inf
    d.loc[11, "cls"] = None
    d.loc[30, "sam"] = None
    Yb = Y.copy()
    Yb[50, 1] = np.nan
    with pytest.warns(UserWarning, match=r"dropped 5 of 120 cells"):
        model = MultiGeneMixedLM.from_formula("~ x + cls", d, endog=Yb, groups="sam",
                                              missing="drop")
    assert model.n_dropped == 5 and model.stats.info["n_dropped"] == 5
    keep = np.setdiff1d(np.arange(len(d)), [4, 9, 11, 30, 50])
    ref = MultiGeneMixedLM.from_formula("~ x + cls", data.iloc[keep], endog=Y[keep], groups="sam")
    np.testing.assert_allclose(model.stats.XY, ref.stats.XY, rtol=1e-13)
    np.testing.assert_allclose(model.stats.ZY, ref.stats.ZY, rtol=1e-13)
    r1, r2 = fit_quiet(model), fit_quiet(ref)
    np.testing.assert_allclose(r1.fe_params, r2.fe_params, rtol=1e-10)
    # nothing to drop: no warning, n_dropped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m0 = MultiGeneMixedLM.from_formula("~ x", data, endog=Y, groups="sam", missing="drop")
    assert m0.n_dropped == 0
    with pytest.raises(DesignError, match=r"missing must be one of"):
        MultiGeneMixedLM.from_formula("~ x", data, endog=Y, groups="sam", missing="skip")


def test_nan_in_endog():
    Y, X, groups, _ = simple_inputs()
    Y = Y.copy()
    Y[5, 3] = np.nan
    with pytest.raises(DataError, match=r"NaN or inf.*missing='drop'.*'gene3'"):
        MultiGeneMixedLM(Y, X, groups=groups)
    Ys = sp.csr_matrix(np.abs(Y))
    with pytest.raises(DataError, match=r"NaN or inf.*'g3'"):
        MultiGeneMixedLM(Ys, X, groups=groups, gene_names=[f"g{i}" for i in range(6)])



@pytest.mark.parametrize("kind", ["dataframe", "ndarray", "formula"])
def test_string_in_endog_names_gene_and_value(kind):
    Y, X, groups, data = simple_inputs()
    frame = pd.DataFrame(Y, columns=[f"g{i}" for i in range(6)]).astype(object)
    frame.iloc[7, 4] = "high"
    with pytest.raises(DataError, match=r"numeric: gene 'g4' has the value 'high' in cell \(row\) 7"):
        if kind == "dataframe":
            MultiGeneMixedLM(frame, X, groups=groups)
        elif kind == "ndarray":
            MultiGeneMixedLM(frame.to_numpy(), X, groups=groups, gene_names=list(frame.columns))
        else:
            MultiGeneMixedLM.from_formula("~ x", data, endog=frame, groups="sam", chunk_size=5)

# --------------------------------------------------------------- rank
def test_rank_deficient_nested_treatment():
    data, Y = make_data()
    with pytest.raises(DesignError, match=r"rank deficient.*\['C\((trt|sam)\)\[T\..*linear combinations"):
        MultiGeneMixedLM.from_formula("~ cls + C(trt) + C(sam)", data, endog=Y,
                                      vc_formula={"s": "0 + C(sam)"})


def test_rank_deficient_duplicated_column():
    Y, X, groups, _ = simple_inputs()
    X3 = np.column_stack([X, 2 * X[:, 1]])
    with pytest.raises(DesignError, match=r"rank deficient \(rank 2 < 3 columns\).*'(b|c)'"):
        MultiGeneMixedLM(Y, X3, groups=groups, exog_names=["a", "b", "c"])
    with pytest.raises(DesignError, match=r"all zero"):
        check_full_rank(np.column_stack([X, np.zeros(len(X))]), ["a", "b", "z"])


def test_empty_factor_levels_are_dropped_with_warning():
    data, Y = make_data()
    d = data.copy()
    d["cls"] = pd.Categorical(d["cls"], categories=["c1", "c2", "c3", "unused"])
    with pytest.warns(UserWarning, match=r"dropped 1 all-zero fixed-effect column.*unused"):
        m = MultiGeneMixedLM.from_formula("~ 0 + cls + x", d, endog=Y, groups="sam")
    ref = MultiGeneMixedLM.from_formula("~ 0 + cls + x", data, endog=Y, groups="sam")
    assert m.exog_names == ref.exog_names
    np.testing.assert_allclose(fit_quiet(m).fe_params, fit_quiet(ref).fe_params, rtol=1e-12)
    with pytest.raises(DesignError, match=r"all zero"):
        MultiGeneMixedLM(Y, np.zeros((len(Y), 1)), groups=data["sam"].to_numpy())


# ------------------------------------------------------------- formulas
def test_formula_unknown_column_and_syntax_error():
    data, Y = make_data()
    with pytest.raises(DesignError, match=r"'libsize'.*not a column of data.*available columns"):
        MultiGeneMixedLM.from_formula("~ x + libsize", data, endog=Y, groups="sam")
    with pytest.raises(DesignError, match=r"formula 'x \+ \* cls' could not be evaluated"):
        MultiGeneMixedLM.from_formula("~ x + * cls", data, endog=Y, groups="sam")
    with pytest.raises(DesignError, match=r"groups column 'sample' is not in data.*available"):
        MultiGeneMixedLM.from_formula("~ x", data, endog=Y, groups="sample")
    with pytest.raises(DesignError, match=r"vc_formula\['c'\].*'nope'"):
        MultiGeneMixedLM.from_formula("~ x", data, endog=Y, vc_formula={"c": "0 + C(nope)"})


def test_fewer_than_two_groups():
    Y, X, _, data = simple_inputs()
    with pytest.raises(DesignError, match=r"single level.*at least two groups"):
        MultiGeneMixedLM(Y, X, groups=np.zeros(len(Y)))
    with pytest.raises(DesignError, match=r"component 'one' has 1 level.*at least two"):
        MultiGeneMixedLM(Y, X, exog_vc={"one": np.ones(len(Y)), "s": data["sam"].to_numpy()})
    d = data.assign(const="k")
    with pytest.raises(DesignError, match=r"component 'k' has 1 level"):
        MultiGeneMixedLM.from_formula("~ x", d, endog=Y, vc_formula={"k": "0 + C(const)"})


def test_negative_values_log_transform():
    Y, X, groups, _ = simple_inputs()
    counts = np.abs(np.round(Y * 3))
    counts[7, 4] = -1.0
    with pytest.raises(DataError, match=r"negative values cannot be log-transformed.*'gene4'"):
        MultiGeneMixedLM(counts, X, groups=groups, transform="log1p")
    with pytest.raises(DataError, match=r"negative.*'gene4'"):
        MultiGeneMixedLM(sp.csr_matrix(counts), X, groups=groups, transform="log2p1")


# ------------------------------------------------------------- contrasts
def test_bad_contrasts():
    Y, X, groups, _ = simple_inputs()
    res = fit_quiet(MultiGeneMixedLM(Y, X, groups=groups, exog_names=["Intercept", "x"]))
    with pytest.raises(ValueError, match=r"shape \(1, 3\).*2 fixed-effect terms.*'Intercept', 'x'"):
        res.t_test([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"'slope = 0'.*Terms are \['Intercept', 'x'\]"):
        res.t_test("slope = 0")
    with pytest.raises(ValueError, match=r"unknown term.*'z'.*terms are"):
        res.t_test(pd.Series({"z": 1.0}))


# ----------------------------------------------------------- statistics I/O
def test_merge_incompatible_stats():
    Y, X, groups, _ = simple_inputs()
    d = build_design(X, len(Y), groups=groups)
    a = SufficientStats.from_design(d.subset(np.arange(60)), Y[:60])
    b = SufficientStats.from_design(d.subset(np.arange(60, 120)), Y[60:])
    assert (a + b).n == 120
    d2 = build_design(X, len(Y), groups=groups, exog_names=["a", "b"])
    c = SufficientStats.from_design(d2.subset(np.arange(60, 120)), Y[60:])
    with pytest.raises(StatsError, match=r"different fixed-effect terms.*same design"):
        a + c
    d3 = build_design(X, len(Y), groups=np.where(groups == "s0", "s1", groups))
    e = SufficientStats.from_design(d3.subset(np.arange(60, 120)), Y[60:])
    with pytest.raises(StatsError, match=r"different random components or their levels"):
        a + e
    f = SufficientStats.from_design(d.subset(np.arange(60, 120)), np.abs(Y[60:]), transform="log1p")
    with pytest.raises(StatsError, match=r"different transform"):
        a + f
    with pytest.raises(StatsError, match=r"genes"):
        a + a.subset_genes([0, 1])


def _saved_stats(tmp_path):
    Y, X, groups, _ = simple_inputs()
    st = SufficientStats.from_design(build_design(X, len(Y), groups=groups), Y)
    path = tmp_path / "ok.npz"
    st.save(path)
    return st, path


def test_load_not_a_flashmm_file(tmp_path):
    st, path = _saved_stats(tmp_path)
    back = SufficientStats.load(path)
    np.testing.assert_array_equal(back.ZY, st.ZY)
    txt = tmp_path / "notes.npz"
    txt.write_text("hello")
    with pytest.raises(StatsError, match=r"notes\.npz.*not a readable \.npz"):
        SufficientStats.load(txt)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.arange(3))
    with pytest.raises(StatsError, match=r"not a flashmm statistics file"):
        SufficientStats.load(other)


def test_load_wrong_version_and_object_array(tmp_path):
    st, path = _saved_stats(tmp_path)
    with np.load(path) as f:
        contents = {k: f[k] for k in f.files}
    meta = json.loads(str(contents["meta"]))
    meta["version"] = 99
    meta["flashmm_version"] = "9.9"
    bad = tmp_path / "future.npz"
    np.savez(bad, **{**contents, "meta": np.array(json.dumps(meta))})
    with pytest.raises(StatsError, match=r"format version 99 \(by flashmm 9\.9\).*Recompute"):
        SufficientStats.load(bad)
    # an object array needs pickle: it must be refused, never unpickled
    pick = tmp_path / "pickled.npz"
    np.savez(pick, **{**contents, "XY": np.array([{"evil": 1}, None], dtype=object)})
    with pytest.raises(StatsError, match=r"pickled\.npz.*not a readable"):
        SufficientStats.load(pick)


# ------------------------------------------------------------- gene names
def test_duplicate_gene_names():
    Y, X, groups, data = simple_inputs()
    names = ["A", "B", "A", "C", "A", "B"]
    with pytest.raises(DataError, match=r"duplicate gene name.*\['A', 'B'\].*make_unique=True"):
        MultiGeneMixedLM(Y, X, groups=groups, gene_names=names)
    with pytest.raises(DataError, match=r"duplicate gene name"):
        MultiGeneMixedLM.from_formula("~ x", data, endog=pd.DataFrame(Y, columns=names),
                                      groups="sam")
    with pytest.warns(UserWarning, match=r"made unique"):
        m = MultiGeneMixedLM(Y, X, groups=groups, gene_names=names, make_unique=True)
    assert m.gene_names == ["A", "B", "A-1", "C", "A-2", "B-1"]
    with pytest.warns(UserWarning, match=r"made unique"):
        m2 = MultiGeneMixedLM.from_formula("~ x", data, endog=pd.DataFrame(Y, columns=names),
                                           groups="sam", make_unique=True)
    assert m2.gene_names == m.gene_names
    d = build_design(X, len(Y), groups=groups)
    with pytest.warns(UserWarning, match=r"made unique"):
        st = SufficientStats.from_design(d, Y, gene_names=names, make_unique=True)
    assert st.gene_names == m.gene_names
    # a generated name that already exists is skipped, as in anndata
    assert make_names_unique(["A", "A", "A-1"]) == ["A", "A-2", "A-1"]


# ------------------------------------------------- flagged, never a crash
def _degenerate_genes():
    Y, X, groups, _ = simple_inputs()
    Y = np.column_stack([
        Y,
        np.zeros(len(Y)),                     # all zero
        np.full(len(Y), 3.5),                 # constant (fitted exactly by the intercept)
        2.0 - 0.5 * X[:, 1],                  # fitted exactly by X
    ])
    names = [f"g{i}" for i in range(6)] + ["zero", "const", "exact"]
    return Y, X, groups, names


@pytest.mark.parametrize("vc", [False, True])
def test_degenerate_genes_flagged_and_left_out_of_fdr(vc):
    Y, X, groups, names = _degenerate_genes()
    if vc:
        rng = np.random.default_rng(1)
        kw = {"exog_vc": {"s": groups, "b": rng.integers(0, 4, len(Y))}}
    else:
        kw = {"groups": groups}
    res = fit_quiet(MultiGeneMixedLM(Y, X, gene_names=names, **kw))
    st = res.status
    assert st["zero"] == "all zero"
    assert st["const"].startswith("no residual variance")
    assert st["exact"].startswith("no residual variance")
    assert (st.iloc[:6] == "ok").all()
    bad = ["zero", "const", "exact"]
    assert res.fe_params.loc[bad].isna().all().all()
    assert res.scale.loc[bad].isna().all()
    assert not res.converged.loc[bad].any()
    assert np.isfinite(res.fe_params.iloc[:6].to_numpy()).all()
    sf = res.t_test([0.0, 1.0]).summary_frame().set_index("gene")
    assert sf.loc[bad, "padj"].isna().all()
    from statsmodels.stats.multitest import multipletests

    good = sf.iloc[:6]
    np.testing.assert_allclose(good["padj"], multipletests(good["pvalue"], method="fdr_bh")[1],
                               rtol=1e-12)


@pytest.mark.parametrize("kind", ["groups", "vc", "slopes"])
def test_degenerate_genes_one_aggregated_warning(kind):
    """One warning per fit, counting each status, on the one-component, dense and slopes paths."""
    Y, X, groups, names = _degenerate_genes()
    kw = {"groups": groups}
    if kind == "vc":
        kw = {"exog_vc": {"s": groups, "b": np.arange(len(Y)) % 4}}
    elif kind == "slopes":
        kw["exog_re"] = X
    model = MultiGeneMixedLM(Y, X, gene_names=names, **kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = model.fit()
    msgs = [str(w.message) for w in rec if "could not be fitted" in str(w.message)]
    assert msgs == ["3 of 9 genes could not be fitted: 1 all zero, 2 no residual variance "
                    "(constant or fitted exactly); their estimates are NaN, see results.status."]
    assert issubclass(next(w.category for w in rec if "could not" in str(w.message)),
                      ConvergenceWarning)
    assert (res.status != "ok").sum() == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)   # no warning without such genes
        MultiGeneMixedLM(Y[:, :6], X, **kw).fit()


def test_boundary_flagged_and_converged():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(10), 20)
    n = groups.size
    X = np.ones((n, 1))
    y_null = rng.normal(size=n)
    y_null -= np.bincount(groups, y_null)[groups] / 20   # group means exactly 0: boundary
    y_null += rng.normal(size=n) * 1e-3
    y_null -= np.bincount(groups, y_null)[groups] / 20
    y_eff = rng.normal(size=n) + 2 * rng.normal(size=10)[groups]
    res = fit_quiet(MultiGeneMixedLM(np.column_stack([y_null, y_eff]), X, groups=groups))
    assert res.boundary.tolist() == [True, False]
    assert res.converged.all()
    assert res.vcomp.iloc[0, 0] == 0.0 and res.vcomp.iloc[1, 0] > 0
    assert np.isfinite(res.fe_params.to_numpy()).all()


def test_bse_re_at_boundary_is_nan_without_warning():
    """A nested component at 0 whose information is indefinite: NaN, and no RuntimeWarning."""
    data, Y = simulate_study(n_genes=60, n_groups=12, cells_per_group=(3, 8), seed=0)
    data["sub"] = data["grp"] + "_" + (np.arange(len(data)) % 2).astype(str)
    genes = ["gene001", "gene027"]   # gene027: sub variance 0, indefinite information
    res = fit_quiet(MultiGeneMixedLM.from_formula("~ x", data, endog=Y[genes], groups="grp",
                                                  vc_formula={"sub": "0 + C(sub)"}))
    at_zero = (res.vcomp == 0).to_numpy()
    assert at_zero[1:].all() and not at_zero[0].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        se = res.bse_re.to_numpy()
        res.gene("gene027").summary()
    assert np.isnan(se[at_zero]).all() and np.isfinite(se[~at_zero]).all()


def test_non_convergence_single_warning():
    data, Y = make_data(genes=20)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 5, len(Y))
    model = MultiGeneMixedLM(Y, np.ones((len(Y), 1)),
                             exog_vc={"s": data["sam"].to_numpy(), "b": batch})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = model.fit(maxiter=1)
    conv = [w for w in rec if issubclass(w.category, ConvergenceWarning)]
    assert len(conv) == 1
    k = int((~res.converged).sum())
    assert k > 0
    assert str(conv[0].message).startswith(f"{k} of 20 genes did not converge; see results.converged")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert model.fit().converged.all()


def test_single_cell_group():
    Y, X, groups, _ = simple_inputs()
    groups = groups.copy()
    groups[0] = "lonely"
    res = fit_quiet(MultiGeneMixedLM(Y, X, groups=groups))
    assert (res.status == "ok").all() and res.converged.all()
    assert np.isfinite(res.fe_params.to_numpy()).all()
    assert np.isfinite(res.bse_fe.to_numpy()).all()


@pytest.mark.parametrize("a", [1e150, 1e-150, -7.0])
@pytest.mark.parametrize("two", [False, True])
@pytest.mark.parametrize("reml", [True, False])
def test_extreme_scales(a, two, reml):
    Y, X, groups, _ = simple_inputs()
    kw = ({"exog_vc": {"s": groups, "b": np.arange(len(Y)) % 3}} if two else {"groups": groups})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base = MultiGeneMixedLM(Y, X, **kw).fit(reml=reml)
        res = MultiGeneMixedLM(a * Y, X, **kw).fit(reml=reml)
        assert res.converged.all()
        np.testing.assert_allclose(res.fe_params, a * base.fe_params, rtol=1e-9)
        np.testing.assert_allclose(res.bse_fe, abs(a) * base.bse_fe, rtol=1e-9)
        np.testing.assert_allclose(res.vcomp, a * a * base.vcomp, rtol=1e-9, atol=0)
        np.testing.assert_allclose(res.scale, a * a * base.scale, rtol=1e-9)
        m = len(Y) - (X.shape[1] if reml else 0)
        np.testing.assert_allclose(res.llf, base.llf - m * np.log(abs(a)), rtol=1e-12)
        np.testing.assert_allclose(res.tvalues, np.sign(a) * base.tvalues, rtol=1e-9)


@pytest.mark.parametrize("a", [1e150, 1e-150])
def test_extreme_scale_satterthwaite(a):
    """Degrees of freedom and p-values do not depend on the units of y."""
    Y, X, groups, _ = simple_inputs()
    base = fit_quiet(MultiGeneMixedLM(Y, X, groups=groups))
    res = fit_quiet(MultiGeneMixedLM(a * Y, X, groups=groups))
    np.testing.assert_allclose(res.df_satterthwaite, base.df_satterthwaite, rtol=1e-8)
    np.testing.assert_allclose(res.pvalues, base.pvalues, rtol=1e-8)
    np.testing.assert_allclose(res.bse_re, base.bse_re, rtol=1e-8)


def test_float32_input_equals_float64():
    Y, X, groups, _ = simple_inputs()
    Y32, X32 = Y.astype(np.float32), X.astype(np.float32)
    Y64, X64 = Y32.astype(np.float64), X32.astype(np.float64)
    for a, b in [(Y32, Y64), (sp.csr_matrix(Y32), sp.csr_matrix(Y64)),
                 (pd.DataFrame(Y32), pd.DataFrame(Y64))]:
        m32 = MultiGeneMixedLM(a, X32, groups=groups)
        m64 = MultiGeneMixedLM(b, X64, groups=groups)
        assert m32.stats.XY.dtype == np.float64
        np.testing.assert_array_equal(m32.stats.XY, m64.stats.XY)
        np.testing.assert_array_equal(m32.stats.yy, m64.stats.yy)
        r32, r64 = fit_quiet(m32), fit_quiet(m64)
        np.testing.assert_array_equal(r32.fe_params, r64.fe_params)
        np.testing.assert_array_equal(r32.llf, r64.llf)


def test_errors_are_valueerrors():
    for cls in (DesignError, DataError, StatsError, flashmm.FlashmmError):
        assert issubclass(cls, ValueError)


def test_values_whose_squares_overflow_are_an_error():
    """Finite but huge values (squares beyond float64) are refused, not summed to inf."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 10)
    X = np.ones((40, 1))
    Y = rng.normal(size=(40, 2))
    Y[3, 1] = 1e200
    with pytest.raises(DataError, match="too large.*gene1"):
        MultiGeneMixedLM(Y, X, groups=groups)


def test_nan_error_counts_cells_and_genes():
    rng = np.random.default_rng(1)
    Y = rng.normal(size=(40, 3))
    Y[2, 1] = Y[5, 1] = np.nan
    Y[7, 2] = np.inf
    with pytest.raises(DataError, match=r"2 gene\(s\) have NaN or inf in 3 cell\(s\)"):
        MultiGeneMixedLM(Y, np.ones((40, 1)), groups=np.repeat(np.arange(4), 10))
