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

The value, gradient and Hessian, the optimiser's work, are evaluated gene by
gene by the compiled kernel :func:`~flashmm._arrow_kernel.arrow_evaluate`; the
GLS (estimates, BLUPs, conditional variances) and the contrast-variance
gradient, once per fit, are array expressions here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._arrow_blocks import (
    _Arrow,
    _Blocks,
    _bmat,
    _gram,
    _position_parameters,
    arrow_blocks,
)
from ._arrow_kernel import arrow_evaluate
from ._fit_average_info import AverageInformationCriterion
from ._fit_global import GlobalVCCriterion, global_applies
from ._fit_theta import ThetaCriterion, ThetaGLS, _spd_inv, _sym, working_set_floats
from ._fit_vc import VCBlockCriterion, _Eval

__all__ = ["ArrowheadCriterion", "arrowhead_applies", "specialise"]


def arrowhead_applies(crit: ThetaCriterion) -> bool:
    """Arrowhead blocks whose slot positions each belong to one parameter."""
    st = crit.st
    return (st.block_size >= 2 and bool(crit.zz.arrowhead)
            and not np.any(_position_parameters(st.slot_theta) == -2))


def _arrow_floats(m: int, s: int, p: int) -> int:
    """float64 values one gene holds in the array expressions of the GLS and the
    contrast gradient: vectors over (blocks, slots) and (blocks, p), and the p x p
    matrices per parameter (the compiled evaluation holds less: one gene's blocks)."""
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

    def _slot_zy(self, idx: np.ndarray) -> np.ndarray:
        """``Z'y`` of genes ``idx`` in the block slots (G, m, s), 0 in empty slots."""
        st = self.st
        m, s = st.slot_cols.shape
        return self.ZY[idx][:, st.slot_cols.ravel()].reshape(len(idx), m, s) * (st.slot_cols >= 0)

    def _evaluate(self, theta: np.ndarray, idx: np.ndarray, order: int) -> _Eval:
        """``S``, ``L`` and (``order`` >= 1, 2) their derivatives in ``g`` for genes ``idx``,
        by the compiled kernel :func:`~flashmm._arrow_kernel.arrow_evaluate`.

        A gene whose ``X'V^-1X`` is not numerically positive definite at ``theta`` (a
        line-search trial far out) gets NaN in every output, so the trial is rejected.
        """
        ar = self.arrow
        G, t = theta.shape
        zy = self._slot_zy(idx)
        out = _Eval(np.empty(G), np.empty(G))
        grads = [np.empty((G, t)) if order >= 1 else np.empty((0, t)) for _ in range(2)]
        hess = [np.empty((G, t, t)) if order >= 2 else np.empty((0, t, t)) for _ in range(2)]
        arrow_evaluate(np.ascontiguousarray(theta, dtype=float), zy, np.ascontiguousarray(self.yy[idx]),
                       np.ascontiguousarray(self.XY[idx]), np.ascontiguousarray(self.XX), ar.R,
                       ar.a, ar.d, ar.a2d, ar.ZX0, ar.zi, ar.zv, ar.par, bool(self.reml), int(order),
                       out.S, out.logdet, grads[0], grads[1], hess[0], hess[1])
        if order >= 1:
            out.dS, out.dL = grads
        if order >= 2:
            out.d2S, out.d2L = hess
        return out

    def _gls_core(self, theta: np.ndarray, idx: np.ndarray) -> _GLSCore:
        """The block quantities, ``X'V^-1X``, ``X'V^-1y`` and the GLS estimate for genes ``idx``."""
        ar = self.arrow
        G = theta.shape[0]
        m, c, p = ar.ZXc.shape
        bl = self._blocks(theta)
        zy = self._slot_zy(idx)
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
