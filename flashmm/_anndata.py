"""AnnData input: covariates from ``obs``, expression from ``X`` or a layer.

anndata is an optional dependency; nothing here imports it at module level.  An
AnnData object is recognised by duck typing (``obs``, ``var_names``, ``X`` and
``layers`` attributes), so ``import flashmm`` never needs anndata.

Backed AnnData (``anndata.read_h5ad(path, backed="r")``) keeps ``X`` on disk; it
is wrapped in :class:`RowChunks`, which reads one block of cells at a time, so
the pass over the cells holds at most one chunk in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._errors import DataError

__all__ = ["is_anndata", "RowChunks", "anndata_inputs", "open_anndata"]


def is_anndata(obj: Any) -> bool:
    """True if ``obj`` looks like an :class:`anndata.AnnData` (duck typed)."""
    return all(hasattr(obj, a) for a in ("obs", "var_names", "X", "layers", "obs_names"))


class RowChunks:
    """Row-sliceable view of an in-memory or on-disk cells x genes matrix.

    ``block = RowChunks(m)[start:stop]`` returns the rows as a CSR matrix (sparse
    input) or a float ndarray (dense input), reading only those rows from disk
    when ``m`` is a backed (h5py / anndata sparse dataset) matrix.

    Parameters
    ----------
    matrix : array_like, scipy.sparse matrix, h5py.Dataset or anndata backed dataset
        The expression matrix, cells in rows.
    """

    def __init__(self, matrix: Any) -> None:
        shape = getattr(matrix, "shape", None)
        if shape is None or len(shape) != 2:
            raise DataError(f"expected a 2-d cells x genes matrix, got shape {shape}.")
        self.matrix = matrix
        self.shape = (int(shape[0]), int(shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray | sp.csr_matrix:
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise TypeError("RowChunks supports contiguous row slices only.")
            start, stop, _ = key.indices(self.shape[0])
            block = self.matrix[start:stop]
        else:  # sorted row positions or a boolean mask (e.g. cells kept by missing="drop")
            rows = np.asarray(key)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            if rows.ndim != 1 or rows.dtype.kind not in "iu":
                raise TypeError("RowChunks takes a row slice, integer positions or a boolean mask.")
            block = self.matrix[np.sort(rows)]
        if hasattr(block, "to_memory"):  # lazily read sparse dataset (older anndata)
            block = block.to_memory()
        if sp.issparse(block):
            return sp.csr_matrix(block, dtype=np.float64)
        arr = np.asarray(block, dtype=np.float64)
        return arr[:, None] if arr.ndim == 1 else arr

    def __repr__(self) -> str:
        return f"RowChunks({type(self.matrix).__name__}, shape={self.shape})"


def _is_backed(adata: Any) -> bool:
    return bool(getattr(adata, "isbacked", False))


def anndata_inputs(adata: Any, layer: str | None = None) -> tuple[pd.DataFrame, Any, list[str]]:
    """Covariates, expression matrix and gene names of an AnnData.

    Parameters
    ----------
    adata : anndata.AnnData
        In memory or backed. Cells are rows (``obs``), genes columns (``var``).
    layer : str, optional
        Use ``adata.layers[layer]`` instead of ``adata.X``.

    Returns
    -------
    obs : DataFrame
        ``adata.obs`` (one row per cell).
    endog : matrix
        Cells x genes; in-memory sparse matrices are passed as they are (CSC is
        converted to CSR once by the stats pass), on-disk matrices are wrapped in
        :class:`RowChunks` so that only one chunk of cells is read at a time.
    gene_names : list of str
        ``adata.var_names``.
    """
    if layer is None:
        matrix = adata.X
        what = "adata.X"
    else:
        layers = adata.layers
        if layer not in layers.keys():
            raise KeyError(
                f"layer {layer!r} not found in the AnnData; layers are {list(layers.keys())}."
            )
        matrix = layers[layer]
        what = f"adata.layers[{layer!r}]"
    if matrix is None:
        raise DataError(f"{what} is empty (None); give an expression matrix or a layer.")
    obs = adata.obs
    if not isinstance(obs, pd.DataFrame):
        obs = pd.DataFrame(obs)
    genes = [str(g) for g in adata.var_names]
    in_memory = isinstance(matrix, np.ndarray) or sp.issparse(matrix) or isinstance(matrix, pd.DataFrame)
    if not in_memory or _is_backed(adata):
        matrix = RowChunks(matrix)
    return obs, matrix, genes


@contextlib.contextmanager
def open_anndata(path: str | os.PathLike) -> Iterator[Any]:
    """An ``.h5ad`` file opened backed (read only) or a ``.zarr`` store, as an AnnData.

    The ``.h5ad`` file is closed on exit; its cells are read chunk by chunk meanwhile.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".h5ad", ".zarr"):
        raise DataError(
            f"data {str(path)!r} is a path but not an .h5ad file or a .zarr store; read the file "
            "into an AnnData (e.g. anndata.read_h5ad, scanpy.read_10x_h5) or a DataFrame and "
            "pass that."
        )
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
    try:
        import anndata
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError(f"reading {suffix} files needs anndata: pip install 'flashmm[anndata]'.") from None
    if suffix == ".zarr":
        yield anndata.read_zarr(path)
        return
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except OSError as err:           # h5py: truncated file, bad signature, ...
        raise DataError(f"cannot read {str(path)!r} as an .h5ad file: {str(err).splitlines()[0]}. "
                        "It is truncated or corrupted: write it again from a good copy.") from None
    try:
        yield adata
    finally:
        adata.file.close()
