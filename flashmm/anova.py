"""lmerTest-style ANOVA tables of the fixed effects, for every gene at once.

:func:`anova_table` (``results.anova()``) gives one F-test per model term and
gene.  The hypothesis of each term is a contrast matrix built from the term
structure of the formula (:mod:`flashmm._terms`) as lmerTest builds it:

* type 1 (sequential): rows of the normalised Doolittle factor of ``X'X``;
* type 2: a term contained in no other term is tested marginally (its own
  coefficients); one contained in others is tested after every term not
  containing it and before the terms that do (Doolittle rows of ``X'X`` with
  the columns reordered);
* type 3: the treatment-coded full-rank design is mapped to the
  over-parameterised one of full indicators, the columns of each term are
  orthogonalised against those of the terms that contain it, higher-order terms
  first, and the result is mapped to the coding used.

The F statistic and its denominator df follow lmerTest's ``contestMD``: ``L V
L'`` is eigen-decomposed, ``F = sum_m t_m^2 / q`` over the q positive
eigenvalues, each rotated contrast gets its Satterthwaite df ``nu_m`` and
``df = 2E / (E - q)`` with ``E = sum nu_m / (nu_m - 2)`` (the mean of the
``nu_m`` when they are all equal, 2 when one is at most 2).

The type 2 and 3 contrasts do not depend on the gene, so each is built once; the
tests are arrays over genes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from ._df_method import KENWARD_ROGER
from ._terms import TermStructure, structure_of
from .contrasts import bh_adjust

__all__ = ["anova_table", "anova_contrasts", "contest_md"]

_TYPES = {1: 1, 2: 2, 3: 3, "1": 1, "2": 2, "3": 3, "I": 1, "II": 2, "III": 3}
#: lmerTest's relative tolerance on the eigenvalues of ``L V L'`` (``sqrt(.Machine$double.eps)``).
_EIGEN_TOL = float(np.sqrt(np.finfo(float).eps))
#: lmerTest's ``get_Fstat_ddf`` tolerance: equal nu's give their mean.
_NU_EQUAL_TOL = 1e-8
#: ``doolittle``'s threshold below which factor entries are set to zero.
_DOOLITTLE_EPS = 1e-6

COLUMNS = ["sum_sq", "mean_sq", "num_df", "den_df", "F", "pvalue", "padj"]




def _check_type(type: Any) -> int:
    try:
        return _TYPES[type]
    except (KeyError, TypeError):
        raise ValueError(f"type must be 1, 2 or 3 (or 'I', 'II', 'III'), got {type!r}.") from None


# ------------------------------------------------------------------ contrasts
def zapsmall(x: np.ndarray, digits: int = 7) -> np.ndarray:
    """R's ``zapsmall``: round to ``digits`` significant digits of the largest entry."""
    mx = np.max(np.abs(x)) if x.size else 0.0
    if not np.isfinite(mx) or mx == 0:
        return x
    return np.round(x, max(0, digits - int(np.ceil(np.log10(mx)))))


def doolittle_rows(XX: np.ndarray) -> np.ndarray:
    """``t(doolittle(X'X)$L)``: the unit upper-triangular factor ``D^-1 U`` of ``X'X = L D L'``.

    Computed from the Cholesky factor ``R`` (``L' = R / diag(R)``), entries
    below 1e-6 in absolute value set to zero as lmerTest's ``doolittle`` does.
    """
    if XX.shape[0] == 1:
        return np.ones((1, 1))
    R = np.linalg.cholesky(XX).T
    U = R / np.diag(R)[:, None]
    U[np.abs(U) < _DOOLITTLE_EPS] = 0.0
    return U


def _term_columns(st: TermStructure) -> dict[str, list[int]]:
    return {t.name: list(t.columns) for t in st.model_terms}


def type1_contrasts(st: TermStructure, XX: np.ndarray) -> dict[str, np.ndarray]:
    """Sequential (type 1) contrasts: Doolittle rows of ``X'X`` for each term's columns."""
    p = XX.shape[0]
    if p == 1 and st.has_intercept:                    # intercept-only model: no term
        return {}
    U = doolittle_rows(XX)
    return {name: U[cols] for name, cols in _term_columns(st).items()}


def type2_contrasts(st: TermStructure, XX: np.ndarray) -> dict[str, np.ndarray]:
    """Type 2 contrasts (lmerTest's ``get_contrasts_type2_unfolded``)."""
    p = XX.shape[0]
    if p <= 1 or len(st.model_terms) <= 1:
        return type1_contrasts(st, XX)
    cols = _term_columns(st)
    out: dict[str, np.ndarray] = {}
    for term in st.model_terms:
        containing = st.containing(term)
        own = cols[term.name]
        if not containing:                             # marginal: its own coefficients
            out[term.name] = np.eye(p)[own]
            continue
        related = own + [c for t in containing for c in cols[t.name]]
        order = [c for c in range(p) if c not in related] + related
        U = doolittle_rows(XX[np.ix_(order, order)])
        rows = U[[order.index(c) for c in own]]
        out[term.name] = rows[:, np.argsort(order)]
    return out


def type3_contrasts(st: TermStructure, XX: np.ndarray) -> dict[str, np.ndarray]:
    """Type 3 contrasts (lmerTest's ``get_contrasts_type3``), built on the design's grid.

    The relations between the design in its own coding, in treatment coding and
    the full-indicator design hold for every value of the factors, so they are
    computed on a grid of factor values (:meth:`TermStructure.spanning_grid`)
    rather than on the cells; they equal lmerTest's whenever every level
    combination of every term occurs in the data.
    """
    p = XX.shape[0]
    if p <= 1 or len(st.model_terms) <= 1:
        return type1_contrasts(st, XX)
    grid = st.spanning_grid()
    XT = st.model_rows(grid, treatment=True)
    Xo = st.model_rows(grid)
    rdX = _full_dummy_design(st, grid)
    B = np.linalg.lstsq(XT, rdX, rcond=None)[0]             # rdX = XT B
    L = zapsmall(B.T)                                       # rows: rdX columns; cols: XT columns
    cols = _term_columns(st)
    for term in sorted(st.model_terms, key=lambda t: -len(t.factors)):   # stable: R's order()
        containing = st.containing(term)
        if containing:
            other = [c for t in containing for c in cols[t.name]]
            L[:, cols[term.name]] = zapsmall(_residuals(L[:, other], L[:, cols[term.name]]))
    # lmerTest keeps the rows of L named as the columns of XT (each treatment-coded column is
    # a full-indicator column); in general XT = rdX S, and S' L does not depend on which S.
    S = zapsmall(np.linalg.lstsq(rdX, XT, rcond=None)[0])
    L = S.T @ L
    mapping = zapsmall(np.linalg.lstsq(XT, Xo, rcond=None)[0])    # XT -> the coding used
    out = {}
    for name, c in cols.items():
        Lt = L[:, c].T @ mapping
        out[name] = Lt[np.sum(np.abs(Lt), axis=1) > 1e-8]
    return out


def _full_dummy_design(st: TermStructure, grid: dict[str, np.ndarray]) -> np.ndarray:
    """lmerTest's ``get_rdX`` on the grid: intercept, then every term's full indicators."""
    m = len(next(iter(grid.values())))
    blocks = [np.ones((m, 1))] if st.has_intercept else []
    blocks += [st.full_dummy_rows(term, grid) for term in st.model_terms]
    return np.hstack(blocks)


def _residuals(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``resid(lm.fit(x, y))``: ``y`` minus its projection on the columns of ``x``."""
    return y - x @ np.linalg.lstsq(x, y, rcond=None)[0]


def anova_contrasts(st: TermStructure, XX: np.ndarray, type: Any = 3) -> dict[str, np.ndarray]:
    """Hypothesis matrix of every model term for an ANOVA of ``type`` (lmerTest's ``L``).

    Parameters
    ----------
    st : TermStructure
        The term structure of the design (``flashmm._terms``).
    XX : ndarray, shape (p, p)
        ``X'X`` of the fixed design (types 1 and 2 depend on it).
    type : {1, 2, 3, "I", "II", "III"}
        The type of the table.

    Returns
    -------
    dict
        Term name -> contrast rows (r x p) over the fixed-effect coefficients;
        terms in the design's order, no intercept.
    """
    kind = _check_type(type)
    build = {1: type1_contrasts, 2: type2_contrasts, 3: type3_contrasts}[kind]
    return build(st, XX)


# ---------------------------------------------------------------------- tests
def contest_md(res: Any, L: np.ndarray, df_method: str = "satterthwaite",
               cov: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """lmerTest's ``contestMD`` for the contrast rows ``L``, every gene at once.

    Parameters
    ----------
    res : MultiGeneMixedLMResults
        A fit (uses ``fe_params``, ``cov_params()``, ``scale`` and
        ``contrast_df_rows``).
    L : ndarray, shape (r, p)
        Hypothesis ``L b = 0``, the same for every gene.
    df_method : {"satterthwaite", "kenward-roger", "residual", "normal"}
        Denominator df of the F statistic.  Kenward-Roger follows lmerTest:
        pbkrtest's ``KRmodcomp`` F (scaled, on the adjusted covariance), its
        df, and sums of squares from the unscaled F.
    cov : ndarray, shape (genes, p, p), optional
        ``res.contrast_cov(df_method)``, if already computed.

    Returns
    -------
    dict
        Arrays over genes: ``sum_sq, mean_sq, num_df, den_df, F, pvalue``
        (NaN for genes that were not fitted).
    """
    b = res.fe_params.to_numpy()
    cov = res.contrast_cov(df_method) if cov is None else cov
    sigma2 = res.scale.to_numpy()
    G, r = b.shape[0], L.shape[0]
    out = {k: np.full(G, np.nan) for k in COLUMNS[:-1]}
    if r == 0:
        return out
    if df_method == KENWARD_ROGER:
        return _contest_kr(res, L, b, cov, sigma2, out)
    V = np.einsum("rp,gpk,sk->grs", L, cov, L)
    ok = np.flatnonzero(np.all(np.isfinite(V), axis=(1, 2)) & np.all(np.isfinite(b), axis=1))
    if ok.size == 0:
        return out
    d, P = np.linalg.eigh(V[ok])
    d, P = d[:, ::-1], P[:, :, ::-1]                              # decreasing, as R's eigen
    pos = d > np.maximum(_EIGEN_TOL * d[:, :1], 0.0)
    q = pos.sum(axis=1)
    rows = np.einsum("gsm,sp->gmp", P, L)                         # rotated contrasts P'L
    est = np.einsum("gmp,gp->gm", rows, b[ok])
    with np.errstate(divide="ignore", invalid="ignore"):
        F = np.sum(np.where(pos, est * est / np.where(pos, d, 1.0), 0.0), axis=1) / q
        F[q == 0] = np.nan
    den = _den_df(res, rows, pos, ok, df_method)
    out["F"][ok], out["num_df"][ok], out["den_df"][ok] = F, q, den
    out["mean_sq"][ok] = F * sigma2[ok]
    out["sum_sq"][ok] = F * sigma2[ok] * q
    out["pvalue"][ok] = _f_pvalue(F, q, den)
    return out


def _contest_kr(res: Any, L: np.ndarray, b: np.ndarray, cov_adj: np.ndarray, sigma2: np.ndarray,
                out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """lmerTest's Kenward-Roger ``contestMD``: pbkrtest's ``KRmodcomp`` on a basis of ``L``'s rows.

    The test of ``L b = 0`` depends on the row space of ``L`` only, so an
    orthonormal basis of it (rank ``q``) stands in for ``L``.
    """
    _, sv, Vt = np.linalg.svd(L, full_matrices=False)
    q = int(np.sum(sv > _EIGEN_TOL * sv[0])) if sv.size and sv[0] > 0 else 0
    if q == 0:
        return out
    B = Vt[:q]
    ok = np.flatnonzero(np.all(np.isfinite(cov_adj), axis=(1, 2)) & np.all(np.isfinite(b), axis=1))
    if ok.size == 0:
        return out
    est = b[ok] @ B.T
    V = np.einsum("rp,gpk,sk->grs", B, cov_adj[ok], B)
    F_u = np.einsum("gr,gr->g", est, np.linalg.solve(V, est[:, :, None])[:, :, 0]) / q
    den, scaling = res.kr_ftest(B)
    F = scaling[ok] * F_u
    out["F"][ok], out["num_df"][ok], out["den_df"][ok] = F, q, den[ok]
    out["mean_sq"][ok] = F_u * sigma2[ok]
    out["sum_sq"][ok] = F_u * sigma2[ok] * q
    out["pvalue"][ok] = _f_pvalue(F, np.full(ok.size, q), den[ok])
    return out


def _den_df(res: Any, rows: np.ndarray, pos: np.ndarray, ok: np.ndarray,
            df_method: str) -> np.ndarray:
    if df_method == "normal":
        return np.full(ok.size, np.inf)
    if df_method == "residual":
        return np.full(ok.size, float(res.nobs - res.k_fe))
    G = res.n_genes
    full = np.zeros((G,) + rows.shape[1:])
    full[ok] = rows
    nu = res.contrast_df_rows(full)[ok]
    return combine_satterthwaite_df(nu, pos)


def combine_satterthwaite_df(nu: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """lmerTest's ``get_Fstat_ddf`` per gene, over the rotated contrasts marked in ``pos``.

    ``nu`` (genes, r) in decreasing order of the eigenvalues, ``pos`` a prefix
    mask of the positive ones: one contrast gives its df; equal df (consecutive
    differences below 1e-8) their mean; any df at most 2 gives 2; otherwise
    ``2E / (E - q)`` with ``E = sum nu / (nu - 2)``.
    """
    q = pos.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        steps = np.abs(np.diff(nu, axis=1))
        equal = np.all(np.where(pos[:, 1:], steps < _NU_EQUAL_TOL, True), axis=1)
        mean = np.sum(np.where(pos, nu, 0.0), axis=1) / q
        small = np.any(pos & (nu <= 2), axis=1)
        E = np.sum(np.where(pos, nu / (nu - 2), 0.0), axis=1)
        general = 2 * E / (E - q)
    out = np.where(small, 2.0, general)
    out = np.where(equal, mean, out)
    out = np.where(q == 1, nu[:, 0], out)
    out[np.any(pos & ~np.isfinite(nu), axis=1) | (q == 0)] = np.nan
    return out


def _f_pvalue(F: np.ndarray, q: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        normal = np.isinf(den)
        chi = sps.chi2.sf(F * q, np.maximum(q, 1))
        fdist = sps.f.sf(F, np.maximum(q, 1), np.where(normal, 1.0, den))
    return np.where(normal, chi, fdist)


# ---------------------------------------------------------------------- table
def anova_table(res: Any, type: Any = 3, df_method: str = "satterthwaite") -> pd.DataFrame:
    """ANOVA table of every gene (see :meth:`flashmm.MultiGeneMixedLMResults.anova`).

    Parameters
    ----------
    res : MultiGeneMixedLMResults
        A fit of a model built with ``from_formula``.
    type : {3, 2, 1, "III", "II", "I"}
        The type of the table.
    df_method : {"satterthwaite", "kenward-roger", "residual", "normal"}
        Denominator df of the F-tests.

    Returns
    -------
    DataFrame
        Indexed by (gene, term); columns ``sum_sq, mean_sq, num_df, den_df, F,
        pvalue, padj`` (Benjamini-Hochberg within each term, NaN genes left out).
    """
    method = res._check_df_method(df_method)
    st = structure_of(res.stats.info)
    hyps = anova_contrasts(st, np.asarray(res.stats.XX, dtype=float), type)
    terms = [t for t in st.term_names if t in hyps]
    G = res.n_genes
    cols = {k: np.full((G, len(terms)), np.nan) for k in COLUMNS}
    cov = res.contrast_cov(method)
    for j, name in enumerate(terms):
        test = contest_md(res, hyps[name], method, cov)
        for k, v in test.items():
            cols[k][:, j] = v
    cols["padj"] = bh_adjust(cols["pvalue"])
    index = pd.MultiIndex.from_product([res.gene_names, terms], names=["gene", "term"])
    return pd.DataFrame({k: cols[k].ravel() for k in COLUMNS}, index=index)
