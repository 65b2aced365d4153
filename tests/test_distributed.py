"""Every strategy on 2 real CPU ranks (gloo, torchrun) equals a single-process run.

Two checks: (1) one clipped step on a batch whose ranks hold very different numbers of target
tokens gives the single-process per-group gradient norms and weights (tests/dist_worker.py);
(2) `torchrun -m trainer` for 3 steps logs the single-process loss and grad norm at every
step and ends with the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import Config, ParallelConfig, TrainConfig
from trainer.loop import forward_backward
from trainer.model import GPT
from trainer.parallel import SingleProcess, check_launch, global_norm

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402
from runs import torchrun  # noqa: E402

STRATEGIES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]
VARIANTS = list(dist_worker.VARIANTS)  # hybrid sharding, no reshard after forward, ZeRO offload
REPO = Path(__file__).resolve().parent.parent


def assert_weights_close(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        # Relative in norm, per tensor: Adam divides by sqrt(v), so entries whose gradient is
        # ~0 can differ by a few ulps of the reduction order without meaning anything.
        gap = (actual[name].float() - tensor.float()).norm() / tensor.float().norm().clamp(min=1e-12)
        assert gap < 1e-5, f"{name}: relative gap {gap:.2e}"


@pytest.fixture(scope="module")
def single_process_step() -> dict:
    """The reference: the same masked global batch, one process, accumulation over all of it."""
    cfg = dist_worker.config("none")
    strategy = SingleProcess(torch.device("cpu"))
    torch.manual_seed(0)
    strategy.setup(GPT(dist_worker.MODEL), cfg.optim, max_steps=1)
    x, y = dist_worker.masked_global_batch()
    forward_backward(strategy, strategy.model, x, y, dist_worker.ACCUM * dist_worker.WORLD)
    strategy.unscale_gradients()
    sums = strategy.grad_sumsq_by_group()
    norm = global_norm(sums)
    before = strategy.snapshot_params()
    strategy.clip_and_step(norm, dist_worker.CLIP)
    params, updates = strategy.param_sumsq_by_group(), strategy.update_sumsq_by_group(before)
    as_floats = lambda d: {k: v.item() for k, v in d.items()}  # noqa: E731
    return {"sums": as_floats(sums), "norm": norm.item(), "params": as_floats(params),
            "updates": as_floats(updates), "weights": strategy.full_state_dict()}


@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    names = [*STRATEGIES, *VARIANTS, *dist_worker.LOW_PRECISION]
    result = torchrun(str(REPO / "tests" / "dist_worker.py"), str(out), *names, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.heavy
@pytest.mark.parametrize("strategy", STRATEGIES + VARIANTS)
def test_unequal_token_counts_across_ranks_give_the_single_process_step(
    strategy: str, single_process_step: dict, two_rank_steps: dict
) -> None:
    got, want = two_rank_steps[strategy], single_process_step
    assert want["norm"] > dist_worker.CLIP  # the step really was clipped
    assert got["norm"] == pytest.approx(want["norm"], rel=1e-5)
    assert got["sums"].keys() == want["sums"].keys()
    for kind in ("sums", "params", "updates"):  # per-layer grad norms, param norms, update sizes
        assert got[kind].keys() == want[kind].keys(), kind
        for group, value in want[kind].items():
            assert got[kind][group] == pytest.approx(value, rel=1e-5), (kind, group)
    assert sum(got["sums"].values()) == pytest.approx(got["norm"] ** 2, rel=1e-6)  # groups partition
    assert_weights_close(got["weights"], want["weights"])


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(dist_worker.LOW_PRECISION))
def test_low_precision_maps_onto_each_framework(name: str, single_process_step: dict, two_rank_steps: dict) -> None:
    """bf16 / fp16 through autocast (ddp), MixedPrecisionPolicy (fsdp), DeepSpeed's sections (zero):
    gradients close to the fp32 single-process step, per group. Weights only loosely: Adam's first
    update is lr * sign(g), so rounding that flips the sign of a tiny gradient moves a weight by
    2 lr (no step, or a wrong loss scale, would be off by ~100%)."""
    got, want = two_rank_steps[name], single_process_step
    assert got["norm"] == pytest.approx(want["norm"], rel=1e-2)
    for group, value in want["sums"].items():
        assert got["sums"][group] == pytest.approx(value, rel=5e-2), group
    for tensor_name, tensor in want["weights"].items():
        gap = (got["weights"][tensor_name].float() - tensor).norm() / tensor.norm().clamp(min=1e-12)
        assert gap < 0.15, f"{tensor_name}: relative gap {gap:.2e}"
    assert got["weights"]["embed.wte.weight"].dtype == torch.float32  # master weights stay fp32


def run_trainer(run_dir: Path, *overrides: str, nproc: int = 0) -> list[dict]:
    common = [
        "experiment=synthetic", "logger.wandb=false", "train.max_steps=3", "train.log_interval=1",
        "train.eval_interval=3", "train.sample_tokens=0", "model.n_layer=2", "model.n_embd=64",
        "train.seq_len=32", "model.bias=false", f"data.cache_dir={run_dir.parent / 'cache'}", f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    if nproc:
        result = torchrun("-m", "trainer", *common, cwd=run_dir.parent, nproc=nproc)
    else:
        env = {**os.environ, "WANDB_MODE": "offline"}
        result = subprocess.run(
            [sys.executable, "-m", "trainer", *common], cwd=run_dir.parent, env=env,
            capture_output=True, text=True, timeout=300,
        )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run_trainer(run_dir, "train.micro_batch_size=16")
    return run_dir


@pytest.mark.heavy
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_torchrun_two_ranks_match_one_process(strategy: str, reference_run: Path, tmp_path: Path) -> None:
    """Global batch 16 = 4 micro x 2 accum x 2 ranks, against 16 x 1 x 1 on one process.

    Without biases: the key projection's bias has an exactly zero true gradient (softmax ignores
    a constant added to every score of a row), so its gradient is rounding noise, which Adam
    turns into full-size steps of random sign, different for every reduction order.
    """
    rows = run_trainer(
        tmp_path / "run", f"parallel={strategy}", "train.micro_batch_size=4", "train.grad_accum_steps=2", nproc=2
    )
    reference = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["global_batch"] for r in rows] == [16, 16, 16]
    for got, want in zip(rows, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert_weights_close(
        load_file(str(tmp_path / "run" / "checkpoints" / "final" / "model.safetensors")),
        load_file(str(reference_run / "checkpoints" / "final" / "model.safetensors")),
    )
    assert (tmp_path / "run" / "logs" / "rank0.log").exists() and (tmp_path / "run" / "logs" / "rank1.log").exists()


def test_a_failing_rank_ends_the_job_with_its_message(tmp_path: Path) -> None:
    """Rank 1's corpus is empty, rank 0's is fine: the job stops (no hang) with rank 1's reason."""
    for rank, text in ((0, "print('hello world')\n" * 2000), (1, "")):
        (tmp_path / str(rank)).mkdir()
        (tmp_path / str(rank) / "corpus.txt").write_text(text)
    result = torchrun(
        "-m", "trainer", "parallel=ddp", "data=files", "data.tokenizer=byte", "logger.wandb=false",
        f"data.path={tmp_path}/${{oc.env:RANK}}", "train.max_steps=2", "parallel.timeout_s=60",
        f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    assert result.returncode != 0
    assert f"error (rank 1): data.path={tmp_path}/1 is empty" in result.stderr


# -- bad input: one line each, before any rank trains ----------------------------------------------


def test_parallel_none_with_several_processes_is_refused() -> None:
    with pytest.raises(ValueError, match="parallel=none with 2 processes"):
        check_launch(Config(), world_size=2)


def test_world_size_must_divide_the_global_batch() -> None:
    cfg = Config(parallel=ParallelConfig(strategy="ddp"), train=TrainConfig(micro_batch_size=4, global_batch_size=12))
    with pytest.raises(ValueError, match="train.global_batch_size=12 is not a multiple of .* 4 x 2"):
        check_launch(cfg, world_size=2)
    check_launch(cfg, world_size=3)  # 12 = 4 x 1 x 3
    assert cfg.train.accumulation_steps(3) == 1


def test_zero_without_deepspeed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ValueError, match="parallel=zero3 needs DeepSpeed"):
        check_launch(Config(parallel=ParallelConfig(strategy="zero3")), world_size=2)


def test_fsdp_cpu_offload_without_a_gpu_is_refused() -> None:
    from trainer.parallel.fsdp import FSDP

    with pytest.raises(ValueError, match="parallel.fsdp_cpu_offload=true needs a GPU"):
        FSDP(torch.device("cpu"), 0, 2, ParallelConfig(strategy="fsdp", fsdp_cpu_offload=True))


def test_contradicting_deepspeed_json_is_refused_and_agreeing_keys_are_honoured(tmp_path: Path) -> None:
    from trainer.parallel.zero import merged_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}))
    cfg = Config(parallel=ParallelConfig(strategy="zero2", deepspeed_config=str(path)))
    with pytest.raises(ValueError) as info:
        check_launch(cfg, world_size=2)
    assert str(info.value).startswith("parallel.deepspeed_config sets zero_optimization.stage=3 but the harness")
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}, "train_batch_size": "auto"}))
    merged = merged_deepspeed_config(cfg, world_size=2)
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert merged["train_batch_size"] == 16 * 2  # the harness's value replaces "auto"
