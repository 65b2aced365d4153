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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json")


def write_manifest(directory: Path) -> None:
    """Size and sha256 of every file, then fsync files and directories (rank 0, after all wrote)."""
    entries = {}
    for path in _files(directory):
        _fsync(path)
        entries[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (directory / "manifest.json").write_text(json.dumps({"files": entries}, indent=1))
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


class Checkpointer:
    """Saves and finds checkpoints under run_dir/checkpoints. save / load are collectives."""

    def __init__(self, run_dir: Path, keep: int, strategy: Any) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.strategy = strategy
        self.rank = strategy.rank
        self.pending: tuple[Any, Path, Path] | None = None  # (future, tmp dir, final dir) of an async save

    def save(self, step: int, meta: dict[str, Any], async_save: bool = False) -> Path:
        """Write checkpoint `step` atomically; every rank calls it.

        With async_save the model / optimizer tensors are copied to CPU memory and written by a
        background thread while training goes on; the checkpoint is committed (manifest, rename,
        `latest`) by the next save or by `wait()`, so a half-written one is never visible.
        """
        self.wait()  # one checkpoint in flight at most
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
            self.pending = (self.strategy.save_state_async(tmp / "state"), tmp, final)
            return final
        self.strategy.save_state(tmp / "state")  # collective: each rank writes its shards
        self._commit(tmp, final)
        return final

    def wait(self) -> None:
        """Finish and commit the checkpoint being written in the background, if any (collective)."""
        if self.pending is None:
            return
        future, tmp, final = self.pending
        self.pending = None
        future.result()  # this rank's shards are on disk
        self._commit(tmp, final)

    def _commit(self, tmp: Path, final: Path) -> None:
        self.strategy.barrier()  # collective: every rank's files are written
        if self.rank == 0:
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.root)
            _replace_file(self.root / "latest", final.name + "\n")  # last: the pointer moves
            self._prune()
        self.strategy.barrier()  # collective: nobody runs ahead of a half-made checkpoint

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
        self.strategy.load_state(path / "state")
        load_rng(path / "rng", self.rank if (path / "rng" / f"rank{self.rank}.json").exists() else 0)
        return meta


def check_compatible(meta: dict[str, Any], shapes: dict[str, list[int]], strategy: Any, path: Path) -> None:
    """A checkpoint of another model shape or an unreshardable world size: one line, before loading."""
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
    if strategy.name.startswith("zero") and meta["world_size"] != strategy.world_size:
        raise ConfigError(
            f"checkpoint {path} holds DeepSpeed ZeRO partitions for {meta['world_size']} ranks, this run has "
            f"{strategy.world_size}: resume at world size {meta['world_size']}, or convert it with DeepSpeed's "
            "ds_to_universal.py and load it as a universal checkpoint"
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
