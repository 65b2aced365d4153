"""`python -m trainer.diagnose <tool> [options]`: the gradient instruments that run outside training.

gradient-flow   gradient norm against depth: the lesson's exercise 4, or any configured GPT
gradcheck       centred-difference gradient checks of every custom op of the project
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from trainer.diagnostics import custom_ops, gradient_check, gradient_flow
from trainer.diagnostics import gradient_flow_report as report
from trainer.diagnostics.gradient_check import format_table
from trainer.diagnostics.gradient_flow import toy_study
from trainer.diagnostics.gradient_flow_models import FlowInputError, gpt_study

# The command line lives here, above the pieces it runs: the instruments never import their command.


def main(argv: list[str] | None = None) -> int:
    """Parse the tool and its options, run it; the exit code is the tool's (non-zero when a check fails)."""
    tools = _tools()
    parser = argparse.ArgumentParser(
        prog="python -m trainer.diagnose", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="tool", required=True, metavar="{" + ",".join(tools) + "}")
    for name, (doc, add_arguments, _) in tools.items():
        add_arguments(
            sub.add_parser(
                name, help=doc.strip().splitlines()[0], description=doc,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )  # fmt: skip
    args = parser.parse_args(argv)
    return int(tools[args.tool][2](args) or 0)


Tool = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _tools() -> dict[str, Tool]:
    """Each tool: its help (the instrument module's docstring), its options, and the command."""
    return {
        "gradient-flow": (gradient_flow.__doc__ or "gradient-flow", gradient_flow_arguments, run_gradient_flow),
        "gradcheck": (gradient_check.__doc__ or "gradcheck", gradcheck_arguments, run_gradcheck),
    }


# -- gradient-flow ---------------------------------------------------------------------------------


def gradient_flow_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m trainer.diagnose gradient-flow`."""
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of a GPT config, as for python -m trainer (none: the toy study)"
    )
    parser.add_argument(
        "--run", type=Path, metavar="RUN_DIR", help="a run directory of python -m trainer (or one checkpoint in it)"
    )
    parser.add_argument(
        "--png", type=Path, metavar="PATH", help="plot to write (default: ./gradient_flow*.png, or in RUN_DIR)"
    )
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the measurements as JSON to this file")
    parser.add_argument("--seed", type=int, default=0, help="toy weights and inputs / the random tokens (0)")
    parser.add_argument("--width", type=int, default=64, help="toy study: units per layer (64)")
    parser.add_argument("--depth", type=int, default=20, help="toy study: layers (20)")
    parser.add_argument("--batch-size", type=int, help="toy: inputs (128); GPT: sequences (4)")
    parser.add_argument("--seq-len", type=int, help="GPT: tokens per sequence (train.seq_len, at most 128)")
    parser.add_argument("--data", action="store_true", help="GPT: a batch of the config's validation split")
    parser.add_argument("--vocab", type=int, help="GPT: the vocabulary when model.vocab_size is null")
    parser.add_argument("--device", default="auto", help="GPT: cpu, cuda, ... (auto: cuda when available)")


def run_gradient_flow(args: argparse.Namespace) -> int:
    """Measure, print the table, write the PNG (and JSON); 2 with one line on bad input."""
    try:
        if args.run is not None and args.overrides:
            raise FlowInputError("give either --run RUN_DIR or overrides, not both (a run's config is its own)")
        is_toy = args.run is None and not args.overrides
        png = args.png or default_png(args.run, args.overrides)
        for path in (args.png, args.out):  # the default PNG's directory is here, or the run's
            if path is not None and not path.expanduser().resolve().parent.is_dir():
                raise FlowInputError(f"{path}: its directory does not exist (create it or choose another path)")
        if is_toy:
            result = toy_study(args.width, args.depth, args.batch_size or 128, args.seed)
        else:
            result = gpt_study(args)
    except FlowInputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    print(report.toy_table(result) if is_toy else report.model_table(result))
    report.write_png(result, png)
    written = [str(png)]
    if args.out is not None:
        report.write_json(result, args.out)
        written.append(str(args.out))
    print(f"wrote {' and '.join(written)}")
    return 0


def default_png(run_dir: Path | None, overrides: list[str]) -> Path:
    """RUN_DIR/gradient_flow.png for a run (beside checkpoints/); else in the current directory."""
    if run_dir is not None:
        root = run_dir.parent.parent if run_dir.name.startswith("step_") else run_dir
        return root / "gradient_flow.png"
    return Path("gradient_flow_gpt.png" if overrides else "gradient_flow.png")


# -- gradcheck -------------------------------------------------------------------------------------


def gradcheck_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m trainer.diagnose gradcheck`."""
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="precision of the check")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="ops to check: names or prefixes (attention)")
    parser.add_argument("--out", type=Path, help="also write the reports to this JSON file")


def run_gradcheck(args: argparse.Namespace) -> int:
    """Check every custom op of the project (trainer.diagnostics.custom_ops); 1 if any check fails."""
    dtype = getattr(torch, args.dtype)
    results = [custom_ops.check_op(op, dtype) for op in custom_ops.select(custom_ops.OPS, args.only)]
    print(format_table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return int(any(r["result"] == "FAIL" for r in results))


if __name__ == "__main__":
    sys.exit(main())
