"""`python -m trainer.data.preview [overrides] [--n 3]`: the data as training will see it.

Composes the config exactly as `python -m trainer` does (same overrides, e.g. `data=chat
data.path=/data/chats.jsonl model.pretrained=/models/llama`), builds the data (filling the caches
a run would use), then prints a few examples with the tokens that count toward the loss marked
(⟦like this⟧, or in colour on a terminal) and the counts: examples, tokens, target tokens,
truncated, skipped, rows, padding share. Preference data shows pairs (both rows, completions
marked), prompts their text and the fields the rewards get. Errors: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from trainer.config import ConfigError
from trainer.data import Data, build_data

MARKS = {False: ("⟦", "⟧"), True: ("\033[1;32m", "\033[0m")}  # by whether stdout is a terminal


def marked(tokenizer, ids: np.ndarray, targets: np.ndarray, colour: bool = False) -> str:
    """The decoded ids, runs of target tokens wrapped in marks."""
    open_mark, close_mark = MARKS[colour]
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or targets[end] != targets[start]:
            text = tokenizer.decode(ids[start:end])
            pieces.append(f"{open_mark}{text}{close_mark}" if targets[start] else text)
            start = end
    return "".join(pieces)


def show_examples(data: Data, n: int, colour: bool) -> list[str]:
    """Up to n examples of the train split (text: its first windows), rendered for reading."""
    lines = []
    if data.format == "text":
        for row in range(min(n, len(data.train))):
            x, _ = data.train.get_batch(np.array([row]))[:2]
            lines += [f"--- window {row} (every token is a target)", data.tokenizer.decode(x[0].tolist())]
        return lines
    if data.format == "preference":
        return show_pairs(data, n, colour)
    if data.format == "prompts":
        for i in range(min(n, len(data.train))):
            record = data.train.prompt(i)
            lines += [
                f"--- prompt {i}: {len(record.ids)} tokens; fields {record.fields}",
                data.tokenizer.decode(record.ids),
            ]
        return lines
    split = data.train
    for i in range(min(n, split.num_examples)):
        ids, targets = split.example(i)
        kept = int(split.lengths[i])
        cut = f"; truncated to {kept} at train.seq_len" if kept < len(ids) else ""
        lines.append(f"--- example {i}: {len(ids)} tokens, {int(targets[1:kept].sum())} targets{cut}")
        lines.append(marked(data.tokenizer, ids[:kept], targets[:kept], colour))
    return lines


def show_pairs(data: Data, n: int, colour: bool) -> list[str]:
    """Up to n preference pairs of the train split: each row (prompt + chosen, prompt + rejected) with its
    completion's tokens marked, as the run's rows hold them (truncated)."""
    lines, rows = [], data.train.rows
    for i in range(min(n, data.train.pairs)):
        for side, row in (("chosen", 2 * i), ("rejected", 2 * i + 1)):
            ids, targets = rows.example(row)
            kept = int(rows.lengths[row])
            lines.append(f"--- pair {i}, {side}: {kept} tokens, {int(targets[1:kept].sum())} targets")
            lines.append(marked(data.tokenizer, ids[:kept], targets[:kept], colour))
    return lines


def counts(data: Data) -> list[str]:
    """The numbers a run reports, one per line."""
    train, val = data.train, data.val
    if data.format in ("preference", "prompts"):
        return [data.describe()]
    rows = f"{len(train) + len(val):,} ({len(train):,} train / {len(val):,} val) of {train.seq_len} tokens"
    if data.format == "text":
        documents = f"{data.documents:,}" if data.documents is not None else "-"
        return [
            f"documents      {documents}",
            f"tokens         {train.num_tokens + val.num_tokens:,}",
            f"rows           {rows}",
        ]
    targets = data.target_tokens
    without = train.without_targets + val.without_targets
    return [
        f"examples       {data.examples:,} ({train.num_examples:,} train / {val.num_examples:,} val)",
        f"tokens         {train.num_tokens + val.num_tokens:,}",
        f"target tokens  {sum(targets):,} ({targets[0]:,} train / {targets[1]:,} val)",
        f"truncated      {data.truncated:,} ({without:,} left with no target)",
        f"skipped        {data.skipped:,} bad records",
        f"rows           {rows}, {'packed' if train.packing else 'one example each'}",
        f"padding        {data.padding:.1%}",
    ]


def load(overrides: list[str]) -> Data:
    """The config composed from overrides as `python -m trainer` composes it, and its data."""
    from trainer.__main__ import _one_line, compose_config

    try:
        cfg, _ = compose_config(overrides)
    except Exception as error:  # Hydra and OmegaConf raise many types; all end here as one line
        raise ConfigError(_one_line(error)) from error
    room = cfg.objective.max_new_tokens if cfg.objective.name in ("grpo", "rloo") else 0
    return build_data(
        cfg.data, cfg.train.seq_len, cfg.train.seed, pretrained=cfg.model.pretrained, completion_room=room
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.data.preview", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="examples to show (default 3)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m trainer")
    args = parser.parse_intermixed_args(argv)
    try:
        data = load(args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    print(data.describe())
    print("\n".join([*show_examples(data, args.n, sys.stdout.isatty()), "---", *counts(data)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
