"""Pseudobulk: sum the counts of the cells of each group (e.g. donor x cell type).

One pass over the cells in row chunks: for the cells ``r`` of a chunk the
group sums grow by ``S @ block`` with ``S`` the sparse groups x cells
indicator (``S[codes[r], r] = 1``), so a sparse matrix stays sparse, and a
backed ``.h5ad`` is read one chunk at a time (memory: one chunk plus the
groups x genes result).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._anndata import anndata_inputs, is_anndata
from ._endog import DEFAULT_CHUNK_CELLS, iter_chunks, prepare_endog
from ._errors import DataError

__all__ = ["pseudobulk"]


def _by_columns(by: str | Sequence[str], obs: pd.DataFrame) -> list[str]:
    """The grouping columns as a list, checked against ``obs``."""
    cols = [by] if isinstance(by, str) else list(by)
    if not cols:
        raise DataError("by= needs at least one column of adata.obs.")
    if len(set(cols)) != len(cols):
        raise DataError(f"by= lists a column more than once: {cols}.")
    missing = [c for c in cols if c not in obs.columns]
    if missing:
        raise DataError(f"by= column(s) {missing} not in adata.obs; its columns are "
                        f"{list(obs.columns)}.")
    for c in cols:
        if obs[c].isna().any():
            raise DataError(f"obs column {c!r} has missing values ({int(obs[c].isna().sum())} "
                            "cells); drop those cells or fill the labels first.")
    return cols


def _group_codes(obs: pd.DataFrame, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Group number of every cell (groups sorted by the ``by`` values) and each group's first cell."""
    codes = obs.groupby(cols, sort=True, observed=True).ngroup().to_numpy()
    _, first = np.unique(codes, return_index=True)
    return codes, first


def _constant_columns(obs: pd.DataFrame, codes: np.ndarray, keep: np.ndarray,
                      exclude: list[str]) -> list[str]:
    """The obs columns with one value (NaN counting as a value) within every kept group."""
    rows = keep[codes]
    sub, sub_codes = obs.loc[rows], codes[rows]
    out = []
    for c in obs.columns:
        if c in exclude or c == "n_cells":
            continue
        try:
            nuniq = sub[c].groupby(sub_codes).nunique(dropna=False)
        except TypeError:          # unhashable values (lists, dicts): not a label column
            continue
        if bool((nuniq.to_numpy() == 1).all()):
            out.append(c)
    return out


def _check_count_block(block: Any, start: int, gene_names: list[str]) -> None:
    """Refuse negative or fractional values in a chunk of cells (counts expected)."""
    values = block.data if sp.issparse(block) else np.asarray(block)
    neg = values < 0
    frac = values != np.round(values)
    for bad, what in ((neg, "negative"), (frac, "non-integer")):
        if bad.any():
            dense_bad = (sp.csr_matrix((bad.astype(float), block.indices, block.indptr),
                                       shape=block.shape).toarray() > 0
                         if sp.issparse(block) else bad)
            cell, gene = np.argwhere(dense_bad)[0]
            raise DataError(
                f"pseudobulk sums counts, but {int(bad.sum())} values of cells {start}-"
                f"{start + block.shape[0] - 1} are {what} (first: cell {start + cell}, gene "
                f"{gene_names[gene]!r}). Pass raw counts (e.g. layer='counts'), or "
                "allow_non_integer=True to sum other values (normalised or estimated counts)."
            )


def _group_sums(matrix: Any, codes: np.ndarray, n_groups: int, n_genes: int,
                chunk_size: int, gene_names: list[str],
                allow_non_integer: bool = False) -> np.ndarray | sp.csr_matrix:
    """Groups x genes sums in one chunked pass; cells with a negative code are left out."""
    total: np.ndarray | sp.csr_matrix | None = None
    for start, stop, block in iter_chunks(prepare_endog(matrix), chunk_size,
                                          gene_names=gene_names):
        if not allow_non_integer:
            _check_count_block(block, start, gene_names)
        c = codes[start:stop]
        cells = np.flatnonzero(c >= 0)
        S = sp.csr_matrix((np.ones(cells.size), (c[cells], cells)), shape=(n_groups, stop - start))
        part = S @ block
        if sp.issparse(part):
            part = sp.csr_matrix(part)
            total = part if total is None else total + part
        else:
            part = np.asarray(part)
            total = part if total is None else total + part
    if total is None:
        return np.zeros((n_groups, n_genes))
    return sp.csr_matrix(total) if sp.issparse(total) else total


def _warn_empty_groups(obs: pd.DataFrame, cols: list[str], n_observed: int) -> None:
    """Warn about the combinations of categories that have no cells (they are dropped).

    As pandas' ``groupby(observed=False)``, categorical ``by`` columns define their
    groups by their categories, so a combination without cells is a group with
    zero cells; other columns only have the values that occur.
    """
    if not any(isinstance(obs[c].dtype, pd.CategoricalDtype) for c in cols):
        return
    sizes = [len(obs[c].cat.categories) if isinstance(obs[c].dtype, pd.CategoricalDtype)
             else obs[c].nunique() for c in cols]
    n_all = int(np.prod(sizes, dtype=np.float64))
    if n_all > n_observed:
        warnings.warn(f"{n_all - n_observed} of the {n_all} combinations of the categories of "
                      f"{cols} have no cells; these groups are dropped.", UserWarning,
                      stacklevel=3)


def _group_obs(obs: pd.DataFrame, cols: list[str], first: np.ndarray, n_cells: np.ndarray,
               constant: list[str]) -> pd.DataFrame:
    """One row per kept group: the ``by`` columns, the constant columns and ``n_cells``."""
    table = obs.iloc[first][cols + constant].copy()
    for c in table.columns:
        if isinstance(table[c].dtype, pd.CategoricalDtype):
            table[c] = table[c].cat.remove_unused_categories()
    table["n_cells"] = n_cells
    names = table[cols].astype(str).agg("_".join, axis=1)
    table.index = pd.Index(names.to_numpy(), name=None)
    return table


def pseudobulk(
    adata: Any,
    by: str | Sequence[str] = ("donor", "celltype"),
    layer: str | None = None,
    min_cells: int = 1,
    *,
    chunk_size: int = DEFAULT_CHUNK_CELLS,
    allow_non_integer: bool = False,
) -> Any:
    """Sum the counts of the cells of each group (pseudobulk samples).

    Parameters
    ----------
    adata : anndata.AnnData
        Cells x genes counts, in memory (dense or sparse) or backed
        (``anndata.read_h5ad(path, backed="r")``); read in chunks of cells.
    by : str or sequence of str
        Columns of ``adata.obs`` defining the groups, e.g.
        ``["donor", "celltype"]``; every combination that occurs is a group.
    layer : str, optional
        Sum ``adata.layers[layer]`` instead of ``adata.X``.
    min_cells : int
        Groups with fewer cells are dropped.
    chunk_size : int
        Cells read per chunk.
    allow_non_integer : bool
        Sum values that are not counts (negative or fractional).  By default
        they are an error: pseudobulk methods (voom, edgeR) expect raw counts.

    Returns
    -------
    anndata.AnnData
        Groups x genes sums (float64; CSR if the input is sparse), groups
        sorted by the ``by`` values and named by them joined with ``"_"``
        (made unique with anndata's suffixes if two joins coincide).
        ``obs`` holds the ``by`` columns, every other obs column that is
        constant within each (kept) group, and ``n_cells``; unused categories
        are removed.  ``var`` is a copy of ``adata.var``.

    Raises
    ------
    DataError
        A ``by`` column missing from ``obs`` or with missing labels, a
        non-finite value in the matrix, a negative or fractional value
        (unless ``allow_non_integer=True``), or no group with ``min_cells``
        cells.

    Warns
    -----
    UserWarning
        When categorical ``by`` columns have combinations of categories with
        no cells (groups with zero cells, as pandas' ``observed=False`` defines
        them): they are dropped, and the warning says how many.

    Examples
    --------
    >>> import flashmm
    >>> cells = flashmm.datasets.simulate_rnaseq(50, 2000, n_samples=6, n_celltypes=2, seed=1)
    >>> pb = flashmm.pseudobulk(cells, by=["sam", "cls"], min_cells=10)
    >>> pb.obs.columns.tolist()[:2], int(pb.obs["n_cells"].sum()) <= 2000
    (['sam', 'cls'], True)
    """
    if not is_anndata(adata):
        raise DataError(f"pseudobulk needs an AnnData (cells x genes), got {type(adata).__name__}.")
    if isinstance(min_cells, bool) or int(min_cells) != min_cells or min_cells < 1:
        raise DataError(f"min_cells must be a positive integer, got {min_cells!r}.")
    import anndata

    obs, matrix, genes = anndata_inputs(adata, layer)
    cols = _by_columns(by, obs)
    codes, first = _group_codes(obs, cols)
    n_cells = np.bincount(codes, minlength=first.size)
    keep = n_cells >= min_cells
    if not keep.any():
        raise DataError(f"no group has at least min_cells={min_cells} cells "
                        f"(largest: {int(n_cells.max())}).")
    new_code = np.where(keep, np.cumsum(keep) - 1, -1)
    _warn_empty_groups(obs, cols, first.size)
    sums = _group_sums(matrix, new_code[codes], int(keep.sum()), len(genes), chunk_size, genes,
                       allow_non_integer)
    constant = _constant_columns(obs, codes, keep, cols)
    table = _group_obs(obs, cols, first[keep], n_cells[keep], constant)
    var = pd.DataFrame(adata.var).copy()
    if not table.index.is_unique:            # labels with "_" can join to the same name
        table.index = anndata.utils.make_index_unique(table.index)
    return anndata.AnnData(X=sums, obs=table, var=var)
