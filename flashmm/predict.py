"""Predictions and residuals of a multi-gene fit, for the fitting cells or new ones.

``predict`` returns ``X b_g`` (population level) or ``X b_g + Z u_g`` (with the
BLUPs ``u_g`` of the fit) for every requested gene at once: one product of the
new cells' design with the genes' estimates, memory O(cells x genes requested).

The design of new cells is built as at the fit: through the patsy
``DesignInfo`` of each formula for ``from_formula`` models (so factor levels
and their coding are those of the fit), and from arrays for array-built models
(``exog``, ``groups``, ``exog_vc``, ``exog_re`` as given to the model).  Every
random effect of a new cell is matched by name to a fitted level (a group, a
``"group:column"`` of a nested component, a level of a crossed one).

``results.fittedvalues`` and ``results.resid`` are deliberately not
materialised: for an atlas they are cells x genes dense matrices (10^6 cells x
2 x 10^4 genes is 160 GB), and the fit never needs the cells again.
:meth:`~flashmm.MultiGeneMixedLMResults.resid_for` gives the residuals of a few
genes from their expression.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._design import Design, _as_labels, _block_columns, indicator_block
from ._endog import resolve_transform
from ._errors import DesignError
from ._exog_re import SLOPES_KEY
from ._formula_spec import VC_INDICATOR, VC_INTERCEPT, FormulaSpec

if TYPE_CHECKING:
    from ._components import RandomComponent

__all__ = ["predict", "resid_for", "NewCells", "RANDOM_EFFECTS_OPTIONS"]

RANDOM_EFFECTS_OPTIONS = (True, False, "known")

#: unknown levels named in an error message
_SHOW = 5


class NewCells:
    """Fixed and random designs of the cells to predict, aligned with a fit.

    Attributes
    ----------
    exog : ndarray (n, p)
        Fixed design, columns in the order of ``results.exog_names``.
    exog_re : csr_matrix (n, q) or None
        Random design, columns in the order of the fit's ``Z`` (None when
        only population-level predictions are asked for).
    index : pandas.Index
        Labels of the cells (the index of a DataFrame input).
    """

    def __init__(self, exog: np.ndarray, exog_re: sp.csr_matrix | None, index: pd.Index) -> None:
        self.exog = exog
        self.exog_re = exog_re
        self.index = index

    @property
    def nobs(self) -> int:
        """Number of cells."""
        return self.exog.shape[0]


# --------------------------------------------------------------------- API
def predict(results: Any, exog: Any = None, groups: Any = None,
            random_effects: bool | str = True, *, exog_vc: Mapping[str, Any] | None = None,
            exog_re: Any = None, genes: Any = None) -> pd.DataFrame:
    """Predictions, cells x genes; see :meth:`MultiGeneMixedLMResults.predict`."""
    check_random_effects_option(random_effects)
    cells = new_cells(results, exog, groups, random_effects, exog_vc, exog_re)
    return predict_cells(results, cells, random_effects, genes)


def predict_cells(results: Any, cells: NewCells,
                  random_effects: bool | str, genes: Any = None) -> pd.DataFrame:
    """``X b`` (+ ``Z u``) for the genes requested (positions, names or mask; default all)."""
    pos = gene_positions(results, genes)
    b = results._fixed.fe_params[pos]                       # (G, p)
    out = cells.exog @ b.T
    if random_effects is not False and cells.exog_re is not None:
        u = results._gls.blup_unscaled[pos]                # (G, q), columns of Z
        out = out + np.asarray(cells.exog_re @ u.T)
    names = [results.stats.gene_names[i] for i in pos]
    return pd.DataFrame(out, index=cells.index, columns=pd.Index(names, name="gene"))


def resid_for(results: Any, genes: Any, endog: Any, exog: Any = None,
              groups: Any = None, random_effects: bool | str = True, *,
              exog_vc: Mapping[str, Any] | None = None, exog_re: Any = None,
              transform: Any = None) -> pd.DataFrame:
    """Residuals ``y - fitted`` of a few genes; see :meth:`MultiGeneMixedLMResults.resid_for`."""
    check_random_effects_option(random_effects)
    pos = gene_positions(results, genes)
    cells = new_cells(results, exog, groups, random_effects, exog_vc, exog_re)
    y = _responses(results, endog, pos, cells.nobs, transform)
    fitted = predict_cells(results, cells, random_effects, pos)
    return pd.DataFrame(y - fitted.to_numpy(), index=fitted.index, columns=fitted.columns)


def check_random_effects_option(random_effects: Any) -> None:
    """``random_effects`` must be True, False or ``"known"``."""
    if not any(random_effects is v or (isinstance(v, str) and random_effects == v)
               for v in RANDOM_EFFECTS_OPTIONS):
        raise ValueError(f"random_effects must be True, False or 'known', got {random_effects!r}.")


def gene_positions(results: Any, genes: Any) -> np.ndarray:
    """Positions of the requested genes (None: all)."""
    if genes is None:
        return np.arange(results.n_genes)
    if isinstance(genes, (str, int, np.integer)):
        genes = [genes]
    return results.stats._gene_positions(genes)


# ------------------------------------------------------------- new cells
def new_cells(results: Any, exog: Any, groups: Any,
              random_effects: bool | str, exog_vc: Mapping[str, Any] | None,
              exog_re: Any) -> NewCells:
    """The designs of the cells to predict (the fitting cells when ``exog`` is None)."""
    model = results.model
    if exog is None:
        design = getattr(model, "design", None)
        if design is None:
            raise DesignError(
                "predict(exog=None) predicts the fitting cells, but this model has no design "
                "in memory (built from sufficient statistics or loaded from a file); give the "
                "covariates of the cells to predict as exog (a DataFrame for formula models).")
        return _fitting_cells(design, random_effects)
    spec = getattr(model, "formula_spec", None)
    known = random_effects == "known"
    want_re = random_effects is not False
    if spec is not None and isinstance(exog, pd.DataFrame):
        return _formula_cells(results, spec, exog, groups, want_re, known)
    return _array_cells(results, exog, groups, exog_vc, exog_re, want_re, known)


def _fitting_cells(design: Design, random_effects: bool | str) -> NewCells:
    Z = design.exog_re if random_effects is not False else None
    return NewCells(design.exog, Z, pd.RangeIndex(design.nobs, name="cell"))


def _formula_cells(results: Any, spec: FormulaSpec, data: Any, groups: Any,
                   want_re: bool, known: bool) -> NewCells:
    X = _formula_matrix(spec, "fixed", data)
    missing = [c for c in results.exog_names if c not in X.columns]
    if missing:
        raise DesignError(f"the covariates of the new cells give no column(s) {missing} of the "
                          "fitted design.")
    X = X[results.exog_names].to_numpy(dtype=np.float64)
    Z = None
    if want_re:
        labels = _formula_groups(spec, data, groups)
        sources = _formula_sources(results, spec, data)
        Z = random_design(results, len(data), labels, sources, known)
    return NewCells(X, Z, data.index)


def _formula_matrix(spec: FormulaSpec, key: str, data: pd.DataFrame) -> pd.DataFrame:
    """Columns of one formula for new cells, through the fit's DesignInfo."""
    import patsy

    info = spec.design_info(key)
    try:
        (mat,) = patsy.build_design_matrices([info], data, NA_action="raise",
                                             return_type="dataframe")
    except patsy.PatsyError as err:
        raise DesignError(
            f"formula {spec.formula_of(key)!r} on the new cells: {str(err).splitlines()[0]} "
            "(new cells need the fit's columns, no missing values and only factor levels "
            "seen in the fit).") from None
    except NameError as err:
        raise DesignError(f"formula {spec.formula_of(key)!r} on the new cells: {err}; "
                          f"the data have columns {list(data.columns)}.") from None
    mat.index = data.index
    return mat


def _formula_groups(spec: FormulaSpec, data: pd.DataFrame, groups: Any) -> np.ndarray | None:
    if groups is not None:
        return _as_labels(data[groups] if isinstance(groups, str) else groups, "groups", len(data))
    if spec.groups is None:
        return None
    if spec.groups not in data.columns:
        return None
    return _as_labels(data[spec.groups], f"groups column {spec.groups!r}", len(data))


def _formula_sources(results: Any, spec: FormulaSpec,
                     data: pd.DataFrame) -> dict[str, tuple[sp.csr_matrix, list[str]]]:
    """Block and column names of every variance component and of the random slopes."""
    n = len(data)
    out: dict[str, tuple[sp.csr_matrix, list[str]]] = {}
    for name, (kind, formula) in spec.vc.items():
        if kind == VC_INTERCEPT:
            out[name] = _block_columns(np.zeros(n, dtype=np.int64), name, n)
            continue
        block = indicator_block(formula, data) if kind == VC_INDICATOR else None
        if block is None:
            block = _formula_matrix(spec, f"vc:{name}", data)
        out[name] = _block_columns(block, f"vc_formula[{name!r}]", n)
    if spec.re_formula is not None:
        mat = _formula_matrix(spec, "re", data)
        names = list(results.stats.info[SLOPES_KEY]["names"])      # Intercept -> group name
        out[SLOPES_KEY] = (sp.csr_matrix(mat.to_numpy(dtype=np.float64)), names)
    return out


def _array_cells(results: Any, exog: Any, groups: Any,
                 exog_vc: Mapping[str, Any] | None, exog_re: Any, want_re: bool,
                 known: bool) -> NewCells:
    index = exog.index if isinstance(exog, (pd.DataFrame, pd.Series)) else None
    X = _array_exog(results, exog)
    n = X.shape[0]
    Z = None
    if want_re:
        labels = None if groups is None else _as_labels(groups, "groups", n)
        sources = {str(k): _block_columns(v, f"exog_vc[{k!r}]", n)
                   for k, v in (exog_vc or {}).items()}
        if exog_re is not None:
            E = exog_re.to_numpy(dtype=np.float64) if isinstance(exog_re, pd.DataFrame) \
                else np.asarray(exog_re, dtype=np.float64)
            E = E[:, None] if E.ndim == 1 else E
            if E.shape[0] != n:
                raise DesignError(f"exog_re has {E.shape[0]} rows for {n} new cells.")
            names = list(results.stats.info[SLOPES_KEY]["names"]) if SLOPES_KEY in \
                results.stats.info else [str(j) for j in range(E.shape[1])]
            sources[SLOPES_KEY] = (sp.csr_matrix(E), names)
        Z = random_design(results, n, labels, sources, known)
    return NewCells(X, Z, pd.RangeIndex(n, name="cell") if index is None else index)


def _array_exog(results: Any, exog: Any) -> np.ndarray:
    names = results.exog_names
    if isinstance(exog, pd.DataFrame):
        missing = [c for c in names if c not in exog.columns]
        if missing:
            raise DesignError(f"exog lacks the fixed-effect column(s) {missing}.")
        X = exog[names].to_numpy(dtype=np.float64)
    else:
        X = np.asarray(sp.csr_matrix(exog).toarray() if sp.issparse(exog) else exog,
                       dtype=np.float64)
        X = X[:, None] if X.ndim == 1 else X
    if X.ndim != 2 or X.shape[1] != len(names):
        raise DesignError(f"exog must have the {len(names)} fixed-effect columns {names}, "
                          f"got shape {X.shape}.")
    if not np.all(np.isfinite(X)):
        raise DesignError("exog of the new cells contains NaN or inf.")
    return X


# ---------------------------------------------------------- random design
def random_design(results: Any, n: int, labels: np.ndarray | None,
                  sources: dict[str, tuple[sp.csr_matrix, list[str]]],
                  known: bool) -> sp.csr_matrix:
    """``Z`` of the new cells in the column order of the fit's ``Z``.

    Every non-zero entry of a component is matched to a fitted level by name;
    an unknown level raises (``known=False``) or is left out, i.e. predicted
    at its mean 0 (``known=True``).
    """
    stats = results.stats
    slopes = SLOPES_KEY in stats.info
    blocks = []
    for ci, comp in enumerate(stats.components):
        if slopes and ci == 0:
            blocks.append(_nested_block(comp, n, labels, sources.get(SLOPES_KEY), known,
                                        "exog_re / re_formula"))
        elif comp.groups is not None:
            blocks.append(_nested_block(comp, n, labels, sources.get(comp.name), known,
                                        f"variance component {comp.name!r}"))
        elif comp.name in sources:
            blocks.append(_crossed_block(comp, n, sources[comp.name], known))
        else:
            blocks.append(_group_block(comp, n, labels, known))
    return sp.hstack(blocks, format="csr", dtype=np.float64)


def _need(what: Any, message: str) -> None:
    if what is None:
        raise DesignError(message + " Or predict at the population level with "
                          "random_effects=False.")


def _group_block(comp: RandomComponent, n: int, labels: np.ndarray | None,
                 known: bool) -> sp.csr_matrix:
    """Group intercept (possibly with a known covariance ``K = L L'``)."""
    _need(labels, f"the random intercept {comp.name!r} needs the group of every new cell: "
                  "give groups= (or the group column in the data).")
    levels = comp.cov_levels if comp.cov_levels is not None else comp.levels
    cols = _match_levels([str(v) for v in labels], levels, comp.name, known)
    rows = np.flatnonzero(cols >= 0)
    ind = sp.csr_matrix((np.ones(rows.size), (rows, cols[rows])), shape=(n, len(levels)))
    if comp.cov_factor is not None:
        return sp.csr_matrix(np.asarray(ind @ comp.cov_factor))
    return ind


def _crossed_block(comp: RandomComponent, n: int, source: tuple[sp.csr_matrix, list[str]],
                   known: bool) -> sp.csr_matrix:
    mat, names = source
    coo = mat.tocoo()
    keys = [names[j] for j in coo.col]
    return _assemble(comp, n, coo.row, keys, coo.data, known)


def _nested_block(comp: RandomComponent, n: int, labels: np.ndarray | None,
                  source: tuple[sp.csr_matrix, list[str]] | None, known: bool,
                  what: str) -> sp.csr_matrix:
    _need(labels, f"the {what} is nested in groups: give groups= (or the group column in "
                  "the data).")
    _need(source, f"the {what} needs its covariates for the new cells "
                  "(exog_vc / exog_re, or the formula's columns in the data).")
    assert labels is not None and source is not None
    mat, names = source
    coo = mat.tocoo()
    group = np.array([str(v) for v in labels], dtype=object)
    keys = [f"{g}:{names[j]}" for g, j in zip(group[coo.row], coo.col, strict=True)]
    return _assemble(comp, n, coo.row, keys, coo.data, known)


def _assemble(comp: RandomComponent, n: int, rows: np.ndarray, keys: list[str],
              values: np.ndarray, known: bool) -> sp.csr_matrix:
    cols = _match_levels(keys, comp.levels, comp.name, known)
    ok = cols >= 0
    return sp.csr_matrix((values[ok], (rows[ok], cols[ok])), shape=(n, comp.size))


def _match_levels(keys: Sequence[str], levels: Sequence[str], name: str,
                  known: bool) -> np.ndarray:
    """Column of every key among ``levels`` (-1 if unknown and ``known``)."""
    cols = pd.Index(list(levels)).get_indexer(list(keys)).astype(np.int64)
    if not known and np.any(cols < 0):
        unknown = list(dict.fromkeys(k for k, c in zip(keys, cols, strict=True) if c < 0))
        raise DesignError(
            f"random effect {name!r}: {len(unknown)} level(s) of the new cells were not in the "
            f"fit: {unknown[:_SHOW]}{' ...' if len(unknown) > _SHOW else ''}. Predict them at "
            "the population level with random_effects='known' (or every cell with "
            "random_effects=False).")
    return cols


# ------------------------------------------------------------ residuals
def _responses(results: Any, endog: Any, pos: np.ndarray, n: int,
               transform: Any) -> np.ndarray:
    """The requested genes' (transformed) expression, cells x genes."""
    names = [results.stats.gene_names[i] for i in pos]
    if hasattr(endog, "obs") and hasattr(endog, "var_names"):   # AnnData
        endog = endog[:, names].X
        cols = None
    elif isinstance(endog, pd.DataFrame):
        absent = [g for g in names if g not in endog.columns]
        if absent:
            raise DesignError(f"endog has no column(s) for gene(s) {absent[:_SHOW]}.")
        endog, cols = endog[names].to_numpy(dtype=np.float64), None
    else:
        cols = _columns_of(endog, pos, results.n_genes)
    y = endog.toarray() if sp.issparse(endog) else np.asarray(endog, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    if cols is not None:
        y = y[:, cols]
    if y.shape[0] != n:
        raise DesignError(f"endog has {y.shape[0]} cells, the covariates {n}.")
    func = _transform_of(results, transform)
    return np.asarray(func(y), dtype=np.float64) if func is not None else y


def _columns_of(endog: Any, pos: np.ndarray, n_genes: int) -> np.ndarray | None:
    width = endog.shape[1] if getattr(endog, "ndim", 2) == 2 else 1
    if width == n_genes:
        return pos
    if width == pos.size:
        return None
    raise DesignError(f"endog has {width} columns: give all {n_genes} genes of the fit, or "
                      f"just the {pos.size} requested (in that order), or a DataFrame.")


def _transform_of(results: Any, transform: Any) -> Any:
    if transform is not None:
        return None if transform is False else resolve_transform(transform)[0]
    name = results.stats.transform
    if name is None:
        return None
    try:
        return resolve_transform(name)[0]
    except ValueError:
        raise DesignError(
            f"the fit transformed the responses with the callable {name!r}, which was not "
            "saved: pass it as transform=, or transform=False for already transformed "
            "responses.") from None
