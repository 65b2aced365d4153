"""objective=dpo and objective=grpo (loss_type dapo and grpo) on 2 real CPU ranks (gloo, torchrun) under
ddp, fsdp, zero3 and tensor parallelism alone (parallel.tensor=2) equal one process on the same global batch: two LoRA steps through train_step
(tests/objective_worker.py), the reference being the base with the adapters off. Compared: each step's
loss, grad norm, target count and objective figures, the reference log-probs of rank 0's rows (GRPO)
and each adapter's update over the two steps.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import objective_worker as worker
import pytest
import torch
from helpers import FP32_UNIT_ROUNDOFF, LLAMA_LIKE, fp32_rtol, torchrun

REPO = Path(__file__).resolve().parent.parent
OBJECTIVES = list(worker.OBJECTIVES)
STRATEGIES = ["ddp", "fsdp", "zero3", "tp"]  # tp: parallel=none parallel.tensor=2 (both ranks on one batch)
pytestmark = pytest.mark.slow  # ~45 s on 2 CPU cores: two torch imports per rank, DeepSpeed, 9 cases
RTOL = 1e-5  # losses, figures, reference log-probs (measured: <= 6e-7 relative)
# A gradient entry adds (global rows x tokens) x (the widest inner sum, intermediate_size) products, through
# 2 matmuls per layer plus the embedding and the head; the updates are linear in it (Adam's eps = 1).
TERMS = worker.GLOBAL_ROWS * LLAMA_LIKE["block_size"] * LLAMA_LIKE["intermediate_size"]
GRAD_RTOL = fp32_rtol(terms=TERMS, depth=2 * 2 + 2)  # 4.0e-5


def cases() -> list[str]:
    strategies = ["ddp", "fsdp", "tp"] + (["zero3"] if importlib.util.find_spec("deepspeed") else [])
    return [f"{s}/{o}" for s in strategies for o in OBJECTIVES]


@pytest.fixture(scope="module")
def one_process() -> dict:
    """The reference: the whole global batch in this process (parallel=none), accumulation over all of it."""
    return {objective: worker.run_case(f"none/{objective}") for objective in OBJECTIVES}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("objective_ranks") / "results.pt"
    result = torchrun(str(REPO / "tests" / "objective_worker.py"), str(out), *cases(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out, weights_only=True)


def test_the_single_process_steps_exercise_what_ranks_must_agree_on(one_process: dict) -> None:
    """The cases are not degenerate: the policy is off its reference, every step is clipped, GRPO's ratio
    clip and KL are active, and the second step starts from moved weights."""
    for objective, run in one_process.items():
        first, second = run["steps"]
        assert first["stepped"] and second["stepped"], objective
        assert first["grad_norm"] > worker.CLIP and second["grad_norm"] > worker.CLIP, objective
        assert second["loss"] != pytest.approx(first["loss"], rel=1e-3), objective
        if objective == "dpo":
            assert first["loss"] != pytest.approx(math.log(2), rel=1e-2)  # adapters on != off
            assert 0 < first["figures"]["rewards/accuracies"] < 1
        else:
            assert 0.05 < first["figures"]["clip_ratio"] < 0.95 and first["figures"]["kl"] > 1e-3, objective
            assert run["ref_logps"].abs().sum() > 0


def assert_updates_close(got: dict, want: dict) -> None:
    """Each adapter tensor's update over the steps, in norm (the adapters themselves are larger than what
    two steps move them, so comparing them would hide a wrong update). Bound: the gradient's rounding
    (the updates are linear in it) plus the rounding of adding each step's update to the weights, up to
    u |w| per step and process, which two slightly different updates may round apart."""
    assert sorted(got["weights"]) == sorted(want["weights"])
    for name, after in want["weights"].items():
        update = after - want["initial"][name]
        gap = (got["weights"][name] - got["initial"][name] - update).norm()
        bound = GRAD_RTOL * update.norm() + 2 * worker.STEPS * FP32_UNIT_ROUNDOFF * after.norm()
        assert update.norm() > 0 and gap < bound, f"{name}: update differs by {gap / update.norm():.2e} of itself"


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_equal_one_process(strategy: str, objective: str, one_process: dict, two_ranks: dict) -> None:
    got, want = two_ranks[f"{strategy}/{objective}"], one_process[objective]
    if "ref_logps" in want:  # before any step: the base with adapters off, on rank 0's rows
        assert torch.allclose(got["ref_logps"], want["ref_logps"][got["rows"]], rtol=RTOL, atol=RTOL)
    for step, (g, w) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        where = f"step {step}"
        assert g["stepped"] and g["target_tokens"] == w["target_tokens"], where
        assert g["loss"] == pytest.approx(w["loss"], rel=RTOL), where
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=GRAD_RTOL), where
        assert g["figures"].keys() == w["figures"].keys(), where
        for name, value in w["figures"].items():
            tolerance = RTOL * abs(value) + 16 * FP32_UNIT_ROUNDOFF * operand_size(objective, name, w["figures"])
            assert g["figures"][name] == pytest.approx(value, rel=0, abs=tolerance), (where, name)
    assert_updates_close(got, want)


def operand_size(objective: str, name: str, figures: dict[str, float]) -> float:
    """The size of the terms a figure is the difference of, whose rounding it keeps however small it is:
    DPO's rewards beta x (log-prob - reference log-prob), of size beta |logps|; the k3 KL exp(r) - r - 1,
    of size 1; 0 for the rest (clip_ratio and rewards/accuracies count tokens / pairs: one apart is far
    outside RTOL)."""
    if name.startswith("rewards/") and name != "rewards/accuracies":
        (beta,) = [float(o.split("=")[1]) for o in worker.OBJECTIVES[objective] if o.startswith("objective.beta=")]
        return beta * abs(figures["logps/chosen"])
    return 1.0 if name == "kl" else 0.0
