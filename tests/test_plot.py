"""Volcano and QQ plots return Axes with one point per gene (and contrast)."""

from __future__ import annotations

import numpy as np
import pytest

import flashmm

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flashmm.plot import qq, volcano  # noqa: E402


@pytest.fixture(scope="module")
def res():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 25)
    x = rng.normal(size=300)
    X = np.column_stack([np.ones(300), x])
    effect = np.r_[np.ones(5), np.zeros(35)]
    Y = rng.normal(size=(300, 40)) + rng.normal(size=(12, 40))[groups] + np.outer(x, effect)
    return flashmm.MultiGeneMixedLM(Y, X, groups=groups, exog_names=["const", "x"]).fit()


def _n_points(ax):
    return sum(len(c.get_offsets()) for c in ax.collections)


def test_volcano_inputs(res):
    con = res.t_test({"x": "x"})
    ax = volcano(con)
    assert _n_points(ax) == 40
    assert len(ax.collections) == 2          # significant genes drawn separately
    ax2 = volcano(res, contrast="x", label_top=3)
    assert _n_points(ax2) == 40 and len(ax2.texts) == 3
    frame = res.t_test({"x": "x", "const": "const"}).summary_frame()
    fig, ax3 = plt.subplots()
    assert volcano(frame, contrast="x", ax=ax3) is ax3
    assert _n_points(ax3) == 40
    assert _n_points(volcano(frame)) == 80
    with pytest.raises(ValueError, match="needs contrast"):
        volcano(res)
    with pytest.raises(ValueError, match="not in the table"):
        volcano(frame, contrast="nope")
    plt.close("all")


def test_qq(res):
    p = res.pvalues
    ax = qq(p)
    assert _n_points(ax) == p.size
    p2 = np.r_[p["x"].to_numpy(), np.nan]
    assert _n_points(qq(p2)) == 40
    plt.close("all")
