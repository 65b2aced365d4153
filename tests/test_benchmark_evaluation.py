"""benchmarks/evaluation.py --quick and benchmarks/evaluation_gpu.py --tiny end to end (structure and finite
figures; their timings are not asserted: speed is measured by the benchmarks, never by tests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import env

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # two training runs each

REPO = Path(__file__).resolve().parents[1]


def test_the_overhead_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "evaluation.json"
    command = [sys.executable, "-m", "benchmarks.evaluation", "--quick", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    plain, evaluated = record["plain"], record["evaluated"]
    assert plain["evals"] == [] and [e["step"] for e in evaluated["evals"]] == [10, 20]
    for e in evaluated["evals"]:
        assert 0.0 <= e["eval/tiny_mc/acc"] <= 1.0 and e["eval/time_s"] > 0
        assert math.isfinite(e["eval/ppl/LICENSE"]) and e["eval/ppl/LICENSE"] > 1
    assert evaluated["evals"][1]["eval/ppl/LICENSE"] < evaluated["evals"][0]["eval/ppl/LICENSE"]  # it learns
    assert record["overhead_eval_over_train"] > 0 and (tmp_path / "evaluation.png").stat().st_size > 10_000
    assert "| step | tiny_mc acc |" in done.stdout


def test_the_gpu_script_on_tiny_shapes(tmp_path: Path) -> None:
    out = tmp_path / "evaluation_gpu.json"
    command = ["bash", "benchmarks/evaluation_gpu.sh", "--tiny", "--batch-size", "4"]
    done = subprocess.run(command, cwd=REPO, env={**env(), "OUT": str(tmp_path), "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert "error" not in record, record.get("stderr_tail")
    assert [r["step"] for r in record["steps"]] == [1, 2]
    for r in record["steps"]:
        assert {"eval/tiny_mc/acc", "eval/tiny_gen/exact_match_strip", "eval/tiny_rolling/bits_per_byte",
                "eval/ppl/held_out"} <= set(r)  # fmt: skip
    assert (tmp_path / "evaluation_gpu.stderr.log").exists()
