"""The fused per-chunk kernel of the statistics pass (numba, all cores).

One read of a chunk's stored values gives every per-gene sum of the pass: the
transformed value ``t`` of each stored entry is added to ``X'Y`` (``XYt[j] +=
t x_i``), to ``Z'Y`` (the group-block sums, ``ZY[k, j] += z_ik t``), to the sum
of squares ``yy[j] += t^2`` and, when ``t != 0``, to the number of cells
expressing the gene.  The work is split by blocks of genes, one thread per
block, so that every gene's sums are added by one thread in an order fixed by
the chunk (its cells sorted by group, see :meth:`KernelDesign.group_order`):
the result is the same bit for bit whatever the number of threads, which is
what lets an interrupted pass resume exactly (see :mod:`flashmm._pass`).

CSR, CSC and dense chunks are read in their own dtype (float32 stays float32 on
disk and in memory; the arithmetic is float64), so no float64 copy of a chunk is
ever made.  numba's threads are set with ``numba.set_num_threads`` or the
``NUMBA_NUM_THREADS`` environment variable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
from numba import njit, prange

# GNU OpenMP (numba's default layer on Linux) aborts a process forked after its threads
# started: ask for a fork-safe layer (tbb if installed, else numba's workqueue) unless the
# user chose one (NUMBA_THREADING_LAYER). workqueue is not safe for launches from several
# Python threads at once (dask's threaded scheduler): launches are serialised by _LAUNCH,
# each one using all cores anyway.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "forksafe"
_LAUNCH = threading.Lock()

__all__ = ["TRANSFORM_CODES", "Accumulators", "KernelDesign", "accumulate_chunk", "accumulate_csc_rows",
           "csr_is_canonical"]

#: Transforms the kernel applies itself (0 maps to 0 for all of them).
TRANSFORM_CODES = {None: 0, "log2p1": 1, "log1p": 2}

#: Gene blocks per thread, handed out one at a time (dynamic scheduling), so that uneven
#: gene densities, and a core taken by the reader thread, balance out. Each block costs a
#: little per cell (its segment bounds): measured on the atlas shape (5 chunks, 100,000
#: cells, one thread) 1.7 s of CPU with 4 blocks per thread, 2.1-2.6 s with 16.
_BLOCKS_PER_THREAD = 4


@dataclass
class Accumulators:
    """Per-gene running sums of the pass, laid out for the kernel.

    Attributes
    ----------
    XYt : ndarray, shape (n_genes, p)
        ``(X'Y)'``: one contiguous row of p sums per gene.
    ZY : ndarray, shape (q, n_genes)
        ``Z'Y``.
    yy : ndarray, shape (n_genes,)
        Sums of squares.
    n_cells : ndarray of int64, shape (n_genes,)
        Number of cells with a non-zero (transformed) value.
    """

    XYt: np.ndarray
    ZY: np.ndarray
    yy: np.ndarray
    n_cells: np.ndarray

    @classmethod
    def zeros(cls, p: int, q: int, n_genes: int) -> Accumulators:
        """Zeroed sums for p fixed effects, q random effects and ``n_genes`` genes."""
        return cls(np.zeros((n_genes, p)), np.zeros((q, n_genes)), np.zeros(n_genes),
                   np.zeros(n_genes, dtype=np.int64))

    def as_partial(self) -> dict[str, np.ndarray]:
        """The sums as the ``XY`` (p x genes), ``ZY``, ``yy`` and ``n_cells`` of the statistics."""
        return {"XY": np.ascontiguousarray(self.XYt.T), "ZY": self.ZY, "yy": self.yy,
                "n_cells": self.n_cells}

    @classmethod
    def from_partial(cls, partial: dict[str, np.ndarray]) -> Accumulators:
        """The inverse of :meth:`as_partial` (copies, C-contiguous)."""
        return cls(np.ascontiguousarray(partial["XY"].T, dtype=np.float64),
                   np.ascontiguousarray(partial["ZY"], dtype=np.float64),
                   np.array(partial["yy"], dtype=np.float64),
                   np.array(partial["n_cells"], dtype=np.int64))


# ------------------------------------------------------------------ kernels
#: Whole counts below this are transformed by table look-up (see :func:`transform_table`).
TABLE_SIZE = 1024


def transform_table(code: int) -> np.ndarray:
    """The transform of the counts ``0, 1, ..., TABLE_SIZE - 1``, computed by numpy.

    Raw counts are whole numbers, nearly all small: looking their transform up
    costs a fraction of a scalar ``log2`` (measured: 0.17 s per 40 M values for
    the scalar ``log2``, one core), and gives numpy's own values.
    """
    counts = np.arange(TABLE_SIZE, dtype=np.float64)
    if code == 1:
        return np.log2(1.0 + counts)
    if code == 2:
        return np.log1p(counts)
    return counts


@njit(inline="always")
def _transform(v, code, table):  # noqa: ANN001, ANN202
    if code == 0:
        return v
    if v >= 0.0 and v < table.size:
        iv = int(v)
        if iv == v:
            return table[iv]
    if code == 1:
        return np.log2(1.0 + v)
    return np.log1p(v)


@njit(inline="always")
def _lower_bound(indices, lo, hi, value):  # noqa: ANN001, ANN202
    """First position in ``indices[lo:hi]`` (sorted) holding a value >= ``value``."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if indices[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(inline="always")
def _add_entry(j, i, t, xdata, xind, xptr, zdata, zind, zptr, XYt, ZY, yy, ncells):  # noqa: ANN001, ANN202
    """Add one transformed value ``t`` of cell ``i`` (global row) and gene ``j``."""
    yy[j] += t * t
    if t != 0.0:
        ncells[j] += 1
    for x in range(xptr[i], xptr[i + 1]):
        XYt[j, xind[x]] += xdata[x] * t
    for z in range(zptr[i], zptr[i + 1]):
        ZY[zind[z], j] += zdata[z] * t


@njit(inline="always")
def _short_row(i, allowed, xdata, xind, xptr, zdata, zind, zptr):  # noqa: ANN001, ANN202
    """Whether cell ``i`` has at most 4 fixed and 2 random non-zeros, and those (padded with 0).

    Held in scalars, a short row's entries stay in registers while all its
    values are added (1.6x faster on the atlas design than reading them again
    for every value). ``allowed`` is False when X or Z has no column to pad with.
    """
    x0, nx = xptr[i], xptr[i + 1] - xptr[i]
    z0, nz = zptr[i], zptr[i + 1] - zptr[i]
    ok = allowed and nx <= 4 and nz <= 2
    c0 = xind[x0] if ok and nx > 0 else 0
    c1 = xind[x0 + 1] if ok and nx > 1 else 0
    c2 = xind[x0 + 2] if ok and nx > 2 else 0
    c3 = xind[x0 + 3] if ok and nx > 3 else 0
    v0 = xdata[x0] if ok and nx > 0 else 0.0
    v1 = xdata[x0 + 1] if ok and nx > 1 else 0.0
    v2 = xdata[x0 + 2] if ok and nx > 2 else 0.0
    v3 = xdata[x0 + 3] if ok and nx > 3 else 0.0
    k0 = zind[z0] if ok and nz > 0 else 0
    k1 = zind[z0 + 1] if ok and nz > 1 else 0
    w0 = zdata[z0] if ok and nz > 0 else 0.0
    w1 = zdata[z0 + 1] if ok and nz > 1 else 0.0
    return ok, c0, c1, c2, c3, v0, v1, v2, v3, k0, k1, w0, w1


@njit(inline="always")
def _add_short(j, t, c0, c1, c2, c3, v0, v1, v2, v3, k0, k1, w0, w1, XYt, ZY, yy, ncells):  # noqa: ANN001, ANN202
    """:func:`_add_entry` for a short row held in scalars (padding adds exact zeros)."""
    yy[j] += t * t
    if t != 0.0:
        ncells[j] += 1
    XYt[j, c0] += v0 * t
    XYt[j, c1] += v1 * t
    XYt[j, c2] += v2 * t
    XYt[j, c3] += v3 * t
    ZY[k0, j] += w0 * t
    ZY[k1, j] += w1 * t


@njit(parallel=True, nogil=True, cache=True)
def _csr_segments(indices, indptr, bounds, n_cols):  # noqa: ANN001, ANN202
    """Where each gene block starts in every row, and the number of non-canonical rows.

    ``seg[r, b]`` is the first position of row ``r`` whose column is at least
    ``bounds[b]``. One pass over the indices, which also checks that they
    increase strictly within ``[0, n_cols)`` (else the segments are not used).
    """
    n_rows = indptr.size - 1
    nb1 = bounds.size
    seg = np.empty((n_rows, nb1), dtype=np.int64)
    bad = 0
    for r in prange(n_rows):
        lo, hi = indptr[r], indptr[r + 1]
        seg[r, 0] = lo
        b = 1
        prev = -1
        ok = 1
        for k in range(lo, hi):
            j = indices[k]
            if j <= prev or j >= n_cols:
                ok = 0
            prev = j
            while b < nb1 and j >= bounds[b]:
                seg[r, b] = k
                b += 1
        while b < nb1:
            seg[r, b] = hi
            b += 1
        bad += 1 - ok
    return seg, bad


@njit(parallel=True, nogil=True, cache=True)
def _csr_kernel(data, indices, seg, order, xdata, xind, xptr, zdata, zind, zptr, code, table,
                XYt, ZY, yy, ncells):  # noqa: ANN001, ANN202
    """A CSR chunk cut into gene blocks by ``seg``; threads over blocks. Returns the negatives."""
    n_rows = seg.shape[0]
    negatives = 0
    for b in prange(seg.shape[1] - 1):
        neg = 0
        for rr in range(n_rows):
            r = order[rr]
            ok, c0, c1, c2, c3, v0, v1, v2, v3, k0, k1, w0, w1 = _short_row(
                r, XYt.shape[1] > 0 and ZY.shape[0] > 0, xdata, xind, xptr, zdata, zind, zptr)
            for k in range(seg[r, b], seg[r, b + 1]):
                v = np.float64(data[k])
                if v < 0.0:
                    neg += 1
                t = _transform(v, code, table)
                if ok:
                    _add_short(indices[k], t, c0, c1, c2, c3, v0, v1, v2, v3, k0, k1, w0, w1,
                               XYt, ZY, yy, ncells)
                else:
                    _add_entry(indices[k], r, t, xdata, xind, xptr, zdata, zind, zptr,
                               XYt, ZY, yy, ncells)
        negatives += neg
    return negatives


@njit(parallel=True, nogil=True, cache=True)
def _csc_kernel(data, indices, indptr, row0, row1, xdata, xind, xptr, zdata, zind, zptr, code, table,
                XYt, ZY, yy, ncells):  # noqa: ANN001, ANN202
    """Rows ``row0:row1`` of a CSC matrix (sorted row indices); threads over genes."""
    negatives = 0
    for j in prange(indptr.size - 1):
        lo, hi = indptr[j], indptr[j + 1]
        a = _lower_bound(indices, lo, hi, row0)
        e = _lower_bound(indices, a, hi, row1)
        neg = 0
        for k in range(a, e):
            v = np.float64(data[k])
            if v < 0.0:
                neg += 1
            _add_entry(j, indices[k], _transform(v, code, table), xdata, xind, xptr, zdata, zind, zptr,
                       XYt, ZY, yy, ncells)
        negatives += neg
    return negatives


@njit(parallel=True, nogil=True, cache=True)
def _dense_kernel(Y, order, xdata, xind, xptr, zdata, zind, zptr, code, table, bounds,
                  XYt, ZY, yy, ncells):  # noqa: ANN001, ANN202
    """A dense chunk; threads over gene blocks. Returns the number of negatives."""
    negatives = 0
    for b in prange(bounds.size - 1):
        neg = 0
        for rr in range(Y.shape[0]):
            r = order[rr]
            ok, c0, c1, c2, c3, v0, v1, v2, v3, k0, k1, w0, w1 = _short_row(
                r, XYt.shape[1] > 0 and ZY.shape[0] > 0, xdata, xind, xptr, zdata, zind, zptr)
            for j in range(bounds[b], bounds[b + 1]):
                v = np.float64(Y[r, j])
                if v < 0.0:
                    neg += 1
                t = _transform(v, code, table)
                if ok:
                    _add_short(j, t, c0, c1, c2, c3, v0, v1, v2, v3, k0, k1, w0, w1, XYt, ZY, yy, ncells)
                else:
                    _add_entry(j, r, t, xdata, xind, xptr, zdata, zind, zptr, XYt, ZY, yy, ncells)
        negatives += neg
    return negatives


@njit(parallel=True, nogil=True, cache=True)
def _csr_canonical(indices, indptr, n_cols):  # noqa: ANN001, ANN202
    """Number of rows whose indices are not strictly increasing within ``[0, n_cols)``."""
    bad = 0
    for r in prange(indptr.size - 1):
        prev = -1
        ok = 1
        for k in range(indptr[r], indptr[r + 1]):
            j = indices[k]
            if j <= prev or j >= n_cols:
                ok = 0
            prev = j
        bad += 1 - ok
    return bad


# ------------------------------------------------------------------ drivers
_TABLES = {code: transform_table(code) for code in TRANSFORM_CODES.values()}


def csr_is_canonical(block: sp.csr_matrix | sp.csc_matrix) -> bool:
    """True if every row (column for CSC) has strictly increasing in-range indices.

    One parallel pass over the indices; also guards the kernel against the
    out-of-range indices of a corrupted file.
    """
    ptr = block.indptr
    if ptr.size == 0 or ptr[0] != 0 or ptr[-1] > block.indices.size or np.any(np.diff(ptr) < 0):
        return False
    n_minor = block.shape[1] if block.format == "csr" else block.shape[0]
    return _csr_canonical(block.indices, ptr, n_minor) == 0


def gene_blocks(n_genes: int) -> np.ndarray:
    """Boundaries of the blocks of genes handed to the threads."""
    n_blocks = max(1, min(n_genes, _BLOCKS_PER_THREAD * numba.get_num_threads()))
    return np.linspace(0, n_genes, n_blocks + 1).round().astype(np.int64)


@dataclass(frozen=True)
class KernelDesign:
    """The design as the kernel reads it: ``X`` and ``Z`` as CSR arrays (float64, int64).

    ``X`` is stored sparse too: its indicator columns (cell types, treatment
    within cell type) are mostly zero, and only the non-zeros of a cell's row
    cost work for each of its values.
    """

    xdata: np.ndarray
    xind: np.ndarray
    xptr: np.ndarray
    zdata: np.ndarray
    zind: np.ndarray
    zptr: np.ndarray

    @classmethod
    def of(cls, X: np.ndarray, Z: sp.spmatrix) -> KernelDesign:
        """Arrays of the fixed design ``X`` and random design ``Z`` (n rows each)."""
        xs, zs = (_canonical_csr(M) for M in (sp.csr_matrix(np.asarray(X, dtype=np.float64)), Z))
        return cls(*(np.ascontiguousarray(a, dtype=dt) for M in (xs, zs)
                     for a, dt in ((M.data, np.float64), (M.indices, np.int64), (M.indptr, np.int64))))

    def group_order(self, row0: int, n_rows: int) -> np.ndarray:
        """The rows ``row0 : row0 + n_rows`` (chunk positions) sorted by their first random effect.

        Cells of one group then come one after the other, so each thread's
        slice of that group's row of ``Z'Y`` stays in cache while they are
        added (measured on the atlas shape, 259 donors in random cell order).
        The sort is stable, and the same for a chunk whatever the threads.
        """
        ptr = self.zptr[row0:row0 + n_rows + 1]
        if self.zind.size == 0 or ptr.size < 2:
            return np.arange(n_rows, dtype=np.int64)
        has = ptr[1:] > ptr[:-1]
        key = np.where(has, self.zind[np.minimum(ptr[:-1], self.zind.size - 1)], -1)
        return np.argsort(key, kind="stable").astype(np.int64)

    def rows_from(self, row0: int) -> tuple[np.ndarray, ...]:
        """The six arrays with the row pointers starting at row ``row0``."""
        return (self.xdata, self.xind, self.xptr[row0:], self.zdata, self.zind, self.zptr[row0:])


def _canonical_csr(M: sp.spmatrix) -> sp.csr_matrix:
    M = sp.csr_matrix(M, dtype=np.float64)
    if not M.has_canonical_format:
        M = M.copy()
        M.sum_duplicates()
    M.eliminate_zeros()
    return M


def accumulate_chunk(acc: Accumulators, design: KernelDesign, row0: int,
                     block: np.ndarray | sp.spmatrix, code: int,
                     raise_negative: Callable[[], None] | None = None,
                     trusted: bool = False) -> None:
    """Add the sums of one chunk of cells (rows ``row0 ..`` of the design) to ``acc``.

    Parameters
    ----------
    acc : Accumulators
        Running sums, updated in place.
    design : KernelDesign
        Design of all cells (the chunk's rows are read from ``row0`` on).
    row0 : int
        Position of the chunk's first cell.
    block : ndarray, CSR or CSC matrix
        The chunk's values, cells in rows, in their stored dtype.
    code : int
        Transform applied by the kernel (:data:`TRANSFORM_CODES`).
    raise_negative : callable, optional
        Called (and expected to raise) when a log transform meets negative values.
    trusted : bool
        The indices are known to be canonical (views of a canonical matrix), so
        the check is skipped.
    """
    with _LAUNCH, numba.parallel_chunksize(1):
        neg = _dispatch(acc, design, row0, block, code, trusted)
    if neg and code and raise_negative is not None:
        raise_negative()


def _dispatch(acc: Accumulators, design: KernelDesign, row0: int,
              block: np.ndarray | sp.spmatrix, code: int, trusted: bool) -> int:
    """Run the kernel of the block's layout; the number of negative values met."""
    sums = (acc.XYt, acc.ZY, acc.yy, acc.n_cells)
    rows = design.rows_from(row0)
    if sp.issparse(block) and block.format not in ("csr", "csc"):
        block = sp.csr_matrix(block)
    if sp.issparse(block) and block.format == "csr":
        seg = _segments(block)
        if seg is None:
            block = _canonical_copy(block)
            seg = _segments(block)
        return _csr_kernel(_kernel_values(block.data), block.indices, seg,
                           design.group_order(row0, block.shape[0]), *rows, code, _TABLES[code], *sums)
    if sp.issparse(block):
        if not trusted and not csr_is_canonical(block):
            block = _canonical_copy(block)
        data, indptr = _kernel_values(block.data), block.indptr.astype(np.int64, copy=False)
        neg = _csc_kernel(data, block.indices, indptr, 0, block.shape[0], *rows, code,
                          _TABLES[code], *sums)
    else:
        Y = _kernel_values(np.asarray(block))
        Y = Y[:, None] if Y.ndim == 1 else Y
        neg = _dense_kernel(Y, design.group_order(row0, Y.shape[0]), *rows, code, _TABLES[code],
                            gene_blocks(Y.shape[1]), *sums)
    return neg


def accumulate_csc_rows(acc: Accumulators, design: KernelDesign, matrix: sp.csc_matrix,
                        start: int, stop: int, code: int,
                        raise_negative: Callable[[], None] | None = None) -> None:
    """Add the sums of rows ``start:stop`` of a canonical in-memory CSC matrix to ``acc``."""
    with _LAUNCH, numba.parallel_chunksize(64):
        neg = _csc_kernel(_kernel_values(matrix.data), matrix.indices,
                          matrix.indptr.astype(np.int64, copy=False), start, stop,
                          *design.rows_from(0), code, _TABLES[code], acc.XYt, acc.ZY, acc.yy,
                          acc.n_cells)
    if neg and code and raise_negative is not None:
        raise_negative()


def _segments(block: sp.csr_matrix) -> np.ndarray | None:
    """The gene-block segments of every row, or None if the indices are not canonical."""
    ptr = block.indptr
    if ptr.size != block.shape[0] + 1 or ptr[0] != 0 or ptr[-1] > block.indices.size \
            or np.any(np.diff(ptr) < 0):
        return None
    seg, bad = _csr_segments(block.indices, ptr.astype(np.int64, copy=False),
                             gene_blocks(block.shape[1]), block.shape[1])
    return None if bad else seg


def _kernel_values(values: np.ndarray) -> np.ndarray:
    """float32/float64 values as they are; other numbers as float64."""
    if values.dtype in (np.float32, np.float64):
        return values
    return values.astype(np.float64)


def _canonical_copy(block: sp.csr_matrix | sp.csc_matrix) -> sp.csr_matrix | sp.csc_matrix:
    """A copy with sorted, summed indices; broken pointers or out-of-range indices raise ValueError."""
    ptr = block.indptr
    major, n_minor = (block.shape if block.format == "csr" else block.shape[::-1])
    if ptr.size != major + 1 or ptr[0] != 0 or ptr[-1] > block.indices.size or np.any(np.diff(ptr) < 0):
        raise ValueError("the row pointers (indptr) are not increasing or point past the data")
    used = block.indices[:ptr[-1]]
    if used.size and (used.min() < 0 or used.max() >= n_minor):
        raise ValueError(f"indices outside [0, {n_minor})")
    out = block.copy()
    out.sum_duplicates()
    return out
