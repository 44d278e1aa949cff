"""The ``flashmm`` command line, run in process through ``main([...])``."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import flashmm
from flashmm.cli import main

anndata = pytest.importorskip("anndata")

FORMULA = "~ 0 + np.log(libsize) + cls + cls:trt"


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    ad = flashmm.datasets.simulate_rnaseq(40, 500, n_samples=6, n_celltypes=2, n_de_genes=4, seed=3)
    path = tmp_path_factory.mktemp("cli") / "sim.h5ad"
    ad.write_h5ad(path)
    return path, ad


def _fit_args(path, out, *extra):
    return ["fit", str(path), "--formula", FORMULA, "--groups", "sam", "--transform", "log2p1",
            "--out", str(out), "--quiet", *extra]


def test_fit_writes_table_matching_the_api(h5ad, tmp_path, capsys):
    path, ad = h5ad
    out = tmp_path / "res.csv"
    assert main(_fit_args(path, out, "--chunk-size", "64", "--contrast", "C1=cls[C1]:trt[T.B]",
                          "--write-h5ad", str(tmp_path / "out.h5ad"))) == 0
    assert "fitted 40 genes on 500 cells" in capsys.readouterr().err
    table = pd.read_csv(out)
    res = flashmm.MultiGeneMixedLM.from_formula(FORMULA, ad, groups="sam", transform="log2p1").fit()
    terms = table.loc[table["kind"] == "term"]
    assert len(terms) == 40 * len(res.exog_names)
    coef = terms.pivot(index="gene", columns="contrast", values="effect")
    coef = coef.loc[res.gene_names, res.exog_names]
    np.testing.assert_allclose(coef.to_numpy(), res.fe_params.to_numpy(), rtol=1e-9, atol=1e-12)
    con = table.loc[table["kind"] == "contrast"].set_index("gene")
    expected = res.t_test({"C1": "cls[C1]:trt[T.B]"})
    np.testing.assert_allclose(con.loc[list(res.gene_names), "pvalue"], expected.pvalue["C1"], rtol=1e-9)
    back = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert back.uns["flashmm"]["formula"].replace(" ", "") == FORMULA[1:].replace(" ", "")
    tidy = flashmm.get_results_df(back, contrast="C1")
    np.testing.assert_allclose(tidy["pvalue"], expected.pvalue["C1"], rtol=1e-9)


def test_stats_then_fit_from_stats(h5ad, tmp_path):
    path, _ = h5ad
    npz = tmp_path / "stats.npz"
    assert main(["stats", str(path), "--formula", FORMULA, "--groups", "sam", "--transform",
                 "log2p1", "--out", str(npz), "--quiet"]) == 0
    assert main(["fit", "--stats", str(npz), "--out", str(tmp_path / "a.csv"), "--ml", "--quiet"]) == 0
    assert main(_fit_args(path, tmp_path / "b.csv", "--ml")) == 0
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    pd.testing.assert_frame_equal(a, b, rtol=1e-9)



def test_fit_from_stats_refuses_design_flags(h5ad, tmp_path, capsys):
    """--stats fits the saved design: design flags given with it are an error, not ignored."""
    path, _ = h5ad
    npz = tmp_path / "stats.npz"
    assert main(["stats", str(path), "--formula", FORMULA, "--groups", "sam", "--out", str(npz),
                 "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "x.csv"
    assert main(["fit", "--stats", str(npz), "--formula", "~ cls", "--groups", "sam", "--transform",
                 "log2p1", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashmm: error: --formula, --groups, --transform cannot be used with --stats")
    assert len(err.splitlines()) == 1 and not out.exists()
    assert main(["fit", "--stats", str(npz), "--vc", "c=0 + C(cls)", "--out", str(out)]) == 2
    assert "--vc cannot be used with --stats" in capsys.readouterr().err

def test_fit_random_slopes_matches_the_api(h5ad, tmp_path):
    path, ad = h5ad
    re = "~ 1 + np.log(libsize)"
    out = tmp_path / "slopes.csv"
    assert main(_fit_args(path, out, "--re-formula", re, "--write-h5ad",
                          str(tmp_path / "slopes.h5ad"))) == 0
    res = flashmm.MultiGeneMixedLM.from_formula(FORMULA, ad, groups="sam", re_formula=re,
                                                transform="log2p1").fit()
    terms = pd.read_csv(out).pivot(index="gene", columns="contrast", values="pvalue")
    expected = res.t_test(np.eye(res.k_fe)).pvalue
    np.testing.assert_allclose(terms.loc[res.gene_names, res.exog_names].to_numpy(),
                               expected.to_numpy(), rtol=1e-9)
    back = anndata.read_h5ad(tmp_path / "slopes.h5ad")
    np.testing.assert_allclose(back.varm["flashmm_cov_re"], res.cov_re.to_numpy(), rtol=1e-12)
    assert main(_fit_args(path, tmp_path / "ind.csv", "--re-formula", re, "--independent-re")) == 0


def test_fit_nested_components_matches_the_api(h5ad, tmp_path, capsys):
    """--re-intercept --vc: the statsmodels spelling of (1|sam) + (1|sam:cls), structured engine."""
    path, ad = h5ad
    out = tmp_path / "nested.csv"
    assert main(_fit_args(path, out, "--re-intercept", "--vc", "sc=0 + C(cls)", "--jobs", "1",
                          "--max-memory", "1GB")) == 0
    res = flashmm.MultiGeneMixedLM.from_formula(FORMULA, ad, groups="sam", re_formula="1",
                                                vc_formula={"sc": "0 + C(cls)"},
                                                transform="log2p1").fit()
    assert res._st.glob_cols.size == 0                    # one block per sample
    terms = pd.read_csv(out).pivot(index="gene", columns="contrast", values="pvalue")
    expected = res.t_test(np.eye(res.k_fe)).pvalue
    np.testing.assert_allclose(terms.loc[res.gene_names, res.exog_names].to_numpy(),
                               expected.to_numpy(), rtol=1e-9)
    # a budget the model cannot fit in: refused with what it needs, one line, exit code 2
    capsys.readouterr()
    assert main(_fit_args(path, tmp_path / "x.csv", "--re-intercept", "--vc", "sc=0 + C(cls)",
                          "--max-memory", "2KB")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashmm: error:") and "needs at least" in err and "max_memory" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(("extra", "message"), [
    (["--independent-re"], "--independent-re needs --re-formula"),
    (["--re-intercept", "--re-formula", "~ 1"], "not both"),
])
def test_random_effect_flag_errors(h5ad, tmp_path, capsys, extra, message):
    path, _ = h5ad
    assert main(_fit_args(path, tmp_path / "x.csv", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashmm: error:") and message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--groups", "donor"], "groups column 'donor' is not in data"),
        (["--formula", "~ 0 + nosuchcolumn"], "nosuchcolumn"),
        (["--formula", "~ 0 + cls +"], "could not be evaluated"),
        (["--layer", "missing"], "layer 'missing' not found"),
        (["--contrast", "nonsense"], "NAME=EXPRESSION"),
        (["--contrast", "x=cls[C9]"], "cannot parse contrast"),
        (["--re-formula", "~ 1 + nosuch"], "nosuch"),
    ],
)
def test_fit_errors_are_one_line(h5ad, tmp_path, capsys, args, message):
    path, _ = h5ad
    argv = _fit_args(path, tmp_path / "x.csv")
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashmm: error:") and message in err
    assert len(err.splitlines()) == 1


def test_unreadable_inputs(tmp_path, capsys):
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not an hdf5 file")
    assert main(_fit_args(junk, tmp_path / "x.csv")) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(_fit_args(tmp_path / "missing.h5ad", tmp_path / "x.csv")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["fit", "--stats", str(junk), "--out", str(tmp_path / "x.csv")]) == 2
    assert "flashmm: error:" in capsys.readouterr().err
    assert main(["fit", "--out", str(tmp_path / "x.csv")]) == 2
    assert "either an input" in capsys.readouterr().err
    assert main(["fit"]) == 2       # argparse usage error: --out missing
    assert main(["--version"]) == 0


def test_demo_small(tmp_path, capsys):
    assert main(["demo", "--genes", "150", "--cells", "1500", "--samples", "8", "--celltypes", "3",
                 "--seed", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Multi-gene Mixed Linear Model Results" in out
    assert "Top 10 genes" in out and "recall" in out and "false discovery proportion" in out
    assert (tmp_path / "flashmm_demo_volcano.png").stat().st_size > 1000


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "flashmm", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout and "fit" in proc.stdout


def test_demo_summary_reads_cleanly(tmp_path, capsys):
    """Counts only for the treatment terms, df without exponents, aligned tables, padj order."""
    assert main(["demo", "--genes", "150", "--cells", "1500", "--samples", "8", "--celltypes", "3",
                 "--seed", "2", "--no-plot", "--top", "6"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("\n\n")
    fit_summary = next(b for b in blocks if "Multi-gene Mixed Linear Model Results" in b)
    rows = {line.split()[0]: line for line in fit_summary.splitlines()
            if line.startswith(("cls[", "np.log(libsize)"))}
    means = [name for name in rows if ":trt[" not in name]
    assert means and all(len(rows[n].split()) == 4 for n in means)      # no count column
    assert all(len(rows[n].split()) == 5 for n in rows if ":trt[" in n)
    assert not re.search(r"\de\+", rows["np.log(libsize)"])
    for block in blocks:
        lines = block.splitlines()
        rules = [len(x) for x in lines if x and set(x) == {"="}]
        if rules:
            assert max(len(x.rstrip()) for x in lines) <= max(rules), block
    top = next(b for b in blocks if "Top 6" in b)
    padj = [float(line.split()[7]) for line in top.splitlines()
            if re.match(r"^Gene\d+\s+cls\[", line)]
    assert len(padj) == 6 and padj == sorted(padj)


def test_fit_with_kenward_roger_df_matches_the_api(h5ad, tmp_path):
    path, ad = h5ad
    out = tmp_path / "kr.csv"
    assert main(_fit_args(path, out, "--df-method", "kenward-roger",
                          "--contrast", "C1=cls[C1]:trt[T.B]")) == 0
    con = pd.read_csv(out).query("kind == 'contrast'").set_index("gene")
    res = flashmm.MultiGeneMixedLM.from_formula(FORMULA, ad, groups="sam", transform="log2p1").fit(
        df_method="kenward-roger")
    expected = res.t_test({"C1": "cls[C1]:trt[T.B]"})
    sat = res.t_test({"C1": "cls[C1]:trt[T.B]"}, df_method="satterthwaite")
    np.testing.assert_allclose(con.loc[list(res.gene_names), "pvalue"], expected.pvalue["C1"],
                               rtol=1e-9)
    assert not np.allclose(expected.pvalue["C1"], sat.pvalue["C1"], rtol=1e-6)
