"""The token cache: a corpus tokenized once into a memory-mapped file under data.cache_dir.

    <cache_dir>/<source>-<tokenizer>-<key>/tokens.bin   uint16 (vocab <= 65536) or uint32 ids
    <cache_dir>/<source>-<tokenizer>-<key>/meta.json    counts, dtype, split, entropy, source
    <cache_dir>/bpe-<vocab>-<key>/tokenizer.json        a BPE trained on that source

    <cache_dir>/<source>-<tokenizer>-<key>/verified.json  tokens.bin's stat when last verified whole

The key hashes the source's identity (file stats or dataset coordinates) and the tokenizer's
fingerprint, so a second run with the same settings opens the memmap without reading a document.
Files are written under a temporary name, fsynced and renamed, so a crash never leaves a half
cache that looks whole; meta.json is written last and marks a complete entry.

Integrity: meta.json holds a CRC32 of every 16 MB chunk of tokens.bin. An entry whose tokens.bin
has the wrong size or a chunk that does not match is reported in one warning line and rebuilt,
never trained on. Reading every chunk costs ~16 ms per 24 MB (the stdlib cache, 12M tokens) but
~15 s for a 20 GB cache, so the whole file is checked only when its stat (size, mtime, ctime,
inode) differs from the one recorded in verified.json after the last full check: anything that
rewrites, truncates, replaces or copies the file is caught; silent bit rot under an unchanged stat
is not (the filesystem's or the disk's own checksums are the guard there). As in git's "racy"
index entries, a stat newer than 2 s at the check is not recorded (timestamps tick coarsely, so a
write in the same tick would go unseen): a fresh cache is checked whole once more at its next use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from trainer.config import ConfigError
from trainer.data.sources import FileSource, HFSource
from trainer.data.tokenizer import HFTokenizer, Tokenizer, load_bpe, train_bpe
from trainer.files import replace_text

FORMAT_VERSION = 1  # bump when the layout of tokens.bin or meta.json changes (meta's "crc32" is optional)
CHUNK_DOCUMENTS = 1024  # documents per encode_batch call
CHUNK_CHARACTERS = 1 << 22  # ... or fewer, once they hold this many characters
BPE_TRAIN_CHARACTERS = 200_000_000  # BPE merges are learned from at most this much text
CHECKSUM_CHUNK = 16 << 20  # bytes of tokens.bin per CRC32
RACY_NS = 2_000_000_000  # a stat this recent at a full check is not trusted later (see the docstring)

Source = FileSource | HFSource
log = logging.getLogger("trainer")


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
    """The whole new JSON or the old file (a temp name per process: ranks of a node may race)."""
    replace_text(path, json.dumps(obj, indent=2), tmp=path.with_name(f"{path.name}.tmp{os.getpid()}"))


def chunk_checksums(path: Path, chunk: int | None = None) -> list[int]:
    """CRC32 of each `chunk` bytes (CHECKSUM_CHUNK) of a file, read through a memmap (no copy;
    1.5 GB/s on the 2-core CPU machine)."""
    chunk = chunk or CHECKSUM_CHUNK
    if path.stat().st_size == 0:
        return []
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return [zlib.crc32(data[start : start + chunk]) for start in range(0, len(data), chunk)]


def check_tokens(directory: Path, meta: dict[str, Any]) -> str | None:
    """None when tokens.bin is whole (its size, and every chunk's CRC32 unless its stat is the one
    verified.json recorded after the last full check), else what is wrong, in a few words."""
    path = directory / "tokens.bin"
    expected = meta["tokens"] * np.dtype(meta["dtype"]).itemsize
    size = path.stat().st_size
    if size != expected:
        return f"tokens.bin is {size:,} bytes, meta.json says {expected:,}: truncated or overwritten"
    if "crc32" not in meta or _stat_stamp(path) == _read_json(directory / "verified.json"):
        return None
    chunk = meta.get("crc32_chunk", CHECKSUM_CHUNK)
    checksums = chunk_checksums(path, chunk)
    if len(checksums) != len(meta["crc32"]):
        return "meta.json's checksums do not cover tokens.bin"
    for i, (got, want) in enumerate(zip(checksums, meta["crc32"], strict=True)):
        if got != want:
            return f"bytes {i * chunk:,}-{min((i + 1) * chunk, size):,} of tokens.bin do not match their checksum"
    stamp = _stat_stamp(path)
    if time.time_ns() - max(stamp["mtime_ns"], stamp["ctime_ns"]) > RACY_NS:
        _write_if_allowed(directory / "verified.json", stamp)
    return None


def _write_if_allowed(path: Path, obj: Any) -> None:
    """write_json_atomic, skipped where the cache cannot be written (a shared, read-only one)."""
    try:
        write_json_atomic(path, obj)
    except OSError as error:
        log.debug(f"{path} not written ({error}): the cache is checked in full at every start")


def _stat_stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
    problem = _check(directory, meta) if meta is not None else None
    if problem is not None:  # never trained on: rebuilt from the source
        log.warning(f"token cache {directory} is corrupted ({problem}): rebuilding it")
        meta = None
    hit = meta is not None
    if meta is None:
        meta = _build(directory, source, tokenizer, val_fraction, show_progress)
    tokens = np.memmap(directory / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
    return TokenCache(directory, tokens, meta, hit)


def _read_meta(directory: Path) -> dict[str, Any] | None:
    """meta.json if the entry is complete (meta.json and tokens.bin present; not yet checked)."""
    meta_path, tokens_path = directory / "meta.json", directory / "tokens.bin"
    if not (meta_path.exists() and tokens_path.exists()):
        return None
    return _read_json(meta_path) or {}  # unreadable: {}, which _check reports


def _check(directory: Path, meta: dict[str, Any]) -> str | None:
    """check_tokens, plus meta.json itself; an entry from before checksums gets them now."""
    if not {"tokens", "dtype"} <= meta.keys():
        return "meta.json is unreadable or incomplete"
    problem = check_tokens(directory, meta)
    if problem is None and "crc32" not in meta:  # trusted as it is, checked from now on
        meta.update(crc32=chunk_checksums(directory / "tokens.bin"), crc32_chunk=CHECKSUM_CHUNK)
        _write_if_allowed(directory / "meta.json", meta)
    return problem


def _build(
    directory: Path, source: Source, tokenizer: Tokenizer, val_fraction: float, show_progress: bool
) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in ("meta.json", "verified.json"):  # a corrupted entry's: incomplete until meta.json is back
        (directory / stale).unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = directory / f"tokens.bin.tmp{os.getpid()}"
    start = time.perf_counter()
    try:
        with open(tmp, "wb") as f:
            documents, count = _write_tokens(f, source, tokenizer, dtype, show_progress)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash cannot leave a whole-looking hole
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
        "crc32_chunk": CHECKSUM_CHUNK,
        "crc32": chunk_checksums(directory / "tokens.bin"),  # read back from the page cache: ~16 ms per 24 MB
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
