"""Simulated pseudobulk counts for the voom reference (numpy/flashmm only, fixed seed).

Writes counts.csv.gz (genes x samples, integers), samples.csv (sam, cls, trt, n_cells,
norm_factor) and lowess_in.csv (x with ties, y with outliers, for R's lowess).
Run from the repository root: python tests/reference/voom/make_voom_data.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

import flashmm

SEED = 20261202
HERE = Path(__file__).resolve().parent


def main() -> None:
    cells = flashmm.datasets.simulate_rnaseq(300, 6000, n_samples=12, n_celltypes=2,
                                             n_de_genes=20, seed=SEED)
    pb = flashmm.pseudobulk(cells, by=["sam", "cls"], min_cells=10)
    counts = np.asarray(pb.X.toarray()).round().astype(np.int64).T      # genes x samples
    counts[:2] = 0                          # two genes with no counts (left out of the trend)
    counts[2, :3] = [1, 0, 2]
    counts[2, 3:] = 0                       # a nearly empty gene
    genes = [f"g{i:03d}" for i in range(counts.shape[0])]
    frame = pd.DataFrame(counts, index=genes, columns=pb.obs_names)
    frame.index.name = "gene"
    frame.to_csv(HERE / "counts.csv.gz")
    rng = np.random.default_rng(SEED)
    samples = pb.obs[["sam", "cls", "trt", "n_cells"]].copy()
    samples["norm_factor"] = np.round(rng.uniform(0.8, 1.25, size=len(samples)), 4)
    samples.index.name = "sample"
    samples.to_csv(HERE / "samples.csv")
    x = np.round(rng.uniform(0, 40, size=80)) / 4    # many ties; quarters read back exactly
    y = np.sin(x) + 0.3 * rng.standard_normal(80)
    y[[3, 17, 40]] += [4.0, -3.0, 5.0]                                 # outliers
    pd.DataFrame({"x": x, "y": y}).to_csv(HERE / "lowess_in.csv", index=False, float_format="%.17g")


if __name__ == "__main__":
    main()
