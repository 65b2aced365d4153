"""A dashboard of one or several runs, as one self-contained HTML page.

    python -m trainer.report RUN_DIR [RUN_DIR ...] [--out PATH.html] [--png] [--refresh N]

Reads each run's metrics.jsonl (of a run in progress too: a torn last line is skipped) and the
clip threshold `optim.clip_grad_norm` from its `.hydra/config.yaml`. The page (default
RUN_DIR/report.html for one run, ./report.html for several) holds a summary table and charts
drawn as inline SVG by trainer/report_svg.py, runs overlaid: loss and val loss with spike
markers; the global grad norm (log) with the clip threshold; per-group gradient norms and
update ratios as heatmaps (group x step, log10 colour), one per run; tokens/s, MFU and step
time; the gradient noise scale against the batch and the sharpness against 2 / lr (when the run
switched diagnostics.* on); for a mixture of experts (trainer/report_moe.py) the load-balancing
loss with a mark where a router collapsed, each sparse block's busiest-expert load (block x step)
and the expert load (block x expert) of the last logged step, with a slider over the earlier ones.
Nothing is fetched; a chart no run has data for is left out. With
script on, trainer/report.js (inlined) redraws the line charts: a hover cursor with every
line's value, drag to zoom (double-click resets), EMA smoothing. --png also writes each chart as
a PNG next to the page, drawn by matplotlib (trainer/report_png.py). --refresh N adds a meta
refresh and rewrites the page every N seconds until every run has finished (checkpoints/final
exists) or Ctrl-C.
Errors: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import string
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import yaml

from trainer import report_svg as svg
from trainer.report_moe import collapse_marks, expert_heatmap
from trainer.report_svg import Chart, Line, Mark, el

TEMPLATE = Path(__file__).with_name("report_template.html")  # the page and its CSS
SCRIPT = Path(__file__).with_name("report.js")  # the line charts' hover, zoom and smoothing
MAX_COLUMNS = 200  # a heatmap of more logged steps bins them (max per bin)


class ReportError(Exception):
    """The report cannot be made (its message is one line for the user)."""


class Run(NamedTuple):
    name: str
    rows: list[dict]  # the last row logged for each step, in step order
    spikes: list[dict]  # every row that flags a spike, even one whose step was logged again
    clip: float | None  # optim.clip_grad_norm; None without .hydra/config.yaml
    finished: bool
    updated: float  # mtime of metrics.jsonl

    def points(self, keys: str) -> list[tuple[float, float]]:
        """(step, value) of the first of KEYS ("a|b") that the run logs."""
        for key in keys.split("|"):
            if found := [(row["step"], v) for row in self.rows if (v := number(row.get(key))) is not None]:
                return found
        return []

    def last(self, keys: str) -> float | None:
        return found[-1][1] if (found := self.points(keys)) else None


def number(value: object) -> float | None:
    """A metric value as a float ("nan" / "inf" strings included); None when it is no number."""
    special = isinstance(value, str) and value.lower().lstrip("+-") in ("nan", "inf", "infinity")
    return float(value) if isinstance(value, int | float) or special else None


def load_run(path: Path, name: str) -> Run:
    """RUN_DIR's metrics (unreadable lines skipped; a step logged again replaces the earlier row)."""
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise ReportError(f"{path} {'is not a directory' if path.exists() else 'does not exist'}")
    if not metrics.is_file():
        raise ReportError(f"{metrics} does not exist: is {path} a run directory?")
    by_step, spikes = {}, []
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line being written, or a torn one
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int | float):
            by_step[row["step"]] = row  # a resumed or rolled-back run logs steps again
            if 1 in (number(row.get("spike/loss")), number(row.get("spike/grad_norm"))):
                spikes.append(row)
    try:
        config = yaml.safe_load((path / ".hydra" / "config.yaml").read_text())
        clip = float(config["optim"]["clip_grad_norm"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        clip = None
    rows = [by_step[step] for step in sorted(by_step)]
    finished = (path / "checkpoints" / "final").is_dir()
    return Run(name, rows, spikes, clip, finished, metrics.stat().st_mtime)


def load_runs(paths: list[Path]) -> list[Run]:
    """The runs, named by their directory (with its parent when two names collide)."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    return [load_run(p, n) for p, n in zip(paths, names, strict=True)]


def group_matrix(run: Run, prefix: str) -> tuple[list[str], list[float], list[list[float | None]]]:
    """Groups in model order, column steps, and log10 of the values (NaN: inf, NaN or <= 0; None:
    not logged). Over MAX_COLUMNS logged steps, a column is the max over a bin of them."""
    groups = sorted({k[len(prefix) :] for row in run.rows for k in row if k.startswith(prefix)}, key=svg.group_order)
    rows = [row for row in run.rows if any(prefix + g in row for g in groups)]
    size = max(1, math.ceil(len(rows) / MAX_COLUMNS))
    bins = [rows[i : i + size] for i in range(0, len(rows), size)]
    matrix = []
    for g in groups:
        values = [[v for row in b if (v := number(row.get(prefix + g))) is not None] for b in bins]
        matrix.append(
            [
                None if not vs else math.nan if any(not 0 < v < math.inf for v in vs) else math.log10(max(vs))
                for vs in values
            ]
        )
    return groups, [b[0]["step"] for b in bins], matrix


def run_heatmap(chart_id: str, kind: str, title: str, run: Run, prefix: str, lo: float, hi: float) -> Chart | None:
    """The heatmap of one run's PREFIX<group> metrics, on the colour scale [lo, hi] (log10)."""
    groups, steps, matrix = group_matrix(run, prefix)
    if not groups:
        return None
    per_column = math.ceil(len(run.rows) / len(steps))
    title = f"{title}: {run.name}" + (f" (each column: max of {per_column} logs)" if per_column > 1 else "")
    return svg.heatmap(chart_id, kind, title, groups, steps, matrix, lo, hi, data_run=run.name)


def log_range(runs: list[Run], prefix: str) -> tuple[float, float]:
    values = [
        math.log10(v)
        for run in runs
        for row in run.rows
        for k, raw in row.items()
        if k.startswith(prefix) and (v := number(raw)) is not None and 0 < v < math.inf
    ]
    return (min(values), max(values)) if values else (0.0, 1.0)


def spike_marks(runs: list[Run], kinds: tuple[str, ...]) -> list[Mark]:
    """A mark for each spike event of these kinds ("loss", "grad_norm"), in its run's colour."""
    marks = []
    for i, run in enumerate(runs):
        for row, kind in ((row, k) for row in run.spikes for k in kinds if number(row.get(f"spike/{k}")) == 1):
            details = [
                f"{name} {v:.3g}"
                for name in ("z", "baseline")
                if (v := number(row.get(f"spike/{kind}_{name}"))) is not None
            ]
            details += [f"action {row['spike/action']}"] if "spike/action" in row else []
            title = f"{run.name}: {svg.SPIKES[kind][1]} at step {row['step']:g} ({', '.join(details)})"
            marks.append(Mark(kind, row["step"], run.name, svg.color(i), title))
    return marks


def make_charts(runs: list[Run]) -> tuple[list[Chart], list[str]]:
    """The page's charts, and the metrics of those that no run has data for."""
    several = len(runs) > 1

    def lines(keys: str, label: str, dash: str = "", dots: bool = False, color: str = "") -> list[Line]:
        """A line per run that logs KEYS ("a|b": the first it logs), in the run's colour."""
        return [
            Line(f"{run.name} {label}" if several else label, color or svg.color(i), run.points(keys), dash, dots)
            for i, run in enumerate(runs)
            if run.points(keys)
        ]

    clips = {run.clip for run in runs if run.clip}  # one line when all runs clip alike
    refs = [Line(f"clip {c:g}", "#777", [(0, c)], "6,4") for c in clips]
    if len(clips) > 1:
        refs = [
            Line(f"{r.name} clip {r.clip:g}", svg.color(i), [(0, r.clip)], "6,4") for i, r in enumerate(runs) if r.clip
        ]
    losses = lines("loss", "loss") + lines("val_loss", "val loss", "5,3", dots=True)
    norms = lines("grad_norm", "grad norm") + lines("grad_norm_clipped", "clipped", "2,2")
    wanted = {
        "loss": [svg.line_chart("loss", "Loss", losses, "loss", marks=spike_marks(runs, ("loss", "grad_norm")))],
        "grad_norm": [
            svg.line_chart(
                "grad-norm",
                "Global gradient norm (before clipping)",
                norms,
                "norm",
                log=True,
                refs=refs,
                marks=spike_marks(runs, ("grad_norm",)),
            )
        ],
    }
    for prefix, kind, title in (
        ("grad_norm/", "grad-heatmap", "Gradient norm per group"),
        ("update_ratio/", "update-heatmap", "Update ratio per group"),
    ):
        lo, hi = log_range(runs, prefix)  # one colour scale for all runs
        wanted[prefix + "<group>"] = [
            run_heatmap(f"{kind}-{i}", kind, title, run, prefix, lo, hi) for i, run in enumerate(runs)
        ]
    tokens = lines("throughput/tokens_per_s|tokens_per_s", "tokens/s")
    wanted["tokens_per_s"] = [svg.line_chart("throughput", "Throughput", tokens, "tokens / s")]
    mfu = lines("throughput/mfu", "MFU")
    wanted["throughput/mfu"] = [svg.line_chart("mfu", "Model FLOPs utilisation", mfu, "MFU")]
    times = []  # several runs: a colour per run, a dash per part; one run: a colour per part
    for j, (part, dash) in enumerate([("step", ""), ("data", "2,2"), ("compute", "6,3"), ("optimizer", "1,3")]):
        key, color = f"throughput/{part}_time_s", "" if several else svg.color(j)
        times += lines(key, part, dash if several else "", color=color)
    wanted["throughput/step_time_s"] = [svg.line_chart("step-time", "Time per step", times, "seconds")]
    # The instruments (diagnostics.*): B_simple against the batch actually used (above it, a larger
    # batch still pays; far below, it wastes compute), and λmax against the edge of stability 2 / lr.
    noise = lines("noise_scale/b_simple", "B_simple") + lines("noise_scale/global_batch_tokens", "batch", "6,4")
    wanted["noise_scale/b_simple"] = [
        svg.line_chart("noise-scale", "Gradient noise scale (tokens)", noise, "tokens", log=True)
    ]
    sharp = lines("sharpness/lambda_max", "λmax", dots=True) + lines("sharpness/two_over_lr", "2 / lr", "6,4")
    wanted["sharpness/lambda_max"] = [
        svg.line_chart("sharpness", "Sharpness (top Hessian eigenvalue)", sharp, "λ", log=True)
    ]
    # Mixture of experts (trainer/report_moe.py): the load-balancing loss with a mark where a router
    # collapsed, and each run's expert load at its last logged step (a slider over the earlier ones).
    aux = lines("moe/aux_loss", "aux loss")
    marks = collapse_marks(runs)
    wanted["moe/aux_loss"] = [svg.line_chart("moe-aux-loss", "Load-balancing loss", aux, "aux loss", marks=marks)]
    lo, hi = 0.0, max(log_range(runs, "moe/load_max/")[1], math.log10(2))  # from balanced; 2x the mean or more
    title = "Busiest expert's load over the mean, per sparse block"
    wanted["moe/load_max/<block>"] = [
        run_heatmap(f"moe-load-heatmap-{i}", "moe-load-heatmap", title, run, "moe/load_max/", lo, hi)
        for i, run in enumerate(runs)
    ]
    wanted["moe/load/<block>"] = [expert_heatmap(f"expert-heatmap-{i}", run) for i, run in enumerate(runs)]
    wanted |= eval_charts(runs, lines)  # eval.*: a chart per task, one for eval.files
    optional = ("noise_scale/", "sharpness/", "moe/")  # what a run switches on: not "missing" when off
    missing = [key for key, made in wanted.items() if not any(made) and not key.startswith(optional)]
    return [c for made in wanted.values() for c in made if c], missing


def eval_charts(runs: list[Run], lines: Callable[..., list[Line]]) -> dict[str, list[Chart | None]]:
    """Downstream evaluation (eval.*): a chart per task with its metrics (a log axis where they span
    more than 100x: perplexities beside bits per byte), and one for the held-out files' perplexities
    (eval/ppl/<file>). One run: a colour per metric; several: a colour per run, a dash per metric."""
    several = len(runs) > 1
    charts = {}
    for task, metrics in eval_metrics(runs).items():
        values = [v for run in runs for m in metrics for _, v in run.points(f"eval/{task}/{m}") if math.isfinite(v)]
        log_axis = bool(values) and min(values) > 0 and max(values) > 100 * min(values)
        title = "Held-out perplexity (eval.files)" if task == "ppl" else f"Downstream: {task}"
        drawn = []
        for j, metric in enumerate(metrics):
            dash = ("", "6,3", "2,2", "1,3")[j % 4] if several else ""
            drawn += lines(f"eval/{task}/{metric}", metric, dash, dots=True, color="" if several else svg.color(j))
        kind = "eval-" + re.sub(r"[^A-Za-z0-9_-]", "-", task)
        charts[f"eval/{task}/<metric>"] = [svg.line_chart(kind, title, drawn, "score", log=log_axis)]
    return charts


def eval_metrics(runs: list[Run]) -> dict[str, list[str]]:
    """{task: its metrics} of the eval/<task>/<metric> keys any run logs (their stderr and eval/time_s aside)."""
    found: dict[str, list[str]] = {}
    for run in runs:
        for row in run.rows:
            for key in row:
                if key.startswith("eval/") and key.count("/") >= 2 and not key.endswith("_stderr"):
                    task, _, metric = key[5:].rpartition("/")
                    if metric not in found.setdefault(task, []):
                        found[task].append(metric)
    return found


def summary(runs: list[Run]) -> str:
    """The table of runs; each cell holds its exact value in data-value."""
    head = [
        "run",
        "status",
        "steps",
        "tokens",
        "last loss",
        "best val loss",
        "spikes",
        "skipped steps",
        "tokens/s",
        "peak memory GB",
        "clip",
    ]
    rows = []
    for i, run in enumerate(runs):
        best = min(((y, x) for x, y in run.points("val_loss") if math.isfinite(y)), default=(None, None))
        spikes, loss = run.last("spike/count"), run.last("loss")
        values = [
            run.name,
            "finished" if run.finished else "running",
            run.rows[-1]["step"] if run.rows else None,
            run.last("tokens"),
            loss,
            best[0],
            len(run.spikes) if spikes is None else spikes,
            run.last("skipped_steps"),
            run.last("throughput/tokens_per_s|tokens_per_s"),
            max((v for _, v in run.points("memory/peak_gb")), default=None),
            run.clip,
        ]
        texts = {
            "run": f'<span style="color:{svg.color(i)}">■</span> {html.escape(run.name)}',
            "status": "finished" if run.finished else f"not finished (written {time.time() - run.updated:.0f} s ago)",
            "last loss": loss is not None and f"{loss:.4f}",
            "best val loss": best[0] is not None and f"{best[0]:.4f} @ {best[1]:g}",
            "clip": run.clip == 0 and "off",
        }
        cells = "".join(
            el("td", texts.get(key) or cell(value), data_key=key, data_value=value)
            for key, value in zip(head, values, strict=True)
        )
        rows.append(el("tr", cells, data_run=run.name))
    header = el("thead", el("tr", "".join(el("th", h) for h in head)))
    return el("table", header + el("tbody", "".join(rows)), id="summary")


def cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if float(value).is_integer() else svg.short(value)


def render(runs: list[Run], refresh: float = 0) -> tuple[str, list[Chart]]:
    """The page's HTML, and its charts."""
    charts, missing = make_charts(runs)
    names = ", ".join(run.name for run in runs)
    page = string.Template(TEMPLATE.read_text()).substitute(
        title=html.escape(f"report: {names}"),
        refresh=f'<meta http-equiv="refresh" content="{refresh:g}">' if refresh else "",
        header=html.escape(f"{names}: {datetime.now():%Y-%m-%d %H:%M:%S}")
        + (f", rewritten every {refresh:g} s" if refresh else ""),
        summary=summary(runs),
        charts="\n".join(svg.figure(chart) for chart in charts),
        missing=el("p", html.escape("no data for: " + ", ".join(missing)), class_="nodata") if missing else "",
        script=SCRIPT.read_text(),
    )
    return page, charts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.report", description="metrics.jsonl as an HTML dashboard")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, help="the page (default RUN_DIR/report.html; ./report.html for several)")
    parser.add_argument("--png", action="store_true", help="also write each chart as a PNG beside the page")
    parser.add_argument(
        "--refresh", type=float, default=0, metavar="N", help="rewrite the page every N s until the runs finish"
    )
    args = parser.parse_args(argv)
    out = args.out or (args.run_dirs[0] / "report.html" if len(args.run_dirs) == 1 else Path("report.html"))
    charts, pngs = [], []
    try:
        while True:
            runs = load_runs(args.run_dirs)
            live = args.refresh > 0 and not all(run.finished for run in runs)
            page, charts = render(runs, args.refresh if live else 0)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_name(out.name + ".tmp").write_text(page)
            out.with_name(out.name + ".tmp").replace(out)  # a refreshing browser never reads half a page
            if args.png:
                from trainer.report_png import write_pngs  # matplotlib: imported only when asked for

                pngs = write_pngs(charts, out)
            if not live:
                break
            time.sleep(args.refresh)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    print(f"report: {out} ({len(charts)} charts" + (f", {len(pngs)} PNGs)" if args.png else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
