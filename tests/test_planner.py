"""trainer.estimate.planner: the activation-checkpointing plan against estimate() and against a
measured CPU step (benchmarks/estimate_check.py's measure), monotonicity, the FLOP count against
GPT.flops_per_token, budget parsing and the command's lines."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from benchmarks.estimate_check import GEMMA, MOE, SMALL, measure
from trainer.__main__ import compose_config
from trainer.estimate import count_parameters, estimate, model_shape, planner
from trainer.estimate.cli import main
from trainer.estimate.planner import GIB, MODES, analytic_costs, measure_block, parse_bytes, plan

MIB = 2**20
# Four blocks of a Llama-style model, activations the larger part of the peak (about 18 MiB)
TINY = [
    "model.norm=rmsnorm", "model.mlp=swiglu", "model.position=rope", "model.bias=false",
    "model.tie_embeddings=false", "model.n_layer=4", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2",
    "model.vocab_size=256", "train.micro_batch_size=4", "train.seq_len=128",
]  # fmt: skip


LORA = ["precision=bf16", "lora.enabled=true", "lora.target_modules=[q_proj,v_proj,up_proj]"]


def config(*overrides: str):
    return compose_config([*SMALL, *TINY, *overrides])[0]


def with_setting(cfg, mode: str, every: int):
    return replace(cfg, model=replace(cfg.model, activation_checkpointing=mode, activation_checkpointing_every=every))


@pytest.mark.parametrize(
    "text, expected",
    [("70GiB", 70 * GIB), ("70 GiB", 70 * GIB), ("80GB", 80 * 10**9), ("512MiB", 512 * MIB), ("1.5gib", 1.5 * GIB),
     ("123456", 123456), ("1e9", 10**9), ("4096B", 4096)],
)  # fmt: skip
def test_budget_parsing(text: str, expected: float) -> None:
    assert parse_bytes(text) == int(expected)


@pytest.mark.parametrize("text", ["70XB", "GiB", "-1GiB", "0", "70 Gi B", ""])
def test_bad_budget_names_the_units(text: str) -> None:
    with pytest.raises(ValueError, match="GiB, GB, MiB, MB or bytes"):
        parse_bytes(text)


@pytest.mark.parametrize(
    "overrides, world_size",
    [([], 1), (["precision=bf16", "lora.enabled=true"], 1), (["precision=bf16", "parallel=fsdp"], 4)],
    ids=["fp32", "bf16-lora", "bf16-fsdp-4"],
)
def test_every_peak_is_the_estimates(overrides: list[str], world_size: int) -> None:
    """Each candidate's peak is estimate()'s for that setting, under LoRA (block 0 reads a frozen
    embedding) and sharding too."""
    cfg = config(*overrides)
    for r in plan(cfg, 1e12, world_size)["candidates"]:
        expected = estimate(with_setting(cfg, r["mode"], r["every"]), world_size)["peak"]["bytes"]
        assert r["peak"] == expected, r["setting"]


def test_more_checkpointing_keeps_less_and_recomputes_more() -> None:
    """Within a mode, more checkpointed blocks keep less and recompute more, in proportion; none
    recomputes nothing and keeps the most; one row per (mode, checkpointed blocks)."""
    rows = plan(config(), 1e12)["candidates"]
    none = next(r for r in rows if r["mode"] == "none")
    assert none["recompute"] == 0 and none["peak"] == max(r["peak"] for r in rows)
    assert {(r["mode"], r["checkpointed"]) for r in rows} == {("none", 0)} | {(m, c) for m in MODES for c in (1, 2, 4)}
    for mode in MODES:
        by_count = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["checkpointed"])
        assert all(a["peak"] > b["peak"] for a, b in zip(by_count, by_count[1:], strict=False))
        assert all(a["recompute"] < b["recompute"] for a, b in zip(by_count, by_count[1:], strict=False))
    full = {r["checkpointed"]: r for r in rows if r["mode"] == "full"}
    assert full[4]["recompute"] == pytest.approx(2 * full[2]["recompute"]) == pytest.approx(4 * full[1]["recompute"])


def test_flops_are_the_monitors() -> None:
    """Full training: the step is GPT.flops_per_token's 6 N + 12 L C T (less the norms, not
    matmuls), a full recompute of every block one forward of the blocks (a bit under 1/3). LoRA's
    frozen base skips its weight gradients, so the same recompute is a larger share."""
    from trainer.model import GPT

    cfg = config()
    m = model_shape(cfg)
    costs = analytic_costs(m, count_parameters(cfg, m), 128)
    norms = (2 * 4 + 1) * 64
    assert costs.step + 6 * norms == GPT(m).flops_per_token(128)
    assert 0.30 < costs.recompute("full", 4) < 1 / 3
    assert costs.recompute("full", 4) == pytest.approx(costs.recompute("attention", 4) + costs.recompute("mlp", 4))
    lora = config("lora.enabled=true")
    lora_costs = analytic_costs(m, count_parameters(lora, model_shape(lora)), 128)
    assert 1 / 3 < lora_costs.recompute("full", 4) < 1 / 2


@pytest.mark.parametrize("shape", [GEMMA, MOE], ids=["gemma", "moe"])
def test_flops_follow_the_switches(shape: list[str]) -> None:
    """Full training with an own head size, q / k norms, sandwich norms, or sparse MLPs among dense
    ones: the step is still GPT.flops_per_token's (a token's router and k of E experts), less the
    norms; a block's attention and MLP are the blocks' means."""
    from trainer.model import GPT

    cfg = compose_config([*SMALL, *shape, "model.vocab_size=256", "train.seq_len=128"])[0]
    m = model_shape(cfg)
    model = GPT(m)
    costs = analytic_costs(m, count_parameters(cfg, m), 128)
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert costs.step + 6 * norms == model.flops_per_token(128)
    if shape is MOE:  # block 0 dense (3 x 64 x 128), blocks 1 and 2 a router (8 x 64) and 2 experts (3 x 64 x 48)
        assert costs.mlp == 2 * (3 * 64 * 128 + 2 * (8 * 64 + 2 * 3 * 64 * 48)) / 3


def test_the_plan_fits_when_measured() -> None:
    """A budget between two settings' peaks: the plan is the one with less recompute that fits, its
    measured peak (a CPU step under the profiler) is within the budget, and the cheaper setting
    that keeps least is over it as measured too."""
    cfg = config()
    rows = plan(cfg, 1e12)["candidates"]
    target = next(r for r in rows if r["setting"] == "full, every 2")
    cheaper = min((r for r in rows if r["recompute"] < target["recompute"]), key=lambda r: r["peak"])
    budget = (target["peak"] + cheaper["peak"]) / 2
    chosen = plan(cfg, budget)["chosen"]
    assert chosen["setting"] == "full, every 2" and chosen["peak"] <= budget
    fits, over = measure([*TINY, *chosen["overrides"].split()]), measure([*TINY, *cheaper["overrides"].split()])
    assert fits["peak"] <= budget < over["peak"]
    assert fits["predicted_peak"] == chosen["peak"]
    assert fits["peak"] == pytest.approx(chosen["peak"], rel=0.05)
    assert fits["saved"] < over["saved"]


def test_cli_plan_json_and_errors(capsys: pytest.CaptureFixture) -> None:
    args = [*SMALL, *TINY]
    assert main(["--memory-budget", "13MiB", *args]) == 0
    out = capsys.readouterr().out
    assert "| **peak** |" in out and "| setting | checkpointed blocks | peak MiB |" in out
    plan_line = next(line for line in out.splitlines() if line.startswith("plan: "))
    assert plan_line.startswith(
        "plan: model.activation_checkpointing=full model.activation_checkpointing_every=2 (peak 12.06 MiB <= 13 MiB, +"
    )
    assert (
        "least peak x compute (exercise 5e): model.activation_checkpointing=full model.activation_checkpointing_every=1"
        in out
    )

    assert main(["--memory-budget", "13MiB", "--json", *args]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["plan"]["chosen"]["overrides"] in plan_line and as_json["plan"]["budget"] == 13 * MIB

    assert main(["--memory-budget", "1MiB", *args]) == 1  # nothing fits: one line, what else to try
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: ")]
    assert len(lines) == 1 and lines[0].startswith("plan: nothing fits 1 MiB: the least peak is 8.539 MiB (")
    for hint in ("lora.enabled=true", "parallel=fsdp", "train.micro_batch_size=2", "model.loss_chunk_size", "bf16"):
        assert hint in lines[0]

    assert main(["--memory-budget", "70XB", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "70XB" in err and "GiB" in err
    assert main(["--measure", *args]) == 2 and "--memory-budget" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, timed_flops",
    [([], 1e12), (LORA, 1e12), (LORA, 0)],
    ids=["fp32", "bf16-lora", "bf16-lora-extrapolated"],
)  # fmt: skip
def test_measure_counts_one_block_as_the_estimate_does(
    overrides: list[str], timed_flops: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--measure on the CPU: the bytes one block, its attention and its MLP save (autocast's copies
    and the adapters' included) equal the analytic ones, so the measured plan's peaks are the same;
    also when one sequence is timed and the bytes come from 1 and 2 (the half copies of the
    adapters are weight-sized: scaling them by the micro-batch would miss)."""
    monkeypatch.setattr(planner, "CPU_TIMED_FLOPS", timed_flops)
    cfg = config(*overrides)
    m = model_shape(cfg)
    measured = measure_block(cfg, m, count_parameters(cfg, m), repeats=1)
    assert measured["device"] == "cpu" and measured["tokens"] == (4 if timed_flops else 1) * 128
    assert measured["extrapolated_to"] == (None if timed_flops else 4)
    for part in ("block", "attention", "mlp"):
        assert measured[part] == measured[f"analytic_{part}"] > 0
    assert measured["costs"].source.startswith("block timings measured on cpu")  # timings: not asserted


@pytest.mark.parametrize(
    "shape", [[*GEMMA, "precision=bf16"], [*MOE, "model.moe_layers=[0,2]"]], ids=["gemma-bf16", "moe-sparse-block-0"]
)
def test_measure_counts_a_gemma_or_sparse_block(shape: list[str]) -> None:
    """--measure's one block (block 0 alone: its layer type, a sparse MLP when block 0 has one) saves
    the bytes activation_bytes gives block 0, its attention and its MLP."""
    cfg = compose_config([*SMALL, *shape, "model.vocab_size=256", "train.micro_batch_size=2", "train.seq_len=64"])[0]
    m = model_shape(cfg)
    measured = measure_block(cfg, m, count_parameters(cfg, m), repeats=1)
    for part in ("block", "attention", "mlp"):
        assert measured[part] == measured[f"analytic_{part}"] > 0


def test_cli_measure(capsys: pytest.CaptureFixture) -> None:
    """The measured plan's lines; its peaks are the analytic ones (the bytes are, above), its
    recompute comes from timings (not asserted)."""
    assert main(["--memory-budget", "13MiB", "--measure", *SMALL, *TINY]) == 0
    out = capsys.readouterr().out
    assert "recompute from block timings measured on cpu" in out
    assert "measured on cpu, 1 thread (512 tokens): a block saves 3.3 MiB (analytic 3.3)" in out
    assert "by the FLOP count (exercise 5d)" in out
    plan_line = next(line for line in out.splitlines() if line.startswith("plan: "))
    assert plan_line.startswith("plan: model.activation_checkpointing=") and "MiB <= 13 MiB, +" in plan_line
