"""The profiled REML / ML criterion with per-gene weighted statistics, batched and dense.

Model of lme4's ``lmer(y ~ X + (1|f1) + ..., weights = w)``: ``e_n ~ N(0, s / w_n)``.
Whitening by ``W^1/2`` gives the unweighted model of MATH.md with the per-gene
statistics ``A = Z'WZ``, ``Z'WX``, ``X'WX``, ``Z'Wy``, ``X'Wy``, ``y'Wy``
(:mod:`flashmm._weighted_stats`).  With the ratios ``g`` repeated over every
component's effects, ``D = diag(sqrt(g))`` and ``M = I + D A D`` (q x q, per gene):

    y'H^-1 y = y'Wy - c'M^-1 c,   c = D Z'Wy;    X'H^-1 y, X'H^-1 X likewise (E = D Z'WX)
    S = y'Py = y'H^-1 y - (X'H^-1 y)' b,        b = (X'H^-1 X)^-1 X'H^-1 y
    f = m log S + log|M| (+ log|X'H^-1 X| for REML),   m = n - p (REML) or n (ML)
    log L = -1/2 [m (1 + log(2 pi S / m)) + log|M| (+ log|X'H^-1X|)] + 1/2 sum log w

(lme4's convention: its deviance subtracts ``sum log w``).  Derivatives in ``g``
come from ``u = Z'Py`` and ``Q = Z'PZ`` (``K = Z'H^-1 Z`` for ML's determinant):

    df/dg_i      = -m ||u_i||^2 / S + tr(B_ii)                (B = Q for REML, K for ML)
    d2f/dg_i dg_j = m [2 u_i'Q_ij u_j / S - ||u_i||^2 ||u_j||^2 / S^2] - ||B_ij||_F^2

(blocks indexed by component), so Newton's method has the exact Hessian.  Every
gene is optimised at once by the projected Newton of :mod:`flashmm._newton` over
``g >= 0``, from two starts (``g = 1``, lme4's ``theta = 1``, and ``g = 0.1``), keeping the
better one.  The cost per gene and evaluation is O(q^3) (batched Cholesky and
solves), which is what limits this path to the pseudobulk scale; with one random
intercept ``Z'WZ`` is diagonal for every gene and the same quantities cost O(q p^2)
(:meth:`WeightedCriterion._parts_diagonal`; 0.4 ms instead of 140 ms per gene at
q = 100 donors, 1000 samples, measured with ``benchmarks/bench_weighted.py``).  With
several components whose largest has a diagonal block (any random intercept), a
Schur complement on the other components gives O(d1 q2^2 + q2^3) per gene
(:meth:`WeightedCriterion._parts_schur`; 4 ms instead of 45 ms per gene for 100
donors and 8 crossed plates).  The dense path is kept for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._newton import projected_newton
from ._weighted_stats import WeightedStats

__all__ = ["WeightedCriterion", "WeightedFitPieces", "fit_weighted_genes", "dense_bytes_per_gene",
           "is_diagonal", "schur_split"]

_STARTS = (1.0, 0.1)


def dense_bytes_per_gene(q: int, p: int, k: int, diagonal: bool = False,
                         q2: int | None = None) -> int:
    """Working memory of one gene in the batched criterion (bytes).

    ``diagonal``: one random intercept (``Z'WZ`` diagonal), no q x q matrices;
    ``q2``: the Schur path (:func:`schur_split`), matrices of q x q2 at most.
    """
    if diagonal:
        return 8 * (12 * q * p + 6 * p * p + k * p * p + 12 * q)
    if q2 is not None:
        r = q2 + p
        return 8 * (12 * q * r + 6 * r * r + 6 * p * p + k * p * p + 12 * q)
    return 8 * (14 * q * q + 8 * q * p + 4 * p * p + k * p * p + 8 * q)


@dataclass
class _Parts:
    """Everything the criterion and its derivatives need at one point (genes in rows)."""

    S: np.ndarray        # (G,)  y'Py at unit scale
    f: np.ndarray        # (G,)  the profiled criterion
    logdet: np.ndarray   # (G,)  log|M| (+ log|X'H^-1X| for REML)
    b: np.ndarray        # (G, p)
    C: np.ndarray        # (G, p, p) (X'H^-1 X)^-1
    u: np.ndarray        # (G, q)    Z'Py
    B: np.ndarray        # (G, q, q) Q (REML) or K (ML)
    Q: np.ndarray        # (G, q, q) Z'PZ
    ZHX: np.ndarray      # (G, q, p) Z'H^-1 X
    Minv_diag: np.ndarray  # (G, q)


class WeightedCriterion:
    """``f(g)`` of the module docstring for a chunk of genes (dense per-gene matrices)."""

    #: the exact Hessian costs about twice the value: projected_newton tries full steps with it
    cheap_hessian = True

    def __init__(self, ws: WeightedStats, reml: bool, idx: np.ndarray | None = None,
                 force_dense: bool = False) -> None:
        self.ws = ws if idx is None else ws.subset(idx)
        self.reml = reml
        self.m = ws.n - ws.k_fe if reml else ws.n
        k = int(ws.component_index.max()) + 1 if ws.k_re else 0
        self.E = np.eye(k)[ws.component_index]          # (q, k) effect -> component
        r = ws.zz_pattern[0]
        #: Z'WZ diagonal for every gene (one random intercept): O(q p^2) per evaluation
        self.diagonal = is_diagonal(ws) and not force_dense
        #: several components, the largest with a diagonal block: Schur complement on the rest
        self.split = None if self.diagonal or force_dense else schur_split(ws)
        if self.diagonal:
            self.A = np.zeros((self.ws.n_genes, ws.k_re))
            self.A[:, r] = self.ws.ZZ_values
        elif self.split is not None:
            self.A = _split_blocks(self.ws, *self.split)
        else:
            self.A = self.ws.dense_ZZ(np.arange(self.ws.n_genes))

    def subset(self, idx: np.ndarray) -> WeightedCriterion:
        """The criterion of the genes ``idx`` of this chunk."""
        out = WeightedCriterion.__new__(WeightedCriterion)
        A = tuple(a[idx] for a in self.A) if isinstance(self.A, tuple) else self.A[idx]
        out.ws, out.A, out.reml, out.m, out.E = (self.ws.subset(idx), A, self.reml,
                                                 self.m, self.E)
        out.diagonal, out.split = self.diagonal, self.split
        return out

    # ------------------------------------------------------------ evaluation
    def parts(self, g: np.ndarray, derivatives: bool = True) -> _Parts:
        """Evaluate at ratios ``g`` (G, k); NaN where ``X'H^-1 X`` or ``M`` is not PD."""
        if self.diagonal:
            return self._parts_diagonal(g, derivatives)
        if self.split is not None:
            return self._parts_schur(g, derivatives)
        ws, A = self.ws, self.A
        q = ws.k_re
        d = np.sqrt(np.maximum(g, 0.0) @ self.E.T)                  # (G, q)
        M = np.eye(q)[None] + d[:, :, None] * A * d[:, None, :]
        DA = d[:, :, None] * A                                      # D A
        c = d * ws.ZY
        Ex = d[:, :, None] * ws.ZX
        rhs = np.concatenate([c[:, :, None], Ex] + ([DA] if derivatives else []), axis=2)
        with np.errstate(all="ignore"):
            L = _chol(M)
            Minv = _spd_inverse(M, L)
            sol = Minv @ rhs                                        # M^-1 [c, E, DA]
        Mc, ME, MDA = sol[:, :, 0], sol[:, :, 1:1 + ws.k_fe], sol[:, :, 1 + ws.k_fe:]  # MDA: M^-1 D A
        logdet_M = 2.0 * np.sum(np.log(np.diagonal(L, axis1=1, axis2=2)), axis=1)
        XHX = ws.XX - np.einsum("gqa,gqb->gab", Ex, ME)
        XHy = ws.XY - np.einsum("gqa,gq->ga", Ex, Mc)
        yHy = ws.yy - np.einsum("gq,gq->g", c, Mc)
        C, b, S, logdet, f = self._fixed_part(XHX, XHy, yHy, logdet_M)
        if not derivatives:
            return _Parts(S, f, logdet, b, C, *(None,) * 5)
        DAt = np.swapaxes(DA, 1, 2)                                 # (DA)' = A D
        ZHy = ws.ZY - (DAt @ Mc[:, :, None])[:, :, 0]
        ZHX = ws.ZX - DAt @ ME
        K = A - DAt @ MDA
        u = ZHy - (ZHX @ b[:, :, None])[:, :, 0]
        Q = K - ZHX @ C @ np.swapaxes(ZHX, 1, 2)
        Minv_diag = np.diagonal(Minv, axis1=1, axis2=2).copy()
        return _Parts(S, f, logdet, b, C, u, Q if self.reml else K, Q, ZHX, Minv_diag)

    def _fixed_part(self, XHX: np.ndarray, XHy: np.ndarray, yHy: np.ndarray,
                    logdet_M: np.ndarray) -> tuple[np.ndarray, ...]:
        """``C``, ``b``, ``S``, the log-determinant term and ``f`` from the GLS blocks."""
        with np.errstate(all="ignore"):
            Lx = _chol(XHX)
            C = _spd_inverse(XHX, Lx)
        b = np.einsum("gab,gb->ga", C, XHy)
        S = yHy - np.einsum("ga,ga->g", XHy, b)
        logdet = logdet_M
        if self.reml:
            logdet = logdet + 2.0 * np.sum(np.log(np.diagonal(Lx, axis1=1, axis2=2)), axis=1)
        with np.errstate(all="ignore"):
            f = self.m * np.log(S) + logdet
        return C, b, S, logdet, np.where(np.isfinite(f) & (S > 0), f, np.nan)

    def _parts_diagonal(self, g: np.ndarray, derivatives: bool) -> _Parts:
        """One random intercept: ``Z'WZ = diag(a)``, so ``M = I + g diag(a)`` is diagonal.

        With ``r = 1 / (1 + g a)`` and ``t = g r``: ``X'H^-1X = X'WX - ZWX' diag(t) ZWX``,
        ``K = diag(a r)``, ``Z'H^-1X = diag(r) Z'WX`` and ``Q = K - Z'H^-1X C X'H^-1Z``,
        of which only the traces and quadratic forms below are needed: O(q p^2).
        """
        ws, a = self.ws, self.A
        gg = np.maximum(g[:, :1], 0.0)
        r = 1.0 / (1.0 + gg * a)
        t = gg * r
        logdet_M = -np.sum(np.log(r), axis=1)
        tZX = t[:, :, None] * ws.ZX
        XHX = ws.XX - np.swapaxes(ws.ZX, 1, 2) @ tZX
        XHy = ws.XY - np.einsum("gqa,gq->ga", ws.ZX, t * ws.ZY)
        yHy = ws.yy - np.sum(t * ws.ZY * ws.ZY, axis=1)
        C, b, S, logdet, f = self._fixed_part(XHX, XHy, yHy, logdet_M)
        if not derivatives:
            return _Parts(S, f, logdet, b, C, *(None,) * 5)
        kd = a * r
        ZHX = r[:, :, None] * ws.ZX
        u = r * ws.ZY - (ZHX @ b[:, :, None])[:, :, 0]
        return _Parts(S, f, logdet, b, C, u, _DiagQ(kd, ZHX, C, self.reml), None, ZHX, r)

    def _parts_schur(self, g: np.ndarray, derivatives: bool) -> _Parts:
        """Several components, effects ``I1`` of the largest one with a diagonal block of Z'WZ.

        ``M = [[diag(m1), M12], [M21, M22]]``: with ``U = diag(1/m1) M12`` and the
        Schur complement ``S = M22 - M21 U`` (small, the other components),
        ``M^-1 = N0 + U_ S^-1 U_'`` (``N0 = diag(1/m1)`` on ``I1``, ``U_ = [-U; I]``).
        Then ``K = K0 - R S^-1 R'`` with ``R = A D U_`` and ``K0 = A - A[:, I1]
        diag(g1 / m1) A[I1, :]``, whose ``I1`` block is ``diag(a1 / m1)``, and
        ``Q = K - Z'H^-1X C X'H^-1Z``: diagonal plus low rank on ``I1``
        (:class:`_LowRankBlocks`).  O(d1 q2^2 + q2^3 + d1 q2 p) per gene instead of O(q^3).
        """
        ws, (a1, A12, A22) = self.ws, self.A
        I1, I2 = self.split
        G, q = ws.n_genes, ws.k_re
        d = np.sqrt(np.maximum(g, 0.0) @ self.E.T)
        d1, d2 = d[:, I1], d[:, I2]
        m1 = 1.0 + d1 * d1 * a1
        M12 = d1[:, :, None] * A12 * d2[:, None, :]
        U = M12 / m1[:, :, None]
        S = np.eye(I2.size)[None] + d2[:, :, None] * A22 * d2[:, None, :] - np.swapaxes(M12, 1, 2) @ U
        with np.errstate(all="ignore"):
            LS = _chol(S)
            Sinv = _spd_inverse(S, LS)
        logdet_M = np.sum(np.log(m1), axis=1) + 2.0 * np.sum(
            np.log(np.diagonal(LS, axis1=1, axis2=2)), axis=1)

        def solve(r: np.ndarray) -> np.ndarray:            # M^-1 r for r (G, q, c)
            y1 = r[:, I1] / m1[:, :, None]
            x2 = Sinv @ (r[:, I2] - np.swapaxes(M12, 1, 2) @ y1)
            out = np.empty_like(r)
            out[:, I1], out[:, I2] = y1 - U @ x2, x2
            return out

        c = d * ws.ZY
        Ex = d[:, :, None] * ws.ZX
        sol = solve(np.concatenate([c[:, :, None], Ex], axis=2))
        Mc, ME = sol[:, :, 0], sol[:, :, 1:]
        XHX = ws.XX - np.swapaxes(Ex, 1, 2) @ ME
        XHy = ws.XY - np.einsum("gqa,gq->ga", Ex, Mc)
        yHy = ws.yy - np.einsum("gq,gq->g", c, Mc)
        C, b, S_, logdet, f = self._fixed_part(XHX, XHy, yHy, logdet_M)
        if not derivatives:
            return _Parts(S_, f, logdet, b, C, *(None,) * 5)

        def amul(v: np.ndarray) -> np.ndarray:              # A v for v (G, q, c)
            out = np.empty_like(v)
            out[:, I1] = a1[:, :, None] * v[:, I1] + A12 @ v[:, I2]
            out[:, I2] = np.swapaxes(A12, 1, 2) @ v[:, I1] + A22 @ v[:, I2]
            return out

        ZHy = ws.ZY - amul((d * Mc)[:, :, None])[:, :, 0]
        ZHX = ws.ZX - amul(d[:, :, None] * ME)
        u = ZHy - (ZHX @ b[:, :, None])[:, :, 0]
        Uf = np.zeros((G, q, I2.size))
        Uf[:, I1], Uf[:, I2] = -U, np.eye(I2.size)[None]
        R = amul(d[:, :, None] * Uf)                                # A D U_, (G, q, q2)
        t1 = d1 * d1 / m1
        k1 = a1 / m1
        K12 = A12 / m1[:, :, None]
        K22 = A22 - np.swapaxes(A12, 1, 2) @ (t1[:, :, None] * A12)
        Q = _LowRankBlocks.of(k1, K12, K22, np.concatenate([R, ZHX], axis=2),
                              _block_diag(Sinv, C), I1, I2)
        K = _LowRankBlocks.of(k1, K12, K22, R, Sinv, I1, I2) if not self.reml else Q
        Minv_diag = np.empty((G, q))
        Minv_diag[:, I1] = 1.0 / m1 + np.sum((U @ Sinv) * U, axis=2)
        Minv_diag[:, I2] = np.diagonal(Sinv, axis1=1, axis2=2)
        return _Parts(S_, f, logdet, b, C, u, K, Q, ZHX, Minv_diag)

    def value(self, g: np.ndarray) -> np.ndarray:
        """The criterion ``f`` at ratios ``g`` (G, k)."""
        return self.parts(g, derivatives=False).f

    def newton_terms(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``f``, its gradient (G, k) and exact Hessian (G, k, k) in ``g``."""
        pt = self.parts(g)
        E, m = self.E, self.m
        a2 = (pt.u * pt.u) @ E                                      # ||u_i||^2
        tr = _trace_blocks(pt.B, E)
        S = pt.S[:, None]
        grad = -m * a2 / S + tr
        uQu, BB = _block_forms(pt.u, pt.Q, pt.B, E)
        hess = m * (2.0 * uQu / S[:, :, None] - a2[:, :, None] * a2[:, None, :]
                    / (S * S)[:, :, None]) - BB
        return pt.f, grad, hess

    # -------------------------------------------------------------- inference
    def information(self, g: np.ndarray, pt: _Parts) -> np.ndarray:
        """Observed information of ``(g_1..g_k, s)`` at unit scale (``s = S / m`` scaled to 1).

        With ``y`` divided by ``sqrt(S / m)`` the scale is 1: ``u`` scales by
        ``1 / sqrt(s)`` and the information is that of :mod:`flashmm._satterthwaite`.
        """
        E, m = self.E, self.m
        s = pt.S / m
        k = E.shape[1]
        a2 = (pt.u * pt.u) @ E / s[:, None]
        uQu, BB = _block_forms(pt.u, pt.Q, pt.B, E)
        uQu = uQu / s[:, None, None]
        info = np.empty((g.shape[0], k + 1, k + 1))
        info[:, :k, :k] = 0.5 * (-BB + 2.0 * uQu)
        info[:, :k, k] = info[:, k, :k] = 0.5 * a2
        info[:, k, k] = 0.5 * m          # -m/2 + Q (= m) at the profiled optimum, unit scale
        return info

    def cov_derivatives(self, pt: _Parts) -> np.ndarray:
        """``d (X'H^-1X)^-1 / d g_i = C (X'H^-1 Z_i)(Z_i' H^-1 X) C``, (G, k, p, p)."""
        CX = np.einsum("gab,gqb->gqa", pt.C, pt.ZHX)                # rows: (Z'H^-1X C)_e
        return np.einsum("gqa,gqb,qi->giab", CX, CX, self.E, optimize=True)


@dataclass
class _DiagQ:
    """``Q = diag(kd) - Z'H^-1X C X'H^-1Z`` (and ``K = diag(kd)``) kept in factored form."""

    kd: np.ndarray     # (G, q)
    ZHX: np.ndarray    # (G, q, p)
    C: np.ndarray      # (G, p, p)
    reml: bool

    def trace(self) -> np.ndarray:
        """``tr(B)``: ``tr Q`` (REML) or ``tr K`` (ML), (G, 1)."""
        tr = np.sum(self.kd, axis=1)
        if self.reml:
            P = np.swapaxes(self.ZHX, 1, 2) @ self.ZHX
            tr = tr - np.einsum("gab,gba->g", self.C, P)
        return tr[:, None]

    def forms(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``u'Qu`` and ``||B||_F^2``, each (G, 1, 1)."""
        Xu = np.einsum("gqa,gq->ga", self.ZHX, u)
        uQu = np.sum(self.kd * u * u, axis=1) - np.einsum("ga,gab,gb->g", Xu, self.C, Xu)
        BB = np.sum(self.kd * self.kd, axis=1)
        if self.reml:
            CP = self.C @ (np.swapaxes(self.ZHX, 1, 2) @ self.ZHX)
            CKP = self.C @ (np.swapaxes(self.ZHX, 1, 2) @ (self.kd[:, :, None] * self.ZHX))
            BB = BB - 2.0 * np.einsum("gaa->g", CKP) + np.einsum("gab,gba->g", CP, CP)
        return uQu[:, None, None], BB[:, None, None]


def _block_diag(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Stacks of ``[[A, 0], [0, B]]``."""
    out = np.zeros((A.shape[0], A.shape[1] + B.shape[1], A.shape[2] + B.shape[2]))
    out[:, :A.shape[1], :A.shape[2]] = A
    out[:, A.shape[1]:, A.shape[2]:] = B
    return out


@dataclass
class _LowRankBlocks:
    """``T = T0 - L Mid L'`` with ``T0[I1, I1]`` diagonal: the ``I1`` block never formed.

    ``T12`` and ``T22`` (the blocks touching the small index set ``I2``) are
    explicit; ``T11 = diag(k1) - L1 Mid L1'`` stays factored.
    """

    k1: np.ndarray       # (G, d1)
    L1: np.ndarray       # (G, d1, r)
    Mid: np.ndarray      # (G, r, r)
    T12: np.ndarray      # (G, d1, q2)
    T22: np.ndarray      # (G, q2, q2)
    I1: np.ndarray
    I2: np.ndarray

    @classmethod
    def of(cls, k1: np.ndarray, K12: np.ndarray, K22: np.ndarray, L: np.ndarray,
           Mid: np.ndarray, I1: np.ndarray, I2: np.ndarray) -> _LowRankBlocks:
        L1, L2 = L[:, I1], L[:, I2]
        LM2 = L2 @ Mid
        T12 = K12 - L1 @ np.swapaxes(LM2, 1, 2)
        T22 = K22 - LM2 @ np.swapaxes(L2, 1, 2)
        return cls(k1, L1, Mid, T12, T22, I1, I2)

    def _c1(self, E: np.ndarray) -> int:
        return int(np.argmax(E[self.I1[0]]))

    def trace_blocks(self, E: np.ndarray) -> np.ndarray:
        """``tr(T_ii)`` per component (G, k)."""
        E2 = E[self.I2]
        out = np.diagonal(self.T22, axis1=1, axis2=2) @ E2
        d11 = np.sum((self.L1 @ self.Mid) * self.L1, axis=2)      # diag(L1 Mid L1')
        out[:, self._c1(E)] += np.sum(self.k1 - d11, axis=1)
        return out

    def fro_blocks(self, E: np.ndarray) -> np.ndarray:
        """``||T_ij||_F^2`` per pair of components (G, k, k)."""
        E2, c1 = E[self.I2], self._c1(E)
        out = E2.T @ (self.T22 * self.T22) @ E2
        col = np.sum(self.T12 * self.T12, axis=1) @ E2             # (G, k)
        out[:, c1, :] += col
        out[:, :, c1] += col
        d11 = np.sum((self.L1 @ self.Mid) * self.L1, axis=2)
        ML = self.Mid @ (np.swapaxes(self.L1, 1, 2) @ self.L1)
        out[:, c1, c1] += (np.sum(self.k1 * self.k1, axis=1) - 2.0 * np.sum(self.k1 * d11, axis=1)
                           + np.einsum("gab,gba->g", ML, ML))
        return out

    def form_blocks(self, u: np.ndarray, E: np.ndarray) -> np.ndarray:
        """``u_i' T_ij u_j`` per pair of components (G, k, k)."""
        E2, c1 = E[self.I2], self._c1(E)
        u1, u2 = u[:, self.I1], u[:, self.I2]
        V2 = u2[:, :, None] * E2[None]
        out = np.swapaxes(V2, 1, 2) @ (self.T22 @ V2)
        cross = (np.einsum("gd,gdq->gq", u1, self.T12) * u2) @ E2
        out[:, c1, :] += cross
        out[:, :, c1] += cross
        Lu = np.einsum("gdr,gd->gr", self.L1, u1)
        out[:, c1, c1] += (np.sum(self.k1 * u1 * u1, axis=1)
                           - np.einsum("gr,grs,gs->g", Lu, self.Mid, Lu))
        return out


def _split_blocks(ws: WeightedStats, I1: np.ndarray, I2: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``Z'WZ`` as ``(diag of the I1 block, I1 x I2 block, I2 x I2 block)`` per gene.

    Scattered from the stored pattern: the ``I1 x I1`` block (diagonal) is never
    formed as a matrix.
    """
    G, q = ws.n_genes, ws.k_re
    pos = np.full(q, -1)
    pos[I1], pos[I2] = np.arange(I1.size), np.arange(I2.size)
    in1 = np.zeros(q, dtype=bool)
    in1[I1] = True
    r, c = ws.zz_pattern
    a1 = np.zeros((G, I1.size))
    A12 = np.zeros((G, I1.size, I2.size))
    A22 = np.zeros((G, I2.size, I2.size))
    e = in1[r] & in1[c]
    a1[:, pos[r[e]]] = ws.ZZ_values[:, e]
    e = in1[r] & ~in1[c]
    A12[:, pos[r[e]], pos[c[e]]] = ws.ZZ_values[:, e]
    e = ~in1[r] & ~in1[c]
    A22[:, pos[r[e]], pos[c[e]]] = ws.ZZ_values[:, e]
    return a1, A12, A22


def schur_split(ws: WeightedStats) -> tuple[np.ndarray, np.ndarray] | None:
    """``(I1, I2)``: the effects of the largest component whose Z'Z block is diagonal, the rest.

    None when no component qualifies or the rest is not smaller than it.
    """
    r, c = ws.zz_pattern
    comp = ws.component_index
    k = int(comp.max()) + 1 if comp.size else 0
    best = None
    for j in range(k):                               # a loop over components, not genes
        inside = (comp[r] == j) & (comp[c] == j)
        if np.all(r[inside] == c[inside]):
            size = int(np.sum(comp == j))
            if best is None or size > best[1]:
                best = (j, size)
    if best is None or k < 2 or best[1] <= comp.size - best[1]:
        return None
    return np.flatnonzero(comp == best[0]), np.flatnonzero(comp != best[0])


def _block_forms(u: np.ndarray, Q: np.ndarray | _DiagQ | _LowRankBlocks,
                 B: np.ndarray | _DiagQ | _LowRankBlocks, E: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``u_i' Q_ij u_j`` and ``||B_ij||_F^2`` per pair of components (G, k, k)."""
    if isinstance(B, _DiagQ):
        return B.forms(u)
    if isinstance(B, _LowRankBlocks):
        return Q.form_blocks(u, E), B.fro_blocks(E)
    V = u[:, :, None] * E[None]                                     # (G, q, k)
    return np.swapaxes(V, 1, 2) @ (Q @ V), E.T @ (B * B) @ E


def _trace_blocks(B: np.ndarray | _DiagQ | _LowRankBlocks, E: np.ndarray) -> np.ndarray:
    """``tr(B_ii)`` per component (G, k)."""
    if isinstance(B, _DiagQ):
        return B.trace()
    if isinstance(B, _LowRankBlocks):
        return B.trace_blocks(E)
    return np.diagonal(B, axis1=1, axis2=2) @ E


def is_diagonal(ws: WeightedStats) -> bool:
    """Whether ``Z'WZ`` is diagonal for every gene (one random intercept)."""
    r, c = ws.zz_pattern
    return bool(np.all(r == c)) and r.size == ws.k_re


def _chol(M: np.ndarray) -> np.ndarray:
    """Batched Cholesky factors; NaN for the matrices that are not positive definite."""
    try:
        return np.linalg.cholesky(M)
    except np.linalg.LinAlgError:
        out = np.full_like(M, np.nan)
        pd_ = np.all(np.isfinite(M), axis=(1, 2))
        pd_[pd_] = np.linalg.eigvalsh(M[pd_])[:, 0] > 0
        if pd_.any():
            out[pd_] = np.linalg.cholesky(M[pd_])
        return out


def _spd_inverse(M: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Inverses of a stack of SPD matrices, NaN where the Cholesky factor ``L`` failed.

    One batched LAPACK inversion: for the small dense matrices here it is faster
    than triangular solves through ``numpy.linalg.solve`` with many right-hand sides.
    """
    good = np.all(np.isfinite(L), axis=(1, 2))
    out = np.full_like(M, np.nan)
    if good.any():
        inv = np.linalg.inv(M[good])
        out[good] = 0.5 * (inv + np.swapaxes(inv, 1, 2))
    return out


@dataclass
class WeightedFitPieces:
    """Per-gene output of the weighted fit (genes in rows), all that results need."""

    ratios: np.ndarray        # (G, k)
    scale: np.ndarray         # (G,)
    llf: np.ndarray           # (G,)
    converged: np.ndarray     # (G,)
    n_iter: np.ndarray        # (G,)
    fe_params: np.ndarray     # (G, p)
    cov_unscaled: np.ndarray  # (G, p, p)
    blup: np.ndarray          # (G, q)  absolute units
    condvar_unscaled: np.ndarray  # (G, q)  Var(u | y) / s
    info: np.ndarray          # (G, k+1, k+1) at unit scale
    dcov: np.ndarray          # (G, k, p, p)  d cov_unscaled / d g


def fit_weighted_genes(crit: WeightedCriterion, c: np.ndarray, tol: float, maxiter: int,
                       start: np.ndarray | None = None) -> WeightedFitPieces:
    """Optimise every gene of a chunk (criterion of ``y / c``) and collect the estimates."""
    G, k = crit.ws.n_genes, crit.E.shape[1]
    starts = [np.full((G, k), s0) for s0 in _STARTS]
    if start is not None:
        starts.append(np.broadcast_to(start, (G, k)).astype(float))
    best = None
    for x0 in starts:
        res = projected_newton(crit, x0, np.zeros(k), tol, maxiter)
        f = np.where(np.isfinite(res.criterion), crit.value(res.x), np.nan)
        if best is None:
            best, best_f = res, f
            continue
        better = np.isfinite(f) & ~(f >= best_f)
        best.x[better], best.converged[better] = res.x[better], res.converged[better]
        best.n_iter[better] = res.n_iter[better]
        best_f = np.where(better, f, best_f)
    g = best.x
    pt = crit.parts(g)
    m = crit.m
    s = pt.S / m
    llf = (-0.5 * (m * (1.0 + np.log(2.0 * np.pi * s)) + pt.logdet) + 0.5 * crit.ws.logw
           - m * np.log(c))
    gd = g @ crit.E.T
    return WeightedFitPieces(
        ratios=g, scale=s * c * c, llf=llf, converged=best.converged, n_iter=best.n_iter,
        fe_params=pt.b * c[:, None], cov_unscaled=pt.C, blup=gd * pt.u * c[:, None],
        condvar_unscaled=gd * pt.Minv_diag, info=crit.information(g, pt),
        dcov=crit.cov_derivatives(pt))
