"""The statistics pass: fused kernel against plain scipy/numpy sums, chunking, dtypes, threads."""

from __future__ import annotations

import logging

import numba
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from flashmm import DataError
from flashmm._design import build_design
from flashmm._memory import MemoryBudgetError
from flashmm.stats import SufficientStats

# float64 sums of a few hundred terms added in another order differ by ~n * eps
# relative to the sum of the terms' magnitudes (not to the sum itself, which can cancel)
RTOL = 1e-12


def _data(n=600, genes=37, density=0.3, seed=0):
    rng = np.random.default_rng(seed)
    counts = sp.random(n, genes, density=density, format="csr", rng=rng,
                       data_rvs=lambda k: rng.poisson(2.0, size=k) + 1.0)
    counts.data[::7] += 0.37           # some non-integer values (no table look-up)
    ct = rng.integers(0, 3, n)
    onehot = np.eye(3)[ct]
    X = np.column_stack([onehot, onehot[:, 1] * rng.normal(size=n), rng.normal(size=n)])
    groups = rng.integers(0, 7, n).astype(str)
    slope = rng.normal(size=n)
    design = build_design(X, n, groups=groups, exog_re=np.column_stack([np.ones(n), slope]))
    return counts, design


def _expected(counts, design, transform):
    """The statistics by plain scipy/numpy products on a float64 transformed copy."""
    Y = sp.csr_matrix(counts, dtype=np.float64)
    if transform == "log2p1":
        Y.data = np.log2(1.0 + Y.data)
    elif transform == "log1p":
        Y.data = np.log1p(Y.data)
    X, Z = design.exog, design.exog_re
    A = abs(Y)
    return {"XY": np.asarray((Y.T @ X).T), "ZY": np.asarray((Z.T @ Y).toarray()),
            "yy": np.asarray(Y.multiply(Y).sum(axis=0)).ravel(),
            "n_cells": np.diff(Y.tocsc().indptr),
            "scale": {"XY": np.asarray((A.T @ np.abs(X)).T), "ZY": np.asarray((abs(Z).T @ A).toarray()),
                      "yy": np.asarray(Y.multiply(Y).sum(axis=0)).ravel()}}


def _check(stats, expected):
    for key in ("XY", "ZY", "yy"):
        err = np.abs(getattr(stats, key) - expected[key])
        assert np.all(err <= RTOL * expected["scale"][key]), (key, float(np.max(err)))
    np.testing.assert_array_equal(stats.n_cells, expected["n_cells"])


KINDS = {
    "csr": lambda m, dt: sp.csr_matrix(m, dtype=dt),
    "csc": lambda m, dt: sp.csc_matrix(m, dtype=dt),
    "coo": lambda m, dt: sp.coo_matrix(m, dtype=dt),
    "dense": lambda m, dt: m.toarray().astype(dt),
    "fortran": lambda m, dt: np.asfortranarray(m.toarray().astype(dt)),
    "dataframe": lambda m, dt: pd.DataFrame(m.toarray().astype(dt)),
}


@pytest.mark.parametrize("transform", [None, "log2p1", "log1p"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_pass_equals_plain_products(kind, dtype, transform):
    counts, design = _data()
    counts = sp.csr_matrix(counts, dtype=dtype)          # the values as the input stores them
    stats = SufficientStats.from_design(design, KINDS[kind](counts, dtype), transform=transform,
                                        chunk_size=97)
    _check(stats, _expected(counts, design, transform))


def test_unsorted_and_duplicate_csr_indices_are_canonicalised():
    counts, design = _data()
    coo = counts.tocoo()
    # every entry split in two halves, in reverse order: duplicates, unsorted rows
    rows = np.concatenate([coo.row, coo.row])[::-1]
    cols = np.concatenate([coo.col, coo.col])[::-1]
    vals = np.concatenate([coo.data / 2, coo.data / 2])[::-1]
    messy = sp.csr_matrix((vals, cols, np.r_[0, np.cumsum(np.bincount(rows, minlength=600))]),
                          shape=counts.shape)
    messy.indices = cols[np.argsort(rows, kind="stable")].astype(np.int32)
    messy.data = vals[np.argsort(rows, kind="stable")]
    messy.has_canonical_format = False
    stats = SufficientStats.from_design(design, messy, transform="log2p1", chunk_size=50)
    _check(stats, _expected(counts, design, "log2p1"))


def test_callable_transform_and_chunkings_agree():
    counts, design = _data()
    ref = _expected(counts, design, "log1p")
    for chunk in (1, 13, 600, 10_000):
        _check(SufficientStats.from_design(design, counts, transform=np.log1p, chunk_size=chunk), ref)


def test_same_bits_whatever_the_number_of_threads():
    """Each gene's sums are added in cell order by one thread: bit-identical for 1 or 2 threads."""
    counts, design = _data(genes=101)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = SufficientStats.from_design(design, counts, transform="log2p1", chunk_size=50)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = SufficientStats.from_design(design, counts, transform="log2p1", chunk_size=50)
    finally:
        numba.set_num_threads(before)
    for key in ("XY", "ZY", "yy", "n_cells"):
        np.testing.assert_array_equal(getattr(one, key), getattr(many, key))


def test_chunk_size_from_the_memory_budget_is_logged(caplog):
    counts, design = _data()
    per_cell = (counts.data.itemsize + counts.indices.itemsize) * counts.nnz / counts.shape[0]
    budget = 100_000                     # running sums ~ 37 * (5 + 14 + 2) * 8 B = 6 KB
    with caplog.at_level(logging.INFO, logger="flashmm"):
        stats = SufficientStats.from_design(design, counts, transform="log2p1", max_memory=budget)
    _check(stats, _expected(counts, design, "log2p1"))
    line = next(r.getMessage() for r in caplog.records if "cells per chunk" in r.getMessage())
    cells = int(line.split(": ")[1].split(" cells per chunk")[0])
    assert 2 * cells * per_cell <= budget and cells < counts.shape[0]
    assert any("peak memory" in r.getMessage() and "cells/s" in r.getMessage() for r in caplog.records)
    with pytest.raises(MemoryBudgetError, match="statistics pass needs at least"):
        SufficientStats.from_design(design, counts, max_memory=1000)


def test_negative_values_under_a_log_name_the_gene():
    counts, design = _data()
    counts = counts.tolil()
    counts[5, 3] = -1.0
    counts = counts.tocsr()
    for endog in (counts, counts.toarray(), counts.tocsc()):
        with pytest.raises(DataError, match="negative values.*'gene3'"):
            SufficientStats.from_design(design, endog, transform="log2p1", chunk_size=50)
    # without a transform negative values are fine
    SufficientStats.from_design(design, counts, chunk_size=50)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_values_keep_the_error_with_counts(value):
    counts, design = _data()
    dense = counts.toarray().astype(np.float32)
    dense[[3, 400], 5] = value
    dense[9, 6] = value
    with pytest.raises(DataError, match=r"NaN or inf.*'gene5'.*2 gene\(s\) have NaN or inf in 3 cell"):
        SufficientStats.from_design(design, dense, transform="log2p1", chunk_size=100)


def test_cell_counts_add_subset_and_round_trip(tmp_path):
    counts, design = _data()
    a = SufficientStats.from_design(design, counts, chunk_size=100)
    both = a + a
    np.testing.assert_array_equal(both.n_cells, 2 * a.n_cells)
    np.testing.assert_array_equal(a.subset_genes([3, 1]).n_cells, a.n_cells[[3, 1]])
    a.save(tmp_path / "s.npz")
    np.testing.assert_array_equal(SufficientStats.load(tmp_path / "s.npz").n_cells, a.n_cells)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]      # no temporary left behind


@pytest.mark.parametrize("kind", ["csr", "dense", "csc"])
def test_wide_rows(kind):
    """Cells with more than 4 fixed or 2 random non-zeros (the general path)."""
    counts, _ = _data()
    rng = np.random.default_rng(5)
    n = counts.shape[0]
    X = rng.normal(size=(n, 6))
    vc = {name: rng.integers(0, k, n).astype(str) for name, k in (("a", 4), ("b", 5), ("c", 3))}
    wide = build_design(X, n, exog_vc=vc)
    assert np.diff(wide.exog_re.indptr).max() == 3
    narrow_x = build_design(X[:, :2], n, exog_vc=vc)        # 2 fixed, 3 random non-zeros
    for design in (wide, narrow_x):
        stats = SufficientStats.from_design(design, KINDS[kind](counts, np.float32),
                                            transform="log2p1", chunk_size=128)
        _check(stats, _expected(sp.csr_matrix(counts, dtype=np.float32), design, "log2p1"))


def _child_pass(seed):
    counts, design = _data(n=200, seed=seed)
    return float(SufficientStats.from_design(design, counts, transform="log2p1").yy.sum())


def test_fork_after_a_pass_and_passes_from_threads():
    """Processes forked after a pass can run passes (GNU OpenMP would abort them); so can threads."""
    import concurrent.futures
    import multiprocessing

    expected = _child_pass(1)
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        assert list(pool.map(_child_pass, [1, 1])) == [expected, expected]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert list(pool.map(_child_pass, [1, 1, 1])) == [expected] * 3
