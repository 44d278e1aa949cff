"""The documentation builds without a warning (``sphinx-build -W``), as CI requires.

The build runs the tutorial, the validation tables and the benchmark plots
(``docs/_scripts``); their outputs are cached in ``docs/_generated`` and redone
only when flashmm's sources, the scripts or the reference data change, so a
repeated build takes a few seconds and a fresh one well under a minute.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("sphinx", "numpydoc", "matplotlib",
                                                         "pydata_sphinx_theme")),
    reason="building the docs needs sphinx, numpydoc, pydata-sphinx-theme and matplotlib "
           "(pip install '.[docs]')",
)
def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}"
    for page in ("index", "getting_started", "tutorial", "guide/model", "validation", "performance",
                 "api/index", "study", "guide/compare"):
        assert (out / f"{page}.html").is_file(), f"{page}.html was not written"
    # the generated parts are really there
    assert (out / "_images" / "volcano_qq.png").is_file()
    assert "flashmm against lme4" in (out / "validation.html").read_text()
    api = (out / "api" / "index.html").read_text()
    import flashmm

    missing = [n for n in flashmm.__all__ if n != "__version__" and f"flashmm.{n}" not in api]
    assert not missing, f"public names missing from the API reference: {missing}"
