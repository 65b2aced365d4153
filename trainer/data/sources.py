"""Where documents and records come from: the Python standard library, local files, or a Hugging
Face dataset.

data.path may be a file (.jsonl, .json, .parquet, .csv, or any text file), a glob
(`/data/part-*.jsonl`), a directory, a `Dataset.save_to_disk` folder, or (data.source=hf) a
dataset name. Each source has a cheap `identity()` (file names, sizes and mtimes; or the dataset's
coordinates) that keys the caches, so a cache hit never reads the data themselves.
`documents()` yields `(text, progress)` pairs for the text format: one document and how far the
progress bar moves (bytes for files, documents for datasets). `records()` yields `(record, where)`
pairs for instruct / chat: one record and where it is, for error messages ("a.jsonl line 7",
"b.parquet row 3"); a line that is not JSON comes as a `BadRecord` in the record's place.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, DataConfig

STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
JSON_SUFFIXES = (".json", ".jsonl")
TABLE_SUFFIXES = (".parquet", ".csv")  # read with pyarrow, by row
RECORD_SUFFIXES = JSON_SUFFIXES + TABLE_SUFFIXES
DATASETS_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
WHITESPACE = re.compile(r"\s*")


class BadRecord(Exception):
    """A record that cannot become an example; its message says why (data.on_bad_record decides)."""


def read_text(path: Path) -> str:
    """One file as text. Undecodable bytes become U+FFFD (a few stdlib files are not UTF-8)."""
    return path.read_bytes().decode("utf-8", errors="replace")


def list_files(root: Path, suffixes: set[str] | None, skip_dirs: frozenset[str]) -> list[Path]:
    """Files under `root` with a suffix in `suffixes` (None: any), sorted; hidden and skipped
    directories are pruned."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if suffixes is None or Path(f).suffix.lower() in suffixes]
    return sorted(found)


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's own .py files, without its tests and installed packages."""
    return list_files(stdlib_root(), {".py"}, STDLIB_SKIP_DIRS)


def file_stats(files: list[Path], root: Path) -> list[list]:
    """[relative path, size, mtime] of each file: changes when any file does, costs one stat each."""
    return [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def required_fields(cfg: DataConfig) -> dict[str, str]:
    """The record fields data.format reads, by config key."""
    if cfg.format == "instruct":
        return {"prompt_field": cfg.prompt_field, "response_field": cfg.response_field}
    if cfg.format == "chat":
        return {"messages_field": cfg.messages_field}
    if cfg.format == "preference":  # the prompt too for string records (message-list pairs hold theirs)
        return {"chosen_field": cfg.chosen_field, "rejected_field": cfg.rejected_field}
    if cfg.format == "prompts":  # a prompt or messages field, checked per record; every field is kept
        return {}
    return {"text_field": cfg.text_field}


def kept_columns(cfg: DataConfig, columns: list[str]) -> list[str]:
    """The columns a dataset keeps for data.format: the fields it reads (prompts: all, for the rewards)."""
    if cfg.format == "prompts":
        return list(columns)
    keep = list(required_fields(cfg).values())
    if cfg.format == "preference" and cfg.prompt_field in columns:
        keep.append(cfg.prompt_field)
    return keep


def _json_list(text: str, path: Path) -> Iterator[tuple[Any, int]]:
    """The items of a JSON list, each with the line it starts on."""
    decoder, line, counted = json.JSONDecoder(), 1, 0
    pos = WHITESPACE.match(text).end()
    if not text.startswith("[", pos):
        raise ConfigError(
            f"{path} is not a JSON list: a .json file holds a list of strings or objects; use .jsonl for one per line"
        )
    pos = WHITESPACE.match(text, pos + 1).end()
    while not text.startswith("]", pos):
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} line {error.lineno} is not valid JSON ({error.msg}): fix the file") from error
        yield item, line
        pos = WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = WHITESPACE.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            where = line + text.count("\n", counted, pos)
            raise ConfigError(f"{path} line {where} is not valid JSON (expected ',' or ']'): fix the file")


def _table_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a .parquet or .csv file as dicts (pyarrow, which datasets is built on)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1000):
            yield from batch.to_pylist()
    else:
        import pyarrow.csv

        yield from pyarrow.csv.read_csv(path).to_pylist()


def _file_records(path: Path) -> Iterator[tuple[Any, str, int]]:
    """(record, where, progress in bytes) for each record of a .jsonl / .json / .parquet / .csv file.
    A .jsonl line that is not JSON comes as a BadRecord."""
    suffix, size = path.suffix.lower(), path.stat().st_size
    if suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, 1):
                advance = len(line.encode("utf-8"))
                if not line.strip():
                    yield None, "", advance  # blank lines are skipped, not records
                    continue
                try:
                    record: Any = json.loads(line)
                except json.JSONDecodeError as error:
                    record = BadRecord(f"not valid JSON ({error})")
                yield record, f"{path} line {line_number}", advance
    elif suffix == ".json":
        yield None, "", size
        for item, line in _json_list(read_text(path), path):
            yield item, f"{path} line {line}", 0
    else:
        yield None, "", size
        for i, row in enumerate(_table_rows(path)):
            yield row, f"{path} row {i}", 0


def _record_text(record: Any, field: str, where: str) -> str:
    """The text of one JSON record: the record itself if it is a string, else record[field]."""
    if isinstance(record, BadRecord):
        raise ConfigError(f"{where} is {record}: fix or remove it from data.path")
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        raise ConfigError(f"{where} has no field data.text_field={field!r}: set data.text_field to one of {keys}")
    value = record[field]
    return value if isinstance(value, str) else ""


class FileSource:
    """Text or records from files: .jsonl one per line, .json one per list item, .parquet / .csv one
    per row; any other file is one text document."""

    def __init__(self, name: str, label: str, root: Path, files: list[Path], text_field: str):
        self.name = name  # "stdlib" or "files": the first part of the cache directory's name
        self.label = label  # how error messages name the source, e.g. "data.path=/x"
        self.root = root
        self.files = files
        self.text_field = text_field

    def identity(self) -> dict[str, Any]:
        """Relative paths, sizes and mtimes of the files (and the text field, if records hold it)."""
        identity = {"kind": self.name, "root": str(self.root), "files": file_stats(self.files, self.root)}
        if any(p.suffix.lower() in RECORD_SUFFIXES for p in self.files):
            identity["text_field"] = self.text_field
        return identity

    def describe(self) -> str:
        return f"{self.name} ({self.root}, {len(self.files)} files)"

    def progress(self) -> tuple[int | None, str]:
        """Total and unit for the progress bar."""
        return sum(p.stat().st_size for p in self.files), "B"

    def documents(self) -> Iterator[tuple[str, int]]:
        for path in self.files:
            if path.suffix.lower() not in RECORD_SUFFIXES:
                yield read_text(path), path.stat().st_size
                continue
            for record, where, advance in _file_records(path):
                yield ("" if record is None else _record_text(record, self.text_field, where)), advance

    def records(self) -> Iterator[tuple[Any, str]]:
        for path in self.files:
            if path.suffix.lower() not in RECORD_SUFFIXES:
                raise ConfigError(
                    f"{path} is not a record file: instruct and chat data are .jsonl, .json, .parquet or .csv "
                    "(set data.extensions, or point data.path at those files)"
                )
            count = 0
            for record, where, _ in _file_records(path):
                if record is not None:
                    count += 1
                    yield record, where
            if count == 0:
                raise ConfigError(f"{path} is empty: it holds no records (remove it from data.path)")


class HFSource:
    """Documents or records from a Hugging Face dataset: a save_to_disk directory, local data files
    (a file, a glob or a directory), or a hub name (loaded through `datasets.load_dataset`, which
    needs a network or its cache)."""

    name = "hf"

    def __init__(self, cfg: DataConfig, cache_root: Path, files: list[Path] | None = None):
        self.cfg = cfg
        self.label = f"data.path={cfg.path}"
        local = Path(cfg.path).expanduser()
        self.local = local if local.exists() else None
        self.files = files  # data files named by a file or a glob (loaded with data_files=)
        self.cache_root = cache_root
        self._dataset = None

    def identity(self) -> dict[str, Any]:
        cfg = self.cfg
        identity = {
            "kind": "hf",
            "path": cfg.path,
            "config": cfg.hf_config,
            "split": cfg.hf_split,
            "fields": required_fields(cfg),
            "max_documents": cfg.max_documents,
        }
        if self.files is not None:  # local data can change in place: key on its files too
            identity["files"] = file_stats(self.files, _common_root(self.files))
        elif self.local is not None:
            identity["files"] = file_stats(list_files(self.local, None, frozenset()), self.local)
        return identity

    def describe(self) -> str:
        split = f"{self.cfg.hf_config or ''}:{self.cfg.hf_split}".lstrip(":")
        fields = ", ".join(repr(f) for f in required_fields(self.cfg).values())
        return f"hf ({self.cfg.path} {split}, field {fields})"

    def dataset(self) -> Any:
        """The (lazily loaded) dataset, capped at data.max_documents, with only the fields it needs."""
        if self._dataset is None:
            self._dataset = self._load()
        return self._dataset

    def _load(self) -> Any:
        import datasets  # imported here: it is slow to import and only this source needs it

        cfg = self.cfg
        try:
            dataset = self._open(datasets)
        except ConfigError:
            raise
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ConfigError(
                f"{self.label} could not be loaded ({type(error).__name__}: {reason}): "
                "point data.path at a save_to_disk directory, .jsonl/.parquet/.csv files (a file, a glob "
                "or a directory), or a dataset name"
            ) from error
        columns = dataset.column_names
        for key, name in required_fields(cfg).items():
            if columns is not None and name not in columns:
                raise ConfigError(
                    f"data.{key}={name!r} is not a column of {self.label}: its columns are {columns} (set data.{key})"
                )
        if columns is not None:
            dataset = dataset.select_columns(kept_columns(cfg, columns))
        elif cfg.format not in ("preference", "prompts"):  # columns unknown ahead (a stream): the fields read
            dataset = dataset.select_columns(list(required_fields(cfg).values()))
        if cfg.max_documents is not None:
            if isinstance(dataset, datasets.Dataset):
                dataset = dataset.select(range(min(cfg.max_documents, len(dataset))))
            else:
                dataset = dataset.take(cfg.max_documents)
        return dataset

    def _open(self, datasets: Any) -> Any:
        cfg = self.cfg
        if self.local is not None and _is_saved_dataset(self.local):
            dataset = datasets.load_from_disk(str(self.local))
            if isinstance(dataset, datasets.DatasetDict):
                if cfg.hf_split not in dataset:
                    raise ConfigError(
                        f"data.hf_split={cfg.hf_split!r} is not in {self.label}: its splits are {sorted(dataset)}"
                    )
                dataset = dataset[cfg.hf_split]
            return dataset
        # Local data gets its Arrow cache inside ours; hub data keeps the shared HF cache.
        cache_dir = str(self.cache_root / "hf") if self.local is not None or self.files else None
        if self.files is not None:  # a file or a glob: datasets wants the builder and data_files
            builders = {DATASETS_BUILDERS.get(p.suffix.lower()) for p in self.files}
            if len(builders) != 1 or None in builders:
                raise ConfigError(
                    f"{self.label} names files of {len(builders)} kinds: data.source=hf reads one kind at a time "
                    f"({', '.join(DATASETS_BUILDERS)})"
                )
            files = [str(p) for p in self.files]
            return datasets.load_dataset(
                builders.pop(), data_files=files, split="train", streaming=cfg.streaming, cache_dir=cache_dir
            )
        path = str(self.local) if self.local is not None else cfg.path
        return datasets.load_dataset(
            path, cfg.hf_config, split=cfg.hf_split, streaming=cfg.streaming, cache_dir=cache_dir
        )

    def progress(self) -> tuple[int | None, str]:
        dataset = self.dataset()
        total = len(dataset) if hasattr(dataset, "__len__") else self.cfg.max_documents
        return total, "doc"

    def documents(self) -> Iterator[tuple[str, int]]:
        field = self.cfg.text_field
        for batch in self.dataset().iter(batch_size=1000):
            for text in batch[field]:
                yield (text if isinstance(text, str) else ""), 1

    def records(self) -> Iterator[tuple[Any, str]]:
        count = 0
        for batch in self.dataset().iter(batch_size=1000):
            for values in zip(*batch.values(), strict=True):
                yield dict(zip(batch, values, strict=True)), f"{self.label} row {count}"
                count += 1
        if count == 0:
            raise ConfigError(f"{self.label} is empty: it holds no records")


def _is_saved_dataset(path: Path) -> bool:
    """Whether `path` was written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return path.is_dir() and any(
        (path / name).exists() for name in ("state.json", "dataset_info.json", "dataset_dict.json")
    )


def _common_root(files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in files]))


def local_paths(pattern: str) -> list[Path] | None:
    """The files a glob in data.path matches (sorted), or None when data.path is not a glob."""
    if not glob.has_magic(pattern):
        return None
    return sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())


def open_source(cfg: DataConfig, cache_root: Path) -> FileSource | HFSource:
    """The source data.source and data.path name. Checks data.path and lists files; reads no contents."""
    if cfg.source == "stdlib":
        root = stdlib_root()
        return FileSource("stdlib", f"data.source=stdlib ({root})", root, stdlib_files(), cfg.text_field)
    label = f"data.path={cfg.path}"
    matched = local_paths(cfg.path)
    if matched == []:
        raise ConfigError(f"{label} matches no file: check the pattern")
    if matched is not None:
        if cfg.source == "hf":
            return HFSource(cfg, cache_root, matched)
        return FileSource("files", label, _common_root(matched), matched, cfg.text_field)
    path = Path(cfg.path).expanduser()
    looks_local = cfg.path.startswith(("/", ".", "~")) or cfg.source == "files"
    if not path.exists() and looks_local:
        raise ConfigError(f"{label} does not exist: point it at a file, a glob, a directory or a dataset")
    if cfg.source == "hf" or _is_saved_dataset(path):
        return HFSource(cfg, cache_root, [path] if path.is_file() else None)
    if path.is_file():
        return FileSource("files", label, path.parent, [path], cfg.text_field)
    suffixes = {e.lower() if e.startswith(".") else "." + e.lower() for e in cfg.extensions}
    if cfg.format != "text":  # records: only the record files among them
        suffixes &= set(RECORD_SUFFIXES)
    files = list_files(path, suffixes, frozenset({"__pycache__"}))
    if not files:
        raise ConfigError(
            f"{label} is empty: it holds no files ending in {sorted(suffixes)} "
            "(set data.extensions to the suffixes your files use)"
        )
    return FileSource("files", label, path, files, cfg.text_field)
