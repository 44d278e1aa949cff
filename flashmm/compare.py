"""Method-comparison studies: several DE methods on the same data, scored against the truth.

A :class:`Study` is a cells x genes count matrix with the truth (which genes
are differentially expressed, DE) and the names of its condition, donor and
(optional) cell-type columns; :meth:`SimulationDesign.simulate` makes one from
:func:`~flashmm.datasets.simulate_rnaseq`, :meth:`Study.from_anndata` from a
user's AnnData and truth table.  :func:`compare` runs methods from a registry
on one study and :func:`run_studies` on many simulated studies (in parallel
processes, or on a Dask cluster).  Each method returns one p-value per gene
and test (the treatment effect, within each cell type when the study has cell
types); the scores (:func:`score_pvalues`) are

* type-I error at 0.05, 0.01 and 0.001 among the null tests,
* power and false discovery proportion (FDP) at a Benjamini-Hochberg FDR,
* the largest power reachable with an FDP at most the FDR (``power_at_fdp``),
  which compares methods at equal FDP whatever their calibration,
* the AUC (DE against null tests ranked by p-value),
* wall time and peak memory (``tracemalloc``) of the method.

Methods are entries of a registry (:func:`register_method`); one that needs
a feature missing from this installation is listed by :func:`methods_table`
with the reason and refused by name, never skipped silently.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
import tracemalloc
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats as sps

from ._anndata import is_anndata
from ._errors import DataError
from .limma import bh_adjust

__all__ = [
    "Study", "SimulationDesign", "Method", "MethodOutput", "Comparison",
    "register_method", "available_methods", "methods_table",
    "compare", "run_studies", "score_pvalues", "power_at_fdp", "power_fdp_curve",
]

#: Type-I error levels reported for the null genes.
ALPHAS = (0.05, 0.01, 0.001)
#: Columns of the working cell table every method reads (see :class:`Study`).
DONOR, CELLTYPE, TREATED = "donor", "celltype", "treated"


# ----------------------------------------------------------------- studies
@dataclass(eq=False)
class Study:
    """Counts, truth and design of one comparison study (cells x genes).

    Build it with :meth:`from_anndata` or :meth:`SimulationDesign.simulate`
    rather than directly.

    A study has one or more *tests*: the treatment effect, or with cell types
    the treatment effect within each cell type.  Every method fits the same
    fixed effects, ``~ treated`` or ``~ C(celltype) + treated_1 + ... +
    treated_K`` (``treated_k``: treated cells of the k-th cell type, i.e. the
    model ``~ celltype + celltype:treated``), and returns one p-value per
    gene and test.

    Attributes
    ----------
    counts : anndata.AnnData
        Cells x genes raw counts (sparse or dense) of the two conditions, with
        the genes kept by the count filter.  ``obs`` holds the working columns
        ``donor`` (str), ``treated`` (0.0 / 1.0) and, with cell types,
        ``celltype`` (str) and the indicators ``treated_1`` .. ``treated_K``.
    is_de : ndarray of bool (n_genes, n_tests)
        The truth: True where a gene is differentially expressed in a test.
    tests : list of str
        The test labels: the cell types, or the condition's name.
    terms : list of str
        The coefficient of each test in the fixed effects.
    condition, reference, treated : str
        The condition column of the original ``obs`` and its compared levels.
    info : dict
        How the study was made (simulation parameters, filter).
    """

    counts: Any
    is_de: np.ndarray
    tests: list[str]
    terms: list[str]
    condition: str
    reference: str
    treated: str
    info: dict = field(default_factory=dict)

    @property
    def genes(self) -> list[str]:
        """Gene names, the rows of :attr:`is_de` and of every method's p-values."""
        return [str(g) for g in self.counts.var_names]

    @property
    def has_celltypes(self) -> bool:
        """Whether the cells have cell types (tests per cell type, pseudobulk by donor and type)."""
        return CELLTYPE in self.counts.obs.columns

    @property
    def formula(self) -> str:
        """The fixed effects every method fits."""
        return "~ " + " + ".join(([f"C({CELLTYPE})"] if self.has_celltypes else []) + self.terms)

    @classmethod
    def from_anndata(cls, adata: Any, truth: Any, *, condition: str, sample: str,
                     celltype: str | None = None, treated: str | None = None,
                     reference: str | None = None, min_counts: int = 10,
                     info: dict | None = None) -> Study:
        """A study from a user's cells x genes counts and a truth table.

        Parameters
        ----------
        adata : anndata.AnnData
            Cells x genes raw counts (``X``), in memory.
        truth : Series, mapping, DataFrame or array_like of bool
            Gene -> is DE (a Series or mapping matched by gene name, covering
            every gene; an array in ``var_names`` order).  With ``celltype``, a
            DataFrame genes x cell types gives the truth per cell type; a
            per-gene truth then holds in every cell type.
        condition : str
            The ``obs`` column whose levels are compared.
        sample : str
            The ``obs`` column of the donors (the replicates of the condition).
        celltype : str, optional
            An ``obs`` column of cell types: the treatment is then tested
            within each cell type and the pseudobulk is by donor and cell type.
        treated, reference : str, optional
            The two compared levels of ``condition``; needed when it has more
            than two (cells of other levels are dropped).  Default: its two
            levels in category (or sorted) order, the second treated.
        min_counts : int
            Genes with fewer counts in total over the kept cells are dropped
            before any method runs (all methods see the same genes).
        info : dict, optional
            Stored as :attr:`info`.

        Returns
        -------
        Study
        """
        if not is_anndata(adata):
            raise DataError(f"a study needs an AnnData of cells x genes counts, got "
                            f"{type(adata).__name__}.")
        obs = adata.obs
        for what, col in (("condition", condition), ("sample", sample), ("celltype", celltype)):
            if col is not None and col not in obs.columns:
                raise DataError(f"{what}={col!r} is not a column of adata.obs; its columns are "
                                f"{list(obs.columns)}.")
        reference, treated = _compared_levels(obs[condition], condition, reference, treated)
        labels = obs[condition].astype(str).to_numpy()
        cells = np.flatnonzero((labels == reference) | (labels == treated))
        work = pd.DataFrame({DONOR: obs[sample].astype(str).to_numpy()[cells],
                             TREATED: (labels[cells] == treated).astype(float)},
                            index=obs.index[cells].astype(str))
        if celltype is None:
            tests, terms = [condition], [TREATED]
        else:
            types = obs[celltype].astype(str).to_numpy()[cells]
            tests = sorted(set(types))
            if len(tests) < 2:
                raise DataError(f"celltype={celltype!r} has one level; leave celltype out.")
            terms = [f"{TREATED}_{k}" for k in range(1, len(tests) + 1)]
            work[CELLTYPE] = types
            for test, term in zip(tests, terms, strict=True):
                work[term] = work[TREATED] * (types == test)
        genes = [str(g) for g in adata.var_names]
        is_de = _truth_matrix(truth, genes, tests if celltype is not None else None)
        X = adata.X
        if X is None or not (sp.issparse(X) or isinstance(X, np.ndarray)):
            raise DataError("the study needs adata.X in memory (dense or sparse), not backed; "
                            "load it with adata.to_memory().")
        X = X[cells]
        keep = np.asarray(X.sum(axis=0)).ravel() >= min_counts
        if keep.sum() < 2:
            raise DataError(f"only {int(keep.sum())} genes have at least min_counts={min_counts} "
                            "counts; lower min_counts.")
        import anndata

        X = X[:, keep]
        counts = anndata.AnnData(X=sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X),
                                 obs=work, var=pd.DataFrame(index=adata.var_names[keep]))
        details = dict(info or {})
        details.update({"condition": condition, "sample": sample, "celltype": celltype,
                        "min_counts": int(min_counts), "genes_dropped": int((~keep).sum())})
        return cls(counts=counts, is_de=is_de[keep], tests=tests, terms=terms,
                   condition=condition, reference=reference, treated=treated, info=details)

    @classmethod
    def from_simulation(cls, adata: Any, *, min_counts: int = 10, info: dict | None = None) -> Study:
        """A study from the output of :func:`~flashmm.datasets.simulate_rnaseq`.

        The condition is ``trt`` (treated level from ``uns["simulation"]``),
        the donors ``sam``, the cell types ``cls`` (when there are at least
        two) and the truth ``var["de"]`` within ``var["de_celltype"]``.
        """
        if not is_anndata(adata) or "simulation" not in adata.uns or "de" not in adata.var:
            raise DataError("from_simulation needs the AnnData of flashmm.datasets.simulate_rnaseq "
                            "(var['de'], uns['simulation']); use Study.from_anndata otherwise.")
        sim = adata.uns["simulation"]
        conditions = [str(c) for c in sim["conditions"]]
        de = adata.var["de"].to_numpy(dtype=bool)
        if adata.obs["cls"].nunique() > 1:
            types = sorted(adata.obs["cls"].astype(str).unique())
            where = adata.var["de_celltype"].astype(str).to_numpy()
            truth: Any = pd.DataFrame({t: de & (where == t) for t in types}, index=adata.var_names)
            celltype = "cls"
        else:
            truth, celltype = de, None
        return cls.from_anndata(adata, truth, condition="trt", sample="sam", celltype=celltype,
                                treated=str(sim["treated"]), reference=conditions[0],
                                min_counts=min_counts, info=info)

    def cells(self) -> Any:
        """A new AnnData sharing this study's matrix and obs (methods may write to its ``uns``)."""
        import anndata

        return anndata.AnnData(X=self.counts.X, obs=self.counts.obs, var=self.counts.var)

    def log_normalised(self) -> Any:
        """Cells x genes ``log1p(counts * mean(L) / L)`` (L: cell totals), sparse if the counts are."""
        import anndata

        X = self.counts.X
        lib = np.asarray(X.sum(axis=1), dtype=float).ravel()
        scale = np.divide(lib.mean(), lib, out=np.zeros_like(lib), where=lib > 0)
        if sp.issparse(X):
            Y = sp.csr_matrix(sp.diags(scale) @ X)
            Y.data = np.log1p(Y.data)
        else:
            Y = np.log1p(np.asarray(X, dtype=float) * scale[:, None])
        return anndata.AnnData(X=Y, obs=self.counts.obs, var=self.counts.var)

    def pseudobulk(self) -> Any:
        """Count sums per donor (and cell type); ``obs`` keeps the treatment columns."""
        from .pseudobulk import pseudobulk

        by = [DONOR, CELLTYPE] if self.has_celltypes else [DONOR]
        return pseudobulk(self.cells(), by=by + [TREATED])

    def __repr__(self) -> str:
        n, G = self.counts.shape
        donors = self.counts.obs[DONOR].nunique()
        return (f"Study(cells={n}, genes={G}, tests={self.tests}, DE={int(self.is_de.sum())}, "
                f"donors={donors}, {self.condition}: {self.treated} vs {self.reference})")


def _compared_levels(values: pd.Series, name: str, reference: str | None,
                     treated: str | None) -> tuple[str, str]:
    """The reference and treated levels of the condition column (as strings)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        levels = [str(c) for c in values.cat.remove_unused_categories().cat.categories]
    else:
        levels = sorted(values.astype(str).unique())
    if reference is None and treated is None:
        if len(levels) != 2:
            raise DataError(f"condition {name!r} has {len(levels)} levels {levels}; give "
                            "treated= and reference= to choose the two compared.")
        reference, treated = levels
    elif reference is None or treated is None:
        others = [lv for lv in levels if lv != (treated if reference is None else reference)]
        if len(others) != 1:
            raise DataError(f"give both treated= and reference= (condition {name!r} has levels "
                            f"{levels}).")
        reference, treated = (others[0], treated) if reference is None else (reference, others[0])
    for lv in (reference, treated):
        if lv not in levels:
            raise DataError(f"level {lv!r} is not in condition {name!r} (levels {levels}).")
    if reference == treated:
        raise DataError(f"treated and reference are the same level {treated!r}.")
    return str(reference), str(treated)


def _truth_matrix(truth: Any, genes: list[str], tests: list[str] | None) -> np.ndarray:
    """The truth as a bool (genes, tests) matrix; labelled truths must cover every gene."""
    if isinstance(truth, dict):
        truth = pd.Series(truth)
    if isinstance(truth, pd.DataFrame):
        if tests is None:
            if truth.shape[1] != 1:
                raise DataError("without celltype= the truth is one column (gene -> is DE); "
                                f"the table has columns {list(truth.columns)}.")
            truth = truth.iloc[:, 0]
        else:
            truth = truth.rename(columns=str)
            missing = [t for t in tests if t not in truth.columns]
            if missing:
                raise DataError(f"the truth table has no column for cell type(s) {missing}; its "
                                f"columns are {list(truth.columns)}.")
            return np.column_stack([_truth_matrix(truth[t], genes, None)[:, 0] for t in tests])
    if isinstance(truth, pd.Series) and not isinstance(truth.index, pd.RangeIndex):
        truth = truth.set_axis(truth.index.astype(str))
        missing = [g for g in genes if g not in truth.index]
        if missing:
            raise DataError(f"the truth table lacks {len(missing)} gene(s), e.g. {missing[:3]}; "
                            "it needs gene -> is DE for every gene of the AnnData.")
        truth = truth.loc[genes]
    values = np.asarray(truth)
    if values.shape != (len(genes),):
        raise DataError(f"the truth needs one value per gene ({len(genes)}), got shape "
                        f"{values.shape}.")
    if values.dtype != bool:
        if not np.isin(values, [0, 1]).all():
            raise DataError("the truth must be boolean (or 0/1): True for the DE genes.")
        values = values.astype(bool)
    return np.repeat(values[:, None], 1 if tests is None else len(tests), axis=1)


@dataclass(frozen=True)
class SimulationDesign:
    """Parameters of simulated studies (:func:`~flashmm.datasets.simulate_rnaseq`).

    Donors are nested in two conditions (``n_per_arm`` each); every donor has
    ``cells_per_donor`` cells split evenly over ``n_celltypes`` cell types;
    ``de_fraction`` of the genes are DE, each in one cell type, with
    ``|log fold change|`` uniform in ``[min_beta, max_beta]`` (natural log)
    and a random sign; donors have a random effect of variance
    ``var_random_effects`` on the log scale.
    """

    n_per_arm: int = 6
    n_genes: int = 1000
    cells_per_donor: int = 100
    n_celltypes: int = 2
    de_fraction: float = 0.1
    min_beta: float = 0.5
    max_beta: float = 1.5
    var_random_effects: float = 0.1
    min_counts: int = 10

    @property
    def label(self) -> str:
        """``"6 vs 6"`` etc."""
        return f"{self.n_per_arm} vs {self.n_per_arm}"

    def simulate(self, seed: Any = None) -> Study:
        """One simulated study; the same seed gives the same study.

        Parameters
        ----------
        seed : int, sequence of int or numpy.random.Generator
            Passed to :func:`numpy.random.default_rng`.
        """
        from .datasets import simulate_rnaseq

        n_donors = 2 * self.n_per_arm
        adata = simulate_rnaseq(
            n_genes=self.n_genes, n_cells=n_donors * self.cells_per_donor, n_samples=n_donors,
            n_celltypes=self.n_celltypes, n_de_genes=round(self.de_fraction * self.n_genes),
            min_beta=self.min_beta, max_beta=self.max_beta,
            var_random_effects=self.var_random_effects, seed=np.random.default_rng(seed))
        return Study.from_simulation(adata, min_counts=self.min_counts,
                                     info={"design": dataclasses.asdict(self)})


# ------------------------------------------------------------------ methods
@dataclass
class MethodOutput:
    """What a method returns: one p-value per gene and test, and notes.

    Attributes
    ----------
    pvalue : DataFrame, Series or ndarray
        Genes x tests: a DataFrame indexed by gene name with the
        :attr:`Study.tests` as columns (missing genes count as failed), a
        Series for a study with one test, or an array in :attr:`Study.genes`
        order.  NaN marks a gene the method could not test.
    info : dict
        Scalars worth reporting (e.g. a consensus correlation); they become
        columns ``info_<key>`` of the table.
    """

    pvalue: Any
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered DE method.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"cells_lmm"``.
    label : str
        Human-readable name for tables and plots.
    fit : callable
        ``fit(study) -> MethodOutput`` (or a Series/array of p-values).
    requires : callable, optional
        ``requires() -> str | None``: None if the method can run in this
        installation, else the reason (e.g. a missing function).
    applies : callable, optional
        ``applies(study) -> str | None``: None if the method makes sense for
        the study, else the reason.
    """

    name: str
    label: str
    fit: Callable[[Study], Any]
    requires: Callable[[], str | None] | None = None
    applies: Callable[[Study], str | None] | None = None

    def missing(self) -> str | None:
        """Why the method cannot run here (None when it can)."""
        return None if self.requires is None else self.requires()


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, label: str, fit: Callable[[Study], Any], *,
                    requires: Callable[[], str | None] | None = None,
                    applies: Callable[[Study], str | None] | None = None,
                    replace: bool = False) -> Method:
    """Add a method to the registry used by :func:`compare` and :func:`run_studies`.

    Parameters
    ----------
    name, label, fit, requires, applies
        See :class:`Method`.
    replace : bool
        Allow replacing a registered method of the same name.

    Returns
    -------
    Method

    Notes
    -----
    Worker processes of :func:`run_studies` find methods by name, so a method
    registered in a script is known to them only with the ``fork`` start
    method (Linux); register it in an imported module otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> import flashmm.compare as fc
    >>> def mean_rank(study):          # a toy method: p-values from the mean count
    ...     m = np.asarray(study.counts.X.mean(axis=0)).ravel()
    ...     p = 1.0 - m / (m.max() + 1.0)
    ...     return np.repeat(p[:, None], len(study.tests), axis=1)     # genes x tests
    >>> _ = fc.register_method("toy", "toy ranking", mean_rank, replace=True)
    >>> bool(fc.methods_table().loc["toy", "available"])
    True
    """
    if name in _REGISTRY and not replace:
        raise ValueError(f"method {name!r} is already registered; pass replace=True to replace it.")
    method = Method(name, label, fit, requires, applies)
    _REGISTRY[name] = method
    return method


def available_methods() -> list[str]:
    """Names of the registered methods that can run in this installation."""
    return [m.name for m in _REGISTRY.values() if m.missing() is None]


def methods_table() -> pd.DataFrame:
    """Every registered method: ``label``, ``available`` and the ``reason`` when it is not."""
    rows = [{"name": m.name, "label": m.label, "available": m.missing() is None,
             "reason": m.missing() or ""} for m in _REGISTRY.values()]
    return pd.DataFrame(rows).set_index("name")


def _resolve_methods(methods: Sequence[str] | str | None, study: Study | None) -> list[Method]:
    """The requested methods, each checked; ``None``: every available method that applies."""
    if methods is None:
        chosen = [m for m in _REGISTRY.values() if m.missing() is None]
        if study is not None:
            left_out = [m.name for m in chosen if m.applies is not None and m.applies(study)]
            if left_out:
                warnings.warn(f"methods {left_out} do not apply to this study and are left out: "
                              + "; ".join(f"{n}: {_REGISTRY[n].applies(study)}" for n in left_out),
                              stacklevel=3)
            chosen = [m for m in chosen if m.name not in left_out]
        return chosen
    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise ValueError("methods= is empty; give method names (see methods_table()).")
    if len(set(names)) != len(names):
        raise ValueError(f"methods= lists a method more than once: {names}.")
    return [_checked_method(name, study) for name in names]


def _checked_method(name: str, study: Study | None) -> Method:
    """The registered method ``name``, refused when unknown, unavailable or not applicable."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {list(_REGISTRY)} "
                         "(see flashmm.compare.methods_table()).")
    method = _REGISTRY[name]
    reason = method.missing()
    if reason is not None:
        raise ValueError(f"method {name!r} ({method.label}) is not available in this "
                         f"installation: {reason}")
    why = None if study is None or method.applies is None else method.applies(study)
    if why is not None:
        raise ValueError(f"method {name!r} ({method.label}) does not apply to this study: {why}")
    return method


# --- the methods available now ----------------------------------------------------------
def _limma_pvalues(fit: Any, study: Study) -> pd.DataFrame:
    """Moderated-t p-values of the tests' coefficients, genes x tests."""
    return pd.DataFrame({test: fit.table(term)["P.Value"]
                         for test, term in zip(study.tests, study.terms, strict=True)})


def _cells_lmm(study: Study, df_method: str = "satterthwaite") -> MethodOutput:
    """Random donor intercept on the log-normalised cells, REML, t tests of the treatment terms."""
    from .model import MultiGeneMixedLM

    res = MultiGeneMixedLM.from_formula(study.formula, study.log_normalised(), groups=DONOR).fit()
    test = res.t_test(dict(zip(study.tests, study.terms, strict=True)), df_method=df_method)
    p = test.pvalue.copy()
    p[~res.converged.to_numpy()] = np.nan
    return MethodOutput(p, {"median_df": float(np.nanmedian(test.df_denom.to_numpy()))})


def _cells_ols(study: Study) -> MethodOutput:
    """limma's lmFit + eBayes on the log-normalised cells, each cell a replicate."""
    from .limma import e_bayes, lm_fit

    return MethodOutput(_limma_pvalues(e_bayes(lm_fit(study.log_normalised(), study.formula)),
                                       study))


def _cells_limma_block(study: Study) -> MethodOutput:
    """lmFit with the donors as blocks (consensus duplicate_correlation) on the cells."""
    from .limma import duplicate_correlation, e_bayes, lm_fit

    cells = study.log_normalised()
    rho = duplicate_correlation(cells, study.formula, block=DONOR).cor
    fit = e_bayes(lm_fit(cells, study.formula, block=DONOR, correlation=rho))
    return MethodOutput(_limma_pvalues(fit, study), {"correlation": float(rho)})


def _pseudobulk_voom(study: Study) -> MethodOutput:
    """Sums per donor (and cell type), voom, lmFit, eBayes (samples independent)."""
    from .limma import e_bayes, lm_fit
    from .voom import voom

    v = voom(study.pseudobulk(), study.formula)
    return MethodOutput(_limma_pvalues(e_bayes(lm_fit(v)), study))


def _pseudobulk_voom_dupcor(study: Study) -> MethodOutput:
    """limma's voom + duplicateCorrelation workflow, blocks = donors (two rounds)."""
    from .limma import duplicate_correlation, e_bayes, lm_fit
    from .voom import voom

    pb = study.pseudobulk()
    v = voom(pb, study.formula)
    rho = duplicate_correlation(v, block=DONOR).cor
    v = voom(pb, study.formula, block=DONOR, correlation=rho)
    rho = duplicate_correlation(v, block=DONOR).cor
    fit = e_bayes(lm_fit(v, block=DONOR, correlation=rho))
    return MethodOutput(_limma_pvalues(fit, study), {"correlation": float(rho)})


def _pseudobulk_dream(study: Study) -> MethodOutput:
    """variancePartition's dream: voom_with_dream_weights, then the weighted LMM, Satterthwaite df.

    The donor random intercept is fitted to the pseudobulk samples with voom's
    precision weights from the mixed model (``lmer(weights = w)`` per gene);
    genes the mixed model cannot fit are left out (counted as failed).
    """
    from .model import MultiGeneMixedLM
    from .voom import voom_with_dream_weights

    pb = study.pseudobulk()
    v = voom_with_dream_weights(pb, f"{study.formula} + (1 | {DONOR})")
    model = MultiGeneMixedLM.from_formula(study.formula, pb.obs, endog=v.E.T, groups=DONOR,
                                          weights=v, gene_names=v.genes)
    res = model.fit()
    test = res.t_test(dict(zip(study.tests, study.terms, strict=True)))
    p = test.pvalue.copy()
    p[~res.converged.to_numpy()] = np.nan
    return MethodOutput(p, {"median_df": float(np.nanmedian(test.df_denom.to_numpy()))})


def _several_samples_per_donor(study: Study) -> str | None:
    """duplicate_correlation by donor needs several pseudobulk samples per donor."""
    if not study.has_celltypes:
        return ("the pseudobulk has one sample per donor (the study has no cell types), so "
                "there is no within-donor correlation to estimate; use 'pb_voom'.")
    return None


def _cells_lmm_kenward_roger(study: Study) -> MethodOutput:
    """:func:`_cells_lmm` with Kenward-Roger df."""
    return _cells_lmm(study, df_method="kenward-roger")


register_method("cells_lmm", "cell-level LMM (Satterthwaite df)", _cells_lmm)
register_method("cells_lmm_kr", "cell-level LMM (Kenward-Roger df)", _cells_lmm_kenward_roger)
register_method("cells_ols", "OLS on cells (limma eBayes)", _cells_ols)
register_method("cells_limma_block", "cells, limma block + duplicate_correlation",
                _cells_limma_block)
register_method("pb_voom", "pseudobulk limma-voom", _pseudobulk_voom)
register_method("pb_voom_dupcor", "pseudobulk limma-voom + duplicate_correlation",
                _pseudobulk_voom_dupcor, applies=_several_samples_per_donor)
register_method("pb_dream", "pseudobulk dream (voom_with_dream_weights + weighted LMM)",
                _pseudobulk_dream, applies=_several_samples_per_donor)


# ------------------------------------------------------------------ scores
def score_pvalues(pvalue: Any, is_de: Any, *, fdr: float = 0.05,
                  alphas: Sequence[float] = ALPHAS) -> dict[str, float]:
    """Scores of one method's p-values against the truth.

    Parameters
    ----------
    pvalue : array_like (n,)
        p-values of n tests (genes, or gene x cell type pairs); NaN for the
        tests a method could not do.
    is_de : array_like of bool (n,)
        The truth.
    fdr : float
        Benjamini-Hochberg level of the discoveries.
    alphas : sequence of float
        Levels of the type-I error.

    Returns
    -------
    dict
        ``type1_<alpha>``: share of the tested null genes with ``p < alpha``;
        ``power``: share of all DE genes with BH-adjusted p below ``fdr``
        (untested DE genes are not found); ``fdp``: share of the discoveries
        that are null genes (0 without discoveries); ``discoveries``;
        ``power_at_fdp``: :func:`power_at_fdp` at ``fdr``; ``auc``: the
        probability that a DE gene has a smaller p-value than a null gene (ties
        count 1/2, untested genes rank last); ``n_failed``: genes with NaN.
    """
    p = np.asarray(pvalue, dtype=float)
    de = np.asarray(is_de, dtype=bool)
    if p.shape != de.shape or p.ndim != 1:
        raise ValueError(f"pvalue and is_de must be vectors of one length, got {p.shape} "
                         f"and {de.shape}.")
    ok = np.isfinite(p)
    null = ok & ~de
    out: dict[str, float] = {}
    for a in alphas:
        out[f"type1_{a:g}"] = float(np.mean(p[null] < a)) if null.any() else float("nan")
    found = np.zeros(p.size, dtype=bool)
    found[ok] = bh_adjust(p[ok]) < fdr
    n_found = int(found.sum())
    out["power"] = float(found[de].mean()) if de.any() else float("nan")
    out["fdp"] = float((found & ~de).sum() / n_found) if n_found else 0.0
    out["discoveries"] = n_found
    out["power_at_fdp"] = power_at_fdp(p, de, fdr)
    out["auc"] = _auc(np.where(ok, p, np.inf), de)
    out["n_failed"] = int((~ok).sum())
    return out


def _auc(p: np.ndarray, de: np.ndarray) -> float:
    """Mann-Whitney AUC of -p for DE against null genes (ties 1/2)."""
    n1, n0 = int(de.sum()), int((~de).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = sps.rankdata(-p)                  # large rank = small p
    return float((ranks[de].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _ranked_hits(p: np.ndarray, de: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Power and FDP of every p-value cut-off (genes with NaN never called, ties called together).

    Power is out of all DE genes, untested ones included.
    """
    ok = np.isfinite(p)
    ps, hits = p[ok], de[ok]
    order = np.argsort(ps, kind="stable")
    ps, hits = ps[order], hits[order]
    tp = np.cumsum(hits)
    k = np.arange(1, ps.size + 1)
    last = np.r_[ps[1:] != ps[:-1], True] if ps.size else np.zeros(0, dtype=bool)
    n_de = max(int(de.sum()), 1)
    return (tp / n_de)[last], ((k - tp) / k)[last]


def power_at_fdp(pvalue: Any, is_de: Any, level: float = 0.05) -> float:
    """Largest power over p-value cut-offs whose observed FDP is at most ``level``.

    The comparison of methods "at equal FDP": it uses the ranking of the genes
    only, not the calibration of the p-values.  Genes with NaN are never
    called; tied p-values are called together.  0 when no cut-off qualifies,
    NaN without DE genes.
    """
    p = np.asarray(pvalue, dtype=float)
    de = np.asarray(is_de, dtype=bool)
    if not de.any():
        return float("nan")
    power, fdp = _ranked_hits(p, de)
    return float(power[fdp <= level].max(initial=0.0))


def power_fdp_curve(pvalues: pd.DataFrame, grid: Sequence[float] | None = None) -> pd.DataFrame:
    """Mean power against observed FDP, per design and method, over the datasets.

    For each dataset the power at FDP ``x`` is the largest power of a cut-off
    with FDP at most ``x`` (:func:`power_at_fdp`); the curve is its mean over
    the datasets, at the points of ``grid``.

    Parameters
    ----------
    pvalues : DataFrame
        :attr:`Comparison.pvalues` (columns ``design, dataset, method, pvalue, is_de``).
    grid : sequence of float, optional
        FDP values (default 0 to 1 by 0.005).

    Returns
    -------
    DataFrame
        ``design, method, label, fdp, power``.
    """
    grid = np.linspace(0.0, 1.0, 201) if grid is None else np.asarray(grid, dtype=float)
    rows = []
    for (design, method), part in pvalues.groupby(["design", "method"], sort=False):
        curves = []
        for _, one in part.groupby("dataset", sort=True):
            p, de = one["pvalue"].to_numpy(float), one["is_de"].to_numpy(bool)
            power, fdp = _ranked_hits(p, de)
            curves.append([power[fdp <= x].max(initial=0.0) for x in grid])
        label = part["label"].iloc[0] if "label" in part else method
        rows.append(pd.DataFrame({"design": design, "method": method, "label": label, "fdp": grid,
                                  "power": np.mean(curves, axis=0)}))
    return pd.concat(rows, ignore_index=True)


# ------------------------------------------------------------------ running
@dataclass(eq=False)
class Comparison:
    """Scores and p-values of methods run on one or more studies.

    Attributes
    ----------
    table : DataFrame
        One row per (design, dataset, method): the scores of
        :func:`score_pvalues`, ``seconds`` (wall time of the method),
        ``peak_mib`` (peak memory the method allocated, from a separate run
        under tracemalloc) and ``seconds_traced`` (that run's time), ``info_*``
        columns from the methods, ``warnings`` (number raised).
    pvalues : DataFrame
        Tidy p-values, one row per gene and test: ``design, dataset, method,
        label, gene, test, pvalue, is_de``.
    settings : dict
        The options of the run.
    """

    table: pd.DataFrame
    pvalues: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Scores averaged over the datasets per design and method (time, memory: medians)."""
        score_cols = [c for c in self.table.columns
                      if c.startswith("type1_") or c in ("power", "fdp", "power_at_fdp", "auc")]
        grouped = self.table.groupby(["design", "method"], sort=False)
        out = grouped[score_cols].mean()
        for col in ("seconds", "seconds_traced", "peak_mib"):
            if col in self.table:
                out[col] = grouped[col].median()
        out.insert(0, "label", grouped["label"].first())
        out.insert(1, "datasets", grouped.size())
        return out.reset_index()

    def power_fdp_curve(self, grid: Sequence[float] | None = None) -> pd.DataFrame:
        """:func:`power_fdp_curve` of these p-values."""
        return power_fdp_curve(self.pvalues, grid)


def _traced_run(method: Method, study: Study) -> tuple[float, float]:
    """Peak memory (MiB) the method allocates above what is allocated before it (tracemalloc),
    and the wall time of this traced run (seconds)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            method.fit(study)
            seconds = time.perf_counter() - t0
        return (tracemalloc.get_traced_memory()[1] - base) / 2**20, seconds
    finally:
        if started:
            tracemalloc.stop()


def _pvalue_matrix(p: Any, study: Study, name: str) -> np.ndarray:
    """A method's p-values as a (genes, tests) float matrix aligned with the study."""
    genes = pd.Index(study.genes)
    if isinstance(p, pd.Series):
        p = p.to_frame(study.tests[0]) if len(study.tests) == 1 else p
    if isinstance(p, pd.DataFrame):
        missing = [t for t in study.tests if t not in p.columns]
        if missing:
            raise ValueError(f"method {name!r} returned no p-values for the test(s) {missing}.")
        p = p.reindex(index=genes, columns=study.tests)
    p = np.asarray(p, dtype=float)
    if p.ndim == 1:
        p = p[:, None]
    if p.shape != study.is_de.shape:
        raise ValueError(f"method {name!r} returned p-values of shape {p.shape}; the study has "
                         f"{study.is_de.shape} (genes, tests).")
    return p


def _run_method(method: Method, study: Study, memory: bool) -> tuple[np.ndarray, dict]:
    """Run one method: its p-values (genes, tests), wall time, peak memory and notes.

    With ``memory`` the method first runs under tracemalloc (its overhead would
    distort the time, and the run warms the caches); the timed run comes
    second, without tracing, and its output is the one scored.
    """
    row: dict[str, Any] = {}
    if memory:
        row["peak_mib"], row["seconds_traced"] = _traced_run(method, study)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        out = method.fit(study)
        row["seconds"] = time.perf_counter() - t0
    out = out if isinstance(out, MethodOutput) else MethodOutput(out)
    row["warnings"] = len(caught)
    row.update({f"info_{k}": v for k, v in out.info.items()})
    return _pvalue_matrix(out.pvalue, study, method.name), row


def compare(study: Study, methods: Sequence[str] | str | None = None, *, fdr: float = 0.05,
            alphas: Sequence[float] = ALPHAS, memory: bool = True, design: str = "study",
            dataset: int = 0) -> Comparison:
    """Run methods on one study and score them against its truth.

    Parameters
    ----------
    study : Study
        Counts and truth (:meth:`Study.from_anndata`, :meth:`SimulationDesign.simulate`).
    methods : sequence of str, optional
        Registered method names (:func:`methods_table`).  Default: every
        available method that applies to the study (the others are named in a
        warning).  A named method that is unknown, unavailable or does not
        apply raises ValueError.
    fdr, alphas
        Levels of :func:`score_pvalues`.
    memory : bool
        Also measure each method's peak memory: the method runs once under
        :mod:`tracemalloc`, then again untraced for the wall time and the
        p-values (tracing slows allocation-heavy code by up to a few times).
    design, dataset
        Labels of the study in the table.

    Returns
    -------
    Comparison

    Examples
    --------
    >>> import flashmm.compare as fc
    >>> study = fc.SimulationDesign(n_per_arm=3, n_genes=100, cells_per_donor=40).simulate(seed=1)
    >>> cmp = fc.compare(study, ["cells_lmm", "pb_voom"])
    >>> cmp.table[["method", "type1_0.05", "power", "auc"]].shape
    (2, 4)
    """
    chosen = _resolve_methods(methods, study)
    rows, frames = [], []
    for method in chosen:
        p, timing = _run_method(method, study, memory)
        row = {"design": design, "dataset": dataset, "method": method.name, "label": method.label,
               "n_genes": len(study.genes), "n_tests": study.is_de.size,
               "n_de": int(study.is_de.sum())}
        row.update(score_pvalues(p.ravel(), study.is_de.ravel(), fdr=fdr, alphas=alphas))
        row.update(timing)
        rows.append(row)
        frames.append(pd.DataFrame({"design": design, "dataset": dataset, "method": method.name,
                                    "label": method.label,
                                    "gene": np.repeat(study.genes, len(study.tests)),
                                    "test": np.tile(study.tests, len(study.genes)),
                                    "pvalue": p.ravel(), "is_de": study.is_de.ravel()}))
    settings = {"fdr": fdr, "alphas": list(alphas), "memory": "tracemalloc" if memory else None,
                "methods": [m.name for m in chosen]}
    return Comparison(pd.DataFrame(rows), pd.concat(frames, ignore_index=True), settings)


def _simulate_and_compare(design: SimulationDesign, dataset: int, seed: int,
                          methods: list[str] | None, options: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One task of :func:`run_studies`: dataset ``dataset`` of ``design``, every method."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=options.pop("blas_threads", None)):
        study = design.simulate(seed=[seed, dataset])
        res = compare(study, methods, design=design.label, dataset=dataset, **options)
    res.table.insert(2, "seed", seed)
    return res.table, res.pvalues


def run_studies(designs: SimulationDesign | Sequence[SimulationDesign], n_datasets: int = 10,
                methods: Sequence[str] | None = None, *, seed: int = 0, workers: int = 1,
                client: Any = None, fdr: float = 0.05, alphas: Sequence[float] = ALPHAS,
                memory: bool = True, blas_threads: int | None = 1) -> Comparison:
    """Simulate ``n_datasets`` studies per design and run every method on each.

    Parameters
    ----------
    designs : SimulationDesign or sequence of them
        The study designs (e.g. 6 vs 6 and 12 vs 12 donors).
    n_datasets : int
        Simulated datasets per design.  Dataset ``j`` of every design is
        simulated with ``numpy.random.default_rng([seed, j])``, so a run is
        reproducible and one dataset can be remade alone
        (``design.simulate([seed, j])``).
    methods : sequence of str, optional
        As in :func:`compare`; checked before anything runs.
    seed : int
        Base seed.
    workers : int
        Processes (:class:`concurrent.futures.ProcessPoolExecutor`); 1 runs in
        this process.  Each task is one dataset with all its methods.
    client : dask.distributed.Client, optional
        Run the tasks on this Dask cluster instead (``workers`` is ignored).
    fdr, alphas, memory
        As in :func:`compare`.  With several tasks per process (Dask threads)
        the peak memory of concurrent methods mixes: use one thread per worker.
    blas_threads : int or None
        BLAS threads inside each task (threadpoolctl); 1 avoids
        oversubscribing the cores when tasks run in parallel; None leaves them.

    Returns
    -------
    Comparison
        Tables in the order (design, dataset, method), whatever the scheduling:
        the same seed gives the same scores and p-values serially and in parallel.
    """
    designs = [designs] if isinstance(designs, SimulationDesign) else list(designs)
    if not designs:
        raise ValueError("designs= is empty.")
    if isinstance(n_datasets, bool) or int(n_datasets) != n_datasets or n_datasets < 1:
        raise ValueError(f"n_datasets must be a positive integer, got {n_datasets!r}.")
    labels = [d.label for d in designs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two designs have the same label {labels}; the table could not tell "
                         "them apart.")
    if methods is not None:
        methods = [m.name for m in _resolve_methods(methods, None)]
    options = {"fdr": fdr, "alphas": tuple(alphas), "memory": memory}
    tasks = [(d, j) for d in designs for j in range(int(n_datasets))]
    results = _run_tasks(tasks, seed, methods, {**options, "blas_threads": blas_threads},
                         workers, client)
    table = pd.concat([r[0] for r in results], ignore_index=True)
    pvalues = pd.concat([r[1] for r in results], ignore_index=True)
    settings = {**options, "alphas": list(alphas), "memory": "tracemalloc" if memory else None,
                "seed": seed, "n_datasets": int(n_datasets),
                "designs": [dataclasses.asdict(d) for d in designs],
                "methods": list(dict.fromkeys(table["method"]))}
    return Comparison(table, pvalues, settings)


def _run_tasks(tasks: list[tuple[SimulationDesign, int]], seed: int, methods: list[str] | None,
               options: dict, workers: int, client: Any) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """Results of the tasks, in task order: serially, in processes or on Dask."""
    args = [(d, j, seed, methods, dict(options)) for d, j in tasks]
    if client is not None:
        futures = [client.submit(_simulate_and_compare, *a, pure=False) for a in args]
        return client.gather(futures)
    if workers is None or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}.")
    if workers == 1:
        return [_simulate_and_compare(*a) for a in args]
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_simulate_and_compare, *zip(*args, strict=True)))
