"""limma's ``voom``: log-CPM values with precision weights from the mean-variance trend.

For counts ``c`` (genes x samples) with library sizes ``L``::

    E = log2((c + 0.5) / (L + 1) * 1e6)                        (log-CPM)
    fit = lm_fit(E, design)                                   (per-gene linear model)
    sx = Amean + mean(log2(L + 1)) - log2(1e6)                 (mean log count)
    sy = sqrt(sigma)                                          (sqrt residual sd)
    trend = lowess(sx, sy, f=span)                            (R's lowess, iter=3)
    fitted log count = log2(2^(coef X') * (L + 1) / 1e6)
    weights = 1 / trend(fitted log count)^4                  (approxfun(rule=2))

Genes with zero counts in every sample are left out of the trend.  The result
(:class:`VoomResult`) is accepted by :func:`~flashmm.lm_fit` directly, which
then uses its ``E``, ``weights`` and ``design``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ._errors import DataError
from ._lowess import approx_rule2, lowess
from .limma import _design_matrix, _expression, _is_anndata, lm_fit

__all__ = ["VoomResult", "voom"]


@dataclass(eq=False)
class VoomResult:
    """Output of :func:`voom` (limma's ``EList``), genes in rows.

    Attributes
    ----------
    E : ndarray (G, n)
        log2 counts per million.
    weights : ndarray (G, n)
        Precision weights, ``1 / trend(fitted log count)^4``.
    design : ndarray (n, p)
        The design matrix used for the fit.
    design_names : list of str
        Its column names.
    genes, samples : list of str
        Gene and sample names.
    lib_size : ndarray (n,)
        Library sizes.
    targets : DataFrame or None
        Sample covariates (``adata.obs`` or ``design_data``), for formulas in
        :func:`~flashmm.lm_fit`.
    voom_xy : tuple of ndarray
        The trend's data: mean log count ``sx`` and ``sqrt(sigma)`` per gene
        (genes with all-zero counts left out).
    voom_line : tuple of ndarray
        The lowess curve: ``sx`` sorted and the fitted values.
    """

    E: np.ndarray
    weights: np.ndarray
    design: np.ndarray
    design_names: list[str]
    genes: list[str]
    samples: list[str]
    lib_size: np.ndarray
    targets: pd.DataFrame | None = None
    voom_xy: tuple[np.ndarray, np.ndarray] | None = None
    voom_line: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(genes, samples)."""
        return self.E.shape

    def __repr__(self) -> str:
        G, n = self.E.shape
        return f"VoomResult(genes={G}, samples={n}, design={self.design_names})"


def _sample_names(counts: Any, n: int) -> list[str]:
    if _is_anndata(counts):
        return [str(s) for s in counts.obs_names]
    if isinstance(counts, pd.DataFrame):
        return [str(s) for s in counts.columns]
    return [f"sample{i}" for i in range(n)]


def _library_sizes(lib_size: Any, C: np.ndarray, frame: pd.DataFrame | None) -> np.ndarray:
    """Library sizes (n,): column sums of the counts, an array, or a covariate column name."""
    n = C.shape[0]
    if lib_size is None:
        return C.sum(axis=1)
    if isinstance(lib_size, str):
        if frame is None or lib_size not in frame:
            raise DataError(f"lib_size={lib_size!r} is not a column of the sample covariates.")
        lib_size = frame[lib_size].to_numpy()
    L = np.asarray(lib_size, dtype=float).ravel()
    if L.size != n:
        raise DataError(f"lib_size must have one value per sample ({n}), got {L.size}.")
    if not np.all(np.isfinite(L) & (L > -1.0)):
        raise DataError("lib_size must be finite and greater than -1.")
    return L


def _check_counts(C: np.ndarray) -> None:
    if C.shape[1] < 2:
        raise DataError("voom needs at least two genes to fit a mean-variance trend.")
    if np.isnan(C).any():
        raise DataError("voom does not allow missing (NaN) counts.")
    if not np.all(np.isfinite(C)):
        raise DataError("voom needs finite counts.")
    if C.min() < 0:
        raise DataError("voom does not allow negative counts.")


def log_cpm(C: np.ndarray, lib_size: np.ndarray) -> np.ndarray:
    """voom's log-CPM, ``log2((c + 0.5) / (L + 1) * 1e6)`` (same shape as ``C``, samples in rows)."""
    return np.log2((C + 0.5) / (lib_size[:, None] + 1.0) * 1e6)


def _trend_weights(fit: Any, C: np.ndarray, X: np.ndarray, lib_size: np.ndarray,
                   span: float) -> tuple[np.ndarray, tuple, tuple]:
    """voom's precision weights (G, n) from the linear fit, with the trend's data and curve."""
    sx = fit.Amean + np.mean(np.log2(lib_size + 1.0)) - np.log2(1e6)
    sy = np.sqrt(fit.sigma)
    keep = C.sum(axis=0) != 0
    if keep.sum() < 2:
        raise DataError("voom needs at least two genes with non-zero counts to fit the trend.")
    lx, ly = lowess(sx[keep], sy[keep], f=span)
    fitted = fit.coefficients @ X.T                                   # G x n
    fitted_count = 1e-6 * (2.0 ** fitted * (lib_size + 1.0))
    w = 1.0 / approx_rule2(lx, ly, np.log2(fitted_count)) ** 4
    return w, (sx[keep], sy[keep]), (lx, ly)


def voom(
    counts: Any,
    design: Any = None,
    design_data: pd.DataFrame | None = None,
    lib_size: Any = None,
    span: float = 0.5,
    *,
    block: Any = None,
    correlation: float | None = None,
    weights: Any = None,
    layer: str | None = None,
) -> VoomResult:
    """Transform counts to log-CPM with precision weights (limma's ``voom``).

    Parameters
    ----------
    counts : AnnData, ndarray, sparse matrix or DataFrame
        Non-negative counts.  AnnData: samples in rows (e.g. from
        :func:`~flashmm.pseudobulk`), ``X`` or ``layers[layer]``; ndarray or
        DataFrame: **genes x samples**, as :func:`~flashmm.lm_fit`.
    design : None, str, ndarray or DataFrame
        Design matrix (samples x p) or a patsy formula evaluated on
        ``adata.obs`` or ``design_data``; ``None``: intercept only.  Must have
        full column rank.
    design_data : DataFrame, optional
        Sample covariates for a formula design (non-AnnData input).
    lib_size : array_like or str, optional
        Library size per sample (default: the column sums of the counts), or
        the name of a sample covariate column.  For normalised library sizes
        pass ``lib_size * norm_factors``.
    span : float
        Span of the lowess trend (R's ``lowess(f = span)``).
    block, correlation, weights
        Passed to the linear fit (:func:`~flashmm.lm_fit`), as limma's
        ``voom`` passes them to ``lmFit``.
    layer : str, optional
        AnnData layer holding the counts.

    Returns
    -------
    VoomResult
        ``E`` and ``weights`` (genes x samples), ``design``; pass it to
        :func:`~flashmm.lm_fit` and then :func:`~flashmm.e_bayes`.

    Notes
    -----
    The trend is R's ``lowess`` (``iter = 3``, ``delta = 0.01 * range``),
    reproduced exactly, and its interpolation R's ``approxfun(rule = 2)``;
    on simulated data the weights agree with limma 3.54 to about 1e-13
    (``tests/reference/voom``).  limma's ``normalize.method`` (between-sample
    normalisation of the log-CPM) is not offered: it is ``"none"`` here.
    Rank-deficient designs are refused (limma drops the aliased columns).
    With fewer than two genes with residual degrees of freedom the weights are
    all 1, with a warning, as limma.

    Examples
    --------
    >>> import numpy as np
    >>> import flashmm
    >>> rng = np.random.default_rng(0)
    >>> counts = rng.poisson(20, size=(100, 6))         # 100 genes x 6 samples
    >>> X = np.column_stack([np.ones(6), [0, 0, 0, 1, 1, 1]])
    >>> v = flashmm.voom(counts, X)
    >>> fit = flashmm.e_bayes(flashmm.lm_fit(v))
    >>> v.weights.shape, fit.t.shape
    ((100, 6), (100, 2))
    """
    if not np.isfinite(span) or span <= 0:
        raise ValueError(f"span must be finite and > 0, got {span!r}.")
    C, genes, obs = _expression(counts, layer)
    _check_counts(C)
    n = C.shape[0]
    frame = design_data if design_data is not None else obs
    X, names = _design_matrix(design, n, obs, design_data)
    L = _library_sizes(lib_size, C, frame)
    E = log_cpm(C, L)
    fit = lm_fit(E.T, X, block=block, correlation=correlation, weights=weights,
                 design_data=frame)
    out = VoomResult(E=E.T, weights=np.ones_like(E.T), design=X, design_names=names,
                     genes=genes, samples=_sample_names(counts, n), lib_size=L, targets=frame)
    n_rep = int(np.sum(np.asarray(fit.df_residual) > 0))
    if n_rep < 2:
        warnings.warn("The experimental design has no replication. Setting weights to 1."
                      if n_rep == 0 else "Only one gene with any replication. Setting weights to 1.",
                      stacklevel=2)
        return out
    out.weights, out.voom_xy, out.voom_line = _trend_weights(fit, C, X, L, span)
    return out
