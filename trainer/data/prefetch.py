"""Data off the critical path: this rank's next batch is read while the current one trains.

    batches = Prefetcher(data.train, sampler, global_batch, rank=rank, world_size=world_size, device=device)
    x, y, positions = batches.next()  # each step: on `device`; positions None without document masking
    batches.close()

One daemon thread reads the batch after the one `next()` returns (its indices, this rank's shard, the
tensors, pinned on CUDA), so a step waits only for what the thread has not finished yet.

The sampler stays the single source of truth for checkpoints: the thread draws its indices from a
copy (`ahead`), never from the sampler itself. `next()` draws from the sampler as the plain path
does and takes the read-ahead batch only when both its indices and the sampler state after them
match the copy's; otherwise (the sampler was loaded from a checkpoint, or changed by anyone else)
the read-ahead batch is dropped, the batch is read at once and the copy starts again from the
sampler. A batch is a function of its indices alone, so a resumed run reads bitwise the same data.

Reads never overlap: `next()` waits for the thread's read before reading itself. A streamed split
(StreamingSplit, a stateful reader) therefore sees the same requests, in the same order, as without
prefetching, one batch ahead, and stays on for it. Only a sampler loaded mid-run drops a read-ahead;
the stream then goes where the sampler now points (back: it starts over, as on resume).

On CUDA the read tensors are pinned (page-locked) so `.to(device, non_blocking=True)` is a truly
asynchronous copy (PyTorch's pinned-memory cache keeps each buffer until its copy has run); on the
CPU they are used as read, without a copy.
"""

from __future__ import annotations

import copy
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from trainer.data.sampler import shard_for_rank

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # x, y, positions (or None)


class Split(Protocol):
    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]: ...


class SamplerLike(Protocol):
    def next_global_batch(self, global_batch_size: int) -> np.ndarray: ...
    def state_dict(self) -> dict[str, Any]: ...


@dataclass
class _ReadAhead:
    indices: np.ndarray  # the global batch it was read for
    state: dict[str, Any]  # the sampler state after drawing those indices
    tensors: tuple[torch.Tensor, ...] | None  # this rank's shard, on the host (pinned on CUDA)
    error: Exception | None = None  # what reading it raised instead


class Prefetcher:
    """This rank's batches in its sampler's order, each read one step ahead on a background thread
    (enabled=False: read when asked, the plain path)."""

    def __init__(
        self,
        split: Split,
        sampler: SamplerLike,
        global_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        enabled: bool = True,
    ):
        self.split, self.sampler, self.global_batch = split, sampler, global_batch
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.enabled = enabled
        self.ahead: SamplerLike | None = None  # the thread's copy of the sampler (one batch ahead of it)
        self.pending: Future | None = None  # the read-ahead batch, a _ReadAhead, while there is one
        self.hits = self.misses = 0  # batches taken from the read-ahead / read when asked
        self.closed = False
        self._worker = _Worker() if enabled else None
        # At interpreter exit (or when the prefetcher is collected) the thread stops between reads.
        self._finalizer = weakref.finalize(self, self._worker.stop) if self._worker else None

    def next_tensors(self) -> tuple[torch.Tensor, ...]:
        """The next global batch's share of this rank, on the device: every tensor the split's
        get_batch returns (for the objectives' splits, named by their `fields`). Advances the sampler by one global batch, as the plain path does. An exception the thread
        raised reading this batch is raised here, as it was raised."""
        if self.closed:
            raise RuntimeError("this Prefetcher is closed")
        indices = self.sampler.next_global_batch(self.global_batch)
        read = self._wait_for_read_ahead()  # no two reads overlap: the split may be a stateful reader
        if read is not None and np.array_equal(read.indices, indices) and read.state == self.sampler.state_dict():
            self.hits += 1
            if read.error is not None:
                raise read.error
            tensors = read.tensors
        else:  # no read-ahead yet, or the sampler moved elsewhere (a checkpoint loaded): read now
            self.misses += 1
            self.ahead = None
            tensors = self._read(indices)
        if self.enabled:
            if self.ahead is None:  # (re)start the copy from the sampler's state after this batch
                self.ahead = copy.deepcopy(self.sampler)
            self.pending = self._worker.submit(self._read_ahead)
        return tuple(self._to_device(t) for t in tensors)

    def next(self) -> Batch:
        """The next global batch's share of this rank, on the device: (x, y, positions or None)."""
        x, y, *positions = self.next_tensors()
        return x, y, positions[0] if positions else None

    def close(self) -> None:
        """Stop the thread (after the read in progress, if any) and drop the read-ahead batch."""
        self.closed = True
        self.pending = None
        if self._finalizer is not None:
            self._finalizer()  # worker.stop, once: here rather than at exit

    def _wait_for_read_ahead(self) -> _ReadAhead | None:
        future, self.pending = self.pending, None
        if future is None or future.exception() is not None:  # exception(): waits for the read
            return None  # the copy of the sampler failed to draw: the sampler itself will say why
        return future.result()

    def _read_ahead(self) -> _ReadAhead:
        """On the thread: the batch after the one just returned, drawn from the copy of the sampler."""
        indices = self.ahead.next_global_batch(self.global_batch)
        state = self.ahead.state_dict()
        try:
            return _ReadAhead(indices, state, self._read(indices))
        except Exception as error:  # raised by next() if the loop asks for this batch
            return _ReadAhead(indices, state, None, error)

    def _read(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        tensors = self.split.get_batch(shard_for_rank(indices, self.rank, self.world_size))
        return tuple(t.pin_memory() for t in tensors) if self.pin else tuple(tensors)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return tensor
        return tensor.to(self.device, non_blocking=True)  # asynchronous from pinned memory


class _Worker:
    """One daemon thread that runs submitted functions in order, each into its Future. It holds no
    reference to a job once it has run, so its Prefetcher can be collected (and closed) while it waits."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=_run_jobs, args=(self.jobs,), name="trainer-prefetch", daemon=True)
        self.thread.start()

    def submit(self, job: Callable[[], Any]) -> Future:
        future: Future = Future()
        self.jobs.put((job, future))
        return future

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to end after its current job and wait for it (at most `timeout` seconds:
        a read stuck on a slow source must not hold up the exit; the thread is a daemon)."""
        self.jobs.put(None)
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


def _run_jobs(jobs: queue.SimpleQueue) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        function, future = job
        del job
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(function())
            except BaseException as error:  # a future always ends, or next() would wait forever
                future.set_exception(error)
        del function, future
