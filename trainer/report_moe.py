"""The dashboard's mixture-of-experts charts, for runs that log moe/* (trainer/moe_monitor.py).

    moe/aux_loss          a line chart, runs overlaid, a mark where a block's router collapsed
    moe/load_max/block.N  a heatmap per run: sparse block x step, log10 colour (1: balanced), drawn
                          by trainer/report.py as the per-group heatmaps are
    moe/load/block.N      a heatmap per run: sparse block x expert, each expert's share of the
                          block's token slots at the last step that logged them (linear colour from
                          0 to the largest share); with script on, trainer/report.js adds a slider
                          over the logged steps, whose shares ride beside the chart as JSON

A run without sparse blocks gets none of them, and is not said to be missing them.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any, NamedTuple

from trainer import report_svg as svg
from trainer.report_svg import VIRIDIS, WIDTH, Chart, el

SHARES = "moe/load/"
MAX_SHARES = 200_000  # shares a page carries per run for the slider; more logged steps are thinned, the last kept


class ExpertPlot(NamedTuple):
    """What an expert-load heatmap shows: shares[block][expert] at `step`, coloured from 0 to `hi`."""

    title: str
    blocks: list[str]
    step: float
    shares: list[list[float]]
    hi: float


def share_rows(run: Any) -> tuple[list[str], list[dict]]:
    """The run's sparse blocks in model order, and its rows that log every expert's share of each."""
    blocks = sorted({k[len(SHARES) :] for row in run.rows for k in row if k.startswith(SHARES)}, key=svg.group_order)
    return blocks, [row for row in run.rows if blocks and all(isinstance(row.get(SHARES + b), list) for b in blocks)]


def collapse_marks(runs: list[Any]) -> list[svg.Mark]:
    """A mark where a run's count of collapsed blocks (moe/collapsed) rose, in the run's colour."""
    marks = []
    for i, run in enumerate(runs):
        before = 0
        for row in run.rows:
            if (count := row.get("moe/collapsed")) is None:
                continue
            if count > before:
                title = f"{run.name}: expert collapse at step {row['step']:g} ({count:g} collapsed blocks)"
                marks.append(svg.Mark("collapse", row["step"], run.name, svg.color(i), title))
            before = count
    return marks


def expert_heatmap(chart_id: str, run: Any) -> Chart | None:
    """Sparse block x expert: each expert's share of its block's token slots at the last step that
    logged them, and (JSON, for the page's slider) the shares of earlier logged steps."""
    blocks, rows = share_rows(run)
    if not rows:
        return None
    n_experts = len(rows[-1][SHARES + blocks[0]])
    every = math.ceil(len(rows) * len(blocks) * n_experts / MAX_SHARES)
    rows = rows[::-1][::every][::-1]  # thinned from the end: the last logged step is always there
    matrices = [[[float(v) for v in row[SHARES + b]] for b in blocks] for row in rows]
    hi = max((v for m in matrices for shares in m for v in shares), default=0.0) or 1.0
    steps = [row["step"] for row in rows]
    plot = ExpertPlot(f"Expert load (share of token slots): {run.name}", blocks, steps[-1], matrices[-1], hi)
    chart_svg, height = heatmap_svg(chart_id, plot)
    data = {"steps": steps, "blocks": blocks, "shares": matrices, "hi": hi, "colors": VIRIDIS}
    return Chart(chart_id, chart_svg, height, plot, json.dumps(data, separators=(",", ":")))


def heatmap_svg(chart_id: str, plot: ExpertPlot) -> tuple[str, int]:
    """The heatmap's SVG and height: a row per block, a cell per expert (data-value: its share)."""
    n_experts = len(plot.shares[0])
    left, top, width = 100, 52, WIDTH - 100 - 80
    row_h, cell_w = max(3.0, min(20.0, 480 / len(plot.blocks))), width / n_experts
    parts = [el("text", f"step {plot.step:g}", x=left, y=40, class_="expert-step")]
    for r, (block, shares) in enumerate(zip(plot.blocks, plot.shares, strict=True)):
        y, cells = round(top + r * row_h, 2), []
        if row_h >= 11 or r % math.ceil(11 / row_h) == 0:
            cells.append(el("text", html.escape(block), x=left - 4, y=round(y + row_h / 2 + 4, 2), text_anchor="end"))
        for e, share in enumerate(shares):
            cells.append(
                el(
                    "rect",
                    el("title", f"{html.escape(block)} expert {e}: {share:.2%}"),
                    x=round(left + e * cell_w, 2),
                    y=y,
                    width=round(cell_w + 0.3, 2),
                    height=round(row_h + 0.3, 2),
                    fill=svg.viridis(share / plot.hi),
                    data_expert=e,
                    data_value=share,
                )
            )
        parts.append(el("g", "".join(cells), class_="hm-row", data_group=block))
    bottom = top + len(plot.blocks) * row_h
    ticks = range(n_experts) if n_experts <= 16 else [int(t) for t in svg.linear_ticks(0, n_experts - 1, 8)]
    for e in ticks:
        parts.append(el("text", e, x=round(left + (e + 0.5) * cell_w, 1), y=bottom + 14, text_anchor="middle"))
    parts.append(el("text", "expert", x=left + width / 2, y=bottom + 30, text_anchor="middle"))
    bar_x, bar_h = left + width + 14, max(bottom - top, 60)  # the colour bar, 0 at the bottom
    stops = "".join(el("stop", offset=i / (len(VIRIDIS) - 1), stop_color=c) for i, c in enumerate(reversed(VIRIDIS)))
    parts.append(
        el("defs", el("linearGradient", stops, id=f"{chart_id}-bar", x1=0, x2=0, y1=0, y2=1))
        + el("rect", x=bar_x, y=top, width=12, height=bar_h, fill=f"url(#{chart_id}-bar)")
    )
    for t in svg.linear_ticks(0, plot.hi, 4):
        y = round(top + (1 - t / plot.hi) * bar_h + 4, 1)
        parts.append(el("text", f"{t:.0%}" if plot.hi > 0.05 else f"{t:.1%}", x=bar_x + 16, y=y))
    balanced = 1 / n_experts  # every expert's share under perfectly balanced routing
    if balanced <= plot.hi:
        y = round(top + (1 - balanced / plot.hi) * bar_h, 1)
        parts.append(el("line", x1=bar_x - 2, x2=bar_x + 14, y1=y, y2=y, stroke="#d62728", stroke_width=2))
        caption = max(bottom, top + bar_h) + 18
        parts.append(el("text", "red: 1/E, balanced", x=WIDTH - 8, y=caption, text_anchor="end", fill="#d62728"))
    height = int(max(bottom, top + bar_h) + 40)
    return svg.svg_chart(chart_id, "expert-heatmap", plot.title, parts, height, data_rows=len(plot.blocks)), height
