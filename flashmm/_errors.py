"""Exceptions and warnings raised by flashmm."""

from __future__ import annotations

__all__ = ["FlashmmError", "DesignError", "DataError", "StatsError", "TermError", "ConvergenceWarning"]


class FlashmmError(ValueError):
    """Base class of flashmm's input errors (a ValueError)."""


class DesignError(FlashmmError):
    """The fixed or random design is invalid (shape, missing values, rank)."""


class DataError(FlashmmError):
    """The expression matrix is invalid (orientation, values, names)."""


class StatsError(FlashmmError):
    """Sufficient statistics are incompatible or a file is not a flashmm file."""


class TermError(FlashmmError):
    """A model term is unknown or unsuitable, or the model has no formula term structure."""


class ConvergenceWarning(UserWarning):
    """Some genes did not converge or could not be fitted; see ``results.converged``, ``results.status``."""
