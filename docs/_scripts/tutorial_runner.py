"""Run ``tutorial.py`` cell by cell and write each cell's code and output.

Cells start with a line ``# %% name``. For every cell the runner writes
``_generated/tutorial/<name>.py`` (the code, shown with ``literalinclude``) and
``<name>.txt`` (what it printed); figures are saved by the cells themselves into
the working directory, which is ``_generated/tutorial/``. Cells whose name starts
with ``_`` run but are not meant to be shown. Any exception fails the build.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CELL = re.compile(r"^# %% (\S+)\s*$")


def split_cells(text: str) -> list[tuple[str, str]]:
    """``[(name, code), ...]`` of a ``# %% name`` script (text before the first cell is dropped)."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        m = CELL.match(line)
        if m:
            cells.append((m.group(1), []))
        elif cells:
            cells[-1][1].append(line)
    return [(name, "\n".join(lines).strip("\n") + "\n") for name, lines in cells]


def main(out: Path) -> None:
    target = Path(out) / "tutorial"
    target.mkdir(parents=True, exist_ok=True)
    source = (HERE / "tutorial.py").read_text()
    namespace: dict = {"__name__": "__tutorial__"}
    cwd = os.getcwd()
    os.chdir(target)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, code in split_cells(source):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(compile(code, f"tutorial.py[{name}]", "exec"), namespace)  # noqa: S102
            plt.close("all")
            (target / f"{name}.py").write_text(code)
            (target / f"{name}.txt").write_text(buf.getvalue().rstrip() + "\n" if buf.getvalue() else "")
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE.parent.parent))
    main(HERE.parent / "_generated")
