"""Checkpoints of a long statistics pass, and atomic writes of ``.npz`` files.

A checkpoint holds the running sums after a number of whole chunks, the row
where the pass goes on, and a fingerprint of what was being computed: the
input (shape, stored values, file size and modification time), the design
(formulas and a digest of ``X`` and ``Z``), the transform and the chunking.
A pass started again with a checkpoint of another fingerprint refuses it
rather than mixing sums of different data.  Every file is written under a
temporary name in the same directory and renamed over the target, so a
reader never sees a partial file at the target path.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._errors import StatsError

__all__ = ["design_digest", "save_npz_atomic", "write_checkpoint", "read_checkpoint",
           "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "flashmm-stats-checkpoint"
_SUMS = ("XYt", "ZY", "yy", "n_cells")


def design_digest(X: np.ndarray, Z: sp.spmatrix) -> str:
    """SHA-256 of the fixed and random designs' values (a change of formula or covariates changes it)."""
    h = hashlib.sha256()
    Z = sp.csr_matrix(Z)
    for arr in (np.ascontiguousarray(X, dtype=np.float64), Z.data, Z.indices, Z.indptr,
                np.asarray(X.shape + Z.shape)):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def save_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` to a temporary file beside ``path``, then an atomic rename onto it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_checkpoint(path: str | os.PathLike, fingerprint: dict[str, Any], next_row: int,
                     chunks_done: int, sums: dict[str, np.ndarray]) -> None:
    """Save the running sums after ``chunks_done`` chunks (the pass goes on at ``next_row``)."""
    meta = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "next_row": int(next_row),
            "chunks_done": int(chunks_done)}
    save_npz_atomic(path, meta=np.array(json.dumps(meta)), **{k: sums[k] for k in _SUMS})


def read_checkpoint(path: str | os.PathLike,
                    fingerprint: dict[str, Any]) -> tuple[int, int, dict[str, np.ndarray]] | None:
    """``(next_row, chunks_done, sums)`` of a matching checkpoint, None if there is none.

    A checkpoint written for another input, design, transform or chunking
    raises a :class:`~flashmm.StatsError` that names what differs.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            sums = {k: f[k] for k in _SUMS}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise StatsError(f"checkpoint {str(path)!r} is unreadable ({err}); delete it to start "
                         "the pass from the beginning.") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise StatsError(f"{str(path)!r} is not a flashmm checkpoint; delete or move it.")
    saved = meta.get("fingerprint", {})
    differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differ:
        detail = "; ".join(f"{k}: checkpoint {_short(saved.get(k))} vs now {_short(fingerprint.get(k))}"
                           for k in differ[:4])
        raise StatsError(
            f"checkpoint {str(path)!r} was written for a different pass ({detail}). It is not "
            "used: delete it to start again, or rerun with the original input, formula and "
            "chunking to resume."
        )
    return int(meta["next_row"]), int(meta["chunks_done"]), sums


def _short(x: Any) -> str:
    s = json.dumps(x)
    return s if len(s) < 60 else s[:57] + "..."
