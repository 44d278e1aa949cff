"""Null calibration of the df methods for a sample-level treatment.

A study of ``2 x d`` donors (``d`` = 3, 6, 12 per arm), two cell types with
``k`` cells each per donor, and genes simulated from the model with no
treatment effect::

    y = cell type + donor effect (+ donor:celltype effect) + cell noise

Each gene is fitted with ``~ ct + trt`` and the treatment coefficient is
tested with every ``df_method`` (``"satterthwaite"``, ``"kenward-roger"``,
``"residual"``: FLASHMM's ``n - p``, ``"normal"``: statsmodels' z).  Two random-effects designs:

* ``one``: ``(1|donor)``, simulated with donor variance 0.3 (residual 1);
* ``nested``: ``(1|donor) + (1|donor:ct)``, donor 0.3 and donor:celltype 0.2.

Each size is run on 10 studies of 2,000 genes (20,000 tests).  The rejection
rates at 0.05 and 0.001 are reported with their binomial standard errors, the
median Satterthwaite df, the share of genes with a variance estimated at 0
(``results.boundary``) and the rates among those genes and the others.

Run from the repository root::

    python3 benchmarks/calibration.py             # ~1 min on one core
    python3 benchmarks/calibration.py --quick     # smoke run

It prints a table and writes ``benchmarks/results/calibration.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, save_result  # noqa: E402

from flashmm import MultiGeneMixedLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "calibration.json"
METHODS = ("satterthwaite", "kenward-roger", "residual", "normal")
LEVELS = (0.05, 0.001)
DESIGNS = {
    "one": {"groups": "donor"},
    "nested": {"groups": "donor", "re_formula": "1", "vc_formula": {"dct": "0 + C(ct)"}},
}
VARIANCES = {"one": (0.3, 0.0), "nested": (0.3, 0.2)}
TERM = "trt[T.B]"


def simulate(n_per_arm: int, n_genes: int, cells: int, design: str,
             rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """Cells (donor, ct, trt) and a null expression matrix cells x genes.

    Parameters
    ----------
    n_per_arm : int
        Donors per treatment arm.
    n_genes : int
        Genes, all without a treatment effect.
    cells : int
        Cells per donor and cell type.
    design : {"one", "nested"}
        Which variances to simulate (see the module docstring).
    rng : numpy.random.Generator
        Random numbers.
    """
    n_donors = 2 * n_per_arm
    donor = np.repeat(np.arange(n_donors), 2 * cells)
    ct = np.tile(np.repeat([0, 1], cells), n_donors)
    obs = pd.DataFrame({"donor": [f"D{d:02d}" for d in donor], "ct": np.array(["A", "B"])[ct],
                        "trt": np.where(donor < n_per_arm, "A", "B")})
    s_donor, s_dct = VARIANCES[design]
    ct_effect = rng.normal(scale=0.5, size=(2, n_genes))
    Y = ct_effect[ct] + rng.normal(scale=np.sqrt(s_donor), size=(n_donors, n_genes))[donor]
    if s_dct > 0:
        Y += rng.normal(scale=np.sqrt(s_dct), size=(2 * n_donors, n_genes))[2 * donor + ct]
    Y += rng.normal(size=Y.shape)
    return obs, Y


def null_pvalues(n_per_arm: int, n_genes: int, cells: int, design: str,
                 rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """p-values of the treatment test under every df method, the Satterthwaite df and the
    genes with a variance estimated at 0 (``results.boundary``)."""
    obs, Y = simulate(n_per_arm, n_genes, cells, design, rng)
    model = MultiGeneMixedLM.from_formula("~ ct + trt", obs, endog=Y, **DESIGNS[design])
    res = model.fit(n_jobs=1) if design != "one" else model.fit()
    out = {}
    df = None
    for method in METHODS:
        test = res.t_test(TERM, df_method=method)
        out[method] = test.pvalue.to_numpy().ravel()
        if method == "satterthwaite":
            df = test.df_denom.to_numpy().ravel()
    return out, df, res.boundary.to_numpy()


def run(sizes: list[int], n_genes: int, reps: int, cells: int, designs: list[str],
        seed: int) -> list[dict]:
    """Rejection rates for every design, size and method."""
    rows = []
    for design in designs:
        for d in sizes:
            rng = np.random.default_rng([seed, d, list(DESIGNS).index(design)])
            pv: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
            dfs, edge = [], []
            t0 = time.perf_counter()
            for _ in range(reps):
                p, df, at0 = null_pvalues(d, n_genes, cells, design, rng)
                for m in METHODS:
                    pv[m].append(p[m])
                dfs.append(df)
                edge.append(at0)
            seconds = time.perf_counter() - t0
            df_all = np.concatenate(dfs)
            at0 = np.concatenate(edge)
            for m in METHODS:
                p_all = np.concatenate(pv[m])
                ok = np.isfinite(p_all)
                p = p_all[ok]
                row = {"design": design, "donors_per_arm": d, "method": m, "tests": int(p.size),
                       "seconds": round(seconds, 2),
                       "median_satterthwaite_df": float(np.nanmedian(df_all)),
                       "boundary_fraction": float(np.mean(at0))}
                for a in LEVELS:
                    rate = float(np.mean(p < a))
                    row[f"rate_{a}"] = rate
                    row[f"se_{a}"] = float(np.sqrt(a * (1 - a) / p.size))
                    row[f"rate_{a}_boundary"] = _rate(p_all[ok & at0], a)
                    row[f"rate_{a}_interior"] = _rate(p_all[ok & ~at0], a)
                rows.append(row)
            print(table(rows[-len(METHODS):]), flush=True)
    return rows


def _rate(p: np.ndarray, a: float) -> float | None:
    """Share of ``p`` below ``a`` (None for no p-values)."""
    return float(np.mean(p < a)) if p.size else None


def table(rows: list[dict]) -> str:
    """Plain-text table of rejection rates."""
    lines = []
    for r in rows:
        lines.append(f"{r['design']:>7} {r['donors_per_arm']:>2} vs {r['donors_per_arm']:<2} "
                     f"{r['method']:>13}  p<0.05 {100 * r['rate_0.05']:6.2f}%  "
                     f"p<0.001 {100 * r['rate_0.001']:6.3f}%  (n={r['tests']}, "
                     f"median Satterthwaite df {r['median_satterthwaite_df']:.1f}, "
                     f"{100 * r['boundary_fraction']:.1f}% at the boundary)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 6, 12], help="donors per arm")
    ap.add_argument("--genes", type=int, default=2000, help="null genes per study")
    ap.add_argument("--reps", type=int, default=10, help="studies per size")
    ap.add_argument("--cells", type=int, default=25, help="cells per donor and cell type")
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 genes, one study")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.genes, args.reps = 200, 1
    t0 = time.perf_counter()
    rows = run(args.sizes, args.genes, args.reps, args.cells, args.designs, args.seed)
    result = {
        "machine": machine_info(),
        "settings": {"sizes": args.sizes, "genes": args.genes, "reps": args.reps,
                     "cells_per_donor_and_celltype": args.cells, "designs": args.designs,
                     "variances": {k: VARIANCES[k] for k in args.designs}, "seed": args.seed,
                     "formula": "~ ct + trt", "test": TERM},
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if not args.no_save and not args.quick:
        save_result(RESULTS, result)


if __name__ == "__main__":
    main()
