"""Rendered diagnostic figures, returned as RGB arrays for TensorBoard.

Figures are drawn with matplotlib's Agg canvas directly: no display is ever
needed, and because pyplot is not used there is no global figure registry to
leak figures into or to clash with an interactive backend in the same process.
"""

from __future__ import annotations

import math
import sys

import matplotlib

# Agg before anything could pull in pyplot, so a headless worker never tries
# to open a display even if another module uses pyplot later. If pyplot is
# already loaded someone chose a backend on purpose; the Agg canvas below
# renders independently of it anyway.
if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Beyond this many layers only every k-th layer gets a tick label, so the
# ~100 weight-bearing layers of a ResNet50 stay readable.
_MAX_TICK_LABELS = 16


def _layer_order(history: list[tuple[int, dict[str, float]]]) -> list[str]:
    """Union of layer keys, in the depth order in which they first appear."""
    order: dict[str, None] = {}
    for _, values in history:
        order.update(dict.fromkeys(values))
    return list(order)


def _stage_spans(layers: list[str]) -> list[tuple[str, int, int]]:
    """Contiguous ``(stage, first index, last index)`` runs along the layer axis."""
    spans: list[tuple[str, int, int]] = []
    for i, key in enumerate(layers):
        stage = key.split(".", 1)[0]
        if spans and spans[-1][0] == stage:
            spans[-1] = (stage, spans[-1][1], i)
        else:
            spans.append((stage, i, i))
    return spans


def _to_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` and return its pixels as an ``[H, W, 3]`` uint8 array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return rgb


def _draw_stages(ax: Axes, layers: list[str]) -> None:
    """Mark stage boundaries, write stage names, and label layers sparsely."""
    for stage, first, last in _stage_spans(layers):
        if first > 0:
            ax.axvline(first - 0.5, color="0.55", linewidth=0.8, linestyle="--")
        ax.text(
            (first + last) / 2, 1.01, stage, transform=ax.get_xaxis_transform(),
            ha="center", va="bottom", fontsize=11, fontweight="bold",
        )
    step = max(1, math.ceil(len(layers) / _MAX_TICK_LABELS))
    ticks = list(range(0, len(layers), step))
    ax.set_xticks(ticks)
    # The stage name is already written above the axes; the tick keeps only
    # the module path (or the stage name for a stage that is one module).
    ax.set_xticklabels(
        [layers[i].split(".", 1)[-1] for i in ticks], rotation=90, fontsize=9
    )
    ax.set_xlim(-0.5, len(layers) - 0.5)


def gradient_flow_figure(
    history: list[tuple[int, dict[str, float]]], title: str = ""
) -> np.ndarray:
    """Mean |grad| per layer in depth order, one line per logging step.

    ``history`` holds ``(step, {"<stage>.<module path>": mean |grad|})`` pairs,
    as in :attr:`capsexp.diagnostics.gradients.GradStats.layer_mean_abs`. The y axis is
    logarithmic (zero or non-finite values leave gaps); lines are coloured by
    step with a colour bar. Returns the rendered image as an ``[H, W, 3]``
    uint8 array suitable for ``SummaryWriter.add_image(..., dataformats="HWC")``.
    """
    fig = Figure(figsize=(10, 5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    layers = _layer_order(history)
    if not layers:
        ax.text(0.5, 0.5, "no gradient data", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _to_rgb(fig)

    steps = [step for step, _ in history]
    lo, hi = min(steps), max(steps)
    norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)
    cmap = matplotlib.colormaps["viridis"]
    x = np.arange(len(layers))
    for step, values in sorted(history, key=lambda item: item[0]):
        y = np.array([values.get(key, np.nan) for key in layers], dtype=float)
        # Log scale cannot show zeros; gaps make a dead layer visible as such.
        y[~np.isfinite(y) | (y <= 0)] = np.nan
        ax.plot(x, y, color=cmap(norm(step)), linewidth=1.0, marker=".", markersize=2)

    ax.set_yscale("log")
    ax.set_ylabel("mean |grad|", fontsize=11)
    ax.tick_params(axis="y", labelsize=10)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    _draw_stages(ax, layers)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="step", pad=0.01)
    if title:
        fig.suptitle(title, fontsize=12)
    return _to_rgb(fig)


def stage_profile_figure(history: list[tuple[int, dict[str, float]]],
                         title: str = "grad_norm per stage, stem to head (log scale)") -> np.ndarray:
    """Gradient norm against stage, one line per logging step coloured by step, log y axis.

    ``history`` holds ``(step, {stage: norm})`` in step order; the decades between the stem and the
    head, and between runs, stay readable where a linear chart would flatten them.
    """
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    stages = _layer_order(history)
    steps = [step for step, _ in history]
    norm = Normalize(vmin=min(steps), vmax=max(steps) if max(steps) > min(steps) else min(steps) + 1)
    cmap = matplotlib.colormaps["viridis"]
    x = np.arange(len(stages))
    for step, values in history:
        y = np.array([values.get(s, np.nan) for s in stages], dtype=float)
        y[~np.isfinite(y) | (y <= 0)] = np.nan
        ax.plot(x, y, color=cmap(norm(step)), linewidth=1.0, marker="o", markersize=3)
    ax.set_yscale("log")
    ax.set_xticks(x, stages, fontsize=11)
    ax.tick_params(axis="y", labelsize=10)
    ax.set_ylabel("grad_norm", fontsize=11)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="step", pad=0.01)
    fig.suptitle(f"{title}, steps {steps[0]}-{steps[-1]}", fontsize=12)
    return _to_rgb(fig)


def position_map_figure(values: np.ndarray, title: str) -> np.ndarray:
    """An ``[h, w]`` map as a heat map with a colour bar and the value in every cell (up to 8x8)."""
    fig = Figure(figsize=(4.5, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="magma", vmin=0)
    if values.shape[0] <= 8 and values.shape[1] <= 8:
        for (row, col), value in np.ndenumerate(values):
            ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=8, color="0.5")
    ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(image, ax=ax, pad=0.02)
    ax.set_title(f"{title}\n{values.shape[0]}x{values.shape[1]} positions", fontsize=10)
    return _to_rgb(fig)
