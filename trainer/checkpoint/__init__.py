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
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.checkpoint.store import (
    PREFIX,
    CheckpointStore,
    _sha256,
    hash_share,
    save_weights,
    step_dir_name,
    verify,
    write_manifest,
)

__all__ = [
    "PREFIX", "CheckpointStore", "Checkpointer", "FilePart", "RNGState", "_sha256", "save_weights",
    "step_dir_name", "verify", "write_manifest",
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
        save_file(tensors, str(directory / f"rank{self.rank}.safetensors"))

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

            self._group = dist.new_group(backend="gloo")  # collective
        return self._group

    def save(self, step: int, parts: Mapping[str, Any], async_save: bool = False) -> Path:
        """Write checkpoint `step` atomically from every part.

        With async_save, parts that can (the model and optimizer) copy their tensors to CPU
        memory and return; a background thread writes them, checksums the files (each rank its
        share) and commits the checkpoint (manifest, rename, `latest`), so a half-written one is
        never visible. The next save, or `wait()`, waits for it first: one in flight at most.
        """
        self.wait()
        group = self.group()
        tmp, final = self.store.begin(step) if self.rank == 0 else self.store.paths(step)
        _barrier(group)  # collective: the directory exists for every rank
        writes, plain = [], {}
        for name, part in parts.items():
            if isinstance(part, FilePart) and async_save and hasattr(part, "save_async"):
                writes.append(part.save_async(tmp / name, group))  # collective
            elif isinstance(part, FilePart):
                part.save(tmp / name)  # collective for sharded parts
            else:
                plain[name] = part.state_dict()
        if self.rank == 0:
            (tmp / "meta.json").write_text(json.dumps({"step": step, "parts": plain}, indent=1))
        if not writes:
            self._commit(tmp, final, group)
            return final
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit")
        self.pending = self._committer.submit(self._write_then_commit, writes, tmp, final, group)
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
        An error in the background write or commit is raised here."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        pending.result()

    def _write_then_commit(self, writes: list[Future], tmp: Path, final: Path, group: Any) -> None:
        for write in writes:
            write.result()  # this rank's shards are on disk
        self._commit(tmp, final, group)

    def _commit(self, tmp: Path, final: Path, group: Any) -> None:
        """Checksum, manifest, rename, `latest`, prune: on the checkpoint group, so that the
        background thread of an async save can run it while training goes on."""
        _barrier(group)  # every rank's files are written
        shares = _gather(hash_share(tmp, self.rank, self.world_size), group, self.rank)
        if self.rank == 0:
            self.store.commit(tmp, final, {name: entry for share in shares for name, entry in share.items()})
        _barrier(group)  # nobody runs ahead of a half-made checkpoint


def _barrier(group: Any) -> None:
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group)  # collective on the checkpoint group


def _gather(value: Any, group: Any, rank: int) -> list[Any]:
    """Every rank's value, on rank 0 (collective on the checkpoint group; [value] on one process)."""
    if group is None:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object(value, gathered, dst=0, group=group)
    return gathered or []
