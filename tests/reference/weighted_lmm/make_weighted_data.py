"""Simulated pseudobulk samples with precision weights for the weighted-LMM reference.

numpy only (SEED below). Writes samples.csv (one row per pseudobulk sample: donor, celltype,
trt, plate), expr.csv (samples x genes) and weights.csv (samples x genes, positive, voom-like
spread). Run from the repository root:
python tests/reference/weighted_lmm/make_weighted_data.py
"""

from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20261202
OUT = Path(__file__).resolve().parent


def main() -> None:
    rng = np.random.default_rng(SEED)
    n_donor, n_ct, n_genes = 16, 3, 24
    donor = np.repeat([f"D{i:02d}" for i in range(n_donor)], n_ct)
    ct = np.tile([f"c{j}" for j in range(n_ct)], n_donor)
    trt = np.repeat(np.where(np.arange(n_donor) % 2 == 0, "ctrl", "case"), n_ct)
    plate = rng.choice(["P1", "P2", "P3", "P4", "P5"], size=donor.size)
    keep = rng.random(donor.size) > 0.1                      # unbalanced: drop ~10% samples
    donor, ct, trt, plate = donor[keep], ct[keep], trt[keep], plate[keep]
    n = donor.size
    d_codes = np.unique(donor, return_inverse=True)[1]
    p_codes = np.unique(plate, return_inverse=True)[1]
    X = np.column_stack([np.ones(n), trt == "case", ct == "c1", ct == "c2"]).astype(float)
    beta = rng.normal(size=(4, n_genes)) * [[3.0], [0.5], [0.5], [0.5]]
    beta[1, ::3] = 0.0                                         # null treatment genes
    sd_donor = rng.uniform(0.0, 0.8, size=n_genes)
    sd_donor[::6] = 0.0                                        # some genes without donor variance
    sd_plate = rng.uniform(0.0, 0.5, size=n_genes)
    sd_plate[1::4] = 0.0
    w = np.exp(rng.normal(0.0, 0.6, size=(n, n_genes)))       # precision weights
    u = rng.normal(size=(n_donor, n_genes)) * sd_donor
    v = rng.normal(size=(5, n_genes)) * sd_plate
    y = X @ beta + u[d_codes] + v[p_codes] + rng.normal(size=(n, n_genes)) / np.sqrt(w)
    names = [f"S{i:02d}" for i in range(n)]
    genes = [f"g{j:02d}" for j in range(n_genes)]
    pd.DataFrame({"sample": names, "donor": donor, "celltype": ct, "trt": trt,
                  "plate": plate}).to_csv(OUT / "samples.csv", index=False)
    pd.DataFrame(y, index=names, columns=genes).to_csv(OUT / "expr.csv", float_format="%.17g",
                                                       index_label="sample")
    pd.DataFrame(w, index=names, columns=genes).to_csv(OUT / "weights.csv",
                                                       float_format="%.17g", index_label="sample")


if __name__ == "__main__":
    main()
