"""A deterministic, resumable order over sample indices, and the slice of it each rank trains on.

Every rank builds the same sampler and draws the same global batch, then keeps its own shard: no
communication, and a checkpoint needs only `state_dict()` from one rank. `Sampler` shuffles a
split of known size (PackedSplit); `LaneSampler` hands a streamed split (StreamingSplit), which
cannot be shuffled globally, each lane's next window (`SequentialSampler` counts 0, 1, 2, ...: one
lane); data=shards has its MixtureSampler (trainer/data/mixture.py). Each split's `sampler(seed)`
gives its kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Sampler:
    """Epochs of shuffled sample indices. Epoch e's order is a permutation drawn from
    numpy's Generator seeded with (seed, e), so any position can be recomputed from
    (seed, epoch, position) alone."""

    def __init__(self, num_samples: int, seed: int):
        if num_samples <= 0:
            raise ValueError(f"a sampler needs at least one sample, got num_samples={num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation of the next sample
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _permutation(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed % 2**64, self.epoch])
            self._order = rng.permutation(self.num_samples)
            self._order_epoch = self.epoch
        return self._order

    def next_global_batch(self, global_batch_size: int) -> np.ndarray:
        """The next `global_batch_size` sample indices; an epoch that runs out continues into the
        next (freshly shuffled) one, so within one epoch no index repeats."""
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        parts = []
        needed = global_batch_size
        while needed > 0:
            taken = self._permutation()[self.position : self.position + needed]
            parts.append(taken)
            needed -= len(taken)
            self.position += len(taken)
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: enough to continue exactly where this sampler is."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the data must have the same number of samples as when saved."""
        if state.get("kind") == "mixture":
            raise ValueError(
                "the sampler state is a data=shards run's but this run reads a token cache: data changed since "
                "the checkpoint"
            )
        if "num_samples" not in state:
            raise ValueError(
                "the sampler state is a streamed run's (data.streaming=true) but this run reads a token "
                "cache: data.streaming changed since the checkpoint"
            )
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"the sampler state is for {state['num_samples']} samples but the data now has "
                f"{self.num_samples}: the data or train.seq_len changed since the checkpoint"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order_epoch = -1


class LaneSampler:
    """A streamed split's order in lanes (StreamingSplit): global batch k of B rows is window k of
    lanes 0 .. B - 1, as rows (window, lane, lanes) of a (B, 3) int64 array. Rank r's contiguous rows
    are always the same lanes, so it tokenizes those lanes' documents alone."""

    def __init__(self) -> None:
        self.batches = 0  # global batches drawn: the next one is window `batches` of each lane

    def next_global_batch(self, global_batch_size: int) -> np.ndarray:
        """The next global batch: (global_batch_size, 3) rows (window, lane, lanes)."""
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        lanes = np.arange(global_batch_size, dtype=np.int64)
        rows = np.stack([np.full_like(lanes, self.batches), lanes, np.full_like(lanes, global_batch_size)], axis=1)
        self.batches += 1
        return rows

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: the global batches drawn."""
        return {"kind": "lanes", "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`, which a LaneSampler wrote."""
        if state.get("kind") == "sequential":
            raise ValueError(
                "the sampler state is a streamed run's from before streams were dealt into lanes (each rank "
                "tokenizing its own share): start the run afresh (train.resume=none)"
            )
        if state.get("kind") != "lanes":
            raise ValueError(
                "the sampler state is a shuffled sampler's (a token-cache or shards run) but this run streams its "
                "data: data.streaming changed since the checkpoint"
            )
        self.batches = int(state["batches"])


class SequentialSampler:
    """Sample indices 0, 1, 2, ... without end, in order: a streamed split's windows are read as the
    stream produces them (its documents may be shuffled in a bounded buffer, see StreamingSplit)."""

    def __init__(self) -> None:
        self.position = 0  # the next sample index

    def next_global_batch(self, global_batch_size: int) -> np.ndarray:
        """The next `global_batch_size` consecutive sample indices."""
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        indices = np.arange(self.position, self.position + global_batch_size, dtype=np.int64)
        self.position += global_batch_size
        return indices

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: the next sample index."""
        return {"kind": "sequential", "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`, which a SequentialSampler wrote."""
        if state.get("kind") != "sequential":
            raise ValueError(
                "the sampler state is a shuffled sampler's (a token-cache run) but this run streams its "
                "data: data.streaming changed since the checkpoint"
            )
        self.position = int(state["position"])


def shard_for_rank(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous chunk of a global batch: the world's chunks are disjoint, cover the
    batch, and concatenated in rank order give it back (so one process can replay a world's step)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if len(indices) % world_size:
        raise ValueError(f"a global batch of {len(indices)} does not split evenly over {world_size} ranks")
    size = len(indices) // world_size
    return indices[rank * size : (rank + 1) * size]
