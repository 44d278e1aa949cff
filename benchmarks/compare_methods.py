"""Compare limma-style OLS, limma block GLS and the mixed model on one simulated study.

Cells are nested in samples and samples in treatment (6 control vs 6 treated
samples), so the treatment effect varies only between samples.  Three
methods test it on the log-normalised expression of the cells:

* ``ols``: ``flashmm.lm_fit`` on cells, ignoring the samples, then ``e_bayes``;
* ``limma_block``: ``flashmm.lm_fit(block=sample, correlation=...)`` with the
  consensus correlation of ``flashmm.duplicate_correlation``, then ``e_bayes``;
* ``mixed_model``: ``flashmm.MultiGeneMixedLM`` with a random sample
  intercept, REML, Satterthwaite degrees of freedom.

The table reports the type-I error at alpha = 0.05 on the null genes, the power
(fraction of the true DE genes found) and the observed false discovery
proportion at a Benjamini-Hochberg FDR of 0.05, and the fitting time.

Run ``python benchmarks/compare_methods.py`` (about a minute); it writes
``benchmarks/results/compare_methods.csv``, ``.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from flashmm import MultiGeneMixedLM
from flashmm.limma import bh_adjust, duplicate_correlation, e_bayes, lm_fit

RESULTS = Path(__file__).resolve().parent / "results"


def simulate(n_genes: int, n_cells: int, n_samples: int, n_de: int, seed: int):
    """Simulated counts (flashmm.datasets) -> log-normalised AnnData and truth."""
    from flashmm.datasets import simulate_rnaseq

    adata = simulate_rnaseq(
        n_genes=n_genes, n_cells=n_cells, n_samples=n_samples, n_celltypes=1, n_conditions=2,
        n_de_genes=n_de, min_beta=0.3, max_beta=0.8, var_random_effects=0.1, seed=seed,
    )
    counts = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    adata.X = np.log1p(counts / adata.obs["size_factor"].to_numpy()[:, None])
    keep = np.asarray(counts.sum(axis=0) >= 20).ravel()       # drop near-empty genes
    return adata[:, keep].copy()


def run(n_genes: int = 2000, n_cells: int = 6000, n_samples: int = 12, n_de: int = 200,
        seed: int = 7, alpha: float = 0.05, fdr: float = 0.05) -> pd.DataFrame:
    adata = simulate(n_genes, n_cells, n_samples, n_de, seed)
    de = adata.var["de"].to_numpy(dtype=bool)
    coef = "trt[T.B]"
    rows, pvals = [], {}

    t0 = time.perf_counter()
    fit = e_bayes(lm_fit(adata, "~ trt"))
    pvals["ols"] = (fit.table(coef)["P.Value"].to_numpy(), time.perf_counter() - t0,
                    "moderated t, df = cells - 2 + d0")

    t0 = time.perf_counter()
    dc = duplicate_correlation(adata, "~ trt", block="sam")
    fit = e_bayes(lm_fit(adata, "~ trt", block="sam", correlation=dc.cor))
    pvals["limma_block"] = (fit.table(coef)["P.Value"].to_numpy(), time.perf_counter() - t0,
                            f"consensus correlation {dc.cor:.4f}; moderated t, df = cells - 2 + d0")

    t0 = time.perf_counter()
    res = MultiGeneMixedLM.from_formula("~ trt", adata, groups="sam").fit()
    pvals["mixed_model"] = (res.pvalues[coef].to_numpy(), time.perf_counter() - t0,
                            "REML; t with Satterthwaite df")

    for name, (p, seconds, extra) in pvals.items():
        q = bh_adjust(p)
        found = q < fdr
        rows.append({
            "method": name,
            "type1_error": float(np.mean(p[~de] < alpha)),
            "power_fdr": float(np.mean(found[de])),
            "observed_fdp": float(np.sum(found & ~de) / max(1, found.sum())),
            "seconds": round(seconds, 3),
            "notes": extra,
        })
    table = pd.DataFrame(rows)
    meta = {"n_genes": int(adata.n_vars), "n_de": int(de.sum()), "n_cells": int(adata.n_obs),
            "n_samples": n_samples, "alpha": alpha, "fdr": fdr, "seed": seed}
    return table, meta


def plot(table: pd.DataFrame, path: Path, alpha: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    colors = ["#bbbbbb", "#6a9fd4", "#d4736a"]
    axes[0].bar(table["method"], table["type1_error"], color=colors)
    axes[0].axhline(alpha, ls="--", color="k", lw=1)
    axes[0].set_ylabel(f"type-I error (alpha = {alpha})")
    axes[0].set_title("null genes")
    axes[1].bar(table["method"], table["power_fdr"], color=colors)
    axes[1].set_ylabel("power at FDR 0.05")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("DE genes")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--cells", type=int, default=6000)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--de", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    table, meta = run(args.genes, args.cells, args.samples, args.de, args.seed)
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / "compare_methods.csv", index=False, float_format="%.4f")
    (RESULTS / "compare_methods.json").write_text(
        json.dumps({"meta": meta, "table": table.to_dict(orient="records")}, indent=2))
    plot(table, RESULTS / "compare_methods.png", meta["alpha"])
    print(json.dumps(meta))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
