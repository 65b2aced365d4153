"""Downstream scores of a run, a checkpoint or a Hugging Face directory, through lm-evaluation-harness.

    python -m trainer.evaluate SOURCE --tasks NAME[,NAME...] [--include-path DIR] [--limit N]
                               [--num-fewshot K] [--batch-size B] [--out FILE] [--device cpu]
                               [--apply-chat-template [NAME]] [--fewshot-as-multiturn [true|false]]
    python -m trainer.evaluate RUN --all-checkpoints --tasks ...   # every kept checkpoint: task x step

SOURCE is a run directory (its latest verified checkpoint), one checkpoint of any strategy (a LoRA
run's adapters over their base: no export needed) or a Hugging Face directory (config.json +
safetensors + tokenizer); a byte-level run's tokenizer is ByteTokenizer.hf(). Tasks come from
lm_eval's registry, the tasks this repository ships (trainer/evaluation/tasks: tiny local ones)
and --include-path DIRs of task YAMLs with local data.
The model is the harness's own GPT behind lm_eval's request machinery (trainer/evaluation/lm.py);
prints lm_eval's table and writes its results JSON (results[task]["acc,none"], ...).
--apply-chat-template and --fewshot-as-multiturn are lm_eval's own (prompts through the tokenizer's
chat template; few-shot examples as turns, on by default with a template). Needs the optional
extra: pip install -e ".[eval]". Errors: one line, exit code 2, before the model loads: unknown
tasks, local task data that is missing (check_task_data), generation that could not stop
(check_generation), sources that are not there.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SHIPPED_TASKS = Path(__file__).resolve().parent / "evaluation" / "tasks"
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


def open_source(source: Path) -> tuple[Path, Any]:
    """(the verified checkpoint SOURCE names, or SOURCE itself when it is a Hugging Face directory; its
    transformers tokenizer): all that the checks need, no weights read."""
    from trainer.export import ExportError, find_checkpoint
    from trainer.generate import load_tokenizer

    if not source.exists():
        raise EvaluateError(f"{source} does not exist: give a run directory, a checkpoint or a Hugging Face directory")
    if _is_hugging_face(source):
        from transformers import AutoTokenizer

        try:
            return source, AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        except (OSError, ValueError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise EvaluateError(
                f"{source}: transformers.AutoTokenizer could not load its tokenizer ({reason})"
            ) from error
    try:
        checkpoint = find_checkpoint(source)
    except (ExportError, OSError) as error:
        raise EvaluateError(f"{source} is not a run, a checkpoint or a Hugging Face directory: {error}") from error
    try:
        return checkpoint, load_tokenizer(checkpoint)
    except (ExportError, OSError) as error:  # the message names the checkpoint
        raise EvaluateError(str(error)) from error


def load_weights(where: Path, tokenizer: Any) -> torch.nn.Module:
    """The harness's GPT holding the weights of `where` (from open_source), fp32 on the CPU."""
    from trainer.export import ExportError, load_model

    if _is_hugging_face(where):
        return _hugging_face(where, len(tokenizer))
    try:
        return load_model(where)[0]
    except (ExportError, OSError) as error:
        raise EvaluateError(f"{where}: {error}") from error


def load_source(source: Path) -> tuple[torch.nn.Module, Any, str]:
    """(the harness's GPT holding SOURCE's weights, fp32 on the CPU; its Hugging Face tokenizer; a name)."""
    where, tokenizer = open_source(source)
    return load_weights(where, tokenizer), tokenizer, str(where)


def _is_hugging_face(source: Path) -> bool:
    return (source / "config.json").is_file() and not (source / "meta.json").exists()


def _hugging_face(directory: Path, vocab_size: int) -> torch.nn.Module:
    from trainer.config.load import compose_config
    from trainer.model.build import build_model
    from trainer.parallel.base import materialize
    from trainer.preflight import resolve_model_config

    cfg, _ = compose_config([f"model.pretrained={directory}"])
    model, weights = build_model(resolve_model_config(cfg.model, vocab_size), 0, cfg.quant)
    materialize(model, weights, torch.device("cpu"))
    return model


def evaluate(
    model: torch.nn.Module, tokenizer: Any, tasks: list[str], manager: Any, *,
    apply_chat_template: bool | str = False, fewshot_as_multiturn: bool | None = None, **options: Any,
) -> dict:  # fmt: skip
    """lm_eval's simple_evaluate of `tasks` on the harness model (options: limit, num_fewshot, batch_size,
    device). apply_chat_template: prompts through the tokenizer's chat template (a str: the template of
    that name); fewshot_as_multiturn: few-shot examples as turns (None: on with a template, as lm_eval's CLI)."""
    import lm_eval

    from trainer.evaluation.lm import HarnessLM

    multiturn = fewshot_turns(apply_chat_template, fewshot_as_multiturn)
    device = options.pop("device", "cpu")
    lm = HarnessLM(model.to(device), tokenizer, batch_size=options.pop("batch_size", 1), device=device)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=multiturn, **options,
    )  # fmt: skip


def fewshot_turns(apply_chat_template: bool | str, fewshot_as_multiturn: bool | None) -> bool:
    """lm_eval's CLI rule: few-shot examples as turns by default with a chat template; asked for without one, refused."""
    if fewshot_as_multiturn and not apply_chat_template:
        raise EvaluateError("--fewshot-as-multiturn needs --apply-chat-template (turns exist only in a chat template)")
    return bool(apply_chat_template) if fewshot_as_multiturn is None else fewshot_as_multiturn


def all_checkpoints(run: Path) -> list[Path]:
    """A run's kept checkpoints (complete ones), oldest first."""
    from trainer.checkpoint import CheckpointStore

    found = sorted(CheckpointStore(run).complete(), key=lambda p: p.name)
    if not found:
        raise EvaluateError(f"--all-checkpoints: {run} holds no checkpoint (a run directory has checkpoints/step_*)")
    return found


def step_table(rows: list[tuple[int, dict]]) -> str:
    """Task x metric (rows) by checkpoint step (columns), from each step's lm_eval results."""
    keys = sorted(
        {(t, m) for _, r in rows for t, ms in r["results"].items() for m, v in ms.items()
         if "_stderr" not in m and isinstance(v, int | float)}
    )  # fmt: skip
    lines = ["| task | metric | " + " | ".join(f"step {step}" for step, _ in rows) + " |"]
    lines.append("|---|---|" + "---|" * len(rows))
    for task, metric in keys:
        values = [r["results"].get(task, {}).get(metric) for _, r in rows]
        cells = [f"{v:.4g}" if isinstance(v, int | float) else "-" for v in values]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m trainer.evaluate`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a run directory, a checkpoint or a Hugging Face directory")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--include-path", action="append", default=[], help="a directory of task YAMLs (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="lm_eval's results JSON (default: not written)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--all-checkpoints", action="store_true", help="score every kept checkpoint of a run")
    parser.add_argument(
        "--apply-chat-template", nargs="?", const=True, default=False, metavar="NAME",
        help="prompts through the tokenizer's chat template (NAME: one of its named templates)",
    )  # fmt: skip
    parser.add_argument(
        "--fewshot-as-multiturn", nargs="?", const=True, default=None, metavar="BOOL",
        type=lambda x: x.lower() in ("true", "1", "yes"),
        help="few-shot examples as chat turns (default: on with --apply-chat-template)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if importlib.util.find_spec("lm_eval") is None:
            raise EvaluateError('lm_eval is not installed: pip install -e ".[eval]"')
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        manager = task_manager(args.include_path, tasks)
        check_tasks(manager, tasks)
        check_task_data(manager, tasks)
        multiturn = fewshot_turns(args.apply_chat_template, args.fewshot_as_multiturn)
        sources = all_checkpoints(args.source) if args.all_checkpoints else [args.source]
        opened = [open_source(source) for source in sources]  # tokenizers only: no weights yet
        for _, tokenizer in opened:
            check_generation(manager, tasks, tokenizer)
        options = dict(
            limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
            apply_chat_template=args.apply_chat_template, fewshot_as_multiturn=multiturn,
        )  # fmt: skip
        scored = []
        for where, tokenizer in opened:
            model = load_weights(where, tokenizer)
            scored.append((str(where), evaluate(model, tokenizer, tasks, manager, **options)))
    except EvaluateError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    from lm_eval.utils import make_table

    kept = [{key: r[key] for key in KEPT if key in r} | {"source": name} for name, r in scored]
    if args.all_checkpoints:
        steps = [(json.loads((Path(name) / "meta.json").read_text())["step"], r) for name, r in scored]
        print(step_table(steps))
        for entry, (step, _) in zip(kept, steps, strict=True):
            entry["step"] = step
    else:
        print(f"{scored[0][0]}:\n{make_table(scored[0][1])}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(kept if args.all_checkpoints else kept[0], indent=2, default=str) + "\n")
    return 0


KEPT = ("results", "versions", "n-shot", "higher_is_better", "n-samples")  # of lm_eval's results, what --out writes


if __name__ == "__main__":
    sys.exit(main())
