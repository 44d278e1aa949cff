"""Simulate three single-cell-like designs with several random components.

For each design (nested, crossed, three) this writes, next to this script,
  <design>_cells.csv  one row per cell: cell, donor, celltype, batch, trt, x
  <design>_Y.csv      cells x 24 genes (g01..g24), same row order as _cells.csv
  <design>_truth.csv  the true per-gene simulation parameters (for information)
Only numpy is used; each design has its own fixed seed, so the output is
reproducible. Numbers are written with repr(), i.e. 17 significant digits.

Run from the repository root:
  python tests/reference/multicomp/make_multicomp_data.py
"""
import os

import numpy as np

OUT = os.path.dirname(os.path.abspath(__file__))
N_GENES = 24
GENES = [f"g{j + 1:02d}" for j in range(N_GENES)]
SEEDS = {"nested": 20240701, "crossed": 20240702, "three": 20240703}


def _write(design, cells, Y, truth):
    n = len(cells["donor"])
    cols = ["cell", "donor", "celltype", "batch", "trt", "x"]
    with open(os.path.join(OUT, f"{design}_cells.csv"), "w") as f:
        f.write(",".join(cols) + "\n")
        for i in range(n):
            f.write(",".join([f"C{i + 1:05d}", cells["donor"][i], cells["celltype"][i],
                              cells["batch"][i], cells["trt"][i],
                              repr(float(cells["x"][i]))]) + "\n")
    with open(os.path.join(OUT, f"{design}_Y.csv"), "w") as f:
        f.write(",".join(GENES) + "\n")
        for i in range(n):
            f.write(",".join(repr(float(v)) for v in Y[i]) + "\n")
    keys = list(truth)
    with open(os.path.join(OUT, f"{design}_truth.csv"), "w") as f:
        f.write("gene," + ",".join(keys) + "\n")
        for j in range(N_GENES):
            f.write(GENES[j] + "," + ",".join(repr(float(truth[k][j])) for k in keys) + "\n")
    print(f"{design}: {n} cells x {N_GENES} genes")


def _variances(rng, sigma2, zero_genes, lo=0.01, hi=1.0):
    """Variances log-uniform in [lo, hi] * sigma2, exactly 0 for zero_genes (1-based)."""
    v = sigma2 * np.exp(rng.uniform(np.log(lo), np.log(hi), size=N_GENES))
    v[np.asarray(zero_genes) - 1] = 0.0
    return v


def _celltype_design(rng, n_donors, n_ct, batches_per_donor=None, n_batches=1):
    """Cells per donor x cell type from 10..40; batch drawn among the donor's batches."""
    donors = [f"D{i + 1:02d}" for i in range(n_donors)]
    trt_of = ["A"] * (n_donors // 2) + ["B"] * (n_donors - n_donors // 2)
    donor_batches = []
    for d in range(n_donors):
        k = batches_per_donor[d] if batches_per_donor is not None else 1
        donor_batches.append(np.sort(rng.choice(n_batches, size=k, replace=False)))
    don, ct, bat = [], [], []
    for d in range(n_donors):
        p = rng.dirichlet(np.full(len(donor_batches[d]), 3.0))
        for c in range(n_ct):
            m = int(rng.integers(10, 41))
            kb = len(donor_batches[d])
            nb = 2 + rng.multinomial(m - 2 * kb, p)   # >= 2 cells in each of the donor's batches
            don += [d] * m
            ct += [c] * m
            bat += list(rng.permutation(np.repeat(donor_batches[d], nb)))
    don, ct, bat = np.array(don), np.array(ct), np.array(bat)
    return donors, trt_of, don, ct, bat


def nested():
    rng = np.random.default_rng(SEEDS["nested"])
    n_d, n_ct = 12, 4
    donors, trt_of, don, ct, bat = _celltype_design(rng, n_d, n_ct)
    n = don.size
    trt_b = np.array([trt_of[d] == "B" for d in don])
    x = rng.normal(0.0, 1.0, size=n)
    sigma2 = np.exp(rng.uniform(np.log(0.1), np.log(5.0), size=N_GENES))
    v_d = _variances(rng, sigma2, [1, 7, 13, 19])
    v_dc = _variances(rng, sigma2, [4, 10, 19])
    mu = rng.normal(0.0, 1.0, size=(N_GENES, n_ct))
    inter = np.zeros((N_GENES, n_ct))
    de = np.arange(N_GENES) % 3 == 0
    inter[de] = rng.normal(0.0, 0.8, size=(de.sum(), n_ct))
    Y = np.empty((n, N_GENES))
    for j in range(N_GENES):
        u_d = rng.normal(0.0, np.sqrt(v_d[j]), size=n_d)
        u_dc = rng.normal(0.0, np.sqrt(v_dc[j]), size=(n_d, n_ct))
        Y[:, j] = (mu[j, ct] + trt_b * inter[j, ct] + u_d[don] + u_dc[don, ct]
                   + rng.normal(0.0, np.sqrt(sigma2[j]), size=n))
    cells = dict(donor=[donors[d] for d in don], celltype=[f"c{c + 1}" for c in ct],
                 batch=["b1"] * n, trt=[trt_of[d] for d in don], x=x)
    truth = {"var_donor": v_d, "var_donor_celltype": v_dc, "sigma2": sigma2}
    truth.update({f"mu_c{c + 1}": mu[:, c] for c in range(n_ct)})
    truth.update({f"int_c{c + 1}B": inter[:, c] for c in range(n_ct)})
    _write("nested", cells, Y, truth)


def crossed():
    rng = np.random.default_rng(SEEDS["crossed"])
    n_d, n_b = 15, 6
    donors = [f"D{i + 1:02d}" for i in range(n_d)]
    trt_of = ["A"] * 8 + ["B"] * 7
    don, bat = [], []
    for d in range(n_d):
        bs = np.sort(rng.choice(n_b, size=3, replace=False))
        m = int(rng.integers(40, 81))
        p = rng.dirichlet(np.full(3, 3.0))
        nb = 5 + rng.multinomial(m - 15, p)          # >= 5 cells in each of the 3 batches
        don += [d] * m
        bat += list(rng.permutation(np.repeat(bs, nb)))
    don, bat = np.array(don), np.array(bat)
    n = don.size
    trt_b = np.array([trt_of[d] == "B" for d in don])
    # covariate with a donor-level shift, so it is not orthogonal to the donor effect
    x = rng.normal(0.0, 0.5, size=n_d)[don] + rng.normal(0.0, 1.0, size=n)
    sigma2 = np.exp(rng.uniform(np.log(0.1), np.log(5.0), size=N_GENES))
    v_d = _variances(rng, sigma2, [1, 9, 17])
    v_b = _variances(rng, sigma2, [2, 6, 14, 17])
    b0 = rng.normal(0.0, 1.0, size=N_GENES)
    b_trt = np.where(np.arange(N_GENES) % 3 == 0, rng.normal(0.0, 0.8, size=N_GENES), 0.0)
    b_x = rng.normal(0.0, 0.3, size=N_GENES)
    Y = np.empty((n, N_GENES))
    for j in range(N_GENES):
        u_d = rng.normal(0.0, np.sqrt(v_d[j]), size=n_d)
        u_b = rng.normal(0.0, np.sqrt(v_b[j]), size=n_b)
        Y[:, j] = (b0[j] + b_trt[j] * trt_b + b_x[j] * x + u_d[don] + u_b[bat]
                   + rng.normal(0.0, np.sqrt(sigma2[j]), size=n))
    cells = dict(donor=[donors[d] for d in don], celltype=["c1"] * n,
                 batch=[f"b{b + 1}" for b in bat], trt=[trt_of[d] for d in don], x=x)
    truth = {"var_donor": v_d, "var_batch": v_b, "sigma2": sigma2,
             "intercept": b0, "trtB": b_trt, "x": b_x}
    _write("crossed", cells, Y, truth)


def three():
    rng = np.random.default_rng(SEEDS["three"])
    n_d, n_ct, n_b = 12, 3, 6
    k = rng.integers(2, 4, size=n_d)              # each donor in 2 or 3 batches
    donors, trt_of, don, ct, bat = _celltype_design(rng, n_d, n_ct, k, n_b)
    n = don.size
    trt_b = np.array([trt_of[d] == "B" for d in don])
    x = rng.normal(0.0, 1.0, size=n)
    sigma2 = np.exp(rng.uniform(np.log(0.1), np.log(5.0), size=N_GENES))
    v_d = _variances(rng, sigma2, [1, 8, 15, 22])
    v_dc = _variances(rng, sigma2, [3, 11, 22])
    v_b = _variances(rng, sigma2, [5, 12, 18])
    mu = rng.normal(0.0, 1.0, size=(N_GENES, n_ct))
    inter = np.zeros((N_GENES, n_ct))
    de = np.arange(N_GENES) % 3 == 0
    inter[de] = rng.normal(0.0, 0.8, size=(de.sum(), n_ct))
    Y = np.empty((n, N_GENES))
    for j in range(N_GENES):
        u_d = rng.normal(0.0, np.sqrt(v_d[j]), size=n_d)
        u_dc = rng.normal(0.0, np.sqrt(v_dc[j]), size=(n_d, n_ct))
        u_b = rng.normal(0.0, np.sqrt(v_b[j]), size=n_b)
        Y[:, j] = (mu[j, ct] + trt_b * inter[j, ct] + u_d[don] + u_dc[don, ct] + u_b[bat]
                   + rng.normal(0.0, np.sqrt(sigma2[j]), size=n))
    cells = dict(donor=[donors[d] for d in don], celltype=[f"c{c + 1}" for c in ct],
                 batch=[f"b{b + 1}" for b in bat], trt=[trt_of[d] for d in don], x=x)
    truth = {"var_donor": v_d, "var_donor_celltype": v_dc, "var_batch": v_b, "sigma2": sigma2}
    truth.update({f"mu_c{c + 1}": mu[:, c] for c in range(n_ct)})
    truth.update({f"int_c{c + 1}B": inter[:, c] for c in range(n_ct)})
    _write("three", cells, Y, truth)


def main():
    nested()
    crossed()
    three()


if __name__ == "__main__":
    main()
