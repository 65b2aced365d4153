"""benchmarks/memory.py: the ZeRO paper's formulas by hand, the byte counting, one real run.

The whole benchmark is not run here (it takes minutes); one strategy is, marked heavy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import memory
from benchmarks.memory import FP32, MIXED, storage_bytes, tensor_bytes, zero_model_states
from trainer.config import ModelConfig
from trainer.model import GPT

REPO = Path(__file__).resolve().parent.parent
PSI = 1_000_000


@pytest.mark.parametrize("stage, total", [(0, 16e6), (1, 10e6), (2, 9e6), (3, 8e6)])
def test_paper_mixed_precision_totals_at_two_ranks(stage: int, total: float) -> None:
    # 2+2+12 bytes per parameter; N=2: 16Psi, 4Psi + 12Psi/2, 2Psi + 14Psi/2, 16Psi/2.
    assert zero_model_states(PSI, 2, stage, **MIXED)["total"] == total


@pytest.mark.parametrize("stage, total", [(0, 16e6), (1, 12e6), (2, 10e6), (3, 8e6)])
def test_fp32_variant_totals_at_two_ranks(stage: int, total: float) -> None:
    # 4+4+8: 16Psi, 8Psi + 8Psi/2, 4Psi + 12Psi/2, 16Psi/2.
    assert zero_model_states(PSI, 2, stage, **FP32)["total"] == total


def test_each_stage_partitions_one_more_state() -> None:
    states = [zero_model_states(PSI, 4, stage) for stage in range(4)]  # mixed precision, N=4
    assert states[0] == {"params": 2e6, "grads": 2e6, "optim": 12e6, "total": 16e6}
    assert states[1] == {"params": 2e6, "grads": 2e6, "optim": 3e6, "total": 7e6}
    assert states[2] == {"params": 2e6, "grads": 0.5e6, "optim": 3e6, "total": 5.5e6}
    assert states[3] == {"params": 0.5e6, "grads": 0.5e6, "optim": 3e6, "total": 4e6}


def test_one_rank_is_the_baseline_at_every_stage() -> None:
    assert {zero_model_states(PSI, 1, stage)["total"] for stage in range(4)} == {16e6}
    with pytest.raises(ValueError, match="stage"):
        zero_model_states(PSI, 2, 4)


def test_predictions_map_strategies_to_stages() -> None:
    assert memory.predictions("ddp", PSI, 2) == {"paper_mixed": 16e6, "paper_fp32": 16e6}
    assert memory.predictions("fsdp", PSI, 2) == {"paper_mixed": 8e6, "paper_fp32": 8e6}
    assert memory.predictions("zero1", PSI, 2) == {"paper_mixed": 10e6, "paper_fp32": 12e6}


def test_storage_bytes_counts_each_storage_once_and_whole() -> None:
    linear = nn.Linear(4, 3)  # weight 12 + bias 3 floats
    assert storage_bytes(linear.parameters()) == 15 * 4

    embed, head = nn.Embedding(3, 4), nn.Linear(4, 3, bias=False)
    head.weight = embed.weight  # tied: one storage behind two modules
    assert storage_bytes([embed.weight, head.weight]) == 12 * 4

    weight = linear.weight
    assert storage_bytes([weight, weight[0], weight.t(), None]) == 12 * 4  # views add nothing

    flat = torch.zeros(100)
    assert storage_bytes([flat[:10]]) == 400  # a slice brings its whole buffer
    assert storage_bytes([torch.zeros(8, dtype=torch.float16)]) == 16


def test_storage_bytes_shares_seen_across_calls_and_skips_freed() -> None:
    a, b = torch.zeros(10), torch.zeros(5)
    seen: set = set()
    assert storage_bytes([a], seen) == 40
    assert storage_bytes([a[2:], b], seen) == 20  # a was claimed by the first call

    freed = torch.zeros(10)
    freed.untyped_storage().resize_(0)  # what FSDP does to a resharded parameter
    assert storage_bytes([freed, torch.empty(3, device="meta")]) == 0


def test_tensor_bytes_counts_views_not_their_buffer() -> None:
    flat = torch.zeros(100)
    views = [flat[:4], flat[4:10], flat[:4]]  # the third repeats the first
    assert tensor_bytes(views) == 40
    assert storage_bytes(views) == 400


def test_single_process_holds_params_grads_and_adam_state_exactly() -> None:
    model_cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    n_tensors = len(list(GPT(model_cfg).parameters()))
    row = memory.measure("none", model_cfg, seq_len=8, micro_batch=2)
    psi = row["param_count"]
    assert psi == sum(p.numel() for p in GPT(model_cfg).parameters())
    assert row["params"] == row["grads"] == row["grads_pre_reduce"] == 4 * psi
    # exp_avg + exp_avg_sq per parameter, and one fp32 `step` scalar per parameter tensor.
    assert row["optim"] == 8 * psi + 4 * n_tensors
    assert row["master"] == row["buffers"] == 0
    assert row["total"] == 16 * psi + 4 * n_tensors


def test_without_deepspeed_the_default_leaves_zero_out_and_asking_for_it_stops() -> None:
    assert memory.choose_strategies(None, None) == ["none", "ddp", "fsdp"]
    assert memory.choose_strategies(None, "0.19.8") == list(memory.STRATEGIES)
    assert memory.choose_strategies(["ddp"], None) == ["ddp"]
    assert memory.choose_strategies(["zero3"], "0.19.8") == ["zero3"]
    with pytest.raises(SystemExit, match=r"zero2 needs DeepSpeed.*\.\[deepspeed\]"):
        memory.choose_strategies(["ddp", "zero2"], None)


def test_a_strategy_without_deepspeed_is_measured_when_it_cannot_be_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now fails
    assert memory.deepspeed_version() is None
    model_cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    row = memory.measure("none", model_cfg, seq_len=8, micro_batch=2)
    assert row["params"] == 4 * row["param_count"]


def test_model_flags_override_a_shipped_config() -> None:
    args = memory.parse_args(["--model", "tiny", "--n-layer", "2"])
    cfg = memory.build_model_config(args)
    # tiny.yaml's null vocabulary (the tokenizer's) becomes 4096.
    assert (cfg.name, cfg.n_layer, cfg.n_embd, cfg.vocab_size) == ("tiny", 2, 128, 4096)
    with pytest.raises(SystemExit, match="shipped models"):
        memory.build_model_config(memory.parse_args(["--model", "no-such-model"]))


@pytest.mark.slow  # 17 s of torchrun + DeepSpeed: the benchmark is measured, its test asserts the layout
@pytest.mark.deepspeed
def test_zero2_on_two_ranks_partitions_grads_and_adam_state(tmp_path: Path) -> None:
    shape = {"vocab_size": 256, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 64}
    out = tmp_path / "memory.json"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in shape.items()]
    command = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--strategies",
        "zero2",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command + flags, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| zero2 | 2 |" in result.stdout

    (entry,) = json.loads(out.read_text())["rows"]
    model = GPT(ModelConfig(**shape))
    psi = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    assert entry["paper_fp32"] == 10 * psi  # 4Psi + 12Psi/2
    assert [row["rank"] for row in entry["ranks"]] == [0, 1]
    for row in entry["ranks"]:
        assert row["param_count"] == psi
        # Whole fp32 params in one flat buffer; an fp32 master copy of this rank's half;
        # exp_avg + exp_avg_sq (+ step) for this rank's half. Alignment pads by a few elements.
        assert 4 * psi <= row["params"] <= 4 * psi * 1.01
        assert 2 * psi <= row["master"] <= 2 * psi * 1.01
        assert 4 * psi <= row["optim"] <= 4 * psi * 1.01
        # This rank's gradient partition; DeepSpeed holds whole parameters that straddle it.
        assert 2 * psi <= row["grads"] <= 2 * psi + 4 * largest
        assert row["grads_pre_reduce"] == 4 * psi  # before the boundary reduce, the whole gradient
        assert row["buffers"] >= row["grads_pre_reduce"]  # ... sits in DeepSpeed's reduce bucket
    rank0, rank1 = entry["ranks"]
    for key in ("params", "master", "optim"):
        assert rank0[key] == rank1[key]
