"""Streaming: documents tokenized as training reads them, instead of into the token cache first.

    streaming_splits(source, tokenizer, seq_len, val_fraction, val_samples) -> (train split, validation split)

Documents (the non-empty texts of `source.documents()`, numbered 0, 1, 2, ...) go to validation
when their number is a multiple of k = round(1 / val_fraction), to training otherwise: a split
decided one document at a time, without reading the source first. Validation is materialised at
once as the first `val_samples` windows of its documents, a PackedSplit in memory; training is a
StreamingSplit that tokenizes a batch of documents whenever the requested windows need more.

Both splits are cut as PackedSplit cuts a token stream: each document followed by eot_id, sample i
is tokens[i*T : i*T + T + 1] for T = seq_len. The train stream does not end: after its last
document the first comes again (the next epoch, reshuffled when documents are shuffled), so any
sample index >= 0 is valid and never runs out.

Each rank tokenizes only its share: the train stream is dealt into as many lanes as the global
batch has rows (document i to lane i % B), row j of each global batch is lane j's next window
(LaneSampler), and a rank tokenizes the documents of its own rows' lanes alone. The global batches
do not depend on the number of ranks, so a run resumes bitwise at another world size (with the
same global batch).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import Protocol

import numpy as np
import torch

from trainer.config import ConfigError
from trainer.data.packing import PackedSplit
from trainer.data.sampler import LaneSampler
from trainer.data.tokenizer import Tokenizer

CHUNK_DOCUMENTS = 1024  # documents per encode_batch call
CHUNK_CHARACTERS = 1 << 22  # ... or fewer, once they hold this many characters


class Source(Protocol):
    """What streaming needs of a source (FileSource, HFSource): its documents and a name for errors."""

    label: str

    def documents(self) -> Iterator[tuple[str, int]]: ...


def validation_period(val_fraction: float) -> int:
    """k: every k-th document is a validation document (at least every second)."""
    return max(2, round(1 / val_fraction))


def split_texts(source: Source, period: int, validation: bool) -> Iterator[str]:
    """The texts of one split: the non-empty documents whose number is (validation) or is not
    (training) a multiple of `period`. Document 0 is always a validation document."""
    number = 0
    for text, _ in source.documents():
        if not text:
            continue
        if (number % period == 0) == validation:
            yield text
        number += 1


def encode_each(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """`texts` encoded in one batch, each one's int64 ids followed by eot_id."""
    eot = np.array([tokenizer.eot_id], dtype=np.int64)
    return [np.concatenate([ids.astype(np.int64, copy=False), eot]) for ids in tokenizer.encode_batch(texts)]


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """`texts` encoded in one batch and concatenated, each followed by eot_id: (num_tokens,) int64."""
    if not texts:
        return np.zeros(0, dtype=np.int64)
    eot = np.array([tokenizer.eot_id], dtype=np.int64)
    pieces = []
    for ids in tokenizer.encode_batch(texts):
        pieces += [ids.astype(np.int64, copy=False), eot]
    return np.concatenate(pieces)


def token_chunks(texts: Iterable[str], tokenizer: Tokenizer, chunk_documents: int) -> Iterator[np.ndarray]:
    """The token stream of `texts`, one encoded batch (chunk_documents texts or CHUNK_CHARACTERS) at a time."""
    batch: list[str] = []
    characters = 0
    for text in texts:
        batch.append(text)
        characters += len(text)
        if len(batch) >= chunk_documents or characters >= CHUNK_CHARACTERS:
            yield encode_documents(tokenizer, batch)
            batch, characters = [], 0
    if batch:
        yield encode_documents(tokenizer, batch)


def shuffled(texts: Iterable[str], buffer_size: int, rng: np.random.Generator) -> Iterator[str]:
    """`texts` in a seeded order that keeps at most `buffer_size` of them in memory: each new text
    takes the place of a randomly chosen one, which is yielded."""
    buffer: list[str] = []
    for text in texts:
        if len(buffer) < buffer_size:
            buffer.append(text)
            continue
        i = int(rng.integers(buffer_size))
        yield buffer[i]
        buffer[i] = text
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class _Lane:
    """One lane's buffer: consecutive pieces of its token stream, from `start` to `end`."""

    pieces: deque = field(default_factory=deque)
    start: int = 0  # lane stream position of the buffer's first token
    end: int = 0  # position after its last token
    floor: int = 0  # the lowest position the latest request asked for: tokens before it leave the buffer

    def drop(self) -> None:
        while self.pieces and self.start + len(self.pieces[0]) <= self.floor:
            self.start += len(self.pieces.popleft())

    def span(self, start: int, stop: int) -> np.ndarray:
        buffer = np.concatenate(self.pieces) if len(self.pieces) != 1 else self.pieces[0]
        self.pieces = deque([buffer])
        return buffer[start - self.start : stop - self.start]


class StreamingSplit:
    """The train split of a stream: windows of seq_len + 1 tokens, tokenized when first asked for.

    The stream is dealt into lanes: with L lanes, document i (numbered over the endless stream, epoch
    after epoch) goes to lane i % L, and each lane is packed into windows on its own. A request names
    its samples as rows (window, lane, lanes), LaneSampler's rows; a 1-D array of sample numbers n is
    one lane, the whole stream, sample n its window n. With L = the global batch, row j of every batch
    is lane j's next window: a rank that trains rows [a, b) tokenizes only the documents of lanes a ..
    b - 1 (it reads the others' texts and skips them), its share of the stream, and the global batch is
    the same whatever the number of ranks.

    `texts()` must give the same documents in the same order each time it is called: asking for a
    window before a lane's buffer (a resumed run asks for its first window at the sampler's position)
    restarts the stream and tokenizes forward to it again. Each lane's buffer holds its tokens from the
    lowest window of the latest request on.
    """

    all_targets = True  # every target counts toward the loss? (windows of a token stream: no masked or padded targets)

    def __init__(
        self,
        texts: Callable[[], Iterable[str]],
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        label: str = "the source",
        shuffle_buffer: int = 0,
        seed: int = 0,
        chunk_documents: int = CHUNK_DOCUMENTS,
    ):
        self.texts = texts
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.label = label  # names the source in errors, e.g. "data.path=/x"
        self.shuffle_buffer = shuffle_buffer  # 0: the source's order; N: shuffled within N documents
        self.seed = seed
        self.chunk_documents = chunk_documents
        self.lanes = 1  # L: the documents are dealt into this many lanes
        self.mine: set[int] = set()  # the lanes this reader tokenizes (those it has been asked for)
        self.tokenized_documents = 0  # documents this reader has tokenized (its share of those read)
        self._restart()

    def sampler(self, seed: int) -> LaneSampler:
        """The order the loop draws this split's samples in: global batch k is window k of every lane
        (`seed` shuffles nothing here; documents are shuffled by shuffle_buffer and seed at construction)."""
        return LaneSampler()

    @property
    def buffered_tokens(self) -> int:
        """Tokens held in memory: each lane's from the lowest window of the latest request to the end of
        its last tokenized document."""
        return sum(lane.end - lane.start for lane in self._lane.values())

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `indices` (rows (window, lane, lanes), or sample numbers of one lane) as (x, y), both
        int64 of shape (B, T), as PackedSplit.get_batch cuts each lane's stream."""
        rows = _rows(indices)
        if not len(rows):
            empty = torch.zeros((0, self.seq_len), dtype=torch.int64)
            return empty, empty.clone()
        lanes, asked = int(rows[0, 2]), set(rows[:, 1].tolist())
        if lanes != self.lanes or not asked <= self.mine:  # new lanes: deal the stream again
            self.mine = (self.mine if lanes == self.lanes else set()) | asked
            self.lanes = lanes
            self._restart()
        T = self.seq_len
        need = {j: (int(rows[rows[:, 1] == j, 0].min()) * T, (int(rows[rows[:, 1] == j, 0].max()) + 1) * T + 1)
                for j in sorted(asked)}  # fmt: skip
        if any(start < self._lane[j].start for j, (start, _) in need.items()):
            self._restart()
        for j, (start, _) in need.items():
            self._lane[j].floor = start
        self._fill(need)
        windows = np.empty((len(rows), T + 1), dtype=np.int64)
        for j, (start, stop) in need.items():
            tokens = self._lane[j].span(start, stop)
            picked = np.flatnonzero(rows[:, 1] == j)
            offsets = (rows[picked, 0:1] * T - start) + np.arange(T + 1)  # (rows of lane j, T+1)
            windows[picked] = tokens[offsets]
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def _restart(self) -> None:
        self.epoch = 0  # the pass over the documents that tokenization has reached
        self._documents = self._numbered_documents()
        self._lane = {j: _Lane() for j in self.mine}
        self._epoch_tokens = 0  # tokens of the first epoch, while this reader tokenizes every lane

    def _fill(self, need: dict[int, tuple[int, int]]) -> None:
        """Tokenize this reader's documents, a batch at a time, until every lane in `need` reaches its stop."""
        while any(self._lane[j].end < stop for j, (_, stop) in need.items()):
            batch, epoch_ended = self._next_documents()
            if batch:
                encoded = encode_each(self.tokenizer, [text for _, text in batch])
                for (j, _), tokens in zip(batch, encoded, strict=True):
                    self._lane[j].pieces.append(tokens)
                    self._lane[j].end += len(tokens)
                    self._epoch_tokens += len(tokens) if self.epoch == 0 else 0
                self.tokenized_documents += len(batch)
            for lane in self._lane.values():
                lane.drop()  # keeps memory bounded while skipping forward to a resume point
            whole = len(self.mine) == self.lanes  # every lane read: the first epoch's size is known
            if epoch_ended == 0 and whole and self._epoch_tokens < self.seq_len + 1:
                raise ConfigError(
                    f"train split of {self.label} holds {self._epoch_tokens} tokens, fewer than train.seq_len+1="
                    f"{self.seq_len + 1}: lower train.seq_len or use a larger corpus"
                )

    def _next_documents(self) -> tuple[list[tuple[int, str]], int | None]:
        """The next batch of this reader's documents as (lane, text), up to chunk_documents or
        CHUNK_CHARACTERS (or the end of an epoch: then also that epoch's number, else None)."""
        batch: list[tuple[int, str]] = []
        characters = 0
        while len(batch) < self.chunk_documents and characters < CHUNK_CHARACTERS:
            number, text = next(self._documents)
            if text is None:  # the end of epoch `number`
                return batch, number
            if number % self.lanes in self.mine:
                batch.append((number % self.lanes, text))
                characters += len(text)
        return batch, None

    def _numbered_documents(self) -> Iterator[tuple[int, str | None]]:
        """The endless train stream: (document number, text), epoch after epoch, with (epoch, None) after each."""
        number = 0
        for epoch in count():
            self.epoch = epoch
            texts: Iterable[str] = self.texts()
            if self.shuffle_buffer > 0:
                rng = np.random.default_rng([self.seed % 2**64, epoch])
                texts = shuffled(texts, self.shuffle_buffer, rng)
            first = number
            for text in texts:
                yield number, text
                number += 1
            if number == first:
                raise ConfigError(f"train split of {self.label} holds no documents: use a larger corpus")
            yield epoch, None


def _rows(indices: np.ndarray) -> np.ndarray:
    """Sample indices as rows (window, lane, lanes): LaneSampler's rows as they are, sample numbers as lane 0 of 1."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim == 1:
        indices = np.stack([indices, np.zeros_like(indices), np.ones_like(indices)], axis=1)
    if indices.ndim != 2 or indices.shape[1] != 3:
        raise IndexError("sample indices must be sample numbers (1-D) or rows (window, lane, lanes)")
    window, lane, lanes = indices.T
    if len(indices) and (window.min() < 0 or lanes.min() != lanes.max() or lane.min() < 0 or lane.max() >= lanes[0]):
        raise IndexError("sample indices must be non-negative windows of lanes 0 .. lanes - 1 (one lanes value)")
    return indices


def streaming_splits(
    source: Source,
    tokenizer: Tokenizer,
    seq_len: int,
    val_fraction: float,
    val_samples: int,
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    chunk_documents: int = CHUNK_DOCUMENTS,
) -> tuple[StreamingSplit, PackedSplit]:
    """(train, validation) of `source` without tokenizing it first: validation is its first
    `val_samples` windows (read now, from the validation documents only), training a StreamingSplit
    that has read nothing yet. Reading the validation documents reads the source up to the last
    one needed: about k = round(1 / val_fraction) times the validation text."""
    if val_samples < 1:
        raise ValueError(f"val_samples must be at least 1, got {val_samples}")
    period = validation_period(val_fraction)
    need = val_samples * seq_len + 1
    pieces, have = [], 0
    for chunk in token_chunks(split_texts(source, period, validation=True), tokenizer, chunk_documents):
        pieces.append(chunk)
        have += len(chunk)
        if have >= need:
            break
    val_tokens = np.concatenate(pieces)[:need] if pieces else np.zeros(0, dtype=np.int64)
    if len(val_tokens) < seq_len + 1:
        raise ConfigError(
            f"validation split of {source.label} (every {period}th document) holds {len(val_tokens)} tokens, "
            f"fewer than train.seq_len+1={seq_len + 1}: lower train.seq_len or raise data.val_fraction"
        )
    train = StreamingSplit(
        lambda: split_texts(source, period, validation=False),
        tokenizer,
        seq_len,
        label=source.label,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        chunk_documents=chunk_documents,
    )
    return train, PackedSplit(val_tokens, seq_len)
