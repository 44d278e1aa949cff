"""Write a fit's results as arrays and JSON metadata (the save side of :mod:`flashmm._persist`).

Below the model layer: it reads the results' statistics and fit state only,
so :meth:`MultiGeneMixedLMResults.save` does not reach the model or the
engines.  The layout is described in :mod:`flashmm._persist`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from ._engine import EngineFit
from ._errors import FlashmmError, StatsError
from ._version import __version__

__all__ = ["save_results", "results_arrays", "checksum", "RESULTS_FORMAT", "RESULTS_VERSION",
           "ENGINE_ONE", "ENGINE_STRUCTURED", "ResultsFileError"]

RESULTS_FORMAT = "flashmm-results"
RESULTS_VERSION = 1

ENGINE_ONE = "one-component"
ENGINE_STRUCTURED = "structured"

_FIT_ARRAYS = ("ratios", "scale", "llf", "converged", "n_iter", "status")
_FIT_OPTIONAL = ("se_theta", "top_vcomp")
_THETA_ARRAYS = ("theta", "gene_scale")


class ResultsFileError(StatsError):
    """A results file (or AnnData entry) is not a complete, unmodified flashmm results file."""


# ------------------------------------------------------------------- save
def save_results(results: Any, path: str | os.PathLike,
                 design: bool = True) -> None:
    """Write ``results`` to ``path`` (``.npz``); see the module docstring for the layout.

    Parameters
    ----------
    results : MultiGeneMixedLMResults
        A fit (one component or the structured engine).
    path : str or PathLike
        Destination; numpy adds ``.npz`` if the name lacks it.
    design : bool
        Store the formula description that rebuilds the patsy designs of
        ``from_formula`` models for :meth:`predict`.  A formula with a
        stateful transform (``center``, ``standardize``, ``scale``) is refused;
        ``design=False`` saves without it (predictions then need arrays).
    """
    meta, arrays = results_arrays(results, design=design)
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def results_arrays(results: Any,
                   design: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metadata (with its checksum) and arrays that :func:`results_from_arrays` reloads."""
    engine = _engine_of(results)
    stats_meta, stats_arrays = results.stats.to_arrays()
    arrays = {f"stats_{k}": np.asarray(v) for k, v in stats_arrays.items()}
    arrays.update(_fit_arrays(results._fit, engine))
    spec = getattr(results.model, "formula_spec", None) if design else None
    if spec is not None:
        spec.check_saveable()
    meta = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "flashmm_version": __version__,
        "engine": engine,
        "reml": bool(results.reml),
        "method": str(results._fit.method),
        "df_method": str(results.df_method),
        "stats": stats_meta,
        "design": None if spec is None else spec.to_json(),
        "arrays": sorted(arrays),
    }
    meta["checksum"] = checksum(meta, arrays)
    return meta, arrays


def _engine_of(results: Any) -> str:
    engine = getattr(type(results), "saved_engine", None)
    if engine is not None:
        return engine
    raise FlashmmError(f"{type(results).__name__} cannot be saved; save each of its fits "
                       "(MultiGeneMixedLMResults) separately.")


def _fit_arrays(fit: EngineFit, engine: str) -> dict[str, np.ndarray]:
    names = _FIT_ARRAYS + _FIT_OPTIONAL + (_THETA_ARRAYS if engine == ENGINE_STRUCTURED else ())
    out = {}
    for name in names:
        value = getattr(fit, name)
        if value is not None:
            out[f"fit_{name}"] = np.asarray(value).astype(str) if name == "status" \
                else np.asarray(value)
    return out


def checksum(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the metadata (without its checksum) and of every array's type, shape and values.

    Strings are hashed as UTF-8 whatever their storage (fixed-width numpy or
    object arrays, as an AnnData file returns them), numbers in little-endian
    order, so the digest survives ``write_h5ad`` / ``read_h5ad``.
    """
    h = hashlib.sha256()
    body = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(body, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        h.update(f"|{name}|{a.shape}|".encode())
        if a.dtype.kind in "OUS":
            h.update(b"str|")
            for v in a.ravel():
                s = str(v).encode()
                h.update(f"{len(s)}:".encode() + s)
        else:
            h.update(a.dtype.newbyteorder("<").str.encode() + b"|")
            h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


