"""AnnData input (in memory and backed) and results stored in AnnData."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import flashmm
from flashmm import MultiGeneMixedLM
from flashmm._anndata import RowChunks
from flashmm._reader import ChunkSource

anndata = pytest.importorskip("anndata")

FORMULA = "~ 0 + np.log(libsize) + cls + cls:trt"


@pytest.fixture(scope="module")
def adata():
    ad = flashmm.datasets.simulate_rnaseq(60, 600, n_samples=8, n_celltypes=3, n_de_genes=6, seed=7)
    ad.layers["counts_csc"] = sp.csc_matrix(ad.X)
    ad.layers["dense"] = ad.X.toarray()
    return ad


@pytest.fixture(scope="module")
def reference(adata):
    model = MultiGeneMixedLM.from_formula(FORMULA, adata.obs, endog=adata.X, groups="sam",
                                          transform="log2p1", gene_names=list(adata.var_names))
    return model.fit()


def _assert_same(res, ref, rtol=1e-10):
    assert list(res.gene_names) == list(ref.gene_names)
    assert list(res.exog_names) == list(ref.exog_names)
    np.testing.assert_allclose(res.model.stats.XY, ref.model.stats.XY, rtol=rtol)
    np.testing.assert_allclose(res.model.stats.yy, ref.model.stats.yy, rtol=rtol)
    np.testing.assert_allclose(res.fe_params, ref.fe_params, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(res.bse_fe, ref.bse_fe, rtol=rtol)
    np.testing.assert_allclose(res.scale, ref.scale, rtol=rtol)


@pytest.mark.parametrize("layer", [None, "counts_csc", "dense"])
def test_from_formula_anndata_matches_arrays(adata, reference, layer):
    res = MultiGeneMixedLM.from_formula(FORMULA, adata, groups="sam", layer=layer,
                                        transform="log2p1", chunk_size=97).fit()
    _assert_same(res, reference, rtol=1e-9)
    assert list(res.gene_names) == list(adata.var_names)


def test_backed_anndata_is_streamed_in_chunks(adata, reference, tmp_path, monkeypatch):
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    sizes: list[int] = []
    original = ChunkSource._read

    def spy(self, index, start, stop):
        chunk = original(self, index, start, stop)
        sizes.append(chunk.block.shape[0])
        # read from the file's own arrays, in their stored dtype (no float64 copy)
        assert sp.issparse(chunk.block) and chunk.block.format == "csr"
        assert chunk.block.dtype == backed.X.group["data"].dtype
        return chunk

    monkeypatch.setattr(ChunkSource, "_read", spy)
    res = MultiGeneMixedLM.from_formula(FORMULA, backed, groups="sam", transform="log2p1",
                                        chunk_size=128).fit()
    backed.file.close()
    # every read is at most one chunk of cells, and together they cover all cells once
    assert max(sizes) <= 128 and sum(sizes) == adata.n_obs
    _assert_same(res, reference)



@pytest.mark.filterwarnings("ignore:Writing zarr v2:UserWarning")
def test_from_formula_accepts_a_path(adata, reference, tmp_path, monkeypatch):
    """A path to .h5ad (read backed, in chunks, then closed) or .zarr is read as the AnnData."""
    h5ad = tmp_path / "sim.h5ad"
    adata.write_h5ad(h5ad)
    opened = []
    read_h5ad = anndata.read_h5ad

    def spy(path, **kw):
        opened.append(read_h5ad(path, **kw))
        return opened[-1]

    monkeypatch.setattr(anndata, "read_h5ad", spy)
    for path in (str(h5ad), h5ad):
        res = MultiGeneMixedLM.from_formula(FORMULA, path, groups="sam", transform="log2p1",
                                            chunk_size=128).fit()
        _assert_same(res, reference)
    assert all(a.isbacked for a in opened) and len(opened) == 2
    assert not any(a.file.is_open for a in opened)
    adata.write_zarr(tmp_path / "sim.zarr")
    res = MultiGeneMixedLM.from_formula(FORMULA, str(tmp_path / "sim.zarr"), groups="sam",
                                        transform="log2p1").fit()
    _assert_same(res, reference)
    with pytest.raises(flashmm.DataError, match=r"not an .h5ad file or a .zarr store"):
        MultiGeneMixedLM.from_formula(FORMULA, str(tmp_path / "sim.csv"), groups="sam")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MultiGeneMixedLM.from_formula(FORMULA, tmp_path / "missing.h5ad", groups="sam")
    with pytest.raises(flashmm.DesignError, match="leave endog=None"):
        MultiGeneMixedLM.from_formula(FORMULA, h5ad, endog=adata.X, groups="sam")
    assert not any(a.file.is_open for a in opened)

def test_anndata_errors(adata):
    with pytest.raises(KeyError, match="layer 'nope' not found"):
        MultiGeneMixedLM.from_formula(FORMULA, adata, groups="sam", layer="nope")
    bad = adata.copy()
    bad.X = bad.X.copy()
    bad.X.data[:] = -1.0
    with pytest.raises(flashmm.DataError, match="first offending gene"):
        MultiGeneMixedLM.from_formula(FORMULA, bad, groups="sam", transform="log2p1")
    with pytest.raises(flashmm.DesignError, match="leave endog=None"):
        MultiGeneMixedLM.from_formula(FORMULA, adata, endog=adata.X, groups="sam")


def test_write_results_round_trip(adata, reference, tmp_path):
    ad = adata.copy()
    contrasts = {"C1_vs_C2": "cls[C1]:trt[T.B] - cls[C2]:trt[T.B]", "C3": "cls[C3]:trt[T.B]"}
    flashmm.write_results(ad, reference, contrasts=contrasts)
    terms = reference.exog_names
    coef = ad.varm["flashmm_coef"]
    assert list(coef.columns) == terms and list(coef.index) == list(ad.var_names)
    np.testing.assert_allclose(coef.to_numpy(), reference.fe_params.to_numpy())
    for key in ("se", "tvalue", "df", "pvalue", "padj", "contrast_effect", "contrast_se",
                "contrast_pvalue", "contrast_df", "contrast_padj"):
        assert f"flashmm_{key}" in ad.varm
    for key in ("scale", "llf", "converged", "boundary", "var_sam"):
        assert f"flashmm_{key}" in ad.var
    assert ad.uns["flashmm"]["formula"] == reference.stats.info["formula"]
    assert ad.uns["flashmm"]["groups"] == "sam"
    assert list(ad.uns["flashmm"]["contrasts"]) == list(contrasts)

    with pytest.raises(flashmm.FlashmmError, match="overwrite=True"):
        flashmm.write_results(ad, reference)
    flashmm.write_results(ad, reference, overwrite=True)     # replaces, drops the contrasts
    assert "flashmm_contrast_effect" not in ad.varm
    flashmm.write_results(ad, reference, contrasts=contrasts, overwrite=True)

    path = tmp_path / "res.h5ad"
    ad.write_h5ad(path)
    back = anndata.read_h5ad(path)
    expected = reference.t_test(pd.DataFrame(np.eye(len(terms)), index=terms, columns=terms))
    tidy = flashmm.get_results_df(back)
    exp = expected.summary_frame()
    assert list(tidy.columns) == list(exp.columns)
    pd.testing.assert_frame_equal(tidy[["gene", "contrast"]], exp[["gene", "contrast"]])
    cols = ["effect", "se", "t", "df", "pvalue", "padj", "ci_low", "ci_high"]
    np.testing.assert_allclose(tidy[cols].to_numpy(), exp[cols].to_numpy(), rtol=1e-12)
    wide = flashmm.get_results_df(back, alpha=0.2)
    np.testing.assert_allclose(wide["ci_high"], expected.summary_frame(alpha=0.2)["ci_high"],
                               rtol=1e-12)
    con = flashmm.get_results_df(back, contrast=True)
    exp_con = reference.t_test(contrasts).summary_frame()
    np.testing.assert_allclose(con["pvalue"], exp_con["pvalue"], rtol=1e-12)
    assert set(con["contrast"]) == set(contrasts)
    one = flashmm.get_results_df(back, contrast="C3")
    assert len(one) == back.n_vars and set(one["contrast"]) == {"C3"}
    with pytest.raises(KeyError):
        flashmm.get_results_df(back, key="other")


def test_write_results_accepts_contrast_results(adata, reference):
    ad = adata.copy()
    con = reference.t_test({"C1": "cls[C1]:trt[T.B]"})
    flashmm.write_results(ad, reference, key_added="de", contrasts=con)
    np.testing.assert_allclose(ad.varm["de_contrast_effect"]["C1"], con.effect["C1"])


def test_import_without_optional_dependencies():
    code = ("import sys\n"
            "for m in ('anndata', 'matplotlib', 'tqdm'): sys.modules[m] = None\n"
            "import flashmm, flashmm.cli, flashmm.plot, flashmm.io, flashmm._progress\n"
            "assert callable(flashmm.write_results) and callable(flashmm.get_results_df)\n"
            "p = flashmm._progress.Progress(3, 'x'); p(3); p.close()\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backed_anndata_with_dropped_cells(adata, tmp_path):
    ad = adata.copy()
    ad.obs["libsize"] = ad.obs["libsize"].astype(float)
    ad.obs.iloc[[3, 10], ad.obs.columns.get_loc("libsize")] = np.nan
    path = tmp_path / "nan.h5ad"
    ad.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    with pytest.warns(UserWarning):
        model = MultiGeneMixedLM.from_formula(FORMULA, backed, groups="sam", transform="log2p1",
                                              missing="drop")
    backed.file.close()
    keep = np.setdiff1d(np.arange(ad.n_obs), [3, 10])
    ref = MultiGeneMixedLM.from_formula(FORMULA, ad.obs.iloc[keep], endog=ad.X[keep], groups="sam",
                                        transform="log2p1", gene_names=list(ad.var_names))
    assert model.nobs == ad.n_obs - 2
    np.testing.assert_allclose(model.stats.XY, ref.stats.XY, rtol=1e-10)
    np.testing.assert_allclose(model.fit().fe_params, ref.fit().fe_params, rtol=1e-9, atol=1e-12)


def test_row_chunks_indexing():
    m = sp.random(50, 7, density=0.3, format="csr", random_state=1)
    rc = RowChunks(m)
    assert rc.shape == (50, 7) and len(rc) == 50
    np.testing.assert_array_equal(rc[5:9].toarray(), m[5:9].toarray())
    np.testing.assert_array_equal(rc[np.array([1, 4, 8])].toarray(), m[[1, 4, 8]].toarray())
    mask = np.zeros(50, dtype=bool)
    mask[[0, 49]] = True
    np.testing.assert_array_equal(rc[mask].toarray(), m[[0, 49]].toarray())
    with pytest.raises(TypeError):
        rc[::2]
    dense = RowChunks(np.arange(12.0).reshape(6, 2))
    np.testing.assert_array_equal(dense[2:4], [[4.0, 5.0], [6.0, 7.0]])
