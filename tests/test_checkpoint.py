"""Checkpoints: exact resume, a save killed half-way, elastic restarts, bad checkpoints.

Exact means bitwise on CPU in fp32: a run stopped at step s and resumed logs the same losses
and gradient norms, step for step, and ends with the same weights as the run that never stopped.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import QUICK, build, env, read_metrics, run_cli, torchrun
from safetensors.torch import load_file

from trainer.__main__ import compose_config
from trainer.checkpoint import Checkpointer, CheckpointStore, step_dir_name, verify
from trainer.config import ConfigError
from trainer.loop import TrainingError, train
from trainer.state import TrainState

STEPS, INTERVAL, STOP = 12, 4, 8  # checkpoints at 4, 8, 12; the interrupted run stops at 8


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors"))


def assert_same_run(resumed: Path, reference: Path) -> None:
    assert losses(resumed) == losses(reference)  # bitwise: floats compared with ==
    a, b = final_weights(resumed), final_weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def stop_at(run_dir: Path, copy: Path, step: int) -> None:
    """What a run killed right after its checkpoint at `step` leaves behind."""
    shutil.copytree(run_dir, copy)
    for later in (copy / "checkpoints").iterdir():
        if later.name.startswith("step_") and later.name > step_dir_name(step) or later.name == "final":
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text(step_dir_name(step) + "\n")


def quick(*extra: str) -> list[str]:
    return [
        *QUICK,
        f"train.max_steps={STEPS}",
        "train.log_interval=1",
        "train.eval_interval=6",
        f"checkpoint.interval={INTERVAL}",
        "checkpoint.keep=5",
        *extra,
    ]


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_in_one_process_is_exact(async_save: bool, tmp_path: Path) -> None:
    args = [
        *quick(f"data.cache_dir={tmp_path / 'cache'}"),
        "logger.progress_bar=false",
        f"checkpoint.async_save={async_save}",
    ]
    cfg, _ = compose_config(args)
    train(cfg, tmp_path / "full")
    assert (tmp_path / "full" / "checkpoints" / "latest").read_text().strip() == step_dir_name(STEPS)
    assert all(verify(p) is None for p in (tmp_path / "full" / "checkpoints").glob("step_*"))
    assert not list((tmp_path / "full" / "checkpoints").glob("*.tmp"))
    stop_at(tmp_path / "full", tmp_path / "resumed", STOP)
    resumed_cfg, _ = compose_config([*args, "train.resume=auto"])
    train(resumed_cfg, tmp_path / "resumed")
    assert_same_run(tmp_path / "resumed", tmp_path / "full")


def _stepper(device: str):
    """A small GPT under parallel=none on `device` and a function taking one optimizer step."""
    from trainer.config import Config, ModelConfig, ParallelConfig, TrainConfig
    from trainer.step import train_step

    model_cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=32)
    cfg = Config(
        model=model_cfg,
        parallel=ParallelConfig(strategy="none"),
        train=TrainConfig(micro_batch_size=4, seq_len=32, max_steps=100, device=device),
    )
    strategy = build(cfg)
    tokens = torch.randint(256, (4, 33)).to(strategy.device)

    def step() -> None:
        train_step(strategy, tokens[:, :-1], tokens[:, 1:], 1, clip_grad_norm=1.0)

    return strategy, step


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_async_save_holds_the_state_of_its_step(device: str, tmp_path: Path) -> None:
    """Training goes on while the background thread writes: the checkpoint must hold the weights
    and AdamW moments of the step it was taken at, not later ones (on a GPU: the copies to CPU
    memory are complete before save() returns)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    strategy, step = _stepper(device)
    for _ in range(2):
        step()
    at_save = {k: v.detach().cpu().clone() for k, v in strategy.model.state_dict().items()}
    moments = [s["exp_avg"].detach().cpu().clone() for s in strategy.optimizer.state.values()]
    checkpointer = Checkpointer(CheckpointStore(tmp_path, keep=2))
    path = checkpointer.save(2, {**strategy.checkpoint_parts(), "train_state": TrainState(step=2)}, async_save=True)
    for _ in range(3):
        step()  # changes every tensor in place while the write may still be in flight
    checkpointer.wait()
    assert verify(path) is None
    now = strategy.model.state_dict()
    assert all(not torch.equal(now[k].cpu(), at_save[k]) for k in at_save if k.endswith("weight"))

    fresh, fresh_step = _stepper(device)
    fresh_step()  # AdamW state exists, with other values
    Checkpointer(CheckpointStore(tmp_path)).load(path, fresh.checkpoint_parts())
    loaded = fresh.model.state_dict()
    assert loaded.keys() == at_save.keys()
    assert all(torch.equal(loaded[k].cpu(), at_save[k]) for k in at_save)
    loaded_moments = [s["exp_avg"].cpu() for s in fresh.optimizer.state.values()]
    assert len(loaded_moments) == len(moments)
    assert all(torch.equal(a, b) for a, b in zip(loaded_moments, moments, strict=True))


@pytest.mark.slow  # every matrix cell resumes too (the covering subset runs by default)
# Here: both ranks' files in the manifest and a resume through the CLI. async: one process here, 2
# ranks in test_faults.
@pytest.mark.parametrize("strategy", ["fsdp"])  # every strategy's resume: each cell of tests/matrix.py
def test_resume_on_two_ranks_is_exact(strategy: str, tmp_path: Path) -> None:
    """A 2-rank run stopped and resumed from its checkpoint logs every step as the uninterrupted run
    does. (strategy+async: written by a background thread on each rank; kept for a by-hand run.)"""
    strategy, _, mode = strategy.partition("+")
    args = quick(
        f"parallel={strategy}",
        "train.micro_batch_size=4",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"checkpoint.async_save={mode == 'async'}",
    )
    result = torchrun("-m", "trainer", *args, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = sorted((tmp_path / "full" / "checkpoints").glob("step_*"))
    assert [p.name for p in saved] == [step_dir_name(s) for s in range(INTERVAL, STEPS + 1, INTERVAL)]
    assert all(verify(p) is None for p in saved)
    listed = set(json.loads((saved[-1] / "manifest.json").read_text())["files"])  # both ranks' checksums
    on_disk = {str(p.relative_to(saved[-1])) for p in saved[-1].rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk and {"rng/rank0.json", "rng/rank1.json"} <= listed
    stop_at(tmp_path / "full", tmp_path / "resumed", STOP)
    result = torchrun(
        "-m", "trainer", *args, "train.resume=auto", f"hydra.run.dir={tmp_path / 'resumed'}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {tmp_path / 'resumed' / 'checkpoints' / step_dir_name(STOP)}" in result.stdout
    assert_same_run(tmp_path / "resumed", tmp_path / "full")


@pytest.mark.slow  # 16.5 s
# zero1 shares zero2's optimizer class and checkpoint format in DeepSpeed; 1 -> 2 ranks ran here
# too (19 s) and was dropped from the suite for time.
@pytest.mark.parametrize(("stage", "saved_on", "resumed_on"), [("zero2", 2, 1)])
def test_a_zero_checkpoint_resumes_at_another_world_size(
    stage: str, saved_on: int, resumed_on: int, tmp_path: Path
) -> None:
    """DeepSpeed's partitions are converted to a universal checkpoint and repartitioned. With the
    global batch fixed, the resumed run replays the same batches, so it logs the losses of the run
    that never stopped (to fp32 rounding: reductions are ordered differently)."""
    args = quick(
        f"parallel={stage}",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        f"data.cache_dir={tmp_path / 'cache'}",
    )

    def launch(world: int, *extra: str) -> subprocess.CompletedProcess:
        if world == 1:  # a plain process: the strategy starts a group of one for DeepSpeed
            return run_cli(*args, *extra, cwd=tmp_path)
        return torchrun("-m", "trainer", *args, *extra, cwd=tmp_path, nproc=world)

    full = launch(saved_on, f"hydra.run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    stop_at(tmp_path / "full", tmp_path / "resumed", STOP)
    resumed = launch(resumed_on, "train.resume=auto", f"hydra.run.dir={tmp_path / 'resumed'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'resumed' / 'checkpoints' / step_dir_name(STOP)}" in resumed.stdout
    after = [r for r in losses(tmp_path / "resumed") if r[0] > STOP]
    reference = [r for r in losses(tmp_path / "full") if r[0] > STOP]
    assert [r[0] for r in after] == [r[0] for r in reference] == list(range(STOP + 1, STEPS + 1))
    assert [r[1] for r in after] == pytest.approx([r[1] for r in reference], rel=1e-5)
    assert [r[2] for r in after] == pytest.approx([r[2] for r in reference], rel=1e-4)
    a, b = final_weights(tmp_path / "resumed"), final_weights(tmp_path / "full")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert verify(checkpoints / step_dir_name(STOP)) is None  # only read
    assert not list(checkpoints.glob(".universal-*"))  # the converted copy is gone


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


@pytest.mark.heavy
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    # A bigger model so that writing a checkpoint takes long enough to be caught half-way.
    args = [
        *quick(f"data.cache_dir={tmp_path / 'cache'}"),
        "model.n_embd=384",
        "model.n_layer=4",
        "train.micro_batch_size=2",
        "checkpoint.interval=2",
        "train.max_steps=6",
        "train.eval_interval=100",
    ]
    reference = run_cli(*args, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer", *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    half_written = run_dir / "checkpoints" / (step_dir_name(4) + ".tmp")
    wait_for(lambda: (half_written / "model").exists() or process.poll() is not None, 240, "the second save")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert half_written.exists(), "the save finished before the kill: the model is too small to catch it"
    assert not (run_dir / "checkpoints" / step_dir_name(4)).exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == step_dir_name(2)
    assert verify(run_dir / "checkpoints" / step_dir_name(2)) is None

    resumed = run_cli(*args, "train.resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / step_dir_name(2)}" in resumed.stdout
    assert_same_run(run_dir, tmp_path / "full")
    assert not half_written.exists()  # the next save at that step cleaned it up


def rank_process(rank: int, parent: psutil.Process) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "trainer" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


ELASTIC_ARGS = [
    "parallel=ddp",
    "train.micro_batch_size=4",
    "train.max_steps=16",
    "train.resume=auto",
    "parallel.timeout_s=120",
]


@pytest.fixture(scope="module")
def uninterrupted_ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("elastic")
    args = [*quick(f"data.cache_dir={root / 'cache'}"), *ELASTIC_ARGS]
    full = torchrun("-m", "trainer", *args, f"hydra.run.dir={root / 'full'}", cwd=root)
    assert full.returncode == 0, full.stderr[-3000:]
    return root / "full"


@pytest.mark.slow  # 25 s a case: the default tier keeps SIGKILL during a save and the preemption cases
@pytest.mark.parametrize("share_store", ["1", "0"], ids=["agent-store", "store-per-round"])
def test_elastic_restart_after_a_rank_is_killed(share_store: str, uninterrupted_ddp: Path, tmp_path: Path) -> None:
    """torchrun --max-restarts=1: rank 1 SIGKILLed mid-run; the group restarts, resumes from the
    newest checkpoint and ends with the weights of the run that was never interrupted.

    agent-store: torchrun's default, one store for the whole job, where a restarted group used to
    find the dead group's keys and hang in init_process_group; store-per-round: what the
    multi-node launchers choose (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    args = [*quick(f"data.cache_dir={tmp_path / 'cache'}"), *ELASTIC_ARGS]
    run_dir = tmp_path / "elastic"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "-m",
        "trainer",
        *args,
        f"hydra.run.dir={run_dir}",
    ]
    launcher = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0" if share_store == "1" else "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    checkpoint_8 = run_dir / "checkpoints" / step_dir_name(8)
    wait_for(lambda: checkpoint_8.exists() or launcher.poll() is not None, 300, "the checkpoint at step 8")
    victim = rank_process(1, psutil.Process(launcher.pid))
    assert victim is not None and launcher.poll() is None
    victim.send_signal(signal.SIGKILL)
    try:
        output, _ = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            child.kill()
        launcher.kill()
        output, _ = launcher.communicate()
        pytest.fail(f"the restarted group did not finish in 300 s:\n{output[-4000:]}")
    assert launcher.returncode == 0, output[-4000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in output
    assert losses(run_dir)[-1] == losses(uninterrupted_ddp)[-1]
    a, b = final_weights(run_dir), final_weights(uninterrupted_ddp)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- bad input ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    cfg, _ = compose_config([*quick(f"data.cache_dir={root / 'cache'}"), "logger.progress_bar=false"])
    train(cfg, root / "run")
    return root / "run"


def test_a_missing_resume_path_is_one_line(small_run: Path, tmp_path: Path) -> None:
    result = run_cli(*quick(), "train.resume=/no/such/checkpoint", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.resume=/no/such/checkpoint does not exist: give a checkpoint directory, auto or none"
    ]


def test_a_truncated_checkpoint_is_reported_and_the_previous_one_used(small_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    newest = run_dir / "checkpoints" / step_dir_name(STEPS)
    shard = next((newest / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # a file cut short
    warnings: list[str] = []
    found = CheckpointStore(run_dir).find("auto", warn=warnings.append)
    assert found == run_dir / "checkpoints" / step_dir_name(8)
    assert len(warnings) == 1 and "truncated" in warnings[0] and shard.name in warnings[0]
    with pytest.raises(ConfigError, match="cannot be used: .*truncated"):
        CheckpointStore(run_dir).find(str(newest))


def test_a_file_missing_from_the_manifest_fails_verification(small_run: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "step"
    shutil.copytree(small_run / "checkpoints" / step_dir_name(STEPS), checkpoint)
    assert verify(checkpoint) is None
    (checkpoint / "model" / "__9_0.distcp").write_bytes(b"written after the commit")
    assert (
        verify(checkpoint) == f"{checkpoint / 'model' / '__9_0.distcp'} is not in the manifest "
        "(written after the commit, or a rank's checksums lost)"
    )


def test_a_checkpoint_of_another_shape_lists_the_mismatched_tensors(small_run: Path, tmp_path: Path) -> None:
    cfg, _ = compose_config(
        [
            *quick(f"data.cache_dir={tmp_path / 'cache'}"),
            "model.n_embd=32",
            "logger.progress_bar=false",
            f"train.resume={small_run / 'checkpoints' / step_dir_name(STEPS)}",
        ]
    )
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path / "other")
    message = str(info.value)
    assert message.startswith(
        f"checkpoint {small_run / 'checkpoints' / step_dir_name(STEPS)} is from a different model shape"
    )
    assert "blocks.0.attn.c_attn.weight [192, 64] vs [96, 32]" in message and "... 7 more" in message
    assert "\n" not in message
    assert not (tmp_path / "other" / "metrics.jsonl").exists()


def test_an_existing_run_needs_resume(small_run: Path, tmp_path: Path) -> None:
    before = (small_run / "metrics.jsonl").read_text()
    result = run_cli(*quick(), f"hydra.run.dir={small_run}", cwd=tmp_path)
    assert result.returncode == 2 and "continue it with train.resume=auto" in result.stderr
    assert (small_run / "metrics.jsonl").read_text() == before


def test_zero3_at_another_world_size_is_one_line(small_run: Path) -> None:
    from trainer.parallel.model_state import check_compatible

    info = {"shapes": {}, "strategy": "zero3", "world_size": 2}
    with pytest.raises(ConfigError, match=r"holds ZeRO-3 partitions for 2 ranks, this run has 4: resume ZeRO-3 at"):
        check_compatible(info, {}, "zero3", 4, small_run)
    check_compatible({**info, "strategy": "zero2"}, {}, "zero2", 4, small_run)


def test_consecutive_non_finite_steps_stop_the_run(tmp_path: Path) -> None:
    """fp16 with an absurd initial loss scale overflows step after step."""
    cfg, _ = compose_config(
        [
            *quick(f"data.cache_dir={tmp_path / 'cache'}"),
            "logger.progress_bar=false",
            "precision=fp16",
            "precision.initial_scale=1e30",
            "train.max_consecutive_skips=3",
            "checkpoint.interval=0",
        ]
    )
    with pytest.raises(TrainingError, match="stopping at step 3: 3 steps in a row had inf / NaN gradients"):
        train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in rows] == [1, 2]
    assert [r["loss_scale"] for r in rows] == [5e29, 2.5e29]


def test_checkpoints_hold_no_pickles(small_run: Path) -> None:
    newest = small_run / "checkpoints" / step_dir_name(STEPS)
    meta = json.loads((newest / "meta.json").read_text())
    info = json.loads((newest / "model" / "info.json").read_text())
    assert meta["step"] == STEPS and info["strategy"] == "none" and meta["parts"]["sampler"]["position"] > 0
    assert meta["parts"]["train_state"]["step"] == STEPS and set(meta["parts"]) == {
        "scheduler", "train_state", "spikes", "sampler", "tokenizer"
    }  # fmt: skip
    names = {p.name for p in newest.rglob("*") if p.is_file()}
    assert {"meta.json", "manifest.json", "rank0.json", "rank0.safetensors", ".metadata", "info.json"} <= names
    assert not [n for n in names if n.endswith((".pt", ".pkl", ".bin"))]
    assert len(list((small_run / "checkpoints").glob("step_*"))) == 3  # 4, 8, 12 with keep=5


def test_checksums_read_in_blocks_match_hashlib(tmp_path: Path) -> None:
    import hashlib

    from trainer.checkpoint import _sha256

    data = torch.randint(0, 256, (10_007,), dtype=torch.uint8).numpy().tobytes()
    (tmp_path / "f").write_bytes(data)
    assert _sha256(tmp_path / "f", block=1000) == hashlib.sha256(data).hexdigest()  # 11 blocks, the last short
    (tmp_path / "empty").write_bytes(b"")
    assert _sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_a_checkpoint_from_before_vocabulary_padding_is_told_how_to_resume() -> None:
    from trainer.parallel.model_state import check_compatible

    info = {"shapes": {"embed.wte.weight": [50257, 8], "blocks.0.attn.c_attn.weight": [24, 8]}, "strategy": "none"}
    padded = {"embed.wte.weight": [50304, 8], "blocks.0.attn.c_attn.weight": [24, 8]}
    with pytest.raises(ConfigError, match=r"resumes with model.vocab_multiple=1\)$"):
        check_compatible(info, padded, "none", 1, Path("ckpt"))
    other = {"embed.wte.weight": [50304, 8], "blocks.0.attn.c_attn.weight": [48, 8]}
    with pytest.raises(ConfigError) as refused:
        check_compatible(info, other, "none", 1, Path("ckpt"))
    assert "vocab_multiple" not in str(refused.value)  # another shape change: no such hint
