"""The method-comparison study of docs/study.rst, run by flashmm.compare.

Two designs, 6 vs 6 and 12 vs 12 donors nested in two conditions, 10 simulated
datasets each (``flashmm.datasets.simulate_rnaseq`` through
``flashmm.compare.SimulationDesign``): 3,000 genes, 200 cells per donor split
over two cell types, 10% of the genes DE in one of the cell types with
``|log FC|`` uniform in [0.5, 1.5] (natural log), donor random effects of
variance 0.1 on the log scale.  Every available method of the registry runs on
every dataset; the treatment is tested within each cell type (6,000 tests per
dataset).

Run from the repository root, on one core::

    OPENBLAS_NUM_THREADS=1 python3 benchmarks/compare_study.py     # ~5 min
    python3 benchmarks/compare_study.py --quick                    # smoke run, no files

It writes, under ``benchmarks/results/``:

* ``compare_study.json``: machine, settings, wall time, the summary and every run;
* ``compare_study_runs.csv``: the scores of every (design, dataset, method);
* ``compare_study.csv``: the summary formatted for the docs page;
* ``compare_study_findings.rst``: the sizes, the wall time and the headline sentences
  (calibration, power at equal FDP);
* ``compare_study_qq.png``, ``compare_study_power_fdp.png``: the figures.
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

import flashmm.compare as fc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STEM = "compare_study"
DESIGN = {"n_genes": 3000, "cells_per_donor": 200, "n_celltypes": 2, "de_fraction": 0.1,
          "min_beta": 0.5, "max_beta": 1.5, "var_random_effects": 0.1, "min_counts": 10}
#: A rate counts as calibrated up to this many standard errors (over the datasets) above the level.
SE_MARGIN = 2.0
#: Above that, up to this multiple of the level it counts as slightly anti-conservative.
SLIGHT = 1.3
#: Right end of the FDP axis of the power figure (the region where methods are used).
FDP_MAX = 0.3


def run(per_arm: list[int], n_datasets: int, seed: int, workers: int,
        design: dict) -> tuple[fc.Comparison, float]:
    """The comparison of every available method; returns it and the wall time."""
    designs = [fc.SimulationDesign(n_per_arm=n, **design) for n in per_arm]
    t0 = time.perf_counter()
    res = fc.run_studies(designs, n_datasets, seed=seed, workers=workers)
    res.settings["workers"] = workers
    return res, time.perf_counter() - t0


def calibration(summary: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per design and method: the type-I error rates, their standard errors over the datasets
    (genes of one dataset share its donors, so they are not independent tests), and whether
    the rates at 0.05 and 0.01 are at most ``SE_MARGIN`` standard errors above the level."""
    grouped = table.groupby(["design", "method"], sort=False)
    out = summary.set_index(["design", "method"])[["label", "type1_0.05", "type1_0.01"]].copy()
    ok = np.ones(len(out), dtype=bool)
    slight = np.ones(len(out), dtype=bool)
    for a in (0.05, 0.01):
        col = f"type1_{a:g}"
        out[f"se_{a:g}"] = grouped[col].std(ddof=1) / np.sqrt(grouped.size())
        ok &= (out[col] <= a + SE_MARGIN * out[f"se_{a:g}"].fillna(0.0)).to_numpy()
        slight &= (out[col] <= SLIGHT * a).to_numpy()
    out["calibrated"] = ok
    out["status"] = np.where(ok, "calibrated", np.where(slight, "slightly liberal", "liberal"))
    return out.reset_index()


def run_facts(res: fc.Comparison, seconds: float, machine: dict) -> str:
    """One paragraph: the sizes after the gene filter, the wall time and the load."""
    t = res.table.drop_duplicates(["design", "dataset"])
    n_genes = res.settings["designs"][0]["n_genes"]
    load = machine["load_average_at_start"][0]
    return (f"Per dataset, on average: {t['n_genes'].mean():,.0f} of {n_genes:,} genes kept by "
            f"the count filter, {t['n_tests'].mean():,.0f} tests (genes x cell types), "
            f"{t['n_de'].mean():,.0f} of them DE. The whole study "
            f"({len(res.table)} method runs) took {seconds / 60:.1f} min of wall time with "
            f"{res.settings['workers']} worker process(es) on {machine['processor']}, "
            f"run on {machine['date'][:10]} with a load average of {load:.1f} at the start "
            f"on {machine['cores']} cores shared with other work.")


def findings(summary: pd.DataFrame, calib: pd.DataFrame, fdr: float) -> str:
    """The headline sentences of the docs page (reST), from the numbers."""
    lines = []
    for design, part in summary.groupby("design", sort=False):
        cal = calib[calib["design"] == design]
        good = cal[cal["status"] == "calibrated"]
        slight = cal[cal["status"] == "slightly liberal"]
        bad = cal[cal["status"] == "liberal"]
        best = part.sort_values("power_at_fdp", ascending=False).iloc[0]
        best_cal = part[part["method"].isin(good["method"])].sort_values(
            "power_at_fdp", ascending=False)
        text = [f"**{design} donors.** Calibrated (type-I error at 0.05 and 0.01 at most "
                f"{SE_MARGIN:g} standard errors over the datasets above the level): "
                + (", ".join(f"{r.label} ({_pct(r, 0.05)} at 0.05, {_pct(r, 0.01)} at 0.01)"
                             for _, r in good.iterrows()) or "none") + "."]
        if len(slight):
            text.append(f"Slightly liberal (more than that, but at most {SLIGHT:g} times the level): "
                        + ", ".join(f"{r.label} ({_pct(r, 0.05)}, {_pct(r, 0.01)})"
                                    for _, r in slight.iterrows()) + ".")
        if len(bad):
            text.append(f"Liberal (more than {SLIGHT:g} times the level): " + ", ".join(
                f"{r.label} ({_pct(r, 0.05)} at 0.05, {_pct(r, 0.01)} at 0.01)"
                for _, r in bad.iterrows()) + ".")
        power = (f"Most powerful at equal FDP (largest power with an observed FDP of at most "
                 f"{fdr:g}, mean over the datasets): {best.label}, {best.power_at_fdp:.3f}")
        if len(best_cal) and best_cal.iloc[0]["method"] != best["method"]:
            b = best_cal.iloc[0]
            power += f"; among the calibrated methods {b.label}, {b.power_at_fdp:.3f}"
        lines.append(" ".join(text) + " " + power + ".")
    ratio = (summary["seconds_traced"] / summary["seconds"]).groupby(summary["method"]).median()
    lines.append("The traced run of each method (tracemalloc, made first for the memory) took "
                 "longer than the timed run by a median factor of " + ", ".join(
                     f"{ratio[m]:.1f} ({m})" for m in dict.fromkeys(summary["method"])) + ".")
    return "\n\n".join(lines) + "\n"


def _pct(row: pd.Series, a: float) -> str:
    """``5.3% +- 0.2%``: a rate and its standard error over the datasets, in percent."""
    return f"{100 * row[f'type1_{a:g}']:.1f}% ± {100 * row[f'se_{a:g}']:.1f}%"


def docs_table(summary: pd.DataFrame, calib: pd.DataFrame) -> pd.DataFrame:
    """The summary with readable headers and rounded numbers, for a csv-table."""
    merged = summary.merge(calib[["design", "method", "status"]], on=["design", "method"])
    return pd.DataFrame({
        "design": merged["design"],
        "method": merged["label"],
        "type-I 0.05": merged["type1_0.05"].map("{:.4f}".format),
        "type-I 0.01": merged["type1_0.01"].map("{:.4f}".format),
        "type-I 0.001": merged["type1_0.001"].map("{:.5f}".format),
        "calibration": merged["status"],
        "power (BH 0.05)": merged["power"].map("{:.3f}".format),
        "FDP (BH 0.05)": merged["fdp"].map("{:.3f}".format),
        "power at FDP <= 0.05": merged["power_at_fdp"].map("{:.3f}".format),
        "AUC": merged["auc"].map("{:.4f}".format),
        "seconds": merged["seconds"].map("{:.2f}".format),
        "peak MiB": merged["peak_mib"].map("{:.0f}".format),
    })


def figures(res: fc.Comparison, stem: Path) -> None:
    """Calibration QQ and power-vs-FDP figures, one panel per design."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flashmm.plot import calibration_qq, power_fdp

    designs = list(dict.fromkeys(res.table["design"]))
    panels = (("qq", lambda ax, d: calibration_qq(res, design=d, ax=ax)),
              ("power_fdp", lambda ax, d: power_fdp(res, design=d, ax=ax, fdp_max=FDP_MAX)))
    for kind, draw in panels:
        fig, axes = plt.subplots(1, len(designs), figsize=(5.2 * len(designs), 4.6), squeeze=False)
        for ax, design in zip(axes[0], designs, strict=True):
            draw(ax, design)
            ax.set_title(f"{design} donors, {res.settings['n_datasets']} datasets")
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-arm", type=int, nargs="+", default=[6, 12])
    ap.add_argument("--datasets", type=int, default=10)
    ap.add_argument("--genes", type=int, default=DESIGN["n_genes"])
    ap.add_argument("--cells-per-donor", type=int, default=DESIGN["cells_per_donor"])
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 300 genes, 2 datasets, no files")
    args = ap.parse_args(argv)
    design = {**DESIGN, "n_genes": args.genes, "cells_per_donor": args.cells_per_donor}
    if args.quick:
        design["n_genes"], args.datasets = 300, 2
    machine = machine_info()
    res, seconds = run(args.per_arm, args.datasets, args.seed, args.workers, design)
    summary = res.summary()
    calib = calibration(summary, res.table)
    text = run_facts(res, seconds, machine) + "\n\n" + findings(summary, calib, res.settings["fdr"])
    with pd.option_context("display.width", 220, "display.max_columns", 20):
        print(docs_table(summary, calib).to_string(index=False))
    print(text)
    print(f"wall time {seconds:.1f} s")
    if args.quick:
        return
    stem = RESULTS / STEM
    RESULTS.mkdir(exist_ok=True)
    res.table.to_csv(stem.with_name(f"{STEM}_runs.csv"), index=False, float_format="%.6g")
    docs_table(summary, calib).to_csv(stem.with_suffix(".csv"), index=False)
    stem.with_name(f"{STEM}_findings.rst").write_text(text)
    figures(res, stem)
    save_result(stem.with_suffix(".json"), {
        "machine": machine,
        "settings": {**res.settings, "script": "benchmarks/compare_study.py"},
        "seconds": round(seconds, 1),
        "summary": calib.drop(columns=["label"]).merge(summary, on=["design", "method"],
                                                       suffixes=("_calib", "")).to_dict("records"),
        "runs": res.table.to_dict("records"),
    })


if __name__ == "__main__":
    main()
