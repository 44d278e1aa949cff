"""Per-gene weighted sufficient statistics: one pass over the samples, memory budgeted.

With precision weights ``w_ng`` (sample ``n``, gene ``g``; lme4's
``lmer(weights = w)``: residual variance ``s / w``) every gene has its own

    X'W X (p x p),  Z'W X (q x p),  Z'W Z (q x q),  X'W y,  Z'W y,  y'W y,  sum log w

so nothing is shared between genes.  They are still sums over samples, formed
chunk by chunk: for the pattern of non-zero entries of ``Z'Z`` (and of ``Z'X``)
a sparse matrix ``R`` holds, for every entry ``(a, b)`` and sample ``n``, the
product ``Z_na Z_nb``, so that the entries of all genes are ``R @ W`` (one
sparse-dense product per chunk).  Only the non-zero pattern of ``Z'Z`` is stored
per gene (diagonal for one random intercept, arrowheads for nested factors), so
the stored statistics take ``8 (nnz(Z'Z) + q p + p^2 + p + q + 2)`` bytes per gene;
the dense ``q x q`` matrices are built for a chunk of genes only when a fit needs
them (:mod:`flashmm._fit_weighted`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._design import Design
from ._endog import DEFAULT_CHUNK_CELLS, Transform, iter_chunks, prepare_endog, resolve_transform
from ._errors import DataError
from ._memory import MemoryBudget, MemoryBudgetError, format_bytes

__all__ = ["WeightedStats", "check_weights", "weights_array"]


def weights_array(weights: Any, n: int, n_genes: int) -> np.ndarray:
    """Precision weights as an (n_samples, n_genes) float array, from the accepted forms.

    Accepts an (n_samples, n_genes) array or DataFrame, a length-n_samples
    vector (the same weights for every gene), or an object with a ``weights``
    attribute in limma's orientation, genes x samples (a
    :class:`~flashmm.VoomResult`), which is transposed.
    """
    if hasattr(weights, "E") and hasattr(weights, "weights"):
        weights = np.asarray(weights.weights, dtype=float).T
    w = np.asarray(weights.to_numpy() if hasattr(weights, "to_numpy") else weights, dtype=float)
    check_weights(w)
    if w.ndim == 1 and w.size == n:
        w = np.broadcast_to(w[:, None], (n, n_genes))
    if w.shape != (n, n_genes):
        hint = (" It looks transposed (genes x samples): pass weights.T."
                if w.shape == (n_genes, n) else "")
        raise DataError(f"weights must have shape (n_samples, n_genes) = ({n}, {n_genes}) or "
                        f"length n_samples ({n}); got shape {w.shape}.{hint}")
    return w


def check_weights(w: np.ndarray, what: str = "weights") -> None:
    """Raise a DataError counting the weights that are NaN, infinite, zero or negative."""
    w = np.asarray(w, dtype=float)
    bad = {"NaN": int(np.isnan(w).sum()), "infinite": int(np.isinf(w).sum()),
           "zero": int((w == 0).sum()), "negative": int((w < 0).sum())}
    if any(bad.values()):
        parts = ", ".join(f"{c} {k}" for k, c in bad.items() if c)
        raise DataError(
            f"{what} must be positive and finite; {sum(bad.values())} of {w.size} are not "
            f"({parts}). To leave an observation out, drop the sample or set its expression "
            "to NaN where missing values are allowed; a zero weight is not a valid precision."
        )


def _pair_matrix(Z: sp.csr_matrix, pairs: tuple[np.ndarray, np.ndarray]) -> sp.csr_matrix:
    """Sparse (n_pairs, n): entry ``(k, n) = Z[n, a_k] Z[n, b_k]`` for the pairs ``(a_k, b_k)``."""
    a, b = pairs
    n = Z.shape[0]
    if a.size == 0:
        return sp.csr_matrix((0, n))
    Zc = sp.csc_matrix(Z)
    return sp.csr_matrix(Zc[:, a].multiply(Zc[:, b]).T)


@dataclass(eq=False)
class WeightedStats:
    """Weighted sufficient statistics, one set per gene (genes in rows).

    Attributes
    ----------
    XX : ndarray (G, p, p)
        ``X'W X``.
    ZX : ndarray (G, q, p)
        ``Z'W X``.
    ZZ_values : ndarray (G, nnz)
        ``Z'W Z`` on the non-zero pattern ``zz_pattern`` of ``Z'Z``.
    zz_pattern : (ndarray, ndarray)
        Row and column of every stored entry (both triangles).
    XY : ndarray (G, p), ZY : ndarray (G, q), yy : ndarray (G,)
        ``X'W y``, ``Z'W y``, ``y'W y``.
    logw : ndarray (G,)
        ``sum log w`` (lme4 adds half of it to the log-likelihood).
    n : int
        Number of samples.
    component_index : ndarray (q,)
        Component of every random effect.
    """

    XX: np.ndarray
    ZX: np.ndarray
    ZZ_values: np.ndarray
    zz_pattern: tuple[np.ndarray, np.ndarray]
    XY: np.ndarray
    ZY: np.ndarray
    yy: np.ndarray
    logw: np.ndarray
    n: int
    component_index: np.ndarray

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return self.XY.shape[0]

    @property
    def k_fe(self) -> int:
        """Number of fixed effects p."""
        return self.XX.shape[1]

    @property
    def k_re(self) -> int:
        """Number of random effects q."""
        return self.ZY.shape[1]

    def dense_ZZ(self, idx: np.ndarray) -> np.ndarray:
        """``Z'W Z`` of the genes ``idx`` as dense (len(idx), q, q) matrices."""
        q = self.k_re
        out = np.zeros((idx.size, q, q))
        r, c = self.zz_pattern
        out[:, r, c] = self.ZZ_values[idx]
        return out

    def subset(self, idx: np.ndarray) -> WeightedStats:
        """The statistics of the genes ``idx``."""
        return WeightedStats(self.XX[idx], self.ZX[idx], self.ZZ_values[idx], self.zz_pattern,
                             self.XY[idx], self.ZY[idx], self.yy[idx], self.logw[idx], self.n,
                             self.component_index)

    def scaled(self, c: np.ndarray) -> WeightedStats:
        """The statistics of every gene's ``y / c`` (``c`` per gene)."""
        return WeightedStats(self.XX, self.ZX, self.ZZ_values, self.zz_pattern,
                             self.XY / c[:, None], self.ZY / c[:, None], self.yy / (c * c),
                             self.logw, self.n, self.component_index)

    @staticmethod
    def stored_bytes(nnz: int, q: int, p: int) -> int:
        """Bytes stored per gene."""
        return 8 * (nnz + q * p + p * p + p + q + 2)

    @classmethod
    def from_design(cls, design: Design, endog: Any, weights: np.ndarray,
                    gene_names: Sequence[str], transform: Transform = None,
                    chunk_size: int = DEFAULT_CHUNK_CELLS,
                    max_memory: int | float | str | None = None) -> WeightedStats:
        """Accumulate the weighted statistics in one chunked pass over the samples.

        ``weights`` is (n_samples, n_genes), already checked (:func:`weights_array`).
        Raises :class:`~flashmm.MemoryBudgetError` before the pass when the
        stored statistics of all genes would exceed ``max_memory``.
        """
        X = np.asarray(design.exog, dtype=float)
        Z = sp.csr_matrix(design.exog_re, dtype=float)
        n, p = X.shape
        q = Z.shape[1]
        G = weights.shape[1]
        zz = sp.coo_matrix(Z.T @ Z)
        keep = zz.data != 0
        pattern = (zz.row[keep].astype(np.int64), zz.col[keep].astype(np.int64))
        _check_budget(G, pattern[0].size, q, p, max_memory)
        func, _ = resolve_transform(transform)
        acc = {"XX": np.zeros((G, p * p)), "ZX": np.zeros((G, q * p)),
               "ZZ": np.zeros((G, pattern[0].size)), "XY": np.zeros((G, p)),
               "ZY": np.zeros((G, q)), "yy": np.zeros(G)}
        XXp = np.einsum("na,nb->nab", X, X).reshape(n, p * p)
        for start, stop, block in iter_chunks(prepare_endog(endog), chunk_size, func,
                                              list(gene_names)):
            y = block.toarray() if sp.issparse(block) else np.asarray(block, dtype=float)
            w = weights[start:stop]
            wy = w * y
            Zc = Z[start:stop]
            acc["XX"] += w.T @ XXp[start:stop]
            acc["XY"] += wy.T @ X[start:stop]
            acc["yy"] += np.einsum("ng,ng->g", wy, y)
            if q:
                R = _pair_matrix(Zc, pattern)
                acc["ZZ"] += np.asarray((R @ w).T)
                ZX = acc["ZX"].reshape(G, q, p)
                for j in range(p):             # a loop over fixed effects, not genes
                    ZX[:, :, j] += np.asarray(Zc.T @ (w * X[start:stop, j:j + 1])).T
                acc["ZY"] += np.asarray((Zc.T @ wy).T)
        return cls(XX=acc["XX"].reshape(G, p, p), ZX=acc["ZX"].reshape(G, q, p),
                   ZZ_values=acc["ZZ"], zz_pattern=pattern, XY=acc["XY"], ZY=acc["ZY"],
                   yy=acc["yy"], logw=np.sum(np.log(weights), axis=0), n=n,
                   component_index=np.repeat(np.arange(len(design.components)),
                                             [c.size for c in design.components]))


def _check_budget(G: int, nnz: int, q: int, p: int, max_memory: Any) -> None:
    """Refuse before the pass when the per-gene statistics of all genes exceed the budget."""
    budget = MemoryBudget.of(max_memory)
    need = G * WeightedStats.stored_bytes(nnz, q, p)
    if need > budget.limit:
        raise MemoryBudgetError(
            f"per-gene weighted statistics need {format_bytes(need)} ({G} genes x "
            f"{format_bytes(WeightedStats.stored_bytes(nnz, q, p))}: {nnz} entries of Z'WZ, "
            f"q={q} random effects, p={p} fixed effects), more than "
            f"max_memory={format_bytes(budget.limit)}. Fit the genes in subsets, "
            "aggregate to fewer samples or random effects, or raise max_memory."
        )
