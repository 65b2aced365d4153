"""The launch scripts (launch/, slurm/): syntax, the exact launcher command each one builds, and
real multi-process runs through single_node.sh (torchrun) and deepspeed.sh (DeepSpeed's launcher).

The command tests swap the interpreter (PYTHON) and Slurm's srun / scontrol for stubs that
record their arguments, so they check every flag in a fraction of a second without launching.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("slurm/*.sh"), *REPO.glob("slurm/*.sbatch")])

RUN_TIMEOUT_S = 600  # a real 2-rank run: ~20 s on 2 idle cores, much longer on a loaded machine

# A recording stub: writes its arguments (one per line) and its environment, then exits 0.
STUB = """#!/bin/sh
printf '%s\\n' "$@" > "{out}.args"
env > "{out}.env"
"""


def quick_overrides(tmp_path: Path) -> list[str]:
    """The quick CPU config: a 1-layer model, 20 steps on the synthetic source, logged every 5."""
    return [
        "experiment=synthetic",
        "train.max_steps=20",
        "train.log_interval=5",
        "model.n_layer=1",
        "logger.wandb=false",
        "train.sample_tokens=0",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]


def make_stub(directory: Path, name: str) -> Path:
    """An executable stub `name` in directory that records to directory/name.{args,env}."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(STUB.format(out=directory / name))
    path.chmod(0o755)
    return path


def recorded(directory: Path, name: str) -> tuple[list[str], dict[str, str]]:
    """The arguments and environment a stub recorded."""
    args = (directory / f"{name}.args").read_text().splitlines()
    env = dict(line.split("=", 1) for line in (directory / f"{name}.env").read_text().splitlines() if "=" in line)
    return args, env


def flag(args: list[str], name: str) -> str:
    """The value following flag `name` in args (exactly one occurrence expected)."""
    assert args.count(name) == 1, f"{name} appears {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


def run_script(
    script: str, args: list[str], env: dict[str, str], timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a script with a clean launch environment plus env; on timeout, end its whole process
    group (launcher and ranks) and fail."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC", "OMP_", "CUDA_"))}
    command = ["bash", str(REPO / script), *args]
    with subprocess.Popen(
        command, env={**base, **env}, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    ) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group this call started, ranks included
            stdout, stderr = process.communicate()
            pytest.fail(f"{script} ran past {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


# -- syntax -----------------------------------------------------------------------------------------


def test_expected_scripts_exist():
    names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    expected = {
        "launch/single_node.sh",
        "launch/multi_node.sh",
        "launch/deepspeed.sh",
        "launch/common.sh",
        "slurm/train.sbatch",
        "slurm/local_cluster.sh",
    }
    assert expected <= names, f"missing: {expected - names}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_bash_syntax(script: Path):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck not installed (apt-get install shellcheck)",
)
def test_shellcheck():
    result = subprocess.run(
        ["shellcheck", "-x", *[str(p.relative_to(REPO)) for p in SCRIPTS]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the commands the scripts build -----------------------------------------------------------------


@pytest.mark.parametrize(("visible", "nproc"), [("0,1,2", 3), ("", 2)])
def test_single_node_counts_gpus_else_two_cpu_ranks(tmp_path: Path, visible: str, nproc: int):
    python = make_stub(tmp_path, "python")
    result = run_script(
        "launch/single_node.sh",
        ["parallel=ddp", "a.b=1"],
        {"PYTHON": str(python), "CUDA_VISIBLE_DEVICES": visible},
    )
    assert result.returncode == 0, result.stderr
    args, env = recorded(tmp_path, "python")
    assert args[:2] == ["-m", "torch.distributed.run"]
    assert "--standalone" in args
    assert flag(args, "--nproc_per_node") == str(nproc)
    assert args[-4:] == ["-m", "trainer", "parallel=ddp", "a.b=1"]
    assert "--max-restarts" not in args  # no restarts, so no train.resume=auto added either
    assert env["OMP_NUM_THREADS"] == str(max(os.cpu_count() // nproc, 1))


def test_single_node_nproc_and_threads_from_environment(tmp_path: Path):
    python = make_stub(tmp_path, "python")
    result = run_script("launch/single_node.sh", [], {"PYTHON": str(python), "NPROC": "5", "OMP_NUM_THREADS": "7"})
    assert result.returncode == 0, result.stderr
    args, env = recorded(tmp_path, "python")
    assert flag(args, "--nproc_per_node") == "5"
    assert env["OMP_NUM_THREADS"] == "7"


def test_multi_node_uses_c10d_rendezvous(tmp_path: Path):
    python = make_stub(tmp_path, "python")
    result = run_script(
        "launch/multi_node.sh",
        ["parallel=fsdp", "hydra.run.dir=/shared/r"],
        {
            "PYTHON": str(python),
            "NNODES": "2",
            "NPROC": "8",
            "MASTER_ADDR": "node0",
            "RDZV_ID": "job7",
        },
    )
    assert result.returncode == 0, result.stderr
    args, _ = recorded(tmp_path, "python")
    assert flag(args, "--nnodes") == "2"
    assert flag(args, "--nproc_per_node") == "8"
    assert flag(args, "--rdzv-backend") == "c10d"
    assert flag(args, "--rdzv-endpoint") == "node0:29500"
    assert flag(args, "--rdzv-id") == "job7"
    assert flag(args, "--max-restarts") == "3"
    assert "--node-rank" not in args  # c10d assigns node ranks; torchrun would ignore it
    # train.resume=auto added: a restarted group continues from the newest checkpoint; fsdp on 2 nodes
    # shards within a node and replicates across the two (HSDP).
    expected = ["parallel=fsdp", "hydra.run.dir=/shared/r", "train.resume=auto", "parallel.replicate=2"]
    assert args[-6:] == ["-m", "trainer", *expected]
    assert "HSDP, parallel.replicate=2" in result.stderr


@pytest.mark.parametrize(
    "given,nnodes,added",
    [
        (["parallel=fsdp", "parallel.replicate=4"], "2", False),  # the caller's mesh
        (["parallel=fsdp", "parallel.fsdp_shard_size=16"], "2", False),
        (["parallel=fsdp", "parallel.tensor=8"], "2", False),  # TP in a node, FSDP across: the caller's mesh
        (["parallel=ddp"], "2", False),  # not fsdp
        (["parallel=fsdp"], "1", False),  # one node: flat sharding
        (["parallel=fsdp"], "1:4", False),  # elastic: the node count can change
        (["++parallel.strategy=fsdp"], "3", True),
    ],
)
def test_multi_node_hsdp_only_for_fsdp_on_a_fixed_number_of_nodes(tmp_path: Path, given, nnodes, added) -> None:
    python = make_stub(tmp_path, "python")
    env = {"PYTHON": str(python), "NNODES": nnodes, "NPROC": "8", "MASTER_ADDR": "node0"}
    result = run_script("launch/multi_node.sh", given, env)
    assert result.returncode == 0, result.stderr
    args, _ = recorded(tmp_path, "python")
    assert (f"parallel.replicate={nnodes}" in args) == added
    assert sum(a.startswith("parallel.replicate=") for a in args) == (
        1 if added else given.count("parallel.replicate=4")
    )


@pytest.mark.parametrize(
    "given",
    ["train.resume=none", "train.resume=/r/checkpoints/step_00000100", "++train.resume=none"],
)
def test_multi_node_keeps_callers_resume(tmp_path: Path, given: str):
    python = make_stub(tmp_path, "python")
    env = {"PYTHON": str(python), "NNODES": "2", "NPROC": "1", "MASTER_ADDR": "node0"}
    result = run_script("launch/multi_node.sh", [given, "parallel=ddp"], env)
    assert result.returncode == 0, result.stderr
    args, _ = recorded(tmp_path, "python")
    assert args[-4:] == ["-m", "trainer", given, "parallel=ddp"]
    assert not any("resume=auto" in a for a in args)


def test_multi_node_static_backend_takes_node_rank(tmp_path: Path):
    python = make_stub(tmp_path, "python")
    result = run_script(
        "launch/multi_node.sh",
        [],
        {
            "PYTHON": str(python),
            "NNODES": "2",
            "NPROC": "1",
            "MASTER_ADDR": "node0",
            "MASTER_PORT": "4000",
            "RDZV_BACKEND": "static",
            "NODE_RANK": "1",
            "MAX_RESTARTS": "0",
        },
    )
    assert result.returncode == 0, result.stderr
    args, _ = recorded(tmp_path, "python")
    assert flag(args, "--node-rank") == "1"
    assert flag(args, "--rdzv-endpoint") == "node0:4000"
    assert flag(args, "--max-restarts") == "0"


@pytest.mark.parametrize("missing", ["NNODES", "MASTER_ADDR"])
def test_multi_node_requires_nodes_and_address(tmp_path: Path, missing: str):
    python = make_stub(tmp_path, "python")
    env = {"PYTHON": str(python), "NNODES": "2", "MASTER_ADDR": "node0"}
    del env[missing]
    result = run_script("launch/multi_node.sh", [], env)
    assert result.returncode != 0
    assert missing in result.stderr
    assert not (tmp_path / "python.args").exists()  # nothing was launched


def test_deepspeed_launcher_command_on_cpu(tmp_path: Path):
    python = make_stub(tmp_path, "python")
    result = run_script(
        "launch/deepspeed.sh",
        ["parallel=zero2"],
        {"PYTHON": str(python), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr
    args, env = recorded(tmp_path, "python")
    assert args[:2] == ["-m", "deepspeed.launcher.runner"]
    assert flag(args, "--num_gpus") == "2"
    assert "--no_local_rank" in args  # else --local_rank=N lands among the Hydra overrides
    assert args[-3:] == ["--module", "trainer", "parallel=zero2"]
    assert env["DS_ACCELERATOR"] == "cpu"


def test_deepspeed_launcher_per_node_without_ssh(tmp_path: Path):
    python = make_stub(tmp_path, "python")
    result = run_script(
        "launch/deepspeed.sh",
        [],
        {
            "PYTHON": str(python),
            "NPROC": "8",
            "NO_SSH": "1",
            "NNODES": "2",
            "NODE_RANK": "1",
            "MASTER_ADDR": "node0",
        },
    )
    assert result.returncode == 0, result.stderr
    args, _ = recorded(tmp_path, "python")
    assert "--no_ssh" in args
    assert (flag(args, "--num_nodes"), flag(args, "--node_rank"), flag(args, "--master_addr")) == (
        "2",
        "1",
        "node0",
    )


def sbatch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """What Slurm sets in a batch job on 2 nodes, plus stubs for srun and scontrol on PATH."""
    bin_dir = tmp_path / "bin"
    make_stub(bin_dir, "srun")
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NAME": "trainer",
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_CPUS_PER_TASK": "32",
        **extra,
    }


def test_sbatch_one_torchrun_per_node_with_rendezvous_on_first_node(tmp_path: Path):
    env = sbatch_env(tmp_path, SLURM_GPUS_ON_NODE="8", SLURM_GPUS_PER_NODE="8")
    result = run_script("slurm/train.sbatch", ["parallel=fsdp"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    args, srun_env = recorded(tmp_path / "bin", "srun")
    assert {"--ntasks=2", "--cpus-per-task=32", "--kill-on-bad-exit=1"} <= set(args)
    assert flag(args, "--nnodes") == "2"
    assert flag(args, "--nproc_per_node") == "8"
    assert flag(args, "--rdzv-backend") == "c10d"
    assert flag(args, "--rdzv-endpoint") == f"gpu-a17:{20000 + 123456 % 20000}"
    assert flag(args, "--rdzv-id") == "123456"
    assert flag(args, "--max-restarts") == "3"
    # A requeued job keeps its id, so the same run dir, and train.resume=auto continues it.
    assert args[-6:] == [
        "-m", "trainer", "parallel=fsdp", "hydra.run.dir=runs/trainer-123456", "train.resume=auto",
        "parallel.replicate=2",  # fsdp on 2 nodes: HSDP, sharded within a node
    ]  # fmt: skip
    assert srun_env["OMP_NUM_THREADS"] == "4"  # 32 CPUs / 8 processes
    assert srun_env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_sbatch_cpu_node_and_callers_run_dir(tmp_path: Path):
    env = sbatch_env(tmp_path, SLURM_GPUS_PER_NODE="0", NPROC_PER_NODE="2", SLURM_CPUS_PER_TASK="2")
    result = run_script("slurm/train.sbatch", ["parallel=ddp", "hydra.run.dir=/x/y"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    args, srun_env = recorded(tmp_path / "bin", "srun")
    assert flag(args, "--nproc_per_node") == "2"
    # the caller's run dir (no second one), then train.resume=auto
    assert args[-5:] == ["-m", "trainer", "parallel=ddp", "hydra.run.dir=/x/y", "train.resume=auto"]
    assert srun_env["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize(
    "given",
    ["train.resume=none", "train.resume=/x/y/checkpoints/step_00000100", "++train.resume=none"],
)
def test_sbatch_keeps_callers_resume(tmp_path: Path, given: str):
    env = sbatch_env(tmp_path, SLURM_GPUS_PER_NODE="0")
    result = run_script("slurm/train.sbatch", [given, "hydra.run.dir=/x/y"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    args, _ = recorded(tmp_path / "bin", "srun")
    assert args[-4:] == ["-m", "trainer", given, "hydra.run.dir=/x/y"]
    assert not any("resume=auto" in a for a in args)


def test_sbatch_reads_typed_gpu_count(tmp_path: Path):
    env = sbatch_env(tmp_path, SLURM_GPUS_PER_NODE="h100:4")
    result = run_script("slurm/train.sbatch", [], env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    args, _ = recorded(tmp_path / "bin", "srun")
    assert flag(args, "--nproc_per_node") == "4"


def test_sbatch_outside_slurm_stops_with_a_reason(tmp_path: Path):
    result = run_script("slurm/train.sbatch", [], {}, cwd=tmp_path)
    assert result.returncode != 0
    assert "sbatch" in result.stderr


# -- real runs ----------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    assert path.exists(), f"no metrics.jsonl in {run_dir}"
    return [json.loads(line) for line in path.read_text().splitlines()]


def launch_run(script: str, tmp_path: Path, parallel: str) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path / "run"
    env = {
        "NPROC": "2",
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
        "MASTER_PORT": "29517",
    }
    result = run_script(
        script,
        [f"parallel={parallel}", *quick_overrides(tmp_path), f"hydra.run.dir={run_dir}"],
        env,
        timeout=RUN_TIMEOUT_S,
    )
    return run_dir, result


@pytest.fixture(scope="module")
def single_node_run(tmp_path_factory):
    return launch_run("launch/single_node.sh", tmp_path_factory.mktemp("single_node"), "ddp")


@pytest.mark.heavy
def test_single_node_ddp_two_ranks(single_node_run):
    run_dir, result = single_node_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    losses = [m["loss"] for m in metrics]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert (run_dir / "logs" / "rank0.log").is_file() and (run_dir / "logs" / "rank1.log").is_file()


@pytest.mark.slow  # 22 s: the deepspeed launcher beside torchrun, which the default tier launches
@pytest.mark.deepspeed
def test_deepspeed_launcher_zero2_matches_torchrun_ddp(tmp_path: Path, single_node_run):
    """deepspeed.sh starts 2 ranks on CPU; ZeRO-2 over them gives DDP's losses on the same batch."""
    run_dir, result = launch_run("launch/deepspeed.sh", tmp_path, "zero2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    assert (run_dir / "logs" / "rank1.log").is_file()
    reference = read_metrics(single_node_run[0])
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in reference], rel=1e-4)
