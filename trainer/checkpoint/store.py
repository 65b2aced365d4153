"""The checkpoint directories on disk: atomic commit, checksums, finding the newest valid one.

Layout of one checkpoint, `checkpoints/step_00001200/` (the Checkpointer writes one entry per
named part of the run):

    model/            model + optimizer, written by the strategy: torch.distributed.checkpoint
                      (none / ddp / fsdp; each rank its own shards, loadable at another world size)
                      or DeepSpeed's own checkpoint (zero1-3); info.json: strategy, world size,
                      parameter shapes, the model's config
    rng/rank{R}.json  Python / NumPy RNG state of rank R;  rng/rank{R}.safetensors: torch CPU / CUDA
    meta.json         the step, and the state of every other part by name: train_state (step,
                      tokens, skip counters, wandb run id), sampler, scheduler, loss_scaler, spikes
    manifest.json     size and sha256 of every file above (written last)

A save goes into `step_N.tmp/`, every file is fsynced, the directory is renamed to `step_N/`, and
only then does `checkpoints/latest` (a one-line file, replaced by rename) point at it. A job
killed mid-save leaves a `.tmp` directory that nothing reads; the previous checkpoint stays
whole. On resume each checkpoint is verified against its manifest; one that fails is reported
and the one before it is used.

A save that fails to write (a full disk, a quota, EIO, a permission) removes its `.tmp` directory
and leaves the previous checkpoint and `latest` as they were; a `.tmp` left by a killed save is
removed by the next save. `CheckpointWriteError` says what happened in one line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trainer.config import ConfigError
from trainer.files import fsync, replace_text

PREFIX = "step_"


class CheckpointWriteError(RuntimeError):
    """A checkpoint (or the final weights) could not be written; nothing committed was changed.
    The message is one line for the user: the error, the path, the fix, the newest checkpoint."""


def as_os_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed write: itself or one it was raised from or during (torch.save's
    zip writer turns ENOSPC into "unexpected pos 704 vs 598"), the first one a DCP
    CheckpointException gathered from the ranks, or safetensors' "I/O error: ... (os error 28)";
    None for anything else (a bug, or an OSError lost on its way between ranks)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            return error
        failures = getattr(error, "failures", {})  # DCP: {rank: (exception, traceback)}
        for rank in sorted(failures):
            wrapped = failures[rank]
            found = as_os_error(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
            if found is not None:
                return found
        code = re.search(r"os error (\d+)", str(error))
        if code:
            return OSError(int(code[1]), os.strerror(int(code[1])))
        error = error.__cause__ or error.__context__
    return None


def probe_write(directory: Path, size: int = 1 << 20) -> OSError | None:
    """Write, fsync and remove `size` bytes in directory: the OSError a failed write hid (an
    exception pickled from another rank loses the OSError it came from), or None if it succeeds."""
    if not directory.is_dir():
        return None
    path = directory / f".probe-{os.getpid()}"
    try:
        with open(path, "wb") as handle:
            handle.write(bytes(size))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        return error
    finally:
        path.unlink(missing_ok=True)
    return None


def write_fix(code: int | None, directory: Path) -> str:
    """What to do about a write that failed with errno `code` under `directory`."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free space or point hydra.run.dir elsewhere"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {directory} writable or point hydra.run.dir elsewhere"
    return "check the disk (dmesg) or point hydra.run.dir elsewhere"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# -- files: fsync, checksums ---------------------------------------------------------------------


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
        fsync(path)
        entries[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return entries


def write_manifest(directory: Path, entries: dict[str, dict[str, Any]] | None = None) -> None:
    """manifest.json from the ranks' `hash_share`s (or every file hashed here), then fsync the
    directories (rank 0, after all ranks wrote)."""
    entries = hash_share(directory) if entries is None else entries
    (directory / "manifest.json").write_text(json.dumps({"files": dict(sorted(entries.items()))}, indent=1))
    fsync(directory / "manifest.json")
    for sub in sorted({p.parent for p in directory.rglob("*")} | {directory}):
        fsync(sub)


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


class CheckpointStore:
    """The checkpoint directories under run_dir/checkpoints: find, verify, begin, commit, prune.

    Plain file work, no process group and no strategy: `python -m trainer.export` uses it as it
    is. In a multi-rank run only rank 0 calls begin / commit (the Checkpointer arranges that).
    """

    def __init__(self, run_dir: Path, keep: int = 1) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def complete(self) -> list[Path]:
        """Checkpoint directories (not .tmp), newest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.suffix != ".tmp"]
        return sorted(dirs, key=lambda p: p.name, reverse=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory (unverified), or None."""
        complete = self.complete()
        return complete[0] if complete else None

    def committed(self) -> str | None:
        """The name `latest` points at (the newest committed checkpoint), or None."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        return pointer.read_text().strip() or None

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

    def paths(self, step: int) -> tuple[Path, Path]:
        """(step_N.tmp, step_N): where checkpoint `step` is written, and what it becomes at commit."""
        final = self.root / step_dir_name(step)
        return final.with_name(final.name + ".tmp"), final

    def begin(self, step: int) -> tuple[Path, Path]:
        """Like `paths`, with step_N.tmp made fresh (empty) to write into. Every other .tmp left
        by a save that was killed is removed first (no save is in flight: the caller waited)."""
        tmp, final = self.paths(step)
        for stale in self.root.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
        return tmp, final

    def commit(self, tmp: Path, final: Path, entries: dict[str, dict[str, Any]]) -> None:
        """Manifest (from every rank's `hash_share`), rename, then move `latest`; prune old ones.
        A failure before `latest` has moved leaves the checkpoints as they were (the caller
        removes `tmp`)."""
        write_manifest(tmp, entries)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        try:
            fsync(self.root)
            replace_text(self.root / "latest", final.name + "\n")  # last: the pointer moves
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)  # never committed: `latest` names the one before
            raise
        for old in self.complete()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)


def save_weights(directory: Path, weights: dict[str, torch.Tensor]) -> Path:
    """Consolidated weights as model.safetensors (rank 0; written to .tmp, then renamed). A
    write that fails removes the .tmp and raises CheckpointWriteError (one line)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        fsync(tmp / "model.safetensors")
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = as_os_error(error)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        fix = write_fix(cause.errno, directory.parent)
        raise CheckpointWriteError(
            f"{directory.name} weights not written: {reason} ({directory.parent}): {fix}"
        ) from error
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory
