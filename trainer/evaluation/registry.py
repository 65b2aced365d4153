"""Which lm_eval tasks a run or `python -m trainer.evaluate` can run, checked before any model loads: the
TaskManager over lm_eval's registry, the shipped tiny tasks and include paths (`task_manager`), unknown
names with their close matches (`check_tasks`), tasks whose local data is missing (`check_task_data`)
and generation that could never stop (`check_generation`). A leaf: it imports nothing of the trainer's,
so the training preflight (trainer/evaluation/inloop.py) and the command (trainer/evaluate.py) share it."""

from __future__ import annotations

import dataclasses
import difflib
import glob
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"
# dataset_path values that datasets.load_dataset builds from local files (data_files / data_dir)
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "xml", "webdataset", "imagefolder",
                  "audiofolder", "videofolder")  # fmt: skip


class EvaluateError(RuntimeError):
    """A one-line reason the evaluation cannot run."""


def task_manager(include: list[str], tasks: list[str] | None = None) -> Any:
    """lm_eval's TaskManager over its registry, the shipped tasks and the --include-path DIRs; given
    `tasks` that the shipped tasks and the DIRs hold all of, over those alone (indexing lm_eval's
    whole registry, ~15k tasks, takes seconds)."""
    from lm_eval.tasks import TaskManager

    paths = [str(SHIPPED_TASKS), *include] if SHIPPED_TASKS.is_dir() else list(include)
    for path in include:
        if not Path(path).is_dir():
            raise EvaluateError(f"--include-path {path} is not a directory of task YAMLs")
    if tasks:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=paths)


def check_tasks(manager: Any, tasks: list[str]) -> None:
    """Every task is known to the manager; an unknown one is named with its close matches."""
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise EvaluateError(
                f"unknown task {task!r}{hint}: name a task of lm_eval's registry or of trainer/evaluation/tasks, "
                "or add its YAML's directory with --include-path DIR"
            )


def task_configs(manager: Any, name: str, overrides: dict | None = None) -> Iterator[tuple[str, dict, Path | None]]:
    """(task name, its config, the YAML it came from) of every task `name` runs: a task itself, a tag's
    tasks, a group's members (nested groups and inline tasks too), with the group's task settings over
    each member's as lm_eval's TaskFactory merges them. Configs as lm_eval's index read them: includes
    resolved, `!function` values left as the string "YAML_DIR/module.function"."""
    from lm_eval.config.group import GroupConfig

    entry = manager.task_index[name]  # an lm_eval.tasks._index.Entry: kind, yaml_path, cfg, tags
    if entry.kind.name == "TAG":
        for task in sorted(entry.tags):
            yield from task_configs(manager, task, overrides)
        return
    if entry.kind.name != "GROUP":  # TASK, or PY_TASK (a class named in YAML)
        yield name, {**(entry.cfg or {}), **(overrides or {})}, entry.yaml_path
        return
    group_fields = {f.name for f in dataclasses.fields(GroupConfig)}
    defaults = {k: v for k, v in (entry.cfg or {}).items() if k not in group_fields}
    for item in (entry.cfg or {}).get("task") or []:
        child = item if isinstance(item, str) else item.get("group", item.get("task"))
        extra = {} if isinstance(item, str) else {k: v for k, v in item.items() if k != "group"}
        merged = {**defaults, **(overrides or {}), **extra}
        if child in manager.task_index:
            yield from task_configs(manager, child, merged)
        elif isinstance(item, dict) and "task" in item:  # an inline task, defined in the group's YAML
            yield f"{name}::{child}", merged, entry.yaml_path


def check_task_data(manager: Any, tasks: list[str]) -> None:
    """Every local data file of every task (groups and tags expanded) exists, before any model loads.

    Checked: `custom_dataset: !function utils.load_local_json` (the shipped loader: data_files relative
    to its utils.py, which must exist too) and a local `datasets` builder (dataset_path json, csv,
    parquet, ...: data_files and data_dir, relative paths from the current directory, as
    datasets.load_dataset reads them; globs must match a file). Not checked: hub datasets (they
    download), other custom_dataset functions (their paths mean what their code says)."""
    for name in tasks:
        for task, cfg, yaml_path in task_configs(manager, name):
            problem = _missing_data(cfg)
            if problem is not None:
                missing, where, fix = problem
                raise EvaluateError(
                    f"task {task} ({yaml_path or 'inline config'}): {where} {missing} does not exist: {fix}"
                )


def _missing_data(cfg: dict) -> tuple[Path, str, str] | None:
    """(the first missing path, which setting names it, how to fix it), or None when all exist."""
    kwargs = cfg.get("dataset_kwargs") or {}
    custom = cfg.get("custom_dataset")
    if isinstance(custom, str):  # "DIR/module.function", unresolved
        module = Path(custom).parent / (Path(custom).name.rsplit(".", 1)[0] + ".py")
        if not module.is_file():
            return module, "custom_dataset's module", f"put {module.name} next to the task YAML"
        if not custom.endswith(".load_local_json"):
            return None
        base = module.parent
        relative_fix = f"put it next to {module.name} (load_local_json reads data_files from there)"
    elif cfg.get("dataset_path") in LOCAL_BUILDERS:
        data_dir = kwargs.get("data_dir")
        base = Path(data_dir).expanduser().resolve() if data_dir else Path.cwd()
        if data_dir and not base.is_dir():
            return base, "dataset_kwargs.data_dir", "create it, or fix the path in the task YAML"
        relative_fix = (
            f"datasets reads a relative path from {'data_dir' if data_dir else 'the current directory'}, not the "
            "YAML's folder: give an absolute path, or load it with custom_dataset: !function "
            "utils.load_local_json (trainer/evaluation/tasks/README.md)"
        )
    else:
        return None  # a hub dataset (it downloads), or a custom loader of another kind
    for split, pattern in _data_files(kwargs.get("data_files")):
        if "://" in pattern:
            continue  # a URL: downloaded
        path = Path(pattern).expanduser()
        resolved = path if path.is_absolute() else base / path
        if not (glob.glob(str(resolved)) if glob.has_magic(str(resolved)) else resolved.exists()):
            where = "dataset_kwargs.data_files" + (f".{split}" if split else "")
            fix = "fix the path in the task YAML" if path.is_absolute() else relative_fix
            return resolved, where, fix
    return None


def _data_files(files: Any) -> list[tuple[str | None, str]]:
    """(split or None, path or glob) of data_files given as a str, a list, or a dict of split -> str / list."""
    if isinstance(files, dict):
        return [(split, p) for split, value in files.items() for _, p in _data_files(value)]
    if isinstance(files, str):
        return [(None, files)]
    return [(None, str(p)) for p in files or []]


def stop_sequences(cfg: dict) -> list[str]:
    """The non-empty stop sequences lm_eval 0.4.13 gives a generate_until task before the eos text:
    generation_kwargs.until when the key is there (a str or a list), else the fewshot_delimiter
    (lm_eval's TaskConfig default, "\n\n")."""
    kwargs = cfg.get("generation_kwargs") or {}
    until = kwargs["until"] if "until" in kwargs else [cfg.get("fewshot_delimiter", "\n\n")]
    until = [until] if isinstance(until, str) else until or []
    return [s for s in until if s]


def check_generation(manager: Any, tasks: list[str], tokenizer: Any) -> None:
    """A generate_until task can stop before max_gen_toks: it has a stop sequence or the tokenizer has an
    eos token (lm_eval adds the eos text as a stop sequence). Without eos, lm_eval 0.4.13's
    HFLM.generate_until also fails on decoding the missing eos id, so any generate_until task is refused
    with such a tokenizer, before the model loads."""
    if getattr(tokenizer, "eos_token_id", None) is not None:
        return
    for name in tasks:
        for task, cfg, _ in task_configs(manager, name):
            if cfg.get("output_type") != "generate_until":
                continue
            if not stop_sequences(cfg):
                raise EvaluateError(
                    f"task {task} generates, and the tokenizer has no end-of-sequence token: give the task a stop "
                    "sequence (generation_kwargs.until) and the tokenizer an eos_token (tokenizer_config.json), "
                    "or generation never stops early"
                )
            raise EvaluateError(
                f"task {task} generates, and the tokenizer has no end-of-sequence token: lm_eval's generate_until "
                "decodes eos_token_id as a stop sequence and fails on None: set eos_token in the tokenizer's "
                "tokenizer_config.json"
            )
