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

from ._fit_theta import (
    ThetaCriterion,
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


def _global_floats(m: int, s: int, d: int, p: int, t: int) -> int:
    """float64 values one gene holds during a Newton evaluation of the global criterion."""
    e = p + d
    return m * s * (8 * s + 6 * (e + 1) + 3 * d + 4 * t) + 6 * (e + 1) ** 2 + 2 * t * e * e + 4 * d * d


@dataclass
class GlobalVCCriterion(VCBlockCriterion):
    """:class:`~flashmm._fit_vc.VCBlockCriterion` for variance components with a global block.

    Same value and gradient as :class:`~flashmm._fit_theta.ThetaCriterion`;
    :meth:`newton_terms` and :meth:`theta_derivatives` use the exact Hessian
    (module docstring).
    """

    glob: _GlobalShared | None = field(default=None, repr=False)

    @classmethod
    def of(cls, crit: ThetaCriterion) -> GlobalVCCriterion:
        """The global-block criterion of the same genes and statistics."""
        st, p = crit.st, crit.XX.shape[0]
        m, s, d, t = st.n_groups, st.block_size, st.glob_cols.size, st.n_theta
        chunk = max(1, crit._chunk_size() * working_set_floats(st, p)
                    // _global_floats(m, s, d, p, t))
        return cls(crit.st, crit.zz, crit.XX, crit.XY, crit.ZY, crit.yy, crit.n, crit.reml,
                   chunk, _Shared.of(crit), _GlobalShared.of(crit))

    def subset(self, idx: np.ndarray) -> GlobalVCCriterion:
        """The criterion of genes ``idx``."""
        return GlobalVCCriterion(self.st, self.zz, self.XX, self.XY[idx], self.ZY[idx],
                                 self.yy[idx], self.n, self.reml, self.chunk, self.shared,
                                 self.glob)

    def _evaluate(self, theta: np.ndarray, idx: np.ndarray, order: int) -> _Eval:
        """``S``, ``L`` and (``order`` >= 1, 2) their derivatives in ``g`` for genes ``idx``."""
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
            JL = np.zeros_like(J)
            JL[:, p:, p:] = lam2[:, :, None] * _spd_inv(Sc) * lam2[:, None, :]
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
