"""Benchmark tables and plots for docs/performance.rst, from benchmarks/results/*.json.

Reads whatever result files exist (``stats.json``, ``fit.json``,
``dask_memory.json``, ``atlas.json``, and any file with a ``"scaling"`` list of
``{"label", "n_cells", "n_genes", "seconds", "peak_MiB"}`` records); a missing
or unreadable file becomes a note on the page, never a build failure. Writes
``_generated/performance.rst`` and PNGs under ``_generated/performance/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent
RESULTS = DOCS.parent / "benchmarks" / "results"
KNOWN = {
    "stats.json": "``bench_stats.py``: sufficient statistics from a sparse matrix",
    "fit.json": "``bench_fit.py``: the batched fit from sufficient statistics",
    "dask_memory.json": "``bench_dask_memory.py``: memory per dask worker",
    "atlas.json": "``bench_atlas.py``: ``flashmm fit`` end to end on an atlas-sized backed .h5ad",
    "slopes.json": "``bench_slopes.py``: random slopes against the number of groups",
    "components.json": "``bench_components.py``: several components against the number of donors",
    "atlas_components.json": "``bench_atlas_components.py``: several components at the atlas shape",
    "global_block.json": "``bench_global_block.py``: designs with a global block, before and after",
}


def _load(name: str) -> tuple[dict[str, Any] | None, str | None]:
    path = RESULTS / name
    if not path.is_file():
        return None, f"``benchmarks/results/{name}`` is not present (run the benchmark to add it)."
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as err:
        return None, f"``benchmarks/results/{name}`` could not be read ({err})."


def _table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    out = [f".. list-table:: {title}", "   :header-rows: 1", "   :class: flashmm-numbers", ""]
    for row in [header, *rows]:
        out.append(f"   * - {row[0]}")
        out += [f"     - {c}" for c in row[1:]]
    return "\n".join(out) + "\n"


def _machine(d: dict[str, Any]) -> str:
    m = d.get("machine") or d.get("meta") or {}
    bits = [str(m[k]) for k in ("date", "processor") if k in m]
    cores = m.get("cores", m.get("cpu_count", m.get("cpus")))
    if cores is not None:
        bits.append(f"{cores} cores")
    if "load_average_at_start" in m:
        bits.append("load average at start " + ", ".join(f"{x:.1f}" for x in m["load_average_at_start"]))
    for k in ("python", "numpy", "scipy", "dask"):
        if k in m:
            bits.append(f"{k} {m[k]}")
    return "; ".join(bits)


def _fig(name: str, out: Path) -> str:
    return f".. image:: /_generated/performance/{name}\n   :width: 90%\n"


def _finish_loglog(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Log-log axes, labels, legend, and save."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


@dataclass
class _Report:
    """What the benchmark sections contribute: page text, notes and plot series."""

    figdir: Path
    plt: Any
    text: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # label -> [(n_cells, seconds, note)] and label -> [(n_genes, seconds)]
    cells: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)
    genes: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    memory: list[tuple[str, Any]] = field(default_factory=list)
    quoted_seconds_per_gene: float | None = None


def _add_sections(rep: _Report) -> None:
    """Every known result file: load it and add its section, or a note if it is absent or odd."""
    for name, build in (("stats.json", _stats_report), ("fit.json", _fit_report),
                        ("dask_memory.json", _dask_report), ("atlas.json", _atlas_report),
                        ("slopes.json", _slopes_report), ("components.json", _components_report),
                        ("atlas_components.json", _atlas_components_report),
                        ("global_block.json", _global_block_report)):
        data, note = _load(name)
        if note:
            rep.notes.append(note)
            continue
        try:
            build(data, rep)
        except (KeyError, TypeError, ValueError) as err:
            rep.notes.append(f"``{name}`` has an unexpected layout ({err!r}); its table is skipped.")


def _stats_report(stats: dict[str, Any], rep: _Report) -> None:
    """``bench_stats.py``: one pass over the cells."""
    med, ratio = stats["seconds_median"], stats.get("ratio_to_bare_median", {})
    peak = stats.get("memory", {}).get("peak_MiB", {})
    d = stats["data"]
    rows = []
    for key in med:
        label = (
            "bare ``Y.T @ X``"
            if key == "bare"
            else f"``from_design``, chunk {key.split('chunk')[-1]}"
        )
        rows.append(
            [
                label,
                f"{med[key]:.3g}",
                f"{ratio.get(key, 1.0):.3g}",
                f"{peak[key]:.0f}" if key in peak else "",
            ]
        )
    rep.text += [
        "Sufficient statistics\n---------------------\n",
        f"{d['n_cells']:,} cells x {d['n_genes']:,} genes, CSR with density {d.get('density', '?')},"
        f" {d.get('k_fe', '?')} fixed terms, {d.get('k_re', '?')} random levels. "
        f"Machine: {_machine(stats)}.\n",
        _table(
            "One pass over the cells (median of the repeats)",
            ["variant", "seconds", "ratio to bare product", "peak MiB (tracemalloc)"],
            rows,
        ),
    ]
    default = f"stats_chunk{stats.get('default_chunk_size', '')}"
    if default in med:
        rep.cells.setdefault("statistics, in process (default chunk)", []).append(
            (d["n_cells"], med[default], f"{d['n_genes']:,} genes")
        )
    if "bare" in med:
        rep.cells.setdefault("bare sparse product Y.T @ X", []).append(
            (d["n_cells"], med["bare"], f"{d['n_genes']:,} genes")
        )
    mem = stats.get("memory", {})
    if peak:
        rep.memory.append(("stats", mem))


def _fit_report(fit: dict[str, Any], rep: _Report) -> None:
    """``bench_fit.py``: the batched fit from the statistics."""
    d = fit["data"]
    rows = []
    for key, label in [
        ("one_component", f"one component ({d.get('one_component_q', '?')} samples)"),
        ("two_crossed", f"two crossed components (q = {d.get('two_crossed_q', '?')})"),
    ]:
        if key not in fit:
            continue
        r = fit[key]
        rows.append(
            [
                label,
                r.get("optimizer", ""),
                f"{r['fit_seconds_median']:.3g}",
                f"{r['per_gene_ms_median']:.3g}",
                f"{r.get('converged_fraction', float('nan')):.1%}",
                f"{r.get('boundary_fraction', float('nan')):.1%}",
                f"{r['satterthwaite_seconds_median']:.3g}"
                if "satterthwaite_seconds_median" in r
                else "",
            ]
        )
        rep.genes.setdefault(f"fit, {label}", []).append((d["n_genes"], r["fit_seconds_median"]))
    rep.text += [
        "Fitting from the statistics\n---------------------------\n",
        f"{d['n_genes']:,} genes, {d['n_cells']:,} cells, {d.get('k_fe', '?')} fixed terms; "
        f"timed: {fit.get('timed', 'the fit')}. Machine: {_machine(fit)}.\n",
        _table(
            "All genes at once (median of the repeats)",
            [
                "model",
                "optimiser",
                "seconds",
                "ms per gene",
                "converged",
                "at the boundary",
                "Satterthwaite df, all terms (s)",
            ],
            rows,
        ),
    ]
    r_ref = fit.get("flashmm_R", {})
    rep.quoted_seconds_per_gene = r_ref.get("seconds_per_gene")
    if "seconds_per_gene" in r_ref:
        rep.text.append(
            f"\nR FLASHMM is quoted at {1e3 * r_ref['seconds_per_gene']:.3g} ms per gene "
            f"({r_ref.get('source', 'published figure')}).\n"
        )


def _dask_report(dask: dict[str, Any], rep: _Report) -> None:
    """``bench_dask_memory.py``: memory per dask worker."""
    rows = []
    for r in dask["runs"]:
        rows.append(
            [
                f"{r['n_cells']:,}",
                f"{r['n_genes']:,}",
                f"{r['chunk_cells']:,}",
                f"{r['data_MiB']:.0f}",
                f"{r['memory_limit_MiB']:.0f}",
                f"{max(r['peak_rss_MiB']):.0f}",
                f"{r['wall_s']:.3g}",
            ]
        )
        rep.cells.setdefault(f"statistics with dask, chunk {r['chunk_cells']:,}", []).append(
            (r["n_cells"], r["wall_s"], f"{r['n_genes']:,} genes")
        )
    meta = dask.get("meta", {})
    rep.text += [
        "Statistics with dask\n--------------------\n",
        f"{meta.get('description', '')}. Design: {meta.get('design', '?')}. "
        f"Machine: {_machine(dask)}.\n",
        _table(
            "Peak resident memory per worker",
            [
                "cells",
                "genes",
                "cells per chunk",
                "data MiB",
                "worker limit MiB",
                "peak RSS MiB (max over workers)",
                "wall s",
            ],
            rows,
        ),
    ]
    rep.memory.append(("dask", dask["runs"]))


def _atlas_report(atlas: dict[str, Any], rep: _Report) -> None:
    """``bench_atlas.py``: end to end on a backed .h5ad."""
    rep.text += [
        "End to end on an atlas-sized file\n---------------------------------\n",
        _table(
            "``flashmm fit`` on a backed .h5ad",
            ["cells", "genes", "file GB", "fit seconds", "peak RSS GB", "meets targets"],
            [
                [
                    f"{atlas['n_cells']:,}",
                    f"{atlas['n_genes']:,}",
                    atlas.get("file_gb", ""),
                    atlas["fit_seconds"],
                    atlas.get("peak_rss_gb", ""),
                    atlas.get("meets_targets", ""),
                ]
            ],
        ),
    ]
    rep.cells.setdefault("flashmm fit end to end (backed h5ad)", []).append(
        (atlas["n_cells"], atlas["fit_seconds"], f"{atlas['n_genes']:,} genes")
    )


def _slopes_report(d: dict[str, Any], rep: _Report) -> None:
    """Table and plot of ``bench_slopes.py``: cost per gene against the number of groups."""
    rows, figdir, plt = d["rows"], rep.figdir, rep.plt

    def ms(x: Any) -> str:
        return "-" if x is None else f"{x:.3g}"

    table = _table(
        f"Random slopes ``(1 + x | group)``, {d['genes']} genes, medians of {d['repeats']} runs",
        ["groups m", "q = 2m", "one evaluation (ms/gene)", "fit + SE + df (ms/gene)",
         "Newton iterations (median)", "dense q x q Cholesky (ms/gene)"],
        [[r["groups"], r["q"], ms(r["evaluation_ms_per_gene"]), ms(r["fit_ms_per_gene"]),
          f"{r['iterations_median']:g}", ms(r.get("dense_cholesky_ms_per_gene"))] for r in rows],
    )
    slope_text = (f"Log-log slope against m: one evaluation {d['evaluation_loglog_slope']:.2f}, "
                  f"whole fit {d['fit_loglog_slope']:.2f}")
    if "dense_cholesky_loglog_slope" in d:
        slope_text += (f"; a single dense q x q Cholesky factorisation per gene "
                       f"{d['dense_cholesky_loglog_slope']:.2f}")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs = [r["groups"] for r in rows]
    ax.plot(xs, [r["fit_ms_per_gene"] for r in rows], "o-", label="flashmm fit + SE + df")
    ax.plot(xs, [r["evaluation_ms_per_gene"] for r in rows], "s-", label="one evaluation")
    dense = [(r["groups"], r["dense_cholesky_ms_per_gene"]) for r in rows
             if r.get("dense_cholesky_ms_per_gene") is not None]
    if dense:
        ax.plot([x for x, _ in dense], [y for _, y in dense], "^--", color="0.5",
                label="one dense q x q Cholesky")
    _finish_loglog(fig, ax, "groups m", "ms per gene",
                   "Random slopes: cost per gene against the number of groups",
                   figdir / "slopes_groups.png")
    rep.text += ["Random slopes\n-------------\n", table, f"\n{slope_text}. Machine: {_machine(d)}.\n\n",
            _fig("slopes_groups.png", figdir), "\n"]


def _components_report(d: dict[str, Any], rep: _Report) -> None:
    """``bench_components.py``: cost per gene of nested and crossed models against donors."""
    rows, text = [], []
    fig, ax = rep.plt.subplots(figsize=(6.4, 4))
    for kind, res in d["designs"].items():
        for r in res["rows"]:
            rows.append([kind, r["donors"], r["q"], f"{r['groups']} x {r['block_size']}",
                         r["global"], f"{r['ms_per_gene']:.3g}", f"{r['median_iterations']:g}"])
        ax.plot([r["donors"] for r in res["rows"]], [r["ms_per_gene"] for r in res["rows"]], "o-",
                label=f"{kind} (slope {res['loglog_slope']:.2f})")
        text.append(f"{kind} {res['loglog_slope']:.2f}")
    _finish_loglog(fig, ax, "donors", "ms per gene (fit + Satterthwaite df, one thread)",
                   "Several components: cost per gene against the number of donors",
                   rep.figdir / "components_donors.png")
    table = _table(
        f"Variance components, {d['genes']} genes, {d['celltypes']} cell types x "
        f"{d['cells_per_donor_and_celltype']} cells per donor, one thread, medians of "
        f"{d['repeats']} runs",
        ["design", "donors", "q", "group blocks x slots", "global block", "ms/gene",
         "Newton iterations (median)"], rows)
    Path(rep.figdir.parent, "structure_scaling.rst").write_text(
        f"{_fig('components_donors.png', rep.figdir)}\n"
        f"Log-log slope of the cost per gene against the donors: {', '.join(text)}.\n")
    rep.text += ["Several variance components\n---------------------------\n", table,
                 f"\nLog-log slope of the cost per gene against the donors: {', '.join(text)}. "
                 f"Machine: {_machine(d)}.\n\n", _fig("components_donors.png", rep.figdir), "\n"]


def _atlas_components_report(d: dict[str, Any], rep: _Report) -> None:
    """``bench_atlas_components.py``: every model at the atlas shape, one session."""
    rows = []
    for name, r in d["runs"].items():
        rows.append([name, " ".join(r["flags"]), f"{r['seconds']:.0f}", f"{r['cpu_seconds']:.0f}",
                     f"{r['peak_rss_gb']:.2f}", f"{r.get('ratio_to_one', float('nan')):.2f}",
                     r.get("target_ratio", "")])
    table = _table(f"``flashmm fit`` on the backed atlas file ({d['cells']:,} cells x "
                   f"{d['genes']:,} genes), one session",
                   ["model", "random effects", "wall (s)", "CPU (s)", "peak RSS (GB)",
                    "x one component", "target"], rows)
    base = ""
    if "one_component_seconds" in d:
        base = (f"\nThe file was read once before the runs (page cache); every model ran "
                f"{d.get('repeats', 1)} times, interleaved; times are medians, ratios are to the "
                f"one-component median, {d['one_component_seconds']:.1f} s.")
    rep.text += ["Several components at the atlas shape\n"
                 "-------------------------------------\n", table,
                 f"{base}\nMachine: {_machine(d)}.\n\n"]


def _global_block_report(d: dict[str, Any], rep: _Report) -> None:
    """``bench_global_block.py``: CPU per gene with and without the exact global-block Hessian."""
    rows = []
    for name, r in d["models"].items():
        cost = {k: r[k]["fit_ms_per_gene"] + r[k]["df_ms_per_gene"] for k in ("before", "after")}
        rows.append([name, f"{cost['before']:.2f}", f"{cost['after']:.2f}", f"{r['speedup']:.2f}",
                     f"{r['after'].get('ratio_to_one', float('nan')):.1f}",
                     f"{r['llf_after_minus_before']['min']:.1e}"])
    table = _table(f"CPU ms per gene (fit + Satterthwaite df, one thread, {d['genes']} genes, "
                   f"{d['donors']} donors x {d['celltypes']} cell types, {d['batches']} batches)",
                   ["model", "before", "after", "speed-up", "after, x one component",
                    "min llf(after) - llf(before)"], rows)
    rep.text += ["Designs with a global block\n"
                 "---------------------------\n", table, f"\nMachine: {_machine(d)}.\n\n"]


def main(out: Path) -> None:  # noqa: C901 - one linear report
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir = Path(out) / "performance"
    figdir.mkdir(parents=True, exist_ok=True)
    Path(out, "structure_scaling.rst").write_text(   # replaced by _components_report
        "``benchmarks/results/components.json`` is not present (run "
        "``benchmarks/bench_components.py`` to add the plot).\n")
    rep = _Report(figdir, plt)
    _add_sections(rep)
    notes, text = rep.notes, rep.text
    cells_series, genes_series, mem_panels = rep.cells, rep.genes, rep.memory

    # ------------------------------------------------------- generic sweeps
    for path in sorted(RESULTS.glob("*.json")) if RESULTS.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for rec in data.get("scaling", []) if isinstance(data, dict) else []:
            try:
                label = str(rec.get("label", path.stem))
                if "n_cells" in rec:
                    cells_series.setdefault(label, []).append(
                        (rec["n_cells"], rec["seconds"],
                         f"{rec['n_genes']} genes" if "n_genes" in rec else "")
                    )
                if "n_genes" in rec:
                    genes_series.setdefault(label, []).append((rec["n_genes"], rec["seconds"]))
            except (KeyError, TypeError):
                continue

    # --------------------------------------------------------------------- plots
    figs = []
    if cells_series:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for label, pts in cells_series.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label, ms=5)
            for x, y, note_ in pts:
                ax.annotate(note_, (x, y), fontsize=6, xytext=(4, -8), textcoords="offset points")
        _finish_loglog(fig, ax, "cells", "seconds",
                       "Time against the number of cells", figdir / "time_cells.png")
        figs.append(("Time against cells", "time_cells.png"))
    if genes_series:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        xmax = max(p[0] for pts in genes_series.values() for p in pts)
        for label, pts in genes_series.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label, ms=6)
        spg = rep.quoted_seconds_per_gene
        if spg:
            xs = [100, xmax]
            ax.plot(
                xs,
                [spg * x for x in xs],
                "--",
                color="0.5",
                label=f"R FLASHMM, {1e3 * spg:g} ms/gene (quoted)",
            )
        _finish_loglog(fig, ax, "genes", "seconds",
                       "Fit time against the number of genes", figdir / "time_genes.png")
        figs.append(("Time against genes", "time_genes.png"))
    if mem_panels:
        fig, axes = plt.subplots(1, len(mem_panels), figsize=(5.2 * len(mem_panels), 3.8), squeeze=False)
        for ax, (kind, data) in zip(axes[0], mem_panels, strict=True):
            if kind == "stats":
                peak = {int(k.split("chunk")[-1]): v for k, v in data["peak_MiB"].items() if "chunk" in k}
                xs = sorted(peak)
                ax.plot(xs, [peak[x] for x in xs], "o-", label="peak (tracemalloc)")
                if "input_csr_MiB" in data:
                    ax.axhline(data["input_csr_MiB"], ls=":", color="0.4", label="input CSR matrix")
                if "dense_cells_x_genes_MiB" in data:
                    ax.axhline(
                        data["dense_cells_x_genes_MiB"],
                        ls="--",
                        color="tab:red",
                        label="a dense copy of the data",
                    )
                ax.set_xlabel("cells per chunk")
                ax.set_ylabel("MiB")
                ax.set_title("Statistics in process")
            else:
                for chunk in sorted({r["chunk_cells"] for r in data}):
                    runs = sorted(
                        (r["n_cells"], max(r["peak_rss_MiB"])) for r in data if r["chunk_cells"] == chunk
                    )
                    ax.plot([r[0] for r in runs], [r[1] for r in runs], "o-", label=f"chunk {chunk:,} cells")
                ax.axhline(data[0]["memory_limit_MiB"], ls="--", color="tab:red", label="worker memory limit")
                sizes = sorted({(r["n_cells"], r["data_MiB"]) for r in data})
                for x, mib in sizes:
                    ax.annotate(
                        f"data {mib:,.0f} MiB",
                        (x, data[0]["memory_limit_MiB"]),
                        fontsize=6,
                        xytext=(0, -10),
                        textcoords="offset points",
                        ha="center",
                    )
                ax.margins(x=0.15)
                ax.set_xlabel("cells")
                ax.set_ylabel("peak RSS per worker, MiB")
                ax.set_title("Statistics with dask")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        fig.savefig(figdir / "memory.png", dpi=90)
        figs.append(("Memory", "memory.png"))
    plt.close("all")

    head = [
        ".. This file is written by docs/_scripts/performance.py at every build; do not edit.\n",
        "Plots\n-----\n",
    ]
    if figs:
        for title, name in figs:
            head += [f"**{title}**\n", _fig(name, out)]
    else:
        head.append("*No benchmark results were found, so there is nothing to plot.*\n")
    if notes:
        head += ["\n.. note::\n"] + [f"   * {n}" for n in notes] + [""]
    Path(out, "performance.rst").write_text("\n".join(head + text) + "\n")


if __name__ == "__main__":
    main(DOCS / "_generated")
