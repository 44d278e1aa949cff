"""Sufficient statistics from dask arrays equal the in-memory ones."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from flashmm._design import build_design
from flashmm._errors import DataError
from flashmm.dask import stats_from_anndata_dask, stats_from_dask
from flashmm.stats import SufficientStats

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

RTOL = 1e-10
ARRAYS = ("XX", "ZX", "ZZ", "XY", "ZY", "yy")


def assert_stats_equal(got: SufficientStats, ref: SufficientStats, rtol: float = RTOL) -> None:
    """Every statistic within ``rtol`` of the reference (relative to its scale)."""
    assert isinstance(got, SufficientStats)
    assert got.n == ref.n
    assert got.gene_names == ref.gene_names
    assert got.exog_names == ref.exog_names
    assert [(c.name, c.levels) for c in got.components] == [
        (c.name, c.levels) for c in ref.components
    ]
    assert got.transform == ref.transform
    for key in ARRAYS:
        a, b = getattr(got, key), getattr(ref, key)
        assert a.shape == b.shape, key
        scale = max(float(np.max(np.abs(b))), 1e-300)
        err = float(np.max(np.abs(a - b))) / scale
        assert err <= rtol, f"{key}: relative error {err:.3g}"


def assert_stats_identical(a: SufficientStats, b: SufficientStats) -> None:
    for key in ARRAYS:
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


def make_design(n: int, seed: int = 0):
    """Two fixed terms, a group intercept and a crossed component."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    groups = rng.choice([f"s{i}" for i in range(6)], size=n)
    batch = rng.choice(["b0", "b1", "b2", "b3"], size=n)
    return build_design(X, n, exog_vc={"sample": groups, "batch": batch})


def make_counts(n: int, genes: int, seed: int = 1, density: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = rng.poisson(3.0, size=(n, genes)).astype(np.float64)
    y[rng.random((n, genes)) > density] = 0.0
    return y


N, G = 900, 40


@pytest.fixture(scope="module")
def design():
    return make_design(N)


@pytest.fixture(scope="module")
def counts():
    return make_counts(N, G)


# ------------------------------------------------------------------ quick
@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
def test_dense_chunks(design, counts, scheduler):
    ref = SufficientStats.from_design(design, counts)
    got = stats_from_dask(design, da.from_array(counts, chunks=(200, -1)), scheduler=scheduler)
    assert_stats_equal(got, ref)
    # genuinely compares numbers: a different data set is detected
    other = SufficientStats.from_design(design, counts + 1e-6)
    with pytest.raises(AssertionError):
        assert_stats_equal(got, other)


def test_sparse_chunks_uneven(design, counts):
    Y = sp.csr_matrix(counts)
    ref = SufficientStats.from_design(design, Y)
    arr = da.from_array(Y, chunks=((1, 250, 349, 7, 293), (15, 25)), asarray=False)
    assert arr.chunks[0] == (1, 250, 349, 7, 293)
    got = stats_from_dask(design, arr, scheduler="threads", split_every=2)
    assert_stats_equal(got, ref)


def test_map_blocks_csr_chunks_with_transform(design, counts):
    """CSR chunks produced lazily by map_blocks, log transform per chunk."""
    dense = da.from_array(counts, chunks=(128, -1))
    csr = dense.map_blocks(sp.csr_matrix, dtype=np.float64,
                           meta=sp.csr_matrix((0, 0), dtype=np.float64))
    for transform in ("log2p1", "log1p"):
        ref = SufficientStats.from_design(design, sp.csr_matrix(counts), transform=transform)
        got = stats_from_dask(design, csr, transform=transform, scheduler="threads")
        assert_stats_equal(got, ref)
        assert got.transform == transform


def test_callable_transform_dense(design, counts):
    def sqrt(v):
        return np.sqrt(v)

    ref = SufficientStats.from_design(design, counts, transform=sqrt)
    got = stats_from_dask(design, da.from_array(counts, chunks=(333, 7)), transform=sqrt,
                          scheduler="synchronous")
    assert_stats_equal(got, ref)


def test_float32_chunks_and_names(design, counts):
    names = [f"g{j}" for j in range(G)]
    y32 = counts.astype(np.float32)
    ref = SufficientStats.from_design(design, y32, gene_names=names)
    got = stats_from_dask(design, da.from_array(y32, chunks=(100, -1)), gene_names=names,
                          scheduler="threads")
    assert_stats_equal(got, ref)


@pytest.mark.parametrize("split_every", [2, 3, 50])
def test_reduction_shape_does_not_matter(design, counts, split_every):
    ref = SufficientStats.from_design(design, counts, transform="log1p")
    arr = da.from_array(counts, chunks=(37, -1))
    got = stats_from_dask(design, arr, transform="log1p", split_every=split_every,
                          scheduler="threads")
    assert_stats_equal(got, ref)


def test_compute_false_returns_delayed(design, counts):
    from dask.delayed import Delayed

    lazy = stats_from_dask(design, da.from_array(counts, chunks=(300, -1)), compute=False)
    assert isinstance(lazy, Delayed)
    got = lazy.compute(scheduler="threads")
    assert_stats_equal(got, SufficientStats.from_design(design, counts))


def test_tasks_get_only_their_design_rows(design, counts):
    """No task of the graph carries the whole design matrix."""
    lazy = stats_from_dask(design, da.from_array(counts, chunks=(100, -1)), compute=False)
    graph = dict(lazy.__dask_graph__())
    arrays = [v for v in graph.values() if isinstance(v, np.ndarray)]
    csrs = [v for v in graph.values() if sp.issparse(v)]
    # older dask keeps literals raw; newer wraps them in DataNode(value=...)
    arrays += [v.value for v in graph.values() if isinstance(getattr(v, "value", None), np.ndarray)]
    csrs += [v.value for v in graph.values() if sp.issparse(getattr(v, "value", None))]
    assert arrays and csrs
    assert max(a.shape[0] for a in arrays) <= 100
    assert max(m.shape[0] for m in csrs) <= 100


def test_anndata_x_and_layer(design, counts):
    anndata = pytest.importorskip("anndata")
    names = [f"gene_{j}" for j in range(G)]
    adata = anndata.AnnData(
        X=da.from_array(sp.csr_matrix(counts), chunks=(250, -1), asarray=False),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(N)]),
        var=pd.DataFrame(index=names),
    )
    adata.layers["raw"] = da.from_array(2.0 * counts, chunks=(400, -1))
    ref = SufficientStats.from_design(design, sp.csr_matrix(counts), gene_names=names,
                                      transform="log1p")
    assert_stats_equal(stats_from_dask(design, adata, transform="log1p", scheduler="threads"),
                       ref)
    ref2 = SufficientStats.from_design(design, 2.0 * counts, gene_names=names)
    assert_stats_equal(stats_from_anndata_dask(adata, design, layer="raw", scheduler="threads"),
                       ref2)
    with pytest.raises(DataError, match="layer"):
        stats_from_anndata_dask(adata, design, layer="nope")


def test_in_memory_input_is_wrapped(design, counts):
    ref = SufficientStats.from_design(design, sp.csc_matrix(counts))
    got = stats_from_dask(design, sp.csc_matrix(counts), chunk_size=128, scheduler="threads")
    assert_stats_equal(got, ref)


def test_single_gene_vector(design, counts):
    ref = SufficientStats.from_design(design, counts[:, 3])
    got = stats_from_dask(design, da.from_array(counts[:, 3], chunks=200), scheduler="threads")
    assert_stats_equal(got, ref)


def test_additivity_over_cell_subsets(design, counts):
    """Statistics of two halves computed separately add up to the whole."""
    half = N // 2
    a = stats_from_dask(design.subset(np.arange(half)),
                        da.from_array(counts[:half], chunks=(100, -1)), scheduler="threads")
    b = stats_from_dask(design.subset(np.arange(half, N)),
                        da.from_array(counts[half:], chunks=(100, -1)), scheduler="threads")
    assert_stats_equal(a + b, SufficientStats.from_design(design, counts))


def test_errors(design, counts):
    arr = da.from_array(counts, chunks=(300, -1))
    with pytest.raises(DataError, match="genes x cells"):
        stats_from_dask(design, arr.T)
    with pytest.raises(DataError, match="unknown chunk sizes"):
        stats_from_dask(design, arr[arr[:, 0] >= 0])
    bad = counts.copy()
    bad[700, 5] = np.nan
    with pytest.raises(DataError, match="gene5"):
        stats_from_dask(design, da.from_array(bad, chunks=(300, -1)), scheduler="synchronous")
    neg = counts.copy()
    neg[10, 33] = -1.0
    with pytest.raises(DataError, match="gene33"):
        stats_from_dask(design, da.from_array(neg, chunks=(300, 20)), transform="log1p",
                        scheduler="synchronous")
    with pytest.raises(ValueError, match="split_every"):
        stats_from_dask(design, arr, split_every=1)


# ------------------------------------------------------------ cluster (slow)
def _lazy_counts(n: int, genes: int, chunk: int, delay: float):
    """CSR chunks generated from their seed on the worker; each sleeps ``delay``."""
    def gen(block_info=None):
        info = block_info[None]
        (start, stop), _ = info["array-location"]
        rng = np.random.default_rng([7, start])
        y = rng.poisson(2.0, size=(stop - start, genes)).astype(np.float64)
        y[rng.random(y.shape) > 0.4] = 0.0
        time.sleep(delay)
        return sp.csr_matrix(y)

    chunks = (tuple([chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])), (genes,))
    return da.map_blocks(gen, chunks=chunks, dtype=np.float64,
                         meta=sp.csr_matrix((0, 0), dtype=np.float64))


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, silence_logs=40,
    )
    client = distributed.Client(cluster)
    yield cluster, client
    client.close()
    cluster.close()


@pytest.mark.slow
def test_local_cluster_equals_in_memory(cluster_client, design, counts):
    _, client = cluster_client
    assert client.status == "running"  # the default scheduler while the client is open
    Y = sp.csr_matrix(counts)
    arr = da.from_array(Y, chunks=((100, 300, 50, 450), (25, 15)), asarray=False)
    ref = SufficientStats.from_design(design, Y, transform="log2p1")
    got = stats_from_dask(design, arr, transform="log2p1", split_every=2)  # uses the client
    assert_stats_equal(got, ref)
    dense = da.from_array(counts, chunks=(128, -1)).map_blocks(np.asarray)
    assert_stats_equal(stats_from_dask(design, dense), SufficientStats.from_design(design, counts))


@pytest.mark.slow
def test_worker_killed_mid_reduction(cluster_client):
    """Kill a worker holding partials while the reduction runs: same answer."""
    _, client = cluster_client
    n, genes, chunk = 2400, 60, 100
    design = make_design(n, seed=3)
    lazy = _lazy_counts(n, genes, chunk, delay=0.25)
    local = _lazy_counts(n, genes, chunk, delay=0.0).compute(scheduler="synchronous")
    ref = SufficientStats.from_design(design, local, transform="log1p")

    clean = stats_from_dask(design, lazy, transform="log1p", split_every=3)
    assert_stats_equal(clean, ref)

    future = client.compute(stats_from_dask(design, lazy, transform="log1p", split_every=3,
                                            compute=False))
    deadline = time.time() + 30
    victim = None
    while victim is None:  # wait until a worker holds at least one partial sum: the victim
        for worker, held in sorted(client.has_what().items()):
            if any("chunk_partial" in str(k) or "combine" in str(k) for k in held):
                victim = worker
                break
        assert victim is not None or time.time() < deadline, "no worker ever held a partial"
        time.sleep(0.05)
    assert not future.done()
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    got = future.result(timeout=120)
    # the nanny restarted the killed worker under a new address
    assert victim not in client.scheduler_info()["workers"]
    assert_stats_equal(got, ref)
    assert_stats_identical(got, clean)
