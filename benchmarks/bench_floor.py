"""The floor of a pass over a backed ``.h5ad``: read every CSR chunk, ``log2(1+x)``, per-gene sums.

Nothing a statistics pass does can take less time than reading the stored
values once and touching each of them: this script does exactly that with
h5py and numpy (``read_direct`` into reused buffers, ``np.log2(1 + x)`` in
float64, ``np.bincount`` over the column indices) and nothing else.
``bench_pass.py`` runs it next to ``flashmm stats`` and ``flashmm fit`` so the
ratios are taken under the same load.

Usage::

    python benchmarks/bench_floor.py FILE.h5ad [--chunk-cells 20000]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np


def floor_pass(path: str, chunk_cells: int = 20_000) -> dict[str, float]:
    """Read ``X`` of ``path`` chunk by chunk; return seconds, non-zeros and per-gene sums' total."""
    import h5py

    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        g = f["X"]
        n_cells, n_genes = (int(x) for x in g.attrs["shape"])
        indptr = g["indptr"][...]
        data_ds, ind_ds = g["data"], g["indices"]
        biggest = int(np.max(indptr[np.minimum(np.arange(chunk_cells, n_cells + chunk_cells, chunk_cells),
                                               n_cells)] - indptr[np.arange(0, n_cells, chunk_cells)]))
        data = np.empty(biggest, dtype=data_ds.dtype)
        ind = np.empty(biggest, dtype=ind_ds.dtype)
        sums = np.zeros(n_genes)
        for start in range(0, n_cells, chunk_cells):
            stop = min(n_cells, start + chunk_cells)
            lo, hi = int(indptr[start]), int(indptr[stop])
            k = hi - lo
            data_ds.read_direct(data, np.s_[lo:hi], np.s_[0:k])
            ind_ds.read_direct(ind, np.s_[lo:hi], np.s_[0:k])
            sums += np.bincount(ind[:k], weights=np.log2(1.0 + data[:k].astype(np.float64)),
                                minlength=n_genes)
    return {"seconds": time.perf_counter() - t0, "nnz": int(indptr[-1]), "n_cells": n_cells,
            "n_genes": n_genes, "sum": float(sums.sum()),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def main(argv: list[str] | None = None) -> int:
    """Run the floor pass on one file and print its timing as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("h5ad")
    p.add_argument("--chunk-cells", type=int, default=20_000)
    args = p.parse_args(argv)
    print(json.dumps(floor_pass(args.h5ad, args.chunk_cells), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
