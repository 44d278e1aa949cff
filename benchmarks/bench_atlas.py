"""End-to-end benchmark of ``flashmm fit`` on an atlas-sized backed ``.h5ad`` file.

The synthetic file has the shape of the published tuberculosis single-cell atlas
(499,713 cells x 11,596 genes, ~7% non-zero counts, 259 donors, a few cell
types, a donor-level treatment).  It is written chunk by chunk straight into
the on-disk AnnData layout (CSR ``X`` in resizable HDF5 datasets), so building
it never holds the matrix in memory.  ``flashmm fit`` then runs in a
subprocess on the backed file; wall time and peak resident memory (``/usr/bin/time
-v`` if available, else ``getrusage(RUSAGE_CHILDREN)``) are recorded.

Targets: < 3 minutes and < 4 GB peak RSS at full size.

Usage::

    python benchmarks/bench_atlas.py                      # full size
    python benchmarks/bench_atlas.py --cells 50000 --genes 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

FULL_CELLS = 499_713
FULL_GENES = 11_596
FORMULA = "~ 0 + np.log(libsize) + cls + cls:trt"
TARGET_SECONDS = 180.0
TARGET_GB = 4.0


def build_h5ad(path: Path, n_cells: int, n_genes: int, n_donors: int = 259, n_celltypes: int = 5,
               density: float = 0.07, chunk: int = 4096, seed: int = 0) -> dict[str, float]:
    """Write a synthetic sparse-count AnnData file chunk by chunk.

    Parameters
    ----------
    path : Path
        Output ``.h5ad``.
    n_cells, n_genes : int
        Shape of ``X``.
    n_donors, n_celltypes : int
        Donors (random effect; each donor is in one treatment arm) and cell types.
    density : float
        Mean fraction of non-zero counts (gene detection rates vary around it).
    chunk : int
        Cells generated and written per step (memory ~ ``chunk x n_genes`` floats).
    seed : int
        Random seed.

    Returns
    -------
    dict
        ``seconds``, ``nnz`` and ``file_gb``.
    """
    import h5py

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    donor = rng.integers(0, n_donors, size=n_cells)
    donor_arm = rng.permutation(np.arange(n_donors) % 2)
    cls = rng.integers(0, n_celltypes, size=n_cells)
    # 24 processing batches; each donor's cells are spread over 3 consecutive ones
    batch = (rng.integers(0, 24, size=n_donors)[donor] + rng.integers(0, 3, size=n_cells)) % 24
    # per-gene detection rates with mean `density` (a Beta distribution)
    a = 0.7
    rate = rng.beta(a, a * (1 - density) / density, size=n_genes).astype(np.float32)
    rate = np.minimum(rate, 0.95)
    cell_factor = rng.lognormal(0.0, 0.3, size=n_cells).astype(np.float32)
    cell_factor /= cell_factor.mean()
    libsize = np.zeros(n_cells, dtype=np.int64)
    nnz = 0
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = (n_cells, n_genes)
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32,
                                chunks=(1 << 20,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32,
                                   chunks=(1 << 20,))
        indptr = g.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        for start in range(0, n_cells, chunk):
            stop = min(n_cells, start + chunk)
            u = rng.random((stop - start, n_genes), dtype=np.float32)
            u /= cell_factor[start:stop, None]
            rows, cols = np.nonzero(u < rate)
            counts = (1 + rng.geometric(0.45, size=rows.size)).astype(np.float32)
            counts[rng.random(rows.size, dtype=np.float32) < 0.5] = 1.0
            row_nnz = np.bincount(rows, minlength=stop - start)
            libsize[start:stop] = np.bincount(rows, weights=counts, minlength=stop - start)
            k = rows.size
            data.resize((nnz + k,))
            indices.resize((nnz + k,))
            data[nnz:nnz + k] = counts
            indices[nnz:nnz + k] = cols.astype(np.int32)
            indptr[start + 1:stop + 1] = nnz + np.cumsum(row_nnz)
            nnz += k
        libsize = np.maximum(libsize, 1)
        obs = pd.DataFrame(
            {
                "donor": pd.Categorical([f"D{d:03d}" for d in donor]),
                "cls": pd.Categorical([f"C{c}" for c in cls]),
                "trt": pd.Categorical(np.where(donor_arm[donor] == 1, "TB", "ctrl"),
                                      categories=["ctrl", "TB"]),
                "libsize": libsize,
                "batch": pd.Categorical([f"B{b:02d}" for b in batch]),
            },
            index=pd.Index([f"cell{i}" for i in range(n_cells)]),
        )
        var = pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(n_genes)]))
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for key in ("uns", "obsm", "varm", "layers", "obsp", "varp"):
            write_elem(f, key, {})
    return {"seconds": time.perf_counter() - t0, "nnz": int(nnz),
            "file_gb": path.stat().st_size / 1e9}


#: Random effects of the one-component model (``flashmm fit`` flags).
ONE_COMPONENT = ("--groups", "donor")


def run_fit(path: Path, out_dir: Path, chunk_size: int | None,
            random_effects: tuple[str, ...] = ONE_COMPONENT) -> dict[str, float | None]:
    """Time ``flashmm fit`` on the backed file in a subprocess; peak RSS in GB."""
    cmd = [sys.executable, "-m", "flashmm", "fit", str(path), "--formula", FORMULA,
           *random_effects, "--transform", "log2p1", "--contrast",
           "TB_C0=cls[C0]:trt[T.TB]", "--out", str(out_dir / "atlas_results.csv"), "--quiet"]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    time_bin = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    if time_bin:
        proc = subprocess.run([time_bin, "-v", *cmd], capture_output=True, text=True, env=env)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"flashmm fit failed with exit code {proc.returncode}")
    peak_gb: float | None = None
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if m:
        peak_gb = int(m.group(1)) * 1024 / 1e9
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    cpu: float | None = None
    times = [re.search(rf"{k} time \(seconds\): ([0-9.]+)", proc.stderr) for k in ("User", "System")]
    if all(times):
        cpu = sum(float(t.group(1)) for t in times if t)
    else:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = ru.ru_utime + ru.ru_stime
    last = [line for line in proc.stderr.splitlines() if line.startswith("flashmm:")]
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_gb": peak_gb,
            "message": last[-1] if last else ""}


def main(argv: list[str] | None = None) -> int:
    """Build the synthetic atlas, time ``flashmm fit``, record the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=FULL_CELLS)
    p.add_argument("--genes", type=int, default=FULL_GENES)
    p.add_argument("--donors", type=int, default=259)
    p.add_argument("--celltypes", type=int, default=5)
    p.add_argument("--density", type=float, default=0.07)
    p.add_argument("--chunk-size", type=int, default=None, help="cells per chunk of the fit")
    p.add_argument("--workdir", default=None, help="where to write the h5ad (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated h5ad")
    p.add_argument("--h5ad", default=None,
                   help="reuse an .h5ad built by an earlier --keep run (skip building)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "atlas.json"))
    args = p.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="flashmm_atlas_"))
    work.mkdir(parents=True, exist_ok=True)
    h5ad = work / f"atlas_{args.cells}x{args.genes}.h5ad"
    if args.h5ad:
        import h5py

        h5ad = Path(args.h5ad)
        with h5py.File(h5ad, "r") as f:
            args.cells, args.genes = (int(x) for x in f["X"].attrs["shape"])
            nnz = int(f["X"]["data"].shape[0])
        build = {"seconds": float("nan"), "nnz": nnz, "file_gb": h5ad.stat().st_size / 1e9}
        args.keep = True
    else:
        print(f"building {h5ad} ({args.cells} cells x {args.genes} genes) ...", flush=True)
        build = build_h5ad(h5ad, args.cells, args.genes, args.donors, args.celltypes, args.density)
    how = "reused" if args.h5ad else f"built in {build['seconds']:.1f} s"
    print(f"  {how}, nnz {build['nnz']:,} "
          f"({build['nnz'] / (args.cells * args.genes):.2%}), file {build['file_gb']:.2f} GB", flush=True)
    print("running flashmm fit on the backed file ...", flush=True)
    fit = run_fit(h5ad, work, args.chunk_size)
    full = args.cells == FULL_CELLS and args.genes == FULL_GENES
    record = {
        "full_size": full,
        "n_cells": args.cells, "n_genes": args.genes, "n_donors": args.donors,
        "n_celltypes": args.celltypes, "nnz": build["nnz"],
        "density": build["nnz"] / (args.cells * args.genes),
        "file_gb": round(build["file_gb"], 3),
        "build_seconds": None if build["seconds"] != build["seconds"] else round(build["seconds"], 1),
        "fit_seconds": round(fit["seconds"], 1),
        "fit_cpu_seconds": None if fit["cpu_seconds"] is None else round(fit["cpu_seconds"], 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "peak_rss_gb": None if fit["peak_rss_gb"] is None else round(fit["peak_rss_gb"], 3),
        "target_seconds": TARGET_SECONDS, "target_gb": TARGET_GB,
        "meets_targets": bool(fit["seconds"] < TARGET_SECONDS
                              and (fit["peak_rss_gb"] or 0) < TARGET_GB),
        "formula": FORMULA, "groups": "donor", "transform": "log2p1",
        "flashmm_message": fit["message"],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if not args.keep:
        h5ad.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
