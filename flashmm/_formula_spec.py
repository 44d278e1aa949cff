"""What rebuilds a formula model's designs for new cells, without pickle.

A :class:`FormulaSpec` keeps, for a model built by ``from_formula``, the patsy
``DesignInfo`` of every formula (fixed effects, random slopes, variance
components) while the model is in memory, and a JSON description that rebuilds
them after :func:`flashmm.load_results`: the formulas, the group column, and
for every data column the formulas use its kind (categorical with its levels in
order, or numeric with its dtype, plus its distinct values when a formula
treats it as categorical, e.g. ``C(batch)`` of an integer column).

The ``DesignInfo`` is rebuilt by evaluating the formulas on a few synthetic
rows that carry those levels (as pandas categoricals) and checked against the
stored column names and factor levels.  Stateful transforms (``center(x)``,
``standardize(x)``, ``scale(x)``) memorise data statistics that cannot be
written without pickle: :meth:`FormulaSpec.check_saveable` refuses them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ._errors import DesignError

__all__ = ["FormulaSpec", "VC_INTERCEPT", "VC_INDICATOR", "VC_PATSY"]

#: kinds of variance-component formulas
VC_INTERCEPT = "intercept"     # re_formula="1" alongside vc_formula: a group intercept
VC_INDICATOR = "indicator"     # "0 + C(a)" built sparse by _design.indicator_block
VC_PATSY = "patsy"             # any other formula, built by patsy

#: names a formula may use besides the data columns and patsy's builtins (those of
#: the module that evaluates the formulas at the fit, flashmm.model)
NAMESPACE = {"np": np, "numpy": np, "pd": pd}


@dataclass
class FormulaSpec:
    """Formulas of a model and what rebuilds their patsy designs.

    Attributes
    ----------
    formula : str
        Right-hand side of the fixed-effects formula.
    groups : str or None
        Name of the group column of the data.
    re_formula : str or None
        Random-slopes formula (None for a random intercept only).
    vc : dict
        Variance component name -> (kind, formula); see ``VC_*``.
    variables : dict
        Data column -> JSON description (see :func:`describe_column`).
    column_names : dict
        ``"fixed"``, ``"re"`` or ``"vc:<name>"`` -> patsy's column names at the fit.
    infos : dict
        The same keys -> patsy ``DesignInfo`` (built lazily where missing).
    """

    formula: str
    groups: str | None
    re_formula: str | None
    vc: dict[str, tuple[str, str]]
    variables: dict[str, dict[str, Any]]
    column_names: dict[str, list[str]] = field(default_factory=dict)
    infos: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------ building
    @classmethod
    def from_fit(cls, formula: str, data: pd.DataFrame, groups: str | None,
                 re_formula: str | None, vc: dict[str, tuple[str, str]],
                 infos: dict[str, Any]) -> FormulaSpec:
        """The spec of a model just built on ``data`` (``infos``: patsy's DesignInfos)."""
        formulas = [formula] + ([re_formula] if re_formula else []) + [f for _, f in vc.values()]
        categorical = _categorical_names(infos, [f for k, f in vc.values() if k == VC_INDICATOR])
        variables = {}
        for name in sorted(_formula_names(formulas) & {str(c) for c in data.columns}):
            variables[name] = describe_column(data[name], name in categorical)
        return cls(formula, groups, re_formula, dict(vc), variables,
                   {k: list(v.column_names) for k, v in infos.items()}, dict(infos))

    def design_info(self, key: str) -> Any:
        """patsy ``DesignInfo`` of ``"fixed"``, ``"re"`` or ``"vc:<name>"`` (rebuilt if needed)."""
        if key not in self.infos:
            self.infos[key] = self._rebuild(key)
        return self.infos[key]

    def patsy_keys(self) -> list[str]:
        """Keys of the formulas whose columns are built by patsy."""
        return (["fixed"] + (["re"] if self.re_formula is not None else [])
                + [f"vc:{name}" for name, (kind, _) in self.vc.items() if kind == VC_PATSY])

    def formula_of(self, key: str) -> str:
        """The formula behind a design key."""
        if key == "fixed":
            return self.formula
        if key == "re":
            assert self.re_formula is not None
            return self.re_formula
        return self.vc[key[3:]][1]

    def _rebuild(self, key: str) -> Any:
        import patsy

        formula = self.formula_of(key).strip().lstrip("~").strip()
        env = patsy.EvalEnvironment([NAMESPACE])
        try:
            info = patsy.dmatrix(formula, self.synthetic_rows(),
                                 NA_action=patsy.NAAction(NA_types=[]), eval_env=env,
                                 return_type="dataframe").design_info
        except (patsy.PatsyError, NameError) as err:
            raise DesignError(
                f"cannot rebuild the design of formula {formula!r}: "
                f"{str(err).splitlines()[0]}."
            ) from None
        stored = self.column_names.get(key)
        if stored is not None and list(info.column_names) != stored:
            raise DesignError(
                f"the rebuilt design of formula {formula!r} has columns "
                f"{list(info.column_names)[:6]}, not the fitted {stored[:6]}; this formula "
                "cannot be rebuilt from its stored levels."
            )
        return info

    def synthetic_rows(self) -> pd.DataFrame:
        """A few rows carrying every stored level (categoricals) and value."""
        sizes = [len(v.get("levels") or v.get("values") or ()) for v in self.variables.values()]
        n = max(sizes + [2])
        return pd.DataFrame({name: _synthetic_column(desc, n)
                             for name, desc in self.variables.items()})

    # -------------------------------------------------------- persistence
    def check_saveable(self) -> None:
        """Raise DesignError unless the stored description rebuilds the designs.

        Refused: stateful transforms (their state needs pickle), levels that
        are not JSON values, and designs whose rebuilt columns differ.
        """
        for key in self.patsy_keys():
            info = self.design_info(key)
            for factor, finfo in info.factor_infos.items():
                state = getattr(finfo, "state", None) or {}
                if not isinstance(state, dict) or "transforms" not in state:
                    raise DesignError(
                        f"formula {self.formula_of(key)!r}: factor {factor.name()!r} is not a "
                        "plain patsy expression and cannot be saved without pickle."
                    )
                if state["transforms"]:
                    raise DesignError(
                        f"formula {self.formula_of(key)!r} uses the stateful transform in "
                        f"{factor.name()!r} (center / standardize / scale remember the mean "
                        "and SD of the fitting data, which cannot be saved without pickle). "
                        "Compute the transformed covariate as a column of the data and refit, "
                        "or save with results.save(path, design=False) (no predictions "
                        "from new covariates after loading)."
                    )
        for name, desc in self.variables.items():
            try:
                json.dumps(desc)
            except TypeError:
                raise DesignError(
                    f"data column {name!r} has levels that are not strings or numbers "
                    f"({desc.get('levels', desc.get('values'))!r:.80}); they cannot be saved "
                    "as JSON. Convert the column to strings and refit, or save with "
                    "design=False."
                ) from None
        FormulaSpec.from_json(self.to_json())     # what loading will do: refuse now, not then

    def to_json(self) -> dict[str, Any]:
        """JSON description (without the DesignInfo objects)."""
        return {"formula": self.formula, "groups": self.groups, "re_formula": self.re_formula,
                "vc": {k: list(v) for k, v in self.vc.items()}, "variables": self.variables,
                "column_names": self.column_names}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FormulaSpec:
        """Spec from :meth:`to_json`; the DesignInfos are rebuilt and checked now."""
        spec = cls(str(d["formula"]), d.get("groups"), d.get("re_formula"),
                   {str(k): (str(v[0]), str(v[1])) for k, v in dict(d.get("vc") or {}).items()},
                   dict(d.get("variables") or {}),
                   {str(k): list(v) for k, v in dict(d.get("column_names") or {}).items()})
        for key in spec.column_names:
            spec.design_info(key)
        return spec


def describe_column(col: pd.Series, categorical_use: bool) -> dict[str, Any]:
    """JSON description of one data column: its kind, levels or dtype (and values)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return {"kind": "categorical", "levels": _plain(list(col.cat.categories))}
    if col.dtype.kind in "OUSb":
        values = pd.unique(col.dropna())
        try:
            levels = sorted(values)
        except TypeError:            # unorderable mixed labels: patsy's order is its own
            levels = list(values)
        return {"kind": "categorical", "levels": _plain(levels)}
    desc: dict[str, Any] = {"kind": "numeric", "dtype": str(col.dtype)}
    if categorical_use:
        desc["values"] = _plain(sorted(pd.unique(col.dropna())))
    return desc


def _plain(values: list[Any]) -> list[Any]:
    """numpy scalars as Python scalars (JSON-serialisable)."""
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def _synthetic_column(desc: dict[str, Any], n: int) -> Any:
    if desc["kind"] == "categorical":
        levels = list(desc["levels"])
        return pd.Categorical([levels[i % len(levels)] for i in range(n)], categories=levels)
    values = desc.get("values")
    if values:
        return np.array([values[i % len(values)] for i in range(n)], dtype=desc["dtype"])
    return np.ones(n, dtype=desc["dtype"])


def _formula_names(formulas: list[str]) -> set[str]:
    """Every name used by the formulas' factors."""
    import patsy
    from patsy.eval import ast_names

    names: set[str] = set()
    for f in formulas:
        desc = patsy.ModelDesc.from_formula(f.strip().lstrip("~").strip() or "1")
        for term in desc.rhs_termlist:
            for factor in term.factors:
                names.update(ast_names(factor.code))
    return names


def _categorical_names(infos: dict[str, Any], indicator_formulas: list[str]) -> set[str]:
    """Names used inside a categorical factor (their values are the levels)."""
    from patsy.eval import ast_names

    names: set[str] = set(_formula_names(indicator_formulas)) if indicator_formulas else set()
    for info in infos.values():
        for factor, finfo in info.factor_infos.items():
            if finfo.type == "categorical":
                names.update(ast_names(factor.code))
    return names
