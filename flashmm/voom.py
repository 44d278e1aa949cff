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

import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ._errors import DataError, DesignError
from ._lowess import approx_rule2, lowess
from .limma import _design_matrix, _expression, _is_anndata, lm_fit

__all__ = ["VoomResult", "voom", "voom_with_dream_weights"]


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


def _check_counts(C: np.ndarray, allow_non_integer: bool = False, what: str = "voom") -> None:
    """Refuse counts voom cannot use: too few genes, NaN, inf, negative or (by default) fractional."""
    if C.shape[1] < 2:
        raise DataError(f"{what} needs at least two genes to fit a mean-variance trend.")
    if np.isnan(C).any():
        raise DataError(f"{what} does not allow missing (NaN) counts.")
    if not np.all(np.isfinite(C)):
        raise DataError(f"{what} needs finite counts.")
    if C.min() < 0:
        raise DataError(f"{what} does not allow negative counts ({int((C < 0).sum())} of "
                        f"{C.size} values are negative); pass raw counts, not centred or "
                        "scaled values.")
    if not allow_non_integer:
        frac = int(np.sum(C != np.round(C)))
        if frac:
            raise DataError(f"{what} expects counts, but {frac} of {C.size} values are not "
                            "integers; pass raw counts, or allow_non_integer=True for "
                            "estimated counts (e.g. from salmon or ambient-RNA correction).")


def log_cpm(C: np.ndarray, lib_size: np.ndarray) -> np.ndarray:
    """voom's log-CPM, ``log2((c + 0.5) / (L + 1) * 1e6)`` (same shape as ``C``, samples in rows)."""
    return np.log2((C + 0.5) / (lib_size[:, None] + 1.0) * 1e6)


def _trend_weights(fit: Any, C: np.ndarray, X: np.ndarray, lib_size: np.ndarray,
                   span: float) -> tuple[np.ndarray, tuple, tuple]:
    """voom's precision weights (G, n) from the linear fit, with the trend's data and curve."""
    return mean_variance_weights(fit.Amean, fit.sigma, fit.coefficients @ X.T, C, lib_size,
                                 span)


def mean_variance_weights(amean: np.ndarray, sigma: np.ndarray, fitted: np.ndarray,
                          C: np.ndarray, lib_size: np.ndarray, span: float
                          ) -> tuple[np.ndarray, tuple, tuple]:
    """voom's trend and weights from per-gene means, residual SDs and fitted log-CPM.

    ``sqrt(sigma)`` against the mean log count (genes with all-zero counts in
    ``C``, samples x genes, left out) is smoothed by R's ``lowess``; the weights
    are ``1 / trend(fitted log count)^4`` with the fitted log-CPM ``fitted``
    (genes x samples).  Returns the weights (G, n), the trend's data and curve.
    """
    sx = amean + np.mean(np.log2(lib_size + 1.0)) - np.log2(1e6)
    sy = np.sqrt(sigma)
    keep = C.sum(axis=0) != 0
    if keep.sum() < 2:
        raise DataError("voom needs at least two genes with non-zero counts to fit the trend.")
    lx, ly = lowess(sx[keep], sy[keep], f=span)
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
    allow_non_integer: bool = False,
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
    allow_non_integer : bool
        Accept fractional counts (estimated counts); by default they are an
        error, as are negative counts always.

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
    _check_counts(C, allow_non_integer)
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


# ------------------------------------------------------ voomWithDreamWeights
_RANDOM_TERM = re.compile(r"\(\s*1\s*\|\s*([^()|]+?)\s*\)")


def _split_random_terms(formula: str, frame: pd.DataFrame) -> tuple[str, dict[str, str], pd.DataFrame]:
    """lme4-style ``(1 | f)`` / ``(1 | a:b)`` terms -> fixed formula, ``vc_formula``, covariates.

    Every random intercept becomes a variance component named as in lme4
    (``"donor"``, ``"donor:celltype"``); an interaction grouping gets its own
    label column in a copy of the covariates.
    """
    vc: dict[str, str] = {}
    frame = frame.copy()
    for j, name in enumerate(_RANDOM_TERM.findall(formula)):
        cols = [c.strip() for c in name.split(":")]
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise DesignError(f"random term (1 | {name}): column(s) {missing} not in the "
                              "sample covariates.")
        label = f"_flashmm_re{j}"
        frame[label] = frame[cols].astype(str).agg(":".join, axis=1)
        vc[":".join(cols)] = f"0 + C({label})"
    fixed = _RANDOM_TERM.sub("", formula)
    fixed = re.sub(r"\+\s*(\+\s*)+", "+ ", fixed)
    fixed = re.sub(r"~\s*\+", "~ ", fixed).strip().rstrip("+").strip()
    if fixed.strip() in ("", "~"):
        fixed = "~ 1"
    if "|" in fixed:
        raise DesignError(f"only random intercepts (1 | f) are supported in {formula!r}; "
                          "random slopes are not available with precision weights.")
    return fixed, vc, frame


def _dream_input_weights(weights: Any, G: int, n: int) -> np.ndarray | None:
    """Input weights as genes x samples, each gene rescaled to mean 1 (variancePartition)."""
    if weights is None:
        return None
    from ._weighted_stats import check_weights

    w = np.asarray(weights.weights if hasattr(weights, "weights") else weights, dtype=float)
    check_weights(w)
    if w.ndim == 1 and w.size == n:
        w = np.broadcast_to(w, (G, n))
    if w.shape != (G, n):
        raise DataError(f"weights must have length n_samples ({n}) or shape (n_genes, "
                        f"n_samples) = ({G}, {n}); got shape {w.shape}.")
    return w / w.mean(axis=1, keepdims=True)


def voom_with_dream_weights(
    counts: Any,
    formula: str,
    data: pd.DataFrame | None = None,
    lib_size: Any = None,
    span: float = 0.5,
    *,
    weights: Any = None,
    reml: bool = False,
    rescale_weights_after: bool = False,
    layer: str | None = None,
    allow_non_integer: bool = False,
) -> VoomResult:
    """voom weights from a mixed model (variancePartition's ``voomWithDreamWeights``).

    As :func:`voom`, but the per-gene model is the linear mixed model of
    ``formula`` (random intercepts written as in lme4, ``~ trt + (1 | donor)``):
    the trend is fitted to ``sqrt(sigma)`` of every gene's mixed-model fit
    against its mean log count, and the weights come from the model's fitted
    values *including the random effects* (lme4's ``predict``)::

        E = log2((c + 0.5) / (L + 1) * 1e6)
        fit = lmer(E_g ~ formula, weights = w_g / mean(w_g), REML = reml)   (every gene g)
        sx = mean(E_g) + mean(log2(L + 1)) - log2(1e6),  sy = sqrt(sigma_g)
        weights = 1 / lowess(sx, sy)(log2(2^fitted * (L + 1) / 1e6))^4

    Parameters
    ----------
    counts : AnnData, ndarray, sparse matrix or DataFrame
        Non-negative counts; orientation as :func:`voom` (ndarray/DataFrame
        genes x samples, AnnData samples in rows).
    formula : str
        Fixed effects plus random intercepts ``(1 | f)`` or ``(1 | a:b)``,
        e.g. ``"~ trt + celltype + (1 | donor)"``.  Without a random term the
        result is :func:`voom`'s.
    data : DataFrame, optional
        Sample covariates (default: ``adata.obs``).
    lib_size : array_like or str, optional
        Library sizes (default: column sums), or a covariate column name.
    span : float
        Span of R's ``lowess``.
    weights : array_like or VoomResult, optional
        Prior precision weights: one per sample, genes x samples, or a
        :class:`VoomResult`; each gene's weights are rescaled to mean 1 and
        used in the mixed-model fit (variancePartition's behaviour).
    reml : bool
        variancePartition fits these models by ML (``REML = FALSE``), the default here.
    rescale_weights_after : bool
        Multiply the output weights by the (rescaled) input weights
        (variancePartition's ``rescaleWeightsAfter``).
    layer : str, optional
        AnnData layer holding the counts.
    allow_non_integer : bool
        Accept fractional counts.

    Returns
    -------
    VoomResult
        ``E``, ``weights`` (genes x samples) and the fixed ``design``; genes
        whose mixed model cannot be fitted (constant log-CPM) are dropped with
        a warning, as variancePartition drops them.  Pass it to
        :class:`~flashmm.MultiGeneMixedLM` (``weights=v``) for dream-style
        tests, or to :func:`~flashmm.lm_fit`.

    Notes
    -----
    variancePartition options not offered: ``normalize.method`` (``"none"``
    here), ``span = "auto"``, ``prior.count`` other than 0.5,
    ``scaledByLib``, ``priorWeightsAsCounts``.  Validated against an R
    re-implementation of these steps with lme4 (``tests/reference/dream_voom``;
    variancePartition itself was not installable where it was made).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> import flashmm
    >>> rng = np.random.default_rng(0)
    >>> samples = pd.DataFrame({"donor": np.repeat(["a", "b", "c", "d", "e", "f"], 2),
    ...                         "trt": np.repeat(["x", "y"], 6)})
    >>> counts = rng.poisson(30, size=(50, 12))          # 50 genes x 12 samples
    >>> v = flashmm.voom_with_dream_weights(counts, "~ trt + (1 | donor)", samples)
    >>> v.weights.shape
    (50, 12)
    """
    from .model import MultiGeneMixedLM

    if not np.isfinite(span) or span <= 0:
        raise ValueError(f"span must be finite and > 0, got {span!r}.")
    C, genes, obs = _expression(counts, layer)
    _check_counts(C, allow_non_integer, "voom_with_dream_weights")
    n, G = C.shape
    frame = data if data is not None else obs
    if frame is None:
        raise DesignError("voom_with_dream_weights needs the sample covariates: pass data= "
                          "(one row per sample) or an AnnData.")
    if len(frame) != n:
        raise DesignError(f"data has {len(frame)} rows but the counts have {n} samples.")
    fixed, vc, frame_re = _split_random_terms(formula, frame.reset_index(drop=True))
    Wn = _dream_input_weights(weights, G, n)
    if not vc:
        out = voom(counts, fixed, design_data=frame, lib_size=lib_size, span=span,
                   weights=Wn, layer=layer, allow_non_integer=allow_non_integer)
        if rescale_weights_after and Wn is not None:
            out.weights = out.weights * Wn
        return out
    L = _library_sizes(lib_size, C, frame)
    E = log_cpm(C, L)                                          # samples x genes
    X, names = _design_matrix(fixed, n, None, frame_re)
    model = MultiGeneMixedLM.from_formula(fixed, frame_re, endog=E, vc_formula=vc,
                                          gene_names=genes,
                                          weights=None if Wn is None else Wn.T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                        # status is reported below
        res = model.fit(reml=reml)
    ok = res.status.to_numpy() == "ok"
    if not ok.all():
        warnings.warn(f"{int((~ok).sum())} of {G} genes could not be fitted by the mixed "
                      "model (constant log-CPM) and are dropped, as variancePartition does.",
                      stacklevel=2)
    fitted = res.predict().to_numpy()[:, ok].T                 # X b + Z u, genes x samples
    w, xy, line = mean_variance_weights(E[:, ok].mean(axis=0), np.sqrt(res.scale.to_numpy()[ok]),
                                        fitted, C[:, ok], L, span)
    if rescale_weights_after and Wn is not None:
        w = w * Wn[ok]
    if np.max(w) > 1e8:
        warnings.warn(f"The maximum precision weight is {np.max(w):.3g}, suggesting a poor "
                      "smoothing fit of the mean-variance trend at large expression; consider "
                      "a smaller span.", stacklevel=2)
    return VoomResult(E=E[:, ok].T, weights=w, design=X, design_names=names,
                      genes=[g for g, k in zip(genes, ok, strict=True) if k],
                      samples=_sample_names(counts, n), lib_size=L, targets=frame,
                      voom_xy=xy, voom_line=line)
