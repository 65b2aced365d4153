"""Checkpoints by parts: a run names its Stateful parts once; save and load walk them.

    parts = {"model": <model + optimizer, from the strategy>, "scheduler": ..., "loss_scaler": ...,
             "sampler": sampler, "spikes": spikes, "train_state": state, "rng": RNGState(rank)}
    checkpointer.save(step, parts)       # atomic: step_N.tmp -> step_N -> `latest`
    checkpointer.load(path, parts)       # a rollback leaves "sampler" out: the data moves on

A part is one of two kinds:
- a Stateful (`state_dict()` / `load_state_dict()`) whose state is plain JSON and the same on
  every rank (counters, positions, EMA baselines): rank 0 writes it into meta.json under its name;
- a `FilePart` (`save(directory)` / `load(directory)`, and optionally `save_async(directory,
  group)`): it writes its own files into its own directory, on every rank (model and optimizer
  shards, each rank's RNG).
Adding a piece of state to checkpoints (LoRA adapters, a diagnostic's running estimate) means
adding one entry to the parts. The file store underneath (trainer/checkpoint/store.py) knows no
parts and no ranks.

A write that fails on any rank (a full disk, a quota, EIO, a permission) fails the save on every
rank: each rank goes on through the save's collectives, the ranks agree on the first failure where
they used to meet at a barrier, rank 0 removes the half-written step_N.tmp, and every rank raises
the same one-line `CheckpointWriteError` (the error, the path, the fix, the newest checkpoint):

    checkpoint step_00000400 not written: No space left on device (/runs/a/checkpoints): free
    space or point hydra.run.dir elsewhere; the newest complete checkpoint is step_00000200

An async save's failure is raised where its outcome is awaited: the next save, `wait()`.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from trainer.checkpoint.store import (
    PREFIX,
    CheckpointStore,
    CheckpointWriteError,
    _sha256,
    as_os_error,
    hash_share,
    probe_write,
    save_weights,
    step_dir_name,
    verify,
    write_fix,
    write_manifest,
)
from trainer.parallel.dist import CollectiveError, collective, collective_timeout

__all__ = [
    "PREFIX", "CheckpointStore", "CheckpointWriteError", "Checkpointer", "FilePart", "RNGState", "_sha256",
    "save_weights", "step_dir_name", "verify", "write_manifest",
]  # fmt: skip

log = logging.getLogger("trainer")


@runtime_checkable
class FilePart(Protocol):
    """A part that writes its own files (collective: every rank calls save / load)."""

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


class RNGState:
    """This rank's Python, NumPy and torch (CPU, CUDA) generators: JSON and safetensors, never
    pickles. A rank with no file of its own (the run now has more ranks) takes rank 0's."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        version, state, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        plain = {
            "python": [version, list(state), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        }
        (directory / f"rank{self.rank}.json").write_text(json.dumps(plain))
        tensors = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["torch_cuda"] = torch.cuda.get_rng_state()
        # A few kB: serialised here and written by Python, so a failed write is a plain OSError.
        (directory / f"rank{self.rank}.safetensors").write_bytes(safetensors_bytes(tensors))

    def load(self, directory: Path) -> None:
        rank = self.rank if (directory / f"rank{self.rank}.json").exists() else 0
        plain = json.loads((directory / f"rank{rank}.json").read_text())
        version, state, gauss = plain["python"]
        random.setstate((version, tuple(state), gauss))
        kind, keys, pos, has_gauss, cached = plain["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        tensors = load_file(str(directory / f"rank{rank}.safetensors"))
        torch.set_rng_state(tensors["torch_cpu"])
        if "torch_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["torch_cuda"])


class Checkpointer:
    """Saves a run's parts into a CheckpointStore and loads them back. save, load and wait are
    collectives: every rank calls them, with the same part names."""

    def __init__(self, store: CheckpointStore) -> None:
        import torch.distributed as dist

        self.store = store
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.pending: Future | None = None  # an async save: done once its checkpoint is committed
        self._committer: ThreadPoolExecutor | None = None
        self._group: Any = None

    def group(self) -> Any:
        """A gloo group of all ranks for checkpoint I/O, made at the first save (collective);
        None on one process without a process group.

        An async save's background thread runs collectives (DCP's plan and metadata exchange, the
        commit's barrier and checksum gather) while the training thread runs its own on the
        default group; two threads on one group could interleave them differently on different
        ranks. A group of its own keeps the two streams apart (DCP's advice for async_save).
        """
        if self._group is None and self.distributed:
            import torch.distributed as dist

            # The default group's timeout (parallel.timeout_s): new_group's own default is 30 min.
            with collective("new_group (checkpoint I/O)"):
                self._group = dist.new_group(backend="gloo", timeout=collective_timeout())  # collective
        return self._group

    def save(self, step: int, parts: Mapping[str, Any], async_save: bool = False) -> Path:
        """Write checkpoint `step` atomically from every part.

        With async_save, parts that can (the model and optimizer) copy their tensors to CPU
        memory and return; a background thread writes them, checksums the files (each rank its
        share) and commits the checkpoint (manifest, rename, `latest`), so a half-written one is
        never visible. The next save, or `wait()`, waits for it first: one in flight at most.

        A write that fails on any rank raises CheckpointWriteError on every rank (an async save's:
        at the next save or `wait()`), with step_N.tmp removed and the committed checkpoints as
        they were. A rank that fails goes on through the remaining parts, whose saves may be
        collectives, and the ranks agree on the outcome where they used to meet at a barrier.
        """
        self.wait()
        group = self.group()
        tmp, final = self.store.paths(step)
        failure = _attempt(self.store.begin, step) if self.rank == 0 else None
        self._agree(failure, tmp, group)  # collective: the directory exists for every rank
        writes, plain = [], {}
        for name, part in parts.items():
            try:
                with collective(f"checkpoint {final.name}: saving {name}"):
                    if isinstance(part, FilePart) and async_save and hasattr(part, "save_async"):
                        writes.append(part.save_async(tmp / name, group))  # collective
                    elif isinstance(part, FilePart):
                        part.save(tmp / name)  # collective for sharded parts
                    else:
                        plain[name] = part.state_dict()
            except CollectiveError:
                raise  # a rank is gone: there is no agreeing with it
            except _write_failures() as error:
                failure = failure or error
        if self.rank == 0 and failure is None:
            meta = json.dumps({"step": step, "parts": plain}, indent=1)
            failure = _attempt((tmp / "meta.json").write_text, meta)
        if not writes:
            self._commit(tmp, final, group, failure)
            return final
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit")
        self.pending = self._committer.submit(self._write_then_commit, writes, tmp, final, group, failure)
        return final

    def load(self, path: Path, parts: Mapping[str, Any]) -> None:
        """Restore each part from checkpoint `path`, in the order given (collective). Put the
        model first: it checks the checkpoint fits before anything is changed."""
        meta = json.loads((path / "meta.json").read_text())
        for name, part in parts.items():
            if isinstance(part, FilePart):
                part.load(path / name)
            elif name in meta["parts"]:
                part.load_state_dict(meta["parts"][name])
            else:  # e.g. a loss scaler, resuming an fp32 run in fp16
                log.warning(f"checkpoint {path.name} holds no {name}: it starts afresh")

    def wait(self) -> None:
        """Block until the checkpoint being written in the background is committed (collective).
        An error in the background write or commit is raised here (on every rank alike)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        pending.result()

    def _write_then_commit(
        self, writes: list[Future], tmp: Path, final: Path, group: Any, failure: BaseException | None
    ) -> None:
        for write in writes:
            try:
                write.result()  # this rank's shards are on disk
            except _write_failures() as error:
                failure = failure or error
        self._commit(tmp, final, group, failure)

    def _commit(self, tmp: Path, final: Path, group: Any, failure: BaseException | None) -> None:
        """Checksum, manifest, rename, `latest`, prune: on the checkpoint group, so that the
        background thread of an async save can run it while training goes on."""
        self._agree(failure, tmp, group)  # every rank's files are written
        share = None
        try:
            share = hash_share(tmp, self.rank, self.world_size)  # fsyncs: a delayed write error shows here
        except _write_failures() as error:
            failure = error
        shares = _gather(share, tmp.name.removesuffix(".tmp"), group, self.rank)
        if self.rank == 0 and failure is None and all(s is not None for s in shares):  # else: no commit
            entries = {name: entry for share in shares for name, entry in share.items()}
            failure = _attempt(self.store.commit, tmp, final, entries)
        self._agree(failure, tmp, group)  # nobody runs ahead of a half-made checkpoint

    def _agree(self, failure: BaseException | None, tmp: Path, group: Any) -> None:
        """Where the ranks meet during a save (collective on the checkpoint group, in place of a
        barrier): when any rank's write failed, rank 0 removes `tmp` (every rank has stopped
        writing into it) and every rank raises the first failure's one line."""
        name = tmp.name.removesuffix(".tmp")
        mine = None if failure is None else _describe(failure, self.rank, tmp)
        first = _first(mine, f"{name}: did every rank write", group)
        if first is None:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        rank, code, reason = first
        newest = self.store.committed() or "none"
        if code is None:  # not a write failure: a bug, whose traceback the failing rank raises
            if rank == self.rank:
                raise failure
            raise CheckpointWriteError(
                f"checkpoint {name} not written: rank {rank} failed ({reason}; see its log); the newest complete "
                f"checkpoint is {newest}"
            )
        where = f" on rank {rank}" if self.world_size > 1 else ""
        raise CheckpointWriteError(
            f"checkpoint {name} not written: {reason}{where} ({self.store.root}): {write_fix(code, self.store.root)}; "
            f"the newest complete checkpoint is {newest}"
        ) from failure


def _write_failures() -> tuple[type[BaseException], ...]:
    """What a failed write raises: anything but an interrupt (torch.distributed.checkpoint's
    CheckpointException, which carries every rank's failure, derives from BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _attempt(function: Any, *args: Any) -> BaseException | None:
    """Run function(*args); return what it raised (a write failure), or None."""
    try:
        function(*args)
    except _write_failures() as error:
        return error
    return None


def _describe(failure: BaseException, rank: int, directory: Path) -> tuple[int, int | None, str]:
    """(rank, errno, reason) of a failed write; errno None when it is no OSError (a bug). A DCP
    CheckpointException, raised on every rank, names the ranks whose writes failed."""
    failures = getattr(failure, "failures", None) or {rank: (failure, None)}
    for failed in sorted(failures):
        cause = as_os_error(failures[failed][0])
        if cause is not None:
            return failed, cause.errno, cause.strerror or str(cause)
    cause = probe_write(directory if directory.is_dir() else directory.parent)  # hidden, or lost between ranks
    if cause is not None:
        return min(failures), cause.errno, cause.strerror or str(cause)
    error = failures[min(failures)][0]
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return min(failures), None, f"{type(error).__name__}: {first}"


def _first(mine: Any, what: str, group: Any) -> Any:
    """The first non-None value in rank order (collective on the checkpoint group: all_gather)."""
    if group is None:
        return mine
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size(group)
    with collective(f"all_gather_object (checkpoint {what})"):
        dist.all_gather_object(gathered, mine, group=group)  # collective on the checkpoint group
    return next((value for value in gathered if value is not None), None)


def _gather(value: Any, what: str, group: Any, rank: int) -> list[Any]:
    """Every rank's value, on rank 0 (collective on the checkpoint group; [value] on one process)."""
    if group is None:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * dist.get_world_size(group) if rank == 0 else None
    with collective(f"gather_object (checkpoint {what}: every rank's checksums)"):
        dist.gather_object(value, gathered, dst=0, group=group)  # collective on the checkpoint group
    return gathered or []
