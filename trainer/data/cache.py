"""The token cache: a corpus tokenized once into a memory-mapped file under data.cache_dir.

    <cache_dir>/<source>-<tokenizer>-<key>/tokens.bin   uint16 (vocab <= 65536) or uint32 ids
    <cache_dir>/<source>-<tokenizer>-<key>/meta.json    counts, dtype, split, entropy, source
    <cache_dir>/bpe-<vocab>-<key>/tokenizer.json        a BPE trained on that source

The key hashes the source's identity (file stats or dataset coordinates) and the tokenizer's
fingerprint, so a second run with the same settings opens the memmap without reading a document.
Files are written under a temporary name and renamed, so a crash never leaves a half cache that
looks whole; meta.json is written last and marks a complete entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from trainer.config import ConfigError
from trainer.data.sources import FileSource, HFSource
from trainer.data.tokenizer import HFTokenizer, Tokenizer, load_bpe, train_bpe

FORMAT_VERSION = 1  # bump when the layout of tokens.bin or meta.json changes
CHUNK_DOCUMENTS = 1024  # documents per encode_batch call
CHUNK_CHARACTERS = 1 << 22  # ... or fewer, once they hold this many characters
BPE_TRAIN_CHARACTERS = 200_000_000  # BPE merges are learned from at most this much text

Source = FileSource | HFSource


def digest(obj: Any) -> str:
    """A short stable hash of JSON-able data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def split_point(num_tokens: int, val_fraction: float) -> int:
    """Index of the first validation token: the last val_fraction of the stream is validation."""
    return num_tokens - int(num_tokens * val_fraction)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the tokens' empirical distribution (the loss of a unigram model)."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size)
    p = counts[counts > 0] / max(len(tokens), 1)
    return float(-(p * np.log(p)).sum())


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def cached_bpe(source: Source, vocab_size: int, cache_root: Path, *, show_progress: bool) -> HFTokenizer:
    """The BPE trained on this source with this vocabulary size: loaded if saved, else trained."""
    key = digest({"source": source.identity(), "vocab": vocab_size, "chars": BPE_TRAIN_CHARACTERS})
    path = cache_root / f"bpe-{vocab_size}-{key}" / "tokenizer.json"
    if path.exists():
        return load_bpe(path)
    if show_progress:
        print(f"training a {vocab_size}-token BPE on {source.describe()} -> {path}", flush=True)
    tokenizer = train_bpe(_capped_texts(source, BPE_TRAIN_CHARACTERS), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"tokenizer.json.tmp{os.getpid()}")
    tokenizer.backend.save(str(tmp))
    os.replace(tmp, path)
    return tokenizer


def _capped_texts(source: Source, max_characters: int) -> Iterator[str]:
    seen = 0
    for text, _ in source.documents():
        if text:
            yield text
            seen += len(text)
            if seen >= max_characters:
                return


@dataclass
class TokenCache:
    """An opened cache entry: the whole token stream as a read-only memmap, and its meta.json."""

    directory: Path
    tokens: np.ndarray  # (num_tokens,) memmap
    meta: dict[str, Any]
    hit: bool  # True when the entry already existed


def open_or_build(
    source: Source,
    tokenizer: Tokenizer,
    cache_root: Path,
    val_fraction: float,
    *,
    show_progress: bool,
) -> TokenCache:
    """Open the cache entry for (source, tokenizer), tokenizing the source first if it is missing."""
    identity = {
        "format": FORMAT_VERSION,
        "source": source.identity(),
        "tokenizer": tokenizer.fingerprint(),
    }
    directory = cache_root / f"{source.name}-{getattr(tokenizer, 'name', 'tok')}-{digest(identity)}"
    meta = _read_meta(directory)
    hit = meta is not None
    if meta is None:
        meta = _build(directory, source, tokenizer, val_fraction, show_progress)
    tokens = np.memmap(directory / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
    return TokenCache(directory, tokens, meta, hit)


def _read_meta(directory: Path) -> dict[str, Any] | None:
    """meta.json if the entry is complete (meta present and tokens.bin of the stated size)."""
    meta_path, tokens_path = directory / "meta.json", directory / "tokens.bin"
    if not (meta_path.exists() and tokens_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    expected = meta.get("tokens", -1) * np.dtype(meta.get("dtype", "uint8")).itemsize
    return meta if tokens_path.stat().st_size == expected else None


def _build(
    directory: Path, source: Source, tokenizer: Tokenizer, val_fraction: float, show_progress: bool
) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = directory / f"tokens.bin.tmp{os.getpid()}"
    start = time.perf_counter()
    try:
        with open(tmp, "wb") as f:
            documents, count = _write_tokens(f, source, tokenizer, dtype, show_progress)
        if count == 0:
            raise ConfigError(f"{source.label} is empty: it holds no text to tokenize")
        os.replace(tmp, directory / "tokens.bin")
    finally:
        tmp.unlink(missing_ok=True)
    tokens = np.memmap(directory / "tokens.bin", dtype=dtype, mode="r", shape=(count,))
    split = split_point(count, val_fraction)
    entropy = unigram_entropy(tokens[:split], tokenizer.vocab_size)
    meta = {
        "format": FORMAT_VERSION,
        "source": source.describe(),
        "tokenizer": tokenizer.fingerprint(),
        "documents": documents,
        "tokens": count,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "split": split,
        "train_unigram_entropy": entropy,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(directory / "meta.json", meta)
    return meta


def _write_tokens(
    f: BinaryIO, source: Source, tokenizer: Tokenizer, dtype: np.dtype, show_progress: bool
) -> tuple[int, int]:
    """Tokenize every document into `f`, each followed by eot_id. Returns (documents, tokens)."""
    total, unit = source.progress()
    documents = count = 0
    batch: list[str] = []
    batch_characters = 0
    with tqdm(
        total=total,
        unit=unit,
        unit_scale=True,
        desc=f"tokenizing {source.name}",
        disable=None if show_progress else True,  # None: off when not a terminal
    ) as bar:
        for text, advance in source.documents():
            bar.update(advance)
            if text:
                batch.append(text)
                batch_characters += len(text)
            if len(batch) >= CHUNK_DOCUMENTS or batch_characters >= CHUNK_CHARACTERS:
                count += _write_chunk(f, batch, tokenizer, dtype)
                documents += len(batch)
                batch, batch_characters = [], 0
        count += _write_chunk(f, batch, tokenizer, dtype)
        documents += len(batch)
    return documents, count


def _write_chunk(f: BinaryIO, texts: list[str], tokenizer: Tokenizer, dtype: np.dtype) -> int:
    """Encode `texts` in one batch and append them to `f`, each followed by eot_id."""
    if not texts:
        return 0
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    pieces = []
    for ids in tokenizer.encode_batch(texts):
        pieces += [ids.astype(dtype, copy=False), eot]
    chunk = np.concatenate(pieces)
    chunk.tofile(f)
    return len(chunk)
