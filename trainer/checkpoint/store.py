"""Checkpoints that a killed job can always resume from.

Layout of one checkpoint, `checkpoints/step_00001200/`:

    state/            model + optimizer: torch.distributed.checkpoint (none / ddp / fsdp; each rank
                      writes its own shards, loadable at another world size) or DeepSpeed's own
                      checkpoint (zero1-3)
    rng/rank{R}.json  Python / NumPy RNG state of rank R;  rng/rank{R}.safetensors: torch CPU / CUDA
    meta.json         step, tokens, sampler, LR schedule, loss scaler, skip counters, wandb run id,
                      world size, strategy, parameter shapes
    manifest.json     size and sha256 of every file above (written last)

A save goes into `step_N.tmp/`, every file is fsynced, the directory is renamed to `step_N/`, and
only then does `checkpoints/latest` (a one-line file, replaced by rename) point at it. A job
killed mid-save leaves a `.tmp` directory that nothing reads; the previous checkpoint stays
whole. On resume each checkpoint is verified against its manifest; one that fails is reported
and the one before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.config import ConfigError

PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# -- files: fsync, checksums ---------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path, block: int = 16 << 20) -> str:
    """sha256 of a file, read in 16 MB blocks into one buffer.

    Blocks this large matter when an async save hashes in a background thread: every block hands
    the GIL back and forth with the training thread, and each hand-back can wait out Python's 5 ms
    switch interval. Hashing 600 MB next to a busy Python thread took 5.7 s in 1 MB blocks and
    0.9 s in 16 MB ones (0.8 s alone) on the 2-core CPU machine.
    """
    digest = hashlib.sha256()
    buffer = bytearray(block)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json")


def hash_share(directory: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """Size and sha256 of this rank's share of the files under directory, each fsynced first.

    Every rank lists the same files (after a barrier); sorted largest first and dealt out in turn,
    the big shards land on different ranks, so the checksums take about 1/world_size of the time.
    """
    files = sorted(_files(directory), key=lambda path: (-path.stat().st_size, str(path)))
    entries = {}
    for path in files[rank::world_size]:
        _fsync(path)
        entries[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return entries


def write_manifest(directory: Path, entries: dict[str, dict[str, Any]] | None = None) -> None:
    """manifest.json from the ranks' `hash_share`s (or every file hashed here), then fsync the
    directories (rank 0, after all ranks wrote)."""
    entries = hash_share(directory) if entries is None else entries
    (directory / "manifest.json").write_text(json.dumps({"files": dict(sorted(entries.items()))}, indent=1))
    _fsync(directory / "manifest.json")
    for sub in sorted({p.parent for p in directory.rglob("*")} | {directory}):
        _fsync(sub)


def verify(directory: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong (one line)."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return f"{directory} has no manifest.json (an interrupted save?)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as error:
        return f"{manifest} is unreadable ({error})"
    unlisted = [path for path in _files(directory) if str(path.relative_to(directory)) not in entries]
    if unlisted:
        return f"{unlisted[0]} is not in the manifest (written after the commit, or a rank's checksums lost)"
    for name, expected in entries.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} is {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its checksum (corrupted)"
    return None


def _replace_file(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


# -- RNG state: JSON and tensors, never pickles ----------------------------------------------------


def save_rng(directory: Path, rank: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (directory / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "python": [version, list(state), gauss],
                "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            }
        )
    )
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(directory / f"rank{rank}.safetensors"))


def load_rng(directory: Path, rank: int) -> None:
    plain = json.loads((directory / f"rank{rank}.json").read_text())
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(directory / f"rank{rank}.safetensors"))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


# -- the checkpointer --------------------------------------------------------------------------------


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


class Checkpointer:
    """Saves and finds checkpoints under run_dir/checkpoints. save / load are collectives."""

    def __init__(self, run_dir: Path, keep: int, strategy: Any) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.strategy = strategy
        self.rank = strategy.rank
        self.pending: Future | None = None  # an async save: done once its checkpoint is committed
        self._committer: ThreadPoolExecutor | None = None

    def save(self, step: int, meta: dict[str, Any], async_save: bool = False) -> Path:
        """Write checkpoint `step` atomically; every rank calls it.

        With async_save the model / optimizer tensors are copied to CPU memory and the call
        returns; a background thread writes them, checksums the files (each rank its share) and
        commits the checkpoint (manifest, rename, `latest`), so a half-written one is never
        visible. The next save, or `wait()`, waits for it first: one checkpoint in flight at most.
        """
        self.wait()
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a save that was killed
            tmp.mkdir(parents=True)
        self.strategy.barrier()  # collective: the directory exists for every rank
        save_rng(tmp / "rng", self.rank)
        if self.rank == 0:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if async_save:
            write = self.strategy.save_state_async(tmp / "state")  # collective; makes the group
            group = self.strategy.checkpoint_group()
            if self._committer is None:
                self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit")
            self.pending = self._committer.submit(self._write_then_commit, write, tmp, final, group)
            return final
        self.strategy.save_state(tmp / "state")  # collective: each rank writes its shards
        self._commit(tmp, final, self.strategy.checkpoint_group())
        return final

    def wait(self) -> None:
        """Block until the checkpoint being written in the background is committed (collective).
        An error in the background write or commit is raised here."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        pending.result()

    def _write_then_commit(self, write: Future, tmp: Path, final: Path, group: Any) -> None:
        write.result()  # this rank's shards are on disk
        self._commit(tmp, final, group)

    def _commit(self, tmp: Path, final: Path, group: Any) -> None:
        """Checksum, manifest, rename, `latest`, prune: on the checkpoint group, so that the
        background thread of an async save can run it while training goes on."""
        _barrier(group)  # every rank's files are written
        shares = _gather(hash_share(tmp, self.rank, self.strategy.world_size), group, self.rank)
        if self.rank == 0:
            write_manifest(tmp, {name: entry for share in shares for name, entry in share.items()})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.root)
            _replace_file(self.root / "latest", final.name + "\n")  # last: the pointer moves
            self._prune()
        _barrier(group)  # nobody runs ahead of a half-made checkpoint

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints."""
        for old in self.complete()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Checkpoint directories (not .tmp), newest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.suffix != ".tmp"]
        return sorted(dirs, key=lambda p: p.name, reverse=True)

    def find(self, resume: str, warn: Any = print) -> Path | None:
        """The checkpoint `train.resume` names: none, auto (newest valid) or a path."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume).expanduser()
            if not path.is_dir():
                raise ConfigError(f"train.resume={resume} does not exist: give a checkpoint directory, auto or none")
            problem = verify(path)
            if problem:
                raise ConfigError(f"train.resume={resume} cannot be used: {problem}")
            return path
        candidates = self.complete()
        pointer = self.root / "latest"
        if pointer.is_file():  # start from what `latest` names: a newer directory was never committed
            named = self.root / pointer.read_text().strip()
            candidates = [named] + [c for c in candidates if c.name < named.name]
        for candidate in candidates:
            problem = verify(candidate)
            if problem is None:
                return candidate
            warn(f"checkpoint {candidate.name} fails verification ({problem}); trying the one before it")
        return None

    def load(self, path: Path, expected_shapes: dict[str, list[int]]) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from path; return its meta (collective)."""
        meta = json.loads((path / "meta.json").read_text())
        check_compatible(meta, expected_shapes, self.strategy, path)
        self.strategy.load_state(path / "state", saved_world_size=meta["world_size"])
        load_rng(path / "rng", self.rank if (path / "rng" / f"rank{self.rank}.json").exists() else 0)
        return meta


def check_compatible(meta: dict[str, Any], shapes: dict[str, list[int]], strategy: Any, path: Path) -> None:
    """A checkpoint of another model shape, or of a strategy whose format this one cannot read:
    one line, before loading. (World sizes may differ: DCP reshards, and a ZeRO-1/2 checkpoint is
    converted to a universal one.)"""
    saved = meta["shapes"]
    mismatched = sorted(
        f"{name} {saved.get(name)} vs {shape}" for name, shape in shapes.items() if saved.get(name) != shape
    ) + sorted(f"{name} {shape} vs absent" for name, shape in saved.items() if name not in shapes)
    if mismatched:
        listed = "; ".join(mismatched[:8]) + (f"; ... {len(mismatched) - 8} more" if len(mismatched) > 8 else "")
        raise ConfigError(f"checkpoint {path} is from a different model shape (checkpoint vs model): {listed}")
    if meta["strategy"] != strategy.name and (meta["strategy"].startswith("zero") or strategy.name.startswith("zero")):
        raise ConfigError(
            f"checkpoint {path} was written by parallel={meta['strategy']}; DeepSpeed and torch checkpoints "
            f"do not load into each other: resume with parallel={meta['strategy']} (or export it with python -m trainer.export)"
        )
    if strategy.name == "zero3" and meta["world_size"] != strategy.world_size:
        raise ConfigError(
            f"checkpoint {path} holds ZeRO-3 partitions for {meta['world_size']} ranks, this run has "
            f"{strategy.world_size}: resume ZeRO-3 at world size {meta['world_size']} (DeepSpeed's universal "
            "checkpoint restores ZeRO-3's optimizer state inexactly), or save with zero1 / zero2, which resume at any"
        )


def save_weights(directory: Path, weights: dict[str, torch.Tensor]) -> Path:
    """Consolidated weights as model.safetensors (rank 0; written to .tmp, then renamed)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    _fsync(tmp / "model.safetensors")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory
