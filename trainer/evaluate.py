"""Downstream scores of a run, a checkpoint or a Hugging Face directory, through lm-evaluation-harness.

    python -m trainer.evaluate SOURCE --tasks NAME[,NAME...] [--include-path DIR] [--limit N]
                               [--num-fewshot K] [--batch-size B] [--out FILE] [--device cpu]
    python -m trainer.evaluate RUN --all-checkpoints --tasks ...   # every kept checkpoint: task x step

SOURCE is a run directory (its latest verified checkpoint), one checkpoint of any strategy (a LoRA
run's adapters over their base: no export needed) or a Hugging Face directory (config.json +
safetensors + tokenizer). Tasks come from lm_eval's registry, the tasks this repository ships
(trainer/evaluation/tasks: tiny local ones) and --include-path DIRs of task YAMLs with local data.
The model is the harness's own GPT behind lm_eval's request machinery (trainer/evaluation/lm.py);
prints lm_eval's table and writes its results JSON (results[task]["acc,none"], ...). Needs the
optional extra: pip install -e ".[eval]". Errors: one line, exit code 2, before the model loads.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

SHIPPED_TASKS = Path(__file__).resolve().parent / "evaluation" / "tasks"


class EvaluateError(RuntimeError):
    """A one-line reason the evaluation cannot run."""


def task_manager(include: list[str]) -> Any:
    """lm_eval's TaskManager over its registry, the shipped tasks and the --include-path DIRs."""
    from lm_eval.tasks import TaskManager

    paths = [str(SHIPPED_TASKS), *include] if SHIPPED_TASKS.is_dir() else list(include)
    for path in include:
        if not Path(path).is_dir():
            raise EvaluateError(f"--include-path {path} is not a directory of task YAMLs")
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


def load_source(source: Path) -> tuple[torch.nn.Module, Any, str]:
    """(the harness's GPT holding SOURCE's weights, fp32 on the CPU; its Hugging Face tokenizer; a name)."""
    from trainer.export import ExportError, find_checkpoint, load_model
    from trainer.generate import load_tokenizer

    if not source.exists():
        raise EvaluateError(f"{source} does not exist: give a run directory, a checkpoint or a Hugging Face directory")
    if (source / "config.json").is_file() and not (source / "meta.json").exists():
        return *_hugging_face(source), str(source)
    try:
        checkpoint = find_checkpoint(source)
        model, _ = load_model(checkpoint)
        tokenizer = load_tokenizer(checkpoint)
    except (ExportError, OSError) as error:
        raise EvaluateError(f"{source} is not a run, a checkpoint or a Hugging Face directory: {error}") from error
    if not hasattr(tokenizer, "get_vocab"):
        raise EvaluateError(f"{source} trained with the byte tokenizer: lm_eval needs a Hugging Face tokenizer")
    return model, tokenizer, str(checkpoint)


def _hugging_face(directory: Path) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoTokenizer

    from trainer.config.load import compose_config
    from trainer.model.build import build_model
    from trainer.parallel.base import materialize
    from trainer.preflight import resolve_model_config

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    cfg, _ = compose_config([f"model.pretrained={directory}"])
    model, weights = build_model(resolve_model_config(cfg.model, len(tokenizer)), 0, cfg.quant)
    materialize(model, weights, torch.device("cpu"))
    return model, tokenizer


def evaluate(model: torch.nn.Module, tokenizer: Any, tasks: list[str], manager: Any, **options: Any) -> dict:
    """lm_eval's simple_evaluate of `tasks` on the harness model (options: limit, num_fewshot, batch_size, device)."""
    import lm_eval

    from trainer.evaluation.lm import HarnessLM

    device = options.pop("device", "cpu")
    lm = HarnessLM(model.to(device), tokenizer, batch_size=options.pop("batch_size", 1), device=device)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, **options)


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
    args = parser.parse_args(argv)
    try:
        if importlib.util.find_spec("lm_eval") is None:
            raise EvaluateError('lm_eval is not installed: pip install -e ".[eval]"')
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        manager = task_manager(args.include_path)
        check_tasks(manager, tasks)
        sources = all_checkpoints(args.source) if args.all_checkpoints else [args.source]
        options = dict(limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device)
        scored = []
        for source in sources:
            model, tokenizer, name = load_source(source)
            scored.append((name, evaluate(model, tokenizer, tasks, manager, **options)))
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
