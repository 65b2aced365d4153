"""slurm/train.sbatch on a real one-node Slurm cluster (slurm/local_cluster.sh).

Two Slurm tasks on one node are two torchrun agents (--nnodes 2 --nproc_per_node 1) that meet
through the c10d rendezvous exactly as two nodes would; DDP then trains over the two ranks on
gloo. Submitting the same job again (what a requeue does: same run dir, same arguments) resumes
from its last checkpoint. Skipped only when Slurm cannot be installed (no root, or apt-get fails); a cluster that is
installed but does not start, or a job that fails, is a failure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.heavy

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
STATE_DIR = Path(os.environ.get("TRAINER_SLURM_DIR", "/tmp/trainer-slurm"))
CANNOT_INSTALL = 3  # local_cluster.sh's exit code when slurm-wlm / munge cannot be installed
JOB_TIMEOUT_S = 600  # a job runs ~20 s on 2 idle cores; generous for a loaded machine


def cluster(action: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER), action, str(STATE_DIR)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def slurm_env():
    """A running local cluster and the environment its client commands need; stopped afterwards
    if this fixture started it."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root (and installs with apt-get)")
    was_running = cluster("status", timeout=30).returncode == 0
    started = time.monotonic()
    result = cluster("start")
    if result.returncode == CANNOT_INSTALL:
        pytest.skip(f"slurm-wlm / munge could not be installed: {result.stderr.strip()[-500:]}")
    assert result.returncode == 0, f"local Slurm cluster did not start:\n{result.stdout}\n{result.stderr}"
    print(f"local cluster up in {time.monotonic() - started:.1f} s (already running: {was_running})")

    again = cluster("start", timeout=30)  # idempotent: a second start finds it running
    assert again.returncode == 0 and "already running" in again.stderr, again.stderr

    env = {
        **os.environ,
        "SLURM_CONF": str(STATE_DIR / "slurm.conf"),
        # The job runs this interpreter (train.sbatch reads PYTHON), with its directory first on PATH.
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "NPROC_PER_NODE": "1",  # a CPU node: one process per torchrun
    }
    yield env
    if not was_running:
        stopped = cluster("stop", timeout=120)
        assert stopped.returncode == 0, stopped.stderr


# Job states after which a job runs no more (a requeued job passes through PENDING again).
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE",
}  # fmt: skip


def job_state(slurm_env: dict[str, str], job_id: str) -> tuple[str, str]:
    """(JobState, ExitCode) of a job from `scontrol show job` (kept MinJobAge = 300 s after it ends)."""
    line = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id],
        env=slurm_env, capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
    return fields["JobState"], fields["ExitCode"]


def submit(slurm_env: dict[str, str], tmp_path: Path, overrides: list[str]) -> tuple[str, str]:
    """Submit train.sbatch with overrides on one node, two tasks, and wait for it to end;
    (job id, job output). Polled every 0.5 s: `sbatch --wait` polls at growing intervals and
    returned ~42 s after submission for jobs that ran 20-23 s here."""
    out_file = tmp_path / "job-%j.out"
    command = [
        "sbatch", "--parsable", "--job-name=trainer-test",
        # One node, two tasks: two torchrun agents on this host, no GPUs, one CPU each.
        "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
        f"--chdir={tmp_path}", f"--output={out_file}", "--export=ALL",
        str(REPO / "slurm" / "train.sbatch"), *overrides,
    ]  # fmt: skip
    started = time.monotonic()
    submitted = subprocess.run(command, env=slurm_env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, f"sbatch exited {submitted.returncode}: {submitted.stderr}"
    job_id = submitted.stdout.strip().split(";")[0]
    state, exit_code = job_state(slurm_env, job_id)
    while state not in FINAL_STATES:
        if time.monotonic() - started > JOB_TIMEOUT_S:
            subprocess.run(["scancel", job_id], env=slurm_env, timeout=30)
            pytest.fail(f"job {job_id} did not finish in {JOB_TIMEOUT_S} s{job_output(tmp_path)}")
        time.sleep(0.5)
        state, exit_code = job_state(slurm_env, job_id)
    print(f"slurm job {job_id} finished in {time.monotonic() - started:.1f} s")
    assert (state, exit_code) == ("COMPLETED", "0:0"), (
        f"job {job_id} ended {state}, exit code {exit_code}{job_output(tmp_path)}"
    )
    return job_id, (tmp_path / f"job-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def first_job(slurm_env, tmp_path_factory) -> tuple[Path, list[str], str]:
    """One 20-step DDP job with a checkpoint every 5 steps: (its directory, overrides, output)."""
    tmp_path = tmp_path_factory.mktemp("slurm")
    overrides = [
        "parallel=ddp",
        "experiment=synthetic",
        "train.max_steps=20",
        "train.log_interval=5",
        "checkpoint.interval=5",
        "model.n_layer=1",
        "logger.wandb=false",
        "train.sample_tokens=0",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=2",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    _, output = submit(slurm_env, tmp_path, overrides)
    return tmp_path, overrides, output


def test_sbatch_two_torchruns_meet_by_rendezvous_and_train_ddp(first_job):
    tmp_path, _, output = first_job
    run_dir = tmp_path / "run"
    # train.sbatch's header: two torchrun agents of one process each, rendezvous on this host.
    assert "2 torchrun x 1 processes" in output, output[-2000:]
    assert "resumed from" not in output  # train.resume=auto on a fresh run dir: from step 0

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [5, 10, 15, 20]
    losses = [row["loss"] for row in rows]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0] - 0.1, f"loss did not fall: {losses}"
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses

    # World size 2: global batch = micro batch x accumulation x 2 ranks, and tokens follow it.
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["train"]
    assert (config["micro_batch_size"], config["grad_accum_steps"]) == (4, 2)
    global_batch = 4 * 2 * 2
    for row in rows:
        assert row["global_batch"] == global_batch
        assert row["tokens"] == row["step"] * global_batch * config["seq_len"]

    for rank in (0, 1):
        log = run_dir / "logs" / f"rank{rank}.log"
        assert log.is_file() and log.stat().st_size > 0, f"missing or empty {log}"
    assert not (run_dir / "logs" / "rank2.log").exists()

    # Every 5 steps, the newest checkpoint.keep = 2 kept, `latest` at the last.
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000015", "step_00000020"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000020"


@pytest.mark.slow  # 17 s: a second job on the first's checkpoints (the default tier runs the first)
def test_sbatch_resubmitted_job_resumes_from_last_checkpoint(slurm_env, first_job):
    """What a requeued job does: the same run dir and arguments again. train.sbatch adds
    train.resume=auto, so the job continues from step 20 (the end) instead of refusing the run
    dir or training again."""
    tmp_path, overrides, _ = first_job
    run_dir = tmp_path / "run"
    rows_before = (run_dir / "metrics.jsonl").read_text()
    _, output = submit(slurm_env, tmp_path, overrides)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000020'} at step 20" in output, output[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == rows_before  # no step was trained again
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000020"


def job_output(tmp_path: Path) -> str:
    """The jobs' output files and rank logs, for failure messages."""
    parts = []
    for path in sorted(tmp_path.glob("job-*.out")) + sorted(tmp_path.glob("run/logs/*.log")):
        parts.append(f"\n--- {path.name}\n{path.read_text()[-3000:]}")
    return "".join(parts)


# -- preemption: the time limit's SIGUSR1, a checkpoint, a requeue -----------------------------------


def job_fields(slurm_env: dict[str, str], job_id: str) -> dict[str, str]:
    """`scontrol show job` of a job as a dict (JobState, ExitCode, Restarts, ...)."""
    line = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id],
        env=slurm_env, capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


@pytest.mark.slow  # 77 s: a preempted job's requeue; the signal handling itself runs by default (test_preemption)
def test_sbatch_requeues_itself_after_usr1_and_the_run_loses_no_step(slurm_env, tmp_path: Path) -> None:
    """What `--signal=B:USR1@120` does before the time limit, sent by hand mid-run: the batch shell
    passes it on as SIGTERM to both torchruns and their ranks, the ranks stop after one agreed step,
    save it and exit 75, and the script requeues the job (`scontrol requeue`: same job id, run dir and
    output file). Its second attempt resumes with train.resume=auto and logs every step's loss
    bitwise equal to a 2-rank run that never stopped."""
    from helpers import torchrun
    from test_checkpoint import assert_same_run

    overrides = [
        "parallel=ddp", "experiment=synthetic", "train.max_steps=60", "train.log_interval=1",
        "train.eval_interval=1000", "model.n_layer=1", "logger.wandb=false", "train.sample_tokens=0",
        "train.micro_batch_size=4", "train.grad_accum_steps=2", f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    reference = torchrun("-m", "trainer", *overrides, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "run"
    command = [
        "sbatch", "--parsable", "--job-name=trainer-preempt", "--nodes=1", "--ntasks-per-node=2",
        "--gpus-per-node=0", "--cpus-per-task=1", f"--chdir={tmp_path}", f"--output={tmp_path / 'job-%j.out'}",
        "--export=ALL", str(REPO / "slurm" / "train.sbatch"), *overrides, f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    submitted = subprocess.run(command, env=slurm_env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    started = time.monotonic()

    def fields() -> dict[str, str]:
        if time.monotonic() - started > JOB_TIMEOUT_S:
            subprocess.run(["scancel", job_id], env=slurm_env, timeout=30)
            pytest.fail(f"job {job_id} did not finish in {JOB_TIMEOUT_S} s{job_output(tmp_path)}")
        time.sleep(0.2)
        return job_fields(slurm_env, job_id)

    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        assert fields()["JobState"] not in FINAL_STATES, f"job {job_id} ended unsignalled{job_output(tmp_path)}"
    signalled = subprocess.run(
        ["scancel", "--signal=USR1", "--batch", job_id], env=slurm_env, capture_output=True, text=True, timeout=30
    )
    assert signalled.returncode == 0, signalled.stderr
    # Slurm holds a requeued job until its first attempt's credentials expire (cred_expire: 120 s by
    # default, 10 s in slurm/local_cluster.sh's cluster): the second attempt starts after that.
    while (state := fields())["JobState"] not in FINAL_STATES:
        pass
    output = (tmp_path / f"job-{job_id}.out").read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-4000:]

    saves = [line for line in output.splitlines() if "SIGTERM" in line and ": saved step " in line]  # rank 0's
    assert len(saves) == 1, output[-4000:]
    stopped = int(saves[0].split(": saved step ")[1].split()[0])
    assert 5 <= stopped < 60, saves  # the step both ranks stopped after, mid-run
    assert f"train.sbatch: job {job_id} (restart 1)" in output  # the second attempt, appended to the same file
    assert f"requeueing job {job_id}" in output
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in output
    assert_same_run(run_dir, tmp_path / "full")  # every step's loss and grad norm with ==, and the weights
