"""`python -m trainer.diagnose <tool> [options]`: the gradient instruments that run outside training.

gradient-flow   gradient norm against depth: the lesson's exercise 4, or any configured GPT
gradcheck       centred-difference gradient checks of every custom op of the project
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType


def _tools() -> dict[str, ModuleType]:
    from trainer.diagnostics import gradient_check, gradient_flow

    return {"gradient-flow": gradient_flow, "gradcheck": gradient_check}


def main(argv: list[str] | None = None) -> int:
    """Parse the tool and its options, run it; the exit code is the tool's (non-zero when a check fails)."""
    tools = _tools()
    parser = argparse.ArgumentParser(
        prog="python -m trainer.diagnose", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="tool", required=True, metavar="{" + ",".join(tools) + "}")
    for name, module in tools.items():
        doc = module.__doc__ or name
        module.add_arguments(
            sub.add_parser(
                name, help=doc.strip().splitlines()[0], description=doc,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )  # fmt: skip
    args = parser.parse_args(argv)
    return int(tools[args.tool].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
