"""Pretokenized shards: the layout `python -m trainer.data.prepare` writes and `data=shards` reads.

    DIR/meta.json          written last: marks a finished prepare (tokenizer, dtype, shard size, per-shard
                           token and document counts and sha256, unigram entropy)
    DIR/shard-00000.bin    tokens: uint16 when the vocabulary has at most 65,536 ids, else uint32; every
                           shard holds exactly meta["shard_tokens"] tokens but the last
    DIR/shard-00000.idx    the document index: int64 offsets (within the shard) of the documents that start in it
    DIR/shard-00000.json   the shard's record (counts, sha256, where the next shard's first token comes
                           from), written after .bin and .idx: its presence marks the shard finished
    DIR/prepare.json       what is being prepared (source, tokenizer, shard size): a resumed prepare must match
    DIR/unigram.npy        int64 count of each token id over the whole stream
    DIR/tokenizer.json     (a BPE) or DIR/tokenizer/ (a Hugging Face tokenizer): the tokenizer, so a run can load it

The token stream is the source's non-empty documents in order, each followed by the tokenizer's
eot id, cut into shards of shard_tokens tokens (a document may run across a shard boundary, as
documents run across windows). A run reads the shards through memmaps: only the pages of the
windows it asks for, never a whole shard. Opening checks each shard's size against meta.json;
the sha256 sums are checked by prepare (a resumed or repeated prepare re-verifies every shard).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import ConfigError, DataConfig
from trainer.data.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    load_bpe,
    load_pretrained_tokenizer,
)

FORMAT_VERSION = 1  # bump when the layout above changes
PREPARE_COMMAND = "python -m trainer.data.prepare SOURCE --out DIR --tokenizer ..."


def shard_name(k: int) -> str:
    """The stem of shard k's files: shard-00000."""
    return f"shard-{k:05d}"


def tokenizer_record(tokenizer: Tokenizer) -> dict[str, Any]:
    """What meta.json says of a tokenizer: its name, fingerprint, size, eot id, and where its files are."""
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    files = {"byte": None, "bpe": "tokenizer.json"}.get(name, "tokenizer")
    return {
        "name": name,
        "fingerprint": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "files": files,
    }


def save_tokenizer_files(tokenizer: Tokenizer, directory: Path) -> None:
    """The tokenizer's own files into a shard directory (none for bytes), as tokenizer_record names them."""
    files = tokenizer_record(tokenizer)["files"]
    if files == "tokenizer.json":
        tokenizer.backend.save(str(directory / files))
    elif files is not None:
        tokenizer.save(directory / files)


@dataclass
class ShardSet:
    """One finished shard directory, read through memmaps opened on first use."""

    directory: Path
    meta: dict[str, Any]
    label: str  # how errors name it: "data.path=/x" or "data.mixture web (/x)"
    bounds: np.ndarray = field(init=False)  # (shards + 1,) stream position of each shard's first token
    _maps: dict[int, np.ndarray] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        counts = [s["tokens"] for s in self.meta["shards"]]
        self.bounds = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    @property
    def num_tokens(self) -> int:
        return int(self.bounds[-1])

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    def describe(self) -> str:
        meta = self.meta
        return f"{self.directory} ({len(meta['shards'])} shards, {meta['tokens']:,} tokens, {meta['source']})"

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            record = self.meta["shards"][k]
            path = self.directory / f"{shard_name(k)}.bin"
            self._maps[k] = np.memmap(path, dtype=self.meta["dtype"], mode="r", shape=(record["tokens"],))
        return self._maps[k]

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream for each of `starts`: (len(starts), length) int64.
        Only those tokens are read (a window across a shard boundary reads from both shards)."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(np.asarray(starts, dtype=np.int64)):
            if start < 0 or start + length > self.num_tokens:
                raise IndexError(f"tokens [{start}, {start + length}) are outside {self.label}'s {self.num_tokens}")
            done = 0
            while done < length:
                position = int(start) + done
                k = int(np.searchsorted(self.bounds, position, side="right")) - 1
                offset = position - int(self.bounds[k])
                piece = self._shard(k)[offset : offset + length - done]
                out[row, done : done + len(piece)] = piece
                done += len(piece)
        return out


def open_shards(path: str, label: str) -> ShardSet:
    """The finished shard directory at `path`, its shard files' sizes checked; one ConfigError line
    naming `label` and the fix when it is missing, unfinished or damaged. Reads no tokens."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"{label}: {path} is not a directory: make it with {PREPARE_COMMAND.replace('DIR', path)}")
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(
            f"{label}: {path} holds no readable meta.json, so its prepare did not finish: run the same "
            f"{PREPARE_COMMAND.split(' SOURCE')[0]} command again (it resumes)"
        ) from None
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{label}: {path} is shard format {meta.get('format')}, this trainer reads {FORMAT_VERSION}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for k, record in enumerate(meta["shards"]):
        shard = directory / f"{shard_name(k)}.bin"
        size = shard.stat().st_size if shard.is_file() else None
        if size != record["tokens"] * itemsize:
            found = "missing" if size is None else f"{size:,} bytes"
            raise ConfigError(
                f"{label}: {shard} is {found}, meta.json says {record['tokens'] * itemsize:,} bytes: run its "
                f"prepare again (it re-verifies every shard and rewrites the damaged ones)"
            )
    return ShardSet(directory, meta, label)


def mixture_sources(cfg: DataConfig) -> list[tuple[str, str, float]]:
    """(name, path, weight) of each source data=shards reads: data.mixture's entries, or data.path
    alone (named by its directory, weight 1)."""
    if cfg.mixture:
        return [(str(e["name"]), str(e["path"]), float(e["weight"])) for e in cfg.mixture]
    if not cfg.path:
        raise ConfigError(
            "data=shards needs data.path=DIR (a directory python -m trainer.data.prepare wrote) or "
            "data.mixture=[{name: a, path: DIR, weight: 1.0}, ...]"
        )
    return [(Path(cfg.path).expanduser().resolve().name or "shards", cfg.path, 1.0)]


def open_sources(cfg: DataConfig) -> list[ShardSet]:
    """Every source's shard directory, opened and checked (one line on the first bad one), all made
    with one tokenizer."""
    sets = []
    for name, path, _ in mixture_sources(cfg):
        label = f"data.mixture source {name!r}" if cfg.mixture else "data.path"
        sets.append(open_shards(path, label))
    first = sets[0]
    for other in sets[1:]:
        if other.fingerprint != first.fingerprint:
            raise ConfigError(
                f"data.mixture: {first.label} was prepared with the {first.meta['tokenizer']['name']} tokenizer "
                f"({first.fingerprint}) and {other.label} with {other.meta['tokenizer']['name']} ({other.fingerprint}): "
                "prepare every source with one --tokenizer"
            )
    return sets


def load_shard_tokenizer(shards: ShardSet) -> Tokenizer:
    """The tokenizer a shard directory was prepared with, from the files it keeps."""
    record = shards.meta["tokenizer"]
    if record["files"] is None:
        return ByteTokenizer()
    path = shards.directory / record["files"]
    if record["files"] == "tokenizer.json":
        return load_bpe(path)
    return load_pretrained_tokenizer(str(path), shards.label)


def run_tokenizer(cfg: DataConfig, shards: ShardSet, pretrained: str | None) -> Tokenizer:
    """The run's tokenizer: the shards' own (data.tokenizer null or bpe), unless data.tokenizer=byte|DIR
    or model.pretrained names another, which must be the one the shards were made with: a tokenizer
    whose fingerprint differs is refused in one line."""
    setting = cfg.tokenizer
    if setting == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    elif setting not in (None, "bpe"):
        tokenizer = load_pretrained_tokenizer(setting, "data.tokenizer")
    elif pretrained:
        tokenizer = load_pretrained_tokenizer(pretrained, "model.pretrained")
    elif setting is None or shards.meta["tokenizer"]["name"] == "bpe":
        return load_shard_tokenizer(shards)
    else:  # data.tokenizer=bpe over shards made with another tokenizer
        tokenizer = None
    record = shards.meta["tokenizer"]
    if tokenizer is None or tokenizer.fingerprint() != record["fingerprint"]:
        named = f"data.tokenizer={setting}" if setting else f"model.pretrained={pretrained}"
        theirs = f"{getattr(tokenizer, 'name', '?')} ({tokenizer.fingerprint()})" if tokenizer is not None else "a BPE"
        raise ConfigError(
            f"{shards.label}: its shards were made with the {record['name']} tokenizer ({record['fingerprint']}), "
            f"this run's is {theirs} from {named}: prepare the shards again with the run's tokenizer, or drop "
            "data.tokenizer to use the shards' own"
        )
    return tokenizer
