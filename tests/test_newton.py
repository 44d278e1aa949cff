"""The projected Newton line search (:mod:`flashmm._newton`) on criteria with known answers.

A quadratic ``f(x) = c + sum (x - m)^2`` shows that backtracking still finds the
Armijo step when the step is too long, and respects the bound.  A criterion
that is flat to round-off (every trial a unit of round-off above the current
value, as a fit at its optimum sees it)
shows that a search whose predicted decrease is below the criterion's
resolution (``RESOLUTION |f|``) stops without evaluating; before, such rows ran
all 50 halvings.
"""

from __future__ import annotations

import numpy as np

from flashmm import _newton as nw


class _Quadratic:
    """``c + sum (x - m)^2`` per row (or just above ``c`` when ``flat``); ``calls`` counts
    the value evaluations of it and of its subsets."""

    def __init__(self, m: np.ndarray, c: float, flat: bool = False,
                 calls: list[int] | None = None) -> None:
        self.m, self.c, self.flat = m, c, flat
        self.counter = [0] if calls is None else calls

    @property
    def calls(self) -> int:
        return self.counter[0]

    def subset(self, idx: np.ndarray) -> _Quadratic:
        return _Quadratic(self.m[idx], self.c, self.flat, self.counter)

    def value(self, x: np.ndarray) -> np.ndarray:
        self.counter[0] += 1
        if self.flat:                       # one round-off unit above c at every trial
            return np.full(x.shape[0], self.c * (1.0 + 2.0 * np.finfo(float).eps))
        return self.c + np.sum((x - self.m) ** 2, axis=1)


def test_backtracking_finds_the_armijo_step() -> None:
    m = np.array([[1.0, 2.0], [0.5, -1.0]])
    crit = _Quadratic(m, 10.0)
    x = np.zeros((2, 2))
    grad = 2.0 * (x - m)
    step = -8.0 * grad                     # 16 times too long: needs halvings
    f = crit.value(x)
    new, newf, moved = nw._line_search(crit, x, step, grad, f, np.array([0.0, -np.inf]))
    assert moved.all()
    assert np.all(newf < f)
    assert np.all(newf <= f + 1e-4 * np.sum(grad * (new - x), axis=1))
    assert np.all(new[:, 0] >= 0.0)        # the bound on the first parameter holds


def test_a_flat_criterion_stops_the_search_at_once() -> None:
    c = 6.5e6                              # an atlas gene's criterion
    crit = _Quadratic(np.zeros((3, 2)), c, flat=True)
    x = np.full((3, 2), 0.3)
    grad = np.array([[1e-5, -2e-5], [3e-6, 0.0], [1e-3, 1e-3]])
    step = -grad * 1e-3                    # predicted decreases 5e-13, 9e-15 and 2e-9
    f = np.full(3, c)
    new, newf, moved = nw._line_search(crit, x, step, grad, f, np.full(2, -np.inf))
    assert not moved.any() and np.array_equal(new, x) and np.array_equal(newf, f)
    # every predicted decrease is below the resolution (5.8e-9) from the start
    assert nw.RESOLUTION * c > 2e-9
    assert crit.calls == 0


def test_a_row_above_the_resolution_is_searched() -> None:
    c = 6.5e6
    crit = _Quadratic(np.zeros((1, 2)), c, flat=True)
    x = np.full((1, 2), 0.3)
    grad = np.array([[1.0, 1.0]])
    step = -grad                           # predicts a decrease of 2: searched, never met
    new, _, moved = nw._line_search(crit, x, step, grad, np.full(1, c), np.full(2, -np.inf))
    assert not moved.any()
    # halved until alpha * 2 < RESOLUTION * c: log2(2 / 5.8e-9) ~ 28.4 -> 29 trials
    assert crit.calls == int(np.ceil(np.log2(2.0 / (nw.RESOLUTION * c))))
