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
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

from trainer.evaluation.registry import (  # noqa: F401  (re-exported: the command's API)
    LOCAL_BUILDERS,
    SHIPPED_TASKS,
    EvaluateError,
    check_generation,
    check_task_data,
    check_tasks,
    stop_sequences,
    task_configs,
    task_manager,
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
