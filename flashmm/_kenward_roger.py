"""Kenward-Roger: the adjusted covariance of the fixed effects and its df, block by block.

pbkrtest's ``vcovAdj`` writes the covariance of the cells linearly in its
parameters, ``V = sum_r gamma_r G_r``: one ``gamma_r`` per entry of the lower
triangle of every random term's covariance (``G_r = Z E_r Z'`` with ``E_r``
the 0/1 pattern of that entry, repeated over the groups) and the residual
variance last (``G = I``).  With ``Phi = (X'V^-1X)^-1`` (lme4's ``vcov``)::

    P_r   = -X'V^-1 G_r V^-1 X
    Q_rs  =  X'V^-1 G_r V^-1 G_s V^-1 X
    IE2   =  tr(V^-1 G_r V^-1 G_s) - 2 tr(Phi Q_rs) + tr(Phi P_r Phi P_s)
    W     =  2 IE2^-1                       (the covariance of gamma-hat)
    PhiA  =  Phi + 2 Phi [sum_rs W_rs (Q_rs - P_r Phi P_s)] Phi

(Kenward and Roger 1997; the second derivatives of V vanish for this
linear parametrisation).  KR's df and F scaling follow from ``Phi``, the
``P_r`` and ``W`` (:func:`kr_df`).

Nothing of size n is formed.  With ``V = s H``, ``H = I + Z Lambda Lambda' Z'``
and ``W_u = Lambda M^-1 Lambda'`` (``M = I + Lambda' Z'Z Lambda``), every
piece is a product of the shared ``Z'Z``, ``Z'X``, ``X'X`` with ``W_u``::

    Z'H^-1 X = (I - ZZ W_u) ZX = E,     Z'H^-2 X = (I - ZZ W_u) E = F
    Z'H^-1 Z = ZZ - ZZ W_u ZZ   = K,     Z'H^-2 Z = (I - ZZ W_u) K
    X'H^-1 X = XX - ZX' W_u ZX,          X'H^-2 X = X'H^-1X - ZX' W_u E
    X'H^-3 X = X'H^-2 X - ZX' W_u F,     tr H^-2 = n - 2 tr(W_u ZZ) + tr((W_u ZZ)^2)

so that ``P_r = -E'E_r E``, ``Q_rs = E'E_r K E_s E``, ``Q_r,res = E'E_r F``,
``Q_res,res = X'H^-3X`` and the traces are ``tr(E_r K E_s K)``, ``tr(E_r Z'H^-2Z)``
and ``tr H^-2`` (all at ``s = 1``; ``Phi`` and ``PhiA`` scale with ``s``, and the
df do not depend on it).

Everything runs in the block layout of :mod:`flashmm._structure`: group
blocks plus a global border of ``d`` crossed columns.  ``W_u = Wb + R S R'``
with ``Wb`` block diagonal and ``R S R'`` of rank ``d`` (``S`` the inverse
Schur complement of ``M``), so ``K = D - U S U'`` with ``D`` block diagonal
with a border and ``U = ZZ R`` (q x d).  Products with ``K`` and ``W_u`` are
block products; the traces expand as
``tr(E_r K E_s K) = tr(E_r D E_s D) - 2 tr(S (E_r U)' D (E_s U)) + tr(S U'E_rU S U'E_sU)``,
and the entries of ``Z'H^-2Z`` on the patterns' supports come from the same
pieces.  The cost per gene is ``O(m s^2 (s + d + p) + d^2 (d + p))``: linear
in the number of groups, and never q x q (one component with any ``Z'Z`` is
first rotated to the eigenbasis of ``Z'Z``, where every column is its own
block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._fit_theta import BlockZZ, MFactor, _spd_inv, _sym
from ._memory import MemoryBudget
from ._reduce import symmetric_eigh
from ._structure import Lambda, ThetaStructure, _bmm

__all__ = [
    "KRDesign",
    "KRPieces",
    "kr_pieces",
    "kr_pieces_per_gene",
    "kr_df",
    "kr_contrast_df",
    "kr_n_parameters",
]

#: pbkrtest's threshold on the smallest |eigenvalue| of ``IE2`` below which ``W = 2 ginv(IE2)``.
_IE2_COND = 1e-10
#: pbkrtest's ``.divZero`` tolerance and its cut-off for ``V0``.
_DIV_ZERO_TOL = 1e-14
_V0_TOL = 1e-10


@dataclass(frozen=True)
class KRDesign:
    """The shared design pieces the adjustment needs (no response).

    Attributes
    ----------
    st : ThetaStructure
        Block layout and the parameters' positions.
    zz : BlockZZ
        ``Z'Z`` and ``Z'X`` in the block layout.
    XX : ndarray
        ``X'X`` (p, p).
    n : int
        Number of observations.
    """

    st: ThetaStructure
    zz: BlockZZ
    XX: np.ndarray
    n: int

    @classmethod
    def of(cls, st: ThetaStructure, ZZ: np.ndarray, ZX: np.ndarray, XX: np.ndarray, n: int
           ) -> KRDesign:
        """The design of statistics ``Z'Z``, ``Z'X``, ``X'X`` in the layout ``st``."""
        return cls(st, BlockZZ.from_stats(st, ZZ, ZX), XX, int(n))

    @classmethod
    def one_component(cls, ZZ: np.ndarray, ZX: np.ndarray, XX: np.ndarray, n: int) -> KRDesign:
        """One variance component with any ``Z'Z``, in the eigenbasis of ``Z'Z``.

        ``Z U`` (``Z'Z = U diag(mu) U'``) gives the same covariance ``g Z Z'``,
        and its cross products are diagonal: every column is a block of one
        slot, and the adjustment costs O(q) per gene (a known covariance, whose
        columns are not indicators, included).
        """
        q = ZZ.shape[0]
        mu = np.diag(ZZ).copy()
        if np.any(ZZ != np.diag(mu)):              # not indicators of one factor: rotate
            mu, U = symmetric_eigh(ZZ)
            ZX = U.T @ ZX
        st = ThetaStructure(q=q, re_dim=0, re_pairs=[], lower=np.zeros(1), vc_components=[0],
                            slot_cols=np.arange(q)[:, None], slot_theta=np.zeros((q, 1), dtype=int),
                            glob_cols=np.zeros(0, dtype=int), glob_theta=np.zeros(0, dtype=int))
        return cls.of(st, np.diag(mu), ZX, XX, n)

    @property
    def blocked(self) -> bool:
        """Every random effect sits in a group block (no global block)."""
        return self.st.glob_cols.size == 0


@dataclass
class KRPieces:
    """Kenward-Roger pieces per gene, at unit residual variance.

    ``Phi = s * cov``, ``PhiA = s * cov_adj``; the ``P`` and ``W`` are those of
    the unit-scale model (the df they give do not depend on ``s``).
    """

    cov: np.ndarray       # (G, p, p)   (X'H^-1X)^-1
    cov_adj: np.ndarray   # (G, p, p)   PhiA / s
    P: np.ndarray         # (G, k, p, p)
    W: np.ndarray         # (G, k, k)


# ------------------------------------------------------------ block vectors
Block = tuple[np.ndarray, np.ndarray]   # (G, m, s, k) group blocks, (G, d, k) global columns


def _inner(x: Block, y: Block) -> np.ndarray:
    """``x'y`` over both parts of block vectors (G, a, b); ``x`` may be shared (no G axis)."""
    x1, x2 = x
    y1, y2 = y
    G = y1.shape[0]
    if x1.ndim == 3:                                      # shared (m, s, a), (d, a)
        m, s, a = x1.shape
        return (x1.reshape(m * s, a).T @ y1.reshape(G, m * s, -1)) + x2.T @ y2
    m, s, a = x1.shape[1:]
    return (np.swapaxes(x1.reshape(G, m * s, a), 1, 2) @ y1.reshape(G, m * s, -1)
            + np.swapaxes(x2, 1, 2) @ y2)


# ------------------------------------------------------------ parameter patterns
@dataclass(frozen=True)
class _Pattern:
    """One ``E_r``: entries ``(g, a, b)`` (and ``(g, b, a)``) of the group blocks of a layout
    ``(m, s)``, and the 0/1 mask ``glob`` (d,) of the global columns it covers."""

    g: np.ndarray
    a: np.ndarray
    b: np.ndarray
    shape: tuple[int, int]
    glob: np.ndarray

    @property
    def diagonal_mask(self) -> np.ndarray | None:
        """The 0/1 diagonal (m, s, 1) of a variance component's pattern (None for covariances)."""
        if np.any(self.a != self.b):
            return None
        mask = np.zeros(self.shape + (1,))
        mask[self.g, self.a] = 1.0
        return mask

    def rows(self, x: np.ndarray) -> np.ndarray:
        """``E_r x`` for the group part of a block array (G, m, s, k)."""
        mask = self.diagonal_mask
        if mask is not None:
            return x * mask
        out = np.zeros_like(x)
        out[:, self.g, self.a] = x[:, self.g, self.b]
        off = self.a != self.b
        out[:, self.g[off], self.b[off]] = x[:, self.g[off], self.a[off]]
        return out

    def apply(self, x: Block) -> Block:
        """``E_r x`` for block vectors."""
        return self.rows(x[0]), x[1] * self.glob[:, None]

    def trace(self, K11: np.ndarray, K22_diag: np.ndarray) -> np.ndarray:
        """``tr(E_r K)`` from the group blocks (G, m, s, s) and the global diagonal (G, d) of ``K``."""
        vals = K11[:, self.g, self.b, self.a]
        group = np.sum(np.where(self.a != self.b, 2.0, 1.0) * vals, axis=1)
        return group + K22_diag @ self.glob


def _tril_entries(st: ThetaStructure, independent: bool) -> list[tuple[int, int]]:
    """The covariance entries ``(k, l)``, ``k >= l``, of the random-slope block, lme4's order."""
    r = st.re_dim
    if independent:
        return [(k, k) for k in range(r)]
    return [(k, l) for l in range(r) for k in range(l, r)]


def kr_n_parameters(st: ThetaStructure, independent: bool) -> int:
    """Number of covariance parameters (pbkrtest's ``gamma``, the residual variance included)."""
    return len(_tril_entries(st, independent)) + st.n_theta - st.n_pairs + 1


def _patterns(st: ThetaStructure, independent: bool) -> list[_Pattern]:
    """The pattern of every covariance parameter but the residual variance."""
    m, shape, d = st.n_groups, st.slot_cols.shape, st.glob_cols.size
    groups = np.arange(m)
    none = np.zeros(d)
    pats = [_Pattern(groups, np.full(m, k), np.full(m, l), shape, none)
            for k, l in _tril_entries(st, independent)]
    for j in range(st.n_pairs, st.n_theta):
        gi, ki = np.nonzero(st.slot_theta == j)
        pats.append(_Pattern(gi, ki, ki, shape, (st.glob_theta == j).astype(float)))
    return pats


# ------------------------------------------------------------ V^-1 through the blocks
@dataclass
class _Bordered:
    """``Z'Z`` and ``Lambda M^-1 Lambda'`` of a chunk of genes as group blocks with a border.

    ``W_u = Lambda M^-1 Lambda' = Wb + R S R'``: ``Wb`` the group blocks
    ``Lambda_g (M11^-1)_g Lambda_g'``, ``R = Lambda [-M11^-1 M12; I]`` (q x d) and
    ``S`` the inverse Schur complement.  ``K = Z'H^-1Z = D - U S U'`` with
    ``D = ZZ - ZZ Wb ZZ`` (group blocks ``D11``, border ``D12``, ``D22``) and
    ``U = ZZ R``: nothing of size q x q.
    """

    A: np.ndarray       # (m, s, s)     shared Z'Z blocks
    B: np.ndarray       # (m, s, d)
    C: np.ndarray       # (d, d)
    Wb: np.ndarray      # (G, m, s, s)
    AW: np.ndarray      # (G, m, s, s)  A Wb
    R: Block            # (G, m, s, d), (G, d, d)
    S: np.ndarray       # (G, d, d)
    D11: np.ndarray     # (G, m, s, s)
    D12: np.ndarray     # (G, m, s, d)
    D22: np.ndarray     # (G, d, d)
    U: Block            # (G, m, s, d), (G, d, d)

    @classmethod
    def build(cls, zz: BlockZZ, lam: Lambda) -> _Bordered:
        fac = MFactor.build(zz, lam)
        if lam.diag is not None:
            Wb = lam.diag[..., :, None] * fac.M11inv * lam.diag[..., None, :]
        else:
            L = np.broadcast_to(lam.blocks, fac.M11inv.shape)
            Wb = _sym(L @ fac.M11inv @ np.swapaxes(L, -1, -2))
        A, B, C = zz.A, zz.B, zz.C
        dvec = lam.dvec
        R1 = -lam.left(fac.dense_F())
        R2 = dvec[:, :, None] * np.eye(dvec.shape[1])
        AW = _bmm(A, Wb)
        WB = _bmm(Wb, np.broadcast_to(B, R1.shape)) if B.size else np.zeros(R1.shape)
        D11 = _sym(A - _bmm(AW, A))
        D12 = B - _bmm(A, WB) if B.size else np.zeros(R1.shape)
        D22 = _sym(C - np.einsum("msc,gmse->gce", B, WB))
        U1 = _bmm(A, R1) + B * dvec[:, None, None, :]
        U2 = np.einsum("msc,gmse->gce", B, R1) + C * dvec[:, None, :]
        return cls(A, B, C, Wb, AW, (R1, R2), fac.Scinv, D11, D12, D22, (U1, U2))

    @property
    def bordered(self) -> bool:
        """There are crossed (global) columns."""
        return self.C.shape[0] > 0

    @classmethod
    def dense(cls, ZZ: np.ndarray, lam_diag: np.ndarray) -> _Bordered:
        """Per-gene ``Z'Z`` (G, q, q) and a diagonal ``Lambda`` (G, q), as one block each."""
        G, q = lam_diag.shape
        M = _sym(np.eye(q) + lam_diag[:, :, None] * ZZ * lam_diag[:, None, :])
        Wb = (lam_diag[:, :, None] * _spd_inv(M) * lam_diag[:, None, :])[:, None]
        A = ZZ[:, None]
        AW = A @ Wb
        empty = np.zeros((G, 1, q, 0))
        return cls(A, np.zeros((1, q, 0)), np.zeros((0, 0)), Wb, AW,
                   (empty, np.zeros((G, 0, 0))), np.zeros((G, 0, 0)), _sym(A - AW @ A), empty,
                   np.zeros((G, 0, 0)), (empty, np.zeros((G, 0, 0))))

    def zz(self, v: Block) -> Block:
        """``Z'Z v``."""
        v1, v2 = v
        if not self.bordered:
            return _bmm(self.A, v1), v2
        o1 = _bmm(self.A, v1) + self.B @ v2[:, None] if self.B.size else _bmm(self.A, v1)
        o2 = self.C @ v2 + np.einsum("msc,gmsk->gck", self.B, v1)
        return o1, o2

    def wu(self, v: Block) -> Block:
        """``Lambda M^-1 Lambda' v``."""
        if not self.bordered:
            return _bmm(self.Wb, v[0]), v[1]
        t = self.S @ _inner(self.R, v)
        return _bmm(self.Wb, v[0]) + self.R[0] @ t[:, None], self.R[1] @ t

    def minus_zz_wu(self, v: Block) -> tuple[Block, Block]:
        """``W_u v`` and ``(I - ZZ W_u) v`` (``Z'H^-1`` applied to a ``Z'`` vector)."""
        w = self.wu(v)
        z = self.zz(w)
        return w, (v[0] - z[0], v[1] - z[1])

    def d(self, v: Block) -> Block:
        """``D v``."""
        v1, v2 = v
        if not self.bordered:
            return _bmm(self.D11, v1), v2
        o1 = _bmm(self.D11, v1) + self.D12 @ v2[:, None]
        o2 = self.D22 @ v2 + np.einsum("gmsc,gmsk->gck", self.D12, v1)
        return o1, o2

    def k(self, v: Block) -> Block:
        """``K v = Z'H^-1Z v = D v - U S U'v``."""
        if not self.bordered:
            return self.d(v)
        t = self.S @ _inner(self.U, v)
        o = self.d(v)
        return o[0] - self.U[0] @ t[:, None], o[1] - self.U[1] @ t

    def trace_h2(self, n: int) -> np.ndarray:
        """``tr H^-2 = n - 2 tr(W_u ZZ) + tr((W_u ZZ)^2)``."""
        WbA = _bmm(self.Wb, self.A)
        RU = _inner(self.R, self.U)
        UWU = _inner(self.U, (_bmm(self.Wb, self.U[0]), np.zeros(self.U[1].shape)))
        SRU = self.S @ RU
        tW = np.einsum("gmii->g", WbA) + np.einsum("gii->g", SRU)
        tWW = (np.einsum("gmij,gmji->g", WbA, WbA) + 2.0 * np.einsum("gij,gji->g", self.S, UWU)
               + np.einsum("gij,gji->g", SRU, SRU))
        return n - 2.0 * tW + tWW

    def k_pieces(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The group blocks, the border and the global block of ``K``."""
        U1, U2 = self.U
        US1 = U1 @ self.S[:, None]
        K11 = _sym(self.D11 - US1 @ np.swapaxes(U1, -1, -2))
        K12 = self.D12 - US1 @ np.swapaxes(U2, 1, 2)[:, None]
        K22 = _sym(self.D22 - U2 @ self.S @ np.swapaxes(U2, 1, 2))
        return K11, K12, K22

    def k2_diagonal_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Group blocks (G, m, s, s) and global diagonal (G, d) of ``Z'H^-2Z = K - ZZ W_u K``."""
        K11, K12, K22 = self.k_pieces()
        V1, V2 = self.k(self.R)                      # K R
        U1, U2 = self.U
        US1 = U1 @ self.S[:, None]
        K2_11 = K11 - _bmm(self.AW, K11) - US1 @ np.swapaxes(V1, -1, -2)
        BW = np.einsum("msc,gmst->gmct", self.B, self.Wb)          # B_g' Wb_g
        K2_22 = (np.diagonal(K22, axis1=1, axis2=2) - np.einsum("gmct,gmtc->gc", BW, K12)
                 - np.einsum("gce,gef,gcf->gc", U2, self.S, V2))
        return K2_11, K2_22

    def trace_pair(self, r: _Pattern, s_: _Pattern, EU: list[Block], SUEU: list[np.ndarray],
                   r_i: int, s_i: int) -> np.ndarray:
        """``tr(E_r K E_s K)`` with ``K = D - U S U'``: ``tr(E_r D E_s D)
        - 2 tr(S (E_r U)' D (E_s U)) + tr(S U'E_r U S U'E_s U)``."""
        dd = (np.einsum("gmij,gmji->g", r.rows(self.D11), s_.rows(self.D11))
              + np.einsum("gmsc,gmsc,c->g", r.rows(self.D12), self.D12, s_.glob)
              + np.einsum("gmsc,gmsc,c->g", s_.rows(self.D12), self.D12, r.glob)
              + np.einsum("c,gce,e->g", r.glob, self.D22 ** 2, s_.glob))
        du = np.einsum("gij,gji->g", self.S, _inner(EU[r_i], self.d(EU[s_i])))
        uu = np.einsum("gij,gji->g", SUEU[r_i], SUEU[s_i])
        return dd - 2.0 * du + uu


# ------------------------------------------------------------ the adjustment
def _adjust(bd: _Bordered, ZX: Block, XX: np.ndarray, n: int, pats: list[_Pattern]
            ) -> KRPieces:
    """pbkrtest's ``vcovAdj`` at unit scale (see the module docstring) from the blocks ``bd``,
    ``Z'X`` (shared, or per gene) and ``X'X`` ((p, p), or per gene)."""
    G = bd.Wb.shape[0]
    ZXg = ZX if ZX[0].ndim == 4 else (np.broadcast_to(ZX[0], (G,) + ZX[0].shape),
                                     np.broadcast_to(ZX[1], (G,) + ZX[1].shape))
    WZ, E = bd.minus_zz_wu(ZXg)                             # Z'H^-1X
    WE, F = bd.minus_zz_wu(E)                               # Z'H^-2X
    XH1 = _sym(XX - _inner(ZX, WZ))
    XH2 = _sym(XH1 - _inner(ZX, WE))
    XH3 = _sym(XH2 - _inner(ZX, bd.wu(F)))
    C = _spd_inv(XH1)

    k, p = len(pats) + 1, XX.shape[-1]
    PE = [pat.apply(E) for pat in pats]
    KPE = [bd.k(pe) for pe in PE]
    EU = [pat.apply(bd.U) for pat in pats]
    SUEU = [bd.S @ _inner(bd.U, eu) for eu in EU]
    K2_11, K2_22 = bd.k2_diagonal_blocks()
    P = np.empty((G, k, p, p))
    Q = np.empty((G, k, k, p, p))
    Kt = np.empty((G, k, k))
    for r, pat in enumerate(pats):
        P[:, r] = -_sym(_inner(E, PE[r]))
        for s_ in range(r, k - 1):
            Q[:, r, s_] = _inner(PE[r], KPE[s_])
            Kt[:, r, s_] = bd.trace_pair(pat, pats[s_], EU, SUEU, r, s_)
        Q[:, r, k - 1] = _inner(PE[r], F)
        Kt[:, r, k - 1] = pat.trace(K2_11, K2_22)
    P[:, k - 1] = -XH2
    Q[:, k - 1, k - 1] = XH3
    Kt[:, k - 1, k - 1] = bd.trace_h2(n)
    for r in range(k):
        for s_ in range(r):
            Q[:, r, s_] = np.swapaxes(Q[:, s_, r], 1, 2)
            Kt[:, r, s_] = Kt[:, s_, r]

    CP = C[:, None] @ P                                     # (G, k, p, p)
    IE2 = (Kt - 2.0 * np.einsum("gab,grsba->grs", C, Q)
           + np.einsum("grab,gsba->grs", CP, CP))
    W = _kr_w(_sym(IE2))
    PCP = P[:, :, None] @ CP[:, None]                       # P_r Phi P_s
    UU = np.einsum("grs,grsab->gab", W, Q - PCP)
    cov_adj = _sym(C + 2.0 * C @ UU @ C)
    return KRPieces(C, cov_adj, P, W)


def _kr_w(IE2: np.ndarray) -> np.ndarray:
    """``2 IE2^-1``, or ``2 ginv(IE2)`` where IE2 is (nearly) singular (pbkrtest's rule)."""
    ok = np.all(np.isfinite(IE2), axis=(1, 2))
    W = np.full(IE2.shape, np.nan)
    if ok.any():
        eig = np.linalg.eigvalsh(IE2[ok])
        inv = np.linalg.pinv(IE2[ok], hermitian=True)
        regular = np.min(np.abs(eig), axis=1) > _IE2_COND
        if regular.any():
            inv[regular] = np.linalg.inv(IE2[ok][regular])
        W[ok] = 2.0 * _sym(inv)
    return W


def _floats_per_gene(st: ThetaStructure, p: int, n_par: int) -> int:
    """float64 values one gene holds in :func:`_adjust` (a conservative count)."""
    m, s, d = st.n_groups, st.block_size, st.glob_cols.size
    return (m * s * ((8 + n_par) * s + (8 + 2 * n_par) * d + (6 + 2 * n_par) * p)
            + (12 + 2 * n_par) * d * (d + p) + 2 * n_par * n_par * p * p)


def kr_pieces(design: KRDesign, theta: np.ndarray, independent: bool = False,
              budget: MemoryBudget | None = None, workers: int = 1) -> KRPieces:
    """The Kenward-Roger pieces of every gene at its fitted ``theta`` (G, t).

    Parameters
    ----------
    design : KRDesign
        The model's shared statistics in block layout.
    theta : ndarray (G, t)
        Fitted relative covariance parameters (lme4's ``theta``), at unit scale.
    independent : bool
        The random-slope block has a diagonal covariance (``independent_re``):
        its covariances are not parameters.
    budget : MemoryBudget, optional
        Bounds the genes handled at once.
    workers : int
        Threads that will call this at once (each holds one chunk).

    Raises
    ------
    MemoryBudgetError
        When one gene's working set exceeds the budget.
    """
    st = design.st
    pats = _patterns(st, independent)
    per_gene = 8 * _floats_per_gene(st, design.XX.shape[0], len(pats) + 1)
    zz = design.zz
    shared = 8 * (zz.A.size + zz.B.size + zz.C.size + zz.ZX1.size + zz.ZX2.size)
    chunk = (budget or MemoryBudget.of(None)).genes_per_chunk(
        shared, per_gene, workers, "Kenward-Roger for this design",
        "Raise max_memory, or use df_method='satterthwaite'.", target=1024)
    ZX = (zz.ZX1, zz.ZX2)
    parts = [_adjust(_Bordered.build(zz, st.lam(theta[a:a + chunk])), ZX, design.XX, design.n,
                     pats) for a in range(0, theta.shape[0], chunk)]
    return _concatenate(parts)


def _concatenate(parts: list[KRPieces]) -> KRPieces:
    return KRPieces(*(np.concatenate([getattr(x, f) for x in parts])
                      for f in ("cov", "cov_adj", "P", "W")))


def kr_pieces_per_gene(ZZ: Any, ZX: np.ndarray, XX: np.ndarray, n: int, lam_diag: np.ndarray,
                       component_index: np.ndarray, budget: MemoryBudget | None = None,
                       workers: int = 1) -> KRPieces:
    """Kenward-Roger pieces for statistics that differ between genes (precision weights).

    With weights ``w`` (lme4's ``lmer(weights = w)``, residual covariance
    ``s W^-1``) the model of ``W^1/2 y`` has ``V = s (I + Z~ Lambda Lambda' Z~')``
    with ``Z~ = W^1/2 Z``, and ``W^1/2`` maps pbkrtest's ``G_r`` and ``G_res =
    W^-1`` to ``Z~ E_r Z~'`` and ``I``: the adjustment is the unweighted one on
    the weighted statistics ``Z'WZ``, ``Z'WX``, ``X'WX``.  Those are per gene,
    so each gene's ``Z'WZ`` is one dense block (the pseudobulk scale: q of a
    few hundred at most), in chunks of genes sized to the budget.

    Parameters
    ----------
    ZZ : callable
        ``ZZ(idx)``: ``Z'WZ`` of the genes ``idx`` as (len(idx), q, q).
    ZX, XX : ndarray (G, q, p), (G, p, p)
        ``Z'WX`` and ``X'WX`` per gene.
    n : int
        Number of observations.
    lam_diag : ndarray (G, q)
        ``Lambda``'s diagonal (variance components only): ``sqrt`` of the ratio
        of each column's component.
    component_index : ndarray (q,)
        Component of every column.
    budget, workers
        As :func:`kr_pieces`.
    """
    G, q = lam_diag.shape
    p = XX.shape[-1]
    k = int(component_index.max()) + 1
    cols = np.arange(q)
    pats = [_Pattern(np.zeros(int(np.sum(component_index == j)), dtype=int),
                     cols[component_index == j], cols[component_index == j], (1, q), np.zeros(0))
            for j in range(k)]
    per_gene = 8 * ((10 + k) * q * q + (8 + 2 * k) * q * p + 2 * (k + 1) ** 2 * p * p)
    chunk = (budget or MemoryBudget.of(None)).genes_per_chunk(
        0, per_gene, workers, "Kenward-Roger with precision weights (dense Z'WZ per gene)",
        "Raise max_memory, or use df_method='satterthwaite'.", target=256)
    parts = []
    for a in range(0, G, chunk):
        idx = np.arange(a, min(G, a + chunk))
        bd = _Bordered.dense(ZZ(idx), lam_diag[idx])
        parts.append(_adjust(bd, (ZX[idx][:, None], np.zeros((idx.size, 0, p))), XX[idx], n, pats))
    return _concatenate(parts)


# ------------------------------------------------------------ df and F scaling
def _div_zero(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((np.abs(x) < _DIV_ZERO_TOL) & (np.abs(y) < _DIV_ZERO_TOL), 1.0, x / y)


def _df_from_a(A1: np.ndarray, A2: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pbkrtest's ``Lb_ddf`` / ``.KR_adjust`` from ``A1``, ``A2`` and the rank ``q``: (df, F scaling)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        B = (A1 + 6.0 * A2) / (2.0 * q)
        g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
        den = 3 * q + 2 * (1 - g)
        c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
        V0 = 1 + c1 * B
        V0 = np.where(np.abs(V0) < _V0_TOL, 0.0, V0)
        V1, V2 = 1 - c2 * B, 1 - c3 * B
        rho = _div_zero(1 - A2 / q, V1) ** 2 * V0 / V2 / q
        df = 4 + (q + 2) / (q * rho - 1)
        scaling = np.where(np.abs(df - 2) < 1e-2, 1.0, df * (1 - A2 / q) / (df - 2))
    return df, scaling


def kr_contrast_df(pieces: KRPieces, L: np.ndarray) -> np.ndarray:
    """KR df of every single contrast row (pbkrtest's ``Lb_ddf`` row by row), (G, r).

    ``L`` is (r, p) or gene-specific (G, r, p).  For one row ``Theta`` has rank
    one, so ``A1 = A2 = sum_ij W_ij t_i t_j`` with ``t_i = c'Phi P_i Phi c / c'Phi c``.
    """
    G = pieces.cov.shape[0]
    Lg = np.broadcast_to(L, (G,) + L.shape[-2:])
    Cc = np.einsum("gab,grb->gra", pieces.cov, Lg)
    v = np.einsum("gra,gra->gr", Lg, Cc)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.einsum("gra,gkab,grb->grk", Cc, pieces.P, Cc) / v[..., None]
    A = np.einsum("grk,gkl,grl->gr", t, pieces.W, t)
    return _df_from_a(A, A, np.ones_like(A))[0]


def kr_df(pieces: KRPieces, L: np.ndarray, q: np.ndarray | int | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """KR denominator df and F scaling of the joint test ``L b = 0`` (pbkrtest's ``.KR_adjust``).

    Parameters
    ----------
    pieces : KRPieces
    L : ndarray (r, p) or (G, r, p)
        Contrast rows of full row rank (r = q).
    q : int or ndarray (G,), optional
        The rank of ``L`` (default: its number of rows).

    Returns
    -------
    df, scaling : ndarray (G,)
    """
    G = pieces.cov.shape[0]
    Lg = np.broadcast_to(L, (G,) + L.shape[-2:])
    q = np.full(G, Lg.shape[1], dtype=float) if q is None else np.broadcast_to(q, (G,)) * 1.0
    C = pieces.cov
    LC = Lg @ C                                            # (G, r, p)
    VL = _sym(LC @ np.swapaxes(Lg, 1, 2))
    ThetaC = np.swapaxes(Lg, 1, 2) @ np.linalg.solve(VL, LC)   # L'(L C L')^-1 L C
    u = ThetaC[:, None] @ pieces.P @ C[:, None]            # (G, k, p, p)
    tr = np.einsum("gkaa->gk", u)
    A1 = np.einsum("gk,gkl,gl->g", tr, pieces.W, tr)
    A2 = np.einsum("gkl,gkab,glba->g", pieces.W, u, u)
    return _df_from_a(A1, A2, q)
