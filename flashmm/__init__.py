"""flashmm: linear mixed models for thousands of genes at once, from sufficient statistics.

The data flow, one module per step::

    input (_endog) -> design (_design) -> sufficient statistics (stats)
      -> batched fit: one component (_engine: _fit_eigen, _fit_scoring);
         several components and random slopes: structure (_structure)
         -> criterion (_fit_theta) -> optimiser (_newton)
      -> results (results, gene, contrasts, summary; anova, lsmeans on the terms of _terms)
      -> predictions (predict) and results files (_persist)
"""

from ._design import Design, RandomComponent, build_design, build_formula_design
from ._errors import ConvergenceWarning, DataError, DesignError, FlashmmError, StatsError, TermError
from ._memory import MemoryBudgetError
from ._version import __version__
from .contrasts import MultiGeneContrastResults, contrast_matrix
from .gene import GeneResults
from .model import MultiGeneMixedLM
from .results import MultiGeneMixedLMResults
from .stats import SufficientStats

__all__ = [
    "__version__",
    "MultiGeneMixedLM",
    "MultiGeneMixedLMResults",
    "MultiGeneContrastResults",
    "GeneResults",
    "SufficientStats",
    "Design",
    "build_design",
    "build_formula_design",
    "RandomComponent",
    "contrast_matrix",
    "FlashmmError",
    "DesignError",
    "DataError",
    "StatsError",
    "TermError",
    "ConvergenceWarning",
    "MemoryBudgetError",
]

from . import datasets  # noqa: E402
from ._persist import ResultsFileError, load_results  # noqa: E402
from .io import get_results_df, write_results  # noqa: E402

__all__ += ["write_results", "get_results_df", "datasets", "load_results", "ResultsFileError"]

from .limma import DuplicateCorrelation, LimmaFit, duplicate_correlation, e_bayes, lm_fit  # noqa: E402

__all__ += ["lm_fit", "duplicate_correlation", "e_bayes", "LimmaFit", "DuplicateCorrelation"]

from .kinship import fit_kinship  # noqa: E402

__all__ += ["fit_kinship"]

from .voom import VoomResult, voom, voom_with_dream_weights  # noqa: E402

__all__ += ["voom", "voom_with_dream_weights", "VoomResult"]

from .pseudobulk import pseudobulk  # noqa: E402

__all__ += ["pseudobulk"]

from ._weighted_results import WeightedMixedLMResults  # noqa: E402

__all__ += ["WeightedMixedLMResults"]
