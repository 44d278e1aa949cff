"""FLASHMM's Fisher scoring on ``theta = (s_1, ..., s_k, s)``, unconstrained.

Used for ``allow_negative_variance=True``: the estimates R FLASHMM reports are the
stationary point its iteration reaches from ``(0, ..., 0, yRy / (n - p))``, so the
iteration itself is reproduced (MATH.md, "Several components").  In terms of
``a = (I + ZRZ G)^-1 ZRy`` and ``B = W (I + G W)^-1`` (``W = ZRZ`` for REML, ``ZZ``
for the ML trace and information terms), with ``Z'Py = a / s`` and ``Z'PZ = B / s``:

    score_i = (||(Z'Py)_i||^2 - tr((Z'PZ)_ii)) / 2
    score_s = (y'PPy - tr P) / 2
    FIM_ij = ||(Z'PZ)_ij||_F^2 / 2,  FIM_is = tr((Z'PPZ)_ii) / 2,  FIM_ss = tr(PP) / 2

where ``P V P = P`` gives ``tr P = (m - sum g_u B_uu) / s``,
``Z'PPZ = (B - B G B) / s^2``, ``y'PPy = (S - sum g_u a_u^2) / s^2`` and
``tr PP = (tr P - s sum g_u (Z'PPZ)_uu) / s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ScoringProblem", "fisher_scoring"]


@dataclass
class ScoringProblem:
    """Inputs of the scoring iteration (genes in rows)."""

    ZRZ: np.ndarray      # (q, q)
    r: np.ndarray        # (G, q)
    yRy: np.ndarray      # (G,)
    trace_mat: np.ndarray  # (q, q) ZRZ for REML, ZZ for ML
    E: np.ndarray        # (q, k) one-hot membership
    m: float             # n - p (REML) or n (ML)
    start_df: float      # n - p: the starting residual variance is yRy / (n - p)

    def subset(self, rows: np.ndarray) -> ScoringProblem:
        """The problem of genes ``rows``."""
        return ScoringProblem(self.ZRZ, self.r[rows], self.yRy[rows], self.trace_mat, self.E,
                              self.m, self.start_df)


@dataclass
class ScoringResult:
    theta: np.ndarray     # (G, k + 1) variances, residual last
    score: np.ndarray     # (G, k + 1)
    fim: np.ndarray       # (G, k + 1, k + 1)
    n_iter: np.ndarray    # (G,)
    converged: np.ndarray  # (G,)


def _score_and_fim(prob: ScoringProblem, theta: np.ndarray,
                   idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score, Fisher information and ``S = y'Py s`` at ``theta`` for genes ``idx``."""
    q, k = prob.E.shape
    s = theta[:, k]
    g = theta[:, :k] / s[:, None]
    gd = g @ prob.E.T                                    # G x q
    eye = np.eye(q)
    A = eye[None] + prob.ZRZ[None] * gd[:, None, :]      # I + ZRZ G
    a = np.linalg.solve(A, prob.r[idx][:, :, None])[:, :, 0]
    S = prob.yRy[idx] - np.sum(gd * prob.r[idx] * a, axis=1)
    W = prob.trace_mat
    Aw = eye[None] + gd[:, :, None] * W[None]            # I + G W
    B = np.swapaxes(np.linalg.solve(np.swapaxes(Aw, 1, 2), np.broadcast_to(W, Aw.shape)), 1, 2)
    B = 0.5 * (B + np.swapaxes(B, 1, 2))                 # W (I + G W)^-1, symmetric
    diagB = np.diagonal(B, axis1=1, axis2=2)
    trP = (prob.m - np.sum(gd * diagB, axis=1)) / s
    BGB = B @ (gd[:, :, None] * B)
    ZPPZ_diag = (diagB - np.diagonal(BGB, axis1=1, axis2=2)) / s[:, None] ** 2
    yPPy = (S - np.sum(gd * a * a, axis=1)) / s**2
    trPP = (trP - s * np.sum(gd * ZPPZ_diag, axis=1)) / s
    score = np.empty((idx.size, k + 1))
    score[:, :k] = 0.5 * (((a * a) @ prob.E) / s[:, None] ** 2 - (diagB @ prob.E) / s[:, None])
    score[:, k] = 0.5 * (yPPy - trP)
    fim = np.empty((idx.size, k + 1, k + 1))
    fim[:, :k, :k] = 0.5 * (prob.E.T @ (B * B) @ prob.E) / (s**2)[:, None, None]
    fim[:, :k, k] = fim[:, k, :k] = 0.5 * (ZPPZ_diag @ prob.E)
    fim[:, k, k] = 0.5 * trPP
    return score, fim, S


def fisher_scoring(prob: ScoringProblem, epsilon: float = 1e-5, maxiter: int = 50) -> ScoringResult:
    """Run FLASHMM's iteration for all genes; see the module docstring.

    After the loop the residual variance is recomputed once from the final
    ratios, ``s = S(g) / m``, and score and information are evaluated there.
    """
    G = prob.yRy.shape[0]
    k = prob.E.shape[1]
    theta = np.zeros((G, k + 1))
    theta[:, k] = prob.yRy / prob.start_df
    n_iter = np.zeros(G, dtype=np.int64)
    active = np.ones(G, dtype=bool)
    for _ in range(maxiter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        score, fim, _ = _score_and_fim(prob, theta[idx], idx)
        done = np.max(np.abs(score), axis=1) <= epsilon
        move = ~done
        step = np.einsum("gij,gj->gi", np.linalg.pinv(fim[move]), score[move])
        theta[idx[move]] += step
        n_iter[idx[move]] += 1
        active[idx[done]] = False
    all_idx = np.arange(G)
    ratios = theta[:, :k] / theta[:, k:k + 1]
    _, _, S = _score_and_fim(prob, theta, all_idx)
    theta[:, k] = S / prob.m
    theta[:, :k] = ratios * theta[:, k:k + 1]
    score, fim, _ = _score_and_fim(prob, theta, all_idx)
    converged = np.max(np.abs(score), axis=1) <= epsilon
    return ScoringResult(theta, score, fim, n_iter, converged | ~active)
