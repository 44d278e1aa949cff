"""Random components: the names and levels of the columns of ``Z`` (the lowest layer)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["RandomComponent"]


@dataclass(frozen=True)
class RandomComponent:
    """One variance component: a set of random effects sharing one variance.

    Parameters
    ----------
    name : str
        Name of the component (statsmodels calls its variance ``"<name> Var"``).
    levels : tuple of str
        Label of every random effect (every column of ``Z`` in this block).
    groups : tuple of str or None
        For components nested in ``groups``: the group each effect belongs to.
    columns : tuple of str or None
        For nested components: the column label within its group (statsmodels'
        ``random_effects`` index).
    cov_levels : tuple of str or None
        With a known covariance ``K = L L'`` among the groups (``group_cov``):
        the original group labels; ``levels`` are then the eigen-directions.
    cov_factor : ndarray or None
        The factor ``L`` (len(cov_levels) x size), so that ``u = L v``.
    """

    name: str
    levels: tuple[str, ...]
    groups: tuple[str, ...] | None = None
    columns: tuple[str, ...] | None = None
    # known covariance among the original levels (see flashmm.kinship): the
    # columns of Z are then eigen-directions, u = cov_factor @ v on cov_levels
    cov_levels: tuple[str, ...] | None = None
    cov_factor: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        """Number of random effects in the component."""
        return len(self.levels)
