"""Process-group plumbing: read torchrun's environment, start the group, agree on a run dir.

torchrun (and srun + torchrun under SLURM) sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT. One process group serves every strategy: NCCL for CUDA tensors, gloo for CPU
tensors (and for everything on a machine without a GPU).

A collective that cannot finish (another rank hung, so the group's timeout ran out, or died, so
its connection closed) raises `CollectiveError` where the harness runs it under `collective(what)`:
one line naming this rank, the collective and the timeout, instead of gloo's transport error.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(timeout_s: float = 600.0, single: bool = False) -> bool:
    """Start the default process group from torchrun's environment (no-op on one process,
    unless `single`: then a group of one, for ddp / fsdp / zero1-3 run without torchrun).

    The timeout bounds every collective: a rank that dies leaves the others waiting at most
    this long before they fail with an error instead of hanging (torchrun usually ends them
    sooner, when it sees the dead rank).

    Returns whether it started the group (False: one process, or a group the caller started,
    which the run then leaves as it found it).
    """
    single = single and env_world_size() <= 1
    if dist.is_initialized() or (env_world_size() <= 1 and not single):
        return False
    timeout = datetime.timedelta(seconds=timeout_s)
    if single:  # `python -m trainer parallel=zero2`: DeepSpeed, DDP and FSDP need a group
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)  # what torchrun would set; DeepSpeed reads them
        rendezvous = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    else:
        store = _restart_scoped_store(timeout)
        rendezvous = {} if store is None else {"store": store, "rank": env_rank(), "world_size": env_world_size()}
    if torch.cuda.is_available():
        torch.cuda.set_device(env_local_rank())
        backend = "cuda:nccl,cpu:gloo"  # NCCL for GPU tensors, gloo for CPU ones (run dir, counts)
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        timeout=timeout,
        **rendezvous,
        device_id=torch.device("cuda", env_local_rank()) if torch.cuda.is_available() else None,
    )
    return True


def _restart_scoped_store(timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun's elastic agent, the agent's store, with keys scoped to this restart.

    torchrun (c10d rendezvous, torch >= 2.5) hands every worker group the same TCPStore, the one its
    agent serves at MASTER_ADDR:MASTER_PORT, for the whole job, and env:// puts no prefix on the
    keys. A group restarted after a failure then reads the previous group's keys (gloo's peer
    addresses, NCCL's unique id), connects to ranks that are gone and hangs in
    init_process_group (pytorch/pytorch#135712). Scoping the keys by TORCHELASTIC_RESTART_COUNT gives
    each restart a clean namespace. None (env:// as usual) outside torchrun's agent store.

    Each agent counts its own restarts, so on several nodes the counts can differ (an agent whose
    workers were still healthy restarts them without counting). The multi-node launchers therefore
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each rendezvous round then gives the workers a
    fresh store on a new port, hosted by rank 0, and this function is not used.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env_world_size(),
        is_master=False,
        timeout=timeout,
    )
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"trainer/restart_{restart}/", store)


def broadcast_string(value: str) -> str:
    """Rank 0's value, on every rank (collective)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def default_run_dir() -> str:
    """Hydra's default layout, outputs/DATE/TIME, fixed by rank 0 so every rank uses the same one.

    Under torchrun's elastic agent, a restarted group must find the run it is continuing: the
    rendezvous run id is the same across restarts, so it names the directory instead.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0" and run_id not in ("", "none"):
        return f"outputs/torchrun-{run_id}"
    return time.strftime("outputs/%Y-%m-%d/%H-%M-%S")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- collectives that cannot finish ------------------------------------------------------------------


class CollectiveError(RuntimeError):
    """A collective could not finish: another rank is hung (the timeout ran out) or gone. The
    message is one line for the user, naming this rank and the collective."""


# gloo: "Timed out waiting 5000ms for recv operation to complete"; NCCL: "... Timeout(ms)=5000 ..."
_TIMED_OUT = re.compile(r"timed out waiting (\d+)\s*ms|timeout\(ms\)=(\d+)|timed out|timeout", re.IGNORECASE)
_PEER_GONE = re.compile(r"connection (?:closed|reset) by peer|broken pipe|connection refused", re.IGNORECASE)


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run collectives named `what` ("all_reduce (loss sum)"): when one fails because another rank
    never came or went away, raise CollectiveError naming this rank, `what` and the timeout.
    Any other error passes through unchanged."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:  # gloo raises plain RuntimeErrors; NCCL and the stores dist.DistError
        line = describe_failure(what, error)
        if line is None:
            raise
        raise CollectiveError(line) from error


def describe_failure(what: str, error: BaseException) -> str | None:
    """One line for a collective that failed for want of another rank, or None for other errors."""
    text = str(error)
    rank = dist.get_rank() if dist.is_initialized() else env_rank()
    logs = _other_logs(rank)
    timed_out = _TIMED_OUT.search(text)
    if timed_out:
        milliseconds = next((int(g) for g in timed_out.groups() if g), None)
        seconds = milliseconds / 1000 if milliseconds is not None else _timeout_seconds()
        after = f" after {seconds:g} s" if seconds is not None else ""
        return f"rank {rank}: {what} timed out{after} waiting for other ranks: a rank is hung or died; see {logs}"
    if _PEER_GONE.search(text):
        return f"rank {rank}: {what} failed: another rank closed its connection (it died or was stopped); see {logs}"
    if isinstance(error, dist.DistError):
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return f"rank {rank}: {what} failed ({first}); see {logs}"
    return None


def collective_timeout() -> datetime.timedelta | None:
    """The default group's timeout (parallel.timeout_s), for groups made later; None without one."""
    if not dist.is_initialized():
        return None
    try:  # no public getter: the backend's options hold it
        return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    except (AttributeError, RuntimeError):
        return None


def _timeout_seconds() -> float | None:
    timeout = collective_timeout()
    return timeout.total_seconds() if timeout is not None else None


def _other_logs(rank: int) -> str:
    """Where the other ranks' log lines are: <run dir>/logs/rank{R}.log under `python -m trainer`."""
    files = [Path(h.baseFilename) for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    directory = next((f.parent for f in files if re.fullmatch(r"rank\d+\.log", f.name)), None)
    world_size = dist.get_world_size() if dist.is_initialized() else env_world_size()
    if directory is None:
        return "the other ranks' output"
    if world_size == 2:
        return str(directory / f"rank{1 - rank}.log")
    return f"the other ranks' logs ({directory}/rank*.log)"


# -- the end of a process that ran collectives ----------------------------------------------------


def exit_process(code: int = 0) -> NoReturn:
    """End this process with `code` once everything it wrote is closed: the group destroyed, the
    output flushed, then os._exit, without the interpreter's teardown.

    destroy_process_group() unregisters the group, but torch keeps gloo's backend running (its TCP
    event-loop thread and two work threads) while anything still refers to the group: the
    DeviceMesh's registry, each DTensor spec (FSDP2's parameters and DTensor's sharding cache),
    DeepSpeed's group globals. Those threads then stop whenever the interpreter's finalizer frees
    the last of these, with modules half torn down and the other rank's sockets closing under
    them; a rank that has saved everything can still die there (std::terminate: "terminate called
    without an active exception", SIGSEGV, SIGBUS), and torchrun and Slurm report the job failed.
    Skipping that teardown loses nothing: the run has closed its files, loggers and threads.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()  # flushes and closes every log file handler
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
