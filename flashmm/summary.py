"""Whole-fit summary: a statsmodels ``Summary`` describing every gene at once."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["fit_summary"]


def fit_summary(res: Any, alpha: float = 0.05, fdr: float = 0.05) -> Any:
    """Model information, then per fixed term: genes significant at ``fdr`` and median effect."""
    from statsmodels.iolib import summary2

    smry = summary2.Summary()
    comps = ", ".join(f"{c.name} ({c.size})" for c in res.stats.components)
    info = {
        "Model:": "MultiGeneMixedLM",
        "Method:": res.method,
        "No. Cells:": str(res.nobs),
        "No. Genes:": str(res.n_genes),
        "Random components:": comps,
        "Df method:": res.df_method,
        "Genes converged:": str(int(res.converged.sum())),
        "Genes at boundary:": str(int(res.boundary.sum())),
        "Genes not fitted:": str(int((res.status != "ok").sum())),
        "Optimizer:": res.optimizer,
    }
    smry.add_dict(info)
    smry.add_title("Multi-gene Mixed Linear Model Results")
    tests = res.t_test(np.eye(res.k_fe))
    padj = tests.padj.to_numpy()
    effect = res.fe_params.to_numpy()
    with np.errstate(invalid="ignore"):
        table = pd.DataFrame({
            f"Genes FDR<{fdr}": np.sum(padj < fdr, axis=0),
            "Median effect": np.nanmedian(effect, axis=0) if res.n_genes else np.nan,
            "Median Std.Err.": np.nanmedian(res.bse_fe.to_numpy(), axis=0),
            "Median df": np.nanmedian(tests.df_denom.to_numpy(), axis=0),
        }, index=res.exog_names)
    formatted = table.copy().astype(object)
    formatted.iloc[:, 0] = [str(int(x)) for x in table.iloc[:, 0]]
    for col in table.columns[1:]:
        formatted[col] = [f"{x:.4g}" if np.isfinite(x) else "" for x in table[col]]
    smry.add_df(formatted, align="r")
    vc = res.vcomp
    vtable = pd.DataFrame({
        "Median variance": vc.median(),
        "Genes at 0": (vc == 0).sum(),
        "Median ICC": res.icc.median(),
    })
    vtable.loc["residual"] = [float(res.scale.median()), 0, np.nan]
    vformatted = vtable.astype(object)
    for col in vtable.columns:
        vformatted[col] = [f"{x:.4g}" if np.isfinite(x) else "" for x in vtable[col]]
    smry.add_df(vformatted, align="r")
    return smry
