"""The command line keeps the fit's array temporaries in the heap (glibc ``mallopt``).

Measured through the kernel's count of minor page faults: on a thread (the
fit's gene blocks run on threads, whose glibc arenas shrink after every free),
200 pairs of 2 MB and 3 MB arrays allocated and freed fault in their pages
every time by default (measured: 350,000 faults; at least 200 x 1,280 pages),
and almost never once freed blocks are kept (1,800).  The check runs in a
subprocess, since the settings are the process's.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc mallopt only")

_PROBE = """
import resource, sys, threading
import numpy as np
from flashmm._memory import keep_temporaries_in_heap
applied = keep_temporaries_in_heap() if sys.argv[1] == "tune" else None
def work():                       # on a thread, as the fit's gene blocks run
    for _ in range(200):
        a = np.ones(1 << 18)      # 2 MB
        b = np.ones(3 << 17)      # 3 MB
        c = a + b[: a.size].sum()  # a temporary above them, freed first
        del a, b, c
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
worker = threading.Thread(target=work)
worker.start()
worker.join()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run_env.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, env=run_env).stdout.split()
    return out[0], int(out[1])


def test_freed_temporaries_are_reused() -> None:
    _, untuned = _probe("plain")
    applied, tuned = _probe("tune")
    assert applied == "True"
    assert untuned > 200 * 1280, f"the default should fault in every page ({untuned} faults)"
    assert tuned < 0.05 * untuned, f"{tuned} faults after tuning against {untuned}"


def test_the_users_settings_are_left_alone() -> None:
    applied, faults = _probe("tune", MALLOC_MMAP_THRESHOLD_="131072")
    assert applied == "False"
    assert faults > 200 * 1280         # the user's threshold (128 KB) still applies
