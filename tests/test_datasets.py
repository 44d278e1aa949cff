"""Tests for flashmm.datasets.simulate_rnaseq."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

anndata = pytest.importorskip("anndata")

from flashmm.datasets import _rnbinom_block, simulate_rnaseq  # noqa: E402

SMALL = {"n_genes": 60, "n_cells": 400, "n_samples": 6, "n_celltypes": 3}


def _dense(adata):
    return adata.X.toarray()


def _nb_reference(rng, means, dispersions, n_cells):
    """Cells x genes NB counts drawn with numpy's own sampler."""
    size = 1.0 / dispersions
    return rng.negative_binomial(size, size / (size + means), size=(n_cells, means.size))


# ----------------------------------------------------------------- sampler
def test_nb_sampler_matches_pmf():
    # one column per regime: tiny mean, heavy tail, near-Poisson, close to and
    # above the switch to numpy's sampler (mean 8 or mean * dispersion 8)
    mu = np.array([0.05, 0.7, 3.0, 7.9, 30.0, 2.0])
    size = np.array([0.3, 0.1, 1e6, 2.0, 2.0, 0.05])
    n = 100_000
    counts = _rnbinom_block(
        np.random.default_rng(0), np.tile(mu, (n, 1)).astype(np.float32), size
    ).reshape(n, mu.size)
    assert counts.dtype.kind == "i" and counts.min() >= 0
    for j in range(mu.size):
        p = size[j] / (size[j] + mu[j])
        ks = np.arange(60)
        expected = stats.nbinom.pmf(ks, size[j], p)
        observed = np.bincount(counts[:, j], minlength=ks.size)[: ks.size] / n
        # 5 binomial standard errors (plus a small floor) per probability
        tol = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-4
        assert np.all(np.abs(observed - expected) <= tol), j
        mean, var = stats.nbinom.stats(size[j], p, moments="mv")
        assert abs(counts[:, j].mean() - mean) < 5 * np.sqrt(var / n)


# -------------------------------------------------------- reproducibility
def test_same_seed_identical_different_seed_differs():
    a = simulate_rnaseq(**SMALL, seed=11)
    b = simulate_rnaseq(**SMALL, seed=11)
    c = simulate_rnaseq(**SMALL, seed=12)
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert (a.X != c.X).nnz > 0
    assert not a.var["beta"].equals(c.var["beta"])
    # a Generator is accepted as seed, too
    g1 = simulate_rnaseq(**SMALL, seed=np.random.default_rng(5))
    g2 = simulate_rnaseq(**SMALL, seed=np.random.default_rng(5))
    assert (g1.X != g2.X).nnz == 0


# ------------------------------------------------------ shapes and names
def test_shapes_names_and_types():
    adata = simulate_rnaseq(n_genes=50, n_cells=300, n_samples=5, n_celltypes=4, seed=1)
    assert adata.shape == (300, 50)
    assert list(adata.obs_names) == [f"Cell{i}" for i in range(1, 301)]
    assert list(adata.var_names) == [f"Gene{i}" for i in range(1, 51)]
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.X.dtype == np.float64
    x = _dense(adata)
    assert np.array_equal(x, np.round(x)) and x.min() >= 0 and x.sum() > 0
    for col in ("sam", "cls", "trt"):
        assert isinstance(adata.obs[col].dtype, pd.CategoricalDtype)
        cats = list(adata.obs[col].cat.categories)
        assert cats == sorted(cats)
    assert adata.obs["sam"].nunique() == 5
    assert adata.obs["cls"].nunique() == 4
    assert list(adata.obs["trt"].cat.categories) == ["A", "B"]
    assert adata.uns["simulation"]["treated"] == "B"
    np.testing.assert_array_equal(adata.obs["libsize"].to_numpy(), x.sum(axis=1))
    for col in ("de", "beta", "de_celltype", "base_mean", "dispersion"):
        assert col in adata.var.columns
    assert adata.var["de"].dtype == bool
    assert adata.varm["random_effects"].shape == (50, 5)


def test_random_effects_variance():
    adata = simulate_rnaseq(
        n_genes=400, n_cells=200, n_samples=25, var_random_effects=0.3, seed=2
    )
    b = adata.varm["random_effects"]
    # 10,000 N(0, 0.3) draws: sd of the sample variance is ~0.3 * sqrt(2/1e4)
    assert abs(b.var() - 0.3) < 0.03
    zero = simulate_rnaseq(**SMALL, var_random_effects=0.0, seed=2)
    assert np.all(zero.varm["random_effects"] == 0)


# ------------------------------------------------------------ metadata
def test_samples_nested_in_conditions():
    adata = simulate_rnaseq(
        n_genes=20, n_cells=1000, n_samples=9, n_celltypes=3, samples_nested=True, seed=3
    )
    tab = pd.crosstab(adata.obs["sam"], adata.obs["trt"])
    assert ((tab > 0).sum(axis=1) == 1).all()
    samples_per_condition = (tab > 0).sum(axis=0)
    assert samples_per_condition.max() - samples_per_condition.min() <= 1
    assert adata.uns["simulation"]["samples_nested"]


def test_samples_not_nested():
    adata = simulate_rnaseq(
        n_genes=20, n_cells=1000, n_samples=9, n_celltypes=3, samples_nested=False, seed=3
    )
    tab = pd.crosstab(adata.obs["sam"], adata.obs["trt"])
    assert ((tab > 0).sum(axis=1) == 2).all()
    assert not adata.uns["simulation"]["samples_nested"]


def test_user_metadata_used_and_resampled():
    rng = np.random.default_rng(0)
    n = 500
    meta = pd.DataFrame(
        {
            "sam": rng.choice(["p1", "p2", "p3", "p4"], n),
            "cls": rng.choice(["T", "B", "NK"], n),
            "trt": pd.Categorical(
                rng.choice(["stim", "ctrl"], n), categories=["stim", "ctrl"]
            ),
            "libsize": rng.uniform(1000, 5000, n),
        }
    )
    adata = simulate_rnaseq(n_genes=30, metadata=meta, seed=1)
    assert adata.n_obs == n
    assert np.array_equal(adata.obs["sam"].astype(str).to_numpy(), meta["sam"].to_numpy())
    # the categorical order is respected: the last category is the treated one
    assert adata.uns["simulation"]["treated"] == "ctrl"
    assert list(adata.obs["cls"].cat.categories) == ["B", "NK", "T"]
    # the default number of DE genes is the number of cell types
    assert adata.var["de"].sum() == 3
    # library size adjustment uses the given library sizes
    lib = meta["libsize"].to_numpy()
    np.testing.assert_allclose(adata.obs["size_factor"].to_numpy(), lib / lib.mean())

    resampled = simulate_rnaseq(n_genes=30, n_cells=1200, metadata=meta, seed=1)
    assert resampled.n_obs == 1200
    assert set(resampled.obs["sam"].astype(str)) <= set(meta["sam"])

    with pytest.raises(ValueError, match="missing"):
        simulate_rnaseq(n_genes=30, metadata=meta.drop(columns="cls"))
    with pytest.raises(ValueError, match="two conditions"):
        simulate_rnaseq(n_genes=30, metadata=meta.assign(trt="x"))


# ------------------------------------------------------------- DE genes
@pytest.mark.parametrize(
    ("direction", "min_beta", "max_beta"),
    [("both", 0.25, 1.0), ("both", -1.0, -0.25), ("up", 0.5, 2.0), ("down", -1.5, -0.3)],
)
def test_de_genes_count_range_and_sign(direction, min_beta, max_beta):
    adata = simulate_rnaseq(
        n_genes=200,
        n_cells=200,
        n_celltypes=4,
        n_de_genes=40,
        direction=direction,
        min_beta=min_beta,
        max_beta=max_beta,
        seed=4,
    )
    var = adata.var
    de = var["de"].to_numpy()
    assert de.sum() == 40
    beta = var["beta"].to_numpy()
    assert np.all(beta[~de] == 0)
    lo, hi = sorted((abs(min_beta), abs(max_beta)))
    assert np.all((np.abs(beta[de]) >= lo) & (np.abs(beta[de]) <= hi))
    if direction == "up":
        assert np.all(beta[de] > 0)
    elif direction == "down":
        assert np.all(beta[de] < 0)
    else:  # 40 random signs: all equal with probability 2**-39
        assert (beta[de] > 0).any() and (beta[de] < 0).any()
    assert set(var.loc[~de, "de_celltype"]) == {""}
    assert var.loc[de, "de_celltype"].astype(str).value_counts().to_dict() == {
        "C1": 10, "C2": 10, "C3": 10, "C4": 10
    }
    assert list(adata.uns["simulation"]["de_genes"]) == list(adata.var_names[de])


def test_de_genes_per_celltype_and_uneven_split():
    adata = simulate_rnaseq(
        n_genes=50, n_cells=100, n_celltypes=3, de_genes_per_celltype={"C1": 4, "C3": 1}, seed=5
    )
    counts = adata.var.loc[adata.var["de"], "de_celltype"].astype(str).value_counts()
    assert counts.to_dict() == {"C1": 4, "C3": 1}
    assert adata.uns["simulation"]["n_de_genes"] == 5
    uneven = simulate_rnaseq(n_genes=50, n_cells=100, n_celltypes=3, n_de_genes=5, seed=5)
    counts = uneven.var.loc[uneven.var["de"], "de_celltype"].astype(str).value_counts()
    assert counts.to_dict() == {"C1": 2, "C2": 2, "C3": 1}
    none = simulate_rnaseq(n_genes=50, n_cells=100, n_de_genes=0, seed=5)
    assert not none.var["de"].any() and len(none.uns["simulation"]["de_genes"]) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"direction": "sideways"},
        {"direction": "both", "min_beta": -0.5, "max_beta": 1.0},
        {"direction": "both", "min_beta": 0.0, "max_beta": 1.0},
        {"direction": "up", "min_beta": 0.0, "max_beta": 1.0},
        {"direction": "up", "min_beta": 1.0, "max_beta": 0.5},
        {"direction": "down"},  # defaults 0.25..1 are positive
        {"direction": "down", "min_beta": -0.2, "max_beta": -1.0},
        {"n_de_genes": 61},
        {"de_genes_per_celltype": {"nope": 2}},
        {"de_genes_per_celltype": {"C1": 2}, "n_de_genes": 3},
        {"var_random_effects": -0.1},
        {"n_samples": 1, "n_conditions": 2},
        {"n_conditions": 1},
    ],
)
def test_invalid_arguments_raise(kwargs):
    args = {**SMALL, **kwargs}
    with pytest.raises(ValueError):
        simulate_rnaseq(**args, seed=0)


# ------------------------------------------------------------- reference
def test_reference_estimates_and_gene_names():
    rng = np.random.default_rng(7)
    true_mean = np.array([0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 0.8, 3.0])
    true_disp = np.array([1.0, 0.5, 0.2, 0.5, 0.1, 0.3, 0.4, 0.8])
    ref_counts = _nb_reference(rng, true_mean, true_disp, 30_000)
    names = [f"g_{i}" for i in range(true_mean.size)]
    ref = pd.DataFrame(ref_counts, columns=names)

    sim = simulate_rnaseq(
        reference=ref,
        n_cells=20_000,
        n_de_genes=0,
        var_random_effects=0.0,
        adjust_library_size=False,
        seed=8,
    )
    assert list(sim.var_names) == names  # all genes: names and order kept
    assert sim.n_obs == 20_000
    # sd of a sample mean of 30,000 NB draws is at most ~1.2% of the mean
    # here (mean 0.5, dispersion 1), so 5% is > 4 standard errors
    np.testing.assert_allclose(sim.var["ref_mean"], true_mean, rtol=0.05)
    # moment estimates of the dispersion are noisier (sd up to ~4% for these
    # parameters, largest deviation in 200 replicates ~11%)
    np.testing.assert_allclose(sim.var["ref_dispersion"], true_disp, rtol=0.2)
    np.testing.assert_allclose(sim.var["base_mean"], sim.var["ref_mean"])
    # the simulated counts follow the estimated parameters (no size factors,
    # random or DE effects here): check mean and variance per gene
    x = _dense(sim)
    m, d = sim.var["ref_mean"].to_numpy(), sim.var["ref_dispersion"].to_numpy()
    np.testing.assert_allclose(x.mean(axis=0), m, rtol=0.05)
    np.testing.assert_allclose(x.var(axis=0), m + d * m**2, rtol=0.15)
    full = sim.uns["simulation"]
    assert list(full["reference_genes"]) == names
    assert bool(full["reference"])


def test_reference_subset_anndata_and_library_size():
    rng = np.random.default_rng(9)
    means = np.exp(rng.normal(0, 1, 40))
    counts = _nb_reference(rng, means, np.full(40, 0.3), 2000)
    ref = anndata.AnnData(
        X=sp.csr_matrix(counts.astype(np.float64)),
        var=pd.DataFrame(index=[f"r{i}" for i in range(40)]),
    )
    full = simulate_rnaseq(reference=ref, n_cells=500, seed=1)
    assert list(full.var_names) == list(ref.var_names)
    # library sizes resemble the reference's (random effects inflate the
    # mean by exp(0.1 / 2) ~ 5%; allow 15% for that and sampling noise)
    ref_lib = counts.sum(axis=1).mean()
    assert abs(full.obs["libsize"].mean() / ref_lib - 1) < 0.15

    sub = simulate_rnaseq(reference=counts, n_genes=15, n_cells=100, seed=1)
    assert list(sub.var_names) == [f"Gene{i}" for i in range(1, 16)]
    # drawn without replacement from the reference genes
    assert sub.var["ref_gene"].nunique() == 15
    assert set(sub.var["ref_gene"]) <= {f"Gene{i}" for i in range(1, 41)}
    more = simulate_rnaseq(reference=counts, n_genes=60, n_cells=50, seed=1)
    assert more.n_vars == 60

    with pytest.raises(ValueError):
        simulate_rnaseq(reference=-counts, n_cells=10)


# ------------------------------------------------------------ round trip
def test_h5ad_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.poisson(3.0, size=(100, 25))
    for adata in (
        simulate_rnaseq(**SMALL, seed=21),
        simulate_rnaseq(reference=ref, n_cells=50, seed=21),
        simulate_rnaseq(**SMALL, n_de_genes=0, seed=21),
    ):
        path = tmp_path / "sim.h5ad"
        adata.write_h5ad(path)
        back = anndata.read_h5ad(path)
        assert back.shape == adata.shape
        assert (back.X != adata.X).nnz == 0
        pd.testing.assert_frame_equal(back.obs, adata.obs, check_categorical=True)
        pd.testing.assert_frame_equal(back.var, adata.var, check_dtype=False)
        sim, sim_back = adata.uns["simulation"], back.uns["simulation"]
        assert set(sim) == set(sim_back)
        assert sim_back["treated"] == sim["treated"]
        assert list(sim_back["de_genes"]) == list(sim["de_genes"])
        np.testing.assert_array_equal(back.varm["random_effects"], adata.varm["random_effects"])


# ------------------------------------------------------------- DE effect
def test_de_effect_is_visible():
    beta = 1.0
    # Poisson-like reference genes with mean ~10 so the DE gene is well expressed
    ref = np.random.default_rng(1).poisson(10.0, size=(1000, 10))
    adata = simulate_rnaseq(
        reference=ref,
        n_cells=8000,
        n_celltypes=2,
        n_samples=10,
        de_genes_per_celltype={"C1": 1},
        direction="up",
        min_beta=beta,
        max_beta=beta,
        var_random_effects=0.0,
        adjust_library_size=False,
        seed=3,
    )
    gene = adata.uns["simulation"]["de_genes"][0]
    assert adata.var.loc[gene, "beta"] == beta
    y = adata[:, gene].X.toarray().ravel()
    obs = adata.obs
    treated = (obs["trt"] == "B").to_numpy()
    c1 = (obs["cls"] == "C1").to_numpy()

    def log_ratio(sel):
        return np.log(y[sel & treated].mean() / y[sel & ~treated].mean())

    # ~2000 cells per group with means ~10 and ~27: the sd of the log ratio
    # of group means is ~0.01, so 0.05 is a 5-sigma tolerance
    assert abs(log_ratio(c1) - beta) < 0.05
    assert abs(log_ratio(~c1)) < 0.05  # other cell type unaffected
    other = adata[:, adata.var_names[~adata.var["de"].to_numpy()][0]].X.toarray().ravel()
    assert abs(np.log(other[c1 & treated].mean() / other[c1 & ~treated].mean())) < 0.05

    # on log counts the shift is a bit smaller than beta: log1p compresses
    # (for Poisson means 10 -> 27 the expected shift is ~log(28/11) = 0.93),
    # so allow 0.15 around beta while still excluding "no effect"
    logy = np.log1p(y)
    shift = logy[c1 & treated].mean() - logy[c1 & ~treated].mean()
    assert abs(shift - beta) < 0.15
