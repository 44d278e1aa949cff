"""Arrowhead group blocks shared by the closed-form criteria.

A group block of ``Z'Z`` is an arrowhead, ``[[n0, a'], [a, diag(d)]]``, when the
effects after the first (nested in the group, as ``donor:celltype`` within
``donor``) share no cells.  These are the per-model arrays and the per-gene
closed forms used by :mod:`flashmm._fit_arrowhead` (no global block) and
:mod:`flashmm._fit_global` (with one); the algebra is in the docstring of the former.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrow_kernel import sparse_rows

__all__ = ["arrow_blocks", "arrow_pairs"]


@dataclass
class _Arrow:
    """The arrowhead blocks of ``Z'Z`` and ``Z'X`` shared by every gene.

    Slot position k of every block belongs to one parameter, ``pos[k]`` (an
    empty slot contributes zeros everywhere, so its parameter does not matter).
    """

    n0: np.ndarray        # (m,)
    a: np.ndarray         # (m, c)
    d: np.ndarray         # (m, c)
    a2d: np.ndarray       # (m, c)  a^2 / d (0 in empty slots)
    R: np.ndarray         # (m,)    n0 - sum a^2 / d
    ZX0: np.ndarray       # (m, p)
    ZXc: np.ndarray       # (m, c, p)
    P2c: np.ndarray       # (m c, p p) outer products of the children's Z'X rows
    pos: np.ndarray       # (s, t) slot position -> parameter (one-hot)
    zi: np.ndarray        # (m, c, nz) the children's Z'X rows: columns of their non-zeros
    zv: np.ndarray        # (m, c, nz) ... and the values (padded with 0)

    @classmethod
    def of(cls, crit: Any) -> _Arrow:
        A, ZX = crit.zz.A, crit.zz.ZX1
        m, s, p = ZX.shape
        n0, a, d = A[:, 0, 0], A[:, 0, 1:], np.diagonal(A, axis1=1, axis2=2)[:, 1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            a2d = np.where(d > 0.0, a * a / d, 0.0)
        ZXc = np.ascontiguousarray(ZX[:, 1:])
        P2c = (ZXc[..., :, None] * ZXc[..., None, :]).reshape(m * (s - 1), p * p)
        th_of = _position_parameters(crit.st.slot_theta)
        pos = np.zeros((s, crit.st.n_theta))
        pos[np.flatnonzero(th_of >= 0), th_of[th_of >= 0]] = 1.0
        zi, zv = sparse_rows(ZXc)
        return cls(n0, a, d, a2d, n0 - a2d.sum(axis=1), np.ascontiguousarray(ZX[:, 0]), ZXc,
                   P2c, pos, zi, zv)

    @property
    def par(self) -> np.ndarray:
        """The parameter of every slot position (s,), -1 for none: ``pos`` as indices."""
        return np.where(self.pos.any(axis=1), self.pos.argmax(axis=1), -1).astype(np.int64)


def _position_parameters(slot_theta: np.ndarray) -> np.ndarray:
    """The parameter of each slot position (-1: always empty); all -2 when a position
    holds different parameters in different blocks (the closed form does not apply)."""
    out = np.full(slot_theta.shape[1], -1)
    for k in range(slot_theta.shape[1]):
        vals = np.unique(slot_theta[:, k][slot_theta[:, k] >= 0])
        if vals.size > 1:
            return np.full(slot_theta.shape[1], -2)
        if vals.size:
            out[k] = vals[0]
    return out


def _bmat(w: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """``sum_k w_k Z_k`` per block: (G, m, c) with shared (m, c, p) -> (G, m, p).

    One matrix product per block over all genes (m BLAS calls of G x c x p).
    """
    return np.matmul(w.transpose(1, 0, 2), Z).transpose(1, 0, 2)


def _gram(U: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``sum_blocks w U U'`` (G, p, p) for U (G, m, p), w (G, m)."""
    return np.swapaxes(U * w[..., None], 1, 2) @ U


@dataclass
class _Blocks:
    """The closed-form block quantities at ``theta`` for a chunk of genes."""

    inv_delta: np.ndarray  # (G, m, c)
    e: np.ndarray         # (G, m, c)
    rho: np.ndarray       # (G, m)
    sigma: np.ndarray     # (G, m)
    h: np.ndarray         # (G, m)


def arrow_blocks(ar: _Arrow, theta: np.ndarray) -> _Blocks:
    """The closed-form block quantities at ``theta`` (G, t)."""
    lam2 = (theta ** 2) @ ar.pos.T                                  # (G, s)
    l2c = lam2[:, None, 1:]
    inv_delta = 1.0 / (1.0 + l2c * ar.d)
    rho = ar.R + np.sum(ar.a2d * inv_delta, axis=2)
    l20 = lam2[:, 0, None]
    sigma = 1.0 + l20 * rho
    return _Blocks(inv_delta, l2c * inv_delta, rho, sigma, l20 / sigma)


def arrow_pairs(pos: np.ndarray, diag0: np.ndarray, diagc: np.ndarray, first_row: np.ndarray,
                rank1: np.ndarray | None = None, h: np.ndarray | None = None) -> np.ndarray:
    """``sum_{blocks} sum_{k in i, l in j} X_kl`` (G, t, t) for block matrices of the form

    ``X = diag(diag0, diagc) + [first row and column first_row] - h y y'`` with
    ``y = rank1`` (G, m, s); the rank-one part includes its diagonal.
    """
    out = np.zeros((diag0.shape[0],) + (pos.shape[1],) * 2)
    t = np.arange(pos.shape[1])
    out[:, t, t] += np.sum(diag0, axis=1)[:, None] * pos[0] + np.sum(diagc, axis=1) @ pos[1:]
    fr = np.sum(first_row, axis=1) @ pos[1:]                         # (G, t)
    out += pos[0][None, :, None] * fr[:, None, :] + fr[:, :, None] * pos[0][None, None, :]
    if rank1 is not None:
        yt = rank1 @ pos                                            # (G, m, t)
        out -= np.swapaxes(h[..., None] * yt, 1, 2) @ yt
    return out
