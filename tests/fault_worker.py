"""Run under torchrun by tests/test_faults.py: faults made on purpose in the real strategy and
checkpoint code (test-only hooks, no config knob).

    torchrun --nproc_per_node 2 tests/fault_worker.py hang OUT_DIR
    torchrun --nproc_per_node 2 tests/fault_worker.py failed-write OUT_DIR

hang: parallel=ddp with parallel.timeout_s=5; rank 1 never comes to the step (it sleeps), rank 0
runs train_step. Rank 0 prints the CollectiveError as `python -m trainer` prints a one-line error
and exits with 3; torchrun then stops rank 1.
failed-write: checkpoints of a parallel=ddp model where rank 1's writes fail (ENOSPC at its first
or its last file, sync and async saves); each rank writes OUT_DIR/rank{R}.json: per case, the
error it raised, and on rank 0 what the checkpoint directory held afterwards.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from helpers import build

from trainer.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig

MODEL = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=False)
TIMEOUT_S = 5  # parallel.timeout_s of the hang case


def config(strategy: str = "ddp", timeout_s: float = TIMEOUT_S) -> Config:
    return Config(
        model=MODEL,
        parallel=ParallelConfig(strategy=strategy, timeout_s=timeout_s),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
        train=TrainConfig(micro_batch_size=2, seq_len=16, max_steps=10, device="cpu"),
    )


class FailingWrites:
    """Stands in for `open`: the n-th file opened for writing under `root` (counting from 1) fails
    with OSError(code), as a full disk does; n=None only counts. Thread-safe: DCP and async saves
    write from threads."""

    def __init__(self, root: Path, n: int | None = None, code: int = errno.ENOSPC) -> None:
        self.root, self.n, self.code = str(root), n, code
        self.opened: list[str] = []
        self._open = io.open
        self._lock = threading.Lock()

    def __call__(self, file, mode: str = "r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and str(file).startswith(self.root):
            with self._lock:
                self.opened.append(str(file))
                count = len(self.opened)
            if count == self.n:
                raise OSError(self.code, os.strerror(self.code), str(file))
        return self._open(file, mode, *args, **kwargs)


@contextlib.contextmanager
def failing_writes(root: Path, n: int | None = None, code: int = errno.ENOSPC) -> Iterator[FailingWrites]:
    """FailingWrites in place of io.open and open (pathlib writes through io.open) while inside."""
    injector = FailingWrites(root, n, code)
    saved = io.open, builtins.open
    io.open = builtins.open = injector
    try:
        yield injector
    finally:
        io.open, builtins.open = saved


def hang(out: Path) -> None:
    import torch.distributed as dist

    from trainer.parallel.dist import CollectiveError
    from trainer.step import train_step

    strategy = build(config())  # both ranks: DDP broadcasts rank 0's weights
    rank = dist.get_rank()
    (out / "logs").mkdir(parents=True, exist_ok=True)  # where python -m trainer's ranks log
    logging.getLogger().addHandler(logging.FileHandler(out / "logs" / f"rank{rank}.log"))
    if rank == 1:
        time.sleep(300)  # hung: never comes to the step's collectives (torchrun stops it)
        return
    tokens = torch.randint(MODEL.vocab_size, (2, 17))
    try:
        train_step(strategy, tokens[:, :-1], tokens[:, 1:], 1, clip_grad_norm=1.0, all_targets=True)
    except CollectiveError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(3)
    print("the step finished without rank 1", file=sys.stderr, flush=True)


def failed_write(out: Path) -> None:
    import torch.distributed as dist

    from trainer.checkpoint import Checkpointer, CheckpointStore, CheckpointWriteError, RNGState, verify
    from trainer.state import TrainState
    from trainer.step import train_step

    strategy = build(config(timeout_s=60))
    rank = dist.get_rank()
    tokens = torch.randint(MODEL.vocab_size, (2, 17))
    train_step(strategy, tokens[:, :-1], tokens[:, 1:], 1, clip_grad_norm=1.0)  # AdamW state exists
    run_dir = out / "run"
    checkpointer = Checkpointer(CheckpointStore(run_dir, keep=2))

    def parts(step: int) -> dict:
        return {**strategy.checkpoint_parts(), "train_state": TrainState(step=step), "rng": RNGState(rank)}

    with failing_writes(run_dir) as counted:
        checkpointer.save(1, parts(1))
    results: dict = {"files": counted.opened}
    checkpoints = run_dir / "checkpoints"
    for async_save in (False, True):
        for which, n in (("first", 1), ("last", len(counted.opened))):  # rank 1's: a DCP shard, its RNG
            case = f"{'async' if async_save else 'sync'}, {which} file"
            with failing_writes(run_dir, n if rank == 1 else None):
                try:
                    checkpointer.save(2, parts(2), async_save=async_save)
                    checkpointer.wait()
                    results[case] = None
                except CheckpointWriteError as error:
                    results[case] = str(error)
            if rank == 0:
                results[f"{case} left"] = {
                    "entries": sorted(p.name for p in checkpoints.iterdir()),
                    "latest": (checkpoints / "latest").read_text().strip(),
                    "verify": verify(checkpoints / "step_00000001"),
                }
    checkpointer.save(2, parts(2))  # the group is still whole: a save that can write commits
    results["then"] = (checkpoints / "latest").read_text().strip()
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    {"hang": hang, "failed-write": failed_write}[mode](out_dir)
