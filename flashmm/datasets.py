"""Simulated multi-sample, multi-cell-type single-cell RNA-seq count data.

The main entry point is :func:`simulate_rnaseq`, a negative binomial (NB)
simulator in the spirit of ``simuRNAseq`` from the R package FLASHMM. It is
meant for testing and benchmarking differential expression (DE) workflows
based on linear mixed models: cells are nested in samples (subjects, the
random effect), belong to cell types, and come from one of several
conditions, one of which is "treated". A chosen set of genes is
differentially expressed between the treated and the other conditions in
one specific cell type each.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    import anndata

__all__ = ["simulate_rnaseq"]

#: Lower bound on method-of-moments NB dispersions (Poisson-like genes).
_DISPERSION_FLOOR = 1e-6
#: Number of matrix entries (cells x genes) drawn per block; small enough to
#: stay cache friendly, large enough to amortise per-call overhead. The block
#: layout depends on ``n_genes`` only, so results do not depend on machine.
_BLOCK_ENTRIES = 2**18
#: Entries with an NB mean above this, or a long tail (mean * dispersion above
#: it), are drawn with numpy's sampler; the others with a (faster, exact)
#: inverse-CDF search, whose number of steps grows with the tail length.
_DIRECT_NB_MIN_MEAN = 8.0
#: Means are capped at exp(_LOG_MEAN_CAP) (~1e8) to avoid overflow.
_LOG_MEAN_CAP = float(np.log(1e8))
#: Log-normal defaults used when no reference is given.
_BASE_MEAN_LOG_MEAN = float(np.log(0.6))
_BASE_MEAN_LOG_SD = 1.2
_DISPERSION_LOG_MEAN = float(np.log(0.5))
_DISPERSION_LOG_SD = 0.5
_SIZE_FACTOR_LOG_SD = 0.5
_REQUIRED_METADATA = ("sam", "cls", "trt")
_DIRECTIONS = ("both", "up", "down")


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _validate_effects(direction: str, min_beta: float, max_beta: float) -> None:
    """Check the DE direction against the range of log fold changes."""
    if direction not in _DIRECTIONS:
        raise ValueError(
            f"direction must be one of {_DIRECTIONS}, got {direction!r}"
        )
    if min_beta > max_beta:
        raise ValueError(
            f"min_beta ({min_beta}) must not exceed max_beta ({max_beta})"
        )
    if direction == "both" and not min_beta * max_beta > 0:
        raise ValueError(
            "direction='both' requires min_beta and max_beta of the same sign "
            "and non-zero (they bound |beta|; the sign is random), got "
            f"min_beta={min_beta}, max_beta={max_beta}"
        )
    if direction == "up" and not min_beta > 0:
        raise ValueError(
            f"direction='up' requires min_beta > 0, got min_beta={min_beta}"
        )
    if direction == "down" and not max_beta < 0:
        raise ValueError(
            "direction='down' requires max_beta < 0 (e.g. min_beta=-1.0, "
            f"max_beta=-0.25), got max_beta={max_beta}"
        )


# --------------------------------------------------------------------------
# labels and metadata
# --------------------------------------------------------------------------
def _labels(prefix: str, n: int) -> list[str]:
    """Zero-padded labels, so that lexicographic order is numeric order."""
    width = len(str(n))
    return [f"{prefix}{i:0{width}d}" for i in range(1, n + 1)]


def _condition_labels(n: int) -> list[str]:
    if n <= 26:
        return [chr(ord("A") + i) for i in range(n)]
    return _labels("T", n)


def _as_categorical(values: Any) -> pd.Categorical:
    """String categorical; keeps a given category order, otherwise sorted."""
    if isinstance(values, pd.Series):
        values = values.array
    if isinstance(values, pd.Categorical):
        cat = values.remove_unused_categories()
        mapping = {c: str(c) for c in cat.categories}
        if len(set(mapping.values())) != len(mapping):
            raise ValueError("labels are not unique after conversion to str")
        return cat.rename_categories(mapping)
    arr = np.asarray(values, dtype=object)
    try:
        order = sorted(pd.unique(arr))
    except TypeError:  # mixed, unorderable types
        order = sorted(pd.unique(arr), key=str)
    codes = pd.Categorical(arr, categories=order).codes
    names = [str(c) for c in order]
    if len(set(names)) != len(names):
        raise ValueError("labels are not unique after conversion to str")
    return pd.Categorical.from_codes(codes, categories=names)


def _random_metadata(
    rng: np.random.Generator,
    n_cells: int,
    n_samples: int,
    n_celltypes: int,
    n_conditions: int,
    nested: bool,
) -> pd.DataFrame:
    samples = np.array(_labels("S", n_samples), dtype=object)
    celltypes = np.array(_labels("C", n_celltypes), dtype=object)
    conditions = np.array(_condition_labels(n_conditions), dtype=object)
    # balanced (as equal as possible) random allocation of cells
    sam = rng.permutation(np.arange(n_cells) % n_samples)
    cls = rng.permutation(np.arange(n_cells) % n_celltypes)
    if nested:
        sample_condition = rng.permutation(np.arange(n_samples) % n_conditions)
        trt = sample_condition[sam]
    else:
        # every sample gets its cells split (as evenly as possible) over all
        # conditions, in random order
        trt = np.empty(n_cells, dtype=np.int64)
        for s in range(n_samples):
            idx = np.flatnonzero(sam == s)
            trt[idx] = rng.permutation(np.arange(idx.size) % n_conditions)
    return pd.DataFrame(
        {"sam": samples[sam], "cls": celltypes[cls], "trt": conditions[trt]}
    )


def _prepare_metadata(
    metadata: Any, n_cells: int | None, rng: np.random.Generator
) -> pd.DataFrame:
    if not isinstance(metadata, pd.DataFrame):
        raise TypeError("metadata must be a pandas DataFrame")
    missing = [c for c in _REQUIRED_METADATA if c not in metadata.columns]
    if missing:
        raise ValueError(f"metadata is missing the column(s) {missing}")
    if len(metadata) == 0:
        raise ValueError("metadata has no rows")
    cols = list(_REQUIRED_METADATA)
    if "libsize" in metadata.columns:
        cols.append("libsize")
    meta = metadata[cols].reset_index(drop=True)
    if meta[list(_REQUIRED_METADATA)].isna().to_numpy().any():
        raise ValueError("metadata columns sam, cls, trt must not contain NA")
    if n_cells is not None and n_cells != len(meta):
        rows = rng.integers(0, len(meta), size=n_cells)
        meta = meta.iloc[rows].reset_index(drop=True)
    return meta


# --------------------------------------------------------------------------
# reference data
# --------------------------------------------------------------------------
def _reference_matrix(reference: Any) -> tuple[Any, list[str] | None]:
    """Return (cells x genes matrix as float64 CSR or ndarray, gene names)."""
    names: list[str] | None = None
    if hasattr(reference, "var_names") and hasattr(reference, "X"):  # AnnData
        names = [str(g) for g in reference.var_names]
        mat = reference.X
        if mat is None:
            raise ValueError("reference AnnData has no X matrix")
        if not isinstance(mat, np.ndarray) and not sp.issparse(mat):
            mat = mat[:, :]  # e.g. backed datasets
    elif isinstance(reference, pd.DataFrame):
        names = [str(g) for g in reference.columns]
        mat = reference.to_numpy(dtype=np.float64)
    else:
        mat = reference
    if sp.issparse(mat):
        mat = sp.csr_matrix(mat, dtype=np.float64)
        values = mat.data
    else:
        mat = np.asarray(mat, dtype=np.float64)
        values = mat
    if mat.ndim != 2:
        raise ValueError("reference must be a 2-D cells x genes matrix")
    if mat.shape[0] < 2 or mat.shape[1] < 1:
        raise ValueError(
            "reference must have at least 2 cells (rows) and 1 gene (column), "
            f"got shape {mat.shape}"
        )
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("reference counts must be finite and non-negative")
    return mat, names


def _reference_moments(mat: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene mean, MoM NB dispersion and per-cell library sizes."""
    n_obs = mat.shape[0]
    if sp.issparse(mat):
        mean = np.asarray(mat.mean(axis=0)).ravel()
        sq = np.asarray(mat.multiply(mat).sum(axis=0)).ravel()
        var = (sq - n_obs * mean**2) / (n_obs - 1)
        libsize = np.asarray(mat.sum(axis=1)).ravel()
    else:
        mean = mat.mean(axis=0)
        var = mat.var(axis=0, ddof=1)
        libsize = mat.sum(axis=1)
    var = np.maximum(var, 0.0)
    excess = var - mean
    disp = np.full_like(mean, _DISPERSION_FLOOR)
    pos = mean > 0
    disp[pos] = np.maximum(excess[pos] / mean[pos] ** 2, _DISPERSION_FLOOR)
    return mean, disp, libsize


# --------------------------------------------------------------------------
# negative binomial sampling
# --------------------------------------------------------------------------
def _rnbinom_block(
    rng: np.random.Generator, mu: np.ndarray, size: np.ndarray
) -> np.ndarray:
    """Draw NB counts for one block.

    Parameters
    ----------
    rng
        Random generator.
    mu
        ``(rows, genes)`` float32 C-contiguous array of NB means.
    size
        ``(genes,)`` float64 NB size parameters ``1 / dispersion``.

    Returns
    -------
    Flat (C order) int64 array of counts with ``mu.size`` entries.

    Notes
    -----
    Most single-cell entries have a small mean and are zero. For entries with
    ``mu <= 8`` and ``mu / size <= 8`` a uniform ``u`` is compared with
    ``P(X = 0)``; only the non-zero ones run a vectorised inverse-CDF search
    using the pmf recursion ``P(k) = P(k-1) (k - 1 + size) / k * q`` in double
    precision. The other entries (large means, or long tails that would need
    many search steps) use :meth:`numpy.random.Generator.negative_binomial`.
    This is about twice as fast as drawing everything with numpy.
    """
    n_genes = mu.shape[1]
    size32 = size.astype(np.float32)
    u = rng.random(mu.shape, dtype=np.float32).ravel()
    mu_flat = mu.ravel()
    counts = np.zeros(mu.size, dtype=np.int64)

    high = mu_flat > _DIRECT_NB_MIN_MEAN
    # tail scale 1 / (1 - q) = 1 + mu * dispersion
    high |= (mu * (1.0 / size32)).ravel() > _DIRECT_NB_MIN_MEAN
    if high.any():
        hi = np.flatnonzero(high)
        n_hi = size[hi % n_genes]
        m_hi = mu_flat[hi].astype(np.float64)
        counts[hi] = rng.negative_binomial(n_hi, n_hi / (n_hi + m_hi))

    # P(X = 0) = (1 + mu / size) ** -size, in single precision for speed
    p0 = mu / size32
    np.log1p(p0, out=p0)
    p0 *= -size32
    np.exp(p0, out=p0)
    nonzero = u >= p0.ravel()
    nonzero &= ~high
    idx = np.flatnonzero(nonzero)
    if idx.size == 0:
        return counts

    n_k = size[idx % n_genes]
    m = mu_flat[idx].astype(np.float64)
    q = m / (n_k + m)
    p_k = np.exp(-n_k * np.log1p(m / n_k))  # P(X = 0), double precision
    resid = u[idx] - p_k  # u - P(X <= k); the count is the first k with < 0
    n_k -= 1.0
    value = np.ones(idx.size, dtype=np.int64)
    k = 0
    # The cdf reaches 1 - 1e-15 > max(u) = 1 - 2**-24, so this terminates,
    # within a few hundred steps as mean and tail scale are at most 9 here;
    # the cap is only a safeguard.
    while idx.size and k < 10_000:
        k += 1
        n_k += 1.0
        p_k *= n_k
        p_k *= q
        if k > 1:
            p_k *= 1.0 / k
        resid -= p_k
        active = resid >= 0
        value += active
        if 2 * np.count_nonzero(active) < idx.size:  # compact lazily
            counts[idx] = value
            idx = idx[active]
            resid = resid[active]
            n_k = n_k[active]
            q = q[active]
            p_k = p_k[active]
            value = value[active]
    counts[idx] = value
    return counts


class _CsrBuilder:
    """Collect the non-zeros of consecutive row blocks into a CSR matrix.

    Values and column indices go into large buffers (allocated lazily, big
    enough to be memory-mapped by the allocator and hence returned to the
    system when freed); :meth:`finish` copies them into the final arrays,
    releasing each buffer right after, so that peak memory stays close to
    the size of the result.
    """

    _CAPACITY = 2**23  # entries per buffer: 64 MiB values, 32 MiB indices

    def __init__(self) -> None:
        self._buffers: list[tuple[np.ndarray, np.ndarray, int]] = []
        self._data = np.empty(0, dtype=np.float64)
        self._cols = np.empty(0, dtype=np.int32)
        self._used = 0

    def _flush(self) -> None:
        if self._used:
            self._buffers.append((self._data, self._cols, self._used))

    def add(self, values: np.ndarray, cols: np.ndarray) -> None:
        n = values.size
        if self._used + n > self._data.size:
            self._flush()
            capacity = max(self._CAPACITY, n)
            self._data = np.empty(capacity, dtype=np.float64)
            self._cols = np.empty(capacity, dtype=np.int32)
            self._used = 0
        self._data[self._used : self._used + n] = values
        self._cols[self._used : self._used + n] = cols
        self._used += n

    def finish(self, row_nnz: np.ndarray, n_cols: int) -> sp.csr_matrix:
        self._flush()
        self._data = self._cols = np.empty(0)
        nnz = int(row_nnz.sum())
        index_dtype = np.int32 if nnz <= np.iinfo(np.int32).max else np.int64
        indptr = np.zeros(row_nnz.size + 1, dtype=index_dtype)
        np.cumsum(row_nnz, out=indptr[1:])
        data = np.empty(nnz, dtype=np.float64)
        indices = np.empty(nnz, dtype=index_dtype)
        offset = 0
        while self._buffers:
            values, cols, used = self._buffers.pop(0)
            data[offset : offset + used] = values[:used]
            indices[offset : offset + used] = cols[:used]
            offset += used
            del values, cols
        return sp.csr_matrix((data, indices, indptr), shape=(row_nnz.size, n_cols))


# --------------------------------------------------------------------------
# main function
# --------------------------------------------------------------------------
def simulate_rnaseq(
    n_genes: int | None = None,
    n_cells: int | None = None,
    *,
    n_samples: int = 25,
    n_celltypes: int = 10,
    n_conditions: int = 2,
    n_de_genes: int | None = None,
    de_genes_per_celltype: Mapping[Any, int] | None = None,
    samples_nested: bool = True,
    direction: Literal["both", "up", "down"] = "both",
    min_beta: float = 0.25,
    max_beta: float = 1.0,
    var_random_effects: float = 0.1,
    reference: Any = None,
    metadata: pd.DataFrame | None = None,
    adjust_library_size: bool = True,
    seed: int | np.random.Generator | None = None,
) -> anndata.AnnData:
    """Simulate multi-sample, multi-cell-type scRNA-seq counts.

    Counts are negative binomial (NB). Cells belong to samples (subjects),
    cell types and conditions; the last condition is the treated one. Each
    DE gene is specific to one cell type: its mean is multiplied by
    ``exp(beta)`` in treated cells of that cell type. A per sample and gene
    random effect on the log scale mimics subject-to-subject variation.

    Parameters
    ----------
    n_genes
        Number of genes. Default: the number of reference genes if
        ``reference`` is given, otherwise 1000.
    n_cells
        Number of cells. Default: ``len(metadata)`` if ``metadata`` is given,
        else the number of reference cells if ``reference`` is given, else
        5000. If ``metadata`` is given and ``n_cells`` differs from its
        length, cells are sampled from its rows with replacement.
    n_samples
        Number of samples (subjects) for random metadata. With
        ``samples_nested=True`` it must be at least ``n_conditions``.
        Ignored when ``metadata`` is given.
    n_celltypes
        Number of cell types for random metadata. Ignored with ``metadata``.
    n_conditions
        Number of conditions (at least 2) for random metadata; only the last
        one is treated. Ignored with ``metadata``.
    n_de_genes
        Total number of DE genes. Default: the number of cell types (capped
        at ``n_genes``), or the sum of ``de_genes_per_celltype``. ``0``
        simulates no DE at all.
    de_genes_per_celltype
        Mapping from cell type label to its number of DE genes; cell types
        not listed get none. If omitted, the DE genes are split as equally as
        possible over the cell types (the first cell types, in category
        order, get one more when the split is uneven).
    samples_nested
        If True (random metadata only), each sample belongs to exactly one
        condition, with the samples split as evenly as possible over the
        conditions. If False, the cells of every sample are split evenly over
        all conditions.
    direction
        ``"up"``: beta ~ U(min_beta, max_beta), requires ``min_beta > 0``.
        ``"down"``: beta ~ U(min_beta, max_beta), requires ``max_beta < 0``.
        ``"both"``: ``|beta| ~ U(|min_beta|, |max_beta|)`` with a random sign
        per gene, requires ``min_beta * max_beta > 0``.
    min_beta, max_beta
        Bounds of the log fold changes (``min_beta <= max_beta``; equality
        gives a fixed effect size).
    var_random_effects
        Variance of the sample random effects ``b ~ N(0, var_random_effects)``
        (natural-log scale of the mean), drawn independently per sample and
        gene. ``0`` disables them.
    reference
        Optional reference counts, **cells x genes** (AnnData orientation):
        an :class:`~anndata.AnnData` (``X`` is used), a numpy array, a
        scipy sparse matrix or a DataFrame (columns are genes). Per gene
        means (sample mean) and NB dispersions (method of moments) are
        estimated from it, and each simulated gene copies the parameters of
        a randomly drawn reference gene.
    metadata
        Optional cell metadata with columns ``sam``, ``cls``, ``trt`` and
        optionally ``libsize``, used instead of random metadata (rows are
        kept in order when ``n_cells`` is None or equal to its length).
        Labels are converted to strings; categorical columns keep their
        category order (so the treated condition can be chosen as the last
        category), other columns get sorted categories.
    adjust_library_size
        If True, cells get varying size factors (scaling all their means):
        ``libsize / mean(libsize)`` from ``metadata["libsize"]`` when present,
        else reference library sizes divided by their mean (sampled with
        replacement) when ``reference`` is given, else log-normal with
        mean 1 and log-scale sd 0.5. If False all size factors are 1.
    seed
        Seed or :class:`numpy.random.Generator` (passed to
        :func:`numpy.random.default_rng`); the same seed gives identical
        output. A Generator is advanced by the call.

    Returns
    -------
    anndata.AnnData
        Cells x genes. ``X`` is a :class:`scipy.sparse.csr_matrix` of
        integer-valued float64 counts.

        ``obs`` (index ``Cell1``, ``Cell2``, ...): ``sam``, ``cls``, ``trt``
        (string categoricals), ``libsize`` (int64 total simulated counts) and
        ``size_factor``.

        ``var`` (index ``Gene1``, ... or the reference gene names when all
        reference genes are simulated, in reference order): ``de`` (bool),
        ``beta`` (float, 0 for non-DE genes), ``de_celltype`` (categorical,
        ``""`` for non-DE genes), ``base_mean`` and ``dispersion`` (NB mean
        before size factors, random and DE effects, and NB dispersion); with
        a reference also ``ref_gene``, ``ref_mean``, ``ref_dispersion`` (the
        source reference gene and its estimates).

        ``varm["random_effects"]``: genes x samples array of the simulated
        sample effects, columns ordered as
        ``uns["simulation"]["random_effect_samples"]``.

        ``uns["simulation"]``: the parameters used (h5ad-serialisable),
        including ``treated`` (the treated condition), ``conditions``,
        ``de_genes`` (DE gene names), ``de_celltypes`` and
        ``de_genes_per_celltype`` (aligned lists) and, with a reference,
        ``reference_genes``, ``reference_mean`` and ``reference_dispersion``
        for all reference genes.

    Raises
    ------
    ValueError
        On inconsistent arguments, e.g. ``direction`` incompatible with
        ``min_beta``/``max_beta``, more DE genes than genes, or invalid
        metadata or reference.

    Notes
    -----
    For cell ``c`` in sample ``s(c)`` and gene ``g`` the count is
    ``Y[c, g] ~ NB(mean=mu[c, g], dispersion=phi[g])`` with variance
    ``mu + phi * mu**2`` and

    ``mu[c, g] = base_mean[g] * size_factor[c]
    * exp(b[s(c), g] + beta[g] * 1{c is treated and of type de_celltype[g]})``.

    ``beta`` is therefore a log fold change on the **natural-log** scale of
    the NB mean. Without a reference, ``base_mean`` is log-normal (median
    0.6, log-scale sd 1.2, i.e. mostly between ~0.05 and ~20 counts per
    cell) and ``dispersion`` is log-normal (median 0.5, log-scale sd 0.5).
    With a reference, the dispersion is the method-of-moments estimate
    ``max((var - mean) / mean**2, 1e-6)``; genes are drawn without
    replacement when ``n_genes`` is at most the number of reference genes
    (kept in reference order), with replacement otherwise. Reference size
    factors are relative library sizes, so simulated genes keep their
    reference means on average; when only a subset of genes is simulated
    the library sizes shrink accordingly. Note that the random effects have
    mean zero on the log scale, so they inflate the average count by
    ``exp(var_random_effects / 2)``.

    Deviations from R's ``simuRNAseq``: counts are cells x genes;
    ``min_beta == max_beta`` is allowed; the treated condition is always the
    last category of ``trt``.

    Sampling runs over blocks of cells without Python loops over genes:
    entries with a small mean use an exact inverse-CDF search, larger ones
    :meth:`numpy.random.Generator.negative_binomial`. Memory stays close to
    the size of the final sparse matrix.

    Examples
    --------
    >>> from flashmm.datasets import simulate_rnaseq
    >>> adata = simulate_rnaseq(
    ...     n_genes=200, n_cells=600, n_samples=6, n_celltypes=3, seed=1
    ... )
    >>> adata.shape
    (600, 200)
    >>> list(adata.obs.columns[:4])
    ['sam', 'cls', 'trt', 'libsize']
    >>> int(adata.var["de"].sum()), adata.uns["simulation"]["treated"]
    (3, 'B')

    Simulate again using the first data set as a reference; all genes are
    kept, so are their names:

    >>> sim2 = simulate_rnaseq(reference=adata, n_cells=300, seed=2)
    >>> bool((sim2.var_names == adata.var_names).all())
    True
    """
    import anndata

    rng = np.random.default_rng(seed)

    # ---------------------------------------------------------- validation
    if direction not in _DIRECTIONS:
        raise ValueError(
            f"direction must be one of {_DIRECTIONS}, got {direction!r}"
        )
    min_beta = _check_float("min_beta", min_beta)
    max_beta = _check_float("max_beta", max_beta)
    _validate_effects(direction, min_beta, max_beta)
    var_random_effects = _check_float("var_random_effects", var_random_effects)
    if var_random_effects < 0:
        raise ValueError(
            f"var_random_effects must be >= 0, got {var_random_effects}"
        )
    if n_cells is not None:
        n_cells = _check_int("n_cells", n_cells, 1)
    if n_genes is not None:
        n_genes = _check_int("n_genes", n_genes, 1)
    if n_de_genes is not None:
        n_de_genes = _check_int("n_de_genes", n_de_genes, 0)
    samples_nested = bool(samples_nested)
    adjust_library_size = bool(adjust_library_size)

    ref_mat = None
    ref_names: list[str] | None = None
    if reference is not None:
        ref_mat, ref_names = _reference_matrix(reference)

    # ------------------------------------------------------------ metadata
    if metadata is not None:
        meta = _prepare_metadata(metadata, n_cells, rng)
        n_cells = len(meta)
    else:
        if n_cells is None:
            n_cells = ref_mat.shape[0] if ref_mat is not None else 5000
        n_samples = _check_int("n_samples", n_samples, 1)
        n_celltypes = _check_int("n_celltypes", n_celltypes, 1)
        n_conditions = _check_int("n_conditions", n_conditions, 2)
        if samples_nested and n_samples < n_conditions:
            raise ValueError(
                "with samples_nested=True, n_samples must be >= n_conditions "
                f"(got n_samples={n_samples}, n_conditions={n_conditions})"
            )
        meta = _random_metadata(
            rng, n_cells, n_samples, n_celltypes, n_conditions, samples_nested
        )
    sam = _as_categorical(meta["sam"])
    cls = _as_categorical(meta["cls"])
    trt = _as_categorical(meta["trt"])
    conditions = [str(c) for c in trt.categories]
    if len(conditions) < 2:
        raise ValueError(
            f"at least two conditions are needed, got {conditions} in trt"
        )
    treated = conditions[-1]
    celltypes = [str(c) for c in cls.categories]
    samples = [str(s) for s in sam.categories]
    is_nested = bool(
        pd.crosstab(sam.codes, trt.codes).gt(0).sum(axis=1).le(1).all()
    )

    # --------------------------------------------------------- gene params
    if ref_mat is not None:
        ref_mean, ref_disp, ref_libsize = _reference_moments(ref_mat)
        n_ref = ref_mean.size
        if ref_names is None:
            ref_names = [f"Gene{i}" for i in range(1, n_ref + 1)]
        if n_genes is None:
            n_genes = n_ref
        if n_genes == n_ref:
            src = np.arange(n_ref)
        else:
            src = np.sort(rng.choice(n_ref, size=n_genes, replace=n_genes > n_ref))
        base_mean = ref_mean[src]
        dispersion = ref_disp[src]
        if n_genes == n_ref:
            gene_names = list(ref_names)
        else:
            gene_names = [f"Gene{i}" for i in range(1, n_genes + 1)]
    else:
        if n_genes is None:
            n_genes = 1000
        base_mean = np.exp(
            rng.normal(_BASE_MEAN_LOG_MEAN, _BASE_MEAN_LOG_SD, size=n_genes)
        )
        dispersion = np.exp(
            rng.normal(_DISPERSION_LOG_MEAN, _DISPERSION_LOG_SD, size=n_genes)
        )
        gene_names = [f"Gene{i}" for i in range(1, n_genes + 1)]

    # ------------------------------------------------------------ DE genes
    if de_genes_per_celltype is not None:
        if not isinstance(de_genes_per_celltype, Mapping):
            raise TypeError("de_genes_per_celltype must be a mapping")
        per_type = dict.fromkeys(celltypes, 0)
        for key, value in de_genes_per_celltype.items():
            if str(key) not in per_type:
                raise ValueError(
                    f"de_genes_per_celltype has unknown cell type {key!r}; "
                    f"cell types are {celltypes}"
                )
            per_type[str(key)] = _check_int(
                f"de_genes_per_celltype[{key!r}]", value, 0
            )
        total = sum(per_type.values())
        if n_de_genes is not None and n_de_genes != total:
            raise ValueError(
                f"n_de_genes ({n_de_genes}) differs from the sum of "
                f"de_genes_per_celltype ({total})"
            )
        n_de_genes = total
    else:
        if n_de_genes is None:
            n_de_genes = min(len(celltypes), n_genes)
        quotient, remainder = divmod(n_de_genes, len(celltypes))
        per_type = {
            ct: quotient + (i < remainder) for i, ct in enumerate(celltypes)
        }
    if n_de_genes > n_genes:
        raise ValueError(
            f"n_de_genes ({n_de_genes}) exceeds n_genes ({n_genes})"
        )
    de_counts = np.array([per_type[ct] for ct in celltypes], dtype=np.int64)
    de_idx = rng.choice(n_genes, size=n_de_genes, replace=False)
    de_type = np.repeat(np.arange(len(celltypes)), de_counts)
    if direction == "both":
        lo, hi = sorted((abs(min_beta), abs(max_beta)))
        magnitude = rng.uniform(lo, hi, size=n_de_genes)
        sign = rng.choice(np.array([-1.0, 1.0]), size=n_de_genes)
        de_beta = sign * magnitude
    else:
        de_beta = rng.uniform(min_beta, max_beta, size=n_de_genes)
    beta = np.zeros(n_genes)
    beta[de_idx] = de_beta
    is_de = np.zeros(n_genes, dtype=bool)
    is_de[de_idx] = True
    gene_type = np.full(n_genes, -1, dtype=np.int64)
    gene_type[de_idx] = de_type

    # ------------------------------------------------ random effects, sizes
    random_effects = rng.normal(
        0.0, np.sqrt(var_random_effects), size=(len(samples), n_genes)
    )
    if not adjust_library_size:
        size_factor = np.ones(n_cells)
    elif "libsize" in meta.columns:
        lib = meta["libsize"].to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(lib)) or np.any(lib <= 0):
            raise ValueError("metadata libsize must be finite and positive")
        size_factor = lib / lib.mean()
    elif ref_mat is not None:
        mean_lib = ref_libsize.mean()
        if mean_lib <= 0:
            raise ValueError("reference has no counts")
        size_factor = rng.choice(ref_libsize, size=n_cells) / mean_lib
    else:
        sd = _SIZE_FACTOR_LOG_SD
        size_factor = np.exp(rng.normal(-0.5 * sd**2, sd, size=n_cells))

    # -------------------------------------------------------------- counts
    with np.errstate(divide="ignore"):
        log_base = np.log(base_mean).astype(np.float32)
    log_sf = np.log(size_factor).astype(np.float32)
    effects32 = random_effects.astype(np.float32)
    nb_size = 1.0 / dispersion
    # DE effect rows: one per cell type, plus a zero row for cells without DE
    de_effect = np.zeros((len(celltypes) + 1, n_genes), dtype=np.float32)
    de_effect[gene_type[is_de], np.flatnonzero(is_de)] = beta[is_de]
    cell_group = np.where(
        np.asarray(trt.codes) == len(conditions) - 1,
        np.asarray(cls.codes),
        len(celltypes),
    )
    sam_codes = np.asarray(sam.codes)
    has_de = n_de_genes > 0

    rows_per_block = max(1, _BLOCK_ENTRIES // n_genes)
    builder = _CsrBuilder()
    row_nnz = np.zeros(n_cells, dtype=np.int64)
    libsize = np.zeros(n_cells, dtype=np.int64)
    for start in range(0, n_cells, rows_per_block):
        stop = min(start + rows_per_block, n_cells)
        log_mu = effects32[sam_codes[start:stop]]
        log_mu += log_base
        log_mu += log_sf[start:stop, None]
        if has_de:
            log_mu += de_effect[cell_group[start:stop]]
        np.minimum(log_mu, _LOG_MEAN_CAP, out=log_mu)
        mu = np.exp(log_mu, out=log_mu)
        counts = _rnbinom_block(rng, mu, nb_size)
        libsize[start:stop] = counts.reshape(stop - start, n_genes).sum(axis=1)
        nz = np.flatnonzero(counts)
        row, col = np.divmod(nz, n_genes)
        row_nnz[start:stop] = np.bincount(row, minlength=stop - start)
        builder.add(counts[nz], col)

    X = builder.finish(row_nnz, n_genes)

    # ---------------------------------------------------------- assemble
    obs = pd.DataFrame(
        {
            "sam": sam,
            "cls": cls,
            "trt": trt,
            "libsize": libsize,
            "size_factor": size_factor,
        },
        index=pd.Index([f"Cell{i}" for i in range(1, n_cells + 1)]),
    )
    de_celltype_labels = np.array([""] + celltypes, dtype=object)[gene_type + 1]
    var = pd.DataFrame(
        {
            "de": is_de,
            "beta": beta,
            "de_celltype": pd.Categorical(
                de_celltype_labels, categories=[""] + celltypes
            ),
            "base_mean": base_mean,
            "dispersion": dispersion,
        },
        index=pd.Index(gene_names),
    )
    params: dict[str, Any] = {
        "n_genes": int(n_genes),
        "n_cells": int(n_cells),
        "n_samples": len(samples),
        "n_celltypes": len(celltypes),
        "n_conditions": len(conditions),
        "n_de_genes": int(n_de_genes),
        "samples_nested": is_nested,
        "direction": str(direction),
        "min_beta": min_beta,
        "max_beta": max_beta,
        "beta_scale": "natural log of the NB mean",
        "var_random_effects": var_random_effects,
        "adjust_library_size": adjust_library_size,
        "reference": ref_mat is not None,
        "metadata": metadata is not None,
        "treated": treated,
        "conditions": np.array(conditions, dtype=object),
        "de_genes": np.array(
            [gene_names[i] for i in np.flatnonzero(is_de)], dtype=object
        ),
        "de_celltypes": np.array(celltypes, dtype=object),
        "de_genes_per_celltype": de_counts,
        "random_effect_samples": np.array(samples, dtype=object),
    }
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        params["seed"] = int(seed)
    if ref_mat is not None:
        var["ref_gene"] = [ref_names[i] for i in src]
        var["ref_mean"] = ref_mean[src]
        var["ref_dispersion"] = ref_disp[src]
        params["reference_genes"] = np.array(ref_names, dtype=object)
        params["reference_mean"] = ref_mean
        params["reference_dispersion"] = ref_disp

    adata = anndata.AnnData(X=X, obs=obs, var=var, uns={"simulation": params})
    adata.varm["random_effects"] = random_effects.T.copy()
    return adata
