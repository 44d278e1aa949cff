"""limma's gene-wise linear models as special cases of flashmm's machinery.

* :func:`lm_fit`: ordinary (or array-weighted) least squares, or GLS with a
  common within-block correlation ``rho`` (limma's ``lmFit(block=,
  correlation=)``).  The block model is flashmm's random-intercept model with
  the variance ratio ``g = rho / (1 - rho)`` fixed and shared by all genes, so
  everything comes from the sufficient statistics ``X'X, X'Y, Z'X, Z'Y, Z'Z,
  yy`` (see :mod:`flashmm._limma_core`).
* :func:`duplicate_correlation`: the consensus ``rho`` from flashmm's per-gene
  REML fits of that random-intercept model.
* :func:`e_bayes`: limma's empirical Bayes moderation of the gene-wise
  variances, for :func:`lm_fit` results and (optionally) for
  :class:`~flashmm.MultiGeneMixedLMResults`.

Field names follow pylimma (``coefficients``, ``stdev_unscaled``, ``sigma``,
``df_residual``, ``cov_coefficients``, ``Amean``, ``design``, then ``t``,
``p_value``, ``lods``, ...), with genes in rows.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats as sps

from ._design import check_full_rank
from ._errors import DataError, DesignError
from ._limma_core import (
    block_correlation_per_gene,
    block_indicator,
    fit_f_dist,
    gls_per_gene,
    gls_shared,
    ones_coefficients,
    tmixture,
)
from ._weighted_stats import check_weights

__all__ = ["LimmaFit", "DuplicateCorrelation", "lm_fit", "duplicate_correlation", "e_bayes"]


# ------------------------------------------------------------------ results
@dataclass(eq=False)
class LimmaFit(Mapping):
    """Gene-wise linear model fit with pylimma's field names (genes in rows).

    Attribute access and dict-style access (``fit["sigma"]``) both work; keys
    are the fields that are set (not None).

    Attributes
    ----------
    coefficients, stdev_unscaled : ndarray (G, p)
        Estimates and their standard errors divided by ``sigma``.
    sigma : ndarray (G,)
        Residual standard deviation (for the block model, on limma's
        correlation scale; see :func:`lm_fit`).
    df_residual : ndarray (G,)
        Residual degrees of freedom.
    cov_coefficients : ndarray (p, p)
        Unscaled covariance of the coefficients (shared by the genes).
    Amean : ndarray (G,)
        Average expression per gene.
    design : ndarray (n, p)
        The design matrix.
    genes, coef_names : list of str
        Gene names and coefficient names.
    block, correlation : optional
        Block labels and the within-block correlation used (GLS only).
    method : str
        ``"ls"``, ``"gls"``, or ``"mixedlm"`` (from :func:`e_bayes` on a
        mixed-model fit).
    t, p_value, lods, s2_prior, df_prior, s2_post, df_total, var_prior, proportion
        Added by :func:`e_bayes`: moderated t, two-sided p, B-statistic,
        prior and posterior variances and degrees of freedom.
    """

    coefficients: np.ndarray
    stdev_unscaled: np.ndarray
    sigma: np.ndarray
    df_residual: np.ndarray
    cov_coefficients: np.ndarray
    Amean: np.ndarray
    design: np.ndarray | None
    genes: list[str]
    coef_names: list[str]
    method: str = "ls"
    block: np.ndarray | None = None
    correlation: float | None = None
    t: np.ndarray | None = None
    p_value: np.ndarray | None = None
    lods: np.ndarray | None = None
    s2_prior: Any = None
    df_prior: Any = None
    s2_post: np.ndarray | None = None
    df_total: np.ndarray | None = None
    var_prior: np.ndarray | None = None
    proportion: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # Mapping interface (pylimma returns dicts)
    def __getitem__(self, key: str) -> Any:
        if key in self._keys():
            return getattr(self, key)
        raise KeyError(key)

    def _keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)
                if f.name != "extra" and getattr(self, f.name) is not None]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the set fields (what is stored in ``adata.uns[key]``)."""
        out = {k: getattr(self, k) for k in self._keys()}
        if out.get("block") is not None:
            out["block"] = np.asarray(out["block"]).astype(str)
        return out

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return self.coefficients.shape[0]

    def table(self, coef: int | str = -1, sort_by: str | None = None) -> pd.DataFrame:
        """Per-gene table of one coefficient (limma's ``topTable`` columns).

        Parameters
        ----------
        coef : int or str
            Coefficient index or name (default: the last one).
        sort_by : {None, "p", "B", "t", "logFC"}
            Sort the rows (``None`` keeps the gene order).

        Returns
        -------
        DataFrame
            ``logFC, AveExpr, t, P.Value, adj.P.Val`` (Benjamini-Hochberg) and,
            after :func:`e_bayes`, ``B``.  Without :func:`e_bayes` ``t`` is the
            ordinary t on ``df_residual`` degrees of freedom.
        """
        j = self.coef_names.index(coef) if isinstance(coef, str) else int(coef)
        est = self.coefficients[:, j]
        if self.t is not None:
            t, p = self.t[:, j], self.p_value[:, j]
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                t = est / (self.stdev_unscaled[:, j] * self.sigma)
            p = 2.0 * sps.t.sf(np.abs(t), self.df_residual)
        df = pd.DataFrame({"logFC": est, "AveExpr": self.Amean, "t": t, "P.Value": p,
                           "adj.P.Val": bh_adjust(p)}, index=pd.Index(self.genes, name="gene"))
        if self.lods is not None:
            df["B"] = self.lods[:, j]
        if sort_by is not None:
            col = {"p": "P.Value", "B": "B", "t": "t", "logFC": "logFC"}[sort_by]
            key = df[col].abs() if col in ("t", "logFC") else df[col]
            df = df.loc[key.sort_values(ascending=col == "P.Value").index]
        return df

    def __repr__(self) -> str:
        eb = ", e_bayes" if self.t is not None else ""
        return (f"LimmaFit(method={self.method!r}, genes={self.n_genes}, "
                f"coefs={self.coef_names}{eb})")


@dataclass(eq=False)
class DuplicateCorrelation(Mapping):
    """Result of :func:`duplicate_correlation` (dict-like, pylimma's keys).

    Attributes
    ----------
    consensus_correlation : float
        ``tanh`` of the trimmed mean of the per-gene ``atanh`` correlations.
    cor : float
        Same as ``consensus_correlation``.
    atanh_correlations : ndarray (G,)
        Per-gene correlations on the Fisher z scale (NaN where not estimable).
    ratios : ndarray (G,)
        Per-gene REML variance ratios ``g = s_block / s`` from flashmm.
    """

    consensus_correlation: float
    cor: float
    atanh_correlations: np.ndarray
    ratios: np.ndarray

    def __getitem__(self, key: str) -> Any:
        if key in ("consensus_correlation", "cor", "atanh_correlations", "ratios"):
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("consensus_correlation", "cor", "atanh_correlations", "ratios"))

    def __len__(self) -> int:
        return 4

    def __float__(self) -> float:
        return float(self.consensus_correlation)


# ------------------------------------------------------------------- inputs
def _is_anndata(obj: Any) -> bool:
    return hasattr(obj, "obs") and hasattr(obj, "var_names") and hasattr(obj, "uns")


def _expression(data: Any, layer: str | None) -> tuple[np.ndarray, list[str], pd.DataFrame | None]:
    """Samples x genes float array, gene names and sample metadata.

    AnnData: ``X`` or ``layers[layer]`` (samples in rows).  ndarray or
    DataFrame: genes x samples (pylimma's orientation; DataFrame index =
    genes, columns = samples).
    """
    if _is_anndata(data):
        mat = data.layers[layer] if layer is not None else data.X
        mat = mat.toarray() if sp.issparse(mat) else np.asarray(mat)
        return np.asarray(mat, dtype=float), [str(g) for g in data.var_names], data.obs
    if layer is not None:
        raise DataError("layer= is only meaningful for AnnData input.")
    if isinstance(data, pd.DataFrame):
        return data.to_numpy(dtype=float).T, [str(g) for g in data.index], None
    if sp.issparse(data):
        data = data.toarray()
    arr = np.asarray(data, dtype=float)
    if arr.ndim != 2:
        raise DataError(f"expression must be 2-dimensional (genes x samples), got shape {arr.shape}.")
    return arr.T, [f"gene{i}" for i in range(arr.shape[0])], None


def _is_elist(obj: Any) -> bool:
    """True for a :class:`~flashmm.VoomResult`-like object (limma's ``EList``)."""
    return all(hasattr(obj, a) for a in ("E", "weights", "design")) and not _is_anndata(obj)


def _unpack_elist(data: Any, design: Any, weights: Any, design_data: pd.DataFrame | None
                  ) -> tuple[Any, Any, Any, pd.DataFrame | None]:
    """``E``, design, weights and covariates of an EList; arguments given take precedence.

    As limma's ``lmFit``: a ``design`` or ``weights`` passed in the call is used
    instead of the one stored in the object.  Other inputs pass through unchanged.
    """
    if not _is_elist(data):
        return data, design, weights, design_data
    E = np.asarray(data.E, dtype=float)
    genes = getattr(data, "genes", None) or [f"gene{i}" for i in range(E.shape[0])]
    samples = getattr(data, "samples", None) or [f"sample{i}" for i in range(E.shape[1])]
    frame = pd.DataFrame(E, index=pd.Index(genes), columns=pd.Index(samples))
    if design is None and data.design is not None:
        names = getattr(data, "design_names", None)
        design = pd.DataFrame(np.asarray(data.design, dtype=float), columns=names) \
            if names is not None else data.design
    if weights is None:
        weights = data.weights
    if design_data is None:
        design_data = getattr(data, "targets", None)
    return frame, design, weights, design_data


def _design_matrix(design: Any, n: int, obs: pd.DataFrame | None,
                   design_data: pd.DataFrame | None) -> tuple[np.ndarray, list[str]]:
    """Design matrix (n x p) and column names from None, a formula or a matrix."""
    if design is None:
        return np.ones((n, 1)), ["Intercept"]
    if isinstance(design, str):
        import patsy

        frame = design_data if design_data is not None else obs
        if frame is None:
            raise DesignError("a formula design needs sample covariates: pass an AnnData "
                              "or design_data= (a DataFrame with one row per sample).")
        dm = patsy.dmatrix(design, frame, NA_action="raise", return_type="dataframe")
        X, names = dm.to_numpy(dtype=float), [str(c) for c in dm.columns]
    elif isinstance(design, pd.DataFrame):
        X, names = design.to_numpy(dtype=float), [str(c) for c in design.columns]
    else:
        info = getattr(design, "design_info", None)
        X = np.asarray(design, dtype=float)
        if X.ndim == 1:
            X = X[:, None]
        names = (list(info.column_names) if info is not None
                 else [f"x{j}" for j in range(X.shape[1])])
    if X.shape[0] != n:
        raise DesignError(f"design has {X.shape[0]} rows but the data have {n} samples.")
    if not np.all(np.isfinite(X)):
        raise DesignError("design contains missing or infinite values.")
    check_full_rank(X, names)
    return X, names


def _weights(weights: Any, n: int, G: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(array weights (n,), gene weights (n, G)); at most one is not None.

    1-d weights of length n_samples are array weights; 2-d weights are
    genes x samples (pylimma's orientation, also for AnnData input).  Zero,
    negative or non-finite weights are an error that counts them.
    """
    if weights is None:
        return None, None
    w = np.asarray(weights, dtype=float)
    check_weights(w)
    if w.ndim == 1 and w.size == n:
        return w, None
    if w.ndim == 2 and w.shape == (1, n):
        return w[0], None
    if w.ndim == 2 and w.shape == (G, n):
        return None, w.T
    raise DataError(f"weights must have length n_samples ({n}) or shape (n_genes, n_samples) "
                    f"= ({G}, {n}); got shape {w.shape}.")


def _block_labels(block: Any, n: int) -> np.ndarray:
    arr = np.asarray(block.to_numpy() if isinstance(block, (pd.Series, pd.Index)) else block)
    if arr.ndim != 1 or arr.size != n:
        raise DesignError(f"block must have one label per sample ({n}), got shape {arr.shape}.")
    if pd.isna(arr).any():
        raise DesignError("block contains missing labels.")
    return arr.astype(str)


def _resolve_block(block: Any, obs: pd.DataFrame | None, design_data: pd.DataFrame | None,
                   n: int) -> np.ndarray | None:
    if block is None:
        return None
    if isinstance(block, str):
        frame = design_data if design_data is not None else obs
        if frame is None or block not in frame:
            raise DesignError(f"block={block!r} is not a column of the sample covariates.")
        block = frame[block]
    return _block_labels(block, n)


# ------------------------------------------------------------------- lm_fit
def lm_fit(
    data: Any,
    design: Any = None,
    block: Any = None,
    correlation: float | None = None,
    weights: Any = None,
    layer: str | None = None,
    key: str = "flashmm_limma",
    *,
    design_data: pd.DataFrame | None = None,
) -> LimmaFit:
    """Fit a linear model to every gene (limma's ``lmFit``), from sufficient statistics.

    Parameters
    ----------
    data : AnnData, ndarray, DataFrame or VoomResult
        AnnData: samples (or cells) in rows, ``X`` or ``layers[layer]``; the
        results are also stored in ``adata.uns[key]`` as a plain dict.
        ndarray or DataFrame: **genes x samples** (pylimma's orientation).
        Values should already be normalised and log-transformed.  Missing
        values (NaN) are allowed; genes with them take the per-gene path.
        :class:`~flashmm.VoomResult` (limma's ``EList``, from
        :func:`~flashmm.voom`): its ``E``, and its ``weights``, ``design`` and
        sample covariates unless ``weights``, ``design`` or ``design_data`` are
        given.
    design : None, str, ndarray or DataFrame
        Design matrix (n_samples x p) or a patsy formula such as
        ``"~ group + batch"`` evaluated on ``adata.obs`` or ``design_data``.
        ``None``: intercept only.  Must have full column rank.
    block : array_like or str, optional
        Block labels (one per sample), or the name of a column of the sample
        covariates.  Samples in a block are equicorrelated (GLS).
    correlation : float, optional
        Within-block correlation, e.g. from :func:`duplicate_correlation`.
        With ``block`` and ``correlation=None`` it is estimated with
        :func:`duplicate_correlation` (limma's ``gls.series`` default; positive
        weights, no missing values).
    weights : array_like, optional
        Length n_samples: array weights (one per sample), folded into the shared
        statistics.  Shape (n_genes, n_samples): gene-specific weights; these
        break the shared statistics and use a chunked per-gene path
        (O(n p^2) per gene instead of O(n p), noticeably slower).  Weights
        must be positive and finite: zero, negative or NaN weights raise a
        :class:`~flashmm.DataError` that counts them (limma instead drops
        those observations; here set the expression to NaN to leave an
        observation out).
    layer : str, optional
        AnnData layer to use instead of ``X``.
    key : str
        Key of ``adata.uns`` for AnnData input.
    design_data : DataFrame, optional
        Sample covariates for a formula ``design`` or a ``block`` column name
        when ``data`` is not an AnnData.

    Returns
    -------
    LimmaFit
        ``coefficients``, ``stdev_unscaled``, ``sigma``, ``df_residual``,
        ``cov_coefficients``, ``Amean``, ``design`` (pylimma's definitions).

    Notes
    -----
    With ``block``, limma's ``gls.series`` whitens with the *correlation*
    matrix ``C = (1 - rho) I + rho Z Z'`` (times array weights).  flashmm
    computes the GLS with ``H = I + g Z Z'``, ``g = rho / (1 - rho)`` (MATH.md)
    and rescales: ``stdev_unscaled = sqrt((1 - rho) diag((X'H^-1 X)^-1))`` and
    ``sigma^2 = RSS_H / ((1 - rho)(n - p))``, which are limma's numbers.
    ``df_residual = n - p`` (number of observed samples minus p per gene on
    the per-gene path).  On the per-gene path ``cov_coefficients`` is computed
    from the unweighted design, as limma does.

    Examples
    --------
    >>> import numpy as np
    >>> from flashmm.limma import lm_fit
    >>> rng = np.random.default_rng(0)
    >>> Y = rng.normal(size=(50, 8))          # 50 genes x 8 samples
    >>> X = np.column_stack([np.ones(8), np.repeat([0, 1], 4)])
    >>> fit = lm_fit(Y, X)
    >>> fit.coefficients.shape
    (50, 2)
    """
    data, design, weights, design_data = _unpack_elist(data, design, weights, design_data)
    Y, genes, obs = _expression(data, layer)
    n, G = Y.shape
    X, names = _design_matrix(design, n, obs, design_data)
    blk = _resolve_block(block, obs, design_data, n)
    w_arr, W = _weights(weights, n, G)
    Z = None
    rho = None
    if blk is not None:
        if correlation is None:
            correlation = duplicate_correlation(data, X, blk, weights=weights, layer=layer).cor
        rho = float(correlation)
        if not np.isfinite(rho) or abs(rho) >= 1:
            raise ValueError(f"correlation must lie in (-1, 1), got {correlation!r}.")
        Z, _ = block_indicator(blk)
        if 1.0 + rho / (1.0 - rho) * Z.sum(axis=0).max() <= 0:
            raise ValueError(f"correlation {rho} is too negative for blocks of size "
                             f"{int(Z.sum(axis=0).max())} (not positive definite).")
    per_gene = W is not None or not np.all(np.isfinite(Y))
    if w_arr is not None and not np.all(np.isfinite(w_arr) & (w_arr > 1e-15)):
        per_gene = True                      # samples dropped: limma's per-gene path
    if per_gene:
        W = W if W is not None else np.broadcast_to(
            (np.ones(n) if w_arr is None else w_arr)[:, None], (n, G))
        core = gls_per_gene(Y, X, Z, rho or 0.0, W)
    else:
        core = gls_shared(Y, X, Z, rho or 0.0, w_arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        amean = np.nanmean(Y, axis=0)
    fit = LimmaFit(
        coefficients=core.coefficients, stdev_unscaled=core.stdev_unscaled, sigma=core.sigma,
        df_residual=core.df_residual, cov_coefficients=core.cov_coefficients, Amean=amean,
        design=X, genes=genes, coef_names=names, method="gls" if Z is not None else "ls",
        block=blk, correlation=rho,
    )
    if _is_anndata(data):
        data.uns[key] = fit.to_dict()
    return fit


# ------------------------------------------------------- duplicate correlation
def duplicate_correlation(
    data: Any,
    design: Any = None,
    block: Any = None,
    *,
    trim: float = 0.15,
    weights: Any = None,
    layer: str | None = None,
    design_data: pd.DataFrame | None = None,
    allow_negative: bool = True,
    method: str | None = None,
) -> DuplicateCorrelation:
    """Consensus within-block correlation across genes (limma's ``duplicateCorrelation``).

    Each gene's random-intercept model ``y = X b + Z u + e`` is fitted by REML
    with :class:`~flashmm.MultiGeneMixedLM` from the sufficient statistics (all
    genes at once); the per-gene correlation is ``g / (1 + g)`` with ``g`` the
    variance ratio.  As in limma the correlations are clipped to
    ``[1 / (1 - max block size) + 0.01, 0.99]``, averaged on the ``atanh`` scale
    with a trimmed mean (``trim`` in each tail) and transformed back with ``tanh``.

    Parameters
    ----------
    data, design, layer, design_data
        As in :func:`lm_fit`.
    block : array_like or str
        Block labels, one per sample (or a covariate column name).
    trim : float
        Trimming proportion of the mean (limma: 0.15).
    weights : array_like, optional
        Array weights (length n_samples) or gene-specific weights (n_genes x
        n_samples, e.g. from :func:`~flashmm.voom`; a
        :class:`~flashmm.VoomResult` brings its own), applied to ``X`` and
        ``y`` but not to ``Z`` (as statmod's ``mixedModel2Fit``).  Weights must
        be positive and finite (else a :class:`~flashmm.DataError` counting
        them); missing values are not supported.
    allow_negative : bool
        ``True`` (default, as limma): unconstrained REML (FLASHMM's Fisher
        scoring, ``fit(allow_negative_variance=True)``), so a gene can have a
        negative correlation.  ``False``: the constrained REML of
        ``MultiGeneMixedLM.fit()`` (block variance >= 0, per-gene correlation
        >= 0), which biases the consensus upwards when the true correlation
        is small.

    method : {None, "statmod", "reml"}
        How the per-gene variance components are estimated.  ``"statmod"``:
        limma's own computation, statmod's ``mixedModel2Fit`` (a gamma GLM
        on the rotated residuals) stopped after 20 iterations, reproduced step
        by step (per-gene rotations, O(n^3) per gene); ``"reml"``: the REML
        maximum (flashmm's fit from shared statistics, or with gene-specific
        weights a per-gene maximisation).  ``None`` (default): ``"statmod"``
        with gene-specific weights (the voom workflow, where limma's stopping
        point matters at 1e-6), ``"reml"`` otherwise.

    Returns
    -------
    DuplicateCorrelation
        ``consensus_correlation`` (also ``cor``), ``atanh_correlations``,
        ``ratios``.

    Notes
    -----
    limma (and pylimma) estimate the per-gene variance components with
    statmod's ``mixedModel2Fit``: REML solved as a gamma GLM with identity link
    on the squared rotated residuals, unconstrained, with at most 20
    iterations.  flashmm maximises the same REML likelihood, so the consensus
    agrees up to the optimisers' convergence.  Genes with ``n <= p + 2``
    observations, or with as many blocks as observations minus one, give NaN,
    as in limma.

    Gene-specific weights break the shared statistics: every gene then gets
    its own residual-space rotation (batched QR and eigendecomposition over
    chunks of genes, O(n^3) per gene; ``allow_negative`` does not apply;
    ``ratios`` are ``rho / (1 - rho)``).  statmod stops its gamma GLM after 20
    iterations, and its variance floor moves its stopping point, so the REML
    maximum (``method="reml"``) differs from limma's per-gene correlations by a
    few 1e-3 on the atanh scale (with the higher REML likelihood) and the
    consensus by about 2e-6; ``method="statmod"`` (the default here) gives
    limma's per-gene values to about 1e-9 and the consensus to 1e-10 on the
    voom reference (``tests/reference/voom``).
    """
    from ._design import RandomComponent
    from .model import MultiGeneMixedLM
    from .stats import SufficientStats

    data, design, weights, design_data = _unpack_elist(data, design, weights, design_data)
    Y, genes, obs = _expression(data, layer)
    n, G = Y.shape
    X, names = _design_matrix(design, n, obs, design_data)
    blk = _resolve_block(block, obs, design_data, n)
    if blk is None:
        raise DesignError("duplicate_correlation needs block= (one label per sample).")
    if not np.all(np.isfinite(Y)):
        raise DataError("duplicate_correlation does not support missing values; "
                        "drop the genes with NaN first.")
    w_arr, W = _weights(weights, n, G)
    Z, levels = block_indicator(blk)
    sizes = Z.sum(axis=0)
    nan = np.full(G, np.nan)

    def _zero(msg: str) -> DuplicateCorrelation:
        warnings.warn(msg, stacklevel=3)
        return DuplicateCorrelation(0.0, 0.0, np.zeros(G), nan)

    # block already in the design: residual-space projection of Z is zero
    resid = Z[:, 1:] - X @ np.linalg.lstsq(X, Z[:, 1:], rcond=None)[0]
    if Z.shape[1] > 1 and np.max(np.abs(resid)) < 1e-8:
        return _zero("Block factor already encoded in the design matrix: "
                     "setting intrablock correlation to zero.")
    if sizes.max() == 1:
        return _zero("Blocks all of size 1: setting correlation to zero.")
    p = X.shape[1]
    if n <= p + 2 or Z.shape[1] >= n - 1:
        return DuplicateCorrelation(0.0, 0.0, nan.copy(), nan)
    method = ("statmod" if W is not None else "reml") if method is None else method
    if method not in ("statmod", "reml"):
        raise ValueError(f"method must be None, 'statmod' or 'reml', got {method!r}.")
    if W is not None or method == "statmod":
        if W is None:
            W = np.broadcast_to((np.ones(n) if w_arr is None else w_arr)[:, None], (n, G))
        return _dupcor_gene_weights(Y, X, Z, W, int(sizes.max()), trim, method)
    sw = np.ones(n) if w_arr is None else np.sqrt(w_arr)
    c = ones_coefficients(X)
    shift = Y.mean(axis=0) if c is not None else np.zeros(G)
    Xw, Yw = X * sw[:, None], (Y - shift) * sw[:, None]
    stats = SufficientStats(
        XX=Xw.T @ Xw, ZX=Z.T @ Xw, ZZ=np.diag(sizes), n=n, XY=Xw.T @ Yw, ZY=Z.T @ Yw,
        yy=np.einsum("ng,ng->g", Yw, Yw), exog_names=names,
        components=(RandomComponent("block", tuple(levels)),), gene_names=genes,
        info={"source": "flashmm.limma.duplicate_correlation"},
    )
    res = MultiGeneMixedLM.from_sufficient_stats(stats).fit(allow_negative_variance=allow_negative)
    g = res.ratios.to_numpy()[:, 0].copy()
    g[res.status.to_numpy() != "ok"] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(g > -1.0, g / (1.0 + g), np.nan)
    rho = np.clip(rho, 1.0 / (1.0 - sizes.max()) + 0.01, 0.99)
    arho = np.arctanh(rho)
    ok = np.isfinite(arho)
    cons = float(np.tanh(sps.trim_mean(arho[ok], trim))) if ok.any() else 0.0
    return DuplicateCorrelation(cons, cons, arho, g)


def _dupcor_gene_weights(Y: np.ndarray, X: np.ndarray, Z: np.ndarray, W: np.ndarray,
                         max_size: int, trim: float, method: str) -> DuplicateCorrelation:
    """duplicate_correlation with per-gene rotations (W: n x G), statmod's or REML."""
    rho = block_correlation_per_gene(Y, X, Z, W, 1.0 / (1.0 - max_size) + 0.01, 0.99, method)
    arho = np.arctanh(rho)
    ok = np.isfinite(arho)
    cons = float(np.tanh(sps.trim_mean(arho[ok], trim))) if ok.any() else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = rho / (1.0 - rho)
    return DuplicateCorrelation(cons, cons, arho, ratios)


# ------------------------------------------------------------------ e_bayes
def e_bayes(
    fit: Any,
    proportion: float = 0.01,
    trend: bool | np.ndarray = False,
    robust: bool = False,
    stdev_coef_lim: tuple[float, float] = (0.1, 4.0),
    key: str = "flashmm_limma",
) -> LimmaFit:
    """Empirical Bayes moderation of the gene-wise variances (limma's ``eBayes``).

    The residual variances ``sigma^2`` (on ``df_residual`` df) are modelled as
    ``s0^2 F(df, d0)``; ``s0^2`` and ``d0`` are fitted by the method of
    moments on the log scale (limma's ``fitFDist``, trigamma inversion), the
    posterior variances are ``(df sigma^2 + d0 s0^2) / (df + d0)`` and the
    moderated t is ``coef / (stdev_unscaled sqrt(s2_post))`` on
    ``min(df + d0, sum(df))`` degrees of freedom.  The B-statistic (log-odds of
    differential expression) uses the prior variance of the non-zero
    coefficients from limma's ``tmixture``, bounded by ``stdev_coef_lim``.

    Parameters
    ----------
    fit : LimmaFit, dict, AnnData or MultiGeneMixedLMResults
        :func:`lm_fit` output (or a pylimma fit dict, or an AnnData holding
        one in ``uns[key]``, updated in place).  A
        :class:`~flashmm.MultiGeneMixedLMResults` is moderated with its
        residual variance ``scale`` on ``n - p`` degrees of freedom and
        ``stdev_unscaled = sqrt(diag(cov_params) / scale)``, i.e. the variance
        ratios are held at their REML estimates and only the residual variance
        is shrunk.  That is appropriate for effects tested against the residual
        (within-group) variance; for effects that vary only between groups the
        residual df (cells) overstate the information, so prefer the mixed
        model's own Satterthwaite tests there.
    proportion : float
        Assumed proportion of differentially expressed genes (B-statistic).
    trend : bool or ndarray
        ``True``: the prior variance is a natural-spline trend in ``Amean``
        (limma's ``eBayes(trend=TRUE)`` with ``fitFDist(covariate=)``); an array
        gives the covariate directly.
    robust : bool
        Robust hyperparameter estimation (``fitFDistRobustly``) is not
        implemented; ``True`` raises NotImplementedError (use pylimma).
    stdev_coef_lim : (float, float)
        Limits of the prior standard deviation of the coefficients.
    key : str
        ``adata.uns`` key for AnnData input.

    Returns
    -------
    LimmaFit
        A copy of the fit with ``t``, ``p_value``, ``lods``, ``s2_prior``,
        ``df_prior``, ``s2_post``, ``df_total``, ``var_prior`` and
        ``proportion`` added.

    Notes
    -----
    The hyperparameters always use limma's classic ``fitFDist``.  With unequal
    residual df (per-gene path with missing values or zero weights) recent
    limma / pylimma switch to ``fitFDistUnequalDF1`` and the results then differ
    slightly; with equal df (the common case) they agree.  The moderated F
    statistic is not computed.
    """
    if robust:
        raise NotImplementedError("robust=True (fitFDistRobustly) is not implemented; "
                                  "use pylimma.e_bayes(..., robust=True).")
    adata = fit if _is_anndata(fit) else None
    lf = _as_limma_fit(fit.uns[key] if adata is not None else fit)
    sigma2 = lf.sigma**2
    df = np.asarray(lf.df_residual, dtype=float)
    if np.nanmax(df) <= 0:
        raise ValueError("no residual degrees of freedom.")
    covariate = None
    if isinstance(trend, bool):
        if trend:
            covariate = lf.Amean
            if covariate is None or not np.all(np.isfinite(covariate)):
                raise ValueError("trend=True needs a finite Amean in the fit.")
    else:
        covariate = np.asarray(trend, dtype=float)
        if covariate.shape != sigma2.shape:
            raise ValueError("a numeric trend must have one value per gene.")
    var = np.where(df == 0, 0.0, sigma2)
    if var.size < 3:
        s2_prior, df_prior, s2_post = var.copy(), 0.0, var.copy()
    else:
        s2_prior, df_prior = fit_f_dist(var, df, covariate)
        if np.isnan(df_prior):
            raise ValueError("could not estimate the prior degrees of freedom.")
        s2_post = s2_prior * np.ones_like(var) if np.isinf(df_prior) else \
            (df * var + df_prior * s2_prior) / (df + df_prior)
    t = lf.coefficients / lf.stdev_unscaled / np.sqrt(s2_post)[:, None]
    df_total = np.minimum(df + df_prior, np.nansum(df))
    p = 2.0 * sps.t.sf(np.abs(t), df_total[:, None])
    med = float(np.median(s2_prior))
    v0 = tmixture(t, lf.stdev_unscaled, df_total, proportion,
                  (stdev_coef_lim[0] ** 2 / med, stdev_coef_lim[1] ** 2 / med))
    if np.any(np.isnan(v0)):
        v0 = np.where(np.isnan(v0), 1.0 / np.resize(np.atleast_1d(s2_prior), v0.size), v0)
        warnings.warn("Estimation of var_prior failed - set to default value", stacklevel=2)
    r = (lf.stdev_unscaled**2 + v0) / lf.stdev_unscaled**2
    t2 = t * t
    dft = df_total[:, None]
    if np.isfinite(df_prior) and df_prior <= 1e6:
        kernel = (1.0 + dft) / 2.0 * np.log((t2 + dft) / (t2 / r + dft))
    else:
        kernel = t2 * (1.0 - 1.0 / r) / 2.0
    lods = np.log(proportion / (1.0 - proportion)) - np.log(r) / 2.0 + kernel
    out = dataclasses.replace(
        lf, t=t, p_value=p, lods=lods, s2_prior=s2_prior, df_prior=df_prior, s2_post=s2_post,
        df_total=df_total, var_prior=v0, proportion=proportion,
    )
    if adata is not None:
        adata.uns[key] = out.to_dict()
    return out


def _as_limma_fit(fit: Any) -> LimmaFit:
    """LimmaFit from a LimmaFit, a pylimma-style mapping or mixed-model results."""
    from .results import MultiGeneMixedLMResults

    if isinstance(fit, LimmaFit):
        return fit
    if isinstance(fit, MultiGeneMixedLMResults):
        return _from_mixedlm(fit)
    if isinstance(fit, Mapping):
        coef = np.asarray(fit["coefficients"], dtype=float)
        G, p = coef.shape
        genes = fit.get("genes")
        names = fit.get("coef_names")
        return LimmaFit(
            coefficients=coef, stdev_unscaled=np.asarray(fit["stdev_unscaled"], dtype=float),
            sigma=np.asarray(fit["sigma"], dtype=float),
            df_residual=np.broadcast_to(np.asarray(fit["df_residual"], dtype=float), (G,)).copy(),
            cov_coefficients=np.asarray(fit.get("cov_coefficients", np.full((p, p), np.nan))),
            Amean=np.asarray(fit.get("Amean", np.full(G, np.nan)), dtype=float),
            design=fit.get("design"),
            genes=[str(g) for g in genes] if genes is not None else [f"gene{i}" for i in range(G)],
            coef_names=[str(c) for c in names] if names is not None else [f"x{j}" for j in range(p)],
            method=str(fit.get("method", "ls")),
        )
    raise TypeError(f"cannot moderate a {type(fit).__name__}; expected a LimmaFit, a dict "
                    "with pylimma's fields or MultiGeneMixedLMResults.")


def _from_mixedlm(res: Any) -> LimmaFit:
    """View mixed-model results as a gene-wise fit: residual variance on n - p df."""
    stats = res.stats
    scale = res.scale.to_numpy()
    cov = res.cov_params()
    with np.errstate(invalid="ignore", divide="ignore"):
        su = np.sqrt(np.diagonal(cov, axis1=1, axis2=2) / scale[:, None])
    amean = _mixedlm_amean(res)
    XX_inv = np.linalg.inv(stats.XX)
    return LimmaFit(
        coefficients=res.fe_params.to_numpy(), stdev_unscaled=su, sigma=np.sqrt(scale),
        df_residual=np.full(stats.n_genes, float(stats.n - stats.k_fe)),
        cov_coefficients=XX_inv, Amean=amean, design=None, genes=list(stats.gene_names),
        coef_names=list(stats.exog_names), method="mixedlm",
    )


def _mixedlm_amean(res: Any) -> np.ndarray:
    """Mean expression per gene from the statistics: ``1'y / n`` with ``1 = X c``.

    ``c`` comes from the cells' design when the model keeps it, else from an
    intercept column named ``"Intercept"`` or ``"const"``; NaN if neither.
    """
    stats = res.stats
    design = getattr(res.model, "design", None)
    if design is not None:
        c = ones_coefficients(np.asarray(design.exog))
        if c is not None:
            return (c @ stats.XY) / stats.n
    for name in ("Intercept", "const"):
        if name in stats.exog_names:
            return stats.XY[stats.exog_names.index(name)] / stats.n
    return np.full(stats.n_genes, np.nan)


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN kept)."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q)[::-1]
    ranked = q[order] * m / np.arange(m, 0, -1)
    adj = np.minimum.accumulate(ranked)
    res = np.empty(m)
    res[order] = np.minimum(adj, 1.0)
    out[ok] = res
    return out
