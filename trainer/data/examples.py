"""Instruction and chat examples: rendered once into a cache, then laid out in rows of seq_len tokens.

    <cache_dir>/<source>-<format>-<tokenizer>-<key>/ids.bin      uint16 / uint32 ids, examples back to back
                                                   /targets.bin  uint8: 1 where the token counts toward the loss
                                                   /offsets.bin  int64: example i is ids[offsets[i]:offsets[i+1]]
                                                   /counts.bin   int64: each example's target tokens
                                                   /meta.json    counts: records, examples, skipped, tokens, targets

The key hashes the source's identity, the tokenizer's fingerprint and the rendering settings (for
chat records, the family's chat quirks too), so a second run opens the arrays without rendering a
record. Files are written under temporary names and renamed; meta.json, written last, marks a
complete entry. Rows depend on train.seq_len and are computed when a split opens:

    packed (data.packing)   whole examples, in order, greedily filling each row; the rest is padding
    padded                  one example per row

Preference pairs (trainer/data/preference.py) share this cache through a Rendering of their own: two
examples a record, cut to seq_len as they are rendered (seq_len keys their entry).

An example longer than seq_len is truncated (and counted). A row's batch is x (its ids), y (y[t] is
the next token of the same example where that token is a target, else IGNORE_INDEX: no target
crosses an example boundary, padding has none) and, with data.document_mask, positions (each token's
index within its example; the padding run counts as one more example), which the model uses to keep
attention inside each example.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from trainer.config import ConfigError, DataConfig
from trainer.data.cache import Source, digest, token_dtype, write_json_atomic
from trainer.data.records import Example, MissingField, make_renderer
from trainer.data.sampler import Sampler
from trainer.data.sources import BadRecord, required_fields
from trainer.data.tokenizer import Tokenizer
from trainer.model.loss import IGNORE_INDEX

FORMAT_VERSION = 1  # bump when rendering or the layout of the files changes
FILES = ("ids.bin", "targets.bin", "offsets.bin", "counts.bin")
RENDER_SETTINGS = ("format", "prompt_field", "response_field", "messages_field", "chat_template", "train_on_prompt")


@dataclass
class ExampleCache:
    """An opened cache entry: every example's ids and targets (read-only memmaps) and offsets."""

    directory: Path
    ids: np.ndarray  # (tokens,)
    targets: np.ndarray  # (tokens,) uint8
    offsets: np.ndarray  # (examples + 1,) int64
    counts: np.ndarray  # (examples,) int64: each example's targets after its first token
    meta: dict[str, Any]
    hit: bool  # True when the entry already existed


@dataclass
class Rendering:
    """How a format's records become examples: instruct / chat through make_renderer (the default);
    preference pairs (trainer/data/preference.py) give two examples per record."""

    settings: dict[str, Any]  # everything the rendering depends on: keys the cache entry, written to meta
    fields: dict[str, str]  # the record fields read, by config key (for the no-usable-records error)
    # Called only when the entry is missing, with the build's tally (counters it may add to, written to
    # meta): a record -> one Example, or a list of them ([]: the record teaches nothing, counted as dropped).
    renderer: Callable[[dict[str, Any]], Callable[[Any], Example | list[Example]]]


def open_or_build_examples(
    source: Source,
    tokenizer: Tokenizer,
    cfg: DataConfig,
    cache_root: Path,
    *,
    show_progress: bool,
    rendering: Rendering | None = None,
) -> ExampleCache:
    """Open the cache entry for (source, tokenizer, rendering settings), rendering the records first if
    it is missing. Bad records fail (naming file and line) or, with data.on_bad_record=skip, are counted.
    rendering: how records become examples (default: data.format's instruct / chat renderer)."""
    if rendering is None:
        rendering = Rendering(
            settings={key: getattr(cfg, key) for key in RENDER_SETTINGS},
            fields=required_fields(cfg),
            renderer=lambda tally: make_renderer(cfg, tokenizer),  # a tokenizer without a needed template fails here
        )
    identity = {
        "format": FORMAT_VERSION,
        "source": source.identity(),
        "tokenizer": tokenizer.fingerprint(),
        "settings": rendering.settings | {"on_bad_record": cfg.on_bad_record},
    }
    quirks = getattr(tokenizer, "chat_quirks", None)
    if cfg.format == "chat" and quirks is not None:  # e.g. a family without a system role refuses records
        identity["chat_quirks"] = dataclasses.asdict(quirks)
    name = getattr(tokenizer, "name", "tok")
    directory = cache_root / f"{source.name}-{cfg.format}-{name}-{digest(identity)}"
    meta = _read_meta(directory)
    hit = meta is not None
    if meta is None:
        meta = _build(directory, source, tokenizer, cfg, rendering, show_progress)
    ids = np.memmap(directory / "ids.bin", dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
    targets = np.memmap(directory / "targets.bin", dtype=np.uint8, mode="r", shape=(meta["tokens"],))
    offsets = np.fromfile(directory / "offsets.bin", dtype=np.int64)
    counts = np.fromfile(directory / "counts.bin", dtype=np.int64)
    return ExampleCache(directory, ids, targets, offsets, counts, meta, hit)


def _read_meta(directory: Path) -> dict[str, Any] | None:
    """meta.json if the entry is complete (all files present, of the stated sizes)."""
    if not (directory / "meta.json").exists():
        return None
    meta = json.loads((directory / "meta.json").read_text())
    sizes = {
        "ids.bin": meta["tokens"] * np.dtype(meta["dtype"]).itemsize,
        "targets.bin": meta["tokens"],
        "offsets.bin": (meta["examples"] + 1) * 8,
        "counts.bin": meta["examples"] * 8,
    }
    complete = all((directory / f).exists() and (directory / f).stat().st_size == n for f, n in sizes.items())
    return meta if complete else None


def _build(
    directory: Path, source: Source, tokenizer: Tokenizer, cfg: DataConfig, rendering: Rendering, show_progress: bool
) -> dict[str, Any]:
    start, tally = time.perf_counter(), {"records": 0, "skipped": 0, "first_skipped": []}
    render = rendering.renderer(tally)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = {name: directory / f"{name}.tmp{os.getpid()}" for name in FILES}
    offsets, counts, learned, frequencies = [0], [], [], np.zeros(tokenizer.vocab_size, dtype=np.int64)
    try:
        with open(tmp["ids.bin"], "wb") as ids_file, open(tmp["targets.bin"], "wb") as targets_file:
            for example in rendered_records(source, render, cfg, tally, show_progress):
                example.ids.astype(dtype).tofile(ids_file)
                example.targets.astype(np.uint8).tofile(targets_file)
                offsets.append(offsets[-1] + len(example.ids))
                counts.append(int(example.targets[1:].sum()))  # the first token is never predicted
                learned.append(example.ids[1:][example.targets[1:]])
                if len(learned) >= 4096:
                    frequencies += np.bincount(np.concatenate(learned), minlength=tokenizer.vocab_size)
                    learned = []
        if len(offsets) == 1:
            dropped = f", {tally['dropped']} with nothing to learn" if tally.get("dropped") else ""
            raise ConfigError(
                f"{source.label} holds no usable {cfg.format} records ({tally['records']} read, {tally['skipped']} "
                f"skipped as bad{dropped}; fields read: {rendering.fields})"
            )
        np.asarray(offsets, dtype=np.int64).tofile(tmp["offsets.bin"])
        np.asarray(counts, dtype=np.int64).tofile(tmp["counts.bin"])
        for name, path in tmp.items():
            os.replace(path, directory / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    frequencies += np.bincount(np.concatenate([np.zeros(0, np.int64), *learned]), minlength=tokenizer.vocab_size)
    p = frequencies[frequencies > 0] / max(frequencies.sum(), 1)
    meta = {
        "format": FORMAT_VERSION,
        "source": source.describe(),
        "tokenizer": tokenizer.fingerprint(),
        "settings": rendering.settings,
        **tally,
        "examples": len(offsets) - 1,
        "tokens": offsets[-1],
        "target_tokens": sum(counts),
        "target_unigram_entropy": float(-(p * np.log(p)).sum()),
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(directory / "meta.json", meta)
    return meta


def rendered_records(
    source: Source, render: Callable[[Any], Any], cfg: DataConfig, tally: dict[str, Any], show_progress: bool
) -> Iterator[Any]:
    """What `render` makes of each of the source's records, in order (a list is yielded item by item;
    an empty one is counted in tally as dropped, with the first place); bad records (BadRecord) fail
    or (data.on_bad_record=skip) are counted in tally and left out."""
    rendered = 0
    with tqdm(unit="rec", desc=f"rendering {cfg.format} records", disable=None if show_progress else True) as bar:
        for record, where in source.records():
            bar.update(1)
            tally["records"] += 1
            try:
                made = render(record)
            except MissingField as missing:
                if rendered == 0:  # no record so far had the field: the setting is wrong, not the record
                    raise ConfigError(
                        f"data.{missing.key}={missing.name!r} is not a field of {where}: its fields are "
                        f"{missing.fields} (set data.{missing.key})"
                    ) from None
                error: BadRecord = missing
            except BadRecord as bad:
                error = bad
            else:
                rendered += 1
                if isinstance(made, list) and not made:
                    tally["dropped"] = tally.get("dropped", 0) + 1
                    tally.setdefault("first_dropped", where)
                yield from made if isinstance(made, list) else [made]
                continue
            if cfg.on_bad_record != "skip":
                raise ConfigError(
                    f"{where}: {error}: fix the record, or set data.on_bad_record=skip to skip such records"
                )
            tally["skipped"] += 1
            tally["first_skipped"] += [where] if len(tally["first_skipped"]) < 5 else []


def pack_rows(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Greedy in-order packing: the index of each row's first example, then len(lengths). Every
    length must be at most seq_len; a row closes when the next example does not fit."""
    firsts, used = [0], 0
    for i, length in enumerate(lengths.tolist()):
        if used + length > seq_len:
            firsts.append(i)
            used = 0
        used += length
    firsts.append(len(lengths))
    return np.asarray(firsts, dtype=np.int64)


def padding_id(tokenizer: Tokenizer) -> int:
    """The id that fills the end of a row: the tokenizer's pad if it has one other than eos, else 0
    (or 1 when eos is 0). Padded positions never carry a target, whatever their id."""
    pad = getattr(tokenizer, "pad_id", None)
    if pad is not None and pad != tokenizer.eot_id:
        return int(pad)
    return 0 if tokenizer.eot_id != 0 else 1


class ExampleSplit:
    """Examples [first, last) of a cache, as rows of seq_len tokens addressed by row index."""

    all_targets = False  # every target counts toward the loss? (prompt and padding targets are IGNORE_INDEX)

    def __init__(
        self,
        cache: ExampleCache,
        first: int,
        last: int,
        seq_len: int,
        *,
        packing: bool,
        document_mask: bool,
        pad_id: int,
    ):
        self.ids, self.targets = cache.ids, cache.targets
        self.seq_len, self.document_mask, self.pad_id, self.packing = seq_len, document_mask, pad_id, packing
        self.starts = cache.offsets[first:last]  # (examples,) where each example starts in ids
        self.ends = cache.offsets[first + 1 : last + 1]
        full = self.ends - self.starts
        self.lengths = np.minimum(full, seq_len)  # tokens of each example that reach a row
        self.num_examples = last - first
        self.num_tokens = int(full.sum())
        self.truncated = int((full > seq_len).sum())
        # Targets each example keeps: all, unless truncation cut some (counted again for those few).
        kept_targets = cache.counts[first:last].copy()
        for i in np.flatnonzero(full > seq_len).tolist():
            start = int(self.starts[i])
            kept_targets[i] = int(cache.targets[start + 1 : start + seq_len].sum())
        self.target_tokens = int(kept_targets.sum())
        self.without_targets = int((kept_targets == 0).sum())  # e.g. truncated before the response
        self.row_firsts = pack_rows(self.lengths, seq_len) if packing else np.arange(self.num_examples + 1)

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.row_firsts) - 1

    def sampler(self, seed: int) -> Sampler:
        """The order the loop draws this split's rows in: seeded epochs of shuffled indices."""
        return Sampler(len(self), seed)

    @property
    def padding(self) -> float:
        """Share of the rows' positions that are padding."""
        return 1 - float(self.lengths.sum()) / max(len(self) * self.seq_len, 1)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example i of this split as stored (before any truncation): ids and target flags."""
        start, end = int(self.starts[i]), int(self.ends[i])
        return np.asarray(self.ids[start:end], dtype=np.int64), np.asarray(self.targets[start:end], dtype=bool)

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Rows `indices` as (x, y, positions) with data.document_mask, else (x, y); int64 (B, T)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= len(self))):
            raise IndexError(f"row indices must be a 1-D array in [0, {len(self)})")
        shape = (len(indices), self.seq_len)
        x = np.full(shape, self.pad_id, dtype=np.int64)
        y = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(shape, dtype=np.int64)
        for b, row in enumerate(indices.tolist()):
            t = 0
            for e in range(int(self.row_firsts[row]), int(self.row_firsts[row + 1])):
                start, n = int(self.starts[e]), int(self.lengths[e])
                ids = np.asarray(self.ids[start : start + n], dtype=np.int64)
                x[b, t : t + n] = ids
                y[b, t : t + n - 1] = np.where(self.targets[start + 1 : start + n], ids[1:], IGNORE_INDEX)
                positions[b, t : t + n] = np.arange(n)
                t += n
            positions[b, t:] = np.arange(self.seq_len - t)  # the padding run: one more document
        batch = (torch.from_numpy(x), torch.from_numpy(y))
        return (*batch, torch.from_numpy(positions)) if self.document_mask else batch
