"""slurm/train.sbatch on a real one-node Slurm cluster (slurm/local_cluster.sh).

Two Slurm tasks on one node are two torchrun agents (--nnodes 2 --nproc_per_node 1) that meet
through the c10d rendezvous exactly as two nodes would; DDP then trains over the two ranks on
gloo. Skipped only when Slurm cannot be installed (no root, or apt-get fails); a cluster that is
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
JOB_TIMEOUT_S = 600  # the job takes ~40 s on 2 idle cores; generous for a loaded machine


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
    assert result.returncode == 0, (
        f"local Slurm cluster did not start:\n{result.stdout}\n{result.stderr}"
    )
    print(
        f"local cluster up in {time.monotonic() - started:.1f} s (already running: {was_running})"
    )

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


def test_sbatch_two_torchruns_meet_by_rendezvous_and_train_ddp(slurm_env, tmp_path: Path):
    run_dir = tmp_path / "run"
    out_file = tmp_path / "job-%j.out"
    overrides = [
        "parallel=ddp",
        "experiment=synthetic",
        "train.max_steps=20",
        "train.log_interval=5",
        "model.n_layer=1",
        "logger.wandb=false",
        "train.sample_tokens=0",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=2",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
    ]
    command = [
        "sbatch", "--wait", "--parsable", "--job-name=trainer-test",
        # One node, two tasks: two torchrun agents on this host, no GPUs, one CPU each.
        "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
        f"--chdir={tmp_path}", f"--output={out_file}", "--export=ALL",
        str(REPO / "slurm" / "train.sbatch"), *overrides,
    ]  # fmt: skip
    started = time.monotonic()
    try:
        result = subprocess.run(
            command, env=slurm_env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        partial = error.stdout or b""  # bytes even with text=True
        job_id = (partial.decode() if isinstance(partial, bytes) else partial).strip().split(";")[0]
        if job_id:
            subprocess.run(["scancel", job_id], env=slurm_env, timeout=30)
        pytest.fail(
            f"job {job_id or '?'} did not finish in {JOB_TIMEOUT_S} s{job_output(tmp_path)}"
        )
    elapsed = time.monotonic() - started
    job_id = result.stdout.strip().split(";")[0]
    print(f"slurm job {job_id} finished in {elapsed:.1f} s")
    assert result.returncode == 0, (
        f"sbatch --wait exited {result.returncode}: {result.stderr}{job_output(tmp_path)}"
    )

    output = (tmp_path / f"job-{job_id}.out").read_text()
    # train.sbatch's header: two torchrun agents of one process each, rendezvous on this host.
    assert "2 torchrun x 1 processes" in output, output[-2000:]

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


def job_output(tmp_path: Path) -> str:
    """The job's output file and rank logs, for failure messages."""
    parts = []
    for path in sorted(tmp_path.glob("job-*.out")) + sorted(tmp_path.glob("run/logs/*.log")):
        parts.append(f"\n--- {path.name}\n{path.read_text()[-3000:]}")
    return "".join(parts)
