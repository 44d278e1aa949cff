"""Helpers shared by the benchmark scripts: machine description and timing."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import numpy as np
import scipy


def machine_info() -> dict:
    """Date, platform, CPU, core count, versions and the load at start."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def save_result(path: Path, result: dict) -> None:
    """Write a benchmark's JSON result (creating ``benchmarks/results``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def sufficient_stats(design, Y: np.ndarray):  # noqa: ANN001, ANN201 - flashmm types, imported late
    """The sufficient statistics of responses ``Y`` (cells x genes) on a built design."""
    from flashmm.stats import SufficientStats, accumulate, empty_partial

    part = empty_partial(design.k_fe, design.exog_re.shape[1], Y.shape[1])
    accumulate(part, design.exog, design.exog_re, Y)
    return SufficientStats.from_partial(part, design, [f"gene{j}" for j in range(Y.shape[1])],
                                        None)
