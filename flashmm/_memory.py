"""Memory budgets: how much a fit may allocate, and a clear refusal before it does.

Every optimiser works on gene chunks whose size is chosen from the budget
(``max_memory``, default :data:`DEFAULT_FRACTION` of the machine's RAM).  What
cannot be chunked (the shared blocks of one model, or one gene's working set)
is checked against the budget before anything is allocated; a model that does
not fit is refused with :class:`MemoryBudgetError`, which says what it needs
and what to change.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ._errors import FlashmmError

__all__ = ["MemoryBudgetError", "MemoryBudget", "parse_memory", "machine_memory",
           "DEFAULT_FRACTION"]

#: Share of the machine's physical memory a fit may use by default.
DEFAULT_FRACTION = 0.5

_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2,
          "G": 1024 ** 3, "GB": 1024 ** 3, "T": 1024 ** 4, "TB": 1024 ** 4}


class MemoryBudgetError(FlashmmError, MemoryError):
    """A fit would need more memory than ``max_memory`` allows."""


def machine_memory() -> int:
    """Physical memory of this machine in bytes (8 GB if it cannot be read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 1024 ** 3


def parse_memory(value: int | float | str | None) -> int:
    """Bytes from ``None`` (the default budget), a number of bytes or a string like ``"2GB"``."""
    if value is None:
        return int(DEFAULT_FRACTION * machine_memory())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"max_memory must be positive, got {value!r}.")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", str(value).upper())
    if match is None:
        raise ValueError(f"max_memory must be a number of bytes or a size like '2GB', got {value!r}.")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


@dataclass(frozen=True)
class MemoryBudget:
    """A budget in bytes, split between shared arrays and per-gene working sets."""

    limit: int

    @classmethod
    def of(cls, max_memory: int | float | str | None) -> MemoryBudget:
        """The budget for ``max_memory`` (see :func:`parse_memory`)."""
        return cls(parse_memory(max_memory))

    def genes_per_chunk(self, shared: int, per_gene: int, workers: int, what: str,
                        advice: str, target: int) -> int:
        """Genes per chunk so that ``shared + workers * chunk * per_gene`` fits the budget.

        Raises :class:`MemoryBudgetError` (before anything is allocated) when
        not even one gene per worker fits.
        """
        free = self.limit - shared
        need_one = shared + workers * per_gene
        if free <= 0 or need_one > self.limit:
            raise MemoryBudgetError(
                f"{what} needs at least {format_bytes(need_one)} ({format_bytes(shared)} shared "
                f"by all genes + {format_bytes(per_gene)} per gene and thread, {workers} "
                f"thread(s)), more than max_memory={format_bytes(self.limit)}. {advice}"
            )
        return int(max(1, min(target, free // (workers * per_gene))))


#: glibc's ``mallopt`` parameters and the values :func:`keep_temporaries_in_heap` sets:
#: the mmap threshold above the fit's largest temporaries (a gene chunk's working set
#: is 32 MB), and a trim threshold and top pad that keep freed blocks for reuse.
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": (-1, 256 << 20), "MALLOC_TOP_PAD_": (-2, 64 << 20),
            "MALLOC_MMAP_THRESHOLD_": (-3, 32 << 20)}


def keep_temporaries_in_heap() -> bool:
    """Serve the fit's array temporaries from the heap instead of fresh ``mmap`` pages (glibc).

    The structured fit allocates and frees arrays of a few hundred KB to a few MB
    in every evaluation, on worker threads.  By default glibc gives freed memory
    back to the kernel (large blocks are separate mappings, and a thread's arena
    shrinks after a free), so the next temporary faults its pages in again, each
    zeroed by the kernel.  On the atlas' nested model (fit
    from statistics, two threads) that is 17 s of kernel time beside 43 s in the
    program; with the thresholds of :data:`_MALLOPT` it is 4.7 s, for the same peak
    memory (end to end from an ``.h5ad``, the pass's freed buffers stay in the heap
    too: 0.15 GB more at the peak).  Called by the command line (its own
    process); library users can set the same ``MALLOC_*_`` environment variables.
    Parameters the user set in the environment are left alone.

    Returns
    -------
    bool
        Whether every parameter was set (False off glibc, or when the user set any).
    """
    import ctypes
    import ctypes.util

    if any(name in os.environ for name in _MALLOPT):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _MALLOPT.values())
