"""The statistics pass and ``flashmm fit`` against the floor of reading the file, in one run.

On an atlas-shaped backed ``.h5ad`` (built by ``bench_atlas.build_h5ad``; full
size 499,713 cells x 11,596 genes, ~404 M non-zeros, 3.3 GB), interleaved
repeats of:

* ``floor``: ``bench_floor.floor_pass`` (h5py reads of every CSR chunk,
  ``log2(1+x)``, per-gene sums), in a subprocess;
* ``stats``: ``flashmm stats`` with both cores (the pass's own time, from its
  final log line, and the command's wall time and peak RSS);
* ``stats_1thread``: the same with ``NUMBA_NUM_THREADS=1`` (the background
  reader still runs on the other core);
* ``stats_1core``: the same confined to one core (``taskset -c 0``, one numba
  thread): reading and reducing share that core;
* ``fit``: ``flashmm fit`` end to end (wall time of the command: start-up,
  design, pass, fit, tests, CSV);
* optionally ``fit_baseline``: ``flashmm fit`` of another source tree
  (``--baseline /path/to/tree``, e.g. the main branch before this pass).

Ratios are taken repeat by repeat (same load) and their median reported, with
the load average before and after.  Targets (issue 16): pass <= 1.3 x floor,
fit <= 1.5 x floor, both cores >= 1.7 x one core, peak memory < 2 GB.  The
speed-up is reported both ways: ``thread_speedup`` (numba threads 2 against 1;
bounded by ``2 K / (R + K)`` for a kernel of K seconds and reads of R seconds,
since the one-thread run already reads on the second core) and
``core_speedup`` (both cores against the pass confined to one, ``taskset``).

Usage::

    python benchmarks/bench_pass.py                          # full size (builds 3.3 GB in /tmp)
    python benchmarks/bench_pass.py --cells 100000           # reduced size
    python benchmarks/bench_pass.py --h5ad /tmp/atlas.h5ad   # reuse a file
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import machine_info, save_result  # noqa: E402
from bench_atlas import FORMULA, build_h5ad  # noqa: E402

RESULTS = HERE / "results" / "pass.json"
TARGETS = {"pass_over_floor": 1.3, "fit_over_floor": 1.5, "thread_speedup": 1.7, "peak_gb": 2.0}


def _run(cmd: list[str], tree: Path, env_extra: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd`` under ``/usr/bin/time -v`` with ``tree`` first on the path."""
    env = dict(os.environ, PYTHONPATH=str(tree), **(env_extra or {}))
    t0 = time.perf_counter()
    # cwd = the tree: ``python -m`` puts the working directory before PYTHONPATH
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env,
                          cwd=tree)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{cmd[:4]} failed with exit code {proc.returncode}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    cpu = [re.search(rf"{k} time \(seconds\): ([0-9.]+)", proc.stderr) for k in ("User", "System")]
    out = {"wall_seconds": wall, "peak_rss_gb": int(rss.group(1)) * 1024 / 1e9 if rss else float("nan"),
           "cpu_seconds": sum(float(m.group(1)) for m in cpu if m)}
    m = re.search(r"statistics pass done: \d+ cells x \d+ genes in ([0-9.]+) s", proc.stderr)
    if m:
        out["pass_seconds"] = float(m.group(1))
    m = re.search(r'"seconds": ([0-9.]+)', proc.stdout)
    if m:
        out["floor_seconds"] = float(m.group(1))
    return out


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the file, run the interleaved repeats, write ``results/pass.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=499_713)
    p.add_argument("--genes", type=int, default=11_596)
    p.add_argument("--h5ad", default=None, help="reuse this file (built by bench_atlas.build_h5ad)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", default=None, help="another source tree whose 'flashmm fit' is timed too")
    p.add_argument("--keep", action="store_true", help="keep the built file")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="flashmm_pass_"))
    if args.h5ad:
        h5ad = Path(args.h5ad)
        build = {"seconds": None}
    else:
        h5ad = work / f"atlas_{args.cells}x{args.genes}.h5ad"
        print(f"building {h5ad} ...", flush=True)
        build = build_h5ad(h5ad, args.cells, args.genes)
    import h5py

    with h5py.File(h5ad, "r") as f:
        n_cells, n_genes = (int(x) for x in f["X"].attrs["shape"])
        nnz = int(f["X"]["data"].shape[0])
    py = sys.executable
    common = [str(h5ad), "--formula", FORMULA, "--groups", "donor", "--transform", "log2p1"]
    variants = {
        "floor": ([py, str(HERE / "bench_floor.py"), str(h5ad)], ROOT, None),
        "stats": ([py, "-m", "flashmm", "stats", *common, "--out", str(work / "s.npz")], ROOT, None),
        "stats_1thread": ([py, "-m", "flashmm", "stats", *common, "--out", str(work / "s1.npz")], ROOT,
                          {"NUMBA_NUM_THREADS": "1"}),
        "fit": ([py, "-m", "flashmm", "fit", *common, "--out", str(work / "r.csv")], ROOT, None),
    }
    if shutil.which("taskset"):
        variants["stats_1core"] = (["taskset", "-c", "0", py, "-m", "flashmm", "stats", *common,
                                    "--out", str(work / "s1c.npz")], ROOT,
                                   {"NUMBA_NUM_THREADS": "1"})
    if args.baseline:
        variants["fit_baseline"] = ([py, "-m", "flashmm", "fit", *common, "--out",
                                     str(work / "rb.csv")], Path(args.baseline), None)
    _run(variants["stats"][0], ROOT)                 # warm the page cache and numba's cache
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for name, (cmd, tree, env) in variants.items():
            runs[name].append(_run(cmd, tree, env))
            print(f"repeat {r} {name}: {json.dumps(runs[name][-1])}", flush=True)
    load_after = os.getloadavg()

    def per_repeat(num: str, key: str, den: str, dkey: str) -> list[float]:
        return [a[key] / b[dkey] for a, b in zip(runs[num], runs[den], strict=True)]

    ratios = {
        "pass_over_floor": per_repeat("stats", "pass_seconds", "floor", "floor_seconds"),
        "stats_command_over_floor": per_repeat("stats", "wall_seconds", "floor", "floor_seconds"),
        "fit_over_floor": per_repeat("fit", "wall_seconds", "floor", "floor_seconds"),
        "thread_speedup": per_repeat("stats_1thread", "pass_seconds", "stats", "pass_seconds"),
    }
    if "stats_1core" in runs:
        ratios["core_speedup"] = per_repeat("stats_1core", "pass_seconds", "stats", "pass_seconds")
    if args.baseline:
        ratios["baseline_fit_over_fit"] = per_repeat("fit_baseline", "wall_seconds", "fit", "wall_seconds")
    medians = {k: float(np.median(v)) for k, v in ratios.items()}
    peak = max(r["peak_rss_gb"] for k in ("stats", "fit") for r in runs[k])
    record = {
        "benchmark": "statistics pass and flashmm fit against the floor (bench_pass.py)",
        "machine": info, "load_average_before": load_before, "load_average_after": load_after,
        "numba_threads_default": os.cpu_count(),
        "data": {"n_cells": n_cells, "n_genes": n_genes, "nnz": nnz,
                 "file_gb": h5ad.stat().st_size / 1e9, "build": build,
                 "full_size": (n_cells, n_genes) == (499_713, 11_596)},
        "formula": FORMULA, "groups": "donor", "transform": "log2p1",
        "runs": runs, "ratios_runs": ratios, "ratios_median": medians,
        "peak_rss_gb_max": peak, "targets": TARGETS,
        "targets_met": {
            "pass_over_floor": medians["pass_over_floor"] <= TARGETS["pass_over_floor"],
            "fit_over_floor": medians["fit_over_floor"] <= TARGETS["fit_over_floor"],
            "thread_speedup": medians["thread_speedup"] >= TARGETS["thread_speedup"],
            "core_speedup": medians.get("core_speedup", 0.0) >= TARGETS["thread_speedup"],
            "peak_gb": peak < TARGETS["peak_gb"],
        },
    }
    print(json.dumps({"ratios_median": medians, "peak_rss_gb_max": peak,
                      "load": [load_before, load_after]}, indent=2))
    save_result(Path(args.out), record)
    if not args.keep and not args.h5ad:
        h5ad.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
