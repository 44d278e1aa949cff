"""Kenward-Roger and anova at the atlas shape, against the time of the fit itself.

The synthetic atlas of ``bench_atlas.py`` (499,713 cells x 11,596 genes, 259
donors, 5 cell types) is reduced to sufficient statistics once per model by
``flashmm stats`` (one pass over the backed ``.h5ad``); then, in one process
and one session, for ``one`` ``(1|donor)``, ``nested`` ``(1|donor) +
(1|donor:cls)`` and ``crossed`` ``(1|donor) + (1|batch)`` (24 batches) with
``~ 0 + np.log(libsize) + cls + cls:trt``:

* ``fit``: ``MultiGeneMixedLM.from_sufficient_stats(stats).fit()`` and the
  fixed effects with their covariance;
* ``kr``: Kenward-Roger t-tests of every coefficient (the adjusted covariance,
  its pieces and the df of every gene);
* ``anova_kr``: the type 3 ANOVA table with Kenward-Roger df (after ``kr``:
  the pieces are cached);
* ``anova_satterthwaite``: the same table with Satterthwaite df.

The issue's target: anova and Kenward-Roger together add at most the time of
the fit, ``(kr + anova_kr) / fit <= 1``.  Wall and CPU seconds of each step
and the ratios go to ``benchmarks/results/atlas_inference.json``.

Usage::

    python benchmarks/bench_atlas_inference.py                  # full size (~5 min + the file)
    python benchmarks/bench_atlas_inference.py --cells 50000 --genes 1000
    python benchmarks/bench_atlas_inference.py --h5ad atlas.h5ad  # reuse a kept file
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info  # noqa: E402
from bench_atlas import FORMULA, FULL_CELLS, FULL_GENES, build_h5ad  # noqa: E402

from flashmm import MultiGeneMixedLM, SufficientStats  # noqa: E402

MODELS = {
    "one": ("--groups", "donor"),
    "nested": ("--groups", "donor", "--re-intercept", "--vc", "dct=0 + C(cls)"),
    "crossed": ("--vc", "donor=0 + C(donor)", "--vc", "batch=0 + C(batch)"),
}


def build_stats(h5ad: Path, out: Path, flags: tuple[str, ...]) -> float:
    """``flashmm stats`` on the backed file; returns the wall seconds."""
    cmd = [sys.executable, "-m", "flashmm", "stats", str(h5ad), "--formula", FORMULA, *flags,
           "--transform", "log2p1", "--out", str(out), "--quiet"]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def timed(fn) -> tuple[object, float, float]:  # noqa: ANN001
    """``fn()`` with its wall and CPU seconds."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def run_model(stats_path: Path) -> dict[str, float]:
    """Time the fit, KR t-tests and the anova tables on one model's statistics."""
    stats = SufficientStats.load(stats_path)
    model = MultiGeneMixedLM.from_sufficient_stats(stats)

    def fit():  # noqa: ANN202
        res = model.fit()
        res.fe_params  # noqa: B018 - the GLS step is part of the fit
        res.cov_params()
        return res

    res, fit_w, fit_c = timed(fit)
    eye = np.eye(res.k_fe)
    _, kr_w, kr_c = timed(lambda: res.t_test(eye, df_method="kenward-roger").pvalue)
    _, an_kr_w, an_kr_c = timed(lambda: res.anova(df_method="kenward-roger"))
    _, an_s_w, an_s_c = timed(lambda: res.anova(df_method="satterthwaite"))
    return {
        "genes": res.n_genes, "fit_wall": fit_w, "fit_cpu": fit_c,
        "kr_wall": kr_w, "kr_cpu": kr_c, "anova_kr_wall": an_kr_w, "anova_kr_cpu": an_kr_c,
        "anova_satterthwaite_wall": an_s_w, "anova_satterthwaite_cpu": an_s_c,
        "ratio_kr_anova_to_fit_wall": (kr_w + an_kr_w) / fit_w,
        "ratio_kr_anova_to_fit_cpu": (kr_c + an_kr_c) / fit_c,
        "ok_genes": int(np.sum(res.status.to_numpy() == "ok")),
    }


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the atlas file and its statistics, then time every step."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=FULL_CELLS)
    p.add_argument("--genes", type=int, default=FULL_GENES)
    p.add_argument("--h5ad", default=None, help="reuse a file built by bench_atlas.py --keep")
    p.add_argument("--workdir", default=None, help="keeps the file and the statistics")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "atlas_inference.json"))
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="flashmm_atlas_inf_"))
    work.mkdir(parents=True, exist_ok=True)
    h5ad = Path(args.h5ad) if args.h5ad else work / f"atlas_{args.cells}x{args.genes}.h5ad"
    if not h5ad.exists():
        print(f"building {h5ad} ...", flush=True)
        build_h5ad(h5ad, args.cells, args.genes)
    out: dict[str, object] = {"machine": machine_info(), "cells": args.cells, "genes": args.genes,
                              "formula": FORMULA, "models": {}}
    for name in args.models.split(","):
        stats_path = work / f"stats_{name}_{args.cells}x{args.genes}.npz"
        if not stats_path.exists():
            build_stats(h5ad, stats_path, MODELS[name])
        row = run_model(stats_path)
        out["models"][name] = row  # type: ignore[index]
        print(f"{name:>7}: fit {row['fit_wall']:.1f} s, KR t-tests {row['kr_wall']:.1f} s, "
              f"anova KR {row['anova_kr_wall']:.1f} s, anova Satterthwaite "
              f"{row['anova_satterthwaite_wall']:.1f} s; (KR + anova) / fit = "
              f"{row['ratio_kr_anova_to_fit_wall']:.2f} wall, "
              f"{row['ratio_kr_anova_to_fit_cpu']:.2f} CPU", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
