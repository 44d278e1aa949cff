"""Variance components with a global block: the criterion with an exact Hessian.

Crossed designs such as ``(1|donor) + (1|batch)``, and nested plus crossed
ones such as ``(1|donor) + (1|donor:celltype) + (1|batch)``, put the columns of
the crossed factor in the *global* block of :mod:`flashmm._structure` (d
columns beside the m group blocks of s slots).  :class:`ThetaCriterion
<flashmm._fit_theta.ThetaCriterion>` handles them with a forward-difference
Hessian (t extra gradients per Newton step); this module gives the value, the
gradient and the exact Hessian in one pass, at the cost of about one gradient.

Notation (unit residual variance, ratios ``g_j = theta_j^2``).  Split
``V = V1 + Z2 G2 Z2'`` into the group part ``V1 = I + Z1 G1 Z1'`` (block
diagonal in the groups) and the global columns ``Z2``.  ``V1^-1`` is applied
block by block: with ``N = Lambda1 M11^-1 Lambda1`` per group block,
``Z1'V1^-1 w = (I - A N) Z1'w`` and ``w'V1^-1 v = w'v - (Z1'w)' N (Z1'v)``.
The global columns are then profiled like extra fixed effects (Henderson's
mixed-model equations): with ``Xe = [X, Z2]`` (e = p + d columns),
``H = Xe'V1^-1 Xe``, ``D = diag(1_p, lambda_2)`` and

    Phi = D H D + diag(0_p, I_d),      J = D Phi^-1 D,

the REML projection is ``P = V1^-1 - V1^-1 Xe J Xe'V1^-1``, so that

    S = y'Py = y'V1^-1y - h'J h,   h = Xe'V1^-1 y,
    log|M| + log|X'V^-1X| = sum_blocks log|M11_b| + log|Phi|,
    log|M| = sum_blocks log|M11_b| + log|Sc|,   Sc = I + Lambda2 H_zz Lambda2 (ML).

Every derivative of :mod:`flashmm._fit_vc` needs ``Z'PZ`` on the pairs of
columns of two components.  With ``K1 = Z'V1^-1 Z`` (the pattern of ``Z'Z``:
group blocks, their rows against the global columns, the global block) and
``U = Z'V1^-1 Xe`` (q x e),

    Z'PZ = K1 - U J U',   Z'V^-1 Z = K1 - U J_ML U',   J_ML = blockdiag(0_p, Lambda2 Sc^-1 Lambda2),
    a = Z'Py = Z'V1^-1 y - U J h.

For components i and j (J_L = J for REML, J_ML for ML):

    S_i  = -sum_{k in i} a_k^2
    S_ij =  2 [sum_{k in i, l in j} a_k K1_kl a_l - (U_i'a_i)' J (U_j'a_j)]
    L_i  =  sum_{k in i} K1_kk - (U J_L U')_kk
    L_ij = -[sum_{(k, l) in pattern, k in i, l in j} K1_kl (K1_kl - 2 (U J_L U')_kl)
             + tr(J_L Gamma_i J_L Gamma_j)],   Gamma_i = sum_{k in i} U_k U_k'

(``||(K1 - U J U')_ij||_F^2`` expanded: ``K1`` has the sparse pattern, the
low-rank part is summed through the e x e matrices ``Gamma``).  Nothing of size
q x q is formed; the cost per gene is ``O(m s^2 (s + e) + q e^2 + e^3)``.
The conversion to ``theta`` is :func:`flashmm._fit_vc._to_theta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ._arrow_blocks import _Arrow, _Blocks, _bmat, _position_parameters, arrow_blocks, arrow_pairs
from ._fit_theta import (
    ThetaCriterion,
    ThetaGLS,
    _arrowhead_inverse,
    _flat,
    _logdet_pd,
    _small_spd_inverse,
    _spd_inv,
    _sym,
    working_set_floats,
)
from ._fit_vc import VCBlockCriterion, _Eval, _Shared
from ._structure import _bmm

__all__ = ["GlobalVCCriterion", "global_applies"]

#: The children's outer products are stored sparse below this density (indicator
#: designs: a row of ``[Z1'X | Z1'Z2]`` has a few non-zeros, 3% of the products at the
#: atlas shape, and the weighted sums then cost 30 times less).
SPARSE_BELOW = 0.25

#: Largest global block handled with the exact Hessian; beyond it the e x e
#: products (``q e^2`` per evaluation) outgrow the forward-difference Hessian's.
MAX_GLOBAL = 256


def global_applies(crit: ThetaCriterion) -> bool:
    """Variance components only, with a global block of at most :data:`MAX_GLOBAL` columns."""
    st = crit.st
    return (st.re_dim == 0 and st.n_theta > 0 and 0 < st.glob_cols.size <= MAX_GLOBAL)


@dataclass
class _GlobalShared:
    """Per-model arrays of the global block shared by every gene."""

    Rs: np.ndarray         # (m, s, e)  [Z1'X | Z1'Z2] in the group slots
    XeXe: np.ndarray       # (e, e)     Xe'Xe = [[X'X, X'Z2], [Z2'X, Z2'Z2]]
    glob1: np.ndarray      # (d, t)     global column -> theta (one-hot)
    rows: list[np.ndarray]  # flat group rows (m s) of every theta

    @classmethod
    def of(cls, crit: ThetaCriterion) -> _GlobalShared:
        st, zz = crit.st, crit.zz
        d, t = st.glob_cols.size, st.n_theta
        glob1 = np.zeros((d, t))
        glob1[np.arange(d), st.glob_theta] = 1.0
        XeXe = np.block([[crit.XX, zz.ZX2.T], [zz.ZX2, zz.C]])
        flat = st.slot_theta.ravel()
        rows = [np.flatnonzero(flat == j) for j in range(t)]
        return cls(np.concatenate([zz.ZX1, zz.B], axis=-1), XeXe, glob1, rows)


@dataclass
class _GlobalArrow:
    """Arrowhead group blocks (:class:`~flashmm._arrow_blocks._Arrow`) and the rows of
    ``[Z1'X | Z1'Z2]`` split into the blocks' first slot and their children."""

    ar: _Arrow
    R0: np.ndarray         # (m, e)
    Rc: np.ndarray         # (m, c, e)
    Rcf: np.ndarray        # (m c, e)
    P2: np.ndarray | sp.csr_matrix   # (m c, e(e+1)/2) upper triangles of the children's
    #                                  outer products (sparse for indicator designs)
    iu: tuple[np.ndarray, np.ndarray]

    @classmethod
    def of(cls, crit: ThetaCriterion, gl: _GlobalShared) -> _GlobalArrow | None:
        """The closed-form arrays, or None when the blocks are not arrowheads whose slot
        positions each belong to one parameter, or a parameter has both group and global columns."""
        st = crit.st
        split = np.intersect1d(st.slot_theta[st.slot_theta >= 0], st.glob_theta).size
        if split or not crit.zz.arrowhead or np.any(_position_parameters(st.slot_theta) == -2):
            return None
        m, s, e = gl.Rs.shape
        Rc = np.ascontiguousarray(gl.Rs[:, 1:])
        Rcf = Rc.reshape(m * (s - 1), e)
        iu = np.triu_indices(e)
        P2 = Rcf[:, iu[0]] * Rcf[:, iu[1]]
        if P2.size and np.count_nonzero(P2) < SPARSE_BELOW * P2.size:
            P2 = sp.csr_matrix(P2)          # indicator rows: a few non-zeros each
        return cls(_Arrow.of(crit), np.ascontiguousarray(gl.Rs[:, 0]), Rc, Rcf, P2, iu)

    def weighted(self, w: np.ndarray) -> np.ndarray:
        """``sum_{blocks, children} w_k R_k R_k'`` (..., e, e) for weights w (..., m, c)."""
        e = self.R0.shape[1]
        if self.Rcf.shape[0] == 0:                        # no children (one slot per block)
            return np.zeros(w.shape[:-2] + (e, e))
        packed = w.reshape(-1, self.Rcf.shape[0]) @ self.P2
        out = np.empty((packed.shape[0], e, e))
        out[:, self.iu[0], self.iu[1]] = packed
        out[:, self.iu[1], self.iu[0]] = packed
        return out.reshape(w.shape[:-2] + (e, e))


def _cholesky_solve(Phi: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``L^-1 v`` and ``log|Phi|`` with ``L L' = Phi`` (G, e, e); NaN for genes where
    ``Phi`` is not numerically positive definite (a line-search trial far out)."""
    try:
        L = np.linalg.cholesky(Phi)
    except np.linalg.LinAlgError:
        w, V = np.linalg.eigh(Phi)
        ok = np.all(w > 0.0, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.einsum("gij,gi->gj", V, v) / np.sqrt(np.where(ok[:, None], w, np.nan))
            return z, np.where(ok, np.sum(np.log(np.abs(w)), axis=1), np.nan)
    z = np.linalg.solve(L, v[..., None])[..., 0]
    return z, 2.0 * np.sum(np.log(np.diagonal(L, axis1=1, axis2=2)), axis=1)


def _arrow_floats(m: int, s: int, d: int, p: int, t: int) -> int:
    """float64 values one gene holds during a Newton evaluation with arrowhead blocks:
    vectors over (blocks, slots), (blocks, e) and e x e per parameter.

    Calibrated on the peak traced memory of the atlas' crossed and three-component
    models (47,000 and 101,000 floats per gene in a Newton evaluation, the largest of
    the criterion's, the GLS's and the contrast gradient's with p contrast rows):
    this count is 1.7 and 1.2 times those.
    """
    e = p + d
    return m * s * 24 + m * e * (t + 4) + e * e * (3 * t + 8) + 4 * d * d


def _global_floats(m: int, s: int, d: int, p: int, t: int) -> int:
    """float64 values one gene holds during a Newton evaluation of the global criterion."""
    e = p + d
    return m * s * (8 * s + 6 * (e + 1) + 3 * d + 4 * t) + 6 * (e + 1) ** 2 + 2 * t * e * e + 4 * d * d


def _global_only(Sc: np.ndarray, lam2: np.ndarray, p: int) -> np.ndarray:
    """``J_ML = blockdiag(0_p, Lambda2 Sc^-1 Lambda2)`` (G, p + d, p + d) from the global
    block ``Sc = I + Lambda2 H_zz Lambda2`` of ``Phi``: the global columns profiled
    without the fixed effects."""
    G, d = lam2.shape
    out = np.zeros((G, p + d, p + d))
    out[:, p:, p:] = lam2[:, :, None] * _spd_inv(Sc) * lam2[:, None, :]
    return out


@dataclass
class _ArrowCore:
    """The closed-form group blocks and the profiled global columns at ``theta``."""

    bl: _Blocks
    zy0: np.ndarray       # (G, m)     Z1'y, first slots
    zyc: np.ndarray       # (G, m, c)  Z1'y, children
    ae: np.ndarray        # (G, m, c)  a e
    xt: np.ndarray        # (G, m, e)  v'[Z1'X | Z1'Z2]
    lam2: np.ndarray      # (G, d)     the global columns' factors
    S: np.ndarray
    ld2: np.ndarray
    hy: np.ndarray        # (G, e)     Xe'V1^-1 y
    H: np.ndarray         # (G, e, e)  Xe'V1^-1 Xe
    J: np.ndarray         # (G, e, e)
    JL: np.ndarray
    wy: np.ndarray        # (G, e)     J h = (b, u2)


@dataclass
class GlobalVCCriterion(VCBlockCriterion):
    """:class:`~flashmm._fit_vc.VCBlockCriterion` for variance components with a global block.

    Same value and gradient as :class:`~flashmm._fit_theta.ThetaCriterion`;
    :meth:`newton_terms` and :meth:`theta_derivatives` use the exact Hessian
    (module docstring).
    """

    glob: _GlobalShared | None = field(default=None, repr=False)
    arrowg: _GlobalArrow | None = field(default=None, repr=False)

    @classmethod
    def of(cls, crit: ThetaCriterion) -> GlobalVCCriterion:
        """The global-block criterion of the same genes and statistics."""
        st, p = crit.st, crit.XX.shape[0]
        m, s, d, t = st.n_groups, st.block_size, st.glob_cols.size, st.n_theta
        gl = _GlobalShared.of(crit)
        arrow = _GlobalArrow.of(crit, gl)
        floats = _global_floats(m, s, d, p, t) if arrow is None else _arrow_floats(m, s, d, p, t)
        chunk = max(1, crit._chunk_size() * working_set_floats(st, p) // floats)
        return cls(crit.st, crit.zz, crit.XX, crit.XY, crit.ZY, crit.yy, crit.n, crit.reml,
                   chunk, _Shared.of(crit), gl, arrow)

    def subset(self, idx: np.ndarray) -> GlobalVCCriterion:
        """The criterion of genes ``idx``."""
        return GlobalVCCriterion(self.st, self.zz, self.XX, self.XY[idx], self.ZY[idx],
                                 self.yy[idx], self.n, self.reml, self.chunk, self.shared,
                                 self.glob, self.arrowg)

    def _evaluate(self, theta: np.ndarray, idx: np.ndarray, order: int) -> _Eval:
        """``S``, ``L`` and (``order`` >= 1, 2) their derivatives in ``g`` for genes ``idx``."""
        if self.arrowg is not None:
            return self._evaluate_arrow(theta, idx, order)
        return self._evaluate_dense(theta, idx, order)

    def _evaluate_dense(self, theta: np.ndarray, idx: np.ndarray, order: int) -> _Eval:
        """:meth:`_evaluate` on dense s x s group blocks."""
        sh, gl, st = self.shared, self.glob, self.st
        G = theta.shape[0]
        m, s, p = sh.ZX.shape
        d = st.glob_cols.size
        lam1 = (theta @ sh.onehot.T).reshape(G, m, s)
        lam2 = theta[:, st.glob_theta]
        M = _sym(np.eye(s) + lam1[..., :, None] * sh.A * lam1[..., None, :])
        Minv, ldM = _arrowhead_inverse(M) if sh.arrowhead else _small_spd_inverse(M)
        N = lam1[..., :, None] * Minv * lam1[..., None, :]
        ZY = self.ZY[idx]
        valid = st.slot_cols >= 0
        zy1 = ZY[:, np.where(valid, st.slot_cols, 0)] * valid
        zy2 = ZY[:, st.glob_cols]
        R = np.concatenate([zy1[..., None], np.broadcast_to(gl.Rs, (G,) + gl.Rs.shape)], axis=-1)
        NR = _bmm(N, R)
        Kx = R - _bmm(sh.A, NR)                                    # Z1'V1^-1 [y | X | Z2]
        Gram = -np.swapaxes(_flat(R), 1, 2) @ _flat(NR)            # - R'N R, (G, 1+e, 1+e)
        Gram[:, 0, 0] += self.yy[idx]
        Gram[:, 1:, 0] += np.concatenate([self.XY[idx], zy2], axis=1)
        Gram[:, 0, 1:] = Gram[:, 1:, 0]
        Gram[:, 1:, 1:] += gl.XeXe
        hy, H = Gram[:, 1:, 0], _sym(Gram[:, 1:, 1:])
        Dv = np.concatenate([np.ones((G, p)), lam2], axis=1)
        Phi = Dv[:, :, None] * H * Dv[:, None, :]
        Phi[:, np.arange(p, p + d), np.arange(p, p + d)] += 1.0
        z, ldPhi = _cholesky_solve(Phi, Dv * hy)
        S = Gram[:, 0, 0] - np.sum(z * z, axis=1)                 # a sum of squares: accurate
        J = Dv[:, :, None] * _spd_inv(Phi) * Dv[:, None, :]
        wy = np.einsum("gij,gj->gi", J, hy)
        if self.reml:
            logdet = np.sum(ldM, axis=1) + ldPhi
            JL = J
        else:
            Sc = Phi[:, p:, p:]
            logdet = np.sum(ldM, axis=1) + _logdet_pd(Sc)
            JL = _global_only(Sc, lam2, p)
        out = _Eval(S, logdet)
        if order == 0:
            return out
        U1, U2 = Kx[..., 1:], H[:, p:, :]                         # U = Z'V1^-1 Xe
        a1 = Kx[..., 0] - np.einsum("gmse,ge->gms", U1, wy)        # a = Z'Py
        a2 = hy[:, p:] - np.einsum("gde,ge->gd", U2, wy)
        Kb = sh.A - _bmm(_bmm(sh.A, N), sh.A)                      # K1: group blocks,
        T1 = Kx[..., 1 + p:]                                       # group x global,
        Ct = H[:, p:, p:]                                          # global block
        UJ1 = (_flat(U1) @ JL).reshape(U1.shape)
        UJ2 = U2 @ JL
        out.dS = -self._collect(a1 * a1, a2 * a2)
        out.dL = self._collect(np.diagonal(Kb, axis1=-2, axis2=-1) - np.sum(UJ1 * U1, axis=-1),
                               np.diagonal(Ct, axis1=1, axis2=2) - np.sum(UJ2 * U2, axis=-1))
        if order == 1:
            return out
        out.d2S = self._s_hessian_global(a1, a2, Kb, T1, Ct, U1, U2, J)
        out.d2L = self._l_hessian_global(Kb, T1, Ct, U1, U2, UJ1, UJ2, JL)
        return out

    def _collect(self, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
        """``sum_{k in j} x_k`` per parameter j for group-slot (G, m, s) and global (G, d) values."""
        G = x1.shape[0]
        return x1.reshape(G, -1) @ self.shared.onehot + x2 @ self.glob.glob1

    def _pair_sums(self, Wb: np.ndarray, Wx: np.ndarray, Wg: np.ndarray) -> np.ndarray:
        """``sum_{k in i, l in j} W_kl`` (G, t, t) over the pattern of ``Z'Z``: group blocks
        ``Wb`` (G, m, s, s), group x global ``Wx`` (G, m, s, d) (and its transpose), global ``Wg``."""
        sh, g1 = self.shared, self.glob.glob1
        G = Wb.shape[0]
        out = np.einsum("gmkj,mki->gij", Wb @ sh.slot3, sh.slot3)
        cross = sh.onehot.T @ (_flat(Wx) @ g1)                     # (G, t, t)
        out += cross + np.swapaxes(cross, 1, 2)
        out += g1.T @ Wg @ g1
        return out.reshape(G, g1.shape[1], g1.shape[1])

    def _s_hessian_global(self, a1: np.ndarray, a2: np.ndarray, Kb: np.ndarray, T1: np.ndarray,
                          Ct: np.ndarray, U1: np.ndarray, U2: np.ndarray, J: np.ndarray
                          ) -> np.ndarray:
        """``S_ij = 2 [a_i' K1_ij a_j - (U_i'a_i)' J (U_j'a_j)]`` (G, t, t)."""
        sh, g1 = self.shared, self.glob.glob1
        G, m, s = a1.shape
        x1 = a1[..., None] * sh.slot3                               # a masked to each theta
        x2 = a2[..., None] * g1
        y1 = _bmm(Kb, x1) + (_flat(T1) @ x2).reshape(x1.shape)      # K1 x
        y2 = np.swapaxes(_flat(T1), 1, 2) @ _flat(x1) + Ct @ x2
        Ka = np.swapaxes(_flat(x1), 1, 2) @ _flat(y1) + np.swapaxes(x2, 1, 2) @ y2
        Ua = np.swapaxes(_flat(U1), 1, 2) @ _flat(x1) + np.swapaxes(U2, 1, 2) @ x2   # (G, e, t)
        return _sym(2.0 * (Ka - np.swapaxes(Ua, 1, 2) @ J @ Ua))

    def _l_hessian_global(self, Kb: np.ndarray, T1: np.ndarray, Ct: np.ndarray, U1: np.ndarray,
                          U2: np.ndarray, UJ1: np.ndarray, UJ2: np.ndarray, JL: np.ndarray
                          ) -> np.ndarray:
        """``L_ij = -||(Z'PZ)_ij||_F^2`` (``Z'V^-1Z`` for ML) from the pattern and ``Gamma``."""
        gl = self.glob
        G = Kb.shape[0]
        Gb = UJ1 @ np.swapaxes(U1, -1, -2)                          # (U J U') on the pattern
        Gx = (_flat(UJ1) @ np.swapaxes(U2, 1, 2)).reshape(T1.shape)
        Gg = UJ2 @ np.swapaxes(U2, 1, 2)
        pattern = self._pair_sums(Kb * (Kb - 2.0 * Gb), T1 * (T1 - 2.0 * Gx), Ct * (Ct - 2.0 * Gg))
        U1f = _flat(U1)
        JGam = []
        for j, rows in enumerate(gl.rows):
            Uj = U1f[:, rows]
            gam = np.swapaxes(Uj, 1, 2) @ Uj
            cols = np.flatnonzero(gl.glob1[:, j])
            if cols.size:
                U2j = U2[:, cols]
                gam = gam + np.swapaxes(U2j, 1, 2) @ U2j
            JGam.append(JL @ gam)
        JGam = np.stack(JGam, axis=1)                                # (G, t, e, e)
        tr = np.einsum("gipq,gjqp->gij", JGam, JGam)
        return _sym(-(pattern + tr)).reshape(G, tr.shape[1], tr.shape[1])

    # ------------------------------------------------------- arrowhead blocks
    def _profile_global(self, G: int, p: int, gram_yy: np.ndarray, gram_ye: np.ndarray,
                        gram_ee: np.ndarray, lam2: np.ndarray, idx: np.ndarray
                        ) -> tuple[np.ndarray, ...]:
        """The global columns profiled (module docstring): ``S``, ``log|Phi|`` or
        ``log|Sc|``, ``h``, ``H``, ``J``, ``J_L`` and ``J h`` from ``R'NR``."""
        d = lam2.shape[1]
        yy1 = self.yy[idx] - gram_yy
        hy = np.concatenate([self.XY[idx], self.ZY[idx][:, self.st.glob_cols]], axis=1) - gram_ye
        H = _sym(self.glob.XeXe - gram_ee)
        Dv = np.concatenate([np.ones((G, p)), lam2], axis=1)
        Phi = Dv[:, :, None] * H * Dv[:, None, :]
        Phi[:, np.arange(p, p + d), np.arange(p, p + d)] += 1.0
        z, ldPhi = _cholesky_solve(Phi, Dv * hy)
        S = yy1 - np.sum(z * z, axis=1)
        J = Dv[:, :, None] * _spd_inv(Phi) * Dv[:, None, :]
        if self.reml:
            JL, ld2 = J, ldPhi
        else:
            Sc = Phi[:, p:, p:]
            ld2 = _logdet_pd(Sc)
            JL = _global_only(Sc, lam2, p)
        return S, ld2, hy, H, J, JL, np.einsum("gij,gj->gi", J, hy)

    def _arrow_core(self, theta: np.ndarray, idx: np.ndarray) -> _ArrowCore:
        """The arrowhead blocks and the profiled global columns at ``theta`` for genes ``idx``."""
        ga, st = self.arrowg, self.st
        ar = ga.ar
        G = theta.shape[0]
        c = ga.Rc.shape[1]
        p = self.XX.shape[0]
        bl = arrow_blocks(ar, theta)
        valid = st.slot_cols >= 0
        zy = self.ZY[idx][:, np.where(valid, st.slot_cols, 0)] * valid
        zy0, zyc = zy[..., 0], zy[..., 1:]
        ae = ar.a * bl.e
        xt_y = zy0 - np.sum(ae * zyc, axis=2)                             # v'Z1'y
        xt = (ga.R0 - _bmat(ae, ga.Rc) if c                               # v'[Z1'X | Z1'Z2]
              else np.broadcast_to(ga.R0, (G,) + ga.R0.shape))
        hxt = bl.h[..., None] * xt
        ezy = bl.e * zyc
        gram_ee = ga.weighted(bl.e) + np.swapaxes(hxt, 1, 2) @ xt
        gram_ye = ezy.reshape(G, -1) @ ga.Rcf + np.einsum("gm,gme->ge", xt_y, hxt)
        gram_yy = np.sum(ezy * zyc, axis=(1, 2)) + np.sum(bl.h * xt_y * xt_y, axis=1)
        lam2 = theta[:, st.glob_theta]
        S, ld2, hy, H, J, JL, wy = self._profile_global(G, p, gram_yy, gram_ye, gram_ee, lam2, idx)
        return _ArrowCore(bl, zy0, zyc, ae, xt, lam2, S, ld2, hy, H, J, JL, wy)

    def _arrow_residual(self, k: _ArrowCore) -> tuple[np.ndarray, np.ndarray]:
        """``r = Z1'(y - Xe J h)`` of the children (G, m, c) and ``v'r`` per block (G, m)."""
        ga = self.arrowg
        m, c, _ = ga.Rc.shape
        r0 = k.zy0 - np.einsum("me,ge->gm", ga.R0, k.wy)
        rc = k.zyc - (k.wy @ ga.Rcf.T).reshape(k.wy.shape[0], m, c)
        return rc, r0 - np.sum(k.ae * rc, axis=2)

    def _ml_global(self, k: _ArrowCore) -> np.ndarray:
        """:func:`_global_only` at the core's ``H`` (``J_L`` itself for ML fits)."""
        if not self.reml:
            return k.JL
        p = self.XX.shape[0]
        lam2 = k.lam2
        Sc = lam2[:, :, None] * k.H[:, p:, p:] * lam2[:, None, :]
        Sc[:, np.arange(lam2.shape[1]), np.arange(lam2.shape[1])] += 1.0
        return _global_only(Sc, lam2, p)

    def gls(self, theta: np.ndarray, random_effects: bool = True) -> ThetaGLS:
        """:meth:`ThetaCriterion.gls <flashmm._fit_theta.ThetaCriterion.gls>`, in closed form
        for arrowhead blocks with children (:meth:`_closed_form_pays`).

        Henderson's equations with the group effects absorbed: ``(b, u2) = J h`` and
        ``C = J_XX``; the group BLUPs are ``N Z1'(y - X b - Z2 u2)``.  The conditional
        variances are lme4's ``diag(Lambda M^-1 Lambda')``: ``diag N`` plus, for the rows
        ``Lambda^2 U`` of ``N Z1'Xe``, the quadratic forms in ``J_ML``.
        """
        if not self._closed_form_pays():
            return super().gls(theta, random_effects)
        return self._gls_arrow(theta, random_effects)

    def _closed_form_pays(self) -> bool:
        """Arrowhead blocks with children: the closed forms of :meth:`gls` and
        :meth:`contrast_variance_gradient` cost a third of the general factorisation's
        (atlas shape, three components); with one slot per block (crossed factors alone)
        the general factorisation is cheaper (0.11 against 0.14 ms per gene)."""
        return self.arrowg is not None and self.arrowg.Rc.shape[1] > 0

    def _gls_arrow(self, theta: np.ndarray, random_effects: bool = True) -> ThetaGLS:
        """:meth:`gls` in closed form (arrowhead blocks)."""
        ar = self.arrowg.ar
        G, p = theta.shape[0], self.XX.shape[0]
        out = ThetaGLS.empty(G, p, self.st.q if random_effects else 0)
        for idx in self.chunks():
            k = self._arrow_core(theta[idx], idx)
            out.fe_params[idx], out.cov_unscaled[idx] = k.wy[:, :p], k.J[:, :p, :p]
            if not random_effects:
                continue
            bl = k.bl
            rc, rt = self._arrow_residual(k)
            hrt = bl.h * rt
            blup = np.concatenate([hrt[..., None], bl.e * rc - hrt[..., None] * k.ae], axis=2)
            J2 = self._ml_global(k)
            q0, qc = self._row_quadratic(bl, k.xt, J2)
            l4 = ((theta[idx] ** 2) @ ar.pos.T) ** 2                      # lambda^4 per slot
            cv = np.concatenate([(bl.h + l4[:, None, 0] * q0)[..., None],
                                 bl.e + bl.h[..., None] * k.ae ** 2 + l4[:, None, 1:] * qc],
                                axis=2)
            out.blup_unscaled[idx] = self.zz.join(blup, k.wy[:, p:])
            out.condvar_unscaled[idx] = self.zz.join(cv, np.diagonal(J2[:, p:, p:], axis1=1,
                                                                    axis2=2))
        return out

    def contrast_variance_gradient(self, theta: np.ndarray, scale: np.ndarray, Wc: np.ndarray
                                   ) -> np.ndarray:
        """The general criterion's ``dv/dtheta``, in closed form for arrowhead blocks with children.

        ``dv/dg_j = s sum_{k in j} (E_k'C c)^2`` with ``E = Z'V^-1X = U W``,
        ``W = [I_p; 0] - J_ML H_{.X}`` (Woodbury over the global columns): for the
        rows ``z = W C c``, ``s z'Gamma_j z``; then ``2 theta_j`` of it.
        """
        if not self._closed_form_pays():
            return super().contrast_variance_gradient(theta, scale, Wc)
        return self._contrast_variance_gradient_arrow(theta, scale, Wc)

    def _contrast_variance_gradient_arrow(self, theta: np.ndarray, scale: np.ndarray,
                                          Wc: np.ndarray) -> np.ndarray:
        """:meth:`contrast_variance_gradient` in closed form (arrowhead blocks)."""
        p = self.XX.shape[0]
        G, r = Wc.shape[:2]
        out = np.empty((G, r, theta.shape[1]))
        for idx in self.chunks():
            k = self._arrow_core(theta[idx], idx)
            W = -self._ml_global(k) @ k.H[:, :, :p]
            W[:, np.arange(p), np.arange(p)] += 1.0
            z = W @ np.swapaxes(Wc[idx], 1, 2)                            # (g, e, r)
            u0 = k.xt / k.bl.sigma[..., None]
            Gam = self._gammas(k.bl, k.xt, u0, k.H[:, p:, :], np.ones_like(k.bl.inv_delta))
            dg = np.einsum("ger,gjef,gfr->grj", z, Gam, z)
            out[idx] = 2.0 * theta[idx][:, None, :] * scale[idx, None, None] * dg
        return out

    def _evaluate_arrow(self, theta: np.ndarray, idx: np.ndarray, order: int) -> _Eval:
        """:meth:`_evaluate` with the arrowhead blocks in closed form.

        ``N_b = diag(0, e) + h v v'`` (:mod:`flashmm._fit_arrowhead`), so
        ``R'NR = sum e_k R_k R_k' + h x~ x~'`` with ``x~ = v'R``, and the rows of
        ``U = Z1'V1^-1 Xe`` are ``x~ / sigma`` (first slot) and ``(R_k - h a_k x~) / delta_k``;
        every sum over the rows of a component is an e x e matrix (``Gamma``).
        """
        ar = self.arrowg.ar
        p = self.XX.shape[0]
        k = self._arrow_core(theta, idx)
        bl, xt, S, ld2, hy, H, J, JL, wy = k.bl, k.xt, k.S, k.ld2, k.hy, k.H, k.J, k.JL, k.wy
        with np.errstate(divide="ignore", invalid="ignore"):
            logdet = (np.sum(np.log(bl.sigma), axis=1) - np.sum(np.log(bl.inv_delta), axis=(1, 2))
                      + ld2)
        out = _Eval(S, logdet)
        if order == 0:
            return out
        pos, g1 = ar.pos, self.glob.glob1
        U2, Ct = H[:, p:, :], H[:, p:, p:]
        rc, rt = self._arrow_residual(k)                                  # Z1'(y - Xe J h)
        a0 = rt / bl.sigma                                                # a = Z'Py
        ac = (rc - (bl.h * rt)[..., None] * ar.a) * bl.inv_delta
        a2 = hy[:, p:] - np.einsum("gde,ge->gd", U2, wy)
        w = ar.a * bl.inv_delta
        Kd0 = bl.rho / bl.sigma                                           # diag of K1's blocks
        Kdc = ar.d * bl.inv_delta - bl.h[..., None] * w * w
        u0 = xt / bl.sigma[..., None]
        Gam = self._gammas(bl, xt, u0, U2, np.ones_like(bl.inv_delta))    # (G, t, e, e)
        UJU = np.einsum("gij,gtji->gt", JL, Gam)                          # sum_{k in j} (U J_L U')_kk
        out.dS = -(np.sum(a0 * a0, axis=1)[:, None] * pos[0] + np.sum(ac * ac, axis=1) @ pos[1:]
                   + (a2 * a2) @ g1)
        out.dL = (np.sum(Kd0, axis=1)[:, None] * pos[0] + np.sum(Kdc, axis=1) @ pos[1:]
                  + np.diagonal(Ct, axis1=1, axis2=2) @ g1 - UJU)
        if order == 1:
            return out
        out.d2S = self._s_hessian_arrow_global(bl, a0, ac, a2, w, xt, u0, U2, Ct, J)
        out.d2L = self._l_hessian_arrow_global(bl, w, Kd0, Kdc, xt, u0, U2, Ct, JL, Gam)
        return out

    def _child_rows(self, bl: _Blocks, xt: np.ndarray, wts: np.ndarray) -> np.ndarray:
        """``sum_{blocks, children k} wts_k u_k u_k'`` (G, e, e), ``u_k = (R_k - h a_k x~) / delta_k``."""
        ga = self.arrowg
        ar = ga.ar
        wd = wts * bl.inv_delta ** 2
        Y = _bmat(bl.h[..., None] * ar.a * wd, ga.Rc)                     # sum h a_k w_k R_k / delta_k^2
        XY = np.swapaxes(xt, 1, 2) @ Y
        h2 = bl.h ** 2 * np.sum(ar.a * ar.a * wd, axis=2)
        return ga.weighted(wd) - XY - np.swapaxes(XY, 1, 2) + np.swapaxes(xt * h2[..., None], 1, 2) @ xt

    def _row_quadratic(self, bl: _Blocks, xt: np.ndarray, JL: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """``u_k'J u_k`` for the first slot (G, m) and the children (G, m, c) of every block."""
        ga = self.arrowg
        ar = ga.ar
        G, m, e = xt.shape
        c = ga.Rc.shape[1]
        Jx = xt @ JL
        xJx = np.sum(Jx * xt, axis=2)
        if c == 0:
            return xJx / bl.sigma ** 2, np.zeros((G, m, 0))
        iu = ga.iu
        Jp = JL[:, iu[0], iu[1]] * np.where(iu[0] == iu[1], 1.0, 2.0)   # packed, off-diagonal twice
        RJR = np.asarray(ga.P2 @ Jp.T).T.reshape(G, m, c)               # R_k'J R_k
        RJx = np.einsum("mce,gme->gmc", ga.Rc, Jx)
        ha = bl.h[..., None] * ar.a
        qc = (RJR - 2.0 * ha * RJx + ha * ha * xJx[..., None]) * bl.inv_delta ** 2
        return xJx / bl.sigma ** 2, qc

    def _gammas(self, bl: _Blocks, xt: np.ndarray, u0: np.ndarray, U2: np.ndarray | None,
                wts: np.ndarray) -> np.ndarray:
        """``Gamma_j = sum_{k in j} wts_k U_k U_k'`` (G, t, e, e) for every parameter j
        (the first slot weighted by 1, the global rows ``U2`` by 1; None: group rows only)."""
        pos, g1 = self.arrowg.ar.pos, self.glob.glob1
        G, e = xt.shape[0], xt.shape[2]
        out = np.zeros((G, pos.shape[1], e, e))
        first = np.swapaxes(u0, 1, 2) @ u0
        for j in range(pos.shape[1]):
            if pos[0, j]:
                out[:, j] += first
            if pos[1:, j].any():
                out[:, j] += self._child_rows(bl, xt, wts * pos[1:, j])
            cols = np.flatnonzero(g1[:, j])
            if cols.size and U2 is not None:
                out[:, j] += np.swapaxes(U2[:, cols], 1, 2) @ U2[:, cols]
        return out

    def _group_sums(self, bl: _Blocks, xt: np.ndarray, u0: np.ndarray, x0: np.ndarray,
                    xc: np.ndarray) -> np.ndarray:
        """``sum_{blocks} sum_{k in j} x_k U_k`` (G, t, e) over the group rows, with weights
        ``x0`` (G, m) for the first slot and ``xc`` (G, m, c) for the children."""
        ga = self.arrowg
        pos = ga.ar.pos
        out = np.einsum("gm,gme->ge", x0, u0)[:, None, :] * pos[0][None, :, None]
        xd = xc * bl.inv_delta
        for j in range(pos.shape[1]):
            if pos[1:, j].any():
                wj = xd * pos[1:, j]
                hx = bl.h * np.sum(wj * ga.ar.a, axis=2)
                out[:, j] += wj.reshape(xt.shape[0], -1) @ ga.Rcf - np.einsum("gm,gme->ge", hx, xt)
        return out

    def _s_hessian_arrow_global(self, bl: _Blocks, a0: np.ndarray, ac: np.ndarray,
                                a2: np.ndarray, w: np.ndarray, xt: np.ndarray, u0: np.ndarray,
                                U2: np.ndarray, Ct: np.ndarray, J: np.ndarray) -> np.ndarray:
        """``S_ij = 2 [a_i' K1_ij a_j - (U_i'a_i)' J (U_j'a_j)]`` (G, t, t)."""
        ar, g1 = self.arrowg.ar, self.glob.glob1
        p = J.shape[1] - g1.shape[0]
        aw = np.concatenate([(a0 * bl.rho)[..., None], ac * w], axis=2)
        Ka = arrow_pairs(ar.pos, a0 * a0 * bl.rho, ac * ac * ar.d * bl.inv_delta,
                         a0[..., None] * w * ac, aw, bl.h)                 # group blocks
        x2 = a2[..., None] * g1                                           # (G, d, t)
        Ug = self._group_sums(bl, xt, u0, a0, ac)                         # U_j'a_j, group rows
        Ua = Ug + np.einsum("gde,gdt->gte", U2, x2)                       # ... and global rows
        cross = Ug[:, :, p:] @ x2                                         # group x global: T1
        Ka = Ka + cross + np.swapaxes(cross, 1, 2) + np.swapaxes(x2, 1, 2) @ Ct @ x2
        return _sym(2.0 * (Ka - Ua @ J @ np.swapaxes(Ua, 1, 2)))

    def _l_hessian_arrow_global(self, bl: _Blocks, w: np.ndarray, Kd0: np.ndarray,
                                Kdc: np.ndarray, xt: np.ndarray, u0: np.ndarray, U2: np.ndarray,
                                Ct: np.ndarray, JL: np.ndarray, Gam: np.ndarray) -> np.ndarray:
        """``L_ij = -||(Z'PZ)_ij||_F^2`` (``Z'V^-1Z`` for ML) from the closed forms and ``Gamma``."""
        ar, g1 = self.arrowg.ar, self.glob.glob1
        pos = ar.pos
        G, t = Gam.shape[:2]
        p = JL.shape[1] - g1.shape[0]
        # group blocks: sum K1^2 (the nested criterion's) ...
        w2 = w * w
        hw = bl.h[..., None] * w2
        K0l = w / bl.sigma[..., None]
        KK = arrow_pairs(pos, Kd0 * Kd0, Kdc * Kdc - hw * hw, K0l * K0l,
                         np.concatenate([np.zeros_like(Kd0)[..., None], w2], axis=2), -bl.h ** 2)
        # ... minus 2 sum K1 (U J U') with K1 = H - h wbar wbar' (H: diagonal and first row)
        q0, qc = self._row_quadratic(bl, xt, JL)                      # (U J U')_kk
        KG = np.zeros((G, t, t))
        tt = np.arange(t)
        KG[:, tt, tt] = (np.sum(bl.rho * q0, axis=1)[:, None] * pos[0]
                         + np.sum(ar.d * bl.inv_delta * qc, axis=1) @ pos[1:])   # H_kk (U J U')_kk
        Vb = self._block_sums(bl, xt, w)     # {j: sum_{children k in j} w_k U_k per block (G, m, e)}
        m, e = xt.shape[1:]
        u0J = (u0 @ JL).reshape(G, m * e)
        first = np.zeros((G, t))
        for j, v in Vb.items():
            first[:, j] = np.einsum("gk,gk->g", u0J, v.reshape(G, m * e))   # sum u_0'J V_j
        KG += pos[0][None, :, None] * first[:, None, :] + first[:, :, None] * pos[0][None, None, :]
        grp = np.flatnonzero(pos.any(axis=0))                             # group parameters
        k = grp.size
        sh = np.sqrt(bl.h)
        Ws = np.zeros((G, k, m, e))
        for i, j in enumerate(grp):                                       # sqrt(h) wbar_j'U per block
            if pos[0, j]:
                Ws[:, i] = u0 * (bl.rho * sh)[..., None]
            if j in Vb:
                Ws[:, i] += Vb[j] * sh[..., None]
        Ws = Ws.reshape(G, k, m * e)
        WsJ = (Ws.reshape(G, k * m, e) @ JL).reshape(G, k, m * e)
        KG[:, grp[:, None], grp[None, :]] -= WsJ @ np.swapaxes(Ws, 1, 2)  # sum_b h Wbar_i'J Wbar_j
        pattern = KK - 2.0 * KG
        # group x global (T1, the Z2 columns of the group rows) and the global block
        Y = JL @ np.swapaxes(U2, 1, 2)                                    # (G, e, d)
        gz = np.diagonal(Gam[:, :, p:, p:], axis1=2, axis2=3) @ g1        # sum T1^2
        gy = np.diagonal(Gam[:, :, p:, :] @ Y[:, None], axis1=2, axis2=3) @ g1
        cross = (gz - 2.0 * gy) * (pos.sum(axis=0) > 0)[None, :, None]
        pattern += cross + np.swapaxes(cross, 1, 2)
        pattern += g1.T @ (Ct * (Ct - 2.0 * (U2 @ Y))) @ g1
        JGam = JL[:, None] @ Gam
        return _sym(-(pattern + np.einsum("gipq,gjqp->gij", JGam, JGam)))

    def _block_sums(self, bl: _Blocks, xt: np.ndarray, wc: np.ndarray) -> dict[int, np.ndarray]:
        """``sum_{children k in j} wc_k u_k`` per block (G, m, e) for the parameters j with children."""
        ga = self.arrowg
        pos = ga.ar.pos
        wd = wc * bl.inv_delta
        out = {}
        for j in range(pos.shape[1]):
            if pos[1:, j].any():
                wj = wd * pos[1:, j]
                out[j] = (_bmat(wj, ga.Rc)
                          - (bl.h * np.sum(wj * ga.ar.a, axis=2))[..., None] * xt)
        return out
