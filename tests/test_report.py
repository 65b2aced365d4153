"""The dashboard: `python -m trainer.report` on a synthetic run and a real one, side by side,
checked in its HTML and, marked heavy, in headless Chromium: script errors, charts drawn, a
screenshot that is not blank, and the line charts' hover, zoom and smoothing (the page's own
#selftest drives them with synthetic mouse events; its results are checked here against the
data). --png draws with matplotlib, no browser."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from omegaconf import OmegaConf

from trainer.report import load_runs, main, render
from trainer.report_svg import Chart, HeatPlot, figure, group_order, padded

VIRIDIS_TOP = np.array([0xFD, 0xE7, 0x25])  # viridis' yellow: a heatmap's highest value
GROUPS = ["embed", *[f"block.{i}.{part}" for i in range(2) for part in ("attn", "mlp", "norm")], "head"]
SPIKE_STEP = 30


def synthetic_row(step: int) -> dict:
    """One logged step of a made-up run: falling loss, a spike at step 30, val loss every 10."""
    spike = step == SPIKE_STEP
    loss = 5.0 * math.exp(-step / 20) + 1.5 + (2.0 if spike else 0.0)
    grad_norm = 2.0 * math.exp(-step / 15) + 0.3 + (8.0 if spike else 0.0)
    row = {
        "step": step,
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": grad_norm,
        "grad_norm_clipped": min(grad_norm, 1.0),
        "clip_coef": min(1.0, 1.0 / grad_norm),
        "tokens_per_s": 1000.0 + step,
        "tokens": step * 4096,
        "throughput/tokens_per_s": 1000.0 + step,
        "throughput/mfu": 0.3,
        "throughput/step_time_s": 0.5,
        "throughput/data_time_s": 0.05,
        "throughput/compute_time_s": 0.4,
        "throughput/optimizer_time_s": 0.05,
        "memory/peak_gb": 1.5,
        "skipped_steps": int(step >= SPIKE_STEP),
        "spike/count": int(step >= SPIKE_STEP),
        "spike/loss": int(spike),
        "spike/grad_norm": int(spike),
    }
    for i, group in enumerate(GROUPS):
        row[f"grad_norm/{group}"] = grad_norm * (i + 1) / 10
        row[f"param_norm/{group}"] = 10.0 + i
        row[f"update_ratio/{group}"] = 1e-3 / (i + 1) * math.exp(-step / 30)
    if spike:
        row.update(
            {
                "spike/loss_z": 9.5,
                "spike/loss_baseline": 2.1,
                "spike/grad_norm_z": 12.0,
                "spike/grad_norm_baseline": 0.6,
                "spike/action": "skip",
                "grad_norm/head": "inf",
            }
        )
    if step % 10 == 0:
        row["val_loss"] = "nan" if spike else loss + 0.1
    return row


def synthetic_run(run: Path, steps: int = 50) -> list[dict]:
    """A run directory in progress: its config, `steps` logged steps and a half-written line."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("optim:\n  lr: 0.001\n  clip_grad_norm: 1.0\n")
    rows = [synthetic_row(step) for step in range(1, steps + 1)]
    lines = [json.dumps(row) for row in rows]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 51, "loss": 2.0, "grad_no')
    return rows


class Elements(HTMLParser):
    """Every start tag of a page, as (tag, attributes)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))

    def find(self, tag: str, **wanted: str) -> list[dict]:
        keys = {k.replace("_", "-"): v for k, v in wanted.items()}
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in keys.items())]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 real steps of the synthetic experiment, logged every 2, with its resolved config."""
    from trainer.__main__ import compose_config
    from trainer.loop import train

    tmp = tmp_path_factory.mktemp("real")
    cfg, composed = compose_config(
        [
            "experiment=synthetic",
            "logger.wandb=false",
            "logger.progress_bar=false",
            "train.max_steps=20",
            "train.log_interval=2",
            "model.n_layer=2",
            "train.sample_tokens=0",
            f"data.cache_dir={tmp}/cache",
            "train.grad_accum_steps=2",  # the noise scale's two batch sizes
            "diagnostics.noise_scale=true",
            "diagnostics.sharpness.enabled=true",
            "diagnostics.sharpness.interval=10",
            "diagnostics.sharpness.iterations=3",
        ]
    )
    train(cfg, tmp / "run")
    (tmp / "run" / ".hydra").mkdir()  # what Hydra writes for a run from the command line
    OmegaConf.save({k: v for k, v in composed.items() if k != "hydra"}, tmp / "run" / ".hydra" / "config.yaml")
    return tmp / "run"


@pytest.fixture(scope="module")
def report(real_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """The page of the synthetic run and the real one, side by side."""
    tmp = tmp_path_factory.mktemp("report")
    synthetic = tmp / "synthetic"
    rows = synthetic_run(synthetic)
    page = tmp / "both.html"
    assert main([str(synthetic), str(real_run), "--out", str(page)]) == 0
    return page, synthetic, rows


def chart(text: str, chart_id: str) -> Elements:
    """The elements of one chart's <svg>."""
    svg = text[text.index(f'<svg id="{chart_id}"') :]
    return Elements(svg[: svg.index("</svg>")])


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary_row(page: Elements, run: str) -> dict[str, str]:
    """The summary table's data-value of each column, for one run."""
    start = page.tags.index(("tr", {"data-run": run}))
    cells = [a for t, a in page.tags[start + 1 :] if t in ("td", "tr")]
    cells = cells[: next((i for i, a in enumerate(cells) if "data-run" in a), len(cells))]
    return {a["data-key"]: a["data-value"] for a in cells}


def test_page_holds_every_chart_for_both_runs(report: tuple[Path, Path, list[dict]], real_run: Path) -> None:
    page_path, _, _ = report
    page = Elements(page_path.read_text())
    charts = {a["id"]: a["data-chart"] for t, a in page.tags if t == "svg" and "data-chart" in a}
    real_has_groups = any(k.startswith("grad_norm/") for row in logged(real_run) for k in row)
    expected = {
        "loss": "loss",
        "grad-norm": "grad-norm",
        "grad-heatmap-0": "grad-heatmap",
        "update-heatmap-0": "update-heatmap",
        "throughput": "throughput",
        "mfu": "mfu",
        "step-time": "step-time",
    }
    if real_has_groups:  # the loop logs per-group norms (newer trainers)
        expected |= {"grad-heatmap-1": "grad-heatmap", "update-heatmap-1": "update-heatmap"}
    expected |= {"noise-scale": "noise-scale", "sharpness": "sharpness"}  # the real run's diagnostics.*
    assert charts == expected
    text = page_path.read_text()
    noise = {a["data-series"] for a in chart(text, "noise-scale").find("g") if "data-series" in a}
    sharp = {a["data-series"] for a in chart(text, "sharpness").find("g") if "data-series" in a}
    assert noise == {"run B_simple", "run batch"} and sharp == {"run λmax", "run 2 / lr"}
    assert [r["step"] for r in logged(real_run) if "sharpness/lambda_max" in r] == [10, 20]
    assert len(page.find("svg", data_run="synthetic")) == 2  # its two heatmaps
    # the loss chart has one line per run and a val-loss line per run
    loss_lines = {a["data-series"] for a in chart(page_path.read_text(), "loss").find("g") if "data-series" in a}
    assert loss_lines == {"synthetic loss", "synthetic val loss", "run loss", "run val loss"}
    assert not page.find("p", **{"class": "nodata"})
    assert "<script src" not in text and "<link" not in text  # self-contained: nothing to fetch
    assert set(re.findall(r"https?://[^\s\"')]+", text)) == {"http://www.w3.org/2000/svg"}  # a namespace only


def chart_data(text: str, chart_id: str) -> dict:
    """The JSON beside a line chart, which the page's script draws from."""
    start = text.index(f'<script type="application/json" data-for="{chart_id}">')
    return json.loads(text[text.index(">", start) + 1 : text.index("</script>", start)])


def test_line_charts_carry_their_data_for_the_script(report: tuple[Path, Path, list[dict]]) -> None:
    text, rows = report[0].read_text(), report[2]
    page = Elements(text)
    line_charts = [a["id"] for a in page.find("svg") if not a["data-chart"].endswith("heatmap")]
    assert [a["data-for"] for a in page.find("script", type="application/json")] == line_charts
    loss = {line["label"]: line for line in chart_data(text, "loss")["lines"]}
    assert loss["synthetic loss"]["x"] == [r["step"] for r in rows] and loss["synthetic loss"]["smooth"]
    assert loss["synthetic loss"]["y"] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    val = loss["synthetic val loss"]
    assert val["x"] == [10, 20, 30, 40, 50] and val["y"][2] == "nan" and val["dots"] and not val["smooth"]
    marks = chart_data(text, "loss")["marks"]
    assert {(m["kind"], m["step"]) for m in marks} == {("loss", 30), ("grad_norm", 30)}
    assert chart_data(text, "grad-norm")["log"] and chart_data(text, "grad-norm")["refs"][0]["y"] == 1.0
    assert 'class="controls" hidden' in text  # the controls show only when the script runs
    for chart_id in line_charts:  # without script, the static chart stays: its lines in g.plot
        assert chart(text, chart_id).find("g", **{"class": "plot"})
    # a label cannot end the script block early
    html = figure(Chart("x", "<svg></svg>", 10, HeatPlot("", [], [], [], 0, 1), json.dumps({"a": "</script>"})))
    assert html.count("</script>") == 1 and json.loads(html[html.index("{") : html.rindex("}") + 1]) == {
        "a": "</script>"
    }


def test_heatmap_has_one_row_per_group_in_model_order(report: tuple[Path, Path, list[dict]], real_run: Path) -> None:
    page_path, _, _ = report
    text = page_path.read_text()
    for chart_id in ("grad-heatmap-0", "update-heatmap-0"):
        svg = chart(text, chart_id)
        assert svg.find("svg")[0]["data-rows"] == str(len(GROUPS))
        assert [a["data-group"] for a in svg.find("g", **{"class": "hm-row"})] == GROUPS
        assert len(svg.find("rect")) >= len(GROUPS) * 50  # one cell per group and logged step
    assert 'fill="#000"><title>head step 30: ' in text  # the inf logged at the spike stands out
    real_groups = {k.split("/", 1)[1] for row in logged(real_run) for k in row if k.startswith("grad_norm/")}
    if real_groups:  # the real run's own groups, in model order
        rows = [a["data-group"] for a in chart(text, "grad-heatmap-1").find("g", **{"class": "hm-row"})]
        assert rows == sorted(real_groups, key=group_order) and rows[0] == "embed" and rows[-1] == "head"


def test_spike_markers_and_clip_line(report: tuple[Path, Path, list[dict]]) -> None:
    page = Elements(report[0].read_text())
    spikes = page.find("g", **{"class": "spike"})
    assert {(a["data-kind"], a["data-step"], a["data-run"]) for a in spikes} == {
        ("loss", "30", "synthetic"),
        ("grad_norm", "30", "synthetic"),
    }
    assert len(spikes) == 3  # loss and grad-norm spikes on the loss chart, grad-norm ones on the norm chart
    assert page.find("g", data_series="clip 1")  # both runs clip at 1.0: one line


def test_summary_numbers(report: tuple[Path, Path, list[dict]], real_run: Path) -> None:
    page = Elements(report[0].read_text())
    rows = report[2]
    synthetic = summary_row(page, "synthetic")
    assert synthetic["steps"] == "50"  # the half-written step 51 is skipped
    assert float(synthetic["last loss"]) == pytest.approx(rows[-1]["loss"])
    val = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), float)]
    assert float(synthetic["best val loss"]) == pytest.approx(min(val))
    assert float(synthetic["tokens"]) == 50 * 4096
    assert float(synthetic["spikes"]) == 1 and float(synthetic["skipped steps"]) == 1
    assert float(synthetic["clip"]) == 1.0 and synthetic["status"] == "running"
    real, metrics = summary_row(page, "run"), logged(real_run)
    assert real["steps"] == "20" and real["status"] == "finished"
    assert float(real["last loss"]) == pytest.approx(metrics[-1]["loss"])
    assert float(real["tokens"]) == metrics[-1]["tokens"]
    assert float(real["best val loss"]) == pytest.approx(min(r["val_loss"] for r in metrics if "val_loss" in r))


def test_old_runs_degrade_and_bad_paths_exit_2(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 4.0 - s / 10}) for s in range(1, 6)))
    assert main([str(old)]) == 0  # default: RUN_DIR/report.html
    page = Elements((old / "report.html").read_text())
    assert [a["id"] for a in page.find("svg")] == ["loss"]
    assert page.find("p", **{"class": "nodata"})
    (old / "metrics.jsonl").write_text("")  # a run that has logged nothing yet
    page, charts = render(load_runs([old]), refresh=5)
    assert charts == [] and '<meta http-equiv="refresh" content="5">' in page
    (old / "checkpoints" / "final").mkdir(parents=True)  # finished: --refresh writes once, without the tag
    assert main([str(old), "--refresh", "5"]) == 0 and "http-equiv" not in (old / "report.html").read_text()
    for path, message in ((tmp_path / "missing", "does not exist"), (tmp_path, "metrics.jsonl does not exist")):
        command = [sys.executable, "-m", "trainer.report", str(path)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert result.returncode == 2 and message in result.stderr and str(path) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_resumed_run_keeps_the_newest_row_of_each_step(tmp_path: Path) -> None:
    first = [{"step": s, "loss": 4.0 - s / 10, "spike/loss": int(s == 4)} for s in range(1, 6)]
    again = [{"step": s, "loss": 1.0} for s in range(4, 7)]  # rolled back to step 3, logged 4.. again
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in first + again))
    (run,) = load_runs([tmp_path])
    assert [row["step"] for row in run.rows] == [1, 2, 3, 4, 5, 6]
    assert run.points("loss")[3:] == [(4, 1.0), (5, 1.0), (6, 1.0)]
    assert [row["step"] for row in run.spikes] == [4]  # the spike stays marked


def test_downstream_evaluation_gets_a_chart_per_task(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": 4.0 - s / 10} for s in range(1, 7)]
    for row, acc in ((rows[2], 0.25), (rows[5], 0.5)):
        row.update({"eval/tiny_mc/acc": acc, "eval/tiny_mc/acc_stderr": 0.1, "eval/tiny_rolling/word_perplexity": 900.0,
                    "eval/tiny_rolling/bits_per_byte": 2.0, "eval/ppl/notes": 12.0, "eval/time_s": 0.5})  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main([str(tmp_path)]) == 0
    page = Elements((tmp_path / "report.html").read_text())
    charts = {a["id"]: a for a in page.find("svg")}
    assert {"eval-tiny_mc", "eval-tiny_rolling", "eval-ppl"} <= set(charts)
    html = (tmp_path / "report.html").read_text()
    assert "Downstream: tiny_mc" in html and "Held-out perplexity (eval.files)" in html
    assert "acc_stderr" not in html.split('id="eval-tiny_mc"')[1].split("</svg>")[0]  # stderr is not a line


def test_group_order() -> None:
    names = ["head", "block.10.attn", "block.2.norm", "embed", "block.2.attn", "block.2.mlp"]
    expected = ["embed", "block.2.attn", "block.2.mlp", "block.2.norm", "block.10.attn", "head"]
    assert sorted(names, key=group_order) == expected


# -- in a browser ------------------------------------------------------------------------------------


def chromium() -> str | None:
    """The path of a Chromium (or Chrome) binary, if one is installed."""
    return next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)


def chromium_command(binary: str, profile: Path, *args: str) -> list[str]:
    """Headless Chromium kept off the network (no sync, updates or background requests)."""
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]


@pytest.fixture(scope="session")
def browser() -> str:
    """Debian's chromium, installed when missing."""
    if chromium() is None and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=900)
    if chromium() is None:
        pytest.skip("chromium is not installed and `apt-get install -y chromium` did not install it")
    return chromium()


def pixels(path: Path) -> np.ndarray:
    """A PNG's (height, width, 3) colours, 0-255."""
    return (imread(path)[..., :3] * 255).round().astype(int)


@pytest.fixture(scope="module")
def selftest(report: tuple[Path, Path, list[dict]], browser: str, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The page loaded with #selftest in headless Chromium: <body>'s attributes, the self-test's
    results per line chart, and the browser's log."""
    profile = tmp_path_factory.mktemp("profile")
    command = chromium_command(browser, profile, "--enable-logging=stderr", "--v=0", "--dump-dom")
    dom = subprocess.run([*command, report[0].as_uri() + "#selftest"], capture_output=True, text=True, timeout=120)
    body = Elements(dom.stdout).find("body")[0]
    return body, json.loads(body.get("data-selftest", "{}")), dom.stderr


def ema(values: list, weight: float) -> list:
    """TensorBoard's debiased EMA (the page's smoothing); a NaN / inf keeps its place."""
    last, n, out = 0.0, 0, []
    for y in values:
        if isinstance(y, int | float):
            last, n = last * weight + (1 - weight) * y, n + 1
            y = last / (1 - weight**n)
        out.append(y)
    return out


TOOLTIP_ROW = re.compile(r"■ (?P<label>.+?): (?P<value>\S+)(?: \(raw (?P<raw>\S+)\))?(?: @ (?P<at>\S+))?")


def check_tooltip(rows: list[str], data: dict, smoothing: float = 0) -> tuple[float, list[str]]:
    """Each line's value in the tooltip is its (smoothed) value at the cursor's step, or at the
    step it names; returns that step and the labels shown."""
    assert rows and rows[0].startswith("step "), rows
    step, labels = float(rows[0].split()[1]), []
    lines = {line["label"]: line for line in data["lines"]}
    for row in rows[1:]:
        if not row.startswith("■"):  # a spike at this step
            continue
        match = TOOLTIP_ROW.fullmatch(row)
        line, labels = lines[match["label"]], [*labels, match["label"]]
        i = line["x"].index(float(match["at"] or step))
        shown = ema(line["y"], smoothing)[i] if smoothing and line["smooth"] else line["y"][i]
        for text, expected in ((match["value"], shown), (match["raw"], line["y"][i])):
            if isinstance(expected, str):
                assert text == expected
            elif text is not None:
                assert float(text) == pytest.approx(expected, rel=1e-3), row
        assert (match["raw"] is not None) == (f"{shown:.4g}" != f"{line['y'][i]:.4g}" if line["smooth"] else False)
    return step, labels


def visible_range(data: dict, x0: float, x1: float, hidden: str = "") -> list[float]:
    """The y range a zoom to [x0, x1] should show: the lines within it (but HIDDEN), where they
    cross its edges, and the reference lines, padded 5% (on a log axis, in log10)."""
    log = data["log"]

    def shown(y: object) -> float | None:
        return (math.log10(y) if log else y) if isinstance(y, int | float) and (y > 0 or not log) else None

    values = [shown(ref["y"]) for ref in data["refs"] if shown(ref["y"]) is not None and ref["label"] != hidden]
    for line in [line for line in data["lines"] if line["label"] != hidden]:
        points = [(x, shown(y)) for x, y in zip(line["x"], line["y"], strict=True)]
        values += [y for x, y in points if y is not None and x0 <= x <= x1]
        for (xa, ya), (xb, yb) in itertools.pairwise(points):
            if ya is not None and yb is not None:  # where a segment crosses an edge of the range
                values += [ya + (yb - ya) * (e - xa) / (xb - xa) for e in (x0, x1) if (xa - e) * (xb - e) < 0]
    lo, hi = padded(min(values, default=0 if log else 1), max(values, default=0 if log else 1))
    return [10**lo, 10**hi] if log else [lo, hi]


def logged_within(data: dict, steps: list[float]) -> bool:
    return any(steps[0] <= x <= steps[1] for line in data["lines"] for x in line["x"])


@pytest.mark.heavy
def test_page_renders_in_chromium(selftest: tuple, report: tuple, browser: str, tmp_path: Path) -> None:
    body, results, log = selftest
    n_charts = report[0].read_text().count("data-chart=")
    assert "data-errors" not in body and "Uncaught" not in log, log[-2000:]
    assert body["data-charts"] == str(n_charts) and body["data-rendered"] == str(n_charts)
    assert not [(chart_id, r["error"]) for chart_id, r in results.items() if "error" in r]

    page_path = report[0]
    shot = tmp_path / "shot.png"
    subprocess.run(
        chromium_command(
            browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,2400", page_path.as_uri()
        ),
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 20_000
    shown = pixels(shot)
    assert shown.shape == (2400, 1400, 3)
    sampled = shown[:1200:7, ::7].reshape(-1, 3)
    assert len({tuple(p) for p in sampled}) > 50  # charts in many colours, not a blank page
    assert (abs(sampled - VIRIDIS_TOP).sum(axis=1) < 40).any()  # a heatmap was painted


@pytest.mark.heavy
def test_hover_shows_every_line_at_the_nearest_step(selftest: tuple, report: tuple) -> None:
    text, (_, results, _) = report[0].read_text(), selftest
    line_charts = [a["data-for"] for a in Elements(text).find("script", type="application/json")]
    assert sorted(results) == sorted(line_charts) and len(line_charts) == 7
    for chart_id, result in results.items():
        data, hover = chart_data(text, chart_id), result["hover"]
        step, labels = check_tooltip(hover["lines"], data)
        assert step == hover["step"] and labels == [line["label"] for line in data["lines"]]  # every line
        f = data["frame"]
        assert hover["cursor"] == pytest.approx(f["left"] + (step - f["x0"]) / (f["x1"] - f["x0"]) * f["width"])
        assert result["left"] == []  # the mouse left: no tooltip
    loss = results["loss"]["hover"]["lines"]  # the synthetic run's loss at the hovered step, as logged
    step = results["loss"]["hover"]["step"]
    assert f"■ synthetic loss: {synthetic_row(int(step))['loss']:.4g}" in loss


@pytest.mark.heavy
def test_drag_zooms_and_legend_hides_refitting_y_double_click_resets(selftest: tuple, report: tuple) -> None:
    text, (_, results, _) = report[0].read_text(), selftest
    for chart_id, result in results.items():
        data, zoom, full = chart_data(text, chart_id), result["zoom"], result["full"]
        pixel = (data["frame"]["x1"] - data["frame"]["x0"]) / data["frame"]["width"]  # steps per pixel
        assert zoom["x"] == pytest.approx([zoom["from"], zoom["to"]], abs=1.5 * pixel)
        assert zoom["y"] == pytest.approx(visible_range(data, *zoom["x"]), rel=1e-6)  # y refits
        assert full["y"] == pytest.approx(visible_range(data, *full["x"]), rel=1e-6)
        assert full["x"] == [data["frame"]["x0"], data["frame"]["x1"]]
        ticks = [float(t.rstrip("k")) * (1e3 if t.endswith("k") else 1) for t in zoom["x_ticks"]]
        assert ticks and all(zoom["x"][0] <= t <= zoom["x"][1] for t in ticks) and zoom["x_ticks"] != full["x_ticks"]
        assert len(zoom["y_ticks"]) >= 2 and zoom["paths"] >= 1
        if logged_within(data, zoom["x"]):  # hover in the zoomed range
            step, _ = check_tooltip(zoom["hover"], data)
            assert zoom["x"][0] <= step <= zoom["x"][1]
        else:  # (sharpness: logged at steps 10 and 20 only) no step to show
            assert zoom["hover"] == []
        assert result["reset"] == full  # double-click: the full range again
        legend = result["legend"]  # a click on the first legend entry hides its line, y refits; again shows it
        assert legend["hidden"] == data["lines"][0]["label"] and legend["hidden"] not in legend["series"]
        assert legend["y"] == pytest.approx(visible_range(data, *full["x"], hidden=legend["hidden"]), rel=1e-6)
        assert legend["hidden"] in legend["again"] and len(legend["again"]) == len(legend["series"]) + 1
    loss = results["loss"]["zoom"]  # steps ~25-45 of the synthetic loss: a tighter y range than 1.7-6.5
    assert loss["y"][1] - loss["y"][0] < 0.7 * (results["loss"]["full"]["y"][1] - results["loss"]["full"]["y"][0])


@pytest.mark.heavy
def test_smoothing_draws_an_ema_over_the_faint_raw_line(selftest: tuple, report: tuple) -> None:
    text, (_, results, _) = report[0].read_text(), selftest
    for chart_id, result in results.items():
        data, smooth = chart_data(text, chart_id), result["smooth"]
        smoothable = [line for line in data["lines"] if line["smooth"]]
        assert smooth["raw"] == smooth["smoothed"] == len(smoothable) and result["zoom"]["raw"] == 0
        assert smooth["y"] == result["zoom"]["y"]  # the y range fits the raw values, smoothed or not
        if logged_within(data, smooth["x"]):
            check_tooltip(smooth["hover"], data, smoothing=0.9)
    assert any("(raw " in row for row in results["loss"]["smooth"]["hover"])


@pytest.mark.heavy
def test_png_per_chart(
    report: tuple[Path, Path, list[dict]], real_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser (nor any other program) to be found
    assert main([str(report[1]), str(real_run), "--png", "--out", str(tmp_path / "both.html")]) == 0
    charts = [a["id"] for a in Elements((tmp_path / "both.html").read_text()).find("svg")]
    assert sorted(p.name for p in tmp_path.glob("both-*.png")) == sorted(f"both-{c}.png" for c in charts)
    assert {"loss", "grad-norm", "grad-heatmap-0", "noise-scale", "sharpness"} <= set(charts)
    for chart_id in charts:
        drawn = pixels(tmp_path / f"both-{chart_id}.png")
        assert drawn.shape[1] == 960 and 250 < drawn.shape[0] < 1200, (chart_id, drawn.shape)  # 1.5 x the page's
        assert len({tuple(p) for p in drawn[::5, ::5].reshape(-1, 3)}) > 20, chart_id  # drawn, not blank
    heat = pixels(tmp_path / "both-grad-heatmap-0.png").reshape(-1, 3)
    assert (abs(heat - VIRIDIS_TOP).sum(axis=1) < 25).any()  # viridis' top: the spike at step 30
    assert (heat.sum(axis=1) == 0).any()  # black: the inf logged at the spike
