"""Input: read the expression matrix (cells x genes) in chunks of cells.

Everything that touches the user's expression matrix lives here: orientation and
shape checks, gene names, chunked access for ndarray, scipy.sparse, DataFrame and
backed (h5py-like) matrices, and the per-chunk transform.  Nothing here ever
builds a dense cells x genes copy of a sparse input.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._errors import DataError

__all__ = [
    "Transform",
    "resolve_transform",
    "endog_shape",
    "gene_names_of",
    "check_orientation",
    "iter_chunks",
    "DEFAULT_CHUNK_CELLS",
]

Transform = None | str | Callable[[np.ndarray], np.ndarray]

DEFAULT_CHUNK_CELLS = 20_000


def _log2p1(values: np.ndarray) -> np.ndarray:
    return np.log2(1.0 + values)


def _log1p(values: np.ndarray) -> np.ndarray:
    return np.log1p(values)


_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "log2p1": _log2p1,
    "log1p": _log1p,
}


def resolve_transform(transform: Transform) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str | None]:
    """Return the transform function and its name (None for no transform)."""
    if transform is None:
        return None, None
    if isinstance(transform, str):
        if transform not in _TRANSFORMS:
            raise DataError(
                f"unknown transform {transform!r}; use one of {sorted(_TRANSFORMS)}, "
                "None, or a callable applied to the values."
            )
        return _TRANSFORMS[transform], transform
    if callable(transform):
        return transform, getattr(transform, "__name__", "callable")
    raise DataError(f"transform must be None, a name or a callable, got {transform!r}.")


def endog_shape(endog: Any) -> tuple[int, int]:
    """(n_cells, n_genes) of an expression matrix of any supported kind."""
    shape = getattr(endog, "shape", None)
    if shape is None:
        endog = np.asarray(endog)
        shape = endog.shape
    if len(shape) == 1:
        return int(shape[0]), 1
    if len(shape) != 2:
        raise DataError(f"endog must be a cells x genes matrix, got shape {tuple(shape)}.")
    return int(shape[0]), int(shape[1])


def gene_names_of(endog: Any, n_genes: int, names: Any = None,
                  make_unique: bool = False) -> list[str]:
    """Gene names: given, from DataFrame columns, or ``gene0, gene1, ...``.

    Duplicate names raise a DataError unless ``make_unique`` is true, in which
    case they are renamed like anndata's ``var_names_make_unique``
    (``"A", "A-1", "A-2"``) with a warning.
    """
    if names is None and isinstance(endog, pd.DataFrame):
        names = endog.columns
    if names is None and isinstance(endog, pd.Series):
        names = [endog.name if endog.name is not None else "y"]
    if names is None:
        return [f"gene{j}" for j in range(n_genes)]
    names = [str(x) for x in names]
    if len(names) != n_genes:
        raise DataError(f"{len(names)} gene names given for {n_genes} genes.")
    dup = pd.Index(names).duplicated()
    if dup.any():
        first = sorted({names[j] for j in np.flatnonzero(dup)})
        if not make_unique:
            raise DataError(
                f"{int(dup.sum())} duplicate gene name(s), e.g. {first[:5]}; gene names must "
                "be unique. Rename them, or pass make_unique=True to append '-1', '-2', ... "
                "(as anndata's var_names_make_unique)."
            )
        names = make_names_unique(names)
        warnings.warn(
            f"{int(dup.sum())} duplicate gene name(s) (e.g. {first[:5]}) were made unique by "
            "appending '-1', '-2', ...",
            UserWarning,
            stacklevel=3,
        )
    return names


def make_names_unique(names: list[str], join: str = "-") -> list[str]:
    """Rename repeated names ``A, A, A`` to ``A, A-1, A-2`` (anndata's rule).

    The first occurrence keeps its name; a generated name that already exists
    is skipped (``A-1`` is not reused if a gene is called ``A-1``).
    """
    taken = set(names)
    seen: set[str] = set()
    counters: dict[str, int] = {}
    out = []
    for name in names:
        if name not in seen:
            seen.add(name)
            out.append(name)
            continue
        k = counters.get(name, 0)
        while True:
            k += 1
            cand = f"{name}{join}{k}"
            if cand not in taken:
                break
        counters[name] = k
        taken.add(cand)
        seen.add(cand)
        out.append(cand)
    return out


def check_orientation(endog: Any, n_cells: int) -> tuple[int, int]:
    """Check that ``endog`` has one row per cell; say so if it is transposed."""
    rows, cols = endog_shape(endog)
    if rows != n_cells:
        if cols == n_cells:
            raise DataError(
                f"endog has shape ({rows}, {cols}) but there are {n_cells} cells: it "
                "looks like genes x cells. flashmm expects cells in rows (as AnnData "
                "and statsmodels); pass endog.T."
            )
        raise DataError(
            f"endog has {rows} rows but the design has {n_cells} cells; they must match."
        )
    return rows, cols


def _row_block(endog: Any, start: int, stop: int,
               gene_names: list[str] | None = None) -> np.ndarray | sp.csr_matrix:
    """Rows [start, stop) of endog as a float64 ndarray or CSR matrix.

    A value that is not a number raises a DataError naming its gene and the value.
    """
    if isinstance(endog, (pd.DataFrame, pd.Series)):
        block = endog.iloc[start:stop]
        if isinstance(endog, pd.DataFrame) and any(
            isinstance(dt, pd.SparseDtype) for dt in endog.dtypes
        ):
            return sp.csr_matrix(block.sparse.to_coo(), dtype=np.float64)
        try:
            arr = block.to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            _raise_not_numeric(block, start, gene_names)
        return arr[:, None] if arr.ndim == 1 else arr
    if sp.issparse(endog):
        return _csr_rows(endog, start, stop)
    block = endog[start:stop]
    if sp.issparse(block):
        return sp.csr_matrix(block, dtype=np.float64)
    if hasattr(block, "to_memory"):  # anndata backed sparse dataset
        block = block.to_memory()
        if sp.issparse(block):
            return sp.csr_matrix(block, dtype=np.float64)
    try:
        arr = np.asarray(block, dtype=np.float64)
    except (TypeError, ValueError):
        _raise_not_numeric(block, start, gene_names)
    return arr[:, None] if arr.ndim == 1 else arr


def _raise_not_numeric(block: Any, start: int, gene_names: list[str] | None) -> NoReturn:
    """Raise a DataError naming the first gene (column) and value that is not a number."""
    if isinstance(block, pd.Series):
        block = block.to_frame()
    if isinstance(block, pd.DataFrame):
        names = gene_names or [str(c) for c in block.columns]
        cols = [block.iloc[:, j].to_numpy(dtype=object) for j in range(block.shape[1])]
    else:
        arr = np.asarray(block, dtype=object)
        arr = arr.reshape(arr.shape[0], -1)
        names = gene_names or [f"column {j}" for j in range(arr.shape[1])]
        cols = list(arr.T)
    for j, col in enumerate(cols):
        try:
            np.asarray(col, dtype=np.float64)
            continue
        except (TypeError, ValueError):
            pass
        for i, value in enumerate(col):
            try:
                float(value)
            except (TypeError, ValueError):
                raise DataError(
                    f"endog must be numeric: gene {names[j]!r} has the value {value!r} in cell "
                    f"(row) {start + i}; convert it to numbers or leave that gene out."
                ) from None
    raise DataError("endog could not be converted to float64 numbers.")


def _csr_rows(mat: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows [start, stop) of a canonical float64 CSR matrix, without copying."""
    if mat.dtype != np.float64:
        return sp.csr_matrix(mat[start:stop], dtype=np.float64)
    ptr = mat.indptr[start:stop + 1]
    lo, hi = int(ptr[0]), int(ptr[-1])
    # assign the views directly: the constructor would copy ("prune") views of
    # a much larger array, costing a full pass over the chunk
    block = sp.csr_matrix((stop - start, mat.shape[1]), dtype=np.float64)
    block.data, block.indices, block.indptr = mat.data[lo:hi], mat.indices[lo:hi], ptr - lo
    return block


def prepare_endog(endog: Any) -> Any:
    """Make row slicing efficient: CSC/COO inputs are converted to CSR once.

    Non-canonical CSR input (duplicate entries) is canonicalised on a copy, so
    that sums of squares count each cell-gene value once.
    """
    if sp.issparse(endog) and endog.format != "csr":
        endog = sp.csr_matrix(endog)
        endog.sum_duplicates()
        return endog
    if sp.issparse(endog) and not endog.has_canonical_format:
        endog = endog.copy()
        endog.sum_duplicates()
        return endog
    if isinstance(endog, (list, tuple)):
        return np.asarray(endog, dtype=np.float64)
    return endog


def nonfinite_cells(endog: Any, chunk_size: int = DEFAULT_CHUNK_CELLS) -> np.ndarray:
    """Cells (rows) with at least one NaN or inf value, in one chunked pass."""
    return _nonfinite_pattern(endog, chunk_size)[0]


def _nonfinite_pattern(endog: Any, chunk_size: int = DEFAULT_CHUNK_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """Cells and genes with at least one NaN or inf value, in one chunked pass."""
    endog = prepare_endog(endog)
    n, n_genes = endog_shape(endog)
    bad = np.zeros(n, dtype=bool)
    bad_genes = np.zeros(n_genes, dtype=bool)
    for start in range(0, n, max(1, int(chunk_size))):
        stop = min(n, start + chunk_size)
        block = _row_block(endog, start, stop)
        if sp.issparse(block):
            rows = np.repeat(np.arange(stop - start), np.diff(block.indptr))
            nonfinite = ~np.isfinite(block.data)
            bad[start + rows[nonfinite]] = True
            bad_genes[block.indices[nonfinite]] = True
        else:
            nonfinite = ~np.isfinite(block)
            bad[start:stop] = nonfinite.any(axis=1)
            bad_genes |= nonfinite.any(axis=0)
    return bad, bad_genes


def describe_nonfinite(endog: Any, chunk_size: int = DEFAULT_CHUNK_CELLS) -> str:
    """How many cells and genes hold NaN or inf (for error messages)."""
    cells, genes = _nonfinite_pattern(endog, chunk_size)
    return f"{int(genes.sum())} gene(s) have NaN or inf in {int(cells.sum())} cell(s)"


def take_cells(endog: Any, rows: np.ndarray) -> Any:
    """The cells ``rows`` (sorted positions) of an expression matrix of any kind."""
    if isinstance(endog, (pd.DataFrame, pd.Series)):
        return endog.iloc[rows]
    endog = prepare_endog(endog)
    if sp.issparse(endog):
        return endog[rows]
    if isinstance(endog, np.ndarray):
        return endog[rows]
    try:  # h5py-like backed matrices accept sorted integer indices
        return endog[np.asarray(rows)]
    except (TypeError, ValueError, IndexError):
        return np.asarray(endog, dtype=np.float64)[rows]


def iter_chunks(
    endog: Any,
    chunk_size: int = DEFAULT_CHUNK_CELLS,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    gene_names: list[str] | None = None,
    check_finite: bool = True,
) -> Iterator[tuple[int, int, np.ndarray | sp.csr_matrix]]:
    """Yield ``(start, stop, block)`` over consecutive chunks of cells.

    ``block`` is float64, dense or CSR, with the transform applied (to the stored
    values only for sparse input, so zeros stay zeros: transforms must map 0 to 0).
    Non-finite values, and negative values under a log transform, raise a
    DataError naming the first offending gene. With ``check_finite=False`` the
    caller checks finiteness itself (cheaply, from the accumulated sums of
    squares: see :func:`raise_nonfinite`).
    """
    n, _ = endog_shape(endog)
    if chunk_size < 1:
        raise DataError(f"chunk_size must be positive, got {chunk_size}.")
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        block = _row_block(endog, start, stop, gene_names)
        yield start, stop, apply_transform(block, transform, gene_names, check_finite)


def apply_transform(
    block: np.ndarray | sp.csr_matrix,
    transform: Callable[[np.ndarray], np.ndarray] | None,
    gene_names: list[str] | None = None,
    check_finite: bool = True,
) -> np.ndarray | sp.csr_matrix:
    """Validate a block of values and apply the transform."""
    values = block.data if sp.issparse(block) else block
    if check_finite:
        _check_finite(block, values, gene_names, "endog")
    if transform is None:
        return block
    if np.any(values < 0):
        _raise_at_first_gene(block, values < 0, gene_names,
                             "negative values cannot be log-transformed")
    new = np.asarray(transform(values), dtype=np.float64)
    if new.shape != values.shape:
        raise DataError("transform must return an array of the same shape as its input.")
    if sp.issparse(block):
        out = block.copy()
        out.data = new
        return out
    return new


def raise_nonfinite(block: np.ndarray | sp.csr_matrix, gene_names: list[str] | None,
                    gene: str) -> None:
    """Raise the error for a chunk after which a gene's sum of squares is not finite.

    NaN or inf values make the sum of squares non-finite; so do finite values
    too large to square and sum in float64, which get their own message.
    """
    values = block.data if sp.issparse(block) else block
    _check_finite(block, values, gene_names, "endog")
    raise DataError(
        f"values too large: the sum of squares of gene {gene!r} overflows float64; "
        "rescale the data."
    )


def _check_finite(block: Any, values: np.ndarray, gene_names: list[str] | None, what: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        _raise_at_first_gene(
            block, bad, gene_names,
            f"{what} contains NaN or inf; remove or impute them, or use missing='drop'",
        )


def _raise_at_first_gene(block: Any, bad: np.ndarray, gene_names: list[str] | None,
                         message: str) -> None:
    if sp.issparse(block):
        col = int(block.indices[np.flatnonzero(bad)].min())
    else:
        col = int(np.flatnonzero(bad.any(axis=0))[0])
    name = gene_names[col] if gene_names else f"column {col}"
    raise DataError(f"{message} (first offending gene: {name!r}).")
