"""The dashboard's charts as PNG files, drawn by matplotlib (`python -m trainer.report --png`).

Each chart the page shows (trainer/report_svg.py: its `plot`) is drawn again, no browser needed:
lines with their dashes and dots, NaN / inf as red crosses at the bottom, reference lines across,
spike marks as dashed verticals with their glyph; heatmaps in viridis over log10 of the value
(grey: not logged, black: inf / NaN) with a colour bar in the values themselves; the expert load
(trainer/report_moe.py) in viridis over the share, linear from 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.axis import Axis
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, LogNorm, Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from trainer.report_moe import ExpertPlot
from trainer.report_svg import SPIKES, VIRIDIS, WIDTH, Chart, HeatPlot, LinePlot, log_ticks, short, step_ticks

SCALE = 1.5  # PNG pixels per pixel of the chart on the page (640 wide -> 960)
MARKERS = {"loss": "v", "grad_norm": "D", "collapse": "o"}  # matplotlib's nearest to SPIKES' glyphs ▼, ◆, ●
CMAP = LinearSegmentedColormap.from_list("report-viridis", VIRIDIS)  # the page's stops: PNG and page agree


def dashes(pattern: str) -> str | tuple:
    """An SVG stroke-dasharray ("5,3") as a matplotlib line style."""
    return (0, tuple(float(v) for v in pattern.split(","))) if pattern else "-"


def draw_lines(fig: Figure, plot: LinePlot) -> None:
    """Lines over step (a gap where a value cannot be shown), references across, spike marks."""
    ax = fig.add_subplot()
    for line in plot.lines:
        x = np.array([x for x, _ in line.points], dtype=float)
        y = np.array([y for _, y in line.points], dtype=float)
        shown = np.isfinite(y) & ((y > 0) if plot.log else True)
        dots = line.dots or len(line.points) < 3
        ax.plot(x, np.where(shown, y, np.nan), color=line.color, linestyle=dashes(line.dash), lw=1.4, label=line.label)
        if dots:
            ax.plot(x[shown], y[shown], "o", color=line.color, ms=3)
        if (bad := ~np.isfinite(y)).any():  # NaN / inf logged: a red cross at the bottom
            bottom = np.full(bad.sum(), 0.02)  # in axes fractions, as x is in steps
            ax.plot(x[bad], bottom, "x", color="#c00", transform=ax.get_xaxis_transform(), clip_on=False)
    for ref in plot.refs:
        ax.axhline(ref.points[0][1], color=ref.color, linestyle=dashes(ref.dash), lw=1.4, label=ref.label)
    handles = []
    for kind, (_, label) in SPIKES.items():
        marks = [m for m in plot.marks if m.kind == kind]
        for m in marks:  # a loss spike's glyph above the plot, a grad-norm spike's just inside it
            ax.axvline(m.step, color=m.color, linestyle=(0, (3, 3)), lw=1, alpha=0.7)
            glyph = {"marker": MARKERS[kind], "color": m.color, "ms": 5, "clip_on": False}
            ax.plot([m.step], [1.03 if kind == "loss" else 0.96], transform=ax.get_xaxis_transform(), **glyph)
        if marks:
            handles.append(Line2D([], [], color="#555", marker=MARKERS[kind], linestyle="", label=label))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: short(v)))  # 12.5k, as on the page
    if plot.log:
        ax.set_yscale("log")
        log_axis(ax.yaxis, *ax.get_ylim())
    ax.set_xlabel("step")
    ax.set_ylabel(plot.y_label)
    ax.set_title(plot.title, fontsize=11, fontweight="bold", pad=14 if plot.marks else 6)
    ax.grid(color="#eee")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=7, framealpha=0.85)


def draw_heatmap(fig: Figure, plot: HeatPlot) -> None:
    """Rows in model order, top to bottom; a column per step (or bin of steps)."""
    ax = fig.add_subplot()
    norm = Normalize(plot.lo, plot.hi)
    cells = np.zeros((len(plot.groups), len(plot.steps), 4))
    for r, row in enumerate(plot.matrix):
        for c, v in enumerate(row):
            cells[r, c] = to_rgba("#e8e8e8") if v is None else to_rgba("#000") if math.isnan(v) else CMAP(norm(v))
    ax.imshow(cells, aspect="auto", interpolation="nearest")
    every = max(1, math.ceil(len(plot.groups) / 30))  # at most ~30 row labels
    ax.set_yticks(range(0, len(plot.groups), every), plot.groups[::every], fontsize=7)
    ticks = step_ticks(plot.steps)
    ax.set_xticks([c for _, c in ticks], [short(t) for t, _ in ticks])  # image x: column index
    ax.set_xlabel("step")
    ax.set_title(plot.title, fontsize=10, fontweight="bold")
    bar = ScalarMappable(LogNorm(10**plot.lo, 10**plot.hi), CMAP)  # the values themselves, on a log scale
    log_axis(fig.colorbar(bar, ax=ax, fraction=0.04, pad=0.02).ax.yaxis, 10**plot.lo, 10**plot.hi)


def draw_experts(fig: Figure, plot: ExpertPlot) -> None:
    """Sparse blocks top to bottom, a column per expert, coloured by its share (linear from 0)."""
    ax = fig.add_subplot()
    image = ax.imshow(np.array(plot.shares), cmap=CMAP, vmin=0, vmax=plot.hi, aspect="auto", interpolation="nearest")
    every = max(1, math.ceil(len(plot.blocks) / 30))
    ax.set_yticks(range(0, len(plot.blocks), every), plot.blocks[::every], fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.set_xlabel("expert")
    ax.set_title(f"{plot.title} (step {plot.step:g})", fontsize=10, fontweight="bold")
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}"))


def log_axis(axis: Axis, lo: float, hi: float) -> None:
    """The page's ticks on a log axis from LO to HI: decades, or 1-2-5 within a narrow range."""
    axis.set_ticks([t for t in log_ticks(math.log10(lo), math.log10(hi)) if lo <= t <= hi])
    axis.set_major_formatter(FuncFormatter(lambda v, _: short(v)))
    axis.set_minor_locator(NullLocator())


def write_pngs(charts: list[Chart], page: Path) -> list[Path]:
    """Each chart as PAGE-STEM-ID.png beside the page, at the chart's size on the page x SCALE."""
    pngs = []
    for chart in charts:
        fig = Figure(figsize=(WIDTH / 100, chart.height / 100), dpi=100 * SCALE, layout="constrained")
        draw = {LinePlot: draw_lines, HeatPlot: draw_heatmap, ExpertPlot: draw_experts}[type(chart.plot)]
        draw(fig, chart.plot)
        png = page.with_name(f"{page.stem}-{chart.id}.png")
        fig.savefig(png, facecolor="white")
        pngs.append(png)
    return pngs
