"""flashmm's statistics pass against FLASHMM's ``sslmm`` (R), on FLASHMM's own simulator output.

Data: ``benchmarks/bench_sslmm.R simulate`` draws a reference of 2,000 genes x
10,000 cells with ``rnbinom`` (per gene ``mu = 1 + rpois(0.9)``, ``size = 1 +
rpois(1)``, as ``simuRNAseq`` draws its own default reference, seed 2502) and
simulates from it with FLASHMM's ``simuRNAseq`` (seed 2503) a study of 2,000
genes x 100,000 cells, 25 samples nested in 2 treatments, 10 cell types, 100
cell-type-specific DE genes; about 67% of the counts are non-zero (the exact
fraction is recorded).  It is written once to ``--data`` (default
``/tmp/sslmm_data``: int32 counts, metadata CSV) and reused when present.

Both sides use FLASHMM's documented model: ``Y = log(1 + counts)``, ``X =
model.matrix(~ 0 + log(libsize) + cls + cls:trt)`` (21 columns) and a random
intercept for the 25 samples (``Z = model.matrix(~ 0 + sam)``; in flashmm
``build_design(X, n, groups=sam)`` with the same 21 columns in R's order).

Measured, in one session, with interleaved repeats (the order alternates from
one round to the next, so machine load affects both languages alike):

* ``sslmm``: ``system.time(sslmm(X, Y, Z))[["elapsed"]]`` in one long-lived
  ``Rscript bench_sslmm.R serve`` process: Y an in-memory dense genes x cells
  double matrix already holding ``log1p(counts)``, X and Z in-memory dense
  model matrices, default ``nBlocks`` (2 here).  It includes every statistic
  sslmm returns (XX, XY, ZX, ZY, ZZ, Ynorm); ``system.time`` runs ``gc()``
  before it starts the clock.  Not included: R start-up, reading the files,
  the transform, ``model.matrix``.
* ``flashmm_dense``: ``SufficientStats.from_design(design, Y)`` with Y an
  in-memory C-contiguous float64 cells x genes ``ndarray`` already holding
  ``log1p(counts)`` (the same values R gets), the design built beforehand:
  input checks, chunking, the fused kernel on numba's default threads, XX, ZX,
  ZZ and the result object.
* ``flashmm_csr``: the same from a ``scipy.sparse`` CSR float64 matrix of
  ``log1p(counts)`` built beforehand (its construction is not timed).
* ``flashmm_csr_counts_log1p`` (extra, flashmm's usual path): the same from
  the raw counts as CSR float32, with ``transform="log1p"`` applied inside the
  pass -- it does the transform that the other timings leave out.

Neither side's timing includes loading the data.  One untimed warm-up run of
each (numba compilation; R's first allocation, whose statistics are written
for the comparison) precedes the timed rounds.  Every run, the medians, the
ratio of medians ``sslmm / flashmm`` and the per-round ratios are recorded,
with the load averages and the thread settings (both languages at their
defaults: R here links the reference BLAS, single-threaded; numba uses every
core).  The statistics of flashmm are compared with those sslmm returns (XX,
XY, ZX, ZY, ZZ, Ynorm, n): maximum relative difference, element by element.

Target: ``sslmm / flashmm >= 2`` (medians), for the dense input and for CSR.

Usage (from the repository root; needs ``Rscript`` with FLASHMM and jsonlite)::

    python benchmarks/bench_sslmm.py               # full size, 5 rounds (~4.5 min; ~3.5 reusing the data)
    python benchmarks/bench_sslmm.py --repeats 3
    python benchmarks/bench_sslmm.py --quick       # small smoke run, not saved

It prints a table and writes ``benchmarks/results/sslmm.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _common import machine_info, save_result  # noqa: E402

from flashmm._design import build_design  # noqa: E402
from flashmm.stats import SufficientStats  # noqa: E402

R_SCRIPT = HERE / "bench_sslmm.R"
RESULTS = HERE / "results" / "sslmm.json"
TARGET = 2.0
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
              "NUMBA_THREADING_LAYER", "R_MATPROD")


def simulate(data: Path, genes: int, cells: int) -> tuple[dict, float | None]:
    """Run ``bench_sslmm.R simulate`` unless ``data`` already holds that study."""
    info_path = data / "info.json"
    if info_path.exists() and (data / "counts_int32.bin").exists():
        info = json.loads(info_path.read_text())
        if (info["n_genes"], info["n_cells"]) == (genes, cells):
            print(f"reusing the simulated study in {data}", flush=True)
            return info, None
    print(f"simulating {genes} genes x {cells} cells with simuRNAseq into {data} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(["Rscript", str(R_SCRIPT), "simulate", str(data), str(genes), str(cells)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit("simulation failed")
    return json.loads(info_path.read_text()), wall


def load(data: Path, info: dict) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """Counts (cells x genes int32), metadata and gene names."""
    counts = np.fromfile(data / "counts_int32.bin", dtype="<i4")
    counts = counts.reshape(info["n_cells"], info["n_genes"])      # R's column-major genes x cells
    meta = pd.read_csv(data / "metadata.csv", dtype={"cell": str, "sam": str, "cls": str, "trt": str})
    genes = (data / "genes.txt").read_text().split()
    return counts, meta, genes


def design_of(meta: pd.DataFrame):  # noqa: ANN201 - flashmm Design
    """R's ``model.matrix(~ 0 + log(libsize) + cls + cls:trt)`` (its column order); intercept per sample."""
    cls = meta["cls"].to_numpy()
    trt = meta["trt"].to_numpy()
    levels = sorted(set(cls))                      # R's factor levels (C collation)
    treated = sorted(set(trt))[-1]                 # trt coded by contrast: the last level
    onehot = (cls[:, None] == np.array(levels)[None, :]).astype(float)
    X = np.column_stack([np.log(meta["libsize"].to_numpy(float)), onehot,
                         onehot * (trt == treated)[:, None]])
    names = (["log(libsize)"] + [f"cls{v}" for v in levels]
             + [f"cls{v}:trt{treated}" for v in levels])
    return build_design(X, len(meta), groups=meta["sam"].to_numpy(), exog_names=names,
                        group_name="sam")


class RServer:
    """A ``bench_sslmm.R serve`` process holding the study in memory."""

    def __init__(self, data: Path) -> None:
        self.stderr = open(data / "r_serve.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(["Rscript", str(R_SCRIPT), "serve", str(data)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"R stopped; see {self.stderr.name}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def peak_rss_gb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
        except OSError:
            pass
        return None

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.stderr.close()


def read_sslmm(data: Path) -> tuple[dict, dict]:
    """The statistics ``dump`` wrote: arrays and their names."""
    out = data / "sslmm_stats"
    meta = json.loads((out / "meta.json").read_text())
    arrays = {k: np.fromfile(out / f"{k}.bin", dtype="<f8").reshape(shape, order="F")
              for k, shape in meta["shapes"].items()}
    arrays["Ynorm"] = arrays["Ynorm"].ravel()
    return arrays, meta


def agreement(st: SufficientStats, ref: dict, meta: dict) -> dict:
    """Maximum relative differences between flashmm's statistics and sslmm's."""
    assert list(st.exog_names) == meta["X_names"], (st.exog_names, meta["X_names"])
    assert list(st.gene_names) == meta["gene_names"][:len(st.gene_names)]
    levels = list(st.components[0].levels)
    perm = np.array([levels.index(z.removeprefix("sam")) for z in meta["Z_names"]])
    mine = {"XX": st.XX, "XY": st.XY, "ZX": st.ZX[perm], "ZY": st.ZY[perm],
            "ZZ": st.ZZ[np.ix_(perm, perm)], "Ynorm": st.yy}
    out: dict[str, dict[str, float]] = {}
    for k, a in mine.items():
        b = ref[k]
        assert a.shape == b.shape, (k, a.shape, b.shape)
        diff = np.abs(a - b)
        nz = b != 0
        out[k] = {
            "max_abs": float(diff.max()),
            "max_rel_elementwise": float((diff[nz] / np.abs(b[nz])).max()) if nz.any() else 0.0,
            "max_abs_where_sslmm_zero": float(diff[~nz].max()) if (~nz).any() else 0.0,
            "max_rel_to_max": float(diff.max() / np.abs(b).max()),
        }
    out["n"] = {"flashmm": int(st.n), "sslmm": int(meta["n"]), "equal": int(st.n) == int(meta["n"])}
    out["max_rel_elementwise_overall"] = max(v["max_rel_elementwise"] for k, v in out.items()
                                             if k != "n")
    return out


def timed(func) -> float:  # noqa: ANN001
    gc.collect()
    t0 = time.perf_counter()
    func()
    return time.perf_counter() - t0


def thread_settings() -> dict:
    import numba

    info: dict = {"env": {k: os.environ.get(k) for k in THREAD_ENV},
                  "numba_num_threads": numba.get_num_threads(),
                  "numba_threading_layer": None, "cpu_count": os.cpu_count()}
    try:
        info["numba_threading_layer"] = numba.threading_layer()
    except ValueError:                              # no parallel region run yet
        pass
    try:
        from threadpoolctl import threadpool_info

        info["python_blas"] = [{k: d.get(k) for k in ("internal_api", "num_threads", "version")}
                               for d in threadpool_info()]
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    """Simulate (once), interleave sslmm and flashmm, compare, write ``results/sslmm.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="study directory (default /tmp/sslmm_data)")
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small smoke run (not saved)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.genes, args.cells, args.repeats, args.no_save = 200, 5_000, 3, True
    data = Path(args.data or ("/tmp/sslmm_quick" if args.quick else "/tmp/sslmm_data"))
    t_start = time.perf_counter()
    info = machine_info()

    sim_info, sim_wall = simulate(data, args.genes, args.cells)
    print(f"study: {sim_info['n_genes']} genes x {sim_info['n_cells']} cells, "
          f"{sim_info['nonzero_fraction']:.2%} non-zero", flush=True)

    t0 = time.perf_counter()
    counts, meta, genes = load(data, sim_info)
    design = design_of(meta)
    Y_dense = np.log1p(counts, dtype=np.float64)                 # cells x genes, C order
    Y_csr = sp.csr_matrix(Y_dense)
    counts_csr = sp.csr_matrix(counts.astype(np.float32))
    del counts
    t_load = time.perf_counter() - t0
    inputs = {
        "flashmm_dense": (Y_dense, None),
        "flashmm_csr": (Y_csr, None),
        "flashmm_csr_counts_log1p": (counts_csr, "log1p"),
    }

    def run(name: str) -> SufficientStats:
        endog, transform = inputs[name]
        return SufficientStats.from_design(design, endog, transform=transform, gene_names=genes)

    print(f"Python inputs ready in {t_load:.1f} s (dense {Y_dense.nbytes / 1e9:.2f} GB, "
          f"CSR {(Y_csr.data.nbytes + Y_csr.indices.nbytes + Y_csr.indptr.nbytes) / 1e9:.2f} GB, "
          f"nnz {Y_csr.nnz})", flush=True)

    t0 = time.perf_counter()
    r = RServer(data)
    r_load = time.perf_counter() - t0
    print(f"R session ready in {r_load:.1f} s (its load: {r.ready['load_seconds']:.1f} s, "
          f"nBlocks {r.ready['nBlocks']})", flush=True)

    # warm-up (untimed) and the agreement of what is being timed
    warm = {"sslmm": r.ask("dump")["seconds"]}
    ref, ref_meta = read_sslmm(data)
    agree = {}
    for name in inputs:
        t0 = time.perf_counter()
        st = run(name)
        warm[name] = time.perf_counter() - t0
        agree[name] = agreement(st, ref, ref_meta)
        del st
    print("warm-up s:", {k: round(v, 3) for k, v in warm.items()}, flush=True)
    print("max relative difference to sslmm:",
          {k: f"{v['max_rel_elementwise_overall']:.2e}" for k, v in agree.items()}, flush=True)

    variants = ["sslmm", *inputs]
    runs: dict[str, list[float]] = {k: [] for k in variants}
    r_cpu: list[dict] = []
    load_before = list(os.getloadavg())
    for rep in range(args.repeats):
        order = variants if rep % 2 == 0 else variants[::-1]
        for name in order:
            if name == "sslmm":
                res = r.ask("time")
                runs[name].append(res["seconds"])
                r_cpu.append(res)
            else:
                runs[name].append(timed(lambda name=name: run(name)))
        print(f"round {rep}: " + "  ".join(f"{k} {runs[k][-1]:.3f}" for k in variants), flush=True)
    load_after = list(os.getloadavg())
    r_peak = r.peak_rss_gb()
    r.close()

    med = {k: float(np.median(v)) for k, v in runs.items()}
    ratio = {k: med["sslmm"] / med[k] for k in inputs}
    ratio_runs = {k: [s / f for s, f in zip(runs["sslmm"], runs[k], strict=True)] for k in inputs}
    total = time.perf_counter() - t_start
    record = {
        "benchmark": "flashmm statistics pass against FLASHMM's sslmm on simuRNAseq output "
                     "(bench_sslmm.py)",
        "machine": info,
        "load_average_before": load_before, "load_average_after": load_after,
        "threads": {"python": thread_settings(), "R": r.ready["software"]},
        "data": {**sim_info, "directory": str(data), "simulated_now": sim_wall is not None,
                 "simulate_wall_seconds": sim_wall, "k_fe": design.k_fe,
                 "k_re": int(design.exog_re.shape[1]), "nnz_python": int(Y_csr.nnz),
                 "full_size": (args.genes, args.cells) == (2_000, 100_000)},
        "model": {"transform": "Y = log(1 + counts)",
                  "X": "model.matrix(~ 0 + log(libsize) + cls + cls:trt)",
                  "Z": "model.matrix(~ 0 + sam) (flashmm: build_design(X, n, groups=sam))",
                  "X_names": design.exog_names},
        "timing_definitions": {
            "sslmm": "elapsed of system.time(sslmm(X, Y, Z)) (gc() before the clock) in one "
                     "long-lived R session; Y in-memory dense genes x cells double matrix of "
                     f"log1p(counts); default nBlocks = {r.ready['nBlocks']}",
            "flashmm_dense": "SufficientStats.from_design(design, Y) with Y an in-memory "
                             "C-contiguous float64 cells x genes ndarray of log1p(counts)",
            "flashmm_csr": "the same with Y an in-memory CSR float64 matrix of log1p(counts)",
            "flashmm_csr_counts_log1p": "the same from the counts as CSR float32 with "
                                        "transform='log1p' inside the pass",
            "not_timed": "simulation, loading the files, log1p (except the last variant), "
                         "design / model.matrix, building the CSR matrices",
        },
        "repeats": args.repeats, "interleaving": "order alternates each round",
        "warmup_seconds": warm,
        "seconds_runs": runs, "seconds_median": med,
        "sslmm_cpu_runs": r_cpu,
        "ratio_sslmm_over_flashmm_of_medians": ratio,
        "ratio_sslmm_over_flashmm_runs": ratio_runs,
        "ratio_sslmm_over_flashmm_runs_median": {k: float(np.median(v)) for k, v in ratio_runs.items()},
        "target_ratio": TARGET,
        "target_met": {k: v >= TARGET for k, v in ratio.items()},
        "agreement_with_sslmm": agree,
        "memory": {"python_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                   "r_session_peak_rss_gb": r_peak},
        "setup_seconds": {"python_inputs": t_load, "r_session_start": r_load,
                          "r_load": r.ready["load_seconds"]},
        "total_wall_seconds": total,
    }

    print(f"\n{'variant':<28}{'median s':>10}{'sslmm / it':>12}   runs")
    for k in variants:
        rr = "" if k == "sslmm" else f"{ratio[k]:.1f}"
        print(f"{k:<28}{med[k]:>10.3f}{rr:>12}   " + " ".join(f"{t:.3f}" for t in runs[k]))
    print(f"target sslmm / flashmm >= {TARGET:g}: "
          + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in record["target_met"].items()))
    print(f"load average {load_before} -> {load_after}; total {total:.0f} s")
    if not args.no_save:
        save_result(Path(args.out), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
