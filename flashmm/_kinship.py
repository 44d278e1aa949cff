"""Known covariance among the levels of a random intercept (kinship), internals.

A component ``u ~ N(0, s_g K)`` with ``K = L L'`` is the ordinary model
``u = L v``, ``v ~ N(0, s_g I)``, i.e. ``Z`` replaced by ``Z L`` (MATH.md).  We take
``K = U diag(d) U'`` and ``L = U diag(sqrt(d))`` restricted to the eigenvalues
``d > tol``, so a rank-deficient ``K`` works and the columns of ``Z L`` are the
eigen-directions of ``K``.  Everything downstream (statistics, eigen path, GLS)
is unchanged; BLUPs are mapped back to the original levels by :func:`to_levels`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._components import RandomComponent
from ._errors import DesignError

__all__ = ["kinship_factor", "apply_group_cov", "to_levels"]

#: eigenvalues below ``-NEG_TOL * max eigenvalue`` make K indefinite (an error)
NEG_TOL = 1e-8


def _align(K: Any, levels: list[str], what: str) -> np.ndarray:
    """K restricted to ``levels`` (in that order), as a float array."""
    if isinstance(K, pd.DataFrame):
        rows = [str(i) for i in K.index]
        cols = [str(c) for c in K.columns]
        if len(set(rows)) != len(rows) or set(rows) != set(cols):
            raise DesignError(
                f"{what} must be indexed and columned by the same (unique) group labels; "
                f"{len(rows)} row labels, {len(cols)} column labels."
            )
        missing = [lv for lv in levels if lv not in set(rows)]
        if missing:
            raise DesignError(
                f"{what} has no row/column for {len(missing)} group label(s) of groups: "
                f"{missing[:20]}{' ...' if len(missing) > 20 else ''}."
            )
        pos_r = {r: i for i, r in enumerate(rows)}
        pos_c = {c: i for i, c in enumerate(cols)}
        arr = K.to_numpy(dtype=np.float64)
        return arr[np.ix_([pos_r[lv] for lv in levels], [pos_c[lv] for lv in levels])]
    if sp.issparse(K):
        K = K.toarray()
    arr = np.asarray(K, dtype=np.float64)
    if arr.ndim != 2 or arr.shape != (len(levels), len(levels)):
        raise DesignError(
            f"{what} given as an array must be {len(levels)} x {len(levels)} (the group "
            f"levels in sorted order), got shape {arr.shape}; give a DataFrame indexed by "
            "the group labels to use a larger or differently ordered matrix."
        )
    return arr


def kinship_factor(K: Any, levels: list[str] | tuple[str, ...], what: str = "group_cov",
                   rank_tol: float | None = None) -> np.ndarray:
    """Factor ``L`` (len(levels) x r) with ``K = L L'`` on ``levels``.

    Parameters
    ----------
    K : DataFrame or array_like
        Covariance among the levels: a DataFrame indexed and columned by the
        labels (may hold more labels than ``levels``), or an array in the order
        of ``levels``.
    levels : sequence of str
        The group labels, in the column order of the group indicator block.
    what : str
        Name of the input, for error messages.
    rank_tol : float, optional
        Relative threshold below which eigenvalues are dropped (default
        ``len(levels) * eps``).

    Returns
    -------
    ndarray
        ``L = U diag(sqrt(d))`` over the eigenvalues ``d > rank_tol * max(d)``,
        in decreasing order of ``d``.

    Raises
    ------
    DesignError
        Labels missing from ``K``, non-finite or non-symmetric ``K``, or an
        indefinite ``K`` (an eigenvalue below ``-1e-8`` times the largest).
    """
    levels = [str(lv) for lv in levels]
    arr = _align(K, levels, what)
    if not np.all(np.isfinite(arr)):
        raise DesignError(f"{what} contains NaN or inf.")
    scale = max(float(np.max(np.abs(arr))), np.finfo(float).tiny)
    if np.max(np.abs(arr - arr.T)) > 1e-10 * scale:
        raise DesignError(f"{what} is not symmetric (max |K - K'| = {np.max(np.abs(arr - arr.T)):.3g}).")
    arr = 0.5 * (arr + arr.T)
    d, U = np.linalg.eigh(arr)
    dmax = float(d[-1])
    if dmax <= 0:
        raise DesignError(f"{what} has no positive eigenvalue; it is not a covariance matrix.")
    if d[0] < -NEG_TOL * dmax:
        raise DesignError(
            f"{what} is not positive semi-definite: smallest eigenvalue {d[0]:.6g} "
            f"(largest {dmax:.6g}); a kinship / covariance matrix must have no negative "
            "eigenvalues beyond round-off."
        )
    tol = (len(levels) * np.finfo(float).eps) if rank_tol is None else rank_tol
    keep = np.flatnonzero(d > tol * dmax)[::-1]
    return U[:, keep] * np.sqrt(d[keep])


def apply_group_cov(block: sp.csr_matrix, comp: RandomComponent, K: Any,
                    what: str = "group_cov") -> tuple[sp.csr_matrix, RandomComponent]:
    """Replace the indicator block ``Z`` of a group intercept by ``Z L``.

    Returns the new block (columns = eigen-directions ``PC1, PC2, ...``) and the
    component carrying ``L`` and the original level names.
    """
    L = kinship_factor(K, comp.levels, what)
    ZL = sp.csr_matrix(np.asarray(block @ L))
    names = tuple(f"PC{j + 1}" for j in range(L.shape[1]))
    new = dataclasses.replace(comp, levels=names, cov_levels=tuple(comp.levels), cov_factor=L)
    return ZL, new


def to_levels(comp: RandomComponent, values: np.ndarray) -> np.ndarray:
    """Map effects on the eigen-directions (genes x r) to the levels: ``u = L v``."""
    return values @ comp.cov_factor.T
