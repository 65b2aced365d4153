"""Where documents come from: the Python standard library, local files, or a Hugging Face dataset.

Each source has a cheap `identity()` (file names, sizes and mtimes; or the dataset's coordinates)
that keys the token cache, so a cache hit never reads the documents themselves. `documents()`
yields `(text, progress)` pairs: one document and how far the progress bar moves (bytes for
files, documents for datasets).
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, DataConfig

STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
JSON_SUFFIXES = (".json", ".jsonl")


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


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where} is not valid JSON ({error}): fix or remove it from data.path") from error


def _record_text(record: Any, field: str, where: str) -> str:
    """The text of one JSON record: the record itself if it is a string, else record[field]."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        raise ConfigError(f"{where} has no field data.text_field={field!r}: set data.text_field to one of {keys}")
    value = record[field]
    return value if isinstance(value, str) else ""


class FileSource:
    """Documents from files: .jsonl one per line, .json one per list item, anything else whole."""

    def __init__(self, name: str, label: str, root: Path, files: list[Path], text_field: str):
        self.name = name  # "stdlib" or "files": the first part of the cache directory's name
        self.label = label  # how error messages name the source, e.g. "data.path=/x"
        self.root = root
        self.files = files
        self.text_field = text_field

    def identity(self) -> dict[str, Any]:
        """Relative paths, sizes and mtimes: changes when any file does, costs one stat each."""
        stats = []
        for path in self.files:
            st = path.stat()
            stats.append([str(path.relative_to(self.root)), st.st_size, st.st_mtime_ns])
        identity = {"kind": self.name, "root": str(self.root), "files": stats}
        if any(p.suffix.lower() in JSON_SUFFIXES for p in self.files):
            identity["text_field"] = self.text_field
        return identity

    def describe(self) -> str:
        return f"{self.name} ({self.root}, {len(self.files)} files)"

    def progress(self) -> tuple[int | None, str]:
        """Total and unit for the progress bar."""
        return sum(p.stat().st_size for p in self.files), "B"

    def documents(self) -> Iterator[tuple[str, int]]:
        for path in self.files:
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from self._jsonl(path)
            elif suffix == ".json":
                records = _parse_json(read_text(path), str(path))
                if not isinstance(records, list):
                    raise ConfigError(
                        f"{path} is not a JSON list: data.source=files reads .json "
                        "as a list of strings or objects; use .jsonl for one per line"
                    )
                yield "", path.stat().st_size
                for i, record in enumerate(records):
                    yield _record_text(record, self.text_field, f"{path} item {i}"), 0
            else:
                yield read_text(path), path.stat().st_size

    def _jsonl(self, path: Path) -> Iterator[tuple[str, int]]:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, 1):
                advance = len(line.encode("utf-8"))
                if not line.strip():
                    yield "", advance
                    continue
                record = _parse_json(line, f"{path} line {line_number}")
                yield _record_text(record, self.text_field, f"{path} line {line_number}"), advance


class HFSource:
    """Documents from a Hugging Face dataset: a save_to_disk directory, a local data directory,
    or a hub name (loaded through `datasets.load_dataset`, which needs a network or its cache)."""

    name = "hf"

    def __init__(self, cfg: DataConfig, cache_root: Path):
        self.cfg = cfg
        self.label = f"data.path={cfg.path}"
        local = Path(cfg.path).expanduser()
        self.local = local if local.exists() else None
        self.cache_root = cache_root
        self._dataset = None

    def identity(self) -> dict[str, Any]:
        cfg = self.cfg
        identity = {
            "kind": "hf",
            "path": cfg.path,
            "config": cfg.hf_config,
            "split": cfg.hf_split,
            "field": cfg.text_field,
            "max_documents": cfg.max_documents,
        }
        if self.local is not None:  # a local dataset can change in place: key on its files too
            root = self.local if self.local.is_dir() else self.local.parent
            files = [self.local] if self.local.is_file() else list_files(root, None, frozenset())
            identity["files"] = [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return identity

    def describe(self) -> str:
        split = f"{self.cfg.hf_config or ''}:{self.cfg.hf_split}".lstrip(":")
        return f"hf ({self.cfg.path} {split}, field {self.cfg.text_field!r})"

    def dataset(self) -> Any:
        """The (lazily loaded) dataset, capped at data.max_documents, with only the text column."""
        if self._dataset is None:
            self._dataset = self._load()
        return self._dataset

    def _load(self) -> Any:
        import datasets  # imported here: it is slow to import and only this source needs it

        cfg = self.cfg
        try:
            if self.local is not None and _is_saved_dataset(self.local):
                dataset = datasets.load_from_disk(str(self.local))
                if isinstance(dataset, datasets.DatasetDict):
                    if cfg.hf_split not in dataset:
                        raise ConfigError(
                            f"data.hf_split={cfg.hf_split!r} is not in {self.label}: its splits are {sorted(dataset)}"
                        )
                    dataset = dataset[cfg.hf_split]
            else:
                path = str(self.local) if self.local is not None else cfg.path
                # Local data gets its Arrow cache inside ours; hub data keeps the shared HF cache.
                cache_dir = str(self.cache_root / "hf") if self.local is not None else None
                dataset = datasets.load_dataset(
                    path,
                    cfg.hf_config,
                    split=cfg.hf_split,
                    streaming=cfg.streaming,
                    cache_dir=cache_dir,
                )
        except ConfigError:
            raise
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ConfigError(
                f"{self.label} could not be loaded ({type(error).__name__}: {reason}): "
                "point data.path at a save_to_disk directory, a directory of "
                ".jsonl/.parquet/.csv files, or a dataset name"
            ) from error
        columns = dataset.column_names
        if columns is not None and cfg.text_field not in columns:
            raise ConfigError(
                f"data.text_field={cfg.text_field!r} is not a column of {self.label}: its columns are {columns}"
            )
        dataset = dataset.select_columns([cfg.text_field])
        if cfg.max_documents is not None:
            if isinstance(dataset, datasets.Dataset):
                dataset = dataset.select(range(min(cfg.max_documents, len(dataset))))
            else:
                dataset = dataset.take(cfg.max_documents)
        return dataset

    def progress(self) -> tuple[int | None, str]:
        dataset = self.dataset()
        total = len(dataset) if hasattr(dataset, "__len__") else self.cfg.max_documents
        return total, "doc"

    def documents(self) -> Iterator[tuple[str, int]]:
        field = self.cfg.text_field
        for batch in self.dataset().iter(batch_size=1000):
            for text in batch[field]:
                yield (text if isinstance(text, str) else ""), 1


def _is_saved_dataset(path: Path) -> bool:
    """Whether `path` was written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return path.is_dir() and any(
        (path / name).exists() for name in ("state.json", "dataset_info.json", "dataset_dict.json")
    )


def open_source(cfg: DataConfig, cache_root: Path) -> FileSource | HFSource:
    """The source named by data.source. Checks data.path and lists files; reads no contents."""
    if cfg.source == "stdlib":
        root = stdlib_root()
        return FileSource("stdlib", f"data.source=stdlib ({root})", root, stdlib_files(), cfg.text_field)
    path = Path(cfg.path).expanduser()
    looks_local = cfg.path.startswith(("/", ".", "~")) or cfg.source == "files"
    if not path.exists() and looks_local:
        raise ConfigError(f"data.path={cfg.path} does not exist: point it at a text file, a directory or a dataset")
    if cfg.source == "hf":
        return HFSource(cfg, cache_root)
    label = f"data.path={cfg.path}"
    if path.is_file():
        return FileSource("files", label, path.parent, [path], cfg.text_field)
    suffixes = {e.lower() if e.startswith(".") else "." + e.lower() for e in cfg.extensions}
    files = list_files(path, suffixes, frozenset({"__pycache__"}))
    if not files:
        raise ConfigError(
            f"{label} is empty: it holds no files ending in {sorted(suffixes)} "
            "(set data.extensions to the suffixes your files use)"
        )
    return FileSource("files", label, path, files, cfg.text_field)
