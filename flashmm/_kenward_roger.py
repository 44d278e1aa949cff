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
df do not depend on it).  When every random effect is nested in the group
blocks of :mod:`flashmm._structure` (one component, nested components,
random slopes), ``K`` and ``W_u`` are block diagonal and all of this is
computed block by block, linear in the number of groups.  A global block
(crossed factors) couples every column: then the same formulas run on dense
``q x q`` matrices per gene, within the memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._fit_theta import BlockZZ, MFactor, _spd_inv, _sym
from ._memory import MemoryBudget
from ._structure import Lambda, ThetaStructure, _bmm

__all__ = ["KRDesign", "KRPieces", "kr_pieces", "kr_df", "kr_contrast_df", "kr_n_parameters"]

#: pbkrtest's threshold on the smallest |eigenvalue| of ``IE2`` below which ``W = 2 ginv(IE2)``.
_IE2_COND = 1e-10
#: pbkrtest's ``.divZero`` tolerance and its cut-off for ``V0``.
_DIV_ZERO_TOL = 1e-14
_V0_TOL = 1e-10
#: float64 values of dense ``q x q`` matrices held per gene on the crossed path (K, K2, W_u, ...).
_DENSE_MATRICES = 6


@dataclass(frozen=True)
class KRDesign:
    """The shared design pieces the adjustment needs (no response).

    Attributes
    ----------
    st : ThetaStructure
        Block layout and the parameters' positions.
    zz : BlockZZ or None
        ``Z'Z`` and ``Z'X`` in the block layout (None with a global block:
        the dense path reads ``ZZ`` and ``ZX``).
    ZZ, ZX, XX : ndarray
        ``Z'Z`` (q, q), ``Z'X`` (q, p), ``X'X`` (p, p) in the order of Z's columns
        (the dense path of designs with a global block).
    n : int
        Number of observations.
    """

    st: ThetaStructure
    zz: BlockZZ | None
    ZZ: np.ndarray
    ZX: np.ndarray
    XX: np.ndarray
    n: int

    @classmethod
    def of(cls, st: ThetaStructure, ZZ: np.ndarray, ZX: np.ndarray, XX: np.ndarray, n: int
           ) -> KRDesign:
        """The design of statistics ``Z'Z``, ``Z'X``, ``X'X`` in the layout ``st``."""
        zz = BlockZZ.from_stats(st, ZZ, ZX) if st.glob_cols.size == 0 else None
        return cls(st, zz, ZZ, ZX, XX, int(n))

    @property
    def blocked(self) -> bool:
        """Every random effect sits in a group block (no global block)."""
        return self.zz is not None


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


# ------------------------------------------------------------ parameter patterns
@dataclass(frozen=True)
class _Pattern:
    """Entries ``(g, a, b)`` (and ``(g, b, a)``) of one ``E_r`` in a block layout ``(m, s)``."""

    g: np.ndarray
    a: np.ndarray
    b: np.ndarray
    shape: tuple[int, int]

    @property
    def diagonal_mask(self) -> np.ndarray | None:
        """The 0/1 diagonal (m, s, 1) of a variance component's pattern (None for covariances)."""
        if np.any(self.a != self.b):
            return None
        mask = np.zeros(self.shape + (1,))
        mask[self.g, self.a] = 1.0
        return mask

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``E_r x`` for block arrays (G, m, s, k)."""
        mask = self.diagonal_mask
        if mask is not None:
            return x * mask
        out = np.zeros_like(x)
        out[:, self.g, self.a] = x[:, self.g, self.b]
        off = self.a != self.b
        out[:, self.g[off], self.b[off]] = x[:, self.g[off], self.a[off]]
        return out

    def trace(self, K: np.ndarray) -> np.ndarray:
        """``tr(E_r K)`` for symmetric block matrices (G, m, s, s)."""
        vals = K[:, self.g, self.b, self.a]
        return np.sum(np.where(self.a != self.b, 2.0, 1.0) * vals, axis=1)


def _tril_entries(st: ThetaStructure, independent: bool) -> list[tuple[int, int]]:
    """The covariance entries ``(k, l)``, ``k >= l``, of the random-slope block, lme4's order."""
    r = st.re_dim
    if independent:
        return [(k, k) for k in range(r)]
    return [(k, l) for l in range(r) for k in range(l, r)]


def kr_n_parameters(st: ThetaStructure, independent: bool) -> int:
    """Number of covariance parameters (pbkrtest's ``gamma``, the residual variance included)."""
    return len(_tril_entries(st, independent)) + st.n_theta - st.n_pairs + 1


def _block_patterns(st: ThetaStructure, independent: bool) -> list[_Pattern]:
    """Patterns in the group-block layout (designs without a global block)."""
    m, shape = st.n_groups, st.slot_cols.shape
    groups = np.arange(m)
    pats = [_Pattern(groups, np.full(m, k), np.full(m, l), shape)
            for k, l in _tril_entries(st, independent)]
    for j in range(st.n_pairs, st.n_theta):
        gi, ki = np.nonzero(st.slot_theta == j)
        pats.append(_Pattern(gi, ki, ki, shape))
    return pats


def _dense_patterns(st: ThetaStructure, independent: bool) -> list[_Pattern]:
    """Patterns on the columns of Z (one block of size q)."""
    pats = []
    shape = (1, st.q)
    for k, l in _tril_entries(st, independent):
        ok = (st.slot_cols[:, k] >= 0) & (st.slot_cols[:, l] >= 0)
        a, b = st.slot_cols[ok, k], st.slot_cols[ok, l]
        pats.append(_Pattern(np.zeros(a.size, dtype=int), a, b, shape))
    for j in range(st.n_pairs, st.n_theta):
        cols = np.concatenate([st.slot_cols[st.slot_theta == j], st.glob_cols[st.glob_theta == j]])
        pats.append(_Pattern(np.zeros(cols.size, dtype=int), cols, cols, shape))
    return pats


# ------------------------------------------------------------ W_u = Lambda M^-1 Lambda'
def _blocked_wu(design: KRDesign, lam: Lambda) -> np.ndarray:
    """Group blocks of ``Lambda M^-1 Lambda'`` (G, m, s, s); no global block."""
    fac = MFactor.build(design.zz, lam)
    if lam.diag is not None:
        return lam.diag[..., :, None] * fac.M11inv * lam.diag[..., None, :]
    L = np.broadcast_to(lam.blocks, fac.M11inv.shape)
    return _sym(L @ fac.M11inv @ np.swapaxes(L, -1, -2))


def _dense_lambda(st: ThetaStructure, lam: Lambda) -> np.ndarray:
    """``Lambda`` as dense (G, q, q) matrices in the order of Z's columns."""
    G = lam.dvec.shape[0]
    out = np.zeros((G, st.q, st.q))
    valid = st.slot_cols >= 0
    gi, a, b = np.nonzero(valid[:, :, None] & valid[:, None, :])
    if gi.size:
        blocks = lam.blocks
        out[:, st.slot_cols[gi, a], st.slot_cols[gi, b]] = blocks[
            :, gi if blocks.shape[1] > 1 else 0, a, b]
    out[:, st.glob_cols, st.glob_cols] = lam.dvec
    return out


def _dense_wu(design: KRDesign, lam: Lambda) -> np.ndarray:
    """``Lambda M^-1 Lambda'`` as dense (G, 1, q, q) matrices."""
    Lam = _dense_lambda(design.st, lam)
    LamT = np.swapaxes(Lam, 1, 2)
    M = _sym(np.eye(design.st.q) + LamT @ design.ZZ @ Lam)
    return _sym(Lam @ _spd_inv(M) @ LamT)[:, None]


# ------------------------------------------------------------ the adjustment
def _bsum(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``sum_g x_g' y_g`` over the blocks of (G, m, s, a) and (G, m, s, b) -> (G, a, b)."""
    G, m, s, a = x.shape
    return np.swapaxes(x.reshape(G, m * s, a), 1, 2) @ y.reshape(G, m * s, -1)


def _shared_bsum(ZX: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``sum_g ZX_g' y_g`` for the shared blocks ``ZX`` (m, s, p) and y (G, m, s, b)."""
    m, s, p = ZX.shape
    return ZX.reshape(m * s, p).T @ y.reshape(y.shape[0], m * s, -1)


def _adjust(A: np.ndarray, ZX: np.ndarray, XX: np.ndarray, n: int, Wu: np.ndarray,
            pats: list[_Pattern]) -> KRPieces:
    """pbkrtest's ``vcovAdj`` at unit scale from the blocks ``A = Z'Z`` (m, s, s),
    ``ZX`` (m, s, p) and ``W_u`` (G, m, s, s); see the module docstring."""
    G = Wu.shape[0]
    AW = _bmm(A, Wu)                                        # (G, m, s, s)
    K = _sym(A - _bmm(AW, A))
    WZ = _bmm(Wu, ZX)
    E = ZX - _bmm(A, WZ)                                    # Z'H^-1X
    WE = _bmm(Wu, E)
    F = E - _bmm(A, WE)                                     # Z'H^-2X
    K2 = K - _bmm(AW, K)                                    # Z'H^-2Z
    XH1 = _sym(XX - _shared_bsum(ZX, WZ))
    XH2 = _sym(XH1 - _shared_bsum(ZX, WE))
    XH3 = _sym(XH2 - _shared_bsum(ZX, _bmm(Wu, F)))
    trH2 = n - 2.0 * np.einsum("gmii->g", AW) + np.einsum("gmij,gmji->g", AW, AW)
    C = _spd_inv(XH1)

    k = len(pats) + 1
    p = XX.shape[0]
    PE = [pat.apply(E) for pat in pats]
    EK = [pat.apply(K) for pat in pats]
    P = np.empty((G, k, p, p))
    Q = np.empty((G, k, k, p, p))
    Kt = np.empty((G, k, k))
    for r, (pe, ek) in enumerate(zip(PE, EK, strict=True)):
        P[:, r] = -_sym(_bsum(E, pe))
        for s_ in range(r, k - 1):
            Q[:, r, s_] = _bsum(pe, _bmm(K, PE[s_]))
            Kt[:, r, s_] = np.einsum("gmij,gmji->g", ek, EK[s_])
        Q[:, r, k - 1] = _bsum(pe, F)
        Kt[:, r, k - 1] = pats[r].trace(K2)
    P[:, k - 1] = -XH2
    Q[:, k - 1, k - 1] = XH3
    Kt[:, k - 1, k - 1] = trH2
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


def _dense_floats(design: KRDesign, n_par: int) -> int:
    q, p = design.st.q, design.XX.shape[0]
    return (_DENSE_MATRICES + n_par) * q * q + (3 + n_par) * q * p + n_par * n_par * p * p * 2


def _blocked_floats(design: KRDesign, n_par: int) -> int:
    m, s, p = design.st.n_groups, design.st.block_size, design.XX.shape[0]
    return (_DENSE_MATRICES + n_par) * m * s * s + (3 + n_par) * m * s * p + 2 * n_par ** 2 * p * p


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
        When one gene's working set exceeds the budget (the dense path of a
        design with crossed factors and many levels).
    """
    st = design.st
    pats = (_block_patterns if design.blocked else _dense_patterns)(st, independent)
    per_gene = 8 * (_blocked_floats if design.blocked else _dense_floats)(design, len(pats) + 1)
    crossed = ("" if design.blocked else
               f" ({st.glob_cols.size} of the q = {st.q} random effects are crossed with the "
               "groups, so the adjustment uses dense q x q matrices per gene)")
    chunk = (budget or MemoryBudget.of(None)).genes_per_chunk(
        8 * design.ZZ.size, per_gene, workers, f"Kenward-Roger for this design{crossed}",
        "Raise max_memory, or use df_method='satterthwaite'.", target=256)
    if design.blocked:
        A, ZX = design.zz.A, design.zz.ZX1
    else:
        A, ZX = design.ZZ[None], design.ZX[None]
    parts = []
    for a in range(0, theta.shape[0], chunk):
        lam = st.lam(theta[a:a + chunk])
        Wu = _blocked_wu(design, lam) if design.blocked else _dense_wu(design, lam)
        parts.append(_adjust(A, ZX, design.XX, design.n, Wu, pats))
    return KRPieces(*(np.concatenate([getattr(x, f) for x in parts])
                      for f in ("cov", "cov_adj", "P", "W")))


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
