"""Design: turn covariates into the fixed design ``X`` and the random blocks ``Z``.

A :class:`Design` is what every later step needs to know about the cells: the
fixed-effects matrix (n x p, dense), the random-effects matrix (n x q, sparse,
one column per random effect) and the names of both.  It never sees the
expression matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._errors import DesignError

__all__ = ["RandomComponent", "Design", "build_design", "build_formula_design"]


@dataclass(frozen=True)
class RandomComponent:
    """One variance component: a set of random effects sharing one variance.

    Parameters
    ----------
    name : str
        Name of the component (statsmodels calls its variance ``"<name> Var"``).
    levels : tuple of str
        Label of every random effect (every column of ``Z`` in this block).
    groups : tuple of str or None
        For components nested in ``groups``: the group each effect belongs to.
    columns : tuple of str or None
        For nested components: the column label within its group (statsmodels'
        ``random_effects`` index).
    """

    name: str
    levels: tuple[str, ...]
    groups: tuple[str, ...] | None = None
    columns: tuple[str, ...] | None = None

    @property
    def size(self) -> int:
        """Number of random effects in the component."""
        return len(self.levels)


@dataclass
class Design:
    """Fixed and random design matrices of a set of cells.

    Attributes
    ----------
    exog : ndarray, shape (n, p)
        Fixed-effects design, float64.
    exog_names : list of str
        Names of the fixed-effect terms (columns of ``exog``).
    exog_re : scipy.sparse.csr_matrix, shape (n, q)
        Random-effects design ``Z = [Z_1 ... Z_k]``.
    components : tuple of RandomComponent
        The k components, in the order of their column blocks in ``exog_re``.
    group_name : str or None
        Name of the grouping factor (``groups``) if one was given.
    """

    exog: np.ndarray
    exog_names: list[str]
    exog_re: sp.csr_matrix
    components: tuple[RandomComponent, ...]
    group_name: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def nobs(self) -> int:
        """Number of cells."""
        return self.exog.shape[0]

    @property
    def k_fe(self) -> int:
        """Number of fixed-effect terms p."""
        return self.exog.shape[1]

    @property
    def sizes(self) -> list[int]:
        """Number of random effects per component."""
        return [c.size for c in self.components]

    def subset(self, rows: np.ndarray) -> Design:
        """Return the design of a subset of cells (keeps every level)."""
        return Design(
            self.exog[rows],
            list(self.exog_names),
            self.exog_re[rows],
            self.components,
            self.group_name,
            dict(self.info),
        )


def _as_labels(values: Any, what: str, n: int) -> np.ndarray:
    """Convert group-like labels to a 1-d array of strings, checking length."""
    arr = values.to_numpy() if isinstance(values, (pd.Series, pd.Index)) else values
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise DesignError(f"{what} must be one-dimensional labels, got shape {arr.shape}.")
    if len(arr) != n:
        raise DesignError(
            f"{what} has {len(arr)} entries but there are {n} cells; "
            "give one label per cell (row of endog)."
        )
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise DesignError(
            f"{what} contains {int(np.sum(~np.isfinite(arr)))} missing (NaN) labels; "
            "remove those cells or use missing='drop'."
        )
    if arr.dtype.kind == "O":
        bad = pd.isna(arr)
        if bad.any():
            raise DesignError(
                f"{what} contains {int(bad.sum())} missing labels; "
                "remove those cells or use missing='drop'."
            )
    return arr


def _codes(labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Integer codes and sorted level names of a label array."""
    uniq, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64), [str(u) for u in uniq]


def _indicator(codes: np.ndarray, n_levels: int) -> sp.csr_matrix:
    """Sparse n x n_levels indicator matrix of integer codes."""
    n = len(codes)
    return sp.csr_matrix(
        (np.ones(n), (np.arange(n), codes)), shape=(n, n_levels), dtype=np.float64
    )


def _block_columns(block: Any, what: str, n: int) -> tuple[sp.csr_matrix, list[str]]:
    """Normalise an exog_vc entry to a sparse block and column labels."""
    if isinstance(block, pd.DataFrame):
        names = [str(c) for c in block.columns]
        mat = sp.csr_matrix(block.to_numpy(dtype=np.float64))
    elif sp.issparse(block):
        mat = sp.csr_matrix(block, dtype=np.float64)
        names = [str(j) for j in range(mat.shape[1])]
    else:
        arr = np.asarray(block)
        if arr.ndim == 1:
            labels = _as_labels(arr, what, n)
            codes, names = _codes(labels)
            return _indicator(codes, len(names)), names
        mat = sp.csr_matrix(arr.astype(np.float64))
        names = [str(j) for j in range(mat.shape[1])]
    if mat.shape[0] != n:
        raise DesignError(
            f"{what} has {mat.shape[0]} rows but there are {n} cells; "
            "give one row per cell."
        )
    if mat.nnz and not np.all(np.isfinite(mat.data)):
        raise DesignError(f"{what} contains NaN or inf; remove those cells or use missing='drop'.")
    return mat, names


def _nest(block: sp.csr_matrix, names: list[str], group_codes: np.ndarray,
          group_levels: list[str]) -> tuple[sp.csr_matrix, list[str], list[str], list[str]]:
    """Nest the columns of ``block`` within groups: one column per (group, column).

    Columns that are identically zero (a level absent from a group) are dropped;
    they carry no information and do not change the likelihood.
    """
    coo = block.tocoo()
    d = block.shape[1]
    key = group_codes[coo.row] * d + coo.col
    used, new_col = np.unique(key, return_inverse=True)
    nested = sp.csr_matrix(
        (coo.data, (coo.row, new_col)), shape=(block.shape[0], len(used))
    )
    grp = [group_levels[k // d] for k in used]
    col = [names[k % d] for k in used]
    levels = [f"{g}:{c}" for g, c in zip(grp, col)]
    return nested, levels, grp, col


def _drop_empty_columns(block: sp.csr_matrix, names: list[str]) -> tuple[sp.csr_matrix, list[str]]:
    """Drop all-zero columns (levels with no cells)."""
    nnz = np.asarray(abs(block).sum(axis=0)).ravel() > 0
    if nnz.all():
        return block, names
    return block[:, np.flatnonzero(nnz)].tocsr(), [nm for nm, k in zip(names, nnz) if k]


def build_design(
    exog: Any,
    n: int,
    groups: Any = None,
    exog_vc: Mapping[str, Any] | None = None,
    group_name: str | None = None,
    exog_names: Sequence[str] | None = None,
) -> Design:
    """Assemble a :class:`Design` from arrays, following statsmodels' rules.

    Parameters
    ----------
    exog : array_like or DataFrame, shape (n, p)
        Fixed-effects design.
    n : int
        Number of cells (rows of endog), used to check every input's length.
    groups : array_like, optional
        Group labels. Without ``exog_vc`` they give one random intercept per
        group; with ``exog_vc`` the components are nested within groups (as in
        statsmodels, where a group intercept then needs ``re_formula="1"``).
    exog_vc : dict, optional
        Name -> labels (one random intercept per level) or an n x d block
        (d effects sharing one variance).
    group_name : str, optional
        Name of the group intercept component (default ``"Group"``).
    exog_names : sequence of str, optional
        Names of the fixed-effect terms when ``exog`` is not a DataFrame.
    """
    X, names = _exog_matrix(exog, n, exog_names)
    blocks: list[sp.csr_matrix] = []
    comps: list[RandomComponent] = []
    gname = group_name or "Group"
    group_codes = group_levels = None
    if groups is not None:
        labels = _as_labels(groups, "groups", n)
        group_codes, group_levels = _codes(labels)
        if not exog_vc:
            if len(group_levels) < 2:
                raise DesignError(
                    f"groups has a single level ({group_levels[0]!r}); a random "
                    "intercept needs at least two groups."
                )
            blocks.append(_indicator(group_codes, len(group_levels)))
            comps.append(RandomComponent(gname, tuple(group_levels)))
    for vc_name, block in (exog_vc or {}).items():
        mat, cols = _block_columns(block, f"exog_vc[{vc_name!r}]", n)
        if group_codes is not None:
            mat, levels, grp, col = _nest(mat, cols, group_codes, group_levels)
            comp = RandomComponent(str(vc_name), tuple(levels), tuple(grp), tuple(col))
        else:
            mat, levels = _drop_empty_columns(mat, cols)
            comp = RandomComponent(str(vc_name), tuple(levels))
        if comp.size < 2:
            raise DesignError(
                f"random component {vc_name!r} has {comp.size} level(s) with data; "
                "a variance component needs at least two."
            )
        blocks.append(mat)
        comps.append(comp)
    if not comps:
        raise DesignError(
            "no random effects: give groups (a random intercept per group) "
            "or exog_vc (variance components)."
        )
    Z = sp.hstack(blocks, format="csr", dtype=np.float64)
    return Design(X, names, Z, tuple(comps), gname if groups is not None else None)


def _exog_matrix(exog: Any, n: int, exog_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Validate the fixed design and return it as a float64 array with names."""
    if isinstance(exog, pd.DataFrame):
        names = [str(c) for c in exog.columns]
        X = exog.to_numpy(dtype=np.float64)
    else:
        if sp.issparse(exog):
            exog = exog.toarray()
        X = np.asarray(exog, dtype=np.float64)
        if X.ndim == 1:
            X = X[:, None]
        names = list(exog_names) if exog_names is not None else [f"x{j + 1}" for j in range(X.shape[1])]
    if X.ndim != 2:
        raise DesignError(f"exog must be two-dimensional (cells x terms), got shape {X.shape}.")
    if X.shape[0] != n:
        raise DesignError(
            f"exog has {X.shape[0]} rows but endog has {n} cells; "
            "exog must have one row per cell."
        )
    if len(names) != X.shape[1]:
        raise DesignError(f"{len(names)} exog_names given for {X.shape[1]} columns.")
    if not np.all(np.isfinite(X)):
        bad = np.flatnonzero(~np.all(np.isfinite(X), axis=0))
        raise DesignError(
            "exog contains NaN or inf in column(s) "
            f"{[names[j] for j in bad]}; remove those cells or use missing='drop'."
        )
    check_full_rank(X, names)
    return X, names


def check_full_rank(X: np.ndarray, names: Sequence[str]) -> None:
    """Raise a DesignError listing aliased columns if ``X`` is rank deficient."""
    if X.shape[1] == 0:
        return
    scale = np.sqrt(np.sum(X * X, axis=0))
    zero = scale == 0
    if zero.any():
        raise DesignError(
            "the fixed design is rank deficient: column(s) "
            f"{[names[j] for j in np.flatnonzero(zero)]} are all zero (empty factor "
            "levels?); remove them from the formula or the data."
        )
    import scipy.linalg as sla

    r, piv = sla.qr(X / scale, mode="r", pivoting=True)
    diag = np.abs(np.diag(r))
    tol = diag[0] * max(X.shape) * np.finfo(float).eps * 10
    rank = int(np.sum(diag > tol))
    if rank < X.shape[1]:
        aliased = sorted(piv[rank:])
        raise DesignError(
            f"the fixed design is rank deficient (rank {rank} < {X.shape[1]} columns): "
            f"column(s) {[names[j] for j in aliased]} are linear combinations of the "
            "others. Drop them or reparameterise the formula (e.g. remove the intercept "
            "or an interaction level)."
        )


def build_formula_design(
    formula: str,
    data: pd.DataFrame,
    groups: Any = None,
    vc_formula: Mapping[str, str] | None = None,
    re_formula: str | None = None,
) -> Design:
    """Build a :class:`Design` from patsy formulas, with statsmodels' semantics.

    Term names are those statsmodels' ``MixedLM.from_formula`` gives for the
    same formula. ``re_formula="1"`` adds a random intercept for ``groups``
    alongside variance components (statsmodels' rule).
    """
    import patsy

    if not isinstance(data, pd.DataFrame):
        raise DesignError(f"data must be a pandas DataFrame of cells, got {type(data).__name__}.")
    formula = _fixed_rhs(formula)
    X = _patsy_matrix(patsy, formula, data, "formula")
    group_name = None
    if isinstance(groups, str):
        if groups not in data.columns:
            raise DesignError(
                f"groups column {groups!r} is not in data; available columns: "
                f"{list(data.columns)}."
            )
        group_name = groups
        groups = data[groups].to_numpy()
    exog_vc: dict[str, Any] = {}
    if re_formula is not None:
        if re_formula.strip().lstrip("~").strip() != "1":
            raise DesignError(
                "only re_formula='1' (a random group intercept) is supported here; "
                "random slopes need exog_re."
            )
        if groups is None:
            raise DesignError("re_formula needs groups.")
        exog_vc[group_name or "Group"] = np.zeros(len(data), dtype=np.int64)
    for name, vcf in (vc_formula or {}).items():
        exog_vc[name] = _patsy_matrix(patsy, vcf, data, f"vc_formula[{name!r}]")
    design = build_design(
        X, len(data), groups=groups, exog_vc=exog_vc or None, group_name=group_name
    )
    design.info.update(
        formula=formula,
        groups=group_name,
        vc_formula=dict(vc_formula or {}),
        re_formula=re_formula,
    )
    return design


def _fixed_rhs(formula: str) -> str:
    """Return the right-hand side of a one-sided (or two-sided) formula."""
    if not isinstance(formula, str):
        raise DesignError(f"formula must be a string, got {type(formula).__name__}.")
    if "~" in formula:
        lhs, rhs = formula.split("~", 1)
        if lhs.strip():
            raise DesignError(
                f"formula {formula!r} has a left-hand side; give a one-sided formula "
                "(the responses are the columns of endog), e.g. '~ 0 + cls + cls:trt'."
            )
        formula = rhs
    return formula.strip()


def _patsy_matrix(patsy: Any, formula: str, data: pd.DataFrame, what: str) -> pd.DataFrame:
    """Evaluate a one-sided patsy formula, turning patsy errors into clear ones."""
    rhs = _fixed_rhs(formula)
    try:
        return patsy.dmatrix(rhs, data, return_type="dataframe", NA_action="raise", eval_env=2)
    except patsy.PatsyError as err:
        msg = str(err).splitlines()[0]
        if "missing values" in str(err) or "NaN" in str(err):
            raise DesignError(
                f"{what} {rhs!r}: variables contain missing values; remove those cells "
                "or use missing='drop'."
            ) from None
        raise DesignError(f"{what} {rhs!r} could not be evaluated: {msg}") from None
    except NameError as err:
        raise DesignError(
            f"{what} {rhs!r} names a variable that is not a column of data ({err}); "
            f"available columns: {list(data.columns)}."
        ) from None
