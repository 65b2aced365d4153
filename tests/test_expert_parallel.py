"""Mixture-of-experts models under the strategies, and expert parallelism (parallel.expert=N), on real
gloo ranks against one process (tests/expert_worker.py trains them).

- fsdp and zero3 shard the (E, I, H) expert tensors with the rest (FSDP2 on dim 0, the experts;
  ZeRO-3 flat), ddp with parallel.expert=2 keeps half the experts on each rank; each equals one
  process at 2 ranks over a few steps of the real loop: every logged loss, grad norm and per-layer
  norm, the parameter count and the final weights, within fp32's bound (1e-5, tests/matrix.py's).
- parallel.expert=2 at 4 ranks: two expert groups, so every block of experts has two copies whose
  gradients are averaged across the groups; one step with 2 micro-batches a rank and the noise
  scale's early reduction equals one process (and ddp without expert parallelism).
- A resume of an expert-parallel run from its mid-run checkpoint repeats the later steps bit for bit,
  and trainer.export writes whole experts (transformers loads every tensor; its logits are the
  one-process model's).
- The settings that cannot run are refused in one line each by preflight.check_run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from expert_worker import MID, overrides
from helpers import env, fp32_rtol, read_metrics, torchrun
from test_matrix import final_weights, metric_gaps, model_line, tensor_gaps

from trainer.config import ConfigError
from trainer.config.load import compose_config
from trainer.preflight import check_run

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "expert_worker.py")
FP32 = 1e-5  # relative, as tests/matrix.py's fp32 cells; measured here: up to 1.9e-7 (a per-layer grad norm)
COLUMNS = ["ddp-expert", "fsdp", "zero3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process reference, then the 2-rank columns in one process group."""
    out = tmp_path_factory.mktemp("experts")
    done = subprocess.run(
        [sys.executable, WORKER, "train", str(out), "reference"], cwd=REPO, env=env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    columns = [c for c in COLUMNS if not c.startswith("zero") or importlib.util.find_spec("deepspeed")]
    done = torchrun(WORKER, "train", str(out), *columns, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    for column in ["reference", *columns]:
        errors = sorted((out / column).glob("error.rank*.txt"))
        assert not errors, f"{column}: {errors[0].read_text()[-3000:]}"
    return out


EXPERTS_HELD = {  # block 0's w_gate (4 experts, 48, 32) on rank 0
    "ddp-expert": {"shape": [2, 48, 32], "full": [4, 48, 32]},  # experts 0-1; rank 1 has 2-3
    "fsdp": {"shape": [2, 48, 32], "full": [4, 48, 32], "placements": ["S(0)"]},  # sharded on the experts
    "zero3": {"shape": [0], "full": [4, 48, 32], "partition_numel": 4 * 48 * 32 // 2},  # half of it, flat
}


@pytest.mark.heavy
@pytest.mark.parametrize("column", COLUMNS)
def test_two_ranks_equal_one_process(column: str, trained: Path) -> None:
    got, want = trained / column / "full", trained / "reference" / "full"
    assert json.loads((trained / column / "shards.json").read_text()) == EXPERTS_HELD[column]
    assert json.loads((trained / "reference" / "shards.json").read_text())["shape"] == [4, 48, 32]
    assert model_line(got) == model_line(want)  # counted on the meta model: whole experts
    gaps = metric_gaps(read_metrics(got), read_metrics(want))  # steps, token counts exact
    gaps |= {f"weights:{k}": v for k, v in tensor_gaps(final_weights(got), final_weights(want)).items()}
    assert any(k.startswith("weights:blocks.0.mlp.w_") for k in gaps) and "grad_norm/block.1.mlp" in gaps
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] <= FP32, f"{column}: {worst} differs by {gaps[worst]:.2e}"


@pytest.mark.heavy
def test_resume_of_expert_shards_is_bitwise(trained: Path) -> None:
    """Each rank's expert blocks and their Adam moments come back from the mid-run checkpoint (saved
    once each, as slices of the whole tensor): the later steps and the final weights are identical."""
    run = trained / "ddp-expert"
    info = json.loads((run / "full" / "checkpoints" / f"step_{MID:08d}" / "model" / "info.json").read_text())
    assert info["shapes"]["blocks.0.mlp.w_gate"] == [4, 48, 32]  # the whole tensor's shape
    full, resumed = read_metrics(run / "full"), read_metrics(run / "resumed")
    later = [r for r in full if r["step"] > MID]
    assert [r["step"] for r in resumed] == [r["step"] for r in later] and later
    for a, b in zip(resumed, later, strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    assert max(tensor_gaps(final_weights(run / "resumed"), final_weights(run / "full")).values()) == 0.0


@pytest.mark.heavy
def test_export_of_an_expert_parallel_run_holds_whole_experts(trained: Path) -> None:
    """trainer.export of the ddp-expert run (its last checkpoint: each rank's blocks) is a complete
    MixtralForCausalLM: transformers loads it with no tensor missing, and its logits are those of the
    one-process run's final model."""
    import transformers

    from trainer.model.gpt import GPT
    from trainer.model.hf_import import load_hf_config

    export = trained / "ddp-expert" / "export"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(export), output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    reference = GPT(load_hf_config(export))
    reference.load_state_dict(final_weights(trained / "reference" / "full"))
    idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference.eval()(idx), model(idx).logits
    assert (got - want).abs().max() / want.abs().max() < FP32


@pytest.mark.slow  # 18 s: the averaging across expert groups; 2 ranks in one group run by default
def test_four_ranks_in_two_expert_groups_equal_one_process(tmp_path: Path) -> None:
    """parallel.expert=2 at 4 ranks: each block of experts is held by one rank of each group, and the
    copies' gradients are averaged across the groups (scaled so the average is the global batch's).
    One clipped step, 2 micro-batches a rank with very different target counts, against one process:
    the norm, every per-group gradient / parameter / update sum of squares and the weights; the
    noise scale's probe (an all-reduce after the first micro-batch, another at the last) as ddp's."""
    done = torchrun(WORKER, "step", str(tmp_path / "four.pt"), cwd=REPO, nproc=4)
    assert done.returncode == 0, done.stderr[-4000:]
    done = subprocess.run(
        [sys.executable, WORKER, "step", str(tmp_path / "one.pt")], cwd=REPO, env=env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    four, one = torch.load(tmp_path / "four.pt"), torch.load(tmp_path / "one.pt")["none"]
    got = four["ddp-expert"]
    rtol = fp32_rtol(terms=8 * 16 * 128, depth=6)  # tests/dist_worker.py's STEP_RTOL: the same step shape
    assert one["norm"] > 0.5  # clipped
    assert got["norm"] == pytest.approx(one["norm"], rel=rtol)
    for kind in ("sums", "params", "updates"):
        assert got[kind].keys() == one[kind].keys(), kind
        for group, value in one[kind].items():
            assert got[kind][group] == pytest.approx(value, rel=2 * rtol), (kind, group)
    assert got["noise"] == pytest.approx(four["ddp"]["noise"], rel=2 * rtol)
    assert got["weights"]["blocks.0.mlp.w_gate"].shape == (4, 48, 32)
    for name, tensor in one["weights"].items():
        gap = (got["weights"][name] - tensor).norm() / tensor.norm()
        assert gap < rtol, f"{name}: {gap:.2e}"


# -- refusals, one line each, before anything is built ----------------------------------------------

MOE = ["model.mlp=swiglu", "model.n_experts=4"]
REFUSALS = {  # name: (overrides, world size, the line)
    "dense": (
        ["parallel=ddp", "parallel.expert=2"], 2,
        "parallel.expert=2 splits the experts of a mixture-of-experts model, and this model is dense "
        "(model.n_experts=0): set model.n_experts, or parallel.expert=1",
    ),
    "experts-not-divided": (
        [*MOE, "parallel=ddp", "parallel.expert=3", "train.global_batch_size=48"], 3,
        "parallel.expert=3 does not divide model.n_experts=4: each rank of an expert group holds "
        "n_experts / expert of them; use a divisor of 4",
    ),
    "fsdp": (
        [*MOE, "parallel=fsdp", "parallel.expert=2"], 2,
        "parallel.expert=2 runs with parallel=ddp, not parallel=fsdp (fsdp shards them with the rest of the "
        "model): use parallel=ddp, or parallel.expert=1",
    ),
    "none": (
        [*MOE, "parallel=none", "parallel.expert=2"], 1,
        "parallel.expert=2 runs with parallel=ddp, not parallel=none (one process holds every expert): "
        "use parallel=ddp, or parallel.expert=1",
    ),
    "world-not-divided": (
        [*MOE, "parallel=ddp", "parallel.expert=4"], 2,
        "parallel.expert=4 does not divide the world size 2: expert groups are parallel.expert consecutive "
        "ranks; launch a multiple of 4 processes",
    ),
    "lora": (
        [*MOE, "parallel=ddp", "parallel.expert=2", "lora=default"], 2,
        "parallel.expert=2 with LoRA is not supported: use lora=none, or parallel.expert=1",
    ),
    "sharpness": (
        [*MOE, "parallel=ddp", "parallel.expert=2", "diagnostics.sharpness.enabled=true"], 2,
        "diagnostics.sharpness.enabled=true with parallel.expert=2 is not supported (its gradients would need "
        "the expert blocks' own reduction): turn it off, or use parallel.expert=1",
    ),
    "compile": (
        [*MOE, "train.compile=true"], 1,
        "train.compile=true with model.n_experts=4 is not supported (a sparse MLP's experts run over token "
        "slices whose sizes are data: the blocks' fullgraph compile cannot trace them): set train.compile=false",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSALS))
def test_settings_that_cannot_run_are_refused_in_one_line(name: str) -> None:
    args, world_size, line = REFUSALS[name]
    cfg, _ = compose_config(["experiment=synthetic", *args])
    with pytest.raises(ConfigError) as refused:
        check_run(cfg, world_size=world_size)
    assert str(refused.value) == line


def test_expert_parallel_settings_that_run_pass_the_checks() -> None:
    """The worker's own column passes, as does parallel.expert=2 at 4 ranks (2 expert groups)."""
    for world_size in (2, 4):
        cfg, _ = compose_config([*overrides("ddp-expert", Path("/nonexistent")), "train.global_batch_size=16"])
        check_run(cfg, world_size=world_size)
