"""Save a fit's results to one ``.npz`` file and load them back, without pickle.

File layout (format ``"flashmm-results"``, version :data:`RESULTS_VERSION`):

* ``meta``: a 0-d string array holding JSON: the format and version, the
  flashmm version, the engine (``"one-component"`` or ``"structured"``),
  ``reml``, ``method``, ``df_method``, the statistics' metadata (as
  :meth:`SufficientStats.save`), the formula description that rebuilds the
  patsy designs for predictions (:class:`~flashmm._formula_spec.FormulaSpec`,
  or null), the names of the arrays and a SHA-256 ``checksum`` of the
  metadata and every array;
* ``stats_<name>``: the sufficient statistics (``XX``, ``ZX``, ``ZZ``, ``XY``,
  ``ZY``, ``yy``, ``gene_names`` and any known-covariance factor ``L_<i>``);
* ``fit_<name>``: the fitted covariance parameters and per-gene fit state
  (``ratios``, ``scale``, ``llf``, ``converged``, ``n_iter``, ``status``, and
  where present ``se_theta``, ``top_vcomp``, ``theta``, ``gene_scale``).

Everything else (fixed effects, BLUPs, standard errors, df, tests) is derived
from these by the same code as after the fit, so the reloaded results give
the same numbers.  The same metadata and arrays can be stored in an AnnData
(``write_results(..., reloadable=True)``) and loaded from it.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ._engine import EngineFit
from ._formula_spec import FormulaSpec
from ._results_file import (
    _FIT_ARRAYS,
    _FIT_OPTIONAL,
    ENGINE_ONE,
    ENGINE_STRUCTURED,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    ResultsFileError,
    checksum,
    results_arrays,
    save_results,
)
from ._slopes import RandomSlopesResults, ThetaEngineFit, criterion_of, structure_of
from ._version import __version__
from .model import MultiGeneMixedLM
from .results import MultiGeneMixedLMResults
from .stats import SufficientStats

__all__ = ["save_results", "load_results", "results_arrays", "RESULTS_FORMAT",
           "RESULTS_VERSION", "ResultsFileError"]

# ------------------------------------------------------------------- load
def load_results(source: Any, key: str = "flashmm") -> MultiGeneMixedLMResults:
    """Results saved by ``results.save(path)`` or ``write_results(..., reloadable=True)``.

    Parameters
    ----------
    source : str, PathLike or AnnData
        A ``.npz`` file written by :meth:`MultiGeneMixedLMResults.save`; an
        AnnData, or the path of an ``.h5ad`` file, holding results written by
        :func:`flashmm.write_results` with ``reloadable=True``.
    key : str
        With an AnnData: the ``key_added`` of :func:`~flashmm.write_results`.

    Returns
    -------
    MultiGeneMixedLMResults
        Every method answers as for the fit; :meth:`predict` needs new
        covariates (the fitting cells are not stored).

    Raises
    ------
    ResultsFileError
        The file is not a flashmm results file, was written by another format
        version, is truncated, or was modified (checksum).
    """
    from ._anndata import is_anndata

    if is_anndata(source):
        meta, arrays = _from_anndata(source, key)
        where = f"adata.uns[{key!r}]"
    elif Path(os.fspath(source)).suffix.lower() == ".h5ad":
        import anndata

        meta, arrays = _from_anndata(anndata.read_h5ad(source), key)
        where = f"{os.fspath(source)!r} (uns[{key!r}])"
    else:
        meta, arrays = _read_npz(source)
        where = repr(os.fspath(source))
    return results_from_arrays(meta, arrays, where)


def _read_npz(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    where = repr(os.fspath(path))
    try:
        with np.load(path, allow_pickle=False) as f:
            contents = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise ResultsFileError(f"{where} is not a readable .npz file (truncated or not written "
                               f"by results.save?): {err}") from None
    if "meta" not in contents:
        raise ResultsFileError(f"{where} is not a flashmm results file (no metadata).")
    try:
        meta = json.loads(str(contents.pop("meta")))
    except json.JSONDecodeError:
        raise ResultsFileError(f"{where} has unreadable flashmm metadata.") from None
    return meta, contents


def _from_anndata(adata: Any, key: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if key not in adata.uns:
        raise ResultsFileError(f"the AnnData has no flashmm results under key {key!r} in uns.")
    stored = adata.uns[key]
    saved = stored.get("reloadable") if hasattr(stored, "get") else None
    if saved is None:
        raise ResultsFileError(
            f"adata.uns[{key!r}] holds the result tables of write_results but not what rebuilds "
            "the results: the sufficient statistics (X'X, Z'X, Z'Z, X'Y, Z'Y, y'y) and the "
            "fitted covariance parameters are missing. Write them with "
            "flashmm.write_results(adata, results, reloadable=True), or save the results to "
            "a file with results.save(path).")
    saved = dict(saved)
    try:
        meta = json.loads(str(saved.pop("meta")))
    except (KeyError, json.JSONDecodeError):
        raise ResultsFileError(f"adata.uns[{key!r}]['reloadable'] has no readable metadata.") \
            from None
    return meta, {str(k): np.asarray(v) for k, v in saved.items()}


def results_from_arrays(meta: dict[str, Any], arrays: dict[str, np.ndarray],
                        where: str) -> MultiGeneMixedLMResults:
    """Results from :func:`results_arrays`' output, after the format and checksum checks."""
    _check_file(meta, arrays, where)
    stats_arrays = {k[len("stats_"):]: v for k, v in arrays.items() if k.startswith("stats_")}
    stats = SufficientStats.from_arrays(meta["stats"], stats_arrays, where)
    model = MultiGeneMixedLM.from_sufficient_stats(stats)
    if meta.get("design") is not None:
        model.formula_spec = FormulaSpec.from_json(meta["design"])
    fit = {k[len("fit_"):]: v for k, v in arrays.items() if k.startswith("fit_")}
    common = {name: fit[name] for name in _FIT_ARRAYS}
    common["status"] = fit["status"].astype(str)
    common.update({name: fit.get(name) for name in _FIT_OPTIONAL})
    reml = bool(meta["reml"])
    if meta["engine"] == ENGINE_ONE:
        eng = EngineFit(reml=reml, method=str(meta["method"]), **common)
        return MultiGeneMixedLMResults(model, eng, df_method=str(meta["df_method"]))
    st = structure_of(stats)
    c = fit["gene_scale"]
    eng = ThetaEngineFit(reml=reml, method=str(meta["method"]), theta=fit["theta"],
                         structure=st, criterion=criterion_of(stats, st, reml, c),
                         gene_scale=c, **common)
    return RandomSlopesResults(model, eng, df_method=str(meta["df_method"]))


def _check_file(meta: dict[str, Any], arrays: dict[str, np.ndarray], where: str) -> None:
    """Format, version, the arrays listed in the metadata and the checksum."""
    if meta.get("format") != RESULTS_FORMAT:
        hint = (" (a statistics file: load it with SufficientStats.load)"
                if meta.get("format") == "flashmm-sufficient-statistics" else "")
        raise ResultsFileError(f"{where} is not a flashmm results file{hint}.")
    if meta.get("version") != RESULTS_VERSION:
        raise ResultsFileError(
            f"{where} was written in results format version {meta.get('version')} (by flashmm "
            f"{meta.get('flashmm_version')}); this flashmm {__version__} reads version "
            f"{RESULTS_VERSION}. Refit, or load it with the flashmm that wrote it.")
    listed = set(meta.get("arrays") or [])
    missing = sorted(listed - set(arrays))
    if missing:
        raise ResultsFileError(f"{where} lacks the arrays {missing} (truncated file?).")
    extra = sorted(set(arrays) - listed)
    if extra:
        raise ResultsFileError(f"{where} has arrays {extra} that its metadata does not list "
                               "(modified file?).")
    if meta.get("engine") not in (ENGINE_ONE, ENGINE_STRUCTURED):
        raise ResultsFileError(f"{where}: unknown engine {meta.get('engine')!r}.")
    if checksum(meta, arrays) != meta.get("checksum"):
        raise ResultsFileError(f"{where} does not match its checksum: the file was modified or "
                               "damaged after it was written; save the results again.")
