"""Validation tables for docs/validation.rst, computed at build time.

flashmm is fitted to the data stored with each reference and compared with the
stored reference numbers (nothing here is typed by hand):

* lme4 / lmerTest: ``tests/reference/lme4_sim`` (R 4.2.2, lme4 1.1-31, lmerTest 3.1-3);
* statsmodels: ``MixedLM`` fitted live, gene by gene, on the same cells;
* R FLASHMM 1.3.0: ``../shared/reference/flashmm-sim`` (skipped with a note if absent);
* lmmlite: ``tests/reference/lmmlite`` (skipped with a note if absent).

Writes ``_generated/validation.rst`` (included by validation.rst).
"""

from __future__ import annotations

import gzip
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

DOCS = Path(__file__).resolve().parent.parent
ROOT = DOCS.parent
LME4 = ROOT / "tests" / "reference" / "lme4_sim"
FLASHMM_SIM = ROOT.parent / "shared" / "reference" / "flashmm-sim"
LMMLITE = ROOT / "tests" / "reference" / "lmmlite"
FORMULA = "~ 0 + np.log(libsize) + cls + cls:trt"


def r_to_patsy(name: str) -> str:
    """R ``model.matrix`` column name of the lme4 study -> patsy's name."""
    name = name.replace("log(libsize)", "np.log(libsize)")
    name = re.sub(r"cls(c\d)", r"cls[\1]", name)
    return name.replace("trtB", "trt[T.B]")


def _e(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def _rel(a, b, floor):  # noqa: ANN001, ANN202
    return np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(np.abs(np.asarray(b)), floor)


def _table(title: str, header: list[str], rows: list[list[str]], widths: str | None = None) -> str:
    out = [f".. list-table:: {title}", "   :header-rows: 1", "   :class: flashmm-numbers", ""]
    for row in [header, *rows]:
        out.append(f"   * - {row[0]}")
        out += [f"     - {c}" for c in row[1:]]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------- lme4 / lmerTest
def _lme4_ref(model: str, method: str, what: str) -> pd.DataFrame:
    return pd.read_csv(LME4 / f"lme4_{model}_{method}_{what}.csv", index_col=0)


def _fit_lme4_sim(cells: pd.DataFrame, model: str, method: str):  # noqa: ANN202
    from flashmm import MultiGeneMixedLM

    genes = [c for c in cells.columns if re.fullmatch(r"g\d+", c)]
    vc = {"sam": "0 + C(sam)", "loc": "0 + C(loc)"} if model == "2comp" else None
    mod = MultiGeneMixedLM.from_formula(FORMULA, cells, endog=cells[genes],
                                        groups=None if vc else "sam", vc_formula=vc)
    return mod.fit(reml=method == "REML")


def lme4_section() -> str:
    if not LME4.is_dir():
        return "*tests/reference/lme4_sim is not available: lme4 and lmerTest rows skipped.*\n"
    cells = pd.read_csv(LME4 / "cells.csv")
    rows, df_rows = [], []
    spec = {"B1vsB2": "cls[c1]:trt[T.B] - cls[c2]:trt[T.B]",
            "Bavg": "(cls[c1]:trt[T.B] + cls[c2]:trt[T.B] + cls[c3]:trt[T.B]) / 3"}
    for model in ("1comp", "2comp"):
        comps = ["sam"] if model == "1comp" else ["sam", "loc"]
        for method in ("REML", "ML"):
            res = _fit_lme4_sim(cells, model, method)
            coef = _lme4_ref(model, method, "coef")
            order = [r_to_patsy(c) for c in coef.columns]
            se = _lme4_ref(model, method, "se").to_numpy()
            vc = _lme4_ref(model, method, "vc")
            llf = _lme4_ref(model, method, "loglik")["loglik"].to_numpy()
            e_b = _rel(res.fe_params[order], coef.to_numpy(), 1e-2 * se).max()
            e_se = _rel(res.bse_fe[order], se, 0).max()
            resid = vc["residual"].to_numpy()
            e_v = _rel(res.vcomp[comps], vc[comps].to_numpy(), 1e-3 * resid[:, None]).max()
            e_s = _rel(res.scale, resid, 0).max()
            d_llf = res.llf.to_numpy() - llf
            sing = vc["singular"].to_numpy() == 1
            agree = int((res.boundary.to_numpy() == sing).sum())
            e_u = 0.0
            for comp in comps:
                suffix = "" if model == "1comp" else f"_{comp}"
                ref = _lme4_ref(model, method, f"ranef{suffix}")
                ours = res.random_effects[comp].copy()
                ours.columns = [c.split("[")[-1].rstrip("]") for c in ours.columns]
                ref = ref[ours.columns].to_numpy()
                scale = np.maximum(np.abs(ref).max(axis=1, keepdims=True), 1e-3)
                e_u = max(e_u, float(np.max(np.abs(ours.to_numpy() - ref) / scale)))
            rows.append([model, method, str(len(res.gene_names)), _e(e_b), _e(e_se), _e(e_v), _e(e_s),
                         f"{_e(np.abs(d_llf).max())} ({_e(d_llf.min())})", _e(e_u),
                         f"{agree} / {len(sing)} ({int(sing.sum())} singular)"])
            # lmerTest: Satterthwaite df of every coefficient and the contrasts
            dref = _lme4_ref(model, method, "df")
            ours = res.df_satterthwaite[[r_to_patsy(c) for c in dref.columns]].to_numpy()
            e_df = _rel(ours, dref.to_numpy(), 0)
            con = _lme4_ref(model, method, "contrast")
            test = res.t_test(spec)
            e_cdf = max(_rel(test.df_denom[n], con[f"{n}_df"], 0).max() for n in spec)
            e_p = max(np.abs(test.pvalue[n].to_numpy() - con[f"{n}_p"].to_numpy()).max() for n in spec)
            e_ce = max(_rel(test.effect[n], con[f"{n}_estimate"], 1e-2 * con[f"{n}_se"]).max()
                       for n in spec)
            df_rows.append([model, method, _e(e_df.max()), _e(float(np.median(e_df))), _e(e_ce),
                            _e(e_cdf), _e(e_p)])
    header = ["model", "method", "genes", "coef", "SE", "variances", "residual", "llf: max abs. diff (min)",
              "BLUPs", "boundary = singular"]
    text = _table("flashmm against lme4 (largest discrepancy over all genes and terms)", header, rows)
    text += "\n" + _table(
        "flashmm's Satterthwaite df against lmerTest",
        ["model", "method", "df: max rel.", "df: median rel.", "contrast estimate", "contrast df",
         "contrast p (abs.)"], df_rows)
    return text


# ----------------------------------------------------------------------- statsmodels
N_STATSMODELS_GENES = 15   # statsmodels fits one gene at a time: keep the build short


def statsmodels_section() -> str:
    try:
        import statsmodels.api as sm
    except ImportError:
        return "*statsmodels is not installed: row skipped.*\n"
    if not LME4.is_dir():
        return "*tests/reference/lme4_sim is not available: statsmodels row skipped.*\n"
    cells = pd.read_csv(LME4 / "cells.csv")
    genes = [c for c in cells.columns if re.fullmatch(r"g\d+", c)][:N_STATSMODELS_GENES]
    rows = []
    for method in ("REML", "ML"):
        res = _fit_lme4_sim(cells[["sam", "trt", "cls", "libsize", *genes]], "1comp", method)
        worst = {"coef": 0.0, "se": 0.0, "var": 0.0, "llf": 0.0}
        n_clean, n_short, llf_gain = 0, 0, []
        for i, gene in enumerate(genes):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    fit = sm.MixedLM.from_formula("y " + FORMULA, cells.assign(y=cells[gene]),
                                                  groups="sam").fit(reml=method == "REML")
                except Exception:  # noqa: BLE001 - statsmodels fails on some genes
                    continue
            if not np.isfinite(fit.llf):
                continue
            llf_gain.append(res.llf.iloc[i] - fit.llf)
            if caught or not fit.converged:
                continue      # boundary or convergence warning: only the llf is compared
            n_clean += 1
            b, se = res.fe_params.iloc[i][res.exog_names].to_numpy(), res.bse_fe.iloc[i].to_numpy()
            b_sm = fit.fe_params[res.exog_names].to_numpy()
            errs = {
                "coef": float(np.max(np.abs(b - b_sm) / np.maximum(np.abs(b_sm), 1e-2 * se))),
                "se": float(np.max(np.abs(se - fit.bse_fe[res.exog_names].to_numpy())
                                   / fit.bse_fe[res.exog_names].to_numpy())),
                "var": float(abs(res.vcomp.iloc[i, 0] - fit.cov_re.iloc[0, 0])
                             / max(fit.cov_re.iloc[0, 0], 1e-3 * fit.scale)),
                "llf": float(abs(res.llf.iloc[i] - fit.llf)),
            }
            if errs["llf"] > 1e-4 and res.llf.iloc[i] > fit.llf:
                n_short += 1  # statsmodels stopped short of the optimum: not a discrepancy
                continue
            for k, v in errs.items():
                worst[k] = max(worst[k], v)
        gain = np.array(llf_gain)
        rows.append(["1comp", method, f"{n_clean - n_short} / {len(genes)}", _e(worst["coef"]),
                     _e(worst["se"]), _e(worst["var"]), _e(worst["llf"]),
                     _e(gain.min()) if gain.size else "", str(int(np.sum(gain > 1e-6)))])
    header = ["model", "method", "genes compared", "coef", "SE", "variance", "llf (abs.)",
              "min llf(flashmm) - llf(sm), all genes", "genes where flashmm's llf is higher by > 1e-6"]
    return _table("flashmm against statsmodels MixedLM (fitted live, same cells as lme4_sim)",
                  header, rows)


# ------------------------------------------------------------------------- FLASHMM
def flashmm_section() -> str:
    if not FLASHMM_SIM.is_dir():
        return ("*../shared/reference/flashmm-sim (R FLASHMM 1.3.0 outputs) is not available in "
                "this checkout: the FLASHMM row is skipped.*\n")
    import scipy.io

    from flashmm import MultiGeneMixedLM

    counts = scipy.io.mmread(gzip.open(FLASHMM_SIM / "counts.mtx.gz")).T.tocsr()
    meta = pd.read_csv(FLASHMM_SIM / "metadata.csv", index_col=0)
    X = pd.read_csv(FLASHMM_SIM / "X.csv", index_col=0)
    genes = [g.strip() for g in open(FLASHMM_SIM / "genes.txt")]

    def ref(name: str) -> pd.DataFrame:
        return pd.read_csv(FLASHMM_SIM / f"flashmm_{name}.csv", index_col=0)

    rows = []
    for k in (1, 2):
        vc = {"sam": meta["sam"].to_numpy()}
        if k == 2:
            vc["location"] = meta["location"].to_numpy()
        model = MultiGeneMixedLM(counts, X, exog_vc=vc, transform="log2p1", gene_names=genes)
        for method in ("REML", "ML"):
            res = model.fit(reml=method == "REML", allow_negative_variance=True, df_method="residual")
            name = f"{k}comp_{method}"
            coef, se, theta = ref(f"{name}_coef"), ref(f"{name}_se"), ref(f"{name}_theta")
            e_b = _rel(res.fe_params[coef.columns], coef.to_numpy(), 1e-2 * se.to_numpy()).max()
            e_se = _rel(res.bse_fe[se.columns], se.to_numpy(), 0).max()
            ours = np.column_stack([res.vcomp.to_numpy(), res.scale.to_numpy()])
            e_th = _rel(ours, theta.to_numpy(), 1e-6).max()
            extra = {"p (abs.)": "not stored", "BLUPs": "not stored", "se(theta)": "not stored"}
            if (FLASHMM_SIM / f"flashmm_{name}_p.csv").is_file():
                p = ref(f"{name}_p")
                extra["p (abs.)"] = _e(np.abs(res.pvalues[p.columns].to_numpy() - p.to_numpy()).max())
            if (FLASHMM_SIM / f"flashmm_{name}_RE.csv").is_file():
                blup = ref(f"{name}_RE")
                mine = res.random_effects["sam"][[c.removeprefix("sam") for c in blup.columns]]
                scale = np.abs(blup.to_numpy()).max(axis=1, keepdims=True)
                extra["BLUPs"] = _e(np.max(np.abs(mine.to_numpy() - blup.to_numpy()) / scale))
            if (FLASHMM_SIM / f"flashmm_{name}_se_theta.csv").is_file():
                st = ref(f"{name}_se_theta").to_numpy()
                extra["se(theta)"] = _e(_rel(res.se_vcomp.to_numpy(), st, 0).max())
            n_neg = int((res.vcomp.to_numpy() < 0).sum())
            rows.append([f"{k}comp", method, str(len(genes)), _e(e_b), _e(e_se), _e(e_th), *extra.values(),
                         str(n_neg)])
    header = ["model", "method", "genes", "coef", "SE", "variances (theta)", "p (abs.)", "BLUPs",
              "se(theta)", "negative variances"]
    text = _table("flashmm (allow_negative_variance=True) against R FLASHMM 1.3.0", header, rows)
    return text


# ------------------------------------------------------------------------- lmmlite
RECLA = ROOT.parent / "shared" / "data" / "recla"


def _lmmlite_fits(method: str, names: list[str], kin, pheno, covar) -> tuple[dict, bool]:  # noqa: ANN001
    """flashmm's fit of every phenotype: ``name -> (s_g, s, b, se_b, llf)``.

    With :func:`flashmm.fit_kinship` (the kinship API) the llf is put on lmmlite's
    scale with :func:`flashmm.kinship.lmmlite_loglik_offset`; without it, the
    kinship enters as a random block ``L`` (``K = L L'``) and the llf stays in
    lme4's convention.
    """
    from flashmm import MultiGeneMixedLM

    reml = method == "REML"
    fits: dict[str, tuple] = {}
    try:
        from flashmm import fit_kinship
        from flashmm.kinship import lmmlite_loglik_offset
    except ImportError:
        fit_kinship = None
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if fit_kinship is not None:
            res = fit_kinship(pheno[names], covar, kin, reml=reml)
            for name in names:
                X = covar.to_numpy()[pheno[name].notna().to_numpy()]
                off = lmmlite_loglik_offset(X.shape[0], X.shape[1], float(np.linalg.slogdet(X.T @ X)[1]),
                                            reml=reml)
                fits[name] = (float(res.vcomp.loc[name].iloc[0]), float(res.scale.loc[name]),
                              res.fe_params.loc[name].to_numpy(), res.bse_fe.loc[name].to_numpy(),
                              float(res.llf.loc[name]) + off)
            return fits, True
        patterns: dict[bytes, list[str]] = {}
        for name in names:     # phenotypes observed on the same mice are fitted together
            patterns.setdefault(pheno[name].notna().to_numpy().tobytes(), []).append(name)
        for group in patterns.values():
            keep = pheno[group[0]].notna().to_numpy()
            w, V = np.linalg.eigh(kin.to_numpy()[np.ix_(keep, keep)])
            L = V * np.sqrt(np.clip(w, 0, None))
            res = MultiGeneMixedLM(pheno[group].to_numpy()[keep], covar.to_numpy()[keep],
                                   exog_vc={"kinship": L}, gene_names=group).fit(reml=reml)
            for i, name in enumerate(group):
                fits[name] = (float(res.vcomp.iloc[i, 0]), float(res.scale.iloc[i]),
                              res.fe_params.iloc[i].to_numpy(), res.bse_fe.iloc[i].to_numpy(),
                              float(res.llf.iloc[i]))
    return fits, False


def lmmlite_section() -> str:
    files = {m: LMMLITE / f"lmmlite_{m.lower()}.csv" for m in ("REML", "ML")}
    files = {m: f for m, f in files.items() if f.is_file()}
    if not LMMLITE.is_dir() or not files:
        return ("*tests/reference/lmmlite (R/lmmlite fits of the recla data) is not available in "
                "this checkout: the lmmlite row is skipped.*\n")
    if not RECLA.is_dir():
        return "*../shared/data/recla is not available: the lmmlite row is skipped.*\n"
    kin = pd.read_csv(RECLA / "kinship.csv", index_col=0)
    pheno = pd.read_csv(RECLA / "pheno.csv", index_col=0)
    covar = pd.read_csv(RECLA / "covar.csv", index_col=0)
    rows = []
    api = False
    for method, path in files.items():
        ref = pd.read_csv(path).set_index("phenotype")
        fits, api = _lmmlite_fits(method, list(ref.index), kin, pheno, covar)
        err = {"beta": [], "hsq": [], "sigmasq": [], "llf": []}
        offsets: dict[int, list[float]] = {}
        n_one = n_one_close = 0
        for name in ref.index:
            sg, se, b, se_b, llf = fits[name]
            r = ref.loc[name]
            hsq = sg / (sg + se)
            if r["hsq"] >= 1.0 and not api:   # residual variance 0: outside exog_vc's parameter space
                n_one += 1
                n_one_close += bool(np.isfinite(hsq) and hsq > 1 - 1e-4)
                continue
            rb = np.array([r["beta_intercept"], r["beta_sex"]])
            err["beta"].append(float(np.max(np.abs(b - rb) / np.maximum(np.abs(rb), 1e-2 * se_b))))
            err["hsq"].append(abs(hsq - r["hsq"]))
            total = sg + se
            if method == "ML":       # lmmlite reports RSS / (n - p) as sigmasq even for ML
                total *= r["n"] / (r["n"] - len(rb))
            err["sigmasq"].append(abs(total - r["sigmasq"]) / r["sigmasq"])
            err["llf"].append(abs(llf - r["loglik"]))
            offsets.setdefault(int(r["n"]), []).append(llf - r["loglik"])
        if api:
            llf_cell = _e(max(err["llf"]))
        else:
            llf_cell = "spread " + _e(max((max(v) - min(v) for v in offsets.values()), default=float("nan")))
        n_boundary = int((ref["hsq"] >= 1.0).sum() + (ref["hsq"] <= 0.0).sum())
        rows.append([method, f"{len(ref) - n_one} / {len(ref)}", str(n_boundary), _e(max(err["beta"])),
                     _e(max(err["hsq"])), _e(max(err["sigmasq"])), llf_cell])
    header = ["method", "phenotypes compared", "of which h2 = 0 or 1 in lmmlite", "coef (rel.)", "h2 (abs.)",
              "total variance (rel.)", "llf (abs., lmmlite's scale)"]
    how = ("``flashmm.fit_kinship`` (all phenotypes in one call, each on the mice where it was measured)"
           if api else "the kinship as a random block ``L`` with ``K = L L'`` "
           "(``exog_vc={\"kinship\": L}``, ``groups=None``)")
    text = _table("flashmm against R/lmmlite on the recla mouse phenotypes", header, rows)
    text += f"\nflashmm fits are made with {how}. "
    if api:
        text += ("lmmlite's log-likelihood drops constants and, for REML, adds ``log|X'X| / 2``; "
                 "flashmm's is put on lmmlite's scale with "
                 ":func:`flashmm.kinship.lmmlite_loglik_offset` before the comparison. ")
    else:
        text += ("lmmlite's log-likelihood differs from flashmm's (lme4's) by a constant that depends "
                 "only on the individuals, so only its spread among phenotypes with the same ``n`` is "
                 "shown; phenotypes where lmmlite puts all the variance in the kinship term "
                 f"(``h2 = 1``) are left out ({n_one} of them). ")
    text += ("For ML fits lmmlite reports ``sigmasq`` as the weighted residual sum of squares divided "
             "by ``n - p`` (not ``n``), so flashmm's ML total variance is scaled by ``n / (n - p)`` "
             "before the comparison.\n")
    return text


# ------------------------------------------------------------------- random slopes
SLEEP = ROOT / "tests" / "reference" / "sleepstudy"


def sleepstudy_section() -> str:
    from flashmm import MultiGeneMixedLM

    if not SLEEP.is_dir():
        return "*tests/reference/sleepstudy is not available: the sleepstudy table is skipped.*\n"
    data = pd.read_csv(SLEEP / "sleepstudy.csv")
    rows = []
    for kind in ("corr", "diag"):
        for method in ("REML", "ML"):
            res = MultiGeneMixedLM.from_formula(
                "~ Days", data, endog=data[["Reaction"]], groups="Subject",
                re_formula="~ 1 + Days", independent_re=kind == "diag").fit(reml=method == "REML")
            g = res.gene("Reaction")
            vc = pd.read_csv(SLEEP / f"sleepstudy_{kind}_{method}_vc.csv").iloc[0]
            fe = pd.read_csv(SLEEP / f"sleepstudy_{kind}_{method}_fixef.csv")
            ranef = pd.read_csv(SLEEP / f"sleepstudy_{kind}_{method}_ranef.csv")
            C = g.cov_re.to_numpy()
            sd = np.sqrt(vc["var_intercept"] * vc["var_days"])
            psi = max(_rel(C[0, 0], vc["var_intercept"], 0), _rel(C[1, 1], vc["var_days"], 0),
                      abs(C[1, 0] - vc["cov_intercept_days"]) / sd)
            subjects = [str(x) for x in ranef["Subject"]]
            blup = np.array([g.random_effects[x].to_numpy() for x in subjects])
            ref_blup = ranef[["intercept", "days"]].to_numpy()
            cc = np.array([g.random_effects_cov[x].to_numpy()[[0, 1, 1], [0, 0, 1]]
                           for x in subjects])
            ref_cc = ranef[["condvar_intercept", "condcov_intercept_days", "condvar_days"]]
            rows.append([
                f"``(Days {'|' if kind == 'corr' else '||'} Subject)`` {method}",
                _e(psi), _e(float(_rel(g.scale, vc["residual"], 0))),
                _e(abs(g.llf - vc["loglik"])),
                _e(_rel(g.fe_params.to_numpy(), fe["estimate"].to_numpy(), 0).max()),
                _e(_rel(g.bse_fe.to_numpy(), fe["se"].to_numpy(), 0).max()),
                _e(_rel(res.df_satterthwaite.iloc[0].to_numpy(), fe["df"].to_numpy(), 0).max()),
                _e(np.abs(blup - ref_blup).max() / np.abs(ref_blup).max()),
                _e(np.abs(cc - ref_cc.to_numpy()).max() / np.abs(ref_cc.to_numpy()).max()),
            ])
    header = ["fit", "Psi", "residual var.", "llf (abs.)", "coef", "SE", "df (lmerTest)",
              "BLUPs", "cond. cov."]
    text = _table("flashmm against lme4 / lmerTest on sleepstudy (random slopes)", header, rows)
    text += ("\n``Psi``: relative difference of the variances, covariance relative to the product of "
             "the standard deviations; BLUPs and conditional covariances relative to the largest "
             "absolute value. Reference: ``tests/reference/sleepstudy`` (lme4 with bobyqa at "
             "``rhoend = 1e-12``, lmerTest's Satterthwaite df).\n")
    return text + "\n" + _statsmodels_lme_suite()


def _statsmodels_lme_suite() -> str:
    """statsmodels' own lme4 reference numbers (lme00..lme11, shipped with statsmodels)."""
    import csv
    import importlib.util

    from flashmm import MultiGeneMixedLM

    try:
        import statsmodels
    except ImportError:
        return "*statsmodels is not installed: its lme reference suite is skipped.*\n"
    rdir = Path(statsmodels.__path__[0]) / "regression" / "tests" / "results"
    if not (rdir / "lme_r_results.py").is_file():
        return "*statsmodels' lme reference files are not installed: the suite is skipped.*\n"
    spec = importlib.util.spec_from_file_location("lme_r_results", rdir / "lme_r_results.py")
    lr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lr)
    err = {k: 0.0 for k in ("fe", "cov_re", "scale", "vcov", "llf", "blup", "condvar")}
    n = 0
    for ds in range(12):
        with open(rdir / f"lme{ds:02d}.csv", encoding="utf-8") as fid:
            rdr = csv.reader(fid)
            head = next(rdr)
            d = np.asarray([[float(x) for x in line] for line in rdr])
        fe_cols = [i for i, h in enumerate(head) if h.startswith("exog_fe")]
        re_cols = [i for i, h in enumerate(head) if h.startswith("exog_re")]
        groups = d[:, head.index("groups")]
        for reml in (False, True):
            for irf in (False, True):
                if irf and ds < 6:
                    continue
                name = f"_{'reml' if reml else 'ml'}_{'irf' if irf else 'drf'}_{ds}"
                res = MultiGeneMixedLM(d[:, head.index("endog")][:, None], d[:, fe_cols],
                                       groups=groups, exog_re=d[:, re_cols],
                                       independent_re=irf).fit(reml=reml)
                g = res.gene(0)
                n += 1
                pairs = [("fe", g.fe_params.to_numpy(), "coef"),
                         ("cov_re", g.cov_re.to_numpy(), "cov_re"),
                         ("scale", g.scale, "scale"), ("vcov", g.cov_params().to_numpy(), "vcov"),
                         ("llf", g.llf, "loglike")]
                if hasattr(lr, "ranef_mean" + name):
                    g0 = str(np.unique(groups)[0])
                    pairs += [("blup", g.random_effects[g0].to_numpy(), "ranef_mean"),
                              ("condvar", g.random_effects_cov[g0].to_numpy(), "ranef_condvar")]
                for key, ours, ref in pairs:
                    refv = np.asarray(getattr(lr, ref + name), dtype=float)
                    diff = np.abs(np.asarray(ours, dtype=float).ravel()
                                  - np.atleast_2d(refv).ravel()[:np.size(ours)])
                    err[key] = max(err[key], float(diff.max()))
    header = ["fits", "coef", "cov_re", "scale", "vcov", "llf", "BLUP mean", "BLUP cond. var."]
    rows = [[str(n)] + [_e(err[k]) for k in ("fe", "cov_re", "scale", "vcov", "llf", "blup",
                                              "condvar")]]
    text = _table("flashmm against statsmodels' lme4 reference suite (largest absolute "
                  "difference)", header, rows)
    text += ("\nThe suite (``lme00.csv`` ... ``lme11.csv`` with ``lme_r_results.py``, shipped with "
             "statsmodels) holds lme4 fits, ML and REML, dependent and independent random "
             "effects, printed to about 7 significant digits; statsmodels' own ``test_lme.py`` "
             "checks them at 4 decimals (3 for vcov and BLUPs, 2 for llf).\n")
    return text


def main(out: Path) -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    parts = [
        ".. This file is written by docs/_scripts/validation.py at every build; do not edit.\n",
        "lme4 and lmerTest\n-----------------\n", lme4_section(),
        "\nstatsmodels\n-----------\n", statsmodels_section(),
        "\nR FLASHMM\n---------\n", flashmm_section(),
        "\nlmmlite\n-------\n", lmmlite_section(),
        "\nRandom slopes\n-------------\n", sleepstudy_section(),
    ]
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "validation.rst").write_text("\n".join(parts))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))
    main(DOCS / "_generated")
