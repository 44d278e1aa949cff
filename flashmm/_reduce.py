"""Project the fixed effects out of the sufficient statistics (MATH.md).

``ZRZ = ZZ - ZX A ZX'``, ``ZRy = ZY - ZX A XY`` and ``yRy = yy - colsum(XY * A XY)``
with ``A = XX^-1``: the only quantities the variance-component optimisers need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from .stats import SufficientStats

__all__ = ["Reduced", "reduce_stats", "residual_ss", "symmetric_eigh"]


@dataclass
class Reduced:
    """Fixed effects projected out: what the likelihood depends on.

    Attributes
    ----------
    ZRZ : ndarray (q, q)
    ZRy : ndarray (q, n_genes)
    yRy : ndarray (n_genes,)
    logdet_XX : float
    n, p : int
    """

    ZRZ: np.ndarray
    ZRy: np.ndarray
    yRy: np.ndarray
    logdet_XX: float
    n: int
    p: int

    def subset(self, genes: np.ndarray) -> Reduced:
        """The same quantities for a subset of genes (positions or mask)."""
        return Reduced(self.ZRZ, self.ZRy[:, genes], self.yRy[genes], self.logdet_XX, self.n, self.p)

    def per_unit(self, c2: np.ndarray) -> Reduced:
        """Every gene divided by ``sqrt(c2)`` (variances divided by ``c2``)."""
        return Reduced(self.ZRZ, self.ZRy / np.sqrt(c2), self.yRy / c2, self.logdet_XX, self.n, self.p)


def reduce_stats(stats: SufficientStats) -> Reduced:
    """Compute ZRZ, ZRy and yRy from the statistics (one q x p by p x G product)."""
    chol = sla.cho_factor(stats.XX, lower=True)
    AXY = sla.cho_solve(chol, stats.XY)            # p x G
    AZX = sla.cho_solve(chol, stats.ZX.T)          # p x q
    ZRZ = stats.ZZ - stats.ZX @ AZX
    ZRZ = 0.5 * (ZRZ + ZRZ.T)
    ZRy = stats.ZY - stats.ZX @ AXY
    yRy = stats.yy - np.einsum("pg,pg->g", stats.XY, AXY)
    logdet_XX = 2.0 * float(np.sum(np.log(np.diag(chol[0]))))
    return Reduced(ZRZ, ZRy, yRy, logdet_XX, int(stats.n), stats.k_fe)


def residual_ss(stats: SufficientStats) -> np.ndarray:
    """``yRy`` per gene alone (no q x q product): the residual sum of squares after X."""
    AXY = sla.cho_solve(sla.cho_factor(stats.XX, lower=True), stats.XY)
    return stats.yy - np.einsum("pg,pg->g", stats.XY, AXY)


def symmetric_eigh(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a PSD matrix with round-off negatives set to 0."""
    vals, vecs = np.linalg.eigh(M)
    tol = max(M.shape) * np.finfo(float).eps * max(1.0, float(np.max(np.abs(vals))))
    vals = np.where(vals < tol, 0.0, vals)
    return vals, vecs
