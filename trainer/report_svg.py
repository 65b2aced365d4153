"""The dashboard's charts as inline SVG, drawn with string formatting (no plotting library).

`line_chart` draws lines over step (log or linear y), horizontal reference lines and marks at
chosen steps; `heatmap` draws rows x steps, coloured by log10 of the value, with a colour bar.
Every chart is WIDTH wide and carries an id and a `data-chart` attribute; `el` writes one element.
A chart keeps what it shows (`plot`, which trainer/report_png.py draws with matplotlib); a line
chart also keeps it as JSON (`data`), which `figure` puts beside the SVG for trainer/report.js to
redraw it zoomed, smoothed and with a hover cursor. The static SVG is what a page without script shows.
"""

from __future__ import annotations

import bisect
import html
import json
import math
import re
from typing import NamedTuple

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"]
WIDTH, PLOT_HEIGHT, LEFT = 640, 220, 64  # every chart's width; a line chart's plot height, left margin
MAX_POINTS = 2000  # a longer line is thinned, keeping the extremes
MAX_DATA_POINTS = 10_000  # the same for the JSON the page's script zooms into
# mark kind: glyph, legend (collapse: a sparse block's router collapsed, trainer/report_moe.py)
SPIKES = {"loss": ("▼", "loss spike"), "grad_norm": ("◆", "grad-norm spike"), "collapse": ("●", "expert collapse")}


def color(i: int) -> str:
    """The colour of the i-th run."""
    return COLORS[i % len(COLORS)]


class Mark(NamedTuple):
    """A vertical mark at a step (a spike event) in its run's colour; hovering shows `title`."""

    kind: str  # a key of SPIKES
    step: float
    run: str
    color: str
    title: str


class Line(NamedTuple):
    label: str
    color: str
    points: list[tuple[float, float]]  # (step, value); a horizontal reference line has one point
    dash: str = ""
    dots: bool = False


class LinePlot(NamedTuple):
    """What a line chart shows."""

    title: str
    y_label: str
    lines: list[Line]
    log: bool = False
    refs: list[Line] = ()  # horizontal lines at their one point's value
    marks: list[Mark] = ()


class HeatPlot(NamedTuple):
    """What a heatmap shows: matrix[group][column], log10 values (None: not logged, NaN: inf / NaN)."""

    title: str
    groups: list[str]
    steps: list[float]  # the step each column starts at
    matrix: list[list[float | None]]
    lo: float  # the colour scale, log10
    hi: float


class Chart(NamedTuple):
    id: str
    svg: str
    height: int  # the width is WIDTH
    plot: LinePlot | HeatPlot
    data: str = ""  # a line chart's JSON for the page's script


def el(name: str, body: object = "", **attrs: object) -> str:
    """An SVG / HTML element; in attribute names `_` becomes `-`, a trailing one goes (class_)."""
    text = "".join(f' {k.rstrip("_").replace("_", "-")}="{html.escape(str(v))}"' for k, v in attrs.items())
    return f"<{name}{text}>{body}</{name}>"


def short(v: float) -> str:
    """A number in a few characters: 0.25, 3e-05, 12.5k, 1.2M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if abs(v) >= scale:
            return f"{v / (1e3 if suffix == 'k' else scale):.3g}{suffix}"
    return f"{v:.0e}" if 0 < abs(v) < 1e-3 else f"{v:.4g}"


def linear_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    magnitude = 10 ** math.floor(math.log10((hi - lo) / count))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= (hi - lo) / count)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks between 10**lo and 10**hi: decades, or 1-2-5 steps within a narrow range."""
    decades = list(range(math.ceil(lo), math.floor(hi) + 1))
    if len(decades) >= 3:
        return [10.0**d for d in decades[:: math.ceil(len(decades) / 6)]]
    nice = [m * 10.0**d for d in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)]
    ticks = [t for t in nice if lo <= math.log10(t) <= hi]
    return ticks if len(ticks) >= 2 else linear_ticks(10**lo, 10**hi, 6)


def padded(lo: float, hi: float, fraction: float = 0.05) -> tuple[float, float]:
    pad = (hi - lo) * fraction if hi - lo > 1e-12 * max(1.0, abs(hi)) else 0.1 * abs(hi) or 0.5
    return lo - pad, hi + pad


class Frame(NamedTuple):
    """Data ranges (y in log10 on a log axis) mapped onto a line chart's plot rectangle."""

    x0: float
    x1: float
    y0: float
    y1: float
    log: bool
    top: int
    width: int = WIDTH - LEFT - 16
    height: int = PLOT_HEIGHT

    def x(self, v: float) -> float:
        return round(LEFT + (v - self.x0) / (self.x1 - self.x0) * self.width, 1)

    def y(self, v: float) -> float:
        v = math.log10(v) if self.log else v
        return round(self.top + (self.y1 - v) / (self.y1 - self.y0) * self.height, 1)

    def shows(self, v: float) -> bool:
        return math.isfinite(v) and (v > 0 or not self.log)


def ticks_svg(f: Frame) -> str:
    """Grid lines and tick labels of both axes."""
    bottom, parts = f.top + f.height, []
    for t in [t for t in linear_ticks(f.x0, f.x1, 6) if float(t).is_integer()]:  # steps are whole
        parts += [
            el("line", x1=f.x(t), x2=f.x(t), y1=f.top, y2=bottom, stroke="#eee"),
            el("text", short(t), x=f.x(t), y=bottom + 14, text_anchor="middle"),
        ]
    for t in log_ticks(f.y0, f.y1) if f.log else linear_ticks(f.y0, f.y1):
        parts += [
            el("line", x1=LEFT, x2=LEFT + f.width, y1=f.y(t), y2=f.y(t), stroke="#eee"),
            el("text", short(t), x=LEFT - 5, y=f.y(t) + 4, text_anchor="end"),
        ]
    return "".join(parts)


def frame_svg(f: Frame, y_label: str) -> str:
    """The plot's border and the axis labels."""
    return "".join(
        [
            el("rect", x=LEFT, y=f.top, width=f.width, height=f.height, fill="none", stroke="#999"),
            el("text", "step", x=LEFT + f.width / 2, y=f.top + f.height + 30, text_anchor="middle"),
            el("text", y_label, transform=f"translate(14 {f.top + f.height / 2}) rotate(-90)", text_anchor="middle"),
        ]
    )


def legend_svg(entries: list[tuple[str, str, str]], top: int) -> tuple[str, int]:
    """Entries (label, colour, dash pattern or a glyph) in rows under the title; and their height."""
    parts, x, y = [], LEFT, top
    for label, color, style in entries:
        width = 34 + 6.5 * len(label)
        if x + width > WIDTH - 10 and x > LEFT:
            x, y = LEFT, y + 16
        if style in [glyph for glyph, _ in SPIKES.values()]:
            parts.append(el("text", style, x=x + 11, y=y + 4, fill=color, text_anchor="middle"))
        else:
            parts.append(el("line", x1=x, x2=x + 22, y1=y, y2=y, stroke=color, stroke_width=2, stroke_dasharray=style))
        parts.append(el("text", html.escape(label), x=x + 27, y=y + 4, class_="legend", data_series=label))
        x += width
    return "".join(parts), (y - top + 16 if entries else 0)


def thinned(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most ~LIMIT points: each bucket keeps its lowest and highest, so spikes stay."""
    if len(points) <= limit:
        return points
    size, out = math.ceil(len(points) / (limit // 2)), []
    for i in range(0, len(points), size):
        bucket = [p for p in points[i : i + size] if math.isfinite(p[1])]
        if len(bucket) < len(points[i : i + size]):
            out.append((points[i][0], math.nan))  # a non-finite value: keep the gap
        if bucket:
            out.extend(sorted({min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])}))
    return out


def path_d(f: Frame, points: list[tuple[float, float]]) -> str:
    """An SVG path through the points; a value the axis cannot show breaks the line."""
    d, pen_down = [], False
    for x, y in points:
        if f.shows(y):
            d.append(f"{'L' if pen_down else 'M'}{f.x(x)},{f.y(y)}")
        pen_down = f.shows(y)
    return "".join(d)


def figure(chart: Chart) -> str:
    """The chart in a <figure>, a line chart's data beside it (`</` escaped: it cannot end the script)."""
    data = el("script", chart.data.replace("</", "<\\/"), type="application/json", data_for=chart.id)
    return el("figure", chart.svg + (data if chart.data else ""))


def json_value(v: float) -> float | str:
    """A value for JSON: 6 significant digits, or "nan" / "inf" / "-inf"."""
    return float(f"{v:.6g}") if math.isfinite(v) else str(v)


def line_data(line: Line) -> dict:
    """A line for the page's script: x and y as lists, NaN / inf as strings."""
    points = thinned(line.points, MAX_DATA_POINTS)
    return {
        "label": line.label,
        "color": line.color,
        "dash": line.dash,
        "dots": line.dots or len(line.points) < 3,
        "smooth": not line.dots and len(line.points) >= 3,  # sparse evaluations are drawn as logged
        "x": [x for x, _ in points],
        "y": [json_value(y) for _, y in points],
    }


def chart_data(plot: LinePlot, f: Frame) -> str:
    """The line chart as JSON: the plot rectangle, its full step range, lines, references and marks."""
    data = {
        "frame": {"left": LEFT, "top": f.top, "width": f.width, "height": f.height, "x0": f.x0, "x1": f.x1},
        "log": plot.log,
        "lines": [line_data(line) for line in plot.lines],
        "refs": [{"label": r.label, "color": r.color, "dash": r.dash, "y": r.points[0][1]} for r in plot.refs],
        "marks": [
            {"kind": m.kind, "label": SPIKES[m.kind][1], "glyph": SPIKES[m.kind][0], "step": m.step}
            | {"color": m.color, "title": m.title}
            for m in plot.marks
        ],
    }
    return json.dumps(data, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def svg_chart(chart_id: str, kind: str, title: str, parts: list[str], height: int, **attrs: object) -> str:
    """The <svg> of a chart: its id, data-chart=KIND, a white background, the title, PARTS."""
    heading = el("text", html.escape(title), x=WIDTH / 2, y=20, text_anchor="middle", font_size=14, font_weight=600)
    body = el("rect", width="100%", height="100%", fill="#fff") + el(
        "g", heading + "".join(parts), font_family="system-ui, sans-serif", font_size=11, fill="#333"
    )
    svg = el(
        "svg",
        body,
        id=chart_id,
        data_chart=kind,
        **attrs,
        width=WIDTH,
        height=height,
        viewBox=f"0 0 {WIDTH} {height}",
        xmlns="http://www.w3.org/2000/svg",
    )
    return svg


def line_chart(
    kind: str,
    title: str,
    lines: list[Line],
    y_label: str,
    *,
    log: bool = False,
    refs: list[Line] = (),
    marks: list[Mark] = (),
) -> Chart | None:
    """Lines over step, horizontal reference lines and spike marks; None without lines. What lies in
    the plot rectangle is one <g class="plot">, which the page's script redraws."""
    if not lines:
        return None
    values = [y for line in (*lines, *refs) for _, y in line.points if math.isfinite(y) and (y > 0 or not log)]
    values = values or [1.0]  # only NaN / inf: an axis for their marks
    steps = [x for line in lines for x, _ in line.points]
    entries = [(line.label, line.color, line.dash) for line in (*lines, *refs)]
    entries += [(label, "#555", glyph) for key, (glyph, label) in SPIKES.items() if any(m.kind == key for m in marks)]
    legend, legend_height = legend_svg(entries, 38)
    lo, hi = (math.log10(min(values)), math.log10(max(values))) if log else (min(values), max(values))
    f = Frame(*padded(min(steps), max(steps), 0.02), *padded(lo, hi), log, top=50 + legend_height)
    parts = [ticks_svg(f)]
    across = [r._replace(points=[(f.x0, r.points[0][1]), (f.x1, r.points[0][1])]) for r in refs]
    for line in (*across, *[line._replace(dots=line.dots or len(line.points) < 3) for line in lines]):
        label = html.escape(line.label)
        items = [
            el(
                "path",
                el("title", label),
                d=path_d(f, thinned(line.points)),
                fill="none",
                stroke=line.color,
                stroke_width=1.6,
                stroke_dasharray=line.dash,
            )
        ]
        for x, y in line.points:
            tip = el("title", f"{label} step {x:g}: {y:.4g}")
            if line.dots and f.shows(y):  # a line of one or two points gets dots too
                items.append(el("circle", tip, cx=f.x(x), cy=f.y(y), r=2.5, fill=line.color))
            elif not math.isfinite(y):  # NaN / inf logged: a red cross at the bottom
                items.append(el("text", "×" + tip, x=f.x(x), y=f.top + f.height - 4, fill="#c00", text_anchor="middle"))
        parts.append(el("g", "".join(items), data_series=line.label))
    for m in marks:  # a loss spike's glyph above the plot, a grad-norm spike's just inside it
        x, y = f.x(m.step), f.top - 3 if m.kind == "loss" else f.top + 10
        items = [
            el("line", x1=x, x2=x, y1=f.top, y2=f.top + f.height, stroke=m.color, stroke_dasharray="3,3", opacity=0.7),
            el("text", SPIKES[m.kind][0], x=x, y=y, fill=m.color, text_anchor="middle"),
            el("title", html.escape(m.title)),
        ]
        parts.append(el("g", "".join(items), class_="spike", data_kind=m.kind, data_step=f"{m.step:g}", data_run=m.run))
    plot, height = LinePlot(title, y_label, lines, log, list(refs), list(marks)), f.top + f.height + 40
    chart_svg = svg_chart(
        kind, kind, title, [el("g", "".join(parts), class_="plot"), frame_svg(f, y_label), legend], height
    )
    return Chart(kind, chart_svg, height, plot, chart_data(plot, f))


def group_order(name: str) -> tuple:
    """Model order: embed, block.0.attn, block.0.mlp, block.0.norm, block.1.attn, ..., head (a whole
    block, block.N, before its parts)."""
    if match := re.fullmatch(r"block\.(\d+)(?:\.(.+))?", name):
        part = match[2] or ""
        return (1, int(match[1]), {"": -1, "attn": 0, "mlp": 1, "norm": 2}.get(part, 3), part)
    return {"embed": (0,), "head": (3,)}.get(name, (2, name))


def viridis(t: float) -> str:
    """The viridis colour at t in [0, 1] (linear between the stops)."""
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    a, b = bytes.fromhex(VIRIDIS[i][1:]), bytes.fromhex(VIRIDIS[i + 1][1:])
    return "#" + "".join(f"{round(ca + (cb - ca) * (t - i)):02x}" for ca, cb in zip(a, b, strict=True))


def step_ticks(steps: list[float]) -> list[tuple[float, float]]:
    """A heatmap's step ticks as (step, column): the column is fractional, how far into it the step lies."""
    ticks = []
    for t in linear_ticks(*padded(steps[0], steps[-1], 0), 5) if len(steps) > 1 else steps:
        c = max(0, bisect.bisect_right(steps, t) - 1)
        ticks.append((t, c + ((t - steps[c]) / (steps[c + 1] - steps[c]) if c + 1 < len(steps) else 0)))
    return ticks


def heatmap(
    chart_id: str,
    kind: str,
    title: str,
    groups: list[str],
    steps: list[float],
    matrix: list[list[float | None]],
    lo: float,
    hi: float,
    **attrs: object,
) -> Chart:
    """Groups x steps, colour = log10 value (matrix[group][column]; None: not logged, NaN: inf or NaN)
    on the scale [lo, hi]; a column per step, labelled by the step it starts at."""
    left, top, width, row_h = 100, 34, WIDTH - 100 - 70, max(3.0, min(16.0, 480 / len(groups)))
    lo, hi = (lo, hi) if hi - lo > 0.1 else (lo - 0.5, hi + 0.5)  # at least a decade of colour
    cell_w, tips = width / len(steps), len(steps) * len(groups) <= 6000  # hover text, unless too heavy
    parts, labelled, previous = [], -math.inf, None
    for r, (group, cells) in enumerate(zip(groups, matrix, strict=True)):
        y, block, row = round(top + r * row_h, 2), group_order(group)[:2], []
        if y - labelled >= 11 and (row_h >= 11 or block != previous):  # thin rows: label where a block starts
            row.append(el("text", html.escape(group), x=left - 4, y=y + row_h / 2 + 4, text_anchor="end"))
            labelled = y
        previous = block
        for c, v in enumerate(cells):  # grey: not logged, black: inf / NaN
            fill = "#e8e8e8" if v is None else "#000" if math.isnan(v) else viridis((v - lo) / (hi - lo))
            value = "-" if v is None else f"{10**v:.3g}"
            tip = el("title", f"{html.escape(group)} step {steps[c]:g}: {value}") if tips else ""
            row.append(
                el(
                    "rect",
                    tip,
                    x=round(left + c * cell_w, 2),
                    y=y,
                    width=round(cell_w + 0.3, 2),
                    height=round(row_h + 0.3, 2),
                    fill=fill,
                )
            )
        parts.append(el("g", "".join(row), class_="hm-row", data_group=group))
    bottom = top + len(groups) * row_h
    for t, c in step_ticks(steps):
        parts.append(el("text", short(t), x=round(left + (c + 0.5) * cell_w, 1), y=bottom + 14, text_anchor="middle"))
    parts.append(el("text", "step", x=left + width / 2, y=bottom + 30, text_anchor="middle"))
    bar_x, bar_h = left + width + 14, max(bottom - top, 60)  # the colour bar: hi at the top
    stops = "".join(el("stop", offset=i / (len(VIRIDIS) - 1), stop_color=c) for i, c in enumerate(reversed(VIRIDIS)))
    parts.append(
        el("defs", el("linearGradient", stops, id=f"{chart_id}-bar", x1=0, x2=0, y1=0, y2=1))
        + el("rect", x=bar_x, y=top, width=12, height=bar_h, fill=f"url(#{chart_id}-bar)")
    )
    parts += [
        el("text", short(t), x=bar_x + 16, y=round(top + (hi - math.log10(t)) / (hi - lo) * bar_h + 4, 1))
        for t in log_ticks(lo, hi)
    ]
    height = int(max(bottom, top + bar_h) + 40)
    chart_svg = svg_chart(chart_id, kind, title, parts, height, data_rows=len(groups), **attrs)
    return Chart(chart_id, chart_svg, height, HeatPlot(title, groups, steps, matrix, lo, hi))
