"""The pass over the cells: chunks read ahead, reduced by the fused kernel, checkpointed.

:func:`run_pass` ties together the chunk size chosen from the memory budget
(:mod:`flashmm._reader`), the prefetching reader, the numba kernel
(:mod:`flashmm._kernel`), the finiteness checks and the checkpoints
(:mod:`flashmm._checkpoint`), and logs what it did on the ``flashmm`` logger:
the chunking at the start, and the wall time, throughput and peak memory at
the end.  It returns the per-gene sums; :mod:`flashmm.stats` assembles them.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np
import scipy.sparse as sp

from ._checkpoint import design_digest, read_checkpoint, write_checkpoint
from ._design import Design
from ._endog import apply_transform, describe_nonfinite, raise_nonfinite
from ._errors import DataError
from ._kernel import (
    Accumulators,
    KernelDesign,
    accumulate_chunk,
    accumulate_csc_rows,
)
from ._memory import format_bytes
from ._reader import Chunk, ChunkSource, plan_chunk_cells, prefetch

__all__ = ["run_pass", "DEFAULT_CHECKPOINT_EVERY", "DELAY_ENV"]

logger = logging.getLogger("flashmm")

#: Chunks between two checkpoints.
DEFAULT_CHECKPOINT_EVERY = 4

#: Test hook: seconds to sleep after every chunk (makes a pass slow enough to kill).
DELAY_ENV = "FLASHMM_TEST_CHUNK_DELAY"


def run_pass(
    design: Design,
    endog: Any,
    gene_names: list[str],
    transform: Callable[[np.ndarray], np.ndarray] | None,
    code: int | None,
    *,
    transform_name: str | None = None,
    chunk_size: int | None = None,
    max_memory: int | float | str | None = None,
    progress: Callable[[int], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> dict[str, np.ndarray]:
    """Per-gene sums ``XY``, ``ZY``, ``yy`` and ``n_cells`` of one pass over ``endog``.

    Parameters
    ----------
    design : Design
        Designs of all cells.
    endog : matrix
        Prepared expression matrix (see :class:`flashmm._reader.ChunkSource`).
    gene_names : list of str
        Gene names (error messages).
    transform : callable or None
        The transform, applied by numpy when the kernel does not know it
        (``code`` None).
    code : int or None
        The kernel's code of the transform (:data:`flashmm._kernel.TRANSFORM_CODES`).
    transform_name : str, optional
        Name of the transform (in the checkpoint's fingerprint).
    chunk_size : int, optional
        Cells per chunk; by default chosen from ``max_memory``.
    max_memory : int, float or str, optional
        Memory budget of the pass (see :func:`flashmm._memory.parse_memory`).
    progress : callable, optional
        Called with the number of cells done after every chunk (and once with
        the cells already done when resuming).
    checkpoint : path, optional
        Checkpoint file: resumed from if it exists and matches, written every
        ``checkpoint_every`` chunks, deleted at the end.
    checkpoint_every : int
        Chunks between checkpoints.
    """
    t0 = time.perf_counter()
    n, n_genes = design.nobs, len(gene_names)
    source = ChunkSource(endog, gene_names)
    kd = KernelDesign.of(design.exog, design.exog_re)
    acc = Accumulators.zeros(design.k_fe, design.exog_re.shape[1], n_genes)
    fixed = sum(a.nbytes for a in (acc.XYt, acc.ZY, acc.yy, acc.n_cells))
    cells, how = plan_chunk_cells(source, fixed, max_memory, chunk_size)
    logger.info("statistics pass over %d cells x %d genes: %s, %d thread(s)", n, n_genes, how,
                numba.get_num_threads())
    first = 0
    done = 0
    fingerprint: dict[str, Any] = {}
    if checkpoint is not None:
        fingerprint = _fingerprint(source, design, transform_name, cells, gene_names)
        resumed = read_checkpoint(checkpoint, fingerprint)
        if resumed is not None:
            first, done, sums = resumed
            acc = Accumulators(**{k: np.ascontiguousarray(v) for k, v in sums.items()})
            logger.info("resuming from checkpoint %s: %d of %d cells done", checkpoint, first, n)
            if progress is not None and first:
                progress(first)
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    for chunk in prefetch(source, cells, first):
        _reduce_chunk(acc, kd, chunk, source, transform, code, gene_names, endog, cells)
        done += 1
        if progress is not None:
            progress(chunk.stop - chunk.start)
        if checkpoint is not None and chunk.stop < n and done % max(1, checkpoint_every) == 0:
            write_checkpoint(checkpoint, fingerprint, chunk.stop, done, _sums(acc))
        if delay:
            time.sleep(delay)
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    _log_end(n - first, n_genes, time.perf_counter() - t0)
    return acc.as_partial()


def _reduce_chunk(acc: Accumulators, kd: KernelDesign, chunk: Chunk, source: ChunkSource,
                  transform: Callable[[np.ndarray], np.ndarray] | None, code: int | None,
                  names: list[str], endog: Any, cells: int) -> None:
    """Add one chunk to the sums; check values (negatives under a log, NaN/inf)."""
    block = chunk.block
    if code is None:   # a callable transform: applied by numpy, then no transform in the kernel
        block = apply_transform(block if not chunk.csc_rows else block[chunk.start:chunk.stop],
                                transform, names, check_finite=False)
        chunk = Chunk(chunk.index, chunk.start, chunk.stop, block, trusted=chunk.trusted)
        code = 0

    def negative() -> None:
        apply_transform(_rows_of(chunk), transform, names, check_finite=False)

    try:
        if chunk.csc_rows:
            accumulate_csc_rows(acc, kd, block, chunk.start, chunk.stop, code, negative)
        else:
            accumulate_chunk(acc, kd, chunk.start, block, code, negative, trusted=chunk.trusted)
    except DataError:
        raise
    except ValueError as err:        # broken indices or pointers of a read chunk
        raise source.read_error(chunk.index, chunk.start, chunk.stop, err) from None
    finite = np.isfinite(acc.yy)
    if not finite.all():
        _raise_nonfinite(_rows_of(chunk), names, names[int(np.argmin(finite))], endog, cells)


def _rows_of(chunk: Chunk) -> Any:
    """The chunk's values as rows (CSR for sparse), for the error messages that name a gene."""
    block = chunk.block[chunk.start:chunk.stop] if chunk.csc_rows else chunk.block
    return sp.csr_matrix(block) if sp.issparse(block) else block


def _raise_nonfinite(block: Any, names: list[str], gene: str, endog: Any, cells: int) -> None:
    """The NaN/inf error with the counts over the whole input (or the overflow error)."""
    try:
        raise_nonfinite(block, names, gene)
    except DataError as err:
        if "NaN or inf" not in str(err):
            raise
        raise DataError(f"{err} In all: {describe_nonfinite(endog, cells)} "
                        "(flashmm.kinship.fit_missing_patterns fits each "
                        "missing pattern of the genes separately).") from None


def _sums(acc: Accumulators) -> dict[str, np.ndarray]:
    return {"XYt": acc.XYt, "ZY": acc.ZY, "yy": acc.yy, "n_cells": acc.n_cells}


def _fingerprint(source: ChunkSource, design: Design, transform: str | None, cells: int,
                 gene_names: list[str]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed from."""
    return {
        "input": source.fingerprint(),
        "design": design_digest(design.exog, design.exog_re),
        "formula": {k: str(v) for k, v in design.info.items() if k != "terms"},
        "transform": transform,
        "chunk_cells": int(cells),
        "genes": len(gene_names),
    }


def _log_end(cells: int, genes: int, seconds: float) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logger.info("statistics pass done: %d cells x %d genes in %.1f s (%s cells/s), peak memory %s",
                cells, genes, seconds, f"{cells / max(seconds, 1e-9):,.0f}", format_bytes(peak))


def canonical_input(endog: Any) -> Any:
    """CSC input kept CSC (the kernel reads its rows), made canonical on a copy if needed."""
    if sp.issparse(endog) and endog.format == "csc" and not endog.has_canonical_format:
        endog = endog.copy()
        endog.sum_duplicates()
    return endog
