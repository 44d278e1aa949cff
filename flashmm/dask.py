"""Sufficient statistics from dask arrays: one map-reduce over chunks of cells.

Every per-gene statistic (``X'Y``, ``Z'Y`` and ``sum y^2``) is a sum over cells
(see ``MATH.md``), so each chunk of cells gives partial sums that are added
up by a tree reduction.  The design is built once, globally, so that every
chunk uses the same fixed-effect terms and the same random-effect levels; each
task receives only its own rows of ``X`` and ``Z``.  The shared statistics
(``X'X``, ``Z'X``, ``Z'Z``) need no expression data and are computed from the
design on the client.

Dask is imported lazily: ``import flashmm`` never needs it.  The fit itself is
not distributed: it runs on the (small) statistics, see :mod:`flashmm.stats`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._design import Design
from ._endog import (
    DEFAULT_CHUNK_CELLS,
    Transform,
    apply_transform,
    check_orientation,
    gene_names_of,
    resolve_transform,
)
from ._errors import DataError
from ._kernel import TRANSFORM_CODES, Accumulators, KernelDesign, accumulate_chunk
from .stats import SufficientStats, empty_partial

if TYPE_CHECKING:  # pragma: no cover
    import dask.array
    from dask.delayed import Delayed

__all__ = ["DEFAULT_SPLIT_EVERY", "stats_from_anndata_dask", "stats_from_dask"]

#: Number of partial statistics combined by one task of the tree reduction.
DEFAULT_SPLIT_EVERY = 8

Partial = dict[str, np.ndarray]


def stats_from_dask(
    design: Design,
    endog: Any,
    transform: Transform = None,
    gene_names: Sequence[str] | None = None,
    split_every: int | None = None,
    compute: bool = True,
    *,
    layer: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_CELLS,
    **compute_kwargs: Any,
) -> SufficientStats | Delayed:
    """Compute :class:`~flashmm.stats.SufficientStats` from a chunked dask array.

    Each chunk of cells (rows) of ``endog`` becomes partial sums ``X'Y``,
    ``Z'Y`` and ``sum y^2`` computed with that chunk's rows of the design;
    the partials are added by a tree reduction.  The result equals
    :meth:`SufficientStats.from_design` on the same data up to rounding.

    Parameters
    ----------
    design : Design
        Fixed and random designs of all cells, built once for the whole data
        set (so the factor levels are the same in every chunk), e.g. with
        :func:`flashmm._design.build_design` from the cell metadata.
    endog : dask.array.Array or AnnData
        Expression, cells x genes, chunked along cells.  Chunks may be dense
        (ndarray) or sparse (``scipy.sparse`` CSR/CSC/COO); sparse chunks stay
        sparse.  Chunks along genes are allowed too.  An AnnData object uses
        ``adata.X`` (or ``adata.layers[layer]``) and its ``var_names`` as gene
        names.  A non-dask array is wrapped with ``chunk_size`` cells per chunk.
    transform : {None, "log2p1", "log1p"} or callable
        Applied to every chunk before accumulating (to the stored values only
        for sparse chunks, so it must map 0 to 0).  A callable must be
        picklable to run on a distributed cluster.
    gene_names : sequence of str, optional
        Gene names (default: AnnData ``var_names`` or ``gene0, gene1, ...``).
    split_every : int, optional
        Fan-in of the tree reduction (default :data:`DEFAULT_SPLIT_EVERY`).
        A combine task holds ``split_every + 1`` partials of size
        ``(p + q + 1) x genes``.
    compute : bool
        If False, return a :class:`dask.delayed.Delayed` that evaluates to the
        statistics instead of computing them.
    layer : str, optional
        AnnData layer to use instead of ``X``.
    chunk_size : int
        Cells per chunk when ``endog`` is not already a dask array.
    **compute_kwargs
        Passed to :func:`dask.compute` (e.g. ``scheduler="threads"``).  With a
        ``dask.distributed.Client`` active, its cluster is used by default.

    Returns
    -------
    SufficientStats or dask.delayed.Delayed
        The statistics (or a delayed object computing them when
        ``compute=False``).

    Raises
    ------
    DataError
        If ``endog`` is genes x cells, has unknown chunk sizes, or (when the
        graph runs) contains NaN/inf, or negative values under a log transform.

    Notes
    -----
    Every task is a pure function of its inputs and never modifies them, so a
    partial lost with a worker is recomputed identically by dask, and the
    order of additions is fixed by the graph: the result does not depend on
    the scheduler, on the number of workers or on retries.
    """
    import dask
    import dask.array as da

    endog, names_from_data = _unwrap_anndata(endog, layer)
    if gene_names is None:
        gene_names = names_from_data
    if not isinstance(endog, da.Array):
        endog = _wrap(endog, chunk_size)
    if endog.ndim == 1:
        endog = endog[:, None]
    if endog.ndim != 2:
        raise DataError(f"endog must be a cells x genes matrix, got shape {endog.shape}.")
    row_chunks, col_chunks = endog.chunks
    if any(np.isnan(c) for c in row_chunks + col_chunks):
        raise DataError(
            "endog has unknown chunk sizes; call endog.compute_chunk_sizes() first "
            "(the rows of every chunk must be known to match them with the design)."
        )
    _, n_genes = check_orientation(endog, design.nobs)
    names = gene_names_of(None, n_genes, gene_names)
    func, tname = resolve_transform(transform)
    # named transforms run in the kernel; a callable is applied by numpy first
    code = TRANSFORM_CODES.get(transform) if transform is None or isinstance(transform, str) else None
    fan_in = DEFAULT_SPLIT_EVERY if split_every is None else int(split_every)
    if fan_in < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}.")

    # Shared statistics from the design, on the client (no expression data needed).
    template = SufficientStats.from_partial(
        empty_partial(design.k_fe, design.exog_re.shape[1], 0), design, names, tname
    )

    blocks = endog.to_delayed()
    row_starts = np.concatenate([[0], np.cumsum(row_chunks)]).astype(np.int64)
    col_starts = np.concatenate([[0], np.cumsum(col_chunks)]).astype(np.int64)
    chunk_task = dask.delayed(_chunk_partial, pure=True)
    # One key per row chunk for its slice of the design, one per gene chunk for
    # its names: every task depends only on the pieces it needs.
    X_parts = [
        dask.delayed(np.ascontiguousarray(design.exog[a:b]), pure=True)
        for a, b in itertools.pairwise(row_starts)
    ]
    Z_parts = [
        dask.delayed(sp.csr_matrix(design.exog_re[a:b]), pure=True)
        for a, b in itertools.pairwise(row_starts)
    ]
    per_gene_block = []
    for j, (a, b) in enumerate(itertools.pairwise(col_starts)):
        names_j = dask.delayed(names[a:b], pure=True, traverse=False)
        leaves = [
            chunk_task(blocks[i, j], X_parts[i], Z_parts[i], func, code, names_j)
            for i in range(len(row_chunks))
        ]
        per_gene_block.append(_tree_sum(leaves, fan_in))
    result = dask.delayed(_finish, pure=True)(template, per_gene_block)
    if not compute:
        return result
    (stats,) = dask.compute(result, **compute_kwargs)
    return stats


def stats_from_anndata_dask(
    adata: Any,
    design: Design,
    layer: str | None = None,
    transform: Transform = None,
    split_every: int | None = None,
    compute: bool = True,
    **compute_kwargs: Any,
) -> SufficientStats | Delayed:
    """Statistics of an AnnData whose ``X`` (or a layer) is a dask array.

    Convenience wrapper of :func:`stats_from_dask` using ``adata.var_names``
    as gene names.  ``design`` must describe the cells of ``adata`` in the
    order of ``adata.obs`` (e.g. built from ``adata.obs``).

    Parameters
    ----------
    adata : anndata.AnnData
        Cells x genes; ``adata.X`` or ``adata.layers[layer]`` chunked along cells.
    design : Design
        Design of the cells of ``adata``.
    layer : str, optional
        Layer to use instead of ``X``.
    transform, split_every, compute, **compute_kwargs
        As in :func:`stats_from_dask`.

    Returns
    -------
    SufficientStats or dask.delayed.Delayed
    """
    if not _is_anndata(adata):
        raise DataError(f"adata must be an AnnData object, got {type(adata).__name__}.")
    return stats_from_dask(
        design, adata, transform=transform, split_every=split_every,
        compute=compute, layer=layer, **compute_kwargs,
    )


# --------------------------------------------------------------------- tasks
def _as_block(block: Any) -> np.ndarray | sp.spmatrix:
    """One chunk as an ndarray or a CSR/CSC matrix in its stored dtype (canonicalised by the kernel)."""
    if sp.issparse(block):
        return block if block.format in ("csr", "csc") else sp.csr_matrix(block)
    if hasattr(block, "to_scipy_sparse"):  # pydata/sparse COO chunks
        return _as_block(block.to_scipy_sparse())
    arr = np.asarray(block)
    arr = arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float64)
    return arr[:, None] if arr.ndim == 1 else arr


def _chunk_partial(block: Any, X: np.ndarray, Z: sp.csr_matrix, transform: Any, code: int | None,
                   gene_names: list[str]) -> Partial:
    """Partial ``X'Y``, ``Z'Y``, ``sum y^2`` and cell counts of one chunk (the pass's kernel)."""
    values = _as_block(block)
    if code is None:
        values, code = apply_transform(values, transform, gene_names), 0
    else:
        apply_transform(values, None, gene_names)     # NaN/inf: the error naming the gene
    if values.shape[0] != X.shape[0]:  # pragma: no cover - guarded by the chunks
        raise DataError(
            f"a chunk has {values.shape[0]} rows but its design slice has {X.shape[0]}."
        )
    acc = Accumulators.zeros(X.shape[1], Z.shape[1], values.shape[1])

    def negative() -> None:
        apply_transform(values, transform, gene_names)

    accumulate_chunk(acc, KernelDesign.of(X, Z), 0, values, code, negative)
    return acc.as_partial()


def _combine(parts: list[Partial]) -> Partial:
    """Sum partials in list order, without modifying the inputs."""
    out = {k: v.copy() for k, v in parts[0].items()}
    for part in parts[1:]:
        for k in out:
            out[k] += part[k]
    return out


def _tree_sum(leaves: list[Any], split_every: int) -> Any:
    """Delayed tree reduction of partials, ``split_every`` at a time."""
    import dask

    combine = dask.delayed(_combine, pure=True)
    level = list(leaves)
    if len(level) == 1:
        return combine(level)
    while len(level) > 1:
        level = [combine(level[i:i + split_every]) for i in range(0, len(level), split_every)]
    return level[0]


def _finish(template: SufficientStats, parts: list[Partial]) -> SufficientStats:
    """Join the per-gene-chunk sums into the final statistics."""
    return dataclasses.replace(
        template,
        XY=np.concatenate([p["XY"] for p in parts], axis=1),
        ZY=np.concatenate([p["ZY"] for p in parts], axis=1),
        yy=np.concatenate([p["yy"] for p in parts]),
        n_cells=np.concatenate([p["n_cells"] for p in parts]),
        exog_names=list(template.exog_names),
        gene_names=list(template.gene_names),
        info=dict(template.info),
    )


# ------------------------------------------------------------------- inputs
def _is_anndata(obj: Any) -> bool:
    return type(obj).__name__ == "AnnData" and hasattr(obj, "var_names") and hasattr(obj, "obs")


def _unwrap_anndata(endog: Any, layer: str | None) -> tuple[Any, list[str] | None]:
    """Matrix and gene names of an AnnData (or the input and None)."""
    if not _is_anndata(endog):
        if layer is not None:
            raise DataError("layer is only meaningful for AnnData input.")
        if isinstance(endog, pd.DataFrame):
            return endog.to_numpy(dtype=np.float64), [str(c) for c in endog.columns]
        return endog, None
    if layer is None:
        matrix = endog.X
    else:
        if layer not in endog.layers:
            raise DataError(
                f"layer {layer!r} is not in the AnnData; available layers: "
                f"{list(endog.layers.keys())}."
            )
        matrix = endog.layers[layer]
    if matrix is None:
        raise DataError("the AnnData has no X; pass layer=... to use a layer.")
    return matrix, [str(g) for g in endog.var_names]


def _wrap(endog: Any, chunk_size: int) -> dask.array.Array:
    """Wrap an in-memory matrix as a dask array chunked along cells."""
    import dask.array as da

    if chunk_size < 1:
        raise DataError(f"chunk_size must be positive, got {chunk_size}.")
    if sp.issparse(endog):
        endog = sp.csr_matrix(endog)
    elif not hasattr(endog, "shape") or not hasattr(endog, "__getitem__"):
        endog = np.asarray(endog, dtype=np.float64)
    if len(endog.shape) == 1:
        endog = np.asarray(endog)[:, None]
    return da.from_array(endog, chunks=(chunk_size, -1), asarray=False)
