"""R's ``lowess`` and ``approxfun(rule = 2)``, reproduced step for step.

limma's ``voom`` fits its mean-variance trend with R's ``lowess(x, y, f)``
(Cleveland's 1979 algorithm as in R's ``clowess``: ``iter = 3`` robustness
iterations, local linear fits at points at least ``delta = 0.01 * range(x)``
apart with linear interpolation in between, ties in ``x`` sharing one fitted
value) and interpolates it with ``approxfun(rule = 2)`` (constant beyond the
ends).  statsmodels' ``lowess`` differs in its ``delta`` and tie handling, so
the algorithm is written out here.

The loop runs over the *fitted* points only (about ``1 / 0.01`` of them per
iteration with the default ``delta``); every local fit is a vector operation.
"""

from __future__ import annotations

import numpy as np

__all__ = ["lowess", "approx_rule2"]


def _window_end(x: np.ndarray, xs: float, nleft: int, h: float) -> int:
    """One past the last point of the local fit (R's ``nrt + 1``).

    R scans from ``nleft`` and stops at the first point right of ``xs`` farther
    than ``0.999 h``; ties on the right are included.
    """
    n = x.size
    hi = min(n, int(np.searchsorted(x, xs + 1.01 * h, side="right")) + 1)
    seg = x[nleft:hi]
    stop = np.flatnonzero((np.abs(seg - xs) > 0.999 * h) & (seg > xs))
    return nleft + int(stop[0]) if stop.size else hi


def _local_fit(x: np.ndarray, y: np.ndarray, i: int, nleft: int, nright: int,
               rw: np.ndarray | None) -> float | None:
    """R's ``lowest``: tricube-weighted local linear fit at ``x[i]`` (None if all weights vanish)."""
    xs = x[i]
    rng = x[-1] - x[0]
    h = max(xs - x[nleft], x[nright] - xs)
    end = _window_end(x, xs, nleft, h)
    xw, yw = x[nleft:end], y[nleft:end]
    r = np.abs(xw - xs)
    if h > 0:
        q = r / h
        q = 1.0 - q * q * q
        w = np.where(r <= 0.001 * h, 1.0, q * q * q)
    else:
        w = np.ones_like(r)
    w = np.where(r <= 0.999 * h, w, 0.0)
    if rw is not None:
        w = w * rw[nleft:end]
    a = w.sum()
    if a <= 0.0:
        return None
    w = w / a
    if h > 0.0:
        centre = np.sum(w * xw)
        dx = xw - centre
        c = np.sum(w * (dx * dx))
        if np.sqrt(c) > 0.001 * rng:
            w = w * ((xs - centre) / c * (xw - centre) + 1.0)
    return float(np.sum(w * yw))


def _advance(x: np.ndarray, i: int, nleft: int, nright: int) -> tuple[int, int]:
    """Slide the window of ``ns`` nearest points right while that shrinks its radius at ``x[i]``."""
    n = x.size
    while nright < n - 1 and x[i] - x[nleft] > x[nright + 1] - x[i]:
        nleft += 1
        nright += 1
    return nleft, nright


def _smooth_pass(x: np.ndarray, y: np.ndarray, ns: int, delta: float,
                 rw: np.ndarray | None) -> np.ndarray:
    """One pass of R's ``clowess``: fits at points ``delta`` apart, interpolation between."""
    n = x.size
    ys = np.empty(n)
    nleft, nright, last, i = 0, ns - 1, -1, 0
    while True:
        nleft, nright = _advance(x, i, nleft, nright)
        fit = _local_fit(x, y, i, nleft, nright, rw)
        ys[i] = y[i] if fit is None else fit
        if last < i - 1:
            alpha = (x[last + 1:i] - x[last]) / (x[i] - x[last])
            ys[last + 1:i] = alpha * ys[i] + (1.0 - alpha) * ys[last]
        last = i
        # ties with x[last] share its value; the next fit is at the last point within delta
        ties_end = int(np.searchsorted(x, x[last], side="right"))
        ys[last + 1:ties_end] = ys[last]
        first_beyond = int(np.searchsorted(x, x[last] + delta, side="right"))
        last = ties_end - 1
        i = max(last + 1, first_beyond - 1)
        if last >= n - 1:
            return ys


def _robustness_weights(res: np.ndarray) -> np.ndarray | None:
    """Bisquare weights from ``6 * median |res|`` (None when that is effectively zero)."""
    n = res.size
    ar = np.abs(res)
    srt = np.sort(ar)
    m1 = n // 2
    cmad = 3.0 * (srt[m1] + srt[n - m1 - 1]) if n % 2 == 0 else 6.0 * srt[m1]
    if cmad < 1e-7 * (ar.sum() / n):
        return None
    q = ar / cmad
    q = 1.0 - q * q
    rw = np.where(ar <= 0.999 * cmad, q * q, 0.0)
    return np.where(ar <= 0.001 * cmad, 1.0, rw)


def lowess(x: np.ndarray, y: np.ndarray, f: float = 2.0 / 3.0, iter: int = 3,
           delta: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """R's ``lowess(x, y, f, iter, delta)``.

    Parameters
    ----------
    x, y : ndarray (n,)
        Finite coordinates.
    f : float
        Smoother span: each local fit uses the ``max(2, min(n, int(f n + 1e-7)))``
        nearest points.
    iter : int
        Number of robustness iterations (R: 3).
    delta : float, optional
        Points closer than ``delta`` to the last fitted point are interpolated
        (R's default ``0.01 * (max(x) - min(x))``).

    Returns
    -------
    x_sorted, fitted : ndarray (n,)
        ``x`` sorted (stably, as R's ``order``) and the smoothed values.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError("lowess needs two 1-d arrays of the same positive length.")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("lowess needs finite x and y.")
    if not np.isfinite(f) or f <= 0:
        raise ValueError("'f' must be finite and > 0.")
    if delta is None:
        delta = 0.01 * float(x.max() - x.min())
    order = np.argsort(x, kind="stable")
    xo, yo = x[order], y[order]
    n = xo.size
    if n < 2:
        return xo, yo.copy()
    ns = max(2, min(n, int(f * n + 1e-7)))
    rw = None
    for it in range(iter + 1):
        ys = _smooth_pass(xo, yo, ns, float(delta), rw)
        if it == iter:
            break
        rw = _robustness_weights(yo - ys)
        if rw is None:
            break
    return xo, ys


def approx_rule2(x: np.ndarray, y: np.ndarray, v: np.ndarray) -> np.ndarray:
    """R's ``approxfun(x, y, rule = 2, ties = list("ordered", mean))(v)``.

    ``x`` must be sorted; tied ``x`` are collapsed to the mean of their ``y``.
    Linear interpolation with R's formula ``y_i + (y_j - y_i) ((v - x_i) / (x_j - x_i))``;
    the end values beyond the range.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ux, start, counts = np.unique(x, return_index=True, return_counts=True)
    uy = np.add.reduceat(y, start) / counts if ux.size < x.size else y
    v = np.asarray(v, dtype=float)
    out = np.empty(v.shape)
    flat = v.ravel()
    res = out.ravel()
    if ux.size == 1:
        res[:] = uy[0]
        return out
    j = np.clip(np.searchsorted(ux, flat, side="right"), 1, ux.size - 1)
    i = j - 1
    with np.errstate(invalid="ignore"):
        lin = uy[i] + (uy[j] - uy[i]) * ((flat - ux[i]) / (ux[j] - ux[i]))
    lin = np.where(flat == ux[j], uy[j], np.where(flat == ux[i], uy[i], lin))
    lin = np.where(flat < ux[0], uy[0], np.where(flat > ux[-1], uy[-1], lin))
    res[:] = np.where(np.isnan(flat), np.nan, lin)
    return out
