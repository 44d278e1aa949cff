"""lme4's InstEval as one response: flashmm against lme4 in the same session.

``y ~ service + (1|s) + (1|d) + (1|dept:service)`` on 73,421 ratings (2,972
students crossed with 1,128 lecturers, 28 department-by-service levels).
flashmm's time includes building the design from the data frame (sparse
indicator columns) and the statistics; lme4's is ``system.time(lmer(...))``
with its default control, run by ``Rscript`` in the same session when R and
lme4 are installed.  Medians of the repeats; written to
``benchmarks/results/insteval.json``.

Usage::

    python benchmarks/bench_insteval.py              # 3 repeats (~6 min with R)
    python benchmarks/bench_insteval.py --repeats 1
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, save_result  # noqa: E402

from flashmm import MultiGeneMixedLM  # noqa: E402

DATA = ROOT / "tests" / "reference" / "multicomp" / "insteval.csv.gz"
VC = {"s": "0 + C(s)", "d": "0 + C(d)", "dept:service": "0 + C(dept):C(service)"}
R_TIMING = """
suppressPackageStartupMessages(library(lme4))
data("InstEval", package = "lme4")
for (reml in c(TRUE, FALSE)) for (i in seq_len({n})) {{
  gc(); t <- system.time(f <- lmer(y ~ service + (1|s) + (1|d) + (1|dept:service),
                                    data = InstEval, REML = reml))[["elapsed"]]
  cat(if (reml) "REML" else "ML", t, sprintf("%.12f", as.numeric(logLik(f))), "\\n")
}}
"""


def flashmm_fit(data: pd.DataFrame, reml: bool) -> tuple[float, float, dict]:
    """Seconds for design + statistics + fit, the log-likelihood and the variances."""
    t0 = time.perf_counter()
    model = MultiGeneMixedLM.from_formula("~ service", data, endog=data[["y"]].to_numpy(float),
                                          vc_formula=VC)
    res = model.fit(reml=reml)
    seconds = time.perf_counter() - t0
    return seconds, float(res.llf.iloc[0]), {**res.vcomp.iloc[0].to_dict(),
                                              "Residual": float(res.scale.iloc[0])}


def lme4_times(repeats: int) -> dict[str, list[float]] | None:
    """lme4's elapsed seconds and log-likelihoods per method, or None without R."""
    if shutil.which("Rscript") is None:
        return None
    proc = subprocess.run(["Rscript", "-e", R_TIMING.format(n=repeats)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return None
    out: dict[str, list[float]] = {}
    for line in proc.stdout.splitlines():
        meth, sec, llf = line.split()
        out.setdefault(meth, []).append(float(sec))
        out.setdefault(f"{meth}_llf", []).append(float(llf))
    return out


def main(argv: list[str] | None = None) -> int:
    """Time both and record the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "insteval.json"))
    args = p.parse_args(argv)
    data = pd.read_csv(DATA, dtype={"s": str, "d": str, "dept": str, "service": str})
    result = {"machine": machine_info(), "repeats": args.repeats, "nobs": len(data),
              "formula": "y ~ service + (1|s) + (1|d) + (1|dept:service)", "methods": {}}
    lme4 = lme4_times(args.repeats)
    for reml, meth in ((True, "REML"), (False, "ML")):
        runs = [flashmm_fit(data, reml) for _ in range(args.repeats)]
        rec = {"flashmm_seconds": [r[0] for r in runs], "flashmm_median": float(np.median(
            [r[0] for r in runs])), "flashmm_llf": runs[0][1], "flashmm_variances": runs[0][2]}
        if lme4:
            rec.update(lme4_seconds=lme4[meth], lme4_median=float(np.median(lme4[meth])),
                       lme4_llf=lme4[f"{meth}_llf"][0])
            rec["ratio_flashmm_to_lme4"] = rec["flashmm_median"] / rec["lme4_median"]
        result["methods"][meth] = rec
        print(meth, {k: v for k, v in rec.items() if not isinstance(v, (list, dict))}, flush=True)
    save_result(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
