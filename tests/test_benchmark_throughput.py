"""benchmarks/throughput.py: the window arithmetic by hand, the HF models' shape, one tiny real run
of every system in a subprocess (structure and positivity only: no timings asserted)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import throughput
from trainer.config import ModelConfig
from trainer.model import GPT

REPO = Path(__file__).resolve().parent.parent


def run_benchmark(module: str, *flags: str) -> subprocess.CompletedProcess:
    """`python -m benchmarks.<module> FLAGS` in a subprocess on one thread; it must exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", f"benchmarks.{module}", *flags]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_window_rates_leave_out_warmup_and_split_the_rest_into_repeats() -> None:
    args = argparse.Namespace(micro_batch=2, seq_len=10, steps=2, repeats=2, warmup=1)
    # warm-up step 0-5 s, then windows of 2 steps: 5-7 s and 7-11 s; 2 x 10 x 2 = 40 tokens each
    stamps = [0.0, 5.0, 6.0, 7.0, 9.0, 11.0]
    assert throughput.window_rates(stamps, args) == pytest.approx([20.0, 10.0])
    r = throughput.summarize([20.0, 10.0, 30.0], flops_per_token=100, peak=10_000.0, peak_mem=None)
    assert (r["tokens_per_s"], r["spread"], r["mfu"]) == (20.0, [10.0, 30.0], pytest.approx(0.2))


@pytest.mark.parametrize(
    "layout, hf_class",
    [
        ({}, "GPT2LMHeadModel"),
        ({"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 1}, "LlamaForCausalLM"),
    ],
)
def test_hf_model_has_the_gpt_shape(layout: dict, hf_class: str) -> None:
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, block_size=16, **layout)
    model = throughput.hf_model(cfg, torch.device("cpu"))
    assert type(model).__name__ == hf_class and model.training
    assert sum(p.numel() for p in model.parameters()) == GPT(cfg).num_params()


@pytest.mark.slow  # 16 s: the benchmark's every row; the harness's own throughput logging runs by default
def test_tiny_run_reports_every_system_and_precision(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    flags = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "16", "--micro-batch", "2",
             "--warmup", "1", "--steps", "2", "--repeats", "1", "--device", "cpu", "--out", str(out)]  # fmt: skip
    result = run_benchmark("throughput", *flags)
    assert "| trainer | fp32 |" in result.stdout and "| hf_trainer | bf16 |" in result.stdout

    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"] == torch.__version__
    shape = report["shape"]
    assert (shape["n_layer"], shape["n_embd"], shape["seq_len"], shape["micro_batch"]) == (2, 32, 16, 2)
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=320, block_size=16)
    assert shape["flops_per_token"] == GPT(cfg).flops_per_token(16)
    assert set(report["systems"]) == set(throughput.DEFAULT_SYSTEMS)  # nanogpt needs --nanogpt DIR
    for system, by_precision in report["systems"].items():
        assert set(by_precision) == {"fp32", "bf16"}, system
        for precision, r in by_precision.items():
            assert r["tokens_per_s"] > 0 and r["spread"][0] <= r["tokens_per_s"] <= r["spread"][1]
            assert r["mfu"] == pytest.approx(
                r["tokens_per_s"] * shape["flops_per_token"] / report["peak_flops"][precision]
            )
            assert r["peak_mem_bytes"] is None  # CPU: not measured
            assert r["compile"] is False


def test_interleaved_windows_give_every_system_its_rates(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    flags = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "16", "--micro-batch", "2",
             "--warmup", "1", "--steps", "1", "--repeats", "3", "--device", "cpu", "--precisions", "fp32",
             "--systems", "trainer", "plain_torch", "--interleave", "--out", str(out)]  # fmt: skip
    throughput.main(flags)
    systems = json.loads(out.read_text())["systems"]
    for system in ("trainer", "plain_torch"):
        r = systems[system]["fp32"]
        assert r["interleaved"] and len(r["windows_tokens_per_s"]) == 3 and min(r["windows_tokens_per_s"]) > 0


def test_nanogpt_needs_its_checkout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        throughput.parse_args(["--systems", "trainer", "nanogpt"])
    with pytest.raises(SystemExit):
        throughput.parse_args(["--nanogpt", str(tmp_path)])  # no model.py there
    assert "--nanogpt DIR, a karpathy/nanoGPT checkout holding model.py" in capsys.readouterr().err
    assert throughput.parse_args([]).systems == list(throughput.DEFAULT_SYSTEMS)


@pytest.mark.heavy
def test_profile_step_names_the_top_operators(tmp_path: Path) -> None:
    """benchmarks/profile_step.py on a tiny shape: the top operators of deferred steps, by self time."""
    out = tmp_path / "profile.json"
    flags = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "16", "--micro-batch", "2",
             "--warmup", "1", "--steps", "2", "--top", "5", "--device", "cpu", "--out", str(out)]  # fmt: skip
    result = run_benchmark("profile_step", *flags)
    report = json.loads(out.read_text())
    kernels = report["top_kernels"]
    assert len(kernels) == 5 and report["deferred"] is True and report["host_syncs"] is None  # CPU: no device
    assert [k["self_s"] for k in kernels] == sorted((k["self_s"] for k in kernels), reverse=True)
    assert 0 < sum(k["share"] for k in kernels) <= 1 and all(k["calls"] > 0 for k in kernels)
    assert any(k["name"] in ("aten::mm", "aten::addmm") for k in kernels)  # a transformer step is matmuls
    assert f"| {kernels[0]['name']} |" in result.stdout


@pytest.mark.slow  # 14 s: the benchmark's 2-rank rows
def test_strategy_rows_run_the_harness_on_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    flags = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "16", "--micro-batch", "2",
             "--warmup", "1", "--steps", "1", "--repeats", "2", "--device", "cpu", "--precisions", "fp32",
             "--systems", "trainer", "--strategies", "ddp", "--out", str(out)]  # fmt: skip
    run_benchmark("throughput", *flags)
    row = json.loads(out.read_text())["systems"]["trainer_ddp"]["fp32"]
    assert row["ranks"] == 2 and len(row["windows_tokens_per_s"]) == 2 and row["tokens_per_s"] > 0
    assert row["optimizer"] == "fused, deferred"  # ddp on the CPU: fused AdamW, steps without a host sync
