"""Chunked reading for the statistics pass: chunk sizes from a memory budget, and prefetching.

A :class:`ChunkSource` reads rows ``start:stop`` of any supported expression
matrix in its stored dtype: views of in-memory CSR and ndarray input, direct
h5py/zarr reads of the ``data``/``indices`` slices of a backed AnnData CSR
matrix (its row pointers are read once), and the generic row slicing of
:mod:`flashmm._endog` for everything else.  :func:`prefetch` keeps the next
chunk being read on a background thread while the current one is reduced
(h5py and the numba kernel both run without holding the interpreter lock for
most of their time).  :func:`plan_chunk_cells` turns ``max_memory`` into a
number of cells per chunk.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._endog import _row_block, endog_shape
from ._errors import DataError
from ._memory import MemoryBudget, MemoryBudgetError, format_bytes

__all__ = ["Chunk", "ChunkSource", "plan_chunk_cells", "prefetch", "TARGET_CHUNK_BYTES"]

#: Largest chunk (stored values and indices) read at once when the budget allows more:
#: big enough that per-chunk costs vanish, small enough for frequent checkpoints.
TARGET_CHUNK_BYTES = 128 * 1024 ** 2

#: Chunks held at once: the one being reduced and the one being read.
IN_FLIGHT = 2


@dataclass
class Chunk:
    """Rows ``start:stop`` of the matrix, as read.

    ``block`` is a CSR/CSC matrix or an ndarray in its stored dtype; ``trusted``
    says its sparse indices come from a matrix already known to be canonical;
    ``csc_rows`` marks the whole in-memory CSC matrix, of which the kernel reads
    rows ``start:stop`` itself.
    """

    index: int
    start: int
    stop: int
    block: Any
    trusted: bool = False
    csc_rows: bool = False


class ChunkSource:
    """Row chunks of an expression matrix (cells x genes) of any supported kind.

    Parameters
    ----------
    endog : matrix
        As prepared by :func:`flashmm._endog.prepare_endog` (CSR canonical), or a
        CSC matrix in canonical form, an ndarray, a DataFrame or a backed matrix
        (:class:`flashmm._anndata.RowChunks`).
    gene_names : list of str
        For error messages.
    """

    def __init__(self, endog: Any, gene_names: list[str] | None = None) -> None:
        self.endog = endog
        self.gene_names = gene_names
        self.shape = endog_shape(endog)
        self.path = _backing_file(endog)
        self._group = _sparse_group(endog)
        self._indptr = None
        if self._group is not None:
            self._indptr = np.asarray(self._group["indptr"][...], dtype=np.int64)
            if self._indptr.size != self.shape[0] + 1:
                raise DataError(f"{self.describe()}: X/indptr has {self._indptr.size} entries for "
                                f"{self.shape[0]} cells; the file is corrupted.")

    # ----------------------------------------------------------- describe
    def describe(self) -> str:
        """Where the values come from (the file, if any) for messages."""
        return repr(self.path) if self.path else f"the {type(self.endog).__name__} input"

    @property
    def nnz(self) -> int | None:
        """Stored values, if known without reading them."""
        if self._indptr is not None:
            return int(self._indptr[-1])
        if sp.issparse(self.endog):
            return int(self.endog.nnz)
        return None

    def bytes_per_cell(self) -> float:
        """Average bytes of one cell's stored values (and indices) as read."""
        n, g = self.shape
        if self._group is not None:
            item = self._group["data"].dtype.itemsize + self._group["indices"].dtype.itemsize
            return max(1.0, item * self._indptr[-1] / max(n, 1))
        if sp.issparse(self.endog):
            item = self.endog.data.dtype.itemsize + self.endog.indices.dtype.itemsize
            return max(1.0, item * self.endog.nnz / max(n, 1))
        dtype = getattr(self.endog, "dtype", np.float64)
        item = np.dtype(dtype).itemsize if not isinstance(self.endog, pd.DataFrame) else 8
        return float(max(1, g) * item)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the input: shape, stored values, dtype, and file size and time."""
        out: dict[str, Any] = {"shape": list(self.shape), "nnz": self.nnz,
                               "kind": type(self.endog).__name__}
        if self.path:
            st = os.stat(self.path)
            out.update(file=os.path.abspath(self.path), file_size=st.st_size,
                       file_mtime_ns=st.st_mtime_ns)
        return out

    # --------------------------------------------------------------- read
    def read(self, index: int, start: int, stop: int) -> Chunk:
        """Read rows ``start:stop``; a failed read raises a DataError naming the file and chunk."""
        try:
            return self._read(index, start, stop)
        except DataError:
            raise
        except Exception as err:  # h5py/zarr raise OSError, KeyError, ValueError, ...
            raise self.read_error(index, start, stop, err) from None

    def read_error(self, index: int, start: int, stop: int, err: BaseException) -> DataError:
        """The error for chunk ``index`` that could not be read or is inconsistent."""
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return DataError(
            f"cannot read chunk {index} (cells {start}-{stop - 1}) of {self.describe()}: {first}. "
            "The file is truncated or corrupted; write it again (e.g. adata.write_h5ad) "
            "from a good copy. No output was written."
        )

    def _read(self, index: int, start: int, stop: int) -> Chunk:
        m = self.endog
        if self._group is not None:
            lo, hi = int(self._indptr[start]), int(self._indptr[stop])
            if hi < lo:
                raise ValueError("the row pointers (X/indptr) decrease")
            data = np.asarray(self._group["data"][lo:hi])
            indices = np.asarray(self._group["indices"][lo:hi])
            if data.size != hi - lo or indices.size != hi - lo:
                raise ValueError(f"X/data or X/indices ends before position {hi}")
            block = sp.csr_matrix((stop - start, self.shape[1]), dtype=data.dtype)
            block.data, block.indices, block.indptr = data, indices, self._indptr[start:stop + 1] - lo
            return Chunk(index, start, stop, block)
        if sp.issparse(m) and m.format == "csr":
            ptr = m.indptr[start:stop + 1]
            lo, hi = int(ptr[0]), int(ptr[-1])
            block = sp.csr_matrix((stop - start, m.shape[1]), dtype=m.dtype)
            block.data, block.indices, block.indptr = m.data[lo:hi], m.indices[lo:hi], ptr - lo
            return Chunk(index, start, stop, block, trusted=True)
        if sp.issparse(m) and m.format == "csc":
            return Chunk(index, start, stop, m, trusted=True, csc_rows=True)
        if isinstance(m, np.ndarray) and m.dtype in (np.float32, np.float64):
            return Chunk(index, start, stop, m[start:stop])
        matrix = getattr(m, "matrix", None)      # RowChunks: keep the stored dtype
        if matrix is not None and not isinstance(m, (np.ndarray, pd.DataFrame)):
            block = matrix[start:stop]
            if hasattr(block, "to_memory"):
                block = block.to_memory()
            if sp.issparse(block) or np.asarray(block).dtype in (np.float32, np.float64):
                return Chunk(index, start, stop, block if sp.issparse(block) else np.asarray(block))
        return Chunk(index, start, stop, _row_block(m, start, stop, self.gene_names), trusted=True)


def _sparse_group(endog: Any) -> Any:
    """The h5py/zarr group of a backed anndata CSR matrix (inside RowChunks), else None."""
    matrix = getattr(endog, "matrix", endog)
    group = getattr(matrix, "group", None)
    if group is None or getattr(matrix, "format", None) != "csr":
        return None
    try:
        if not all(k in group for k in ("data", "indices", "indptr")):
            return None
    except TypeError:
        return None
    return group


def _backing_file(endog: Any) -> str | None:
    """The path of the file a backed matrix reads from, if any."""
    group = _sparse_group(endog)
    if group is not None:
        name = getattr(getattr(group, "file", None), "filename", None)
        if name:
            return str(name)
        store = getattr(group, "store", None)
        root = getattr(store, "root", None) or getattr(store, "path", None)
        return None if root is None else str(root)
    matrix = getattr(endog, "matrix", None)
    name = getattr(getattr(matrix, "file", None), "filename", None)
    return None if name is None else str(name)


def plan_chunk_cells(source: ChunkSource, fixed_bytes: int, max_memory: int | float | str | None,
                     chunk_size: int | None = None) -> tuple[int, str]:
    """Cells per chunk, and a sentence saying how it was chosen.

    With ``chunk_size`` given it is used as it is; otherwise the chunk is the
    largest whose values, :data:`IN_FLIGHT` at a time, fit ``max_memory`` once
    ``fixed_bytes`` (the running sums) are set aside, capped at
    :data:`TARGET_CHUNK_BYTES` of stored values.
    """
    n = source.shape[0]
    per_cell = source.bytes_per_cell()
    if chunk_size is not None:
        if chunk_size < 1:
            raise DataError(f"chunk_size must be positive, got {chunk_size}.")
        cells = int(min(chunk_size, max(n, 1)))
        return cells, f"{cells} cells per chunk (chunk_size), ~{format_bytes(cells * per_cell)} each"
    budget = MemoryBudget.of(max_memory)
    free = budget.limit - fixed_bytes
    if free < IN_FLIGHT * per_cell:
        raise MemoryBudgetError(
            f"the statistics pass needs at least {format_bytes(fixed_bytes + IN_FLIGHT * per_cell)} "
            f"(running sums {format_bytes(fixed_bytes)} + {IN_FLIGHT} chunks of one cell, "
            f"{format_bytes(per_cell)} each), more than max_memory={format_bytes(budget.limit)}. "
            "Raise max_memory."
        )
    cells = int(max(1, min(n, free // (IN_FLIGHT * per_cell), TARGET_CHUNK_BYTES // per_cell)))
    return cells, (f"{cells} cells per chunk (~{format_bytes(cells * per_cell)} each, "
                   f"{IN_FLIGHT} in flight; max_memory={format_bytes(budget.limit)})")


def prefetch(source: ChunkSource, chunk_cells: int, first: int = 0) -> Iterator[Chunk]:
    """Chunks of ``chunk_cells`` cells from row ``first`` on, the next one read in the background."""
    n = source.shape[0]
    bounds = [(k, s, min(n, s + chunk_cells))
              for k, s in enumerate(range(0, n, chunk_cells)) if s >= first]
    if not bounds:
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flashmm-read") as pool:
        pending = pool.submit(source.read, *bounds[0])
        for nxt in bounds[1:] + [None]:
            chunk = pending.result()
            if nxt is not None:
                pending = pool.submit(source.read, *nxt)
            yield chunk
