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
sample index >= 0 is valid and SequentialSampler's 0, 1, 2, ... never runs out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import count
from typing import Protocol

import numpy as np
import torch

from trainer.config import ConfigError
from trainer.data.packing import PackedSplit
from trainer.data.sampler import SequentialSampler
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


class StreamingSplit:
    """The train split of a stream: windows of seq_len + 1 tokens, tokenized when first asked for.

    `texts()` must give the same documents in the same order each time it is called: asking for a
    window before the buffer (a resumed run, whose buffer is empty, asks for its first window at
    the sampler's position) restarts the stream and tokenizes forward to it again. The buffer
    holds the tokens from the lowest window of the latest request on, so ranks that each take
    their shard of the same consecutive global batch all move forward through one stream.
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
        self._restart()

    def sampler(self, seed: int) -> SequentialSampler:
        """The order the loop draws this split's samples in: 0, 1, 2, ... (`seed` shuffles nothing
        here; documents are shuffled by shuffle_buffer and seed at construction)."""
        return SequentialSampler()

    @property
    def buffered_tokens(self) -> int:
        """Tokens held in memory: from the lowest window of the latest request to the end of the
        last tokenized batch of documents."""
        return self._end - self._start

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `indices` as (x, y), both int64 of shape (B, T), as PackedSplit.get_batch; memory
        holds the tokens from the lowest index's window to the highest's."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) and indices.min() < 0):
            raise IndexError("sample indices must be a 1-D array of non-negative integers")
        if not len(indices):
            empty = torch.zeros((0, self.seq_len), dtype=torch.int64)
            return empty, empty.clone()
        low, high = int(indices.min()), int(indices.max())
        tokens = self._span(low * self.seq_len, (high + 1) * self.seq_len + 1)
        offsets = (indices - low)[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # (B, T+1)
        windows = torch.from_numpy(tokens[offsets])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def _restart(self) -> None:
        self.epoch = 0  # the pass over the documents that tokenization has reached
        self._chunks = self._token_chunks()
        self._pieces: deque[np.ndarray] = deque()  # the buffer: consecutive pieces of the stream
        self._start = 0  # stream position of the buffer's first token
        self._end = 0  # stream position after its last token

    def _span(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream; tokens before `start` leave the buffer."""
        if start < self._start:
            self._restart()
        while self._end < stop:
            chunk = next(self._chunks)
            self._pieces.append(chunk)
            self._end += len(chunk)
            self._drop_before(start)  # keeps memory bounded while skipping forward to a resume point
        self._drop_before(start)
        buffer = np.concatenate(self._pieces)
        self._pieces = deque([buffer])
        return buffer[start - self._start : stop - self._start]

    def _drop_before(self, position: int) -> None:
        while self._pieces and self._start + len(self._pieces[0]) <= position:
            self._start += len(self._pieces.popleft())

    def _token_chunks(self) -> Iterator[np.ndarray]:
        """The endless train stream: epoch after epoch of the documents, in encoded batches."""
        for epoch in count():
            self.epoch = epoch
            texts: Iterable[str] = self.texts()
            if self.shuffle_buffer > 0:
                rng = np.random.default_rng([self.seed % 2**64, epoch])
                texts = shuffled(texts, self.shuffle_buffer, rng)
            tokens = 0
            for chunk in token_chunks(texts, self.tokenizer, self.chunk_documents):
                tokens += len(chunk)
                yield chunk
            if epoch == 0 and tokens < self.seq_len + 1:
                raise ConfigError(
                    f"train split of {self.label} holds {tokens} tokens, fewer than train.seq_len+1="
                    f"{self.seq_len + 1}: lower train.seq_len or use a larger corpus"
                )


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
