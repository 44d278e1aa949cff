r"""Command line interface: ``flashmm demo``, ``fit``, ``stats`` and ``compare``.

``flashmm demo`` simulates a multi-sample single-cell study and runs the whole
differential-expression workflow on it; ``flashmm stats`` makes one pass over
the cells of an ``.h5ad`` file (read backed, chunk by chunk) and saves the
sufficient statistics; ``flashmm fit`` fits the model from an ``.h5ad`` file or
from saved statistics and writes a tidy CSV table; ``flashmm compare`` runs a
method-comparison study on simulated data (:mod:`flashmm.compare`) and writes
its scores, p-values and plots.

The model is given as in ``MultiGeneMixedLM.from_formula``: ``--formula``
(fixed effects), ``--groups`` (random group intercept), ``--vc NAME=FORMULA``
(variance components), ``--re-formula`` with ``--independent-re`` (correlated
or independent random slopes per group), e.g.::

    flashmm fit data.h5ad --formula "~ 0 + cls + cls:trt" --groups sam \
        --re-formula "~ 1 + np.log(libsize)" --transform log2p1 --out results.csv

Errors in the inputs are reported on one line, ``flashmm: error: ...``, with
exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np  # formulas such as np.log(libsize) are evaluated in this namespace
import pandas as pd

from ._df_method import DF_METHODS
from ._errors import FlashmmError
from ._memory import keep_temporaries_in_heap
from ._pass import DEFAULT_CHECKPOINT_EVERY
from ._version import __version__

__all__ = ["main", "build_parser"]

_DEMO_FORMULA = "~ 0 + np.log(libsize) + cls + cls:trt"
_DEMO_PNG = "flashmm_demo_volcano.png"


class CLIError(FlashmmError):
    """A usage error detected after argument parsing."""


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``flashmm`` command."""
    parser = argparse.ArgumentParser(
        prog="flashmm",
        description="Linear mixed models for thousands of genes at once (single-cell DE).",
    )
    parser.add_argument("--version", action="version", version=f"flashmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,fit,stats,compare}")
    sub.required = True

    demo = sub.add_parser("demo", help="simulate a study and run the whole DE workflow on it")
    demo.add_argument("--genes", type=int, default=2000, help="number of genes (default 2000)")
    demo.add_argument("--cells", type=int, default=20000, help="number of cells (default 20000)")
    demo.add_argument("--samples", type=int, default=24, help="number of samples (default 24)")
    demo.add_argument("--celltypes", type=int, default=6, help="number of cell types (default 6)")
    demo.add_argument("--de-genes", type=int, default=None,
                      help="number of DE genes (default: 5%% of the genes)")
    demo.add_argument("--seed", type=int, default=2024, help="random seed (default 2024)")
    demo.add_argument("--fdr", type=float, default=0.05, help="FDR level (default 0.05)")
    demo.add_argument("--top", type=int, default=10, help="top genes to print (default 10)")
    demo.add_argument("--out-dir", default=".", help="directory of the volcano plot PNG")
    demo.add_argument("--no-plot", action="store_true", help="do not write the volcano plot")

    fit = sub.add_parser("fit", help="fit the model to an .h5ad file or saved statistics")
    fit.add_argument("input", nargs="?", help="input .h5ad file (read backed)")
    fit.add_argument("--stats", dest="stats_path", help="refit from statistics saved by 'flashmm stats' "
                          "(with their design: no design flags)")
    _add_design_args(fit, required=False)
    fit.add_argument("--contrast", action="append", default=[], metavar="NAME=EXPR",
                     help="contrast over term names, e.g. 'C1=cls[C1]:trt[T.B]' (repeatable)")
    meth = fit.add_mutually_exclusive_group()
    meth.add_argument("--reml", dest="reml", action="store_true", default=True, help="REML (default)")
    meth.add_argument("--ml", dest="reml", action="store_false", help="maximum likelihood")
    fit.add_argument("--df-method", default="satterthwaite",
                     choices=list(DF_METHODS), help="test df (default satterthwaite)")
    fit.add_argument("--max-memory", default=None, metavar="SIZE",
                     help="memory the pass and the fit may use, e.g. 8GB (default: half of the RAM); "
                          "sets the chunk size of the pass; a model that needs more is refused "
                          "before fitting")
    fit.add_argument("--jobs", type=int, default=None, metavar="N",
                     help="threads for several components and random slopes (default or -1: all cores; "
                          "-2: all but one)")
    fit.add_argument("--out", required=True, help="output CSV (tidy table)")
    fit.add_argument("--write-h5ad", metavar="OUT.h5ad",
                     help="also write obs/var and the results (write_results) to this .h5ad (X not copied)")
    fit.add_argument("--save-stats", metavar="STATS.npz", help="also save the sufficient statistics")
    fit.add_argument("--quiet", action="store_true",
                     help="no progress bars and no information lines (chunking, pass summary)")

    st = sub.add_parser("stats", help="compute and save the sufficient statistics of an .h5ad file")
    st.add_argument("input", help="input .h5ad file (read backed)")
    _add_design_args(st, required=True)
    st.add_argument("--out", required=True,
                    help="output .npz file (written atomically; a checkpoint OUT.checkpoint.npz "
                         "beside it lets a killed run resume when rerun with the same command)")
    st.add_argument("--max-memory", default=None, metavar="SIZE",
                    help="memory the pass may use, e.g. 2GB (default: half of the RAM); sets the "
                         "chunk size unless --chunk-size is given")
    st.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY, metavar="N",
                    help=f"chunks between checkpoints (default {DEFAULT_CHECKPOINT_EVERY})")
    st.add_argument("--quiet", action="store_true",
                    help="no progress bar and no information lines (chunking, pass summary)")
    _add_compare_parser(sub)
    return parser


def _add_compare_parser(sub: Any) -> None:
    """``flashmm compare``: the options of :func:`flashmm.compare.run_studies`."""
    cmp = sub.add_parser("compare", help="compare DE methods on simulated studies with known truth")
    cmp.add_argument("--per-arm", type=int, nargs="+", default=[6], metavar="N",
                     help="donors per condition, one design per value (default 6)")
    cmp.add_argument("--genes", type=int, default=1000, help="genes per study (default 1000)")
    cmp.add_argument("--cells-per-donor", type=int, default=100, help="cells per donor (default 100)")
    cmp.add_argument("--celltypes", type=int, default=2, help="cell types (default 2)")
    cmp.add_argument("--de-fraction", type=float, default=0.1, help="share of DE genes (default 0.1)")
    cmp.add_argument("--min-beta", type=float, default=0.5, help="smallest |log fold change| (0.5)")
    cmp.add_argument("--max-beta", type=float, default=1.5, help="largest |log fold change| (1.5)")
    cmp.add_argument("--donor-variance", type=float, default=0.1,
                     help="variance of the donor effects, log scale (default 0.1)")
    cmp.add_argument("--datasets", type=int, default=10, help="datasets per design (default 10)")
    cmp.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                     help="methods to run (default: all available; see --list-methods)")
    cmp.add_argument("--list-methods", action="store_true", help="list the methods and exit")
    cmp.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    cmp.add_argument("--fdr", type=float, default=0.05, help="BH FDR level (default 0.05)")
    cmp.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    cmp.add_argument("--no-memory", action="store_true", help="do not trace peak memory")
    cmp.add_argument("--out", help="CSV of the scores, one row per design, dataset and method")
    cmp.add_argument("--summary-out", metavar="CSV", help="CSV of the scores averaged over datasets")
    cmp.add_argument("--pvalues-out", metavar="CSV", help="CSV of every gene's p-value")
    cmp.add_argument("--qq-plot", metavar="PNG", help="calibration QQ plot, one panel per design")
    cmp.add_argument("--power-plot", metavar="PNG", help="power against FDP, one panel per design")


def _add_design_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--formula", required=required, help="one-sided fixed-effects formula over obs columns")
    p.add_argument("--groups", help="obs column of the grouping factor (e.g. donor)")
    p.add_argument("--vc", action="append", default=[], metavar="NAME=FORMULA",
                   help="variance component, e.g. 'celltype=0 + C(cls)' (repeatable)")
    p.add_argument("--re-intercept", action="store_true",
                   help="random group intercept alongside --vc (statsmodels re_formula='1')")
    p.add_argument("--re-formula", metavar="FORMULA",
                   help="correlated random effects per group, e.g. '~ 1 + np.log(libsize)' "
                        "(statsmodels re_formula; needs --groups)")
    p.add_argument("--independent-re", action="store_true",
                   help="with --re-formula: independent (diagonal) random effects, lme4's ||")
    p.add_argument("--layer", help="use adata.layers[LAYER] instead of adata.X")
    p.add_argument("--transform", default=None, choices=["log2p1", "log1p"],
                   help="transform of the values (default none)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="cells per chunk (default: from --max-memory, logged)")


def _design_flags_given(args: argparse.Namespace) -> list[str]:
    """The design flags (``_add_design_args``) set to other than their defaults."""
    p = argparse.ArgumentParser(add_help=False)
    _add_design_args(p, required=False)
    return [a.option_strings[0] for a in p._actions if getattr(args, a.dest) != a.default]


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise CLIError(f"{what} {item!r} must look like NAME=EXPRESSION.")
        out[name.strip()] = value.strip()
    return out


# ------------------------------------------------------------- commands
def _read_h5ad(path: str) -> Any:
    try:
        import anndata
    except ImportError:  # pragma: no cover - optional dependency
        raise CLIError("reading .h5ad files needs anndata: pip install 'flashmm[anndata]'.") from None
    if not os.path.exists(path):
        raise CLIError(f"input file {path!r} does not exist.")
    try:
        return anndata.read_h5ad(path, backed="r")
    except Exception as err:  # h5py/anndata raise many types for a bad file
        raise CLIError(f"cannot read {path!r} as an .h5ad file: {str(err).splitlines()[0]}. "
                       "If it is an .h5ad file, it is truncated or corrupted: write it again "
                       "from a good copy.") from None


def checkpoint_path(out: str) -> str:
    """The checkpoint file of ``flashmm stats --out OUT``: ``OUT.checkpoint.npz`` beside it."""
    return f"{out}.checkpoint.npz"


def _compute_stats(args: argparse.Namespace, checkpoint: str | None = None) -> tuple[Any, Any]:
    """One backed pass over the cells; returns (stats, adata)."""
    from ._anndata import anndata_inputs
    from ._design import build_formula_design
    from ._progress import Progress
    from .stats import SufficientStats

    if not args.formula:
        raise CLIError("--formula is required with an .h5ad input.")
    adata = _read_h5ad(args.input)
    obs, endog, genes = anndata_inputs(adata, args.layer)
    vc = _pairs(args.vc, "--vc") or None
    design = build_formula_design(args.formula, obs, groups=args.groups, vc_formula=vc,
                                  re_formula=_re_formula(args),
                                  independent_re=args.independent_re)
    with Progress(len(obs), "statistics pass", unit="cells",
                  enabled=not args.quiet and sys.stderr.isatty()) as bar:
        stats = SufficientStats.from_design(
            design, endog, transform=args.transform, chunk_size=args.chunk_size, gene_names=genes,
            progress=bar, max_memory=args.max_memory, checkpoint=checkpoint,
            checkpoint_every=getattr(args, "checkpoint_every", DEFAULT_CHECKPOINT_EVERY))
    return stats, adata


def _re_formula(args: argparse.Namespace) -> str | None:
    """``--re-formula`` or ``--re-intercept`` (statsmodels' ``re_formula``)."""
    if args.re_intercept and args.re_formula:
        raise CLIError("give --re-formula or --re-intercept, not both (--re-intercept is "
                       "--re-formula 1).")
    if args.independent_re and not args.re_formula:
        raise CLIError("--independent-re needs --re-formula.")
    return "1" if args.re_intercept else args.re_formula


def _cmd_stats(args: argparse.Namespace) -> int:
    stats, adata = _compute_stats(args, checkpoint_path(args.out))
    stats.save(args.out)
    _close(adata)
    print(f"flashmm: saved statistics of {stats.n} cells x {stats.n_genes} genes to {args.out}",
          file=sys.stderr)
    return 0


def _close(adata: Any) -> None:
    f = getattr(adata, "file", None)
    if f is not None and getattr(adata, "isbacked", False):
        f.close()


def _cmd_fit(args: argparse.Namespace) -> int:
    from ._progress import Progress
    from .model import MultiGeneMixedLM
    from .stats import SufficientStats

    if (args.input is None) == (args.stats_path is None):
        raise CLIError("give either an input .h5ad file or --stats STATS.npz (not both).")
    if args.stats_path is not None and args.write_h5ad:
        raise CLIError("--write-h5ad needs the .h5ad input (its obs and var), not --stats.")
    given = _design_flags_given(args)
    if args.stats_path is not None and given:
        raise CLIError(f"{', '.join(given)} cannot be used with --stats: the design, layer and "
                       "transform are those saved by 'flashmm stats'; drop them, or fit the .h5ad "
                       "input instead.")
    adata = None
    if args.stats_path is not None:
        if not os.path.exists(args.stats_path):
            raise CLIError(f"statistics file {args.stats_path!r} does not exist.")
        stats = SufficientStats.load(args.stats_path)
    else:
        stats, adata = _compute_stats(args)
        if args.save_stats:
            stats.save(args.save_stats)
    model = MultiGeneMixedLM.from_sufficient_stats(stats)
    contrasts = _pairs(args.contrast, "--contrast")
    with Progress(2, "fit and tests", unit="step", enabled=not args.quiet) as bar:
        res = model.fit(reml=args.reml, df_method=args.df_method, n_jobs=args.jobs,
                        max_memory=args.max_memory)
        bar(1)
        table, con = _tests_table(res, contrasts)
        bar(1)
    table.to_csv(args.out, index=False)
    if args.write_h5ad:
        _write_h5ad(adata, res, con, args.write_h5ad)
    if adata is not None:
        _close(adata)
    n_conv = int(res.converged.sum())
    print(f"flashmm: fitted {res.n_genes} genes on {res.nobs} cells ({n_conv} converged); "
          f"wrote {len(table)} rows to {args.out}", file=sys.stderr)
    return 0


def _tests_table(res: Any, contrasts: dict[str, str]) -> tuple[pd.DataFrame, Any]:
    """Tidy table of every coefficient and contrast, from one ``t_test`` call.

    Coefficients and contrasts share one call so the Satterthwaite df machinery
    runs once. Returns the table (column ``kind``: "term" or "contrast") and the
    contrast results of the user's contrasts (or None).
    """
    from .contrasts import contrast_matrix

    terms = list(res.exog_names)
    L = pd.DataFrame(np.eye(len(terms)), index=terms, columns=terms)
    if contrasts:
        clash = sorted(set(contrasts) & set(terms))
        if clash:
            raise CLIError(f"contrast name(s) {clash} are also term names; rename them.")
        L = pd.concat([L, contrast_matrix(contrasts, terms)], axis=1)
    tests = res.t_test(L)
    table = tests.summary_frame()
    table["kind"] = np.where(table["contrast"].isin(terms), "term", "contrast")
    con = None
    if contrasts:
        from .contrasts import MultiGeneContrastResults

        names = list(contrasts)
        idx = [list(L.columns).index(n) for n in names]
        con = MultiGeneContrastResults(
            tests.effect.index, names, tests.L[idx], tests.q[idx],
            tests.effect[names].to_numpy(), tests.sd[names].to_numpy(),
            tests.df_denom[names].to_numpy(), tests.alternative, tests.df_method,
            res.converged.to_numpy(),
        )
    return table, con


def _write_h5ad(adata: Any, res: Any, con: Any, path: str) -> None:
    import anndata

    from .io import write_results

    out = anndata.AnnData(obs=adata.obs.copy(), var=adata.var.copy())
    write_results(out, res, contrasts=con)
    out.write_h5ad(path)


# ------------------------------------------------------------------ demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from .datasets import simulate_rnaseq
    from .model import MultiGeneMixedLM

    t0 = time.perf_counter()
    n_de = args.de_genes if args.de_genes is not None else max(args.celltypes, args.genes // 20)
    print(f"Simulating {args.cells} cells x {args.genes} genes: {args.samples} samples nested in "
          f"2 conditions, {args.celltypes} cell types, {n_de} DE genes (seed {args.seed}) ...")
    adata = simulate_rnaseq(args.genes, args.cells, n_samples=args.samples,
                            n_celltypes=args.celltypes, n_de_genes=n_de, seed=args.seed)
    t1 = time.perf_counter()
    print(f"  simulated in {t1 - t0:.1f} s\n")
    print(f"Fitting  {_DEMO_FORMULA}  with random sample intercepts (groups='sam'), "
          "transform='log2p1' ...")
    model = MultiGeneMixedLM.from_formula(_DEMO_FORMULA, adata, groups="sam", transform="log2p1")
    res = model.fit()
    terms = [t for t in res.exog_names if ":trt[" in t]
    tests = res.t_test(dict(zip(terms, terms, strict=True)))
    frame = tests.summary_frame()
    t2 = time.perf_counter()
    print(f"  fitted in {t2 - t1:.1f} s\n")
    print(res.summary(fdr=args.fdr, terms=terms))
    print(f"\nTop {args.top} genes for the cell-type-specific treatment effects (cls:trt):")
    print(tests.summary(top=args.top, fdr=args.fdr))
    recall, fdp, n_true, n_found = truth_metrics(adata, frame, args.fdr)
    print(f"\nAgainst the simulated truth at FDR {args.fdr:g}: {n_found} discoveries, "
          f"recall {recall:.3f} ({round(recall * n_true)}/{n_true} DE gene x cell type pairs), "
          f"false discovery proportion {fdp:.3f}")
    if not args.no_plot:
        path = _demo_plot(frame, args.out_dir, args.fdr)
        if path:
            print(f"Volcano plot: {path}")
    print(f"Total time {time.perf_counter() - t0:.1f} s")
    return 0


def truth_metrics(adata: Any, frame: pd.DataFrame, fdr: float = 0.05) -> tuple[float, float, int, int]:
    """Recall and false discovery proportion of ``cls:trt`` calls against the simulation.

    A true positive is a (gene, term) pair where the gene is simulated DE in the
    term's cell type; any other discovery (padj < fdr) is false.

    Returns
    -------
    recall, fdp : float
    n_true, n_discoveries : int
    """
    var = adata.var
    truth = {(str(g), str(ct)) for g, ct, de in zip(var_names_of(adata), var["de_celltype"], var["de"],
                                                   strict=True) if de}
    cell_type = frame["contrast"].str.extract(r"cls\[([^\]]+)\]", expand=False)
    hit = frame["padj"].to_numpy() < fdr
    is_true = np.array([(g, c) in truth for g, c in zip(frame["gene"], cell_type, strict=True)])
    n_found = int(hit.sum())
    tp = int((hit & is_true).sum())
    recall = tp / len(truth) if truth else float("nan")
    fdp = (n_found - tp) / n_found if n_found else 0.0
    return recall, fdp, len(truth), n_found


def var_names_of(adata: Any) -> list[str]:
    """Gene names of an AnnData as strings."""
    return [str(g) for g in adata.var_names]


def _demo_plot(frame: pd.DataFrame, out_dir: str, alpha: float) -> str | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("(matplotlib is not installed: no volcano plot)")
        return None
    from .plot import volcano

    os.makedirs(out_dir, exist_ok=True)
    fig = Figure(figsize=(6.5, 4.8))
    ax = fig.subplots()
    volcano(frame, ax=ax, alpha=alpha, label_top=8)
    ax.set_title("flashmm demo: treatment effect within each cell type (cls:trt)")
    path = os.path.join(out_dir, _DEMO_PNG)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# --------------------------------------------------------------- compare
def _cmd_compare(args: argparse.Namespace) -> int:
    from . import compare

    if args.list_methods:
        print(compare.methods_table().to_string())
        return 0
    if not args.out:
        raise CLIError("--out TABLE.csv is required (or --list-methods).")
    designs = [compare.SimulationDesign(
        n_per_arm=n, n_genes=args.genes, cells_per_donor=args.cells_per_donor,
        n_celltypes=args.celltypes, de_fraction=args.de_fraction, min_beta=args.min_beta,
        max_beta=args.max_beta, var_random_effects=args.donor_variance) for n in args.per_arm]
    t0 = time.perf_counter()
    res = compare.run_studies(designs, args.datasets, args.methods, seed=args.seed,
                              workers=args.workers, fdr=args.fdr, memory=not args.no_memory)
    res.table.to_csv(args.out, index=False)
    summary = res.summary()
    if args.summary_out:
        summary.to_csv(args.summary_out, index=False)
    if args.pvalues_out:
        res.pvalues.to_csv(args.pvalues_out, index=False)
    for path, kind in ((args.qq_plot, "qq"), (args.power_plot, "power")):
        if path:
            _compare_figure(res, kind, path)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(summary.drop(columns=["label"]).to_string(index=False, float_format="%.4g"))
    print(f"flashmm: {len(res.table)} method runs in {time.perf_counter() - t0:.1f} s; "
          f"wrote {args.out}", file=sys.stderr)
    return 0


def _compare_figure(res: Any, kind: str, path: str) -> None:
    """One panel per design: calibration QQ (``kind="qq"``) or power against FDP."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CLIError("plots need matplotlib: pip install 'flashmm[plot]'.") from None
    from .plot import calibration_qq, power_fdp

    designs = list(dict.fromkeys(res.table["design"]))
    fig = Figure(figsize=(4.8 * len(designs), 4.5))
    for ax, design in zip(np.atleast_1d(fig.subplots(1, len(designs))), designs, strict=True):
        (calibration_qq if kind == "qq" else power_fdp)(res, design=design, ax=ax)
        ax.set_title(f"{design} donors")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------ main
_COMMANDS = {"demo": _cmd_demo, "fit": _cmd_fit, "stats": _cmd_stats, "compare": _cmd_compare}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flashmm`` command; returns the exit code (0 ok, 2 error).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    handler = _log_to_stderr(quiet=bool(getattr(args, "quiet", False)))
    keep_temporaries_in_heap()      # this process is ours: fewer page faults in the fit
    try:
        return _COMMANDS[args.command](args)
    except (FlashmmError, ValueError, OSError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"flashmm: error: {msg}", file=sys.stderr)
        return 2
    finally:
        logging.getLogger("flashmm").removeHandler(handler)


def _log_to_stderr(quiet: bool) -> logging.Handler:
    """Show the ``flashmm`` logger's information lines (chunking, pass summary) on stderr.

    With ``--quiet`` only warnings are shown.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    handler.setFormatter(logging.Formatter("flashmm: %(message)s"))
    log = logging.getLogger("flashmm")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
