"""Sufficient statistics: one pass over the cells, additive, saveable.

Everything the fit needs is a sum over cells (see ``MATH.md``): the shared
``XX = X'X``, ``ZX = Z'X``, ``ZZ = Z'Z`` and ``n``, and per gene ``XY = X'Y``,
``ZY = Z'Y`` and ``yy`` (the sum of squares).  They are computed chunk by chunk,
sparse input stays sparse, and statistics of disjoint sets of cells add up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._checkpoint import save_npz_atomic
from ._design import Design, RandomComponent
from ._endog import (
    Transform,
    check_orientation,
    gene_names_of,
    prepare_endog,
    resolve_transform,
)
from ._errors import StatsError
from ._kernel import TRANSFORM_CODES, Accumulators, KernelDesign, accumulate_chunk
from ._pass import DEFAULT_CHECKPOINT_EVERY, canonical_input, run_pass
from ._version import __version__

__all__ = ["SufficientStats", "FILE_FORMAT", "FILE_VERSION"]

FILE_FORMAT = "flashmm-sufficient-statistics"
FILE_VERSION = 1

_SHARED = ("XX", "ZX", "ZZ")
_PER_GENE = ("XY", "ZY", "yy")


@dataclass(eq=False)
class SufficientStats:
    """Sufficient statistics of a linear mixed model shared by many genes.

    Attributes
    ----------
    XX : ndarray, shape (p, p)
        ``X'X``.
    ZX : ndarray, shape (q, p)
        ``Z'X``.
    ZZ : ndarray, shape (q, q)
        ``Z'Z``.
    n : int
        Number of cells.
    XY : ndarray, shape (p, n_genes)
        ``X'Y`` (genes are columns, as in the formulas of MATH.md).
    ZY : ndarray, shape (q, n_genes)
        ``Z'Y``.
    yy : ndarray, shape (n_genes,)
        Sum over cells of ``y**2`` for every gene.
    exog_names : list of str
        Fixed-effect term names.
    components : tuple of RandomComponent
        Random components (names and levels), in the column order of ``Z``.
    gene_names : list of str
        Gene names.
    transform : str or None
        Name of the transform applied to the expression values.
    info : dict
        Provenance (formula, groups, ...), JSON-serialisable.
    n_cells : ndarray of int64, shape (n_genes,), optional
        Number of cells in which each gene has a non-zero (transformed) value;
        None for statistics saved before it was recorded.
    """

    XX: np.ndarray
    ZX: np.ndarray
    ZZ: np.ndarray
    n: int
    XY: np.ndarray
    ZY: np.ndarray
    yy: np.ndarray
    exog_names: list[str]
    components: tuple[RandomComponent, ...]
    gene_names: list[str]
    transform: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    n_cells: np.ndarray | None = None

    # ------------------------------------------------------------------ shape
    @property
    def n_genes(self) -> int:
        """Number of genes (responses)."""
        return self.XY.shape[1]

    @property
    def k_fe(self) -> int:
        """Number of fixed-effect terms p."""
        return self.XX.shape[0]

    @property
    def k_re(self) -> int:
        """Total number of random effects q."""
        return self.ZZ.shape[0]

    @property
    def sizes(self) -> list[int]:
        """Number of random effects in each component."""
        return [c.size for c in self.components]

    @property
    def component_index(self) -> np.ndarray:
        """For every random effect (column of Z), the index of its component."""
        return np.repeat(np.arange(len(self.components)), self.sizes)

    # ----------------------------------------------------------- computation
    @classmethod
    def from_design(
        cls,
        design: Design,
        endog: Any,
        transform: Transform = None,
        chunk_size: int | None = None,
        gene_names: Sequence[str] | None = None,
        progress: Callable[[int], None] | None = None,
        make_unique: bool = False,
        *,
        max_memory: int | float | str | None = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ) -> SufficientStats:
        """Compute the statistics in one pass over the cells of ``endog``.

        Every chunk of cells is read once, in its stored dtype, by a fused
        kernel running on all cores (numba; ``numba.set_num_threads`` sets the
        threads), while the next chunk is read in the background.

        Parameters
        ----------
        design : Design
            Fixed and random designs of the cells.
        endog : ndarray, scipy.sparse matrix, DataFrame or backed matrix
            Expression, cells x genes (CSR, CSC or dense; float32 or float64).
            Sparse input stays sparse.
        transform : {None, "log2p1", "log1p"} or callable
            Applied to the values before the statistics are accumulated (by
            the kernel for the named transforms, by numpy for a callable).
        chunk_size : int, optional
            Cells per chunk. By default the chunk size is chosen from
            ``max_memory`` (two chunks are held at once) and logged.
        gene_names : sequence of str, optional
            Gene names (default: DataFrame columns or ``gene0, gene1, ...``).
        progress : callable, optional
            Called with the number of cells processed after each chunk.
        make_unique : bool
            Duplicate gene names raise a :class:`~flashmm.DataError` by default;
            with ``make_unique=True`` they are renamed like anndata's
            ``var_names_make_unique`` (``"A", "A-1", "A-2"``) with a warning.
        max_memory : int, float or str, optional
            Memory the pass may use, e.g. ``"2GB"`` (default: half of the RAM).
        checkpoint : str or PathLike, optional
            A checkpoint file, written every ``checkpoint_every`` chunks. If it
            exists when the pass starts, the pass resumes from it (and gives
            the same statistics as an uninterrupted pass); a checkpoint of
            another input, design, transform or chunking is refused with a
            :class:`~flashmm.StatsError`. It is deleted when the pass ends.
        checkpoint_every : int
            Chunks between two checkpoints.
        """
        n, n_genes = check_orientation(endog, design.nobs)
        names = gene_names_of(endog, n_genes, gene_names, make_unique=make_unique)
        func, tname = resolve_transform(transform)
        code = TRANSFORM_CODES.get(transform) if transform is None or isinstance(transform, str) else None
        endog = canonical_input(endog) if sp.issparse(endog) and endog.format == "csc" \
            else prepare_endog(endog)
        partial = run_pass(design, endog, names, func, code, transform_name=tname,
                           chunk_size=chunk_size, max_memory=max_memory, progress=progress,
                           checkpoint=checkpoint, checkpoint_every=checkpoint_every)
        return cls.from_partial(partial, design, names, tname)

    @classmethod
    def from_partial(cls, partial: dict[str, np.ndarray], design: Design,
                     gene_names: list[str], transform: str | None) -> SufficientStats:
        """Assemble statistics from accumulated per-gene sums and the design."""
        X, Z = design.exog, design.exog_re
        return cls(
            XX=X.T @ X,
            ZX=np.asarray(Z.T @ X),
            ZZ=np.asarray((Z.T @ Z).toarray()),
            n=design.nobs,
            XY=partial["XY"],
            ZY=partial["ZY"],
            yy=partial["yy"],
            exog_names=list(design.exog_names),
            components=design.components,
            gene_names=list(gene_names),
            transform=transform,
            info=dict(design.info),
            n_cells=partial.get("n_cells"),
        )

    # ------------------------------------------------------------- algebra
    def check_compatible(self, other: SufficientStats) -> None:
        """Raise StatsError unless ``other`` has the same design and genes."""
        if not isinstance(other, SufficientStats):
            raise StatsError(f"cannot combine SufficientStats with {type(other).__name__}.")
        checks = [
            (self.exog_names == other.exog_names, "fixed-effect terms", self.exog_names, other.exog_names),
            (_component_key(self.components) == _component_key(other.components),
             "random components or their levels", [c.name for c in self.components],
             [c.name for c in other.components]),
            (self.gene_names == other.gene_names, "genes", self.n_genes, other.n_genes),
            (self.transform == other.transform, "transform", self.transform, other.transform),
        ]
        for ok, what, a, b in checks:
            if not ok:
                raise StatsError(
                    f"cannot merge statistics computed with different {what} "
                    f"({_short(a)} vs {_short(b)}); compute both with the same design, "
                    "levels and genes."
                )

    def __add__(self, other: SufficientStats) -> SufficientStats:
        """Statistics of the union of two disjoint sets of cells."""
        self.check_compatible(other)
        return SufficientStats(
            XX=self.XX + other.XX,
            ZX=self.ZX + other.ZX,
            ZZ=self.ZZ + other.ZZ,
            n=self.n + other.n,
            XY=self.XY + other.XY,
            ZY=self.ZY + other.ZY,
            yy=self.yy + other.yy,
            exog_names=list(self.exog_names),
            components=self.components,
            gene_names=list(self.gene_names),
            transform=self.transform,
            info=dict(self.info),
            n_cells=None if self.n_cells is None or other.n_cells is None
            else self.n_cells + other.n_cells,
        )

    def subset_genes(self, genes: Sequence[int] | Sequence[str] | np.ndarray) -> SufficientStats:
        """Statistics of a subset of genes (positions, names or boolean mask)."""
        idx = self._gene_positions(genes)
        return SufficientStats(
            self.XX, self.ZX, self.ZZ, self.n, self.XY[:, idx], self.ZY[:, idx],
            self.yy[idx], list(self.exog_names), self.components,
            [self.gene_names[i] for i in idx], self.transform, dict(self.info),
            None if self.n_cells is None else self.n_cells[idx],
        )

    def _gene_positions(self, genes: Any) -> np.ndarray:
        arr = np.asarray(genes)
        if arr.dtype == bool:
            return np.flatnonzero(arr)
        if arr.dtype.kind in "iu":
            return arr.astype(np.int64)
        lookup = {g: i for i, g in enumerate(self.gene_names)}
        missing = [g for g in arr if g not in lookup]
        if missing:
            raise KeyError(f"genes not found: {missing[:5]}")
        return np.array([lookup[g] for g in arr], dtype=np.int64)

    # ----------------------------------------------------------------- I/O
    def to_arrays(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON metadata and named arrays that :meth:`from_arrays` turns back into these statistics."""
        meta = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "flashmm_version": __version__,
            "n": int(self.n),
            "exog_names": self.exog_names,
            "components": [_component_to_json(c) for c in self.components],
            "transform": self.transform,
            "info": _jsonable(self.info),
        }
        arrays = {k: getattr(self, k) for k in _SHARED + _PER_GENE}
        arrays["gene_names"] = np.array(self.gene_names, dtype=str)
        if self.n_cells is not None:
            arrays["n_cells"] = np.asarray(self.n_cells, dtype=np.int64)
        # known covariance factors (group_cov): optional array L_<component position>
        arrays.update({f"L_{i}": c.cov_factor for i, c in enumerate(self.components)
                       if c.cov_factor is not None})
        return meta, arrays

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to an ``.npz`` file (no pickled objects).

        The file is written under a temporary name beside ``path`` and renamed
        onto it: ``path`` never holds a partial file.
        """
        meta, arrays = self.to_arrays()
        save_npz_atomic(path, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SufficientStats:
        """Read statistics written by :meth:`save`; other files are refused."""
        try:
            with np.load(path, allow_pickle=False) as f:
                contents = {k: f[k] for k in f.files}
        except (OSError, ValueError) as err:
            raise StatsError(f"{os.fspath(path)!r} is not a readable .npz file: {err}") from None
        if "meta" not in contents:
            raise StatsError(f"{os.fspath(path)!r} is not a flashmm statistics file (no metadata).")
        try:
            meta = json.loads(str(contents["meta"]))
        except json.JSONDecodeError:
            raise StatsError(f"{os.fspath(path)!r} has unreadable flashmm metadata.") from None
        if meta.get("format") != FILE_FORMAT:
            raise StatsError(f"{os.fspath(path)!r} is not a flashmm statistics file.")
        if meta.get("version") != FILE_VERSION:
            raise StatsError(
                f"{os.fspath(path)!r} was written in statistics format version "
                f"{meta.get('version')} (by flashmm {meta.get('flashmm_version')}); this "
                f"flashmm reads version {FILE_VERSION}. Recompute the statistics."
            )
        return cls.from_arrays(meta, contents, repr(os.fspath(path)))

    @classmethod
    def from_arrays(cls, meta: dict[str, Any], contents: dict[str, np.ndarray],
                    where: str = "the file") -> SufficientStats:
        """Statistics from the metadata and arrays of :meth:`to_arrays` (``where`` names the source)."""
        missing = [k for k in _SHARED + _PER_GENE + ("gene_names",) if k not in contents]
        if missing:
            raise StatsError(f"{where} lacks arrays {missing}.")
        return cls(
            XX=contents["XX"], ZX=contents["ZX"], ZZ=contents["ZZ"], n=int(meta["n"]),
            XY=contents["XY"], ZY=contents["ZY"], yy=contents["yy"],
            exog_names=list(meta["exog_names"]),
            components=tuple(_component_from_json(c, contents.get(f"L_{i}"))
                             for i, c in enumerate(meta["components"])),
            gene_names=[str(g) for g in contents["gene_names"]],
            transform=meta["transform"], info=dict(meta.get("info") or {}),
            n_cells=contents.get("n_cells"),
        )

    def __repr__(self) -> str:
        comps = ", ".join(f"{c.name}({c.size})" for c in self.components)
        return (
            f"SufficientStats(n={self.n}, genes={self.n_genes}, terms={self.k_fe}, "
            f"components=[{comps}], transform={self.transform!r})"
        )


def empty_partial(p: int, q: int, n_genes: int) -> dict[str, np.ndarray]:
    """Zeroed per-gene accumulators."""
    return {"XY": np.zeros((p, n_genes)), "ZY": np.zeros((q, n_genes)), "yy": np.zeros(n_genes),
            "n_cells": np.zeros(n_genes, dtype=np.int64)}


def accumulate(partial: dict[str, np.ndarray], X: np.ndarray, Z: sp.csr_matrix,
               block: np.ndarray | sp.spmatrix, transform: str | None = None) -> None:
    """Add one chunk's ``X'Y``, ``Z'Y``, ``sum y^2`` and cell counts to ``partial`` in place.

    ``X`` and ``Z`` are the chunk's rows of the designs; ``block`` its values
    (a named ``transform`` is applied by the kernel).
    """
    acc = Accumulators.zeros(X.shape[1], Z.shape[1], block.shape[1])
    accumulate_chunk(acc, KernelDesign.of(X, Z), 0, block, TRANSFORM_CODES[transform])
    for key, value in acc.as_partial().items():
        if key in partial:
            partial[key] += value
        else:
            partial[key] = value


def _component_key(components: Sequence[RandomComponent]) -> list[tuple[Any, ...]]:
    return [(c.name, c.levels, c.cov_levels,
             None if c.cov_factor is None else np.asarray(c.cov_factor).tobytes())
            for c in components]


def _component_to_json(c: RandomComponent) -> dict[str, Any]:
    return {"name": c.name, "levels": list(c.levels),
            "groups": list(c.groups) if c.groups is not None else None,
            "columns": list(c.columns) if c.columns is not None else None,
            **({"cov_levels": list(c.cov_levels)} if c.cov_levels is not None else {})}


def _component_from_json(d: dict[str, Any], cov_factor: np.ndarray | None = None) -> RandomComponent:
    cov_levels = d.get("cov_levels")
    if (cov_levels is None) != (cov_factor is None):
        raise StatsError(
            f"component {d['name']!r}: the known-covariance factor and its level names "
            "must both be present in the file (truncated or edited file?)."
        )
    return RandomComponent(
        d["name"], tuple(d["levels"]),
        tuple(d["groups"]) if d.get("groups") is not None else None,
        tuple(d["columns"]) if d.get("columns") is not None else None,
        tuple(cov_levels) if cov_levels is not None else None,
        None if cov_factor is None else np.asarray(cov_factor, dtype=np.float64),
    )


def _jsonable(obj: Any) -> Any:
    """Keep only JSON-serialisable provenance."""
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return {k: _jsonable(v) if isinstance(v, dict) else str(v) for k, v in dict(obj).items()}


def _short(x: Any) -> str:
    s = str(x)
    return s if len(s) < 80 else s[:77] + "..."
