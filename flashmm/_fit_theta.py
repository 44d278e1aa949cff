"""The structured criterion: lme4's relative covariance factor, block by block.

Used for random slopes and for several variance components (then ``T`` is
empty and ``Lambda`` is diagonal); the block layout comes from
:mod:`flashmm._structure`.

The random effects of one gene are ``u ~ N(0, s Lambda Lambda')`` with a
block-diagonal relative covariance factor

    Lambda(theta) = blockdiag(I_m kron T(theta_re), sqrt(g_1) I_{d_1}, ...)

where ``T`` is the r x r lower-triangular factor of the per-group covariance
``Psi / s = T T'`` (r(r+1)/2 parameters stored column by column, as lme4's
``theta``; only the diagonal with ``independent_re=True``) and the ``sqrt(g_i)``
are the variance components.  ``Lambda`` is linear in ``theta``.

Structure.  The columns of ``Z`` are arranged in m *group blocks* of s slots:
the r random effects of the group, then the columns of the variance
components nested in that group (statsmodels' ``vc_formula``), padded with
empty slots; components that are not nested form a *global* block of d
columns.  ``Z'Z`` is then block diagonal in the group blocks plus the global
rows and columns (:class:`BlockZZ`), and so is ``M = I + Lambda' Z'Z Lambda``:
its factorisation (:class:`MFactor`) is m s x s factorisations plus a d x d
Schur complement.  Every quantity below is computed block by block, so the
cost per gene and iteration is ``O(m s^2 (s + d + p) + d^3)``: linear in the
number of groups.

Profiled criterion (``-2 log L`` up to constants).  With ``H = I + Z Lambda
Lambda' Z'``, solved through ``M``:

    y'H^-1y = yy - ZY' Lambda M^-1 Lambda' ZY,   X'H^-1y, X'H^-1X likewise
    S = y'H^-1y - (X'H^-1y)' (X'H^-1X)^-1 (X'H^-1y)
    f = m log S + log|M| (+ log|X'H^-1X| for REML),   m = n - p (REML) or n (ML)

Gradient (``Lambda = sum_j theta_j Lambda_j`` with 0/1 patterns of disjoint
support), with ``b`` the GLS estimate, ``u = M^-1 Lambda' (ZY - ZX b)``,
``a = ZY - ZX b - ZZ Lambda u``, ``U = M^-1 Lambda' ZX``,
``E = ZX - ZZ Lambda U`` and ``C = (X'H^-1X)^-1``:

    dS/dtheta_j          = -2 sum_{(k,l) in supp Lambda_j} a_k u_l
    dlog|M|/dtheta_j     =  2 sum_{(k,l) in supp Lambda_j} (ZZ Lambda M^-1)_kl
    dlog|X'H^-1X|/dtheta_j = -2 sum_{(k,l) in supp Lambda_j} (E C U')_kl

Every support lies inside one block, so only the diagonal blocks of ``M^-1``
are needed (selected inversion).  The Newton Hessian is the forward
difference of the analytic gradient.  All genes are optimised at once (Newton
with an Armijo line search) from lme4's start ``T = I``, without lme4's bounds
``T_aa >= 0`` (the criterion depends on ``T T'`` only; signs are made
canonical afterwards, see :func:`_newton_canonical`).  Variance components
alone, with an exact Hessian, are optimised over the ratios ``g = theta^2 >= 0``
instead (projected Newton with the bound 0).
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from ._memory import MemoryBudget
from ._newton import projected_newton
from ._structure import Lambda, ThetaStructure, _bmm, theta_structure

__all__ = [
    "ThetaStructure",
    "BlockZZ",
    "MFactor",
    "ThetaCriterion",
    "ThetaFitResult",
    "ThetaGLS",
    "theta_structure",
    "minimise_theta",
    "over_gene_parts",
    "gls_theta",
    "condcov_groups",
    "satterthwaite_theta",
    "varpar_information",
]


# ------------------------------------------------------------ block algebra
@dataclass
class BlockZZ:
    """``Z'Z`` and ``Z'X`` in the block layout of a :class:`ThetaStructure`.

    Attributes
    ----------
    A : ndarray (m, s, s)
        Group blocks of ``Z'Z`` (zero rows and columns in empty slots).
    B : ndarray (m, s, d)
        Cross products of the group blocks with the global columns.
    C : ndarray (d, d)
        The global block.
    ZX1 : ndarray (m, s, p), ZX2 : ndarray (d, p)
        ``Z'X`` in the same layout.
    """

    st: ThetaStructure
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    ZX1: np.ndarray
    ZX2: np.ndarray

    @classmethod
    def from_stats(cls, st: ThetaStructure, ZZ: np.ndarray, ZX: np.ndarray) -> BlockZZ:
        """Gather the blocks from dense ``Z'Z`` (q, q) and ``Z'X`` (q, p)."""
        valid = st.slot_cols >= 0
        sc = np.where(valid, st.slot_cols, 0)
        A = ZZ[sc[:, :, None], sc[:, None, :]] * (valid[:, :, None] & valid[:, None, :])
        m, s = sc.shape
        B = ZZ[np.ix_(sc.ravel(), st.glob_cols)].reshape(m, s, -1) * valid[:, :, None]
        C = ZZ[np.ix_(st.glob_cols, st.glob_cols)]
        return cls(st, A, B, C, ZX[sc] * valid[:, :, None], ZX[st.glob_cols])

    @cached_property
    def pairs(self) -> GlobalPairs | None:
        """Sparse products of ``B``'s rows for a wide, sparse global block (else None)."""
        return GlobalPairs.of(self.B)

    @cached_property
    def arrowhead(self) -> bool:
        """Every group block is an arrowhead: its slots after the first share no cells."""
        rest = self.A[:, 1:, 1:]
        return not np.any(rest - rest * np.eye(rest.shape[-1]))

    def split(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(G, q, k) in the order of Z's columns -> block form ((G, m, s, k), (G, d, k))."""
        valid = self.st.slot_cols >= 0
        v1 = v[:, np.where(valid, self.st.slot_cols, 0)] * valid[None, :, :, None]
        return v1, v[:, self.st.glob_cols]

    def join(self, v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
        """Block form -> (G, q, ...) in the order of Z's columns."""
        valid = self.st.slot_cols >= 0
        out = np.zeros((v1.shape[0], self.st.q) + v1.shape[3:])
        out[:, self.st.slot_cols[valid]] = v1[:, valid]
        out[:, self.st.glob_cols] = v2
        return out

    def matvec(self, v1: np.ndarray, v2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``Z'Z v`` for block vectors with k columns."""
        o1 = _bmm(self.A, v1)
        o2 = self.C @ v2
        if self.pairs is not None:
            return o1 + self.pairs.times(v2, o1.shape), o2 + self.pairs.times_t(v1)
        if self.C.size:
            Bf = self.B.reshape(-1, self.B.shape[-1])                 # (m s, d)
            o1 = o1 + (Bf @ v2).reshape(o1.shape)
            o2 = o2 + Bf.T @ _flat(v1)
        return o1, o2

    def times_zx(self, b: np.ndarray) -> np.ndarray:
        """``Z'X b`` for the group blocks, (G, m, s, 1), from coefficients b (G, p)."""
        m, sz, p = self.ZX1.shape
        return (b @ self.ZX1.reshape(m * sz, p).T).reshape(b.shape[0], m, sz, 1)

    def zx(self, G: int) -> tuple[np.ndarray, np.ndarray]:
        """``Z'X`` broadcast to G genes in block form."""
        return (np.broadcast_to(self.ZX1, (G,) + self.ZX1.shape),
                np.broadcast_to(self.ZX2, (G,) + self.ZX2.shape))


#: Global blocks wider than this use :class:`GlobalPairs` when ``B`` is sparse enough
#: (below, the dense products cost less than the sparse bookkeeping).
SPARSE_GLOBAL_MIN = 256

#: ...and when the pair products hold at most this fraction of the dense ``m s d^2``.
SPARSE_GLOBAL_FILL = 0.125


@dataclass
class GlobalPairs:
    """``B`` (the group rows against a wide global block) as sparse products.

    ``P`` has a row per (group, slot i, slot j) and a column per (global k,
    global l), holding ``B[g, i, k] B[g, j, l]``; then for per-group weights
    ``W`` (s x s) and a d x d matrix ``S``

        sum_g B_g' W_g B_g = (W_flat @ P) as d x d,     B_g S B_g' = (S_flat @ P')_g,

    at the cost of ``nnz(P) = sum_g nnz(B_g)^2`` instead of ``m s d^2``
    (InstEval: 2,972 students against 1,156 crossed columns, 3% of the dense
    cost).  Shared by every gene; ``P'`` products go through ``P.T`` (a CSC view).
    """

    Bs: sp.csr_matrix       # (m s, d)
    BsT: sp.csr_matrix      # (d, m s)
    P: sp.csr_matrix        # (m s s, d d)
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, B: np.ndarray) -> GlobalPairs | None:
        """The products, or None when the global block is narrow or ``B`` dense."""
        m, s, d = B.shape
        if d <= SPARSE_GLOBAL_MIN:
            return None
        Bs = sp.csr_matrix(B.reshape(m * s, d))
        Bs.sort_indices()
        ptr = Bs.indptr.astype(np.int64)
        counts = ptr[s::s] - ptr[:-s:s]                 # non-zeros of every group
        if np.sum(counts.astype(float) ** 2) > SPARSE_GLOBAL_FILL * m * s * d * d:
            return None
        return cls(Bs, Bs.T.tocsr(), _pair_products(Bs, ptr, counts, s, d), (m, s, d))

    def core(self, W: np.ndarray) -> np.ndarray:
        """``sum_g B_g' W_g B_g`` (G, d, d) for weights W (G, m, s, s)."""
        d = self.shape[2]
        Wf = W.reshape(W.shape[0], -1)
        return np.asarray((self.P.T @ Wf.T).T).reshape(W.shape[0], d, d)

    def sandwich(self, S: np.ndarray) -> np.ndarray:
        """``B_g S B_g'`` (G, m, s, s) for S (G, d, d)."""
        m, s, _ = self.shape
        return np.asarray((self.P @ S.reshape(S.shape[0], -1).T).T).reshape(S.shape[0], m, s, s)

    def times(self, v2: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``B v2`` in block form ``shape`` (G, m, s, k) for v2 (G, d, k)."""
        G, d, k = v2.shape
        out = self.Bs @ np.moveaxis(v2, 0, 1).reshape(d, G * k)           # (m s, G k)
        return np.moveaxis(out.reshape(-1, G, k), 1, 0).reshape(shape)

    def times_t(self, v1: np.ndarray) -> np.ndarray:
        """``B' v1`` (G, d, k) for block vectors v1 (G, m, s, k)."""
        f = _flat(v1)
        G, ms, k = f.shape
        out = self.BsT @ np.moveaxis(f, 0, 1).reshape(ms, G * k)           # (d, G k)
        return np.moveaxis(out.reshape(-1, G, k), 1, 0)


def _pair_products(Bs: sp.csr_matrix, ptr: np.ndarray, counts: np.ndarray, s: int, d: int
                   ) -> sp.csr_matrix:
    """``P`` of :class:`GlobalPairs`, assembled directly in CSR order.

    Every group's entries pair with each other (``counts[g]^2`` products).
    Enumerated entry by entry, then partner by partner, they come out sorted by
    row and column when groups have one slot (``P``'s row g is ``B_g kron B_g``);
    with more slots a stable sort by row restores the order within each row.
    """
    m = counts.size
    nnz = int(ptr[-1])
    group = np.repeat(np.arange(m), counts)             # group of every entry of Bs
    reps = counts[group]                                # partners of every entry
    first = np.repeat(np.arange(nnz), reps)
    offsets = np.cumsum(reps) - reps                    # first product of every entry
    second = np.arange(first.size) - np.repeat(offsets - ptr[:-s:s][group], reps)
    index = np.int32 if d * d < 2 ** 31 else np.int64
    col = Bs.indices.astype(index)
    cols = col[first] * index(d) + col[second]
    vals = Bs.data[first] * Bs.data[second]
    if s == 1:
        indptr = np.concatenate([[0], np.cumsum(counts * counts)])
        return sp.csr_matrix((vals, cols, indptr), shape=(m, d * d))
    slot = np.repeat(np.arange(m * s) % s, np.diff(ptr))
    rows = (group[first] * s + slot[first]) * s + slot[second]
    order = np.argsort(rows, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m * s * s))])
    return sp.csr_matrix((vals[order], cols[order], indptr), shape=(m * s * s, d * d))


def _spd_inverse_logdet(M: np.ndarray, inverse: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Inverse and log-determinant of large SPD matrices (G, d, d) by Cholesky (LAPACK
    ``potrf``/``potri``: d^3 flops against 2.3 d^3 for ``inv`` plus ``cholesky``); NaN
    for a matrix that is not numerically positive definite (a line-search trial).

    With ``inverse=False`` the lower Cholesky factors (d^3 / 3) come back instead of
    the inverses (for a value: solves and the log-determinant only).
    """
    G, d, _ = M.shape
    out = np.empty(M.shape)
    logdet = np.full(G, np.nan)
    upper = np.tri(d, k=-1, dtype=bool).T
    for g in range(G):                  # d^3 LAPACK calls; numpy's stacked ones loop too
        # M[g].T: the same symmetric matrix in Fortran order, as LAPACK takes it
        c, info = lapack.dpotrf(M[g].T, lower=True, clean=False)
        if info == 0:
            logdet[g] = 2.0 * np.sum(np.log(np.diagonal(c)))
            if inverse:
                c, info = lapack.dpotri(c, lower=True, overwrite_c=True)
        if info != 0:
            out[g], logdet[g] = np.nan, np.nan
            continue
        out[g] = c                                  # its lower triangle holds the result
        np.copyto(out[g], out[g].T if inverse else 0.0, where=upper)
    return out, logdet


def _factor_solve(L: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(L L')^-1 b`` for lower factors L (G, d, d) and b (G, d, k); NaN rows stay NaN."""
    out = np.empty(b.shape)
    for g in range(L.shape[0]):
        out[g] = lapack.dpotrs(L[g], b[g], lower=True)[0]
    return out


def _logdet_pd(M: np.ndarray) -> np.ndarray:
    """``log|M|`` of a stack of SPD matrices; NaN for those that are not (numerically) PD.

    Far from the optimum (a line-search trial with huge variance ratios),
    ``X'H^-1X = X'X - ...`` can lose its positive definiteness to cancellation;
    NaN there makes the line search reject the trial instead of failing the fit.
    """
    try:
        L = np.linalg.cholesky(M)
    except np.linalg.LinAlgError:
        w = np.linalg.eigvalsh(M)
        pd_ = np.all(w > 0.0, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(pd_, np.sum(np.log(np.abs(w)), axis=-1), np.nan)
    return 2.0 * np.sum(np.log(np.diagonal(L, axis1=-2, axis2=-1)), axis=-1)


def _spd_inv(M: np.ndarray) -> np.ndarray:
    """Inverse of a stack of SPD matrices; NaN for those that are singular."""
    try:
        return _sym(np.linalg.inv(M))
    except np.linalg.LinAlgError:
        w, V = np.linalg.eigh(M)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(w > 0.0, 1.0 / w, np.nan)
        return _sym((V * inv[..., None, :]) @ np.swapaxes(V, -1, -2))


def _arrowhead_inverse(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse and log-determinant of arrowhead SPD blocks (..., s, s) in O(s^2).

    ``M = [[a, b'], [b, diag(c)]]`` (a group's intercept, then effects nested in
    it that share no cells, as ``donor:celltype`` within ``donor``): with
    ``w = b / c`` and ``h = a - b'w``, ``M^-1 = [[1/h, -w'/h], [-w/h, diag(1/c) + w w'/h]]``
    and ``log|M| = log h + sum log c`` (MATH.md, nested arrowhead identity).
    """
    s = M.shape[-1]
    c = np.diagonal(M, axis1=-2, axis2=-1)[..., 1:]
    w = M[..., 1:, 0] / c
    h = M[..., 0, 0] - np.sum(M[..., 1:, 0] * w, axis=-1)
    out = np.empty(M.shape)
    out[..., 0, 0] = 1.0 / h
    out[..., 0, 1:] = out[..., 1:, 0] = -w / h[..., None]
    out[..., 1:, 1:] = w[..., :, None] * w[..., None, :] / h[..., None, None]
    idx = np.arange(1, s)
    out[..., idx, idx] += 1.0 / c
    return out, np.log(h) + np.sum(np.log(c), axis=-1)


def _small_spd_inverse(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse and log-determinant of a stack of small SPD matrices (..., s, s).

    For s <= 4 the Cholesky factor and its inverse are computed with vector
    operations across the whole stack (LAPACK's per-matrix overhead dominates
    for millions of 2 x 2 blocks); larger blocks use numpy.linalg.
    """
    s = M.shape[-1]
    if s > 4:
        return _spd_inv(M), _logdet_pd(M)
    L = np.zeros(M.shape)
    for j in range(s):
        d = np.sqrt(M[..., j, j] - np.sum(L[..., j, :j] ** 2, axis=-1))
        L[..., j, j] = d
        for i in range(j + 1, s):
            L[..., i, j] = (M[..., i, j] - np.sum(L[..., i, :j] * L[..., j, :j], axis=-1)) / d
    Li = np.zeros(M.shape)
    for j in range(s):
        Li[..., j, j] = 1.0 / L[..., j, j]
        for i in range(j + 1, s):
            Li[..., i, j] = -np.sum(L[..., i, j:i] * Li[..., j:i, j], axis=-1) / L[..., i, i]
    logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=-2, axis2=-1)), axis=-1)
    return _bmm(np.swapaxes(Li, -1, -2), Li), logdet


def forward_hessian(gradient: Any, theta: np.ndarray, grad: np.ndarray, rel_step: float = 1e-6
                    ) -> np.ndarray:
    """Forward difference of ``gradient(theta) -> (f, grad)`` at ``theta``, symmetrised (G, t, t).

    ``grad`` is the gradient at ``theta``; the step is ``rel_step max(1, |theta|)``.
    """
    G, t = theta.shape
    H = np.empty((G, t, t))
    h = rel_step * np.maximum(1.0, np.abs(theta))
    for j in range(t):
        e = np.zeros_like(theta)
        e[:, j] = h[:, j]
        H[:, :, j] = (gradient(theta + e)[1] - grad) / h[:, j, None]
    return _sym(H)


def _flat(v: np.ndarray) -> np.ndarray:
    """Group-block form (G, m, s, k) as one matrix per gene (G, m s, k), for BLAS products."""
    return v.reshape(v.shape[0], int(np.prod(v.shape[1:-1])), v.shape[-1])


def _sym(M: np.ndarray) -> np.ndarray:
    return 0.5 * (M + np.swapaxes(M, -1, -2))


@dataclass
class MFactor:
    """Block factorisation of ``M = I + Lambda' Z'Z Lambda`` for G genes.

    ``M11`` (the group blocks) is inverted block by block; the global block
    enters through the Schur complement ``Sc = M22 - M12' M11^-1 M12``.
    Both are ``>= I``, so plain inverses are well conditioned.

    With ``N = M11^-1 Lambda1'`` and ``Lambda2 = diag(dvec)``,
    ``M12 = Lambda1' B Lambda2``, ``F = M11^-1 M12 = N B Lambda2`` and
    ``Sc = I + Lambda2 (C - sum_g B_g' Lambda1 N_g B_g) Lambda2``.  A wide,
    sparse global block (:class:`GlobalPairs`) never forms ``M12`` or ``F``:
    every product with them goes through the sparse ``B`` (``pairs``).
    """

    M11inv: np.ndarray    # (G, m, s, s)
    M12: np.ndarray | None   # (G, m, s, d)  (None with pairs)
    F: np.ndarray | None     # (G, m, s, d)  M11^-1 M12 (None with pairs)
    Scinv: np.ndarray | None   # (G, d, d)  (None for a value-only factor, see Scchol)
    logdet: np.ndarray    # (G,)
    N: np.ndarray | None = None      # (G, m, s, s)  M11^-1 Lambda1' (with pairs)
    core: np.ndarray | None = None   # (G, d, d)     sum_g B_g' Lambda1 N_g B_g (with pairs)
    dvec: np.ndarray | None = None   # (G, d)
    pairs: GlobalPairs | None = None
    Scchol: np.ndarray | None = None  # (G, d, d) lower Cholesky factor of Sc (value only)

    @classmethod
    def build(cls, zz: BlockZZ, lam: Lambda, inverse: bool = True) -> MFactor:
        """Factorise ``M`` for the genes of ``lam``.

        ``inverse=False`` allows a factor that only solves and gives ``log|M|``
        (a criterion value): with a wide sparse global block it then keeps the
        Cholesky factor of ``Sc`` instead of its inverse.
        """
        s = zz.A.shape[-1]
        M11 = _sym(np.eye(s) + lam.sandwich(zz.A))
        M11inv, logdet11 = (_arrowhead_inverse(M11) if zz.arrowhead and lam.diag is not None
                            else _small_spd_inverse(M11))
        logdet = np.sum(logdet11, axis=1)
        G, d = lam.dvec.shape
        if d == 0:
            empty = np.zeros(M11.shape[:3] + (0,))
            return cls(M11inv, empty, empty, np.zeros((G, 0, 0)), logdet)
        if zz.pairs is not None:
            return cls._build_sparse(zz, lam, M11inv, logdet, inverse)
        M12 = lam.left_t(zz.B) * lam.dvec[:, None, None, :]
        F = _bmm(M11inv, M12)
        Sc = (np.eye(d) + lam.dvec[:, :, None] * zz.C * lam.dvec[:, None, :]
              - np.swapaxes(_flat(M12), 1, 2) @ _flat(F))
        Sc = _sym(Sc)
        return cls(M11inv, M12, F, _spd_inv(Sc), logdet + _logdet_pd(Sc))

    @classmethod
    def _build_sparse(cls, zz: BlockZZ, lam: Lambda, M11inv: np.ndarray, logdet: np.ndarray,
                      inverse: bool = True) -> MFactor:
        """The factor through the sparse pair products of ``B`` (class docstring)."""
        N = (M11inv * lam.diag[..., None, :] if lam.diag is not None
             else M11inv @ np.swapaxes(np.broadcast_to(lam.blocks, M11inv.shape), -1, -2))
        core = _sym(zz.pairs.core(lam.left(N)))
        dv = lam.dvec
        Sc = np.eye(dv.shape[1]) + dv[:, :, None] * (zz.C - core) * dv[:, None, :]
        Sx, logdet22 = _spd_inverse_logdet(Sc, inverse)
        Scinv, Scchol = (Sx, None) if inverse else (None, Sx)
        return cls(M11inv, None, None, Scinv, logdet + logdet22, N, core, dv, zz.pairs, Scchol)

    def solve(self, b1: np.ndarray, b2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``M^-1 b`` for block vectors with k columns."""
        y1 = _bmm(self.M11inv, b1)
        if b2.shape[1] == 0:
            return y1, b2
        if self.pairs is not None:
            dv = self.dvec[:, :, None]
            lam1y = np.swapaxes(self.N, -1, -2) @ b1          # Lambda1 M11^-1 b1 = N' b1
            r2 = b2 - dv * self.pairs.times_t(lam1y)
            x2 = self.Scinv @ r2 if self.Scinv is not None else _factor_solve(self.Scchol, r2)
            return y1 - _bmm(self.N, self.pairs.times(dv * x2, y1.shape)), x2
        x2 = self.Scinv @ (b2 - np.swapaxes(_flat(self.M12), 1, 2) @ _flat(y1))
        return y1 - (_flat(self.F) @ x2).reshape(y1.shape), x2

    def dense_F(self) -> np.ndarray:
        """``F = M11^-1 M12`` (G, m, s, d), formed from the sparse ``B`` if need be."""
        if self.F is not None:
            return self.F
        m, s, d = self.pairs.shape
        B = np.broadcast_to(self.pairs.Bs.toarray().reshape(m, s, d), self.N.shape[:2] + (s, d))
        return _bmm(self.N, B) * self.dvec[:, None, None, :]

    @cached_property
    def _sandwich_global(self) -> np.ndarray:
        """``K_g = B_g Lambda2 Sc^-1 Lambda2 B_g'`` (G, m, s, s) (with pairs)."""
        return self.pairs.sandwich(self.dvec[:, :, None] * self.Scinv * self.dvec[:, None, :])

    def group_inverse(self) -> np.ndarray:
        """The group blocks of ``M^-1`` (G, m, s, s): ``M11^-1 + F Sc^-1 F'``."""
        if self.pairs is None:
            return self.inverse_blocks()[0]
        K = self._sandwich_global
        return self.M11inv + self.N @ K @ np.swapaxes(self.N, -1, -2)

    def inverse_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Selected inverse: the group blocks of ``M^-1`` (G, m, s, s) and ``F Sc^-1``.

        The (group, global) blocks of ``M^-1`` are ``-F Sc^-1`` and the global
        block is ``Sc^-1``.
        """
        F = self.dense_F()
        FS = (_flat(F) @ self.Scinv).reshape(F.shape)
        return self.M11inv + FS @ np.swapaxes(F, -1, -2), FS

    def logdet_terms(self, zz: BlockZZ, lam: Lambda, r: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The selected-inverse sums of ``d log|M| / dtheta``.

        The diagonal of ``A Lambda M^-1`` over the group slots (G, m, s), its
        ``T`` part summed over the groups (G, r, r) and the diagonal of the
        global rows of ``ZZ Lambda M^-1`` (G, d).
        """
        AL = lam.right(zz.A)
        if self.pairs is not None:
            Minv = self.group_inverse()
            X = self._sandwich_global @ np.swapaxes(self.N, -1, -2)   # B_g L2 (F Sc^-1)_g'
            diag = (np.sum(AL * np.swapaxes(Minv, -1, -2), axis=-1)
                    - np.diagonal(X, axis1=-2, axis2=-1))
            tsum = (np.sum(AL[..., :r, :] @ Minv[..., :, :r], axis=1)
                    - np.sum(X[..., :r, :r], axis=1))
            P2 = np.einsum("gil,gl,gli->gi", zz.C - self.core, self.dvec, self.Scinv)
            return diag, tsum, P2
        Minv, FS = self.inverse_blocks()
        # only the diagonal of P1 = A Lambda M^-1 (and its T part) is needed
        diag = np.sum(AL * np.swapaxes(Minv, -1, -2), axis=-1)
        tsum = np.sum(AL[..., :r, :] @ Minv[..., :, :r], axis=1)
        if FS.shape[-1]:
            BL = zz.B * lam.dvec[:, None, None, :]
            diag = diag - np.sum(BL * FS, axis=-1)
            tsum = tsum - np.sum(BL[..., :r, :] @ np.swapaxes(FS[..., :r, :], -1, -2), axis=1)
            P2 = (np.einsum("ic,gc,gci->gi", zz.C, lam.dvec, self.Scinv)
                  - np.einsum("msi,gmsi->gi", zz.B, lam.left(FS)))
        else:
            P2 = np.zeros(lam.dvec.shape)
        return diag, tsum, P2


#: Genes per evaluation chunk aim at this many float64 of working set (64 MB per
#: thread).  Smaller chunks leave the threads waiting on each other's interpreter
#: time between small array operations: on the atlas' three-component model (2,048
#: genes, two threads) chunks of 16 genes fitted in 8.6-9.4 s, of 64 genes in
#: 5.8-6.0 s, against 11.1 s on one thread.
CHUNK_FLOATS = 8_000_000


def working_set_floats(st: ThetaStructure, p: int) -> int:
    """float64 values one gene holds during an evaluation (criterion, gradient, GLS).

    A conservative count of the block arrays alive at once: the factor of
    ``M`` (group blocks, their cross products with the global block, the
    Schur complement) and the block vectors with ``1 + p`` columns.
    """
    m, s, d = st.n_groups, st.block_size, st.glob_cols.size
    return m * s * (4 * s + 4 * d + 6 * (p + 1)) + 4 * d * d + 6 * d * (p + 1) + 4 * p * p


def shared_floats(st: ThetaStructure, p: int) -> int:
    """float64 values of the blocks of ``Z'Z`` and ``Z'X`` shared by every gene."""
    m, s, d = st.n_groups, st.block_size, st.glob_cols.size
    return m * s * (s + d + p) + d * (d + p)


def chunk_genes(st: ThetaStructure, p: int, budget: MemoryBudget | None = None,
                workers: int = 1) -> int:
    """Genes per evaluation chunk: :data:`CHUNK_FLOATS` of working set, within ``budget``.

    Raises :class:`~flashmm.MemoryBudgetError` before anything is allocated if
    one gene per thread does not fit the budget.
    """
    per_gene = working_set_floats(st, p)
    target = max(1, CHUNK_FLOATS // max(1, per_gene))
    if budget is None:
        return target
    m, s, d = st.n_groups, st.block_size, st.glob_cols.size
    return budget.genes_per_chunk(
        8 * shared_floats(st, p), 8 * per_gene, workers,
        what=f"the structured fit ({m} group blocks of {s} slots, a global block of {d})",
        advice="Raise max_memory, use fewer threads (n_jobs), or simplify the random effects "
               "(a crossed factor with many levels makes the global block large).",
        target=target)


# -------------------------------------------------------------- criterion
@dataclass
class _Solved:
    """Everything at ``theta`` for a chunk of genes (see the module docstring)."""

    lam: Lambda
    fac: MFactor
    S: np.ndarray          # (G,)
    logdet: np.ndarray     # (G,)  log|M| (+ log|X'H^-1X| for REML)
    b: np.ndarray          # (G, p)
    C: np.ndarray          # (G, p, p)  (X'H^-1X)^-1
    W: tuple[np.ndarray, np.ndarray]   # M^-1 Lambda' [ZY | ZX], k = 1 + p
    ZY: tuple[np.ndarray, np.ndarray]  # (G, m, s, 1), (G, d, 1)

    def u(self) -> tuple[np.ndarray, np.ndarray]:
        """Spherical BLUPs ``M^-1 Lambda' (ZY - ZX b)`` (k = 1)."""
        bb = self.b[:, :, None]
        return (self.W[0][..., :1] - self.W[0][..., 1:] @ bb[:, None],
                self.W[1][..., :1] - self.W[1][..., 1:] @ bb)


@dataclass
class ThetaCriterion:
    """Profiled criterion ``f(theta) = m log S + log|M| (+ log|X'H^-1X|)`` for a set of genes.

    Built on the (per-gene rescaled) sufficient statistics; genes in rows.
    """

    st: ThetaStructure
    zz: BlockZZ
    XX: np.ndarray         # (p, p)
    XY: np.ndarray         # (G, p)
    ZY: np.ndarray         # (G, q)
    yy: np.ndarray         # (G,)
    n: int
    reml: bool
    chunk: int = 0         # genes per evaluation chunk (0: chunk_genes without a budget)

    @classmethod
    def from_stats(cls, stats: Any, st: ThetaStructure, reml: bool,
                   c: np.ndarray | None = None, budget: MemoryBudget | None = None,
                   workers: int = 1) -> ThetaCriterion:
        """The criterion of every gene, each divided by ``c`` (default 1).

        ``budget`` and ``workers`` size the gene chunks (and refuse a model whose
        one-gene working set does not fit, before the blocks are gathered).
        """
        c = np.ones(stats.n_genes) if c is None else c
        chunk = chunk_genes(st, stats.k_fe, budget, workers)
        return cls(st, BlockZZ.from_stats(st, stats.ZZ, stats.ZX), stats.XX,
                   (stats.XY / c).T, (stats.ZY / c).T, stats.yy / (c * c), int(stats.n), reml,
                   chunk)

    @property
    def m(self) -> int:
        """``n - p`` (REML) or ``n`` (ML)."""
        return self.n - self.XX.shape[0] if self.reml else self.n

    def subset(self, idx: np.ndarray) -> ThetaCriterion:
        """The criterion of genes ``idx``."""
        return ThetaCriterion(self.st, self.zz, self.XX, self.XY[idx], self.ZY[idx],
                              self.yy[idx], self.n, self.reml, self.chunk)

    def _chunk_size(self) -> int:
        return self.chunk or chunk_genes(self.st, self.XX.shape[0])

    def chunks(self) -> list[np.ndarray]:
        """Gene chunks that bound the memory of one evaluation."""
        G, size = self.yy.shape[0], self._chunk_size()
        return [np.arange(a, min(G, a + size)) for a in range(0, G, size)]

    def fit_blocks(self, target: int = 256) -> list[np.ndarray]:
        """Blocks of genes optimised together: about ``target`` genes, one chunk at most
        (independent of the number of threads, so that results are too)."""
        G, size = self.yy.shape[0], max(1, min(target, self._chunk_size()))
        return [np.arange(a, min(G, a + size)) for a in range(0, G, size)]

    def solve(self, theta: np.ndarray, idx: np.ndarray | slice = slice(None),
              inverse: bool = True) -> _Solved:
        """GLS at ``theta`` (rows of genes ``idx``) through the factorisation of ``M``
        (``inverse=False``: enough for ``S`` and the log-determinant only)."""
        lam = self.st.lam(theta)
        fac = MFactor.build(self.zz, lam, inverse)
        G = theta.shape[0]
        zy = self.zz.split(self.ZY[idx][:, :, None])
        zx = self.zz.zx(G)
        R = (np.concatenate([zy[0], zx[0]], axis=-1), np.concatenate([zy[1], zx[1]], axis=-1))
        LR = lam.t(*R)
        W = fac.solve(*LR)
        k = LR[0].shape[-1]
        Q = (np.swapaxes(LR[0].reshape(G, -1, k), 1, 2) @ W[0].reshape(G, -1, k)
             + np.swapaxes(LR[1], 1, 2) @ W[1])
        XHX = _sym(self.XX - Q[:, 1:, 1:])
        XHy = self.XY[idx] - Q[:, 1:, 0]
        C = _spd_inv(XHX)
        b = np.einsum("gij,gj->gi", C, XHy)
        S = self.yy[idx] - Q[:, 0, 0] - np.sum(XHy * b, axis=1)
        logdet = fac.logdet + (_logdet_pd(XHX) if self.reml else 0.0)
        return _Solved(lam, fac, S, logdet, b, C, W, zy)

    def _ld_gradient(self, sol: _Solved) -> np.ndarray:
        """``d log|M| / dtheta``: the supports of ``ZZ Lambda M^-1`` (selected inverse)."""
        diag, tsum, P2 = sol.fac.logdet_terms(self.zz, sol.lam, self.st.re_dim)
        return 2.0 * self.st.collect(tsum, diag, P2)

    def parts(self, theta: np.ndarray, grad: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``S``, the log-determinant term and (optionally) their gradients (G, t)."""
        G, t = theta.shape
        S = np.empty(G)
        logdet = np.empty(G)
        dS = np.empty((G, t)) if grad else None
        dld = np.empty((G, t)) if grad else None
        for idx in self.chunks():
            sol = self.solve(theta[idx], idx, inverse=grad)
            S[idx], logdet[idx] = sol.S, sol.logdet
            if grad:
                dS[idx], dld[idx], _ = self.derivatives(sol)
        return S, logdet, dS, dld

    def derivatives(self, sol: _Solved) -> tuple[np.ndarray, np.ndarray,
                                                 tuple[np.ndarray, np.ndarray]]:
        """``dS/dtheta``, the log-determinant term's gradient and the scores ``a``.

        ``dS / dtheta = -2 sum a_k u_l`` with ``a = ZY - ZX b - ZZ Lambda u``
        (:meth:`scores`); the log-determinant term includes ``log|X'H^-1X|`` for REML.
        """
        a, u = self.scores(sol)
        dS = -2.0 * self.st.pair_sums(a, u, contract=True)
        dld = self._ld_gradient(sol)
        if self.reml:
            dld = dld + self._xhx_gradient(sol)
        return dS, dld, a

    def scores(self, sol: _Solved) -> tuple[tuple[np.ndarray, np.ndarray],
                                            tuple[np.ndarray, np.ndarray]]:
        """``a = Z'H^-1 (y - X b) = ZY - ZX b - ZZ Lambda u`` and the spherical BLUPs ``u``."""
        u = sol.u()
        e1 = sol.ZY[0] - self.zz.times_zx(sol.b)
        e2 = sol.ZY[1] - self.zz.ZX2 @ sol.b[:, :, None]
        return self.minus_zz_lambda((e1, e2), sol.lam, u), u

    def _xhx_gradient(self, sol: _Solved) -> np.ndarray:
        """``d log|X'H^-1X| / dtheta = -2 sum (E C U')_kl`` (REML only)."""
        U = (sol.W[0][..., 1:], sol.W[1][..., 1:])
        E = self.minus_zz_lambda(self.zz.zx(sol.b.shape[0]), sol.lam, U)
        EC = ((_flat(E[0]) @ sol.C).reshape(E[0].shape), E[1] @ sol.C)
        return -2.0 * self.st.pair_sums(EC, U, contract=True)

    def minus_zz_lambda(self, z: tuple[np.ndarray, np.ndarray], lam: Lambda,
                        w: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``z - ZZ Lambda w`` for block vectors."""
        o = self.zz.matvec(*lam.apply(*w))
        return z[0] - o[0], z[1] - o[1]

    def gls(self, theta: np.ndarray, random_effects: bool = True) -> ThetaGLS:
        """Fixed effects, their covariance, BLUPs and conditional variances at ``theta``
        (without the last two, as arrays of 0 columns, when not ``random_effects``).

        Block by block: linear in the number of groups.
        """
        G, p = theta.shape[0], self.XX.shape[0]
        out = ThetaGLS.empty(G, p, self.st.q if random_effects else 0)
        for idx in self.chunks():
            sol = self.solve(theta[idx], idx)
            out.fe_params[idx] = sol.b
            out.cov_unscaled[idx] = sol.C
            if not random_effects:
                continue
            lu = sol.lam.apply(*sol.u())
            out.blup_unscaled[idx] = self.zz.join(lu[0][..., 0], lu[1][..., 0])
            Minv = sol.fac.group_inverse()
            L = sol.lam.blocks
            cv1 = np.einsum("gmab,gmbc,gmac->gma", np.broadcast_to(L, Minv.shape), Minv,
                            np.broadcast_to(L, Minv.shape))
            cv2 = sol.lam.dvec ** 2 * np.diagonal(sol.fac.Scinv, axis1=1, axis2=2)
            out.condvar_unscaled[idx] = self.zz.join(cv1, cv2)
        return out

    def contrast_variance_gradient(self, theta: np.ndarray, scale: np.ndarray, Wc: np.ndarray
                                   ) -> np.ndarray:
        """``dv/dtheta`` (G, r, t) of ``v = s c'Cc`` for the rows ``Wc = C c`` (G, r, p).

        With ``w = Z'X C c``, ``k = M^-1 Lambda' w`` and ``a = w - ZZ Lambda k``:
        ``dv/dtheta_j = 2 s sum_{(k,l) in supp Lambda_j} a_k k_l``.
        """
        G, r = Wc.shape[:2]
        out = np.empty((G, r, theta.shape[1]))
        zz = self.zz
        m, s, p = zz.ZX1.shape
        for idx in self.chunks():
            lam = self.st.lam(theta[idx])
            fac = MFactor.build(zz, lam)
            WcT = np.swapaxes(Wc[idx], 1, 2)                              # (G, p, r)
            w = ((zz.ZX1.reshape(m * s, p) @ WcT).reshape(len(idx), m, s, -1), zz.ZX2 @ WcT)
            k = fac.solve(*lam.t(*w))
            a = self.minus_zz_lambda(w, lam, k)
            out[idx] = 2.0 * scale[idx, None, None] * self.st.pair_sums(a, k, contract=False)
        return out

    def deviance_theta_hessian(self, theta: np.ndarray, s2: np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``S``, ``dS/dtheta`` and the theta block of the deviance Hessian at residual variance ``s2``.

        Central differences of the analytic gradients of the log-determinant
        term and ``S`` (step ``1e-5 max(1, |theta|)``).
        """
        G, t = theta.shape
        h = 1e-5 * np.maximum(1.0, np.abs(theta))
        S, _, dS, _ = self.parts(theta)
        Hth = np.empty((G, t, t))
        for j in range(t):
            e = np.zeros_like(theta)
            e[:, j] = h[:, j]
            _, _, dSp, dlp = self.parts(theta + e)
            _, _, dSm, dlm = self.parts(theta - e)
            Hth[:, :, j] = (dlp - dlm + (dSp - dSm) / s2[:, None]) / (2.0 * h[:, j, None])
        return S, dS, Hth

    def value(self, theta: np.ndarray) -> np.ndarray:
        """Criterion per gene."""
        S, logdet, _, _ = self.parts(theta, grad=False)
        return self.m * np.log(np.maximum(S, np.finfo(float).tiny)) + logdet

    def gradient(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Criterion and its gradient (G, t)."""
        S, logdet, dS, dld = self.parts(theta)
        S = np.maximum(S, np.finfo(float).tiny)
        return self.m * np.log(S) + logdet, self.m * dS / S[:, None] + dld

    def newton_terms(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Criterion, analytic gradient and finite-difference Hessian."""
        f, grad = self.gradient(theta)
        return f, grad, self.hessian(theta, grad)

    def hessian(self, theta: np.ndarray, grad: np.ndarray, rel_step: float = 1e-6
                ) -> np.ndarray:
        """Forward difference of the analytic gradient, symmetrised (G, t, t).

        Used for the Newton steps only (t extra gradients); its O(step) error
        slows nothing down, and the optimum is where the analytic gradient
        vanishes.  Standard errors and Satterthwaite df use central
        differences (:func:`varpar_information`).
        """
        return forward_hessian(self.gradient, theta, grad, rel_step)


@dataclass
class ThetaFitResult:
    """Optimiser output for a set of genes."""

    theta: np.ndarray
    criterion: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray


def thread_count(n_jobs: int | None) -> int:
    """Threads for ``n_jobs``, as joblib and scikit-learn read it.

    ``None`` or -1: every core; a positive number: that many; -2: all cores
    but one, and so on (at least one thread).

    Raises
    ------
    ValueError
        For 0 or a value that is not an integer.
    """
    cores = os.cpu_count() or 1
    if n_jobs is None:
        return cores
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0:
        raise ValueError(f"n_jobs={n_jobs!r}: give a positive number of threads, or -1 for "
                         "every core (-2 for all but one, ...).")
    return int(n_jobs) if n_jobs > 0 else max(1, cores + 1 + int(n_jobs))


def over_gene_parts(fn: Any, genes: np.ndarray, workers: int | None) -> Any:
    """``fn(part)`` for contiguous parts of ``genes`` on ``workers`` threads, concatenated
    (arrays along the genes; a dataclass of such arrays field by field).

    Each thread uses one BLAS thread (see :func:`minimise_theta`); the memory
    budget already sized the chunks for ``workers`` evaluations at once.
    """
    parts = [p for p in np.array_split(genes, thread_count(workers)) if p.size]
    if len(parts) <= 1:
        return fn(genes)
    with threadpool_limits(1), ThreadPoolExecutor(len(parts)) as pool:
        outs = list(pool.map(fn, parts))
    if dataclasses.is_dataclass(outs[0]):
        return type(outs[0])(*(np.concatenate([getattr(o, f.name) for o in outs], axis=0)
                               for f in dataclasses.fields(outs[0])))
    return np.concatenate(outs, axis=0)


def minimise_theta(crit: ThetaCriterion, tol: float = 1e-10, maxiter: int = 200,
                   start_theta: np.ndarray | None = None,
                   rescue_starts: tuple[float, ...] = (0.2, 5.0),
                   n_jobs: int | None = None) -> ThetaFitResult:
    """Minimise the criterion for all genes in gene blocks, on ``n_jobs`` threads.

    The genes are independent: they are split into blocks of a few hundred
    (:meth:`ThetaCriterion.fit_blocks`), each minimised by
    :func:`minimise_theta_block`, on a thread pool (numpy releases the GIL in
    the array operations).  ``n_jobs`` as :func:`thread_count` reads it (default: every core).
    """
    workers = thread_count(n_jobs)
    blocks = crit.fit_blocks()
    G, t = crit.yy.shape[0], crit.st.n_theta
    start = (None if start_theta is None
             else np.array(np.broadcast_to(start_theta, (G, t)), dtype=float))

    def run(idx: np.ndarray) -> ThetaFitResult:
        return minimise_theta_block(crit.subset(idx), tol, maxiter,
                                    None if start is None else start[idx], rescue_starts)

    workers = min(len(blocks), workers)
    # one BLAS thread per worker: the products are small, and BLAS threads on top of
    # the workers oversubscribe the cores (measured: twice the CPU time, no gain).  A
    # single worker too: on InstEval (one response, a 1,156 x 1,156 Schur complement
    # per step) the fit took 1.5 s with one BLAS thread against 2.2 s with two, whose
    # idle-waiting thread slows the numpy work between the factorisations (measured on
    # 2 cores).
    with threadpool_limits(1):
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                parts = list(pool.map(run, blocks))
        else:
            parts = [run(idx) for idx in blocks]
    out = ThetaFitResult(np.empty((G, t)), np.empty(G), np.zeros(G, dtype=bool),
                         np.zeros(G, dtype=np.int64))
    for idx, res in zip(blocks, parts, strict=True):
        for name in ("theta", "criterion", "converged", "n_iter"):
            getattr(out, name)[idx] = getattr(res, name)
    return out


#: Starting factor of every variance component (relative standard deviation):
#: lme4's 1.  On the atlas' nested model (1,024 genes, optimised over the ratios
#: ``g``), 0.5 and 0.3 needed 0.4% and 1.1% more Hessian evaluations than 1, and 0.1
#: 12% more, all to the same optima (in ``theta``: 12%, 13% and 45% more).
VC_START = 1.0


def default_start(st: ThetaStructure) -> float:
    """The scale of the default start: lme4's ``T = I`` with random slopes, else :data:`VC_START`."""
    return 1.0 if st.re_dim else VC_START


def minimise_theta_block(crit: ThetaCriterion, tol: float = 1e-10, maxiter: int = 200,
                         start_theta: np.ndarray | None = None,
                         rescue_starts: tuple[float, ...] = (0.2, 5.0)) -> ThetaFitResult:
    """Minimise the criterion for a block of genes; keep the best optimum per gene.

    Every gene starts from :func:`default_start` -- lme4's ``T = I`` with
    random slopes, every factor at :data:`VC_START` for variance components --
    and from ``start_theta`` if given.  Genes that have not converged are
    restarted from ``T = c I`` for every ``c`` in ``rescue_starts`` (and lme4's
    ``c = 1`` first when the default start is another).  (Optimising without
    the sign bounds, see :func:`_newton_canonical`, makes one start enough in
    practice: on about 2,000 simulated fits, five starts never found a better
    optimum than ``T = I`` alone.)

    Parameters
    ----------
    crit : ThetaCriterion
    tol : float
        Stop when the Newton decrement of ``f`` (``-2 log L`` scale) is below ``tol``.
    maxiter : int
        Newton iterations per start.
    start_theta : ndarray, optional
        An extra user starting point (t,) or (G, t).
    rescue_starts : tuple of float
        Scales of the restarts for genes that did not converge.
    """
    G = crit.yy.shape[0]
    first = default_start(crit.st)
    points = [crit.st.start(first, G)]
    if first != 1.0:
        rescue_starts = (1.0,) + tuple(c for c in rescue_starts if c != 1.0)
    if start_theta is not None:
        points.insert(0, np.array(np.broadcast_to(start_theta, (G, crit.st.n_theta)), dtype=float))
    best = _run_start(crit, points[0], tol, maxiter)
    for th0 in points[1:]:
        _keep_better(best, _run_start(crit, th0, tol, maxiter), np.arange(G))
    for c in rescue_starts:
        idx = np.flatnonzero(~best.converged)
        if idx.size == 0:
            break
        th0 = crit.st.start(c, idx.size)
        _keep_better(best, _run_start(crit.subset(idx), th0, tol, maxiter), idx)
    return best


def _run_start(crit: ThetaCriterion, theta0: np.ndarray, tol: float, maxiter: int
               ) -> ThetaFitResult:
    res = _snap_to_bounds(crit, _newton_canonical(crit, theta0, tol, maxiter))
    if getattr(crit, "in_variances", None) is not None:
        # minimised over g = theta^2 >= 0: a ratio at 0 already has df/dg >= 0 (to the
        # Newton tolerance), so there is no saddle point at theta_j = 0 to escape
        return res
    return _escape_boundary(crit, res, tol, maxiter)


#: Bounded parameters below this are tried at exactly 0 (lme4's isSingular tolerance).
SNAP_BELOW = 1e-4


def _snap_to_bounds(crit: ThetaCriterion, res: ThetaFitResult, slack: float = 1e-10
                    ) -> ThetaFitResult:
    """Set bounded parameters below :data:`SNAP_BELOW` to exactly 0 when that costs nothing.

    Without bounds, Newton approaches a singular fit (``T_aa = 0``) as
    ``T_aa -> 0`` without reaching it.  The parameters are set to 0 when the
    criterion does not rise by more than ``slack`` (on the ``-2 log L`` scale),
    so that singular fits are reported exactly on the boundary, as lme4 does.
    """
    bounded = crit.st.bounded
    small = bounded[None] & (res.theta > 0.0) & (res.theta < SNAP_BELOW)
    genes = np.flatnonzero(small.any(axis=1))
    if genes.size == 0:
        return res
    trial = np.where(small[genes], 0.0, res.theta[genes])
    f = crit.subset(genes).value(trial)
    take = np.isfinite(f) & (f <= res.criterion[genes] + slack)
    res.theta[genes[take]] = trial[take]
    res.criterion[genes[take]] = f[take]
    return res


def _keep_better(best: ThetaFitResult, res: ThetaFitResult, idx: np.ndarray) -> None:
    """Replace ``best`` rows ``idx`` where ``res`` has a lower (or the only finite) criterion."""
    better = res.criterion < best.criterion[idx] - 1e-12
    better |= ~np.isfinite(best.criterion[idx]) & np.isfinite(res.criterion)
    for name in ("theta", "criterion", "converged", "n_iter"):
        getattr(best, name)[idx[better]] = getattr(res, name)[better]


def _escape_boundary(crit: ThetaCriterion, res: ThetaFitResult, tol: float, maxiter: int,
                     rounds: int = 3) -> ThetaFitResult:
    """Leave boundary saddle points: try moving each bounded ``theta_j = 0`` inwards.

    With a diagonal ``T`` the criterion is even in every ``theta_j``, so its
    gradient vanishes at ``theta_j = 0`` even when 0 is a local maximum in
    that direction; Newton cannot leave such a point by itself.  For every
    gene with a bounded parameter at 0 along which the criterion decreases
    (:func:`_inward_descent`: its slope in the variance, not in theta, is
    negative), the criterion is evaluated with that
    parameter set to 1e-5, 1e-4, ..., 0.5, 1 and 2 (theta is a ratio of
    standard deviations, so these are scale-free); Newton restarts from the best point
    if it is lower, and the result is kept only if it improves the criterion.
    """
    bounded = np.flatnonzero(crit.st.bounded)
    for _ in range(rounds):
        at0 = _inward_descent(crit, res.theta, bounded)
        genes = np.flatnonzero(at0.any(axis=1))
        if genes.size == 0:
            break
        sub = crit.subset(genes)
        best_th = res.theta[genes].copy()
        best_f = res.criterion[genes].copy()
        for jj, j in enumerate(bounded):
            rows = np.flatnonzero(at0[genes, jj])
            if rows.size == 0:
                continue
            values = np.array([1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0])
            trial = np.repeat(res.theta[genes[rows]], values.size, axis=0)
            trial[:, j] = np.tile(values, rows.size)
            ft = sub.subset(np.repeat(rows, values.size)).value(trial).reshape(rows.size, -1)
            k = np.argmin(np.where(np.isfinite(ft), ft, np.inf), axis=1)
            fk = ft[np.arange(rows.size), k]
            better = np.isfinite(fk) & (fk < best_f[rows] - 1e-12)
            best_th[rows[better]] = trial.reshape(rows.size, values.size, -1)[better, k[better]]
            best_f[rows[better]] = fk[better]
        moved = np.flatnonzero(np.any(best_th != res.theta[genes], axis=1))
        if moved.size == 0:
            break
        new = _snap_to_bounds(sub.subset(moved),
                              _newton_canonical(sub.subset(moved), best_th[moved], tol, maxiter))
        g = genes[moved]
        take = new.criterion < res.criterion[g]
        res.theta[g[take]] = new.theta[take]
        res.criterion[g[take]] = new.criterion[take]
        res.converged[g[take]] = new.converged[take]
        res.n_iter[g[take]] += new.n_iter[take]
        if not take.any():
            break
    return res


def _inward_descent(crit: ThetaCriterion, theta: np.ndarray, bounded: np.ndarray,
                    eps: float = 1e-4) -> np.ndarray:
    """Mask (G, len(bounded)) of bounded parameters at 0 along which the criterion decreases.

    At ``theta_j = 0`` the criterion's slope in ``theta_j`` vanishes, but its
    slope in ``g_j = theta_j^2`` does not: the gradient at ``theta_j = eps`` is
    ``2 eps df/dg_j`` to ``O(eps^3)``.  A negative one makes 0 a saddle point
    or a maximum in that direction; a non-negative one satisfies the optimality
    condition of the bound (a minimum in that direction), which needs no search.
    """
    at0 = theta[:, bounded] <= 1e-6
    genes = np.flatnonzero(at0.any(axis=1))
    if genes.size == 0:
        return at0
    trial = theta[genes].copy()
    trial[:, bounded] = np.where(at0[genes], eps, trial[:, bounded])
    _, grad = crit.subset(genes).gradient(trial)
    out = np.zeros_like(at0)
    out[genes] = at0[genes] & ~(grad[:, bounded] >= 0.0)          # NaN: search
    return out


def _newton_canonical(crit: ThetaCriterion, theta: np.ndarray, tol: float, maxiter: int
                      ) -> ThetaFitResult:
    """Newton on all of theta's space, then the canonical sign (``T_aa >= 0``).

    The criterion depends on ``T`` only through ``T T'``: flipping the sign of
    a column of ``T`` (or of a variance-component factor) leaves it unchanged.
    Optimising without lme4's bounds ``T_aa >= 0`` and flipping signs at the
    end reaches the same optima, but a step that would cross ``T_aa = 0`` is
    not stopped there: a projected method can stall at ``T_aa = 0`` with the
    rest of the column pointing the wrong way (a bound-constrained local
    minimum that is not one of the criterion on ``Psi``).

    Variance components alone (``Lambda`` diagonal) have no such columns: a
    criterion that offers ``in_variances()`` (the exact-Hessian criteria of
    :mod:`flashmm._fit_vc`) is minimised over the ratios ``g = theta^2 >= 0``
    instead, which reaches boundary optima in one projected step.
    """
    in_variances = getattr(crit, "in_variances", None)
    if in_variances is not None:
        res = projected_newton(in_variances(), theta * theta, np.zeros(theta.shape[1]), tol,
                               maxiter)
        return ThetaFitResult(np.sqrt(np.maximum(res.x, 0.0)), res.criterion, res.converged,
                              res.n_iter)
    free = np.full(crit.st.n_theta, -np.inf)
    res = projected_newton(crit, theta, free, tol, maxiter)
    return ThetaFitResult(crit.st.canonical(res.x), res.criterion, res.converged, res.n_iter)


@dataclass
class ThetaGLS:
    """GLS quantities at ``theta`` (genes in rows)."""

    fe_params: np.ndarray         # (G, p)
    cov_unscaled: np.ndarray      # (G, p, p)  (X'H^-1 X)^-1
    blup_unscaled: np.ndarray     # (G, q)     Lambda M^-1 Lambda' (ZY - ZX b)
    condvar_unscaled: np.ndarray  # (G, q)     diag(Lambda M^-1 Lambda') = Var(u | y) / s

    @classmethod
    def empty(cls, G: int, p: int, q: int) -> ThetaGLS:
        """Arrays to fill for G genes (q = 0: no random effects)."""
        return cls(np.empty((G, p)), np.empty((G, p, p)), np.empty((G, q)), np.empty((G, q)))


def gls_theta(crit: ThetaCriterion, theta: np.ndarray, random_effects: bool = True
              ) -> ThetaGLS:
    """Fixed effects, their covariance, BLUPs and conditional variances at ``theta`` (G, t).

    ``crit`` must be built on unscaled statistics (``c = 1``); see
    :meth:`ThetaCriterion.gls`.  ``random_effects=False`` leaves the BLUPs and
    conditional variances out (arrays of 0 columns).
    """
    return crit.gls(theta, random_effects)


def condcov_groups(crit: ThetaCriterion, theta: np.ndarray) -> np.ndarray:
    """Conditional covariance blocks ``Lambda_g (M^-1)_gg Lambda_g'`` of one gene, (m, s, s).

    ``theta`` is the gene's (t,) vector and ``crit`` its (one-gene) criterion.
    Slots follow ``crit.st.slot_cols`` (empty slots are 0).
    """
    sol = crit.solve(theta[None], slice(0, 1))
    Minv = sol.fac.group_inverse()
    L = np.broadcast_to(sol.lam.blocks, Minv.shape)
    return _sym(L @ Minv @ np.swapaxes(L, -1, -2))[0]


# ------------------------------------------------------------- Satterthwaite
def varpar_information(crit: ThetaCriterion, theta: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Hessian of the deviance ``-2 l`` in ``(theta, sigma)`` per gene, (G, t+1, t+1).

    ``-2 l = m log(2 pi sigma^2) + logdet(theta) + S(theta) / sigma^2 (+ const)``:
    the theta block is the central difference of the analytic gradients of
    the log-determinant term and ``S``; the sigma entries are analytic.
    (lmerTest uses the same Hessian, by finite differences of the deviance.)
    """
    S, dS, Hth = crit.deviance_theta_hessian(theta, sigma * sigma)
    return _deviance_hessian(crit, Hth, S, dS, sigma)


def _deviance_hessian(crit: ThetaCriterion, Hth: np.ndarray, S: np.ndarray, dS: np.ndarray,
                      sigma: np.ndarray) -> np.ndarray:
    """The (theta, sigma) Hessian from its theta block and the analytic sigma entries."""
    G, t = dS.shape
    s2 = sigma * sigma
    H = np.empty((G, t + 1, t + 1))
    H[:, :t, :t] = _sym(Hth)
    H[:, :t, t] = H[:, t, :t] = -2.0 * dS / (s2 * sigma)[:, None]
    H[:, t, t] = -2.0 * crit.m / s2 + 6.0 * S / (s2 * s2)
    return H


def free_parameters(st: ThetaStructure, theta: np.ndarray) -> np.ndarray:
    """Mask (G, t + 1) of ``(theta, sigma)`` not held at their lower bound."""
    return np.concatenate([~(st.bounded[None] & (theta <= 0.0)),
                           np.ones((theta.shape[0], 1), dtype=bool)], axis=1)


def varpar_covariance(info: np.ndarray, free: np.ndarray) -> np.ndarray:
    """``2 H^-1`` on the free parameters, 0 rows and columns for the fixed ones (NaN if H is)."""
    G, k = free.shape
    out = np.full((G, k, k), np.nan)
    ok = np.all(np.isfinite(info), axis=(1, 2))
    if ok.any():
        mask = free[ok][:, :, None] & free[ok][:, None, :]
        H = info[ok] * mask
        H[:, np.arange(k), np.arange(k)] += ~free[ok]
        out[ok] = 2.0 * np.linalg.pinv(H) * mask
    return out


def satterthwaite_theta(crit: ThetaCriterion, theta: np.ndarray, scale: np.ndarray,
                        cov_unscaled: np.ndarray, L: np.ndarray, info: np.ndarray
                        ) -> np.ndarray:
    """Satterthwaite df (G, r) for contrast rows ``L`` (r, p) or (G, r, p), as lmerTest.

    ``df = 2 v^2 / (grad' A grad)`` with ``v = c' Cov(b) c``, ``A = 2 H^-1`` the
    covariance of ``(theta, sigma)`` from the deviance Hessian ``info`` and the
    analytic gradient of ``v``: with ``w = ZX (X'H^-1 X)^-1 c``,
    ``k = M^-1 Lambda' w`` and ``a = w - ZZ Lambda k``,
    ``dv/dtheta_j = 2 s sum_{(k,l) in supp Lambda_j} a_k k_l`` and
    ``dv/dsigma = 2 v / sigma``.  Parameters at their lower bound (a singular
    fit) are left out.  ``crit`` is built on unscaled statistics.
    """
    G, t = theta.shape
    sigma = np.sqrt(scale)
    Lg = np.broadcast_to(L, (G,) + L.shape[-2:])
    Wc = np.einsum("gab,grb->gra", cov_unscaled, Lg)
    v = scale[:, None] * np.einsum("grb,grb->gr", Lg, Wc)
    grad = np.empty(v.shape + (t + 1,))
    grad[..., t] = 2.0 * v / sigma[:, None]
    grad[..., :t] = crit.contrast_variance_gradient(theta, scale, Wc)
    free = free_parameters(crit.st, theta)
    A = varpar_covariance(info, free)
    gr = grad * free[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return 2.0 * v ** 2 / np.einsum("gri,gij,grj->gr", gr, A, gr)
