"""Design of correlated random effects per group (statsmodels' ``exog_re``).

:func:`random_slopes_block` turns ``exog_re`` (n x r) and the group labels into
``m * r`` columns of ``Z`` (r consecutive columns per group, so that ``ZZ`` has
r x r diagonal blocks in this part); the fit is in :mod:`flashmm._slopes`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._components import RandomComponent
from ._errors import DesignError

__all__ = ["random_slopes_block", "SLOPES_KEY"]

#: Key of the random-slope metadata in ``SufficientStats.info`` (names, dim, independent).
SLOPES_KEY = "random_slopes"


def random_slopes_block(exog_re: Any, group_codes: np.ndarray, group_levels: list[str],
                        group_name: str, n: int, independent: bool = False,
                        exog_re_names: list[str] | None = None
                        ) -> tuple[sp.csr_matrix, RandomComponent, dict[str, Any]]:
    """Columns of ``Z`` for correlated random effects ``exog_re`` within groups.

    Parameters
    ----------
    exog_re : array_like or DataFrame, shape (n, r)
        Random-effects design (a column of ones is the random intercept).
    group_codes, group_levels
        Integer group of every cell and the sorted group labels.
    group_name : str
        Name of the component (statsmodels' group name, ``"Group"`` by default).
    n : int
        Number of cells.
    independent : bool
        Independent (diagonal ``Psi``) instead of unstructured random effects.
    exog_re_names : list of str, optional
        Names of the r columns (default: DataFrame columns or statsmodels'
        ``x_re1, x_re2, ...``).

    Returns
    -------
    block : csr_matrix (n, m * r)
    component : RandomComponent
        Levels ``"<group>:<name>"``, ``groups`` and ``columns`` set.
    meta : dict
        JSON-serialisable description stored in ``Design.info["random_slopes"]``.
    """
    if isinstance(exog_re, pd.DataFrame):
        names = [str(c) for c in exog_re.columns]
        E = exog_re.to_numpy(dtype=np.float64)
    elif isinstance(exog_re, pd.Series):
        names = [str(exog_re.name) if exog_re.name is not None else "x_re1"]
        E = exog_re.to_numpy(dtype=np.float64)[:, None]
    else:
        E = np.asarray(sp.csr_matrix(exog_re).toarray() if sp.issparse(exog_re) else exog_re,
                       dtype=np.float64)
        if E.ndim == 1:
            E = E[:, None]
        names = [f"x_re{k + 1}" for k in range(E.shape[1])]
    if exog_re_names is not None:
        names = [str(x) for x in exog_re_names]
    if E.ndim != 2 or E.shape[0] != n:
        raise DesignError(f"exog_re has shape {E.shape}; it needs one row per cell ({n}).")
    if len(names) != E.shape[1]:
        raise DesignError(f"{len(names)} exog_re names for {E.shape[1]} columns.")
    if E.shape[1] == 0:
        raise DesignError("exog_re has no columns.")
    if not np.all(np.isfinite(E)):
        raise DesignError("exog_re contains NaN or inf; remove those cells or use missing='drop'.")
    zero = [names[k] for k in range(E.shape[1]) if not np.any(E[:, k])]
    if zero:
        raise DesignError(f"exog_re column(s) {zero} are 0 in every cell: their variance "
                          "cannot be estimated.")
    if np.linalg.matrix_rank(E) < E.shape[1]:
        raise DesignError(f"exog_re columns {names} are linearly dependent: Psi cannot be "
                          "estimated; drop the redundant column(s).")
    m, r = len(group_levels), E.shape[1]
    if m < 2:
        raise DesignError("random effects per group (exog_re) need at least two groups.")
    rows = np.repeat(np.arange(n), r)
    cols = (group_codes[:, None] * r + np.arange(r)[None]).ravel()
    block = sp.csr_matrix((E.ravel(), (rows, cols)), shape=(n, m * r))
    block.eliminate_zeros()
    grp = tuple(g for g in group_levels for _ in range(r))
    col = tuple(names) * m
    levels = tuple(f"{g}:{c}" for g, c in zip(grp, col, strict=True))
    comp = RandomComponent(str(group_name), levels, grp, col)
    meta = {"names": names, "dim": r, "n_groups": m, "independent": bool(independent),
            "group_name": str(group_name)}
    return block, comp, meta
