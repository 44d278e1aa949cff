"""Simulate a small single-cell-like study for lme4/lmerTest reference fits.

Writes tests/reference/lme4_sim/cells.csv (one row per cell) and
tests/reference/lme4_sim/truth.csv (true per-gene parameters, for information).
Only numpy is used; the seed is fixed so the output is reproducible.
"""
import os

import numpy as np

SEED = 20240611
N_GENES = 30
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lme4_sim")


def main():
    rng = np.random.default_rng(SEED)
    samples = [f"S{i:02d}" for i in range(1, 13)]
    trt_of = {s: ("A" if i < 6 else "B") for i, s in enumerate(samples)}
    locs = [f"L{i}" for i in range(1, 9)]
    classes = ["c1", "c2", "c3"]

    n_per = rng.integers(40, 111, size=len(samples))
    sam = np.repeat(np.arange(len(samples)), n_per)
    n = sam.size
    trt_b = np.array([trt_of[samples[s]] == "B" for s in sam])
    cls = rng.choice(3, size=n, p=[0.45, 0.35, 0.20])
    loc = rng.integers(0, len(locs), size=n)
    libsize = np.round(np.exp(rng.normal(np.log(3000.0), 0.5, size=n))).astype(int)
    libsize = np.maximum(libsize, 200)

    # Per-gene true parameters.
    g = np.arange(N_GENES)
    var_sam = rng.uniform(0.02, 0.2, size=N_GENES)
    var_sam[g % 4 == 0] = 0.0          # genes 1,5,9,...,29 -> 8 genes with no sample effect
    var_loc = rng.uniform(0.02, 0.3, size=N_GENES)
    var_loc[g % 2 == 1] = 0.0          # half of genes with no location effect
    sigma2 = rng.uniform(0.3, 1.5, size=N_GENES)
    cls_mean = rng.normal(0.0, 1.0, size=(N_GENES, 3))
    inter = np.zeros((N_GENES, 3))
    de = g % 3 == 0                    # a third of genes with cls:trt effect
    inter[de] = rng.normal(0.0, 0.6, size=(de.sum(), 3))

    cols = {}
    for j in range(N_GENES):
        u_sam = rng.normal(0.0, np.sqrt(var_sam[j]), size=len(samples))
        u_loc = rng.normal(0.0, np.sqrt(var_loc[j]), size=len(locs))
        y = (0.7 * np.log(libsize) + cls_mean[j, cls] + trt_b * inter[j, cls]
             + u_sam[sam] + u_loc[loc] + rng.normal(0.0, np.sqrt(sigma2[j]), size=n))
        cols[f"g{j + 1:02d}"] = y

    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "cells.csv"), "w") as f:
        f.write(",".join(["sam", "trt", "cls", "loc", "libsize"] + list(cols)) + "\n")
        for i in range(n):
            row = [samples[sam[i]], "B" if trt_b[i] else "A", classes[cls[i]],
                   locs[loc[i]], str(libsize[i])]
            row += [repr(float(cols[k][i])) for k in cols]
            f.write(",".join(row) + "\n")
    with open(os.path.join(OUT, "truth.csv"), "w") as f:
        f.write("gene,var_sam,var_loc,sigma2,mu_c1,mu_c2,mu_c3,int_c1B,int_c2B,int_c3B\n")
        for j in range(N_GENES):
            vals = [var_sam[j], var_loc[j], sigma2[j], *cls_mean[j], *inter[j]]
            f.write(f"g{j + 1:02d}," + ",".join(repr(float(v)) for v in vals) + "\n")
    print(f"wrote {n} cells x {N_GENES} genes to {OUT}")


if __name__ == "__main__":
    main()
