"""Structure analysis: where every random effect sits in the blocks of ``M``, once per model.

A model's random effects (variance components, correlated random slopes, a
known covariance) are laid out as lme4 does, with a relative covariance
factor ``Lambda(theta)`` so that ``u = Lambda v``, ``v ~ N(0, s I)``.  The
criterion (:mod:`flashmm._fit_theta`) factorises ``M = I + Lambda' Z'Z
Lambda`` block by block; this module decides the blocks from the pattern of
``Z'Z`` alone, for all genes at once:

* **group blocks**: one small dense block per level of a *blocking factor*
  (the ``groups`` of the model, or the largest crossed factor), holding that
  level's correlated random effects and every column nested in it
  (``donor:celltype`` within ``donor``);
* a **global block**: the columns that are not nested in a single level (a
  crossed factor such as batches); it enters the factorisation through a
  Schur complement, dense in its size only.

Without ``groups`` the blocking factor is chosen among the components whose
columns have disjoint support (indicator factors) as the one that leaves the
fewest columns to the global block (then the most levels), as MixedModels.jl
orders its terms.  Every assignment is checked against ``Z'Z``: a column with
a cross product outside its block goes to the global block, so the layout is
exact whatever the labels say.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._components import RandomComponent

__all__ = ["ThetaStructure", "Lambda", "analyse_structure", "theta_structure"]


class Lambda:
    """``Lambda`` of G genes: group blocks and the global diagonal (G, d).

    The group blocks are dense (G, m or 1, s, s) with random slopes, or
    diagonal (G, m, s) with variance components only: then every product with
    ``Lambda`` is elementwise (no small matrix products).
    """

    def __init__(self, blocks: np.ndarray | None, dvec: np.ndarray,
                 diag: np.ndarray | None = None) -> None:
        self._blocks = blocks
        self.dvec = dvec
        self.diag = diag

    @property
    def blocks(self) -> np.ndarray:
        """Dense group blocks (G, m or 1, s, s)."""
        if self._blocks is None:
            G, m, s = self.diag.shape
            out = np.zeros((G, m, s, s))
            out[:, :, np.arange(s), np.arange(s)] = self.diag
            self._blocks = out
        return self._blocks

    def t(self, v1: np.ndarray, v2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``Lambda' v``."""
        if self.diag is not None:
            return self.diag[..., None] * v1, self.dvec[:, :, None] * v2
        return _bmm(np.swapaxes(self.blocks, -1, -2), v1), self.dvec[:, :, None] * v2

    def apply(self, v1: np.ndarray, v2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``Lambda v``."""
        if self.diag is not None:
            return self.diag[..., None] * v1, self.dvec[:, :, None] * v2
        return _bmm(self.blocks, v1), self.dvec[:, :, None] * v2

    def sandwich(self, A: np.ndarray) -> np.ndarray:
        """``Lambda_g' A_g Lambda_g`` for the group blocks of a shared (m, s, s) ``A``."""
        if self.diag is not None:
            return self.diag[..., :, None] * A * self.diag[..., None, :]
        return _bmm(_bmm(np.swapaxes(self.blocks, -1, -2), A), self.blocks)

    def right(self, A: np.ndarray) -> np.ndarray:
        """``A_g Lambda_g`` for group-block matrices ``A`` (..., m, s, s)."""
        if self.diag is not None:
            return A * self.diag[..., None, :]
        return _bmm(A, self.blocks)

    def left(self, B: np.ndarray) -> np.ndarray:
        """``Lambda_g B_g`` for group-block matrices ``B`` (..., m, s, k)."""
        if self.diag is not None:
            return self.diag[..., None] * B
        return _bmm(self.blocks, B)

    def left_t(self, B: np.ndarray) -> np.ndarray:
        """``Lambda_g' B_g`` for group-block matrices ``B`` (..., m, s, k)."""
        if self.diag is not None:
            return self.diag[..., None] * B
        return _bmm(np.swapaxes(self.blocks, -1, -2), B)


def _bmm(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A @ B`` for stacks of small matrices.

    numpy's batched matmul pays a per-matrix overhead that dominates for
    millions of 2 x 2 blocks; with an inner dimension of at most 4 the product
    is unrolled into broadcast multiply-adds over the whole stack.
    """
    k = A.shape[-1]
    if k > 4:
        return A @ B
    out = A[..., :, :1] * B[..., :1, :]
    for j in range(1, k):
        out = out + A[..., :, j:j + 1] * B[..., j:j + 1, :]
    return out



@dataclass
class ThetaStructure:
    """Where every column of ``Z`` and every ``theta_j`` sits (shared by all genes).

    Attributes
    ----------
    q : int
        Number of random effects (columns of Z).
    re_dim : int
        r, the number of correlated random effects per group.
    re_pairs : list of (int, int)
        ``(a, b)`` position in ``T`` of the first ``len(re_pairs)`` thetas.
    lower : ndarray, shape (t,)
        Lower bound of each ``theta_j`` (0 for standard deviations, -inf otherwise).
    vc_components : list of int
        For every variance component (after the random-slope block): its index
        among the model's components; its theta follows the T entries.
    slot_cols : ndarray of int, shape (m, s)
        Column of Z in every slot of every group block (-1: empty slot).  The
        first r slots of group g are its random effects.
    slot_theta : ndarray of int, shape (m, s)
        theta index of the nested variance-component slots (-1 elsewhere).
    glob_cols, glob_theta : ndarray of int, shape (d,)
        Columns of the components that are not nested, and their theta index.
    """

    q: int
    re_dim: int
    re_pairs: list[tuple[int, int]]
    lower: np.ndarray
    vc_components: list[int]
    slot_cols: np.ndarray
    slot_theta: np.ndarray
    glob_cols: np.ndarray
    glob_theta: np.ndarray

    @property
    def n_theta(self) -> int:
        """Number of covariance parameters t."""
        return self.lower.size

    @property
    def n_pairs(self) -> int:
        """Number of parameters in ``T``."""
        return len(self.re_pairs)

    @property
    def bounded(self) -> np.ndarray:
        """Mask of the parameters bounded below by 0."""
        return np.isfinite(self.lower)

    @property
    def n_groups(self) -> int:
        """m, the number of group blocks."""
        return self.slot_cols.shape[0]

    @property
    def block_size(self) -> int:
        """s, slots per group block."""
        return self.slot_cols.shape[1]

    def tfactor(self, theta: np.ndarray) -> np.ndarray:
        """The r x r factor ``T`` per gene, shape (G, r, r)."""
        r = self.re_dim
        T = np.zeros((theta.shape[0], r, r))
        for j, (a, b) in enumerate(self.re_pairs):
            T[:, a, b] = theta[:, j]
        return T

    def canonical(self, theta: np.ndarray) -> np.ndarray:
        """The same ``T T'`` with ``T_aa >= 0`` (columns of T flipped) and factors ``>= 0``."""
        out = np.array(theta, dtype=float)
        for a in range(self.re_dim):
            col = [j for j, (_, b) in enumerate(self.re_pairs) if b == a]
            diag = next(j for j in col if self.re_pairs[j][0] == a)
            sign = np.where(out[:, diag] < 0.0, -1.0, 1.0)
            out[:, col] *= sign[:, None]
        out[:, self.n_pairs:] = np.abs(out[:, self.n_pairs:])
        return out

    def start(self, value: float, G: int) -> np.ndarray:
        """Starting point ``T = value I``, variance-component factors ``value``."""
        th = np.zeros((G, self.n_theta))
        for j, (a, b) in enumerate(self.re_pairs):
            if a == b:
                th[:, j] = value
        th[:, self.n_pairs:] = value
        return th

    def lam(self, theta: np.ndarray) -> Lambda:
        """``Lambda`` of every gene in block form."""
        T = self.tfactor(theta)
        s, r = self.block_size, self.re_dim
        gi, ki = np.nonzero(self.slot_theta >= 0)
        if r == 0:                                        # variance components: diagonal
            diag = np.zeros((theta.shape[0], self.n_groups, s))
            diag[:, gi, ki] = theta[:, self.slot_theta[gi, ki]]
            return Lambda(None, theta[:, self.glob_theta], diag)
        if s == r:
            blocks = T[:, None]                           # the same T in every group
        else:
            blocks = np.zeros((theta.shape[0], self.n_groups, s, s))
            blocks[:, :, :r, :r] = T[:, None]
            blocks[:, gi, ki, ki] = theta[:, self.slot_theta[gi, ki]]
        return Lambda(blocks, theta[:, self.glob_theta])

    def collect(self, tsum: np.ndarray, slot_diag: np.ndarray, glob_diag: np.ndarray
                ) -> np.ndarray:
        """Sum block quantities over the support of every ``Lambda_j``.

        Parameters
        ----------
        tsum : ndarray (..., r, r)
            The T-part, already summed over groups.
        slot_diag : ndarray (..., m, s)
            Per-slot diagonal entries (only nested variance-component slots count).
        glob_diag : ndarray (..., d)
            Diagonal entries of the global block.

        Returns
        -------
        ndarray (..., t)
        """
        out = np.zeros(tsum.shape[:-2] + (self.n_theta,))
        pa, pb = np.array(self.re_pairs, dtype=int).reshape(-1, 2).T
        out[..., :self.n_pairs] = tsum[..., pa, pb]
        gi, ki = np.nonzero(self.slot_theta >= 0)
        if gi.size:
            np.add.at(np.moveaxis(out, -1, 0), self.slot_theta[gi, ki],
                      np.moveaxis(slot_diag[..., gi, ki], -1, 0))
        if self.glob_cols.size:
            np.add.at(np.moveaxis(out, -1, 0), self.glob_theta,
                      np.moveaxis(glob_diag, -1, 0))
        return out

    def pair_sums(self, x: tuple[np.ndarray, np.ndarray], y: tuple[np.ndarray, np.ndarray],
                  contract: bool) -> np.ndarray:
        """``sum_{(k,l) in supp Lambda_j} x_k y_l`` for block vectors with k columns.

        ``x`` and ``y`` are block-form vectors ``((G, m, s, k), (G, d, k))``.
        Returns (G, t) when ``contract`` (sum over the k columns), else (G, k, t).
        """
        r = self.re_dim
        x1, x2 = x
        y1, y2 = y
        if contract:
            G = x1.shape[0]
            if r == 0:
                return self.collect(np.zeros((G, 0, 0)), np.sum(x1 * y1, axis=-1),
                                    np.sum(x2 * y2, axis=-1))
            xr = np.swapaxes(x1[:, :, :r], 1, 2).reshape(G, r, -1)
            yr = np.swapaxes(y1[:, :, :r], 1, 2).reshape(G, r, -1)
            tsum = xr @ np.swapaxes(yr, 1, 2)
            return self.collect(tsum, np.sum(x1 * y1, axis=-1), np.sum(x2 * y2, axis=-1))
        tsum = np.einsum("gmak,gmbk->gkab", x1[:, :, :r], y1[:, :, :r])
        return self.collect(tsum, np.moveaxis(x1 * y1, -1, 1), np.moveaxis(x2 * y2, -1, 1))


def theta_structure(components: tuple[RandomComponent, ...], re_dim: int, independent: bool,
                    ZZ: np.ndarray | None = None) -> ThetaStructure:
    """The layout of a random-slope model: component 0 holds r effects per group.

    Parameters
    ----------
    components : tuple of RandomComponent
        All components; the first holds ``m * r`` effects ordered group by group
        (r consecutive columns per group).
    re_dim : int
        r, effects per group in the first component.
    independent : bool
        Diagonal ``T`` (independent random effects) instead of lower-triangular.
    ZZ : ndarray, optional
        ``Z'Z``; when given, the nesting of the other components is read from
        its pattern and checked (columns crossing groups go to the global block).
        Without it, the labels of nested components decide.
    """
    return analyse_structure(components, ZZ, re_dim=re_dim, independent=independent)


def nonzero_pattern(ZZ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero(ZZ)`` (rows and columns, in row-major order) of a dense matrix, faster.

    A boolean mask in the matrix's own memory order and the flat indices of its
    non-zeros, split into rows and columns (and sorted by row when the matrix is
    stored by columns): on a 16,000 x 16,000 ``Z'Z`` (4,000 donors x 4 slots)
    this is several times faster than ``np.nonzero``, whose two-dimensional scan
    is the slow part.
    """
    if ZZ.flags.f_contiguous and not ZZ.flags.c_contiguous:
        cols, rows = np.divmod(np.flatnonzero(np.not_equal(ZZ.T, 0.0)), ZZ.shape[0])
        order = np.argsort(rows, kind="stable")           # columns ascend within each row
        return rows[order], cols[order]
    return np.divmod(np.flatnonzero(np.not_equal(ZZ, 0.0)), ZZ.shape[1])


def analyse_structure(components: tuple[RandomComponent, ...], ZZ: np.ndarray | None,
                      re_dim: int = 0, independent: bool = False) -> ThetaStructure:
    """Block layout of ``M`` for any combination of components (see the module docstring).

    Parameters
    ----------
    components : tuple of RandomComponent
        The model's components in the column order of ``Z``.
    ZZ : ndarray (q, q) or None
        ``Z'Z``. Needed to detect nesting without labels and to check it.
    re_dim : int
        With random slopes: r, the correlated effects per group held by
        component 0 (r consecutive columns per group); 0 otherwise.
    independent : bool
        With random slopes: a diagonal ``T``.
    """
    sizes = [c.size for c in components]
    q = int(sum(sizes))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    r = int(re_dim)
    nonzero = None if ZZ is None else nonzero_pattern(ZZ)   # one scan of Z'Z, shared below
    if r:
        pairs = [(a, b) for b in range(r) for a in range(b, r) if (a == b or not independent)]
        vc = list(range(1, len(components)))
        m = sizes[0] // r
        owner = np.full(q, -1, dtype=int)
        owner[:sizes[0]] = np.arange(sizes[0]) // r
        factor = np.arange(sizes[0])
        labels = list((components[0].groups or ())[::r])
        _assign_rest(owner, components, offsets, labels, nonzero, skip=(0,))
    else:
        pairs, vc = [], list(range(len(components)))
        owner, m, factor = _owner_without_slopes(components, offsets, ZZ, nonzero)
    if nonzero is not None:
        _move_crossing_to_global(owner, nonzero, fixed=np.arange(sizes[0] if r else 0))
    lower = np.array([0.0 if a == b else -np.inf for a, b in pairs] + [0.0] * len(vc))
    theta_of = np.full(q, -1, dtype=int)
    for j, ci in enumerate(vc):
        theta_of[offsets[ci]:offsets[ci + 1]] = len(pairs) + j
    return _layout(q, r, m, pairs, lower, vc, owner, theta_of, factor)


def _owner_without_slopes(components: tuple[RandomComponent, ...], offsets: np.ndarray,
                          ZZ: np.ndarray | None, pairs: tuple[np.ndarray, np.ndarray] | None
                          ) -> tuple[np.ndarray, int, np.ndarray]:
    """Group of every column (-1: global), the number of groups and the blocking columns.

    The blocking columns (one per group, the factor's own) go first in their
    block, so that nested columns make arrowhead blocks.
    """
    none = np.zeros(0, dtype=int)
    q = int(offsets[-1])
    labelled = [c.groups is not None for c in components]
    if all(labelled):                       # nested in ``groups`` (statsmodels' spelling)
        levels = sorted({g for c in components for g in c.groups})
        owner = np.full(q, -1, dtype=int)
        _assign_rest(owner, components, offsets, levels, None, skip=())
        return owner, len(levels), none
    if ZZ is None or pairs is None:
        return np.full(q, -1, dtype=int), 0, none
    best: tuple[int, int, int] | None = None
    best_owner = np.full(q, -1, dtype=int)
    for ci, comp in enumerate(components):
        cols = np.arange(offsets[ci], offsets[ci + 1])
        sub = ZZ[offsets[ci]:offsets[ci + 1], offsets[ci]:offsets[ci + 1]]
        if comp.size < 2 or np.count_nonzero(sub) != np.count_nonzero(np.diag(sub)):
            continue                        # not an indicator factor: no group blocks
        owner = np.full(q, -1, dtype=int)
        owner[cols] = np.arange(comp.size)
        _assign_by_pattern(owner, np.setdiff1d(np.arange(q), cols), cols[:, None], pairs)
        key = (int(np.sum(owner < 0)), -comp.size, ci)
        if best is None or key < best:
            best, best_owner = key, owner
    if best is None:
        return best_owner, 0, none
    return best_owner, components[best[2]].size, np.arange(offsets[best[2]], offsets[best[2] + 1])


def _assign_rest(owner: np.ndarray, components: tuple[RandomComponent, ...], offsets: np.ndarray,
                 levels: list[str], pairs: tuple[np.ndarray, np.ndarray] | None,
                 skip: tuple[int, ...]) -> None:
    """Assign the columns of the components not in ``skip`` to the groups ``levels``.

    Labelled nested components use their labels; the others (or all, when
    ``ZZ`` is given and the labels do not name the groups) use the pattern of
    ``ZZ`` against the columns already assigned.
    """
    index = {g: i for i, g in enumerate(levels)}
    unlabelled = []
    for ci, comp in enumerate(components):
        if ci in skip:
            continue
        cols = np.arange(offsets[ci], offsets[ci + 1])
        if comp.groups is not None and all(g in index for g in comp.groups):
            owner[cols] = [index[g] for g in comp.groups]
        else:
            unlabelled.append(cols)
    if unlabelled and pairs is not None and levels:
        base = np.flatnonzero(owner >= 0)
        groups = np.full((len(levels), np.bincount(owner[base]).max()), -1, dtype=int)
        fill = np.zeros(len(levels), dtype=int)
        for c in base:
            groups[owner[c], fill[owner[c]]] = c
            fill[owner[c]] += 1
        _assign_by_pattern(owner, np.concatenate(unlabelled), groups, pairs)


def _assign_by_pattern(owner: np.ndarray, cols: np.ndarray, group_cols: np.ndarray,
                       pairs: tuple[np.ndarray, np.ndarray]) -> None:
    """Give each column of ``cols`` the one group whose columns it shares cells with.

    ``group_cols`` (m, w) lists every group's columns (-1 padding).  A column
    touching no group or several stays global (-1).  Works on the non-zero
    ``pairs`` (rows, columns) of ``Z'Z``: memory of the order of its non-zeros.
    """
    if cols.size == 0 or group_cols.size == 0:
        return
    valid = group_cols >= 0
    group_of = np.full(owner.size, -1, dtype=np.int64)
    group_of[group_cols[valid]] = np.nonzero(valid)[0]
    is_col = np.zeros(owner.size, dtype=bool)
    is_col[cols] = True
    rows, other = pairs
    sel = is_col[rows] & (group_of[other] >= 0)
    rows, grp = rows[sel], group_of[other[sel]]
    lo = np.full(owner.size, np.iinfo(np.int64).max)
    hi = np.full(owner.size, -1)
    np.minimum.at(lo, rows, grp)
    np.maximum.at(hi, rows, grp)
    single = cols[hi[cols] == lo[cols]]                    # exactly one group touched
    owner[single] = hi[single]


def _move_crossing_to_global(owner: np.ndarray, pairs: tuple[np.ndarray, np.ndarray],
                             fixed: np.ndarray) -> None:
    """Move columns with cross products outside their group block to the global block.

    ``fixed`` columns (the random slopes, which define the groups) are never moved.
    """
    keep = np.zeros(owner.size, dtype=bool)
    keep[fixed] = True
    rows, cols = pairs
    while True:
        clash = (owner[rows] >= 0) & (owner[cols] >= 0) & (owner[rows] != owner[cols])
        bad = np.unique(rows[clash])
        bad = bad[~keep[bad]]
        if bad.size == 0:
            return
        owner[bad] = -1


def _layout(q: int, r: int, m: int, pairs: list[tuple[int, int]], lower: np.ndarray,
            vc: list[int], owner: np.ndarray, theta_of: np.ndarray,
            first: np.ndarray) -> ThetaStructure:
    """Slots of every group block: the ``first`` columns (random slopes or the blocking
    factor), then the others in Z's order."""
    inside = np.flatnonzero(owner >= 0)
    counts = np.bincount(owner[inside], minlength=m) if m else np.zeros(0, dtype=int)
    s = int(counts.max()) if counts.size else 0
    slot_cols = np.full((m, s), -1, dtype=int)
    slot_theta = np.full((m, s), -1, dtype=int)
    rank = np.ones(q, dtype=int)
    rank[first] = 0
    order = inside[np.lexsort((inside, rank[inside], owner[inside]))]   # group, first, column
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1] if m else np.zeros(0, dtype=int)
    pos = np.arange(order.size) - np.repeat(starts, counts)
    slot_cols[owner[order], pos] = order
    slot_theta[owner[order], pos] = theta_of[order]
    glob = np.flatnonzero(owner < 0)
    return ThetaStructure(q, r, pairs, lower, vc, slot_cols, slot_theta, glob, theta_of[glob])


def check_identifiable(components: tuple[RandomComponent, ...], ZZ: np.ndarray, ZX: np.ndarray,
                       XX: np.ndarray, rtol: float = 1e-9) -> None:
    """Refuse variance components that the data cannot separate, naming them.

    From the sufficient statistics alone:

    * a component whose columns lie in the span of the fixed effects
      (``tr(Z_i' R Z_i) = 0`` with ``R`` the projection off ``X``): its
      variance does not enter the REML likelihood;
    * two indicator components with the same partition of the cells (each a
      relabelling of the other): only the sum of their variances is
      identified.  A component nested in another (``donor`` within
      ``donor:celltype``) is identifiable and passes.

    Raises
    ------
    DesignError
    """
    import scipy.linalg as sla

    from ._errors import DesignError

    sizes = [c.size for c in components]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    blocks = [slice(offsets[i], offsets[i + 1]) for i in range(len(components))]
    chol = sla.cho_factor(XX, lower=True)
    for comp, sl in zip(components, blocks, strict=True):
        total = float(np.trace(ZZ[sl, sl]))
        explained = float(np.sum(ZX[sl] * sla.cho_solve(chol, ZX[sl].T).T))
        if total <= 0 or total - explained <= rtol * total:
            raise DesignError(
                f"random component {comp.name!r} lies in the span of the fixed effects (every "
                "one of its columns is a combination of the columns of exog): its variance "
                "cannot be estimated. Remove it, or remove the matching fixed-effect terms.")
    # only components of equal sizes can be relabellings of each other: the others' blocks
    # (a 12,000-column block of 4,000 donors x 3 cell types) need no scan
    diagonal = [sizes.count(size) > 1
                and np.count_nonzero(ZZ[sl, sl]) == np.count_nonzero(np.diag(ZZ[sl, sl]))
                for sl, size in zip(blocks, sizes, strict=True)]
    for i in range(len(components)):
        for j in range(i + 1, len(components)):
            if not (diagonal[i] and diagonal[j]) or sizes[i] != sizes[j]:
                continue
            if (_residual_trace(ZZ, blocks[j], blocks[i]) <= rtol * np.trace(ZZ[blocks[j], blocks[j]])
                    and _residual_trace(ZZ, blocks[i], blocks[j])
                    <= rtol * np.trace(ZZ[blocks[i], blocks[i]])):
                raise DesignError(
                    f"random components {components[i].name!r} and {components[j].name!r} "
                    "group the cells identically (one is a relabelling of the other): only the "
                    "sum of their variances can be estimated. Remove one of them.")


def _residual_trace(ZZ: np.ndarray, target: slice, basis: slice) -> float:
    """``tr(Z_t' Z_t) - tr(Z_t' P_b Z_t)`` for an indicator basis ``b`` (diagonal ``Z_b'Z_b``)."""
    d = np.diag(ZZ[basis, basis])
    cross = ZZ[basis, target]
    with np.errstate(divide="ignore", invalid="ignore"):
        proj = np.sum(np.where(d[:, None] > 0, cross * cross / d[:, None], 0.0))
    return float(np.trace(ZZ[target, target]) - proj)
