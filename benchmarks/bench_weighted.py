"""The weighted mixed model (``weights=``) at pseudobulk scale: time per gene.

Pseudobulk samples of ``d`` donors x 10 cell types, a donor-level treatment,
log-normal precision weights per sample and gene.  Three fits, each timed
(median of the repeats) from the per-gene weighted statistics to the
Satterthwaite df of every coefficient:

* ``one``: ``(1|donor)`` -- ``Z'WZ`` is diagonal for every gene, O(q p^2) per gene;
* ``two``: ``(1|donor) + (1|plate)`` (8 plates crossed with the donors) -- the
  donors' diagonal block with a Schur complement on the plates, O(d 8^2) per gene;
* ``two_dense``: the same model through the dense criterion, O(q^3) per gene
  (q = d + 8), the path of designs without a diagonal block;
* ``unweighted``: ``(1|donor)`` without weights (the shared-statistics eigen path), for scale.

Also recorded: the bytes of per-gene statistics the model stores and the dense
working memory per gene of the fit (what the memory budget is checked against).

Run from the repository root::

    python3 benchmarks/bench_weighted.py            # ~2 min on 2 cores
    python3 benchmarks/bench_weighted.py --quick    # smoke run

It prints a table and writes ``benchmarks/results/weighted.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, save_result  # noqa: E402

from flashmm import MultiGeneMixedLM  # noqa: E402
from flashmm._fit_weighted import dense_bytes_per_gene, is_diagonal, schur_split  # noqa: E402
from flashmm._weighted_stats import WeightedStats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "weighted.json"


def simulate(n_donors: int, n_genes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(n_donors), 10)
    n = donor.size
    plate = rng.integers(0, 8, size=n)
    X = np.column_stack([np.ones(n), donor % 2, rng.normal(size=n)])
    Y = (rng.normal(size=(n, n_genes)) + 0.5 * rng.normal(size=(n_donors, n_genes))[donor]
         + 0.3 * rng.normal(size=(8, n_genes))[plate])
    W = np.exp(rng.normal(0.0, 0.5, size=(n, n_genes)))
    return {"X": X, "Y": Y, "W": W, "donor": donor, "plate": plate}


class _dense:
    """A model whose fit is forced through the dense criterion (for the comparison)."""

    def __init__(self, model: MultiGeneMixedLM) -> None:
        self.model = model

    def fit(self):  # noqa: ANN201
        import flashmm._fit_weighted as fw

        saved = fw.schur_split
        fw.schur_split = lambda ws: None
        try:
            return self.model.fit()
        finally:
            fw.schur_split = saved


def timed(make, repeats: int) -> tuple[float, object]:
    runs, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = make()
            res = model.fit()
            res.df_satterthwaite  # noqa: B018 - the df are part of the timed work
        runs.append(time.perf_counter() - t)
    return float(np.median(runs)), (res, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--donors", type=int, default=100)
    ap.add_argument("--genes-one", type=int, default=2000)
    ap.add_argument("--genes-two", type=int, default=400)
    ap.add_argument("--genes-dense", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.donors, a.genes_one, a.genes_two, a.genes_dense, a.repeats = 20, 100, 10, 10, 1
    out = {"machine": machine_info(), "donors": a.donors, "samples": 10 * a.donors, "cases": {}}
    s1 = simulate(a.donors, a.genes_one)
    s2 = simulate(a.donors, a.genes_two, seed=1)
    s3 = simulate(a.donors, a.genes_dense, seed=1)
    cases = {
        "one": (a.genes_one, lambda: MultiGeneMixedLM(s1["Y"], s1["X"], groups=s1["donor"],
                                                      weights=s1["W"])),
        "two": (a.genes_two, lambda: MultiGeneMixedLM(
            s2["Y"], s2["X"], exog_vc={"donor": s2["donor"], "plate": s2["plate"]},
            weights=s2["W"])),
        "two_dense": (a.genes_dense, lambda: _dense(MultiGeneMixedLM(
            s3["Y"], s3["X"], exog_vc={"donor": s3["donor"], "plate": s3["plate"]},
            weights=s3["W"]))),
        "unweighted": (a.genes_one, lambda: MultiGeneMixedLM(s1["Y"], s1["X"],
                                                             groups=s1["donor"])),
    }
    print(f"{'case':<11}{'genes':>7}{'q':>6}{'ms/gene':>10}{'stored B/gene':>15}"
          f"{'fit B/gene':>12}")
    for name, (G, make) in cases.items():
        med, (res, runs) = timed(make, a.repeats)
        ws = getattr(res.model, "weighted", None)
        q = res.stats.k_re
        stored = fit_mem = None
        if isinstance(ws, WeightedStats):
            stored = WeightedStats.stored_bytes(ws.ZZ_values.shape[1], q, ws.k_fe)
            split = None if name == "two_dense" else schur_split(ws)
            fit_mem = dense_bytes_per_gene(q, ws.k_fe, len(res.component_names), is_diagonal(ws),
                                           None if split is None else split[1].size)
        out["cases"][name] = {"genes": G, "q": q, "median_s": med, "ms_per_gene": 1e3 * med / G,
                              "runs_s": runs, "stored_bytes_per_gene": stored,
                              "fit_bytes_per_gene": fit_mem}
        print(f"{name:<11}{G:>7}{q:>6}{1e3 * med / G:>10.2f}{stored or 0:>15}{fit_mem or 0:>12}")
    if not a.no_save:
        save_result(RESULTS, out)


if __name__ == "__main__":
    main()
