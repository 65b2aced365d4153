"""In-loop downstream evaluation, measured: its overhead on the embedded default run, and its curve.

    python -m benchmarks.evaluation                      # the default run twice, ~3 min on 2 CPU cores
    python -m benchmarks.evaluation --quick              # 20 steps (the test's mode)
    python -m benchmarks.evaluation --out /tmp/ev.json   # default: benchmarks/results/evaluation.json

Two runs of `python -m trainer`'s embedded default (the tiny GPT on the Python standard library's
source, byte tokens, 600 steps, validation every 100; the same config, seed and data):
  plain      as it is;
  evaluated  plus eval.tasks=[tiny_mc,tiny_gen,tiny_rolling] (the shipped lm_eval tasks: multiple
             choice, generation to a stop string, rolling log-likelihood) and eval.files=[LICENSE.txt
             of this Python] (text the run never trains on: the stdlib data is its .py files), every
             other eval.* key at its default (batch 8 requests, at the validation interval and the
             last step).
Overhead: the evaluations' own time (eval/time_s, summed) against the plain run's training time,
and the two runs' wall-clock difference (which also holds run-to-run noise; on a busy machine it
can be negative). Each run is the real loop, `trainer.loop.train`, in this process, one after the
other. Printed: a table; written: the JSON and OUT.png (the evaluated run's figures against step).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import write_report

TASKS = "eval.tasks=[tiny_mc,tiny_gen,tiny_rolling]"
HEADLINE = (  # the figures the table and the plot show (the JSON keeps every eval/* key)
    ("eval/tiny_mc/acc", "tiny_mc acc"),
    ("eval/tiny_gen/exact_match_strip", "tiny_gen exact match"),
    ("eval/tiny_rolling/bits_per_byte", "tiny_rolling bits/byte"),
)


def held_out_file() -> Path:
    """This Python's LICENSE.txt: English text beside the stdlib, never in the default run's data (.py files)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: pass a text file with --held-out")
    return path


def run(name: str, overrides: list[str], root: Path) -> dict[str, Any]:
    from trainer.__main__ import compose_config
    from trainer.loop import train

    cfg, _ = compose_config(["logger.wandb=false", "logger.progress_bar=false", *overrides])
    started = time.perf_counter()
    train(cfg, root / name)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    evals = [{k: v for k, v in r.items() if k.startswith("eval/") or k in ("step", "val_loss")}
             for r in rows if "eval/time_s" in r]  # fmt: skip
    eval_s = sum(e["eval/time_s"] for e in evals)
    return {"name": name, "wall_s": wall, "train_s": wall - eval_s, "eval_s": eval_s, "evals": evals,
            "val_loss": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]}  # fmt: skip


def plot(evaluated: dict, out: Path, held_out: str) -> str:
    from matplotlib.figure import Figure

    path = out.with_suffix(".png")
    evals = evaluated["evals"]
    steps = [e["step"] for e in evals]
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    scores, perplexity = fig.subplots(1, 2)
    for key, label in HEADLINE[:2]:
        scores.plot(steps, [e[key] for e in evals], "o-", label=label)
    scores.axhline(0.25, color="C3", ls="--", lw=1, label="tiny_mc chance (4 choices)")
    scores.set(xlabel="step", ylabel="score", title="Downstream tasks (lm_eval, in the loop)", ylim=(-0.02, 1.02))
    scores.grid(alpha=0.3)
    scores.legend(loc="upper left", fontsize=8)
    perplexity.plot(steps, [e[HEADLINE[2][0]] for e in evals], "o-", color="C2", label=HEADLINE[2][1])
    perplexity.plot(steps, [e[f"eval/ppl/{held_out}"] for e in evals], "s-", color="C4",
                    label=f"eval/ppl/{held_out} (token perplexity)")  # fmt: skip
    val = evaluated["val_loss"]
    perplexity.plot([s for s, _ in val], [v for _, v in val], "^--", color="0.5", label="val_loss (stdlib)")
    perplexity.set(xlabel="step", ylabel="value (log)", yscale="log", title="Held-out text (lower is better)")
    perplexity.grid(alpha=0.3, which="both")
    perplexity.legend(fontsize=8)
    fig.savefig(path, dpi=110, facecolor="white")
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 steps, an evaluation every 10")
    parser.add_argument("--held-out", type=Path, default=None, help="the eval.files text (default: LICENSE.txt)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluation.json"))
    args = parser.parse_args(argv)
    held_out = args.held_out or held_out_file()
    steps = ["train.max_steps=20", "train.eval_interval=10", "train.log_interval=10"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain = run("plain", steps, root)
        evaluated = run("evaluated", [*steps, TASKS, f"eval.files=[{held_out}]"], root)
    overhead = evaluated["eval_s"] / plain["train_s"]
    wall = evaluated["wall_s"] / plain["wall_s"] - 1
    last = evaluated["evals"][-1]
    print(f"\nthe embedded default{' (--quick)' if args.quick else ''}, {len(evaluated['evals'])} evaluations")
    print("| run | wall s | training s | evaluation s | per evaluation s |")
    print("|---|---|---|---|---|")
    for r in (plain, evaluated):
        per = r["eval_s"] / len(r["evals"]) if r["evals"] else 0.0
        print(f"| {r['name']} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['eval_s']:.1f} | {per:.2f} |")
    print(f"\noverhead: evaluation time / plain training time = {100 * overhead:.1f}%; "
          f"wall-clock difference {100 * wall:+.1f}%")  # fmt: skip
    print("\n| step | " + " | ".join(label for _, label in HEADLINE) + f" | ppl/{held_out.stem} | seconds |")
    print("|---" * (len(HEADLINE) + 3) + "|")
    for e in evaluated["evals"]:
        cells = [f"{e[key]:.4g}" for key, _ in HEADLINE] + [f"{e[f'eval/ppl/{held_out.stem}']:.4g}"]
        print(f"| {e['step']} | " + " | ".join(cells) + f" | {e['eval/time_s']:.2f} |")
    record = {
        "benchmark": "evaluation", "quick": args.quick, "held_out": held_out.name, "machine": platform.platform(),
        "python": sys.version.split()[0], "plain": plain, "evaluated": evaluated,
        "overhead_eval_over_train": overhead, "wall_clock_difference": wall, "last": last,
    }  # fmt: skip
    png = plot(evaluated, args.out, held_out.stem)
    write_report(args.out, record, f"and {png}")
    return record


if __name__ == "__main__":
    main()
