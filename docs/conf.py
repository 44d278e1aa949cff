"""Sphinx configuration for flashmm.

Three scripts in ``_scripts/`` run at every build (``builder-inited``) and write
into ``_generated/`` (ignored by git, excluded from the sources):

* ``tutorial.py``: the tutorial, executed cell by cell; each cell's code, its
  printed output and its figures are included by ``tutorial.rst``;
* ``validation.py``: flashmm's fits against the stored reference numbers
  (lme4, lmerTest, statsmodels, R FLASHMM, lmmlite), tables for ``validation.rst``;
* ``performance.py``: tables and plots from ``benchmarks/results/*.json``.

``api/_members.rst`` (the autosummary list of the API reference) is generated
from ``flashmm.__all__`` and the public submodules, so new public names appear
without editing the docs.

Pages owned by other documents (cluster, comparison, kinship, random_slopes)
enter the toctree of ``index.rst`` only when their file exists: see
``OPTIONAL_PAGES`` and ``_insert_optional_pages``.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_scripts"))
os.environ.setdefault("MPLBACKEND", "Agg")
# The generating scripts do many small dense eigen-decompositions; on a loaded
# machine a multi-threaded BLAS oversubscribes the cores and makes them 10-30x
# slower. One thread each keeps the build short (must be set before numpy loads).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import flashmm  # noqa: E402

project = "flashmm"
author = "the flashmm developers"
copyright = "2026, the flashmm developers"  # noqa: A001
release = flashmm.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "_generated", "api/_members.rst", "**/.ipynb_checkpoints"]
root_doc = "index"
default_role = "literal"

# -- HTML: pydata-sphinx-theme (numpy, scipy, pandas) --------------------------------
# The article column is 60em wide (about 100 characters of code) once the primary
# sidebar is out of the way: it is shown only on pages that have sub-pages (user
# guide, API reference), so the tutorial, validation and performance pages, whose
# output blocks and tables are widest, get the whole width next to the page outline.
# Code and output keep their columns (no wrapping); a line wider than the column
# scrolls inside its own block instead of widening the page.
html_theme = "pydata_sphinx_theme"
html_theme_options = {
    "sidebar_includehidden": False,   # no empty "Section Navigation" on pages without sub-pages
    "navbar_align": "left",
    "header_links_before_dropdown": 4,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc", "sourcelink"],
    "show_prev_next": True,
}
html_static_path = ["_static"]
html_css_files = ["flashmm.css"]   # narrower left sidebar, wider page (see the file)
html_title = f"flashmm {release}"
html_extra_path: list[str] = []

# -- autodoc / autosummary / numpydoc -------------------------------------------------
autosummary_generate = ["api/_members.rst"]
autosummary_imported_members = True
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": False}
autodoc_typehints = "none"          # numpydoc renders the types from the docstrings
autodoc_member_order = "bysource"
numpydoc_show_class_members = False  # the class template lists members itself
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()
# Names documented at the top level (flashmm.X) are left out of the submodule pages.
autosummary_context = {"toplevel": [n for n in flashmm.__all__ if n != "__version__"]}

# Optional pages written by other documents: included in the toctree only if present.
OPTIONAL_PAGES = ["cluster", "comparison", "kinship", "random_slopes"]
OPTIONAL_MARKER = "flashmm-optional-pages"
_TITLES = {"cluster": "Running on a cluster", "comparison": "Comparison with other tools",
           "kinship": "Known covariances (kinship)", "random_slopes": "Random slopes"}
# |cluster_page| etc.: a link to the page if it exists, plain text otherwise (no broken links).
rst_epilog = "\n".join(
    f".. |{p}_page| replace:: :doc:`/{p}`" if (DOCS / f"{p}.rst").is_file()
    else f".. |{p}_page| replace:: *{_TITLES[p]}* (page not yet written)"
    for p in OPTIONAL_PAGES
) + "\n"

# Public submodules documented in the API reference (those that exist are listed).
PUBLIC_MODULES = [
    "flashmm.model", "flashmm.results", "flashmm.gene", "flashmm.contrasts", "flashmm.anova",
    "flashmm.ranova",
    "flashmm.lsmeans", "flashmm.stats",
    "flashmm.summary", "flashmm.datasets", "flashmm.io", "flashmm.plot", "flashmm.dask",
    "flashmm.limma", "flashmm.kinship", "flashmm.cli", "flashmm.predict", "flashmm.compare",
]


def _insert_optional_pages(app, docname, source):  # noqa: ANN001
    """Replace the marker line in a toctree with the optional pages that exist."""
    if OPTIONAL_MARKER not in source[0]:
        return
    present = [p for p in OPTIONAL_PAGES if (DOCS / f"{p}.rst").is_file()]
    lines = []
    for line in source[0].splitlines():
        if line.strip() == OPTIONAL_MARKER:
            indent = line[: len(line) - len(line.lstrip())]
            lines.extend(f"{indent}/{p}" for p in present)
        else:
            lines.append(line)
    source[0] = "\n".join(lines) + "\n"


def _write_api_members() -> None:
    """The autosummary lists of ``api/index.rst``, from ``__all__`` and the submodules."""
    names = [n for n in flashmm.__all__ if n != "__version__"]
    modules = [n for n in names if type(getattr(flashmm, n)).__name__ == "module"]
    objects = [n for n in names if n not in modules]
    classes = [n for n in objects if isinstance(getattr(flashmm, n), type)]
    exceptions = [n for n in classes if issubclass(getattr(flashmm, n), BaseException)]
    classes = [n for n in classes if n not in exceptions]
    functions = [n for n in objects if n not in classes and n not in exceptions]
    submods = []
    for mod in PUBLIC_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            continue     # not written yet, or an optional dependency is missing
        submods.append(mod)
    submods += [f"flashmm.{m}" for m in modules if f"flashmm.{m}" not in submods]

    def block(title: str, entries: list[str]) -> list[str]:
        if not entries:
            return []
        out = [title, "-" * len(title), "", ".. autosummary::", "   :toctree: generated", ""]
        out += [f"   {e}" for e in entries]
        return out + [""]

    lines = [".. This file is written by docs/conf.py at every build; do not edit.", ""]
    lines += block("Models and results", [f"flashmm.{n}" for n in classes])
    lines += block("Functions", [f"flashmm.{n}" for n in functions])
    lines += block("Exceptions and warnings", [f"flashmm.{n}" for n in exceptions])
    lines += block("Submodules", submods)
    text = "\n".join(lines)
    path = DOCS / "api" / "_members.rst"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _fingerprint(script: str, extra: list[Path]) -> str:
    """Hash of everything a generating script's output depends on."""
    import hashlib

    import numpy
    import pandas
    import scipy

    h = hashlib.sha256()
    for path in sorted((ROOT / "flashmm").rglob("*.py")) + [DOCS / "_scripts" / script]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for base in extra:
        if base.is_dir():
            for path in sorted(base.rglob("*")):
                if path.is_file():
                    st = path.stat()
                    h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    for mod in (numpy, scipy, pandas):
        h.update(mod.__version__.encode())
    try:
        import statsmodels

        h.update(statsmodels.__version__.encode())
    except ImportError:
        pass
    return h.hexdigest()


def _run_scripts(app) -> None:  # noqa: ANN001
    """Run the generating scripts (tutorial, validation, performance).

    The tutorial and the validation are cached in ``_generated/*.key``: they rerun
    only when flashmm's sources, the script, the reference data or the versions of
    numpy/scipy/pandas/statsmodels change. ``FLASHMM_DOCS_FORCE=1`` reruns them.
    """
    out = DOCS / "_generated"
    out.mkdir(exist_ok=True)
    import performance
    import tutorial_runner
    import validation

    refs = [ROOT / "tests" / "reference", ROOT.parent / "shared" / "reference",
            ROOT.parent / "shared" / "data" / "recla"]
    jobs = [
        ("tutorial", tutorial_runner.main, "tutorial.py", []),
        ("validation", validation.main, "validation.py", refs),
        ("performance", performance.main, "performance.py", [ROOT / "benchmarks" / "results"]),
    ]
    force = os.environ.get("FLASHMM_DOCS_FORCE", "") not in ("", "0")
    for name, func, script, extra in jobs:
        key_file = out / f"{name}.key"
        key = _fingerprint(script, extra)
        if name == "tutorial":
            key += _fingerprint("tutorial_runner.py", [])
        if not force and key_file.is_file() and key_file.read_text() == key:
            print(f"[flashmm docs] {name}: up to date")
            continue
        t0 = time.perf_counter()
        func(out)
        key_file.write_text(key)
        print(f"[flashmm docs] {name}: {time.perf_counter() - t0:.1f} s")


_write_api_members()


def setup(app):  # noqa: ANN001, ANN201
    app.connect("source-read", _insert_optional_pages)
    app.connect("builder-inited", _run_scripts)
    return {"parallel_read_safe": True}
