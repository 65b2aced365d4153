"""data=shards: windows of one or more pretokenized shard directories, sampled by weight.

    train, val = mixture_splits(shard_sets, names, weights, seq_len, val_fraction, seed)
    sampler = train.sampler(seed)          # a MixtureSampler: checkpointed with the run
    x, y = train.get_batch(shard_for_rank(sampler.next_global_batch(B), rank, world_size))

Each source's token stream is cut as the token cache's is: its last val_fraction of tokens is its
validation part, the rest its train part, each cut into windows of seq_len + 1 tokens that start
every seq_len tokens. A train sample is one window of one source, numbered flat over the sources
(source s's window w is sample offsets[s] + w).

The order is one global sequence of samples that depends on train.seed alone: the source of
sample p is drawn with probability weight / sum(weights) from a generator seeded with (seed, p //
SOURCE_BLOCK), and each source hands out its windows in its own seeded epochs of shuffled windows
(a Sampler per source). Global batch k is samples k B .. k B + B - 1 whatever the number of ranks;
each rank takes its rows of it and reads only those windows' tokens from the memmapped shards.
The sampler's state (samples drawn, each source's epoch and position, windows drawn per source)
continues the sequence exactly, at this or any other world size.

Validation: sample i is drawn as training's (its own generator stream), each source's validation
windows taken in stream order (cycling when a source's run out): a fixed mix in the weights'
proportions, the same at every evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trainer.config import ConfigError
from trainer.data.cache import split_point
from trainer.data.sampler import Sampler
from trainer.data.shards import ShardSet

SOURCE_BLOCK = 4096  # samples whose sources one generator draws
TRAIN_STREAM, VALIDATION_STREAM, WINDOW_STREAM = 0, 1, 2  # keep the generators of one seed apart


def source_draws(seed: int, weights: list[float], stream: int, start: int, stop: int) -> np.ndarray:
    """The source of each sample start .. stop - 1 of `stream`: (stop - start,) int64, source s with
    probability weights[s] / sum(weights), a function of (seed, stream, sample) alone."""
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
    cumulative /= cumulative[-1]
    first, last = start // SOURCE_BLOCK, (stop - 1) // SOURCE_BLOCK
    uniform = np.concatenate(
        [np.random.default_rng([seed % 2**64, stream, block]).random(SOURCE_BLOCK) for block in range(first, last + 1)]
    )[start - first * SOURCE_BLOCK : stop - first * SOURCE_BLOCK]
    return np.minimum(np.searchsorted(cumulative, uniform, side="right"), len(weights) - 1).astype(np.int64)


def source_seed(seed: int, source: int) -> int:
    """The seed of source `source`'s own window order."""
    return int(np.random.SeedSequence([seed % 2**64, WINDOW_STREAM, source]).generate_state(1, np.uint64)[0])


class MixtureSampler:
    """The global sequence of (source, window) samples, drawn a global batch at a time (flat indices)."""

    def __init__(self, names: list[str], windows: list[int], weights: list[float], seed: int, seq_len: int):
        self.names, self.windows, self.weights = list(names), list(windows), list(weights)
        self.seed, self.seq_len = seed, seq_len
        self.offsets = np.concatenate([[0], np.cumsum(self.windows)]).astype(np.int64)
        self.position = 0  # samples drawn so far
        self.sources = [Sampler(n, source_seed(seed, s)) for s, n in enumerate(self.windows)]
        self.drawn = [0] * len(self.names)  # windows drawn from each source

    def next_global_batch(self, global_batch_size: int) -> np.ndarray:
        """The next `global_batch_size` samples as flat indices (source s's window w: offsets[s] + w)."""
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        choice = source_draws(self.seed, self.weights, TRAIN_STREAM, self.position, self.position + global_batch_size)
        indices = np.empty(global_batch_size, dtype=np.int64)
        for s, sampler in enumerate(self.sources):
            rows = np.flatnonzero(choice == s)
            if len(rows):
                indices[rows] = self.offsets[s] + sampler.next_global_batch(len(rows))
                self.drawn[s] += len(rows)
        self.position += global_batch_size
        return indices

    def tokens_drawn(self) -> dict[str, int]:
        """Tokens (seq_len per window) each source has given the run so far, over all ranks."""
        return {name: drawn * self.seq_len for name, drawn in zip(self.names, self.drawn, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: enough to continue the sequence exactly, at any world size."""
        return {
            "kind": "mixture", "seed": self.seed, "position": self.position, "names": self.names,
            "weights": self.weights, "drawn": self.drawn, "sources": [s.state_dict() for s in self.sources],
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the same sources, weights and windows as when it was saved."""
        if state.get("kind") != "mixture":
            raise ValueError(
                "the sampler state is not a data=shards run's: the data (data=...) changed since the checkpoint"
            )
        if list(state["names"]) != self.names or [float(w) for w in state["weights"]] != self.weights:
            raise ValueError(
                f"the sampler state is for the sources {list(state['names'])} with weights {list(state['weights'])}, "
                f"this run reads {self.names} with {self.weights}: data.mixture changed since the checkpoint"
            )
        for sampler, saved in zip(self.sources, state["sources"], strict=True):
            sampler.load_state_dict(saved)  # checks the source's window count
        self.seed, self.position, self.drawn = int(state["seed"]), int(state["position"]), list(state["drawn"])


class MixtureSplit:
    """The train windows of several shard sets, addressed by flat index."""

    all_targets = True  # every target counts toward the loss? (windows of token streams: yes)

    def __init__(
        self,
        sets: list[ShardSet],
        names: list[str],
        weights: list[float],
        seq_len: int,
        spans: list[tuple[int, int]],
    ):
        self.sets, self.names, self.weights, self.seq_len = sets, names, weights, seq_len
        self.spans = spans  # each source's token range [start, stop) in its stream
        self.windows = [max(stop - start - 1, 0) // seq_len for start, stop in spans]
        self.offsets = np.concatenate([[0], np.cumsum(self.windows)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_tokens(self) -> int:
        return sum(stop - start for start, stop in self.spans)

    def sampler(self, seed: int) -> MixtureSampler:
        """The order the loop draws this split's samples in (see the module docstring)."""
        return MixtureSampler(self.names, self.windows, self.weights, seed, self.seq_len)

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `indices` (flat) as (x, y), both int64 (B, T), y one token after x; reads only their windows."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= len(self))):
            raise IndexError(f"sample indices must be a 1-D array in [0, {len(self)})")
        sources = np.searchsorted(self.offsets, indices, side="right") - 1
        windows = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for s in np.unique(sources):
            rows = np.flatnonzero(sources == s)
            starts = self.spans[s][0] + (indices[rows] - self.offsets[s]) * self.seq_len
            windows[rows] = self.sets[s].read(starts, self.seq_len + 1)
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class MixtureValidation(MixtureSplit):
    """The validation windows, sample i a fixed (source, window) mixed by weight (module docstring)."""

    def __init__(self, *args: Any, seed: int):
        super().__init__(*args)
        self.seed = seed

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= len(self))):
            raise IndexError(f"sample indices must be a 1-D array in [0, {len(self)})")
        if not len(indices):
            return super().get_batch(indices)
        sources = source_draws(self.seed, self.weights, VALIDATION_STREAM, 0, int(indices.max()) + 1)
        taken = np.empty(len(sources), dtype=np.int64)  # how many of its windows each sample's source gave before
        for s in range(len(self.sets)):
            rows = np.flatnonzero(sources == s)
            taken[rows] = np.arange(len(rows)) % max(self.windows[s], 1)
        return super().get_batch(self.offsets[sources[indices]] + taken[indices])


def mixture_splits(
    sets: list[ShardSet], names: list[str], weights: list[float], seq_len: int, val_fraction: float, seed: int
) -> tuple[MixtureSplit, MixtureValidation]:
    """(train, validation) over the shard sets: each one's last val_fraction of tokens is validation.
    A source without one window (seq_len + 1 tokens) in either part is refused, named."""
    cuts = [split_point(s.num_tokens, val_fraction) for s in sets]
    for shards, cut in zip(sets, cuts, strict=True):
        for part, tokens, fix in (
            ("train", cut, "use a larger corpus"),
            ("validation", shards.num_tokens - cut, "raise data.val_fraction"),
        ):
            if tokens < seq_len + 1:
                raise ConfigError(
                    f"{shards.label}: the {part} part of {shards.directory} holds {tokens} tokens, fewer than "
                    f"train.seq_len+1={seq_len + 1}: lower train.seq_len or {fix}"
                )
    train = MixtureSplit(sets, names, weights, seq_len, [(0, cut) for cut in cuts])
    val = MixtureValidation(
        sets, names, weights, seq_len, [(cut, s.num_tokens) for s, cut in zip(sets, cuts, strict=True)], seed=seed
    )
    return train, val


def mixture_entropy(sets: list[ShardSet], weights: list[float]) -> float:
    """Entropy in nats of the mixture's unigram distribution (each source's, from its unigram.npy, by weight)."""
    mixed = 0.0  # one tokenizer, so one vocabulary: the counts line up
    for shards, weight in zip(sets, weights, strict=True):
        counts = np.load(shards.directory / "unigram.npy").astype(np.float64)
        mixed = mixed + weight / sum(weights) * counts / max(counts.sum(), 1.0)
    p = mixed[mixed > 0]
    return float(-(p * np.log(p)).sum())
