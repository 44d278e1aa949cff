"""Shared fixtures: reference data locations and small simulated studies."""

from __future__ import annotations

import os

# The matrices here are small (q, p < 300): one BLAS thread per process avoids
# oversubscribing a 2-core machine (threaded eigh on 261 x 261 was 100x slower
# under load). Set before numpy is imported by any test module.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import re  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "reference"

#: The random effects of the lmerTest references (tests/reference/anova, ranova): one
#: component, nested, crossed and three components over donors, cell types and batches.
DONOR_DESIGNS = {
    "one": {"groups": "donor"},
    "nested": {"groups": "donor", "re_formula": "1", "vc_formula": {"dct": "0 + C(ct)"}},
    "crossed": {"groups": None, "vc_formula": {"donor": "0 + C(donor)", "batch": "0 + C(batch)"}},
    "three": {"groups": None, "vc_formula": {"donor": "0 + C(donor)", "dct": "0 + C(donor):C(ct)",
                                             "batch": "0 + C(batch)"}},
}
FLASHMM_SIM = REFERENCE / "flashmm_sim"   # R FLASHMM 1.3.0 outputs on a simulated study
RECLA = REFERENCE / "recla"               # recla mice (kinship), lmmlite's example data


def r_to_patsy(name: str) -> str:
    """Map an R model.matrix column name of the lme4 study to patsy's name."""
    name = name.replace("log(libsize)", "np.log(libsize)")
    name = re.sub(r"cls(c\d)", r"cls[\1]", name)
    return name.replace("trtB", "trt[T.B]")


@pytest.fixture(scope="session")
def lme4_cells() -> pd.DataFrame:
    return pd.read_csv(REFERENCE / "lme4_sim" / "cells.csv")


LME4_FORMULA = "~ 0 + np.log(libsize) + cls + cls:trt"


def fit_lme4_study(cells: pd.DataFrame, model: str, method: str, **fit_kw):  # noqa: ANN201
    """flashmm's fit of the lme4 reference study: "1comp" (1 | sam) or "2comp" (+ (1 | loc))."""
    from flashmm import MultiGeneMixedLM

    genes = [c for c in cells.columns if c.startswith("g")]
    vc = {"sam": "0 + C(sam)", "loc": "0 + C(loc)"} if model == "2comp" else None
    mod = MultiGeneMixedLM.from_formula(LME4_FORMULA, cells, endog=cells[genes],
                                        groups=None if vc else "sam", vc_formula=vc)
    return mod.fit(reml=method == "REML", **fit_kw)


def lme4_ref(model: str, method: str, what: str) -> pd.DataFrame:
    return pd.read_csv(REFERENCE / "lme4_sim" / f"lme4_{model}_{method}_{what}.csv", index_col=0)


@pytest.fixture(scope="session")
def flashmm_sim() -> Path:
    """tests/reference/flashmm_sim: R FLASHMM reference outputs (see its README)."""
    return FLASHMM_SIM


def simulate_study(n_genes: int = 60, n_groups: int = 20, cells_per_group: tuple[int, int] = (60, 140),
                   seed: int = 0, n_loc: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cells nested in groups, a cell-level covariate, a group-level treatment.

    Returns (cells data frame, expression frame cells x genes). Gene variances
    vary, a quarter of genes have no group effect (boundary cases).
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(*cells_per_group, size=n_groups)
    grp = np.repeat(np.arange(n_groups), sizes)
    n = grp.size
    data = pd.DataFrame({
        "grp": [f"G{g:02d}" for g in grp],
        "trt": np.where(grp % 2 == 0, "A", "B"),
        "x": rng.normal(size=n),
        "ct": rng.choice(["a", "b", "c"], size=n),
    })
    if n_loc:
        data["loc"] = [f"L{v}" for v in rng.integers(0, n_loc, size=n)]
    sd_group = np.sqrt(rng.uniform(0.02, 0.5, size=n_genes))
    sd_group[::4] = 0.0
    eff = rng.normal(size=(n_groups, n_genes)) * sd_group
    Y = (0.5 * data["x"].to_numpy()[:, None] * rng.normal(size=n_genes)
         + (data["trt"] == "B").to_numpy()[:, None] * rng.normal(scale=0.3, size=n_genes)
         + eff[grp] + rng.normal(size=(n, n_genes)) * np.sqrt(rng.uniform(0.5, 2.0, size=n_genes)))
    if n_loc:
        sd_loc = np.sqrt(rng.uniform(0.0, 0.3, size=n_genes))
        sd_loc[1::3] = 0.0
        codes = data["loc"].str[1:].astype(int).to_numpy()
        Y += (rng.normal(size=(n_loc, n_genes)) * sd_loc)[codes]
    genes = [f"gene{j:03d}" for j in range(n_genes)]
    return data, pd.DataFrame(Y, columns=genes)
