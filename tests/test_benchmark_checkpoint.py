"""benchmarks/checkpoint.py: the stall arithmetic by hand, and one tiny real run (no timings asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import checkpoint as bench


def test_overlap_extra_counts_only_steps_with_a_write_in_flight() -> None:
    count, extra = bench.overlap_extra([1.5, 1.2, 1.0, 0.9], [True, True, False, False], baseline=1.0)
    assert count == 2
    assert extra == pytest.approx(0.5 + 0.2)


def test_summarize_adds_save_wait_and_extra_per_save() -> None:
    saves = [
        {
            "save_s": 0.5,
            "wait_s": 1.25,
            "extra_s": 0.25,
            "overlapped": 2,
            "write_s": 4.0,
        },
        {
            "save_s": 0.5,
            "wait_s": 1.0,
            "extra_s": 0.75,
            "overlapped": 1,
            "write_s": 6.0,
        },
    ]
    row = bench.summarize("async", saves, baseline=[1.0, 3.0, 2.0], size_bytes=500_000_000)
    assert row["stall_per_save_s"] == pytest.approx((2.0 + 2.25) / 2)
    assert row["overlapped_steps"] == 1.5
    assert row["write_s"] == 5.0
    assert row["write_mb_per_s"] == pytest.approx(100.0)  # 500 MB in 5 s
    assert (row["step_s"], row["step_s_min"], row["step_s_max"]) == (2.0, 1.0, 3.0)
    table = bench.markdown_table([row]).splitlines()
    assert len(table) == 3 and table[2].startswith("| async | 2 | 500.0 |")


def test_directory_bytes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"123")
    (tmp_path / "y").write_bytes(b"4567")
    assert bench.directory_bytes(tmp_path) == 7


def test_tiny_run_writes_verified_checkpoints_of_the_expected_size(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    bench.main(
        [
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "128",
            "--seq-len", "16", "--saves", "2", "--interval", "1", "--baseline-steps", "1",
            "--warmup-steps", "0", "--dir", str(tmp_path / "runs"), "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    rows = {r["summary"]["mode"]: r["summary"] for r in report["results"]}
    assert set(rows) == {"sync", "async"}
    weights_and_adam = 3 * 4 * report["n_params"] / 1e6  # fp32 weights, exp_avg, exp_avg_sq
    for row in rows.values():
        assert row["saves"] == 2
        assert weights_and_adam < row["checkpoint_mb"] < 1.5 * weights_and_adam + 0.5
        assert math.isfinite(row["stall_per_save_s"]) and row["write_s"] > 0
    assert rows["sync"]["wait_s"] == 0.0  # sync commits inside save()
    assert rows["sync"]["overlapped_steps"] == 0.0
    assert not any((tmp_path / "runs").glob("*/checkpoints"))  # run dirs removed afterwards
