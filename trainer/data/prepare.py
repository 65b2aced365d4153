"""`python -m trainer.data.prepare SOURCE --out DIR --workers N --tokenizer byte|bpe|TOKENIZER_DIR`:
a corpus tokenized once into fixed-size token shards that `data=shards data.path=DIR` trains on.

SOURCE is what data=files reads (a text file, a directory or glob of text files, a .jsonl file
with a text field --text-field) or `stdlib`. The layout of DIR is in trainer/data/shards.py.

Work: this process reads the documents in order and deals them, in chunks of CHUNK_DOCUMENTS, to
N tokenizing processes; it takes the chunks back in the order it dealt them and appends them to
the current shard. The output is therefore a function of the source and the tokenizer alone:
N workers write the bytes one worker writes. At most 2 N chunks are in flight (memory stays flat).

Resume: a shard's .bin and .idx are written under temporary names, flushed and renamed, then its
record (shard-K.json: counts, sha256, and the document and token where the next shard starts);
meta.json comes last. Run again after a kill, prepare checks prepare.json (same source, tokenizer
and shard size, or it refuses), re-verifies each finished shard's sha256, drops the first bad one
and all after it, and goes on from the last good record's document and token: the documents
before it are read again (not tokenized). A finished DIR is verified and left as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import ConfigError, DataConfig
from trainer.data.cache import cached_bpe, token_dtype
from trainer.data.shards import FORMAT_VERSION, save_tokenizer_files, shard_name, tokenizer_record
from trainer.data.sources import FileSource, HFSource, open_source
from trainer.data.tokenizer import ByteTokenizer, Tokenizer, load_pretrained_tokenizer
from trainer.files import fsync, replace_text

CHUNK_DOCUMENTS = 128  # documents per task handed to a worker
CHUNK_CHARACTERS = 1 << 20  # ... or fewer, once they hold this many characters
DEFAULT_SHARD_TOKENS = 100_000_000  # nanoGPT's FineWeb shards: 200 MB of uint16
PROGRESS_SECONDS = 2.0  # a progress line at most this often
# fork where there is one: a worker starts in milliseconds with this process's modules (spawn re-imports
# torch in each, ~5 s); the pool is made before this process starts any thread
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
COUNT_BLOCK = 1 << 24  # tokens per bincount when a resume recounts the finished shards


@dataclass
class Chunk:
    """Documents dealt to one task: their texts (dropped once encoded), the first one's number, the
    tokens of the first one already in a finished shard (a resume), the source's progress after them."""

    texts: list[str]
    first: int
    skip: int
    progress: int


@dataclass
class Written:
    """What the writer has finished: the shards' records, the documents' next number, token counts."""

    records: list[dict[str, Any]] = field(default_factory=list)
    document: int = 0  # the next document to tokenize
    offset: int = 0  # its tokens already in the last finished shard
    counts: np.ndarray | None = None  # (vocab,) int64 count of each id in the finished shards


# -- workers ------------------------------------------------------------------------------------

_tokenizer: Tokenizer | None = None  # a worker's own copy, set by _start_worker


def encode_chunk(tokenizer: Tokenizer, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """`texts` encoded in one batch: (their tokens, each followed by eot_id, concatenated; each one's length)."""
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    pieces, lengths = [], []
    for ids in tokenizer.encode_batch(texts):
        pieces += [ids.astype(dtype, copy=False), eot]
        lengths.append(len(ids) + 1)
    return np.concatenate(pieces), np.asarray(lengths, dtype=np.int64)


def _start_worker(tokenizer: Tokenizer, parent: int) -> None:
    global _tokenizer
    _tokenizer = tokenizer
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A killed prepare leaves no worker behind: each exits within a second of its parent."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _encode_in_worker(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return encode_chunk(_tokenizer, texts, dtype)


def chunks(source: FileSource | HFSource, start: int, skip: int) -> Iterator[Chunk]:
    """The source's non-empty documents from number `start` on, in chunks (the earlier ones are read, not kept)."""
    number, progress, batch, characters, first = 0, 0, [], 0, start
    for text, advance in source.documents():
        progress += advance
        if not text:
            continue
        number += 1
        if number <= start:
            continue
        batch.append(text)
        characters += len(text)
        if len(batch) >= CHUNK_DOCUMENTS or characters >= CHUNK_CHARACTERS:
            yield Chunk(batch, first, skip if first == start else 0, progress)
            first, batch, characters = first + len(batch), [], 0
    if batch:
        yield Chunk(batch, first, skip if first == start else 0, progress)


def encoded(
    stream: Iterator[Chunk], tokenizer: Tokenizer, dtype: str, workers: int
) -> Iterator[tuple[Chunk, np.ndarray, np.ndarray]]:
    """Each chunk with its tokens and document lengths, in the order dealt: here (1 worker) or in
    `workers` spawned processes, at most 2 * workers chunks in flight."""
    if workers == 1:
        for chunk in stream:
            yield chunk, *encode_chunk(tokenizer, chunk.texts, dtype)
        return
    context = multiprocessing.get_context(START_METHOD)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a worker is one thread: the pool is the parallelism
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer, os.getpid())) as pool:
        pending: deque = deque()
        for chunk in stream:
            pending.append((chunk, pool.apply_async(_encode_in_worker, (chunk.texts, dtype))))
            chunk.texts = []
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, *result.get()
        while pending:
            done, result = pending.popleft()
            yield done, *result.get()


# -- the writer ---------------------------------------------------------------------------------


class ShardWriter:
    """Appends documents' tokens to shards of `shard_tokens`, finishing each as it fills."""

    def __init__(self, out: Path, dtype: str, shard_tokens: int, vocab_size: int, written: Written):
        self.out, self.dtype, self.size = out, np.dtype(dtype), shard_tokens
        self.written = written
        self.counts = written.counts if written.counts is not None else np.zeros(vocab_size, dtype=np.int64)
        self.position = sum(r["tokens"] for r in written.records)  # stream position of the next token
        self.file = None
        self.filled = 0  # tokens in the open shard
        self.starts: list[np.ndarray] = []  # its document offsets
        self.sha = hashlib.sha256()

    @property
    def shard(self) -> int:
        return len(self.written.records)

    def add(self, tokens: np.ndarray, lengths: np.ndarray, first: int, skip: int) -> None:
        """Documents first, first + 1, ... (their tokens concatenated), the first `skip` tokens already written."""
        tokens = tokens[skip:]
        starts = np.cumsum(lengths) - lengths - skip  # each document's start in `tokens` (a resumed one's < 0)
        done = 0
        while done < len(tokens):
            take = min(self.size - self.filled, len(tokens) - done)
            self._write(tokens[done : done + take])
            inside = starts[(starts >= done) & (starts < done + take)]
            self.starts.append(inside - done + self.filled - take)
            done += take
            if self.filled == self.size:
                if done == len(tokens):
                    after = (first + len(lengths), 0)
                else:
                    j = int(np.searchsorted(starts, done, side="right")) - 1
                    after = (first + j, int(done - starts[j]))
                self._finish(after)
        self.position += len(tokens)

    def close(self, documents: int) -> None:
        """Finish the last, partly filled shard (none when the stream ended on a shard boundary)."""
        if self.filled:
            self._finish((documents, 0))

    def _write(self, piece: np.ndarray) -> None:
        if self.file is None:
            self.file = open(self.out / f"{shard_name(self.shard)}.bin.tmp", "wb")
        data = piece.astype(self.dtype, copy=False).tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.counts += np.bincount(piece, minlength=len(self.counts))
        self.filled += len(piece)

    def _finish(self, after: tuple[int, int]) -> None:
        stem = self.out / shard_name(self.shard)
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before the rename: a crash cannot leave a whole-looking hole
        self.file.close()
        os.replace(stem.with_name(stem.name + ".bin.tmp"), stem.with_suffix(".bin"))
        index = np.concatenate(self.starts).astype(np.int64).tobytes()
        _write_bytes(stem.with_suffix(".idx"), index)
        record = {
            "tokens": self.filled, "documents": sum(len(s) for s in self.starts), "sha256": self.sha.hexdigest(),
            "index_sha256": hashlib.sha256(index).hexdigest(), "next_document": after[0], "next_offset": after[1],
        }  # fmt: skip
        replace_text(stem.with_suffix(".json"), json.dumps(record, indent=1))  # last: the shard is finished
        self.written.records.append(record)
        self.written.document, self.written.offset = after
        self.file, self.filled, self.starts, self.sha = None, 0, [], hashlib.sha256()


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- resume -------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def check_shard(out: Path, k: int, itemsize: int) -> dict[str, Any] | None:
    """Shard k's record if the shard is finished and its files match it, else None."""
    stem = out / shard_name(k)
    try:
        record = json.loads(stem.with_suffix(".json").read_text())
        bin_path, idx_path = stem.with_suffix(".bin"), stem.with_suffix(".idx")
        if bin_path.stat().st_size != record["tokens"] * itemsize:
            return None
        if sha256_file(bin_path) != record["sha256"] or sha256_file(idx_path) != record["index_sha256"]:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return record


def resume_state(out: Path, identity: dict[str, Any], vocab_size: int, echo: Any) -> Written:
    """What an earlier prepare into `out` finished and verified; removes everything after it."""
    plan = out / "prepare.json"
    if plan.exists():
        if json.loads(plan.read_text()) != identity:
            raise ConfigError(
                f"--out {out} holds shards of another prepare (its prepare.json names another source, tokenizer "
                "or --shard-tokens): choose another --out, or delete that directory"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty and was not written by prepare: choose a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    replace_text(plan, json.dumps(identity, indent=1, sort_keys=True))
    written = Written()
    itemsize = np.dtype(identity["dtype"]).itemsize
    while (record := check_shard(out, len(written.records), itemsize)) is not None:
        written.records.append(record)
        written.document, written.offset = record["next_document"], record["next_offset"]
    kept = len(written.records)
    stale = [p for p in out.iterdir() if p.name.startswith("shard-") and _shard_number(p) >= kept]
    stale += [p for p in out.iterdir() if ".tmp" in p.name]
    if stale or len(_read_meta(out).get("shards", [])) != kept:
        stale.append(out / "meta.json")  # the set is not whole (any more): meta.json comes back last
    for path in stale:
        path.unlink(missing_ok=True)
    if kept and not (out / "meta.json").exists():
        echo(f"prepare: resuming after {kept} verified shards, at document {written.document:,}")
        written.counts = np.zeros(vocab_size, dtype=np.int64)
        for k in range(kept):
            tokens = np.memmap(out / f"{shard_name(k)}.bin", dtype=identity["dtype"], mode="r")
            for start in range(0, len(tokens), COUNT_BLOCK):
                written.counts += np.bincount(tokens[start : start + COUNT_BLOCK], minlength=vocab_size)
    return written


def _read_meta(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _shard_number(path: Path) -> int:
    try:
        return int(path.name[len("shard-") :].split(".")[0])
    except ValueError:
        return -1


# -- the command --------------------------------------------------------------------------------


def prepare(
    source: FileSource | HFSource,
    tokenizer: Tokenizer,
    out: Path,
    *,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    echo: Any = print,
) -> dict[str, Any]:
    """Tokenize `source` into shards in `out` (resuming what an earlier run finished); returns meta.json."""
    if workers < 1:
        raise ConfigError(f"--workers={workers}: use 1 or more tokenizing processes")
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens={shard_tokens} must be positive")
    dtype = token_dtype(tokenizer.vocab_size).name
    identity = {
        "format": FORMAT_VERSION, "source": source.identity(), "tokenizer": tokenizer.fingerprint(),
        "shard_tokens": shard_tokens, "dtype": dtype,
    }  # fmt: skip
    identity = json.loads(json.dumps(identity))  # as prepare.json holds it
    written = resume_state(out, identity, tokenizer.vocab_size, echo)
    if (out / "meta.json").exists():  # finished before, every shard verified just now
        echo(f"prepare: {out} is already prepared ({len(written.records)} shards verified): nothing to do")
        return _read_meta(out)
    writer = ShardWriter(out, dtype, shard_tokens, tokenizer.vocab_size, written)
    total, _ = source.progress()
    started = last = time.perf_counter()
    new_tokens, documents = 0, written.document
    for chunk, tokens, lengths in encoded(chunks(source, written.document, written.offset), tokenizer, dtype, workers):
        writer.add(tokens, lengths, chunk.first, chunk.skip)
        new_tokens += len(tokens) - chunk.skip
        documents = chunk.first + len(lengths)
        if time.perf_counter() - last >= PROGRESS_SECONDS:
            last = time.perf_counter()
            read = f"{100 * chunk.progress / total:.1f}% of the source read, " if total else ""
            echo(
                f"prepare: {read}{writer.shard} shards written, {writer.position:,} tokens, {documents:,} documents, "
                f"{new_tokens / (last - started):,.0f} tokens/s"
            )
    writer.close(documents)
    records = written.records
    if not records:
        raise ConfigError(f"{source.label} is empty: it holds no text to tokenize")
    save_tokenizer_files(tokenizer, out)
    np.save(out / "unigram.npy", writer.counts)
    tokens_total = sum(r["tokens"] for r in records)
    meta = {
        "format": FORMAT_VERSION, "source": source.describe(), "tokenizer": tokenizer_record(tokenizer),
        "dtype": dtype, "shard_tokens": shard_tokens, "tokens": tokens_total,
        "documents": sum(r["documents"] for r in records),
        "unigram_entropy": unigram_entropy_of_counts(writer.counts),
        "shards": [
            {"file": f"{shard_name(k)}.bin", "index": f"{shard_name(k)}.idx",
             **{key: r[key] for key in ("tokens", "documents", "sha256", "index_sha256")}}
            for k, r in enumerate(records)
        ],
    }  # fmt: skip
    replace_text(out / "meta.json", json.dumps(meta, indent=1))
    fsync(out)
    seconds = time.perf_counter() - started
    echo(
        f"prepared {out}: {tokens_total:,} tokens ({dtype}) in {len(records)} shards of {shard_tokens:,}, "
        f"{meta['documents']:,} documents; this run tokenized {new_tokens:,} tokens in {seconds:.1f} s "
        f"({new_tokens / max(seconds, 1e-9):,.0f} tokens/s) with {workers} worker{'s' * (workers > 1)}"
    )
    return meta


def unigram_entropy_of_counts(counts: np.ndarray) -> float:
    """Entropy in nats of the distribution `counts` describe (cache.unigram_entropy from counts)."""
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return float(-(p * np.log(p)).sum())


def open_prepare_source(
    path: str, text_field: str, extensions: list[str] | None, cache_dir: str = "~/.cache/trainer"
) -> FileSource | HFSource:
    """SOURCE as data=files reads it (or data=stdlib for `stdlib`)."""
    cache_root = Path(cache_dir).expanduser()
    if path == "stdlib":
        return open_source(DataConfig(source="stdlib"), cache_root)
    cfg = DataConfig(source="files", path=path, text_field=text_field)
    if extensions:
        cfg.extensions = extensions
    return open_source(cfg, cache_root)


def load_tokenizer(setting: str, source: FileSource | HFSource, bpe_vocab_size: int, cache_dir: str) -> Tokenizer:
    """--tokenizer: byte, bpe (trained on SOURCE, as data.tokenizer=bpe would, and cached) or a tokenizer DIR."""
    if setting == "byte":
        return ByteTokenizer()
    if setting == "bpe":
        return cached_bpe(source, bpe_vocab_size, Path(cache_dir).expanduser(), show_progress=True)
    return load_pretrained_tokenizer(setting, "--tokenizer")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.prepare",
        description="Tokenize a corpus into token shards for data=shards (resumable; N workers write what 1 writes).",
    )
    parser.add_argument("source", help="a text file, a directory or glob of text files, a .jsonl file, or stdlib")
    parser.add_argument("--out", required=True, help="the shard directory (created; a killed prepare resumes there)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    parser.add_argument("--tokenizer", default="byte", help="byte (default), bpe, or a Hugging Face tokenizer DIR")
    parser.add_argument("--bpe-vocab-size", type=int, default=4096, help="--tokenizer=bpe: its vocabulary")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    parser.add_argument("--text-field", default="text", help="the text of .jsonl / .json / .parquet records")
    parser.add_argument("--extensions", nargs="*", help="a directory's files with these suffixes (data.extensions)")
    parser.add_argument("--cache-dir", default="~/.cache/trainer", help="where a BPE (--tokenizer=bpe) is cached")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when DIR holds the finished shards, 2 (one line) on bad input."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        source = open_prepare_source(args.source, args.text_field, args.extensions, args.cache_dir)
        tokenizer = load_tokenizer(args.tokenizer, source, args.bpe_vocab_size, args.cache_dir)
        prepare(
            source, tokenizer, Path(args.out).expanduser(), workers=args.workers, shard_tokens=args.shard_tokens,
            echo=lambda line: print(line, flush=True),
        )  # fmt: skip
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
