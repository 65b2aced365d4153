"""HSDP (`parallel=fsdp parallel.replicate=R`: FSDP2 shards within groups of world / R ranks, replicated
across R groups, on the device mesh (replicate, shard)) at 4 real CPU ranks (gloo, torchrun):

- HSDP 2 x 2 equals FSDP over 4 and one process: per step the loss, the gradient norm, every per-layer
  gradient and parameter norm; and the final weights (fp32, 1e-5 relative). Gradients are compared, not
  only losses: gloo's FSDP2 reduction has summed where it should average (pytorch #162338).
- Checkpoints reshard across layouts: a run saved under HSDP 2 x 2 at step 2 resumes under FSDP 4 and
  under one process, and logs the uninterrupted HSDP run's later steps.
- The start line names the mesh.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import QUICK, read_metrics, run_trainer
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # five runs, three of them 4 processes on 2 cores

# optim.eps=1e-6: Adam's step is g / (sqrt(v) + eps); with the default 1e-8, an entry whose gradient is near
# zero turns its fp32 rounding (which differs between layouts: other reduction orders) into a full-size step
# of either sign, and the final weights of one process and HSDP differed by 1.2e-5 on one tensor. Above that
# noise, the weights compare at 1e-5 like the per-step norms.
RUN = [*QUICK, "train.max_steps=4", "train.log_interval=1", "train.eval_interval=4", "train.global_batch_size=8",
       "train.micro_batch_size=2", "optim.warmup_steps=0", "optim.eps=1e-6", "checkpoint.interval=2", "checkpoint.keep=4"]  # fmt: skip
COMPARED = ("loss", "grad_norm", "grad_norm/", "param_norm/")


def run(root: Path, name: str, *extra: str, nproc: int = 4) -> Path:
    return run_trainer(root, name, *RUN, *extra, nproc=nproc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hsdp")
    out = {
        "one": run(root, "one", "parallel=none", "train.micro_batch_size=8", nproc=1),
        "fsdp4": run(root, "fsdp4", "parallel=fsdp"),
        "hsdp": run(root, "hsdp", "parallel=fsdp", "parallel.replicate=2"),
    }
    step2 = out["hsdp"] / "checkpoints" / "step_00000002"
    assert step2.is_dir(), sorted(p.name for p in (out["hsdp"] / "checkpoints").iterdir())
    out["hsdp_to_fsdp4"] = run(root, "hsdp_to_fsdp4", "parallel=fsdp", f"train.resume={step2}")
    out["hsdp_to_one"] = run(
        root, "hsdp_to_one", "parallel=none", "train.micro_batch_size=8", f"train.resume={step2}", nproc=1
    )
    return out


def gap(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-12)


def assert_rows_close(got: list[dict], want: list[dict], rtol: float = 1e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        keys = {k for k in b if k.startswith(COMPARED)}
        assert keys and keys == {k for k in a if k.startswith(COMPARED)}, sorted(keys ^ set(a))
        assert any(k.startswith("grad_norm/") for k in keys)
        for key in keys:
            assert gap(a[key], b[key]) <= rtol, (b["step"], key, a[key], b[key])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors"))


@pytest.mark.parametrize("other", ["one", "fsdp4"])
def test_hsdp_2x2_equals(runs: dict[str, Path], other: str) -> None:
    assert_rows_close(read_metrics(runs["hsdp"]), read_metrics(runs[other]))
    got, want = final_weights(runs["hsdp"]), final_weights(runs[other])
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert (got[name] - tensor).norm() / tensor.norm().clamp(min=1e-12) <= 1e-5, name


@pytest.mark.parametrize("resumed", ["hsdp_to_fsdp4", "hsdp_to_one"])
def test_a_hsdp_checkpoint_resumes_under_another_layout(runs: dict[str, Path], resumed: str) -> None:
    later = [r for r in read_metrics(runs["hsdp"]) if r["step"] > 2]
    assert_rows_close(read_metrics(runs[resumed]), later)


def test_the_start_line_names_the_mesh(runs: dict[str, Path]) -> None:
    assert (
        "parallel=fsdp on 4 rank(s), mesh replicate 2 x shard 2 (HSDP"
        in (runs["hsdp"] / "logs" / "rank0.log").read_text()
    )
    assert "parallel=fsdp on 4 rank(s), mesh shard 4, device" in (runs["fsdp4"] / "logs" / "rank0.log").read_text()
