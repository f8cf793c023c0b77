"""``report.png``: the runs of a report side by side, stage by stage."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, Sequence

from capsexp.report.chance import chance_level
from capsexp.report.runs import Run
from capsexp.rundir.files import write_atomic
from capsexp.models.stages import STAGES


def plot(runs: Sequence[Run], rows: Sequence[dict[str, Any]], path: Path) -> None:
    """report.png: ``report_figure`` as a PNG file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    png = io.BytesIO()
    FigureCanvasAgg(report_figure(runs, rows)).print_png(png)
    write_atomic(path, png.getvalue())


def report_figure(runs: Sequence[Run], rows: Sequence[dict[str, Any]]) -> Any:
    """Against stage, stem to head, one line per run: median gradient norm and median update/weight
    (log y), drift at the last validation; and validation accuracy per step (0 to 1, chance dashed).
    A matplotlib Figure."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # headless, as in capsexp.diagnostics.figures; pyplot is never used
        matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(14, 10), dpi=100, layout="constrained")
    (grads_ax, update_ax), (drift_ax, acc_ax) = fig.subplots(2, 2)
    panels = [(grads_ax, "grad_norm/", "log", "median gradient norm per stage"),
              (update_ax, "update_to_weight/", "log", "median update/weight per stage (one step)"),
              (drift_ax, "drift/", "linear", "drift per stage, last validation (CKA to the start; 1 = unchanged)")]
    for i, (run, row) in enumerate(zip(runs, rows)):
        color = matplotlib.colormaps["tab20" if len(rows) > 10 else "tab10"](i % 20)
        drawn = False
        for ax, prefix, scale, _ in panels:
            points = [(x, row.get(f"{prefix}{s}")) for x, s in enumerate(STAGES)
                      if row.get(f"{prefix}{s}") is not None and (scale == "linear" or row[f"{prefix}{s}"] > 0)]
            if points:  # frozen stages are skipped, so a line starts at the first trainable stage
                ax.plot(*zip(*points), marker="o", color=color, label=None if drawn else row["run"])
                drawn = True
        val = run.scalars.get("val/acc", [])
        if val:
            acc_ax.plot(*zip(*val), marker=".", color=color, label=None if drawn else row["run"])
    for chance in sorted({c for c in (chance_level(run.metrics, run.config) for run in runs) if c}):
        acc_ax.axhline(chance, color="0.35", linestyle="--", linewidth=1, label=f"chance (1/{round(1 / chance)})")
    for ax, prefix, scale, title in panels:
        ax.set(yscale=scale, xticks=range(len(STAGES)), xticklabels=STAGES, xlabel="stage", title=title)
    acc_ax.set(xlabel="step", ylabel="val/acc", title="validation accuracy", ylim=(0, 1))  # never zoomed in
    acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (grads_ax, update_ax, drift_ax, acc_ax):
        ax.grid(True, alpha=0.3)
    if any(ax.get_legend_handles_labels()[0] for ax in (grads_ax, update_ax, drift_ax, acc_ax)):
        fig.legend(loc="outside lower center", ncol=min(3, len(rows)), fontsize=8)
    return fig
