"""flashmm.pseudobulk against a direct pandas groupby sum.

The counts are integers, so every sum is exact in float64 whatever the order
of summation: the comparisons are exact (``assert_array_equal``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import flashmm
from flashmm._errors import DataError

anndata = pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def cells() -> anndata.AnnData:
    """300 cells x 40 genes; 5 donors x 3 cell types, unequal group sizes."""
    rng = np.random.default_rng(7)
    n, G = 300, 40
    donor = rng.choice([f"d{i}" for i in range(5)], size=n, p=[0.3, 0.3, 0.2, 0.15, 0.05])
    celltype = rng.choice(["T", "B", "NK"], size=n, p=[0.5, 0.4, 0.1])
    sex = pd.Series(donor).map({"d0": "F", "d1": "M", "d2": "F", "d3": "M", "d4": "F"})
    obs = pd.DataFrame({
        "donor": pd.Categorical(donor, categories=[f"d{i}" for i in range(6)]),  # d5 unused
        "celltype": celltype,
        "sex": sex.to_numpy(),                                     # constant per donor
        "age": pd.Series(donor).map(lambda d: 20.0 + int(d[1])).to_numpy(),
        "batch": np.where(pd.Series(donor).isin(["d0", "d1"]), np.nan, 1.0),  # NaN is a value
        "label": np.char.add(donor.astype(str), celltype.astype(str)),  # constant per group
        "libsize": rng.integers(500, 2000, size=n),                # varies within groups
    }, index=[f"c{i}" for i in range(n)])
    counts = rng.poisson(0.7, size=(n, G)).astype(float)
    ad = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs)
    ad.var_names = [f"g{j}" for j in range(G)]
    ad.layers["dense"] = counts
    return ad


def _groupby_sum(ad: anndata.AnnData, by: list[str], min_cells: int = 1) -> pd.DataFrame:
    X = ad.X.toarray() if sp.issparse(ad.X) else np.asarray(ad.X)
    frame = pd.DataFrame(X, columns=ad.var_names)
    keys = ad.obs[by].reset_index(drop=True)
    grouped = pd.concat([keys, frame], axis=1).groupby(by, observed=True, sort=True)
    sums = grouped.sum()
    return sums[grouped.size() >= min_cells]


def _dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m)


@pytest.mark.parametrize("chunk_size", [20_000, 7])
def test_sparse_matches_groupby(cells, chunk_size):
    pb = flashmm.pseudobulk(cells, by=["donor", "celltype"], chunk_size=chunk_size)
    ref = _groupby_sum(cells, ["donor", "celltype"])
    assert sp.issparse(pb.X)
    np.testing.assert_array_equal(_dense(pb.X), ref.to_numpy())
    got = list(zip(pb.obs["donor"].astype(str), pb.obs["celltype"], strict=True))
    assert got == [(str(d), c) for d, c in ref.index]
    assert list(pb.obs_names) == [f"{d}_{c}" for d, c in ref.index]
    assert list(pb.var_names) == list(cells.var_names)
    sizes = cells.obs.groupby(["donor", "celltype"], observed=True).size()
    np.testing.assert_array_equal(pb.obs["n_cells"].to_numpy(), sizes.to_numpy())


def test_dense_layer_matches_sparse(cells):
    a = flashmm.pseudobulk(cells, by=["donor", "celltype"])
    b = flashmm.pseudobulk(cells, by=["donor", "celltype"], layer="dense", chunk_size=11)
    assert isinstance(b.X, np.ndarray)
    np.testing.assert_array_equal(b.X, _dense(a.X))
    pd.testing.assert_frame_equal(a.obs, b.obs)


def test_single_column_by(cells):
    pb = flashmm.pseudobulk(cells, by="celltype")
    ref = _groupby_sum(cells, ["celltype"])
    np.testing.assert_array_equal(_dense(pb.X), ref.to_numpy())
    # sex and age are not constant within a cell type; label is not either
    assert list(pb.obs.columns) == ["celltype", "n_cells"]


def test_constant_columns(cells):
    pb = flashmm.pseudobulk(cells, by=["donor", "celltype"])
    assert list(pb.obs.columns) == ["donor", "celltype", "sex", "age", "batch", "label", "n_cells"]
    first = cells.obs.groupby(["donor", "celltype"], observed=True)[["sex", "age"]].first()
    np.testing.assert_array_equal(pb.obs["sex"].to_numpy(), first["sex"].to_numpy())
    np.testing.assert_array_equal(pb.obs["age"].to_numpy(), first["age"].to_numpy())
    assert pb.obs["batch"].isna().sum() == int((pb.obs["donor"].isin(["d0", "d1"])).sum())
    by_donor = flashmm.pseudobulk(cells, by="donor")
    assert "sex" in by_donor.obs and "label" not in by_donor.obs and "libsize" not in by_donor.obs


def test_min_cells_drops_small_groups_and_unused_categories(cells):
    sizes = cells.obs.groupby(["donor", "celltype"], observed=True).size()
    cut = int(np.sort(sizes.to_numpy())[3]) + 1                 # drops at least four groups
    pb = flashmm.pseudobulk(cells, by=["donor", "celltype"], min_cells=cut)
    ref = _groupby_sum(cells, ["donor", "celltype"], min_cells=cut)
    assert pb.n_obs == len(ref) == int((sizes >= cut).sum())
    np.testing.assert_array_equal(_dense(pb.X), ref.to_numpy())
    assert pb.obs["n_cells"].min() >= cut
    kept = set(pb.obs["donor"].astype(str))
    assert list(pb.obs["donor"].cat.categories) == sorted(kept)      # d5 (and dropped donors) gone


@pytest.mark.parametrize("layer", [None, "dense"])
def test_backed_h5ad(cells, tmp_path, layer, monkeypatch):
    pytest.importorskip("h5py")
    from flashmm import _anndata

    reads: list[int] = []
    getitem = _anndata.RowChunks.__getitem__

    def recording(self, key):
        block = getitem(self, key)
        reads.append(block.shape[0])
        return block

    monkeypatch.setattr(_anndata.RowChunks, "__getitem__", recording)
    ad = cells.copy()
    if layer == "dense":                  # backed mode reads X only: make the dense matrix X
        ad.X = ad.layers["dense"]
    del ad.layers["dense"]
    path = tmp_path / "cells.h5ad"
    ad.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        pb = flashmm.pseudobulk(backed, by=["donor", "celltype"], chunk_size=13)
    finally:
        backed.file.close()
    assert max(reads) <= 13 and sum(reads) == cells.n_obs     # one pass, chunk by chunk
    ref = flashmm.pseudobulk(cells, by=["donor", "celltype"])
    np.testing.assert_array_equal(_dense(pb.X), _dense(ref.X))
    # writing an h5ad turns string columns into categoricals: compare the values
    pd.testing.assert_frame_equal(pb.obs.astype(object), ref.obs.astype(object))


def test_feeds_voom(cells):
    pb = flashmm.pseudobulk(cells, by=["donor", "celltype"], min_cells=5)
    v = flashmm.voom(pb, "~ celltype")
    assert v.E.shape == (cells.n_vars, pb.n_obs) and np.all(v.weights > 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"by": ["donor", "tissue"]}, "tissue"),
    ({"by": []}, "at least one"),
    ({"by": ["donor", "donor"]}, "more than once"),
    ({"by": "donor", "min_cells": 0}, "min_cells"),
    ({"by": "donor", "min_cells": 2.5}, "min_cells"),
    ({"by": "donor", "min_cells": 10_000}, "no group"),
    ({"by": "donor", "layer": "raw"}, "raw"),
])
def test_errors(cells, kwargs, match):
    with pytest.raises((DataError, KeyError), match=match):
        flashmm.pseudobulk(cells, **kwargs)


def test_missing_labels_and_non_anndata(cells):
    ad = cells.copy()
    ad.obs["celltype"] = ad.obs["celltype"].where(np.arange(ad.n_obs) != 3)
    with pytest.raises(DataError, match="missing values"):
        flashmm.pseudobulk(ad, by=["donor", "celltype"])
    with pytest.raises(DataError, match="AnnData"):
        flashmm.pseudobulk(cells.X, by="donor")


def test_nonfinite_counts_raise(cells):
    ad = cells.copy()
    ad.X = ad.layers["dense"].copy()
    ad.X[5, 2] = np.nan
    with pytest.raises(DataError):
        flashmm.pseudobulk(ad, by="donor")


def test_group_names_are_unique():
    obs = pd.DataFrame({"a": ["x_y", "x", "x_y", "x"], "b": ["z", "y_z", "z", "y_z"]},
                       index=[f"c{i}" for i in range(4)])
    ad = anndata.AnnData(X=np.arange(8.0).reshape(4, 2), obs=obs)
    pb = flashmm.pseudobulk(ad, by=["a", "b"])
    assert pb.n_obs == 2 and pb.obs_names.is_unique
    np.testing.assert_array_equal(pb.X, [[2.0 + 6.0, 3.0 + 7.0], [0.0 + 4.0, 1.0 + 5.0]])


def test_fractional_and_negative_counts_need_allow_non_integer(cells):
    ad = cells.copy()
    ad.X = ad.X.astype(float)
    ad.X.data[4] = 1.5
    with pytest.raises(DataError, match="1 values of cells .* are non-integer"):
        flashmm.pseudobulk(ad, by="donor")
    dense = ad.copy()
    dense.X = ad.layers["dense"] - 1.0                      # negative (and dense)
    with pytest.raises(DataError, match="negative .*allow_non_integer=True"):
        flashmm.pseudobulk(dense, by="donor")
    pb = flashmm.pseudobulk(dense, by="donor", allow_non_integer=True)
    ref = _groupby_sum(dense, ["donor"])
    np.testing.assert_array_equal(_dense(pb.X), ref.to_numpy())


def test_zero_cell_groups_are_dropped_with_a_warning(cells):
    # donor is categorical with an unused category d5: 6 x 3 = 18 combinations, 15 occur
    n_groups = cells.obs.groupby(["donor", "celltype"], observed=True).ngroups
    with pytest.warns(UserWarning, match=f"{18 - n_groups} of the 18 combinations"):
        pb = flashmm.pseudobulk(cells, by=["donor", "celltype"])
    assert pb.n_obs == n_groups and pb.obs["n_cells"].min() >= 1
    ad = cells.copy()
    ad.obs["donor"] = ad.obs["donor"].astype(str)            # no declared categories: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flashmm.pseudobulk(ad, by=["donor"])
