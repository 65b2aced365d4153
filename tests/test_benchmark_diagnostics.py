"""benchmarks/diagnostics.py: the overhead arithmetic by hand, and one tiny real run of every
configuration (structure and sanity only: no timings asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import diagnostics as bench
from trainer import loop
from trainer.diagnostics import sharpness


def test_summarize_amortises_the_estimate_over_the_interval() -> None:
    steps = {"baseline": [1.0, 1.2, 0.9], "noise_scale": [1.1, 1.1], "sharpness": [1.0], "both": [1.1, 1.0, 1.2]}
    steps |= {"qat_int8": [1.3], "qat_int4": [1.4]}
    results = bench.summarize(steps, estimate_s=5.0, interval=100, tokens_per_step=1000)
    base, noise, sharp, both = (results[n] for n in ("baseline", "noise_scale", "sharpness", "both"))
    assert (base["step_s"], base["overhead_percent"], base["estimate_s"]) == (1.0, 0.0, None)
    assert base["tokens_per_s"] == pytest.approx(1000.0) and base["mean_step_s"] == pytest.approx(31 / 30)
    assert base["p10_p90_s"][0] < 1.0 < base["p10_p90_s"][1]
    assert noise["overhead_percent"] == pytest.approx(10.0) and noise["estimate_percent"] is None
    # 5 s once per 100 steps of 1 s: 0.05 s a step, 5% of the baseline's
    assert sharp["step_s_at_interval"] == pytest.approx(1.05) and sharp["estimate_percent"] == pytest.approx(5.0)
    assert sharp["overhead_percent"] == pytest.approx(5.0) and sharp["tokens_per_s"] == pytest.approx(1000 / 1.05)
    assert both["overhead_percent"] == pytest.approx(15.0) and both["steps_overhead_percent"] == pytest.approx(10.0)
    assert results["qat_int4"]["overhead_percent"] == pytest.approx(40.0) and results["qat_int4"]["estimate_s"] is None
    table = bench.markdown_table(results, interval=100).splitlines()
    assert "step s at interval 100" in table[0] and len(table) == 2 + len(bench.CONFIGS)
    assert table[4] == "| sharpness | 1.000 | 1.000-1.000 | +0.00 | 5.00 | 1.050 | 952 | +5.00 | +5.00 |"


@pytest.mark.heavy
def test_tiny_run_measures_every_configuration(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "diagnostics.json"
    bench.main(
        [
            "--steps", "4", "--estimates", "2", "--threads", "0", "--out", str(out),
            "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.seq_len=16", "train.micro_batch_size=2",
            "train.log_interval=2", "diagnostics.sharpness.iterations=3",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    assert report["tokens_per_step"] == 2 * 2 * 16  # micro batch x grad_accum_steps (the shape's 2) x seq
    assert set(report["results"]) == set(bench.CONFIGS)
    for name, r in report["results"].items():
        assert f"| {name} |" in printed
        assert len(r["steps_s"]) == 4 and all(s > 0 for s in r["steps_s"])  # every timed step, warm-up left out
        for key in ("step_s", "mean_step_s", "step_s_at_interval", "tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert min(r["steps_s"]) <= r["p10_p90_s"][0] <= r["step_s"] <= r["p10_p90_s"][1] <= max(r["steps_s"])
        sharp = bench.CONFIGS[name][1]
        assert (r["estimate_s"] is not None) == (r["estimate_percent"] is not None) == sharp
        assert r["step_s_at_interval"] > r["step_s"] if sharp else r["step_s_at_interval"] == r["step_s"]
    assert report["noise_scale_logged"] == {n: noise for n, (noise, *_) in bench.CONFIGS.items()}

    estimate = report["sharpness_estimate"]
    assert estimate["method"] in ("double_backward", "finite_difference")
    assert f"sharpness: {estimate['method'].replace('_', ' ')}," in printed
    assert (estimate["interval"], estimate["iterations"], estimate["tokens"]) == (100, 3, 4 * 16)
    assert len(estimate["seconds"]) == 2 and min(estimate["seconds"]) > 0 and estimate["first_s"] > 0
    assert len(estimate["products"]) == 3 and all(1 <= k <= 3 for k in estimate["products"])  # the first too
    assert all(math.isfinite(v) and v > 0 for v in estimate["lambda_max"])  # near init: curved upward
    assert sharpness.top_eigenvalue.__name__ == "top_eigenvalue"  # the product counter is taken off again
    assert loop.next_batch.__module__ == "trainer.loop"  # the hand-off is taken off again


def test_lockstep_runs_one_turn_at_a_time_in_rounds() -> None:
    order: list[str] = []
    lockstep = bench.Lockstep(torch.device("cpu"))

    def job(name: str, handoffs: int) -> None:
        for _ in range(handoffs):
            order.append(name)
            lockstep.handoff()
        order.append(name)

    lockstep.run({"a": lambda: job("a", 3), "b": lambda: job("b", 1), "c": lambda: job("c", 3)})
    assert order == lockstep.log  # each job's work fell in its own turns, in the order they were given
    assert order[:3] == ["a", "b", "c"]  # the first round in the given order, then shuffled rounds
    assert sorted(order[3:6]) == ["a", "b", "c"] and sorted(order[6:8]) == sorted(order[8:]) == ["a", "c"]
    assert [len(lockstep.turns[n]) for n in "abc"] == [3, 1, 3]  # the handed-off turns; a job's last is not timed
