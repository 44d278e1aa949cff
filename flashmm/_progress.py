"""Progress reporting on stderr: tqdm if it is installed, otherwise silence."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Progress"]


class Progress:
    """A progress bar usable as a context manager and as a ``progress`` callback.

    Parameters
    ----------
    total : int
        Number of units (e.g. cells) expected.
    desc : str
        Short label shown before the bar.
    unit : str
        Unit name.
    enabled : bool
        If False, or if tqdm is not installed, nothing is shown.

    Examples
    --------
    >>> with Progress(100, "cells", enabled=False) as bar:
    ...     bar(50)
    ...     bar(50)
    """

    def __init__(self, total: int, desc: str, unit: str = "cell", enabled: bool = True) -> None:
        self._bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # optional dependency
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True,
                                 file=sys.stderr, leave=True, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        """Advance by ``n`` units."""
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Callable[[int], None]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
