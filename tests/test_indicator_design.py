"""Sparse indicator blocks for variance-component formulas, against patsy's dense ones.

``flashmm._design.indicator_block`` builds ``"0 + C(a)"`` and ``"0 + C(a):C(b)"``
from factor codes (hashed strings, sorted distinct levels) instead of patsy's
dense n x levels matrix, and ``_strings_as_categorical`` hands string columns
of the fixed-effects formula to patsy as categoricals.  Both must give patsy's
own columns: the same names, in the same order, with the same entries
(exactly: they are 0/1 indicators), for string, integer, boolean and
categorical factors, including level strings whose sort order differs from
their order of appearance.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import patsy
import pytest

from flashmm._design import _patsy_matrix, _strings_as_categorical, indicator_block


def _frame(seed: int = 0, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    words = np.array(["b10", "b2", "B1", "a", "b1", "ä", "_x"], dtype=object)
    return pd.DataFrame({
        "s": words[rng.integers(0, words.size, n)],
        "k": rng.integers(0, 5, n) * 3,
        "flag": rng.integers(0, 2, n).astype(bool),
        "cat": pd.Categorical(rng.choice(["z", "y", "x"], n), categories=["z", "y", "x"]),
        "x": rng.normal(size=n),
    })


@pytest.mark.parametrize("formula", ["0 + C(s)", "0 + C(k)", "0 + C(flag)", "0 + C(cat)",
                                     "0 + C(s):C(k)", "0 + C(cat):C(s)"])
def test_indicator_block_equals_patsy(formula: str) -> None:
    data = _frame()
    block = indicator_block(formula, data)
    assert block is not None
    dense = patsy.dmatrix(formula, data, return_type="dataframe")
    used = dense.loc[:, dense.any(axis=0)]          # patsy keeps combinations that never occur
    assert block.names == list(used.columns)
    np.testing.assert_array_equal(block.matrix.toarray(), used.to_numpy())


def test_strings_as_categorical_keeps_patsy_design() -> None:
    data = _frame()
    rhs = "1 + s + x + s:x"
    converted = _strings_as_categorical(data, rhs)
    assert isinstance(converted["s"].dtype, pd.CategoricalDtype)
    assert data["s"].dtype == object                # the caller's frame is untouched
    ours = _patsy_matrix(patsy, f"~ {rhs}", data, "formula")
    ref = patsy.dmatrix(rhs, data, return_type="dataframe")
    assert list(ours.columns) == list(ref.columns)
    np.testing.assert_array_equal(ours.to_numpy(), ref.to_numpy())
