"""The term structure of a formula design: which columns of ``X`` belong to which term.

:func:`term_structure` reads patsy's ``DesignInfo`` when the model is built from
a formula and keeps, in plain JSON-serialisable form (it travels in
``stats.info`` and survives ``SufficientStats.save``):

* every factor (categorical with its levels, or numerical with its mean over the
  cells and its number of columns);
* every term with its factors, its columns in ``X`` and patsy's coding of it
  (subterms with their contrast matrices).

From that, :class:`TermStructure` rebuilds rows of ``X`` for any factor values
without the data (:meth:`TermStructure.model_rows`), the full indicator
(over-parameterised) columns of a term (:meth:`TermStructure.full_dummy_rows`),
the reference grid of least-squares means and the containment of terms, which
is all that the ANOVA contrasts (:mod:`flashmm.anova`) and least-squares means
(:mod:`flashmm.lsmeans`) need.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import TermError

__all__ = ["TERMS_KEY", "TermStructure", "term_structure", "structure_of"]

#: Key of the term structure in ``Design.info`` / ``SufficientStats.info``.
TERMS_KEY = "terms"

CATEGORICAL = "categorical"
NUMERICAL = "numerical"


@dataclass(frozen=True)
class Factor:
    """One patsy factor: categorical (``levels``) or numerical (``mean``, one per column)."""

    name: str
    kind: str
    levels: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()

    @property
    def n_columns(self) -> int:
        """Columns of a numerical factor (1 for ``x``, more for ``bs(x)``)."""
        return len(self.mean)


@dataclass(frozen=True)
class Subterm:
    """One block of a term's columns: its factors and the contrast matrix of each categorical."""

    factors: tuple[str, ...]
    contrasts: dict[str, np.ndarray]      # factor name -> levels x columns
    n_columns: int


@dataclass(frozen=True)
class Term:
    """A model term: patsy name, factors, positions of its columns in ``X`` and its coding."""

    name: str
    factors: tuple[str, ...]
    columns: tuple[int, ...]
    subterms: tuple[Subterm, ...]


class TermStructure:
    """Terms and factors of a formula design (see the module docstring)."""

    def __init__(self, factors: dict[str, Factor], terms: list[Term], n_columns: int) -> None:
        self.factors = factors
        self.terms = terms
        self.n_columns = n_columns

    # --------------------------------------------------------- (de)serialise
    def to_info(self) -> dict[str, Any]:
        """A JSON-serialisable description (stored in ``Design.info``)."""
        return {
            "n_columns": self.n_columns,
            "factors": [{"name": f.name, "kind": f.kind, "levels": list(f.levels),
                         "mean": list(f.mean)} for f in self.factors.values()],
            "terms": [{"name": t.name, "factors": list(t.factors), "columns": list(t.columns),
                       "subterms": [{"factors": list(s.factors), "n_columns": s.n_columns,
                                     "contrasts": {k: v.tolist() for k, v in s.contrasts.items()}}
                                    for s in t.subterms]}
                      for t in self.terms],
        }

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> TermStructure:
        """Rebuild from :meth:`to_info`'s description."""
        factors = {f["name"]: Factor(f["name"], f["kind"], tuple(f["levels"]),
                                     tuple(float(m) for m in f["mean"])) for f in info["factors"]}
        terms = [Term(t["name"], tuple(t["factors"]), tuple(int(c) for c in t["columns"]),
                      tuple(Subterm(tuple(s["factors"]),
                                    {k: np.asarray(v, dtype=float).reshape(
                                        len(factors[k].levels), -1)
                                     for k, v in s["contrasts"].items()},
                                    int(s["n_columns"])) for s in t["subterms"]))
                 for t in info["terms"]]
        return cls(factors, terms, int(info["n_columns"]))

    # ------------------------------------------------------------- queries
    @property
    def model_terms(self) -> list[Term]:
        """The terms with at least one factor (R's ``term.labels``: no intercept)."""
        return [t for t in self.terms if t.factors]

    @property
    def term_names(self) -> list[str]:
        """Names of :attr:`model_terms`."""
        return [t.name for t in self.model_terms]

    @property
    def has_intercept(self) -> bool:
        """Whether the design has an intercept term."""
        return any(not t.factors for t in self.terms)

    def term(self, name: str) -> Term:
        """The term called ``name``; a :class:`TermError` listing the valid names otherwise."""
        for t in self.model_terms:
            if t.name == name:
                return t
        raise TermError(f"{name!r} is not a term of the model; terms are {self.term_names}.")

    def is_numeric_term(self, term: Term) -> bool:
        """Whether the term involves a numerical factor (lmerTest's ``numeric_terms``)."""
        return any(self.factors[f].kind == NUMERICAL for f in term.factors)

    def numeric_factors(self, term: Term) -> set[str]:
        """The numerical factors of a term."""
        return {f for f in term.factors if self.factors[f].kind == NUMERICAL}

    def containing(self, term: Term) -> list[Term]:
        """Terms that contain ``term``: a strict superset of its factors, the same numerics.

        This is lmerTest's ``containment``, on the factors of each term as
        patsy lists them (see the user guide for how this differs from R's
        factor matrix for interactions whose margins are absent).
        """
        own, nums = set(term.factors), self.numeric_factors(term)
        return [t for t in self.model_terms
                if own < set(t.factors) and self.numeric_factors(t) == nums]

    # ------------------------------------------------------ rows of X
    def model_rows(self, values: dict[str, np.ndarray], treatment: bool = False) -> np.ndarray:
        """Rows of ``X`` for factor values, built exactly as patsy builds them.

        ``values`` maps every factor to level codes (categorical, shape (m,))
        or values (numerical, shape (m, columns)).  With ``treatment=True`` the
        same terms are coded with treatment contrasts instead (full indicators
        where patsy codes a factor with full rank, the first level dropped
        otherwise): R's ``contr.treatment`` remake of the design.
        """
        m = _n_rows(values)
        out = np.zeros((m, self.n_columns))
        for term in self.terms:
            blocks = [self._subterm_rows(s, values, m, treatment) for s in term.subterms]
            out[:, list(term.columns)] = np.hstack(blocks) if blocks else np.ones((m, 0))
        return out

    def _subterm_rows(self, sub: Subterm, values: dict[str, np.ndarray], m: int,
                      treatment: bool) -> np.ndarray:
        per_factor = []
        for f in sub.factors:
            if self.factors[f].kind == CATEGORICAL:
                C = sub.contrasts[f]
                if treatment:
                    C = _treatment_matrix(C)
                per_factor.append(C[values[f]])
            else:
                per_factor.append(values[f])
        return _column_products(per_factor, m)

    def full_dummy_rows(self, term: Term, values: dict[str, np.ndarray]) -> np.ndarray:
        """R's ``model.matrix(~ 0 + term)``: full indicators of every categorical times the numerics."""
        m = _n_rows(values)
        per_factor = []
        for f in term.factors:
            fac = self.factors[f]
            if fac.kind == CATEGORICAL:
                per_factor.append(np.eye(len(fac.levels))[values[f]])
            else:
                per_factor.append(values[f])
        return _column_products(per_factor, m)

    def full_dummy_labels(self, term: Term) -> list[str]:
        """Level labels of :meth:`full_dummy_rows` (``"A:T"``; the first factor varies fastest)."""
        cats = [self.factors[f].levels for f in term.factors
                if self.factors[f].kind == CATEGORICAL]
        combos = itertools.product(*reversed(cats))
        return [":".join(reversed(c)) for c in combos]

    # ------------------------------------------------------------- grids
    def level_grid(self) -> dict[str, np.ndarray]:
        """Codes of every combination of the categorical levels (lmerTest's ``expand.grid``).

        The first factor varies fastest, as R's ``expand.grid``.
        """
        cats = [f for f in self.factors.values() if f.kind == CATEGORICAL]
        if not cats:
            return {}
        sizes = [len(f.levels) for f in cats]
        codes = np.array(list(itertools.product(*[range(s) for s in reversed(sizes)])),
                         dtype=np.int64).reshape(-1, len(cats))[:, ::-1]
        return {f.name: codes[:, i] for i, f in enumerate(cats)}

    def mean_grid(self) -> dict[str, np.ndarray]:
        """:meth:`level_grid` with every numerical factor at its mean over the cells."""
        grid = self.level_grid()
        m = _n_rows(grid) if grid else 1
        for f in self.factors.values():
            if f.kind == NUMERICAL:
                grid[f.name] = np.tile(np.asarray(f.mean, dtype=float), (m, 1))
        return grid

    def spanning_grid(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Level combinations with random numerical values, enough rows to span every column.

        On it, linear relations between columns that hold for all factor values
        (such as a design in one coding against another) are determined
        exactly, without the data.
        """
        grid = self.level_grid()
        m = _n_rows(grid) if grid else 1
        copies = max(2, -(-(self.n_columns + 1) // m) + 1)
        grid = {k: np.tile(v, copies) for k, v in grid.items()}
        rng = np.random.default_rng(seed)
        for f in self.factors.values():
            if f.kind == NUMERICAL:
                grid[f.name] = rng.uniform(0.5, 2.0, size=(m * copies, f.n_columns))
        return grid


def _n_rows(values: dict[str, np.ndarray]) -> int:
    return len(next(iter(values.values()))) if values else 1


def _treatment_matrix(C: np.ndarray) -> np.ndarray:
    """Treatment coding with the shape of patsy's contrast ``C``: full or reduced rank."""
    k = C.shape[0]
    return np.eye(k) if C.shape[1] == k else np.eye(k)[:, 1:]


def _column_products(per_factor: list[np.ndarray], m: int) -> np.ndarray:
    """All products of one column per factor, the first factor varying fastest (patsy, R)."""
    out = np.ones((m, 1))
    for block in per_factor:        # later factors vary slower: kron-like, block outermost
        out = (block[:, :, None] * out[:, None, :]).reshape(m, -1)
    return out


def term_structure(design_info: Any, data: Any, exog_names: list[str]) -> dict[str, Any] | None:
    """Read the term structure of a patsy ``DesignInfo`` (as a JSON-serialisable dict).

    ``exog_names`` are the columns the design kept; returns None when a column
    of the formula was dropped (an empty factor level), where rows of the
    design can no longer be rebuilt from the formula.
    """
    names = list(design_info.column_names)
    if names != list(exog_names):
        return None
    factors: dict[str, Factor] = {}
    for factor, finfo in design_info.factor_infos.items():
        key = factor.name()
        if finfo.type == "categorical":
            factors[key] = Factor(key, CATEGORICAL, tuple(str(c) for c in finfo.categories))
        else:
            vals = np.asarray(factor.eval(finfo.state, data), dtype=float).reshape(len(data), -1)
            factors[key] = Factor(key, NUMERICAL, mean=tuple(float(v) for v in vals.mean(axis=0)))
    terms = []
    for term, sl in design_info.term_slices.items():
        subs = tuple(
            Subterm(tuple(f.name() for f in s.factors),
                    {f.name(): np.asarray(c.matrix, dtype=float)
                     for f, c in s.contrast_matrices.items()},
                    int(s.num_columns))
            for s in design_info.term_codings[term])
        terms.append(Term(term.name(), tuple(f.name() for f in term.factors),
                          tuple(range(sl.start, sl.stop)), subs))
    return TermStructure(factors, terms, len(names)).to_info()


def structure_of(info: dict[str, Any]) -> TermStructure:
    """The :class:`TermStructure` stored in a model's ``info``, or a clear error."""
    desc = info.get(TERMS_KEY)
    if not desc:
        raise TermError(
            "this model has no term structure: ANOVA tables and least-squares means need a "
            "model built with MultiGeneMixedLM.from_formula (whose formula columns were all "
            "kept)."
        )
    return TermStructure.from_info(desc)
