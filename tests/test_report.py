"""The dashboard: `python -m trainer.report` on a synthetic run and a real one, side by side,
checked in its HTML and, marked heavy, in headless Chromium (script errors, charts drawn, a
screenshot that is not blank)."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainer.report import chromium, chromium_command, load_runs, main, render
from trainer.report_svg import group_order

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
    assert "<script src" not in page_path.read_text() and "http://" not in page_path.read_text().replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )  # self-contained: nothing to fetch


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
    assert main([str(old), "--refresh", "5"]) == 0 and "refresh" not in (old / "report.html").read_text()
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


def test_group_order() -> None:
    names = ["head", "block.10.attn", "block.2.norm", "embed", "block.2.attn", "block.2.mlp"]
    expected = ["embed", "block.2.attn", "block.2.mlp", "block.2.norm", "block.10.attn", "head"]
    assert sorted(names, key=group_order) == expected


# -- in a browser ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser() -> str:
    """Debian's chromium, installed when missing."""
    if chromium() is None and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=900)
    if chromium() is None:
        pytest.skip("chromium is not installed and `apt-get install -y chromium` did not install it")
    return chromium()


def png_pixels(path: Path) -> tuple[int, int, list[bytes], int]:
    """Width, height, unfiltered rows and bytes per pixel of an 8-bit, non-interlaced PNG."""
    data, pos, chunks = path.read_bytes(), 8, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    width, height, depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and chunks[b"IHDR"][12] == 0
    bpp = {2: 3, 6: 4, 0: 1, 4: 2}[color_type]
    raw, stride, rows, prior = zlib.decompress(chunks[b"IDAT"]), width * bpp, [], bytes(width * bpp)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a, b, c = line[i - bpp] if i >= bpp else 0, prior[i], prior[i - bpp] if i >= bpp else 0
            p = a + b - c
            paeth = a if abs(p - a) <= min(abs(p - b), abs(p - c)) else b if abs(p - b) <= abs(p - c) else c
            predictor = [0, a, b, (a + b) // 2, paeth][kind]  # PNG filter types 0-4
            line[i] = (line[i] + predictor) & 0xFF
        rows.append(prior := bytes(line))
    return width, height, rows, bpp


@pytest.mark.heavy
def test_page_renders_in_chromium(report: tuple[Path, Path, list[dict]], browser: str, tmp_path: Path) -> None:
    page_path = report[0]
    n_charts = page_path.read_text().count("data-chart=")
    dom = subprocess.run(
        chromium_command(
            browser, tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", page_path.as_uri()
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    body = Elements(dom.stdout).find("body")[0]
    assert "data-errors" not in body and "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    assert body["data-charts"] == str(n_charts) and body["data-rendered"] == str(n_charts)

    shot = tmp_path / "shot.png"
    subprocess.run(
        chromium_command(
            browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,2400", page_path.as_uri()
        ),
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 20_000
    width, height, rows, bpp = png_pixels(shot)
    assert (width, height) == (1400, 2400)
    sampled = {rows[y][x * bpp : x * bpp + 3] for y in range(0, 1200, 7) for x in range(0, 1400, 7)}
    assert len(sampled) > 50  # charts in many colours, not a blank page
    viridis_yellow = bytes.fromhex("fde725")
    assert any(
        abs(p[0] - viridis_yellow[0]) + abs(p[1] - viridis_yellow[1]) + abs(p[2] - viridis_yellow[2]) < 40
        for p in sampled
    )  # a heatmap was painted


@pytest.mark.heavy
def test_png_per_chart(report: tuple[Path, Path, list[dict]], browser: str, tmp_path: Path) -> None:
    synthetic = report[1]
    assert main([str(synthetic), "--png", "--out", str(tmp_path / "one.html")]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("one-*.png"))
    assert pngs == sorted(
        f"one-{c}.png"
        for c in ("loss", "grad-norm", "grad-heatmap-0", "update-heatmap-0", "throughput", "mfu", "step-time")
    )
    width, height, _, _ = png_pixels(tmp_path / "one-loss.png")
    assert width == 640 and height > 200
