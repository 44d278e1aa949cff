"""Nested variance components in closed form: arrowhead group blocks.

The commonest several-component model, ``(1|donor) + (1|donor:celltype)``,
gives every donor's block of ``Z'Z`` the arrowhead pattern

    A = [[n0, a'], [a, diag(d)]]

(the donor's intercept, then the effects nested in it, which share no cells).
:class:`~flashmm._fit_vc.VCBlockCriterion` handles such blocks as dense s x s
matrices; here every block quantity has a closed form with O(s) numbers per
block, so an evaluation is a few vector operations over (genes, blocks,
slots) and matrix products for the p-dimensional parts.

With ``lambda_0`` the parent's relative factor and ``lambda_k`` the
children's, ``delta_k = 1 + lambda_k^2 d_k``, ``e_k = lambda_k^2 / delta_k``,
``rho = n0 - sum_k a_k^2 e_k = R + sum_k a_k^2 / (d_k delta_k)`` (``R = n0 -
sum_k a_k^2 / d_k`` is shared, and 0 for indicator designs), ``sigma = 1 +
lambda_0^2 rho`` and ``h = lambda_0^2 / sigma``:

    M = I + Lambda A Lambda,   log|M| = sum_k log delta_k + log sigma
    N = Lambda M^-1 Lambda = diag(0, e) + h v v',   v = (1, -a e)
    K = A - A N A = H - h w w',   H = [[rho, w'], [w, diag(d / delta)]],
                                  w = (rho, a / delta)   (w_k = a_k / delta_k)

For the block vectors ``x`` (``Z'y``, ``Z'X``, residuals), ``x - A N x`` (the
block of ``Z'V^-1``) is ``(x~ / sigma, (x_k - h a_k x~) / delta_k)`` with
``x~ = x_0 - sum_k a_k e_k x_k = v'x``.  These feed the formulas of
:mod:`flashmm._fit_vc` (the sums over the slots of two components of ``K``,
``E C E'`` and ``a a'``), which split into the diagonal of ``H``, its first row
and the rank-one ``h w w'``.  Nothing is stored per block beyond vectors of
length s (or s x p for ``E = Z'V^-1 X``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._arrow_blocks import (
    _Arrow,
    _bdot,
    _Blocks,
    _bmat,
    _gram,
    _position_parameters,
    arrow_blocks,
    arrow_pairs,
)
from ._fit_average_info import AverageInformationCriterion
from ._fit_global import GlobalVCCriterion, global_applies
from ._fit_theta import ThetaCriterion, ThetaGLS, _logdet_pd, _spd_inv, _sym, working_set_floats
from ._fit_vc import VCBlockCriterion, _Eval

__all__ = ["ArrowheadCriterion", "arrowhead_applies", "specialise"]


def arrowhead_applies(crit: ThetaCriterion) -> bool:
    """Arrowhead blocks whose slot positions each belong to one parameter."""
    st = crit.st
    return (st.block_size >= 2 and bool(crit.zz.arrowhead)
            and not np.any(_position_parameters(st.slot_theta) == -2))


def _arrow_floats(m: int, s: int, p: int) -> int:
    """float64 values one gene holds during an evaluation: vectors over (blocks, slots)
    and (blocks, p), and the p x p matrices per parameter."""
    return m * (24 * s + 8 * p + 8) + 8 * p * p


@dataclass
class _GLSCore:
    """The GLS at ``theta`` in closed form, for a chunk of genes."""

    ar: _Arrow
    bl: _Blocks
    zy0: np.ndarray       # (G, m)
    zyc: np.ndarray       # (G, m, c)
    ae: np.ndarray        # (G, m, c)  a e
    wzy: np.ndarray       # (G, m)     v'Z'y
    ut: np.ndarray        # (G, m, p)  v'Z'X
    XVX: np.ndarray
    XVy: np.ndarray
    C: np.ndarray
    b: np.ndarray

    def residual(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``r = Z'(y - X b)`` in the block layout (slot 0, children) and ``v'r``."""
        ar = self.ar
        m, c, p = ar.ZXc.shape
        r0 = self.zy0 - self.b @ ar.ZX0.T
        rc = self.zyc - (self.b @ ar.ZXc.reshape(m * c, p).T).reshape(-1, m, c)
        return r0, rc, r0 - np.sum(self.ae * rc, axis=2)


@dataclass
class ArrowheadCriterion(VCBlockCriterion):
    """:class:`~flashmm._fit_vc.VCBlockCriterion` with the block algebra in closed form."""

    arrow: _Arrow | None = field(default=None, repr=False)

    @classmethod
    def of(cls, crit: ThetaCriterion) -> ArrowheadCriterion:
        """The arrowhead criterion of the same genes and statistics."""
        base = VCBlockCriterion.of(crit)
        m, s, p = crit.st.n_groups, crit.st.block_size, crit.XX.shape[0]
        chunk = max(1, crit._chunk_size() * working_set_floats(crit.st, p) // _arrow_floats(m, s, p))
        return cls(base.st, base.zz, base.XX, base.XY, base.ZY, base.yy, base.n, base.reml,
                   chunk, base.shared, _Arrow.of(crit))

    def subset(self, idx: np.ndarray) -> ArrowheadCriterion:
        """The criterion of genes ``idx``."""
        return ArrowheadCriterion(self.st, self.zz, self.XX, self.XY[idx], self.ZY[idx],
                                  self.yy[idx], self.n, self.reml, self.chunk, self.shared,
                                  self.arrow)

    def _blocks(self, theta: np.ndarray) -> _Blocks:
        return arrow_blocks(self.arrow, theta)

    def _evaluate(self, theta: np.ndarray, idx: np.ndarray, order: int) -> _Eval:
        """``S``, ``L`` and (``order`` >= 1, 2) their derivatives in ``g`` for genes ``idx``."""
        ar = self.arrow
        G = theta.shape[0]
        m, c, p = ar.ZXc.shape
        g = self._gls_core(theta, idx)
        bl, zyc, wzy, ut, XVX, XVy, C, b = g.bl, g.zyc, g.wzy, g.ut, g.XVX, g.XVy, g.C, g.b
        S = (self.yy[idx] - np.sum(bl.e * zyc * zyc, axis=(1, 2)) - np.sum(bl.h * wzy * wzy, axis=1)
             - np.sum(XVy * b, axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            logdet = (np.sum(np.log(bl.sigma), axis=1) - np.sum(np.log(bl.inv_delta), axis=(1, 2))
                      + (_logdet_pd(XVX) if self.reml else 0.0))
        out = _Eval(S, logdet)
        if order == 0:
            return out
        r0, rc, rt = g.residual()
        a0 = rt / bl.sigma                                              # Z'V^-1 (y - X b)
        ac = (rc - (bl.h * rt)[..., None] * ar.a) * bl.inv_delta
        w = ar.a * bl.inv_delta                                         # K_0l (1 - h rho)^-1
        Kd0 = bl.rho / bl.sigma
        Kdc = ar.d * bl.inv_delta - bl.h[..., None] * w * w
        out.dS = -self._per_parameter(a0 * a0, ac * ac)
        out.dL = self._per_parameter(Kd0, Kdc)
        if self.reml or order == 2:
            Cu = ut @ C
            uCu = np.sum(ut * Cu, axis=2)
            ZCu = _bdot(Cu, ar.ZXc)
            ZCZ = (C.reshape(G, p * p) @ ar.P2c.T).reshape(G, m, c)
            ha = bl.h[..., None] * ar.a
            ecd0 = uCu / bl.sigma ** 2                                  # (E C E')_00
            ecdc = (ZCZ - 2.0 * ha * ZCu + ha * ha * uCu[..., None]) * bl.inv_delta ** 2
        if self.reml:
            out.dL -= self._per_parameter(ecd0, ecdc)
        if order == 1:
            return out
        out.d2S = self._s_hessian_arrow(bl, a0, ac, w, ut, C)
        out.d2L = self._l_hessian_arrow(bl, w, Kd0, Kdc)
        if self.reml:
            F0l = (ZCu - ha * uCu[..., None]) * bl.inv_delta / bl.sigma[..., None]
            out.d2L += self._l_hessian_reml(bl, w, Kd0, Kdc, ecd0, ecdc, F0l, ut, C)
        return out

    def _gls_core(self, theta: np.ndarray, idx: np.ndarray) -> _GLSCore:
        """The block quantities, ``X'V^-1X``, ``X'V^-1y`` and the GLS estimate for genes ``idx``."""
        ar = self.arrow
        G = theta.shape[0]
        m, c, p = ar.ZXc.shape
        bl = self._blocks(theta)
        zy = self.ZY[idx][:, self.st.slot_cols.ravel()].reshape(G, m, c + 1)
        zy = zy * (self.st.slot_cols >= 0)
        zy0, zyc = zy[..., 0], zy[..., 1:]
        ae = ar.a * bl.e
        wzy = zy0 - np.sum(ae * zyc, axis=2)                            # v'Z'y per block
        ut = ar.ZX0 - _bmat(ae, ar.ZXc)                                 # v'Z'X per block
        XVX = _sym(self.XX - (bl.e.reshape(G, m * c) @ ar.P2c).reshape(G, p, p)
                   - _gram(ut, bl.h))
        XVy = (self.XY[idx] - (bl.e * zyc).reshape(G, m * c) @ ar.ZXc.reshape(m * c, p)
               - np.einsum("gm,gmp->gp", bl.h * wzy, ut))
        C = _spd_inv(XVX)
        b = np.einsum("gij,gj->gi", C, XVy)
        return _GLSCore(ar, bl, zy0, zyc, ae, wzy, ut, XVX, XVy, C, b)

    def gls(self, theta: np.ndarray, random_effects: bool = True) -> ThetaGLS:
        """:meth:`ThetaCriterion.gls <flashmm._fit_theta.ThetaCriterion.gls>` in closed form.

        ``b`` and ``C`` from the block sums, BLUPs ``N r`` and conditional variances ``diag N``.
        """
        G, p = theta.shape[0], self.XX.shape[0]
        out = ThetaGLS.empty(G, p, self.st.q if random_effects else 0)
        for idx in self.chunks():
            g = self._gls_core(theta[idx], idx)
            if not random_effects:
                out.fe_params[idx], out.cov_unscaled[idx] = g.b, g.C
                continue
            bl, ae = g.bl, g.ae
            _, rc, rt = g.residual()
            hrt = bl.h * rt
            blup = np.concatenate([hrt[..., None], bl.e * rc - hrt[..., None] * ae], axis=2)
            cv = np.concatenate([bl.h[..., None], bl.e + bl.h[..., None] * ae * ae], axis=2)
            out.fe_params[idx], out.cov_unscaled[idx] = g.b, g.C
            out.blup_unscaled[idx] = self.zz.join(blup, np.zeros((len(idx), 0)))
            out.condvar_unscaled[idx] = self.zz.join(cv, np.zeros((len(idx), 0)))
        return out

    def contrast_variance_gradient(self, theta: np.ndarray, scale: np.ndarray, Wc: np.ndarray
                                   ) -> np.ndarray:
        """The general criterion's ``dv/dtheta`` in closed form.

        ``dv/dg_j = s sum_{k in j} (E_k'C c)^2`` (``E = Z'V^-1X``), then ``2 theta_j`` of it.
        """
        ar = self.arrow
        m, c, p = ar.ZXc.shape
        G, r = Wc.shape[:2]
        out = np.empty((G, r, theta.shape[1]))
        for idx in self.chunks():
            bl = self._blocks(theta[idx])
            ut = ar.ZX0 - _bmat(ar.a * bl.e, ar.ZXc)
            W = Wc[idx]
            uW = ut @ np.swapaxes(W, 1, 2)                                # (g, m, r)
            ZW = (ar.ZXc.reshape(m * c, p) @ np.swapaxes(W, 1, 2)).reshape(len(idx), m, c, r)
            E0 = uW / bl.sigma[..., None]
            Ec = (ZW - (bl.h[..., None] * ar.a)[..., None] * uW[:, :, None, :]) * bl.inv_delta[..., None]
            dg = (np.einsum("gmr,t->grt", E0 * E0, ar.pos[0])
                  + np.einsum("gmcr,ct->grt", Ec * Ec, ar.pos[1:]))
            out[idx] = 2.0 * theta[idx][:, None, :] * scale[idx, None, None] * dg
        return out

    # ------------------------------------------------------------ the sums
    def _per_parameter(self, x0: np.ndarray, xc: np.ndarray) -> np.ndarray:
        """``sum_{blocks, k in j} x_k`` per parameter j, (G, t)."""
        pos = self.arrow.pos
        return np.sum(x0, axis=1)[:, None] * pos[0] + np.sum(xc, axis=1) @ pos[1:]

    def _pairs(self, diag0: np.ndarray, diagc: np.ndarray, first_row: np.ndarray,
               rank1: np.ndarray | None = None, h: np.ndarray | None = None) -> np.ndarray:
        """:func:`~flashmm._arrow_blocks.arrow_pairs` with this model's slot positions."""
        return arrow_pairs(self.arrow.pos, diag0, diagc, first_row, rank1, h)

    def _children(self) -> list[tuple[int, np.ndarray]]:
        """The parameters of the child slots and their (c,) position masks."""
        posc = self.arrow.pos[1:]
        return [(j, posc[:, j]) for j in range(posc.shape[1]) if posc[:, j].any()]

    def _s_hessian_arrow(self, bl: _Blocks, a0: np.ndarray, ac: np.ndarray, w: np.ndarray,
                         ut: np.ndarray, C: np.ndarray) -> np.ndarray:
        """``d2S/dg_i dg_j = 2 sum a_k (K - E C E')_kl a_l`` over ``k in i, l in j``."""
        ar = self.arrow
        G, m, c = ac.shape
        aw = np.concatenate([(a0 * bl.rho)[..., None], ac * w], axis=2)  # a_k w_k
        Ka = self._pairs(a0 * a0 * bl.rho, ac * ac * ar.d * bl.inv_delta, a0[..., None] * w * ac,
                         aw, bl.h)
        # aE_j = sum_{blocks, k in j} a_k E_k with E_0 = u~/sigma, E_k = (ZX_k - h a_k u~)/delta_k
        aE = np.einsum("gm,gmp->gp", a0 / bl.sigma, ut)[:, None, :] * ar.pos[0][None, :, None]
        aid = ac * bl.inv_delta
        for j, mask in self._children():
            wj = aid * mask
            aE[:, j] += (wj.reshape(G, m * c) @ ar.ZXc.reshape(m * c, -1)
                         - np.einsum("gm,gmp->gp", bl.h * np.sum(wj * ar.a, axis=2), ut))
        return _sym(2.0 * (Ka - aE @ C @ np.swapaxes(aE, 1, 2)))

    def _l_hessian_arrow(self, bl: _Blocks, w: np.ndarray, Kd0: np.ndarray, Kdc: np.ndarray
                         ) -> np.ndarray:
        """``-sum K_kl^2`` over ``k in i, l in j``: ``d2L/dg_i dg_j`` of ML."""
        K0l = w / bl.sigma[..., None]                                   # K_0l, l >= 1
        # the children's off-diagonal -h w_k w_l squared: the rank-one part minus its diagonal
        w2 = w * w
        hw = bl.h[..., None] * w2
        KK = self._pairs(Kd0 * Kd0, Kdc * Kdc - hw * hw, K0l * K0l,
                         np.concatenate([np.zeros_like(Kd0)[..., None], w2], axis=2), -bl.h ** 2)
        return _sym(-KK)

    def _l_hessian_reml(self, bl: _Blocks, w: np.ndarray, Kd0: np.ndarray, Kdc: np.ndarray,
                        ecd0: np.ndarray, ecdc: np.ndarray, F0l: np.ndarray, ut: np.ndarray,
                        C: np.ndarray) -> np.ndarray:
        """REML's ``2 sum K_kl (E C E')_kl - tr(C E_i'E_i C E_j'E_j)``, without forming E."""
        ar = self.arrow
        G, m, c = w.shape
        p = ut.shape[-1]
        w2 = w * w
        hw2 = bl.h[..., None] * w2
        KF = self._pairs(Kd0 * ecd0, (Kdc + hw2) * ecdc, (w / bl.sigma[..., None]) * F0l)
        # the children's rank-one part -h w_k w_l: sum_blocks h W_i' C W_j,
        # W_j = sum_{k in j} w_k E_k = sum (a_k / delta_k^2) ZX_k - h (sum a_k^2 / delta_k^2) u~
        aid2 = ar.a * bl.inv_delta ** 2
        kids = self._children()
        W = {j: _bmat(aid2 * mk, ar.ZXc) - (bl.h * np.sum(aid2 * ar.a * mk, axis=2))[..., None] * ut
             for j, mk in kids}
        WC = {j: W[j] @ C for j, _ in kids}
        for i, _ in kids:
            for j, _ in kids:
                KF[:, i, j] -= np.einsum("gm,gmp,gmp->g", bl.h, WC[i], W[j])
        # Omega_j = C E_j'E_j, E_j'E_j = sum_{blocks, k in j} E_k E_k'
        EE = _gram(ut, 1.0 / bl.sigma ** 2)[:, None] * ar.pos[0][None, :, None, None]
        id2 = bl.inv_delta ** 2
        for j, mk in kids:
            wj = id2 * mk
            Y = _bmat(bl.h[..., None] * ar.a * wj, ar.ZXc)
            T2 = np.swapaxes(Y, 1, 2) @ ut
            EE[:, j] += ((wj.reshape(G, m * c) @ ar.P2c).reshape(G, p, p) - T2 - np.swapaxes(T2, 1, 2)
                         + _gram(ut, bl.h ** 2 * np.sum(wj * ar.a * ar.a, axis=2)))
        Om = C[:, None] @ EE
        tr = np.einsum("gipq,gjqp->gij", Om, Om)
        return _sym(2.0 * KF - tr)


def specialise(crit: ThetaCriterion) -> ThetaCriterion:
    """The fastest criterion for ``crit``'s structure.

    Variance components only (no random slopes) without a global block (no
    crossed factor) use :class:`~flashmm._fit_vc.VCBlockCriterion`, in closed
    form (:class:`ArrowheadCriterion`) when the blocks are arrowheads; with a
    global block of moderate size (crossed factors),
    :class:`~flashmm._fit_global.GlobalVCCriterion`; with a wider one (InstEval's
    lecturers), :class:`~flashmm._fit_average_info.AverageInformationCriterion`.
    """
    st = crit.st
    if global_applies(crit):
        return GlobalVCCriterion.of(crit)
    if st.re_dim == 0 and st.glob_cols.size == 0 and st.n_theta > 0:
        return ArrowheadCriterion.of(crit) if arrowhead_applies(crit) else VCBlockCriterion.of(crit)
    if st.re_dim == 0 and st.n_theta > 0:
        return AverageInformationCriterion.of(crit)
    return crit
