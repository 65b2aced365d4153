"""Preemption: on SIGTERM / SIGUSR1 every rank stops after one agreed step, saves it, exits with code
75, and `train.resume=auto` continues as if nothing happened (bitwise, on CPU in fp32).

In one process the signal is sent from inside a step (a spy around train_step), so the step it
stops after is known; under torchrun one rank alone is signalled mid-run, and the ranks must agree.
The Slurm case (slurm/train.sbatch requeueing itself after a USR1) is in tests/test_slurm.py.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import QUICK, env, read_metrics, torchrun
from test_checkpoint import assert_same_run, rank_process, wait_for

import trainer.loop
from trainer.__main__ import compose_config
from trainer.checkpoint import step_dir_name, verify
from trainer.config import ConfigError
from trainer.loop import train
from trainer.preemption import EXIT_CODE, Preempted

STEPS = 8
KEYS = ("step", "loss", "grad_norm", "tokens", "target_tokens", "skipped_steps", "val_loss")


def config(cache: Path, *extra: str):
    """8 steps, a row every 4: steps 2-3 and 5-7 run deferred (no host sync until the next row)."""
    args = [
        *QUICK, f"train.max_steps={STEPS}", "train.log_interval=4", "train.eval_interval=8",
        "logger.progress_bar=false", "train.eval_batches=2", "train.num_threads=1", f"data.cache_dir={cache}", *extra,
    ]  # fmt: skip
    return compose_config(args)[0]


def rows(run_dir: Path) -> list[tuple]:
    return [tuple(row.get(key) for key in KEYS) for row in read_metrics(run_dir)]


def signal_in(monkeypatch: pytest.MonkeyPatch, name: str, sig: signal.Signals, when: int = 1) -> None:
    """Send `sig` to this process during the `when`-th call of trainer.loop.<name>."""
    real, calls = getattr(trainer.loop, name), []

    def spy(*args, **kwargs):
        calls.append(None)
        if len(calls) == when:
            os.kill(os.getpid(), sig)  # the handler runs before the next line: the flag is set
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.loop, name, spy)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run that was never stopped."""
    root = tmp_path_factory.mktemp("preemption")
    train(config(root / "cache"), root / "full")
    return root / "full"


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def test_a_signal_mid_run_saves_that_step_and_resume_is_exact(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGUSR1 during step 6 (a deferred step): the run settles steps 5-6, saves step 6 and raises
    Preempted(75). A second attempt signalled while it resumes stops before its first step with
    nothing new to save; the third ends with the rows and weights of the run that never stopped."""
    cfg, run_dir = config(reference.parent / "cache"), tmp_path / "run"
    before = signal.getsignal(signal.SIGUSR1)
    signal_in(monkeypatch, "train_step", signal.SIGUSR1, when=6)
    with caplog.at_level(logging.INFO, logger="trainer"), pytest.raises(Preempted) as stopped:
        train(cfg, run_dir)
    assert stopped.value.code == EXIT_CODE == 75
    saved = run_dir / "checkpoints" / step_dir_name(6)
    assert latest(run_dir) == saved.name and verify(saved) is None
    assert not (run_dir / "checkpoints" / "final").exists()
    assert f"SIGUSR1: saved step 6 to {saved}, exiting with code 75 for requeue; train.resume=auto" in caplog.text
    assert signal.getsignal(signal.SIGUSR1) is before  # the handlers are given back
    assert [row[0] for row in rows(run_dir)] == [4]

    monkeypatch.undo()
    resumed = config(reference.parent / "cache", "train.resume=auto")
    signal_in(monkeypatch, "resume", signal.SIGTERM)  # while the second attempt loads step 6
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"), pytest.raises(Preempted):
        train(resumed, run_dir)
    assert f"SIGTERM before the first step: step 6 is saved in {saved}, exiting with code 75" in caplog.text
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [saved.name]

    monkeypatch.undo()
    train(resumed, run_dir)
    assert rows(run_dir) == rows(reference)  # bitwise: counters of the settled steps included
    assert_same_run(run_dir, reference)


def test_a_signal_while_a_fresh_run_builds_stops_it_before_its_first_step(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing trained, nothing to save: the run says so and exits 75; train.resume=auto then starts
    from step 0 and is the same run."""
    cfg, run_dir = config(reference.parent / "cache"), tmp_path / "run"
    signal_in(monkeypatch, "build_run", signal.SIGTERM)
    with caplog.at_level(logging.INFO, logger="trainer"), pytest.raises(Preempted):
        train(cfg, run_dir)
    assert "SIGTERM before the first step: nothing trained, nothing saved, exiting with code 75" in caplog.text
    assert not list((run_dir / "checkpoints").glob("step_*"))
    monkeypatch.undo()
    train(config(reference.parent / "cache", "train.resume=auto"), run_dir)
    assert_same_run(run_dir, reference)


def test_a_signal_at_the_end_of_a_run_changes_nothing(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGUSR1 while the final weights are written: the run is complete, it says so and returns."""
    signal_in(monkeypatch, "save_weights", signal.SIGUSR1)
    with caplog.at_level(logging.INFO, logger="trainer"):
        train(config(reference.parent / "cache"), tmp_path / "run")
    assert f"SIGUSR1 came at the end of the run: step {STEPS}, the last, is saved; the run is complete" in caplog.text
    assert latest(tmp_path / "run") == step_dir_name(STEPS)
    assert_same_run(tmp_path / "run", reference)


def test_only_catchable_signals_are_accepted(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.preemption_signals: 'SIGKILL'"):
        config(tmp_path, "train.preemption_signals=[SIGKILL]")


# -- two ranks under torchrun ------------------------------------------------------------------------

TORCHRUN_STEPS = 40  # signalled at step 3: room for the agreement's step and a slow machine


def two_rank_args(cache: Path) -> list[str]:
    return [
        *QUICK, "parallel=ddp", "train.micro_batch_size=4", f"train.max_steps={TORCHRUN_STEPS}",
        "train.log_interval=1", "train.eval_interval=1000", f"data.cache_dir={cache}",
    ]  # fmt: skip


@pytest.mark.heavy
def test_one_rank_signalled_under_torchrun_stops_both_and_resume_is_exact(tmp_path: Path) -> None:
    """SIGUSR1 to rank 1 alone at step 3: both ranks stop after the same step (rank 0 never got the
    signal), that step is saved, the workers exit 75; the run resumed with train.resume=auto logs
    every step's loss bitwise equal to a run that never stopped, and ends with its weights."""
    args = two_rank_args(tmp_path / "cache")
    full = torchrun("-m", "trainer", *args, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    launcher = subprocess.Popen(
        [*command, "-m", "trainer", *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: launcher.poll() is not None or (metrics.exists() and metrics.read_text().count("\n") >= 3),
             300, "step 3")  # fmt: skip
    victim = rank_process(1, psutil.Process(launcher.pid))
    assert victim is not None and launcher.poll() is None, "the run ended before it was signalled"
    victim.send_signal(signal.SIGUSR1)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode != 0, output[-3000:]  # torchrun: its workers failed (no restarts here)
    assert output.count(f"exitcode  : {EXIT_CODE}") >= 1, output[-3000:]

    logs = {rank: (run_dir / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)}
    assert "SIGUSR1 on rank 1 after step" in logs[1] and "SIGUSR1 on rank" not in logs[0]
    stopped = int(latest(run_dir).removeprefix("step_"))
    assert 3 < stopped < TORCHRUN_STEPS, stopped
    line = f"SIGUSR1 (on 1 of 2 ranks): saved step {stopped} to {run_dir / 'checkpoints' / latest(run_dir)}"
    assert line in logs[0] and line in logs[1]  # both ranks stopped after the same step
    assert verify(run_dir / "checkpoints" / latest(run_dir)) is None
    assert [row["step"] for row in read_metrics(run_dir)] == list(range(1, stopped + 1))

    resumed = torchrun("-m", "trainer", *args, "train.resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / step_dir_name(stopped)} at step {stopped}" in resumed.stdout
    assert_same_run(run_dir, tmp_path / "full")  # every step's loss and grad norm with ==, and the weights
