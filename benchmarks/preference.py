"""Learning, measured: DPO and GRPO (with LoRA) on a toy task a tiny model learns in minutes on a CPU.

    python -m benchmarks.preference                          # 30 s on 2 idle CPU cores (90 s on busy ones)
    python -m benchmarks.preference --steps 150              # longer DPO and GRPO runs
    python -m benchmarks.preference --quick                  # a few steps of each (the test's mode)
    python -m benchmarks.preference --out /tmp/pref.json     # default: benchmarks/results/preference.json

The task: a prompt names a case and a word, `upper kqmz >` or `lower kqmz >`; the answer is the word
in that case (` KQMZ`, ` kqmz`). Words are 3-5 random lower-case letters, so no word is learned; the
dpo and grpo records alternate the two cases, so every split asks for each half the time.

  base  A GPT-2-layout model (2 x 64, byte vocabulary, 0.14M parameters) trained from scratch
        (objective=sft, data=instruct, --base-steps) on answers whose case is a coin flip: it writes
        a word in one case, but ignores which one the prompt asks for. Exported (trainer.export) as
        the pretrained base of the two runs below, with a byte-level Hugging Face tokenizer written
        here (ids 0-255 the bytes, 256 the end of text: the byte tokenizer's ids), because
        `data.tokenizer=byte` cannot be combined with model.pretrained and the export of a byte run
        holds no tokenizer files. (LoRA on a random base does not do: its frozen, tiny tied
        embedding caps how far the logits move, and DPO's margin stalls near 0.15.)
  dpo   objective=dpo (sigmoid, beta 0.1), LoRA r 16 on every linear layer, lr 5e-3, 16 pairs a
        step: pairs {prompt, chosen: the word in the asked case, rejected: in the other}. Logged
        each step on the train batch (rewards/accuracies, rewards/margins) and every EVAL steps on
        the 80 held-out pairs (val_rewards/*: data.val_fraction 0.2, every one of them). Chance is
        0.5, and so is any preference for one case whatever the prompt; at step 1 the adapters are
        zero, so the policy is its reference and every pair a tie (accuracy 0, margin 0).
  grpo  objective=grpo (dapo loss, beta 0.04: k3 KL to the base, adapters off), LoRA as above,
        lr 3e-3, 16 prompts a step x NUM_GENERATIONS completions of at most 8 tokens, reward
        `case_share` below (the share of the completion's letters in the asked case; 0 without
        letters), given as objective.rewards=[benchmarks.preference:case_share]. The base scores
        about 0.5. Logged every step: reward/mean, the step's time split (time/generation_s:
        sampling the completions; the rest of the rollout: rewards and the reference's log-probs;
        train: forward, backward and optimizer; other: the rest of throughput/step_time_s), and
        every EVAL steps the mean reward of greedy completions of the 40 held-out prompts
        (val_reward/mean).

Each run is the real loop, `trainer.loop.train`, on a config composed like the command line's
(overrides in the JSON), one torch thread (train.num_threads=1), fp32; on a CPU with one thread the
figures repeat exactly from run to run. Printed: a table per run; written: the JSON (curves and
summary) and two PNG plots beside it (OUT-dpo.png, OUT-grpo.png). --seed changes the dpo and grpo
runs' train.seed (adapter init, batch order, sampling), not the data or the base.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import write_report

LETTERS = "abcdefghijklmnopqrstuvwxyz"
NUM_GENERATIONS = 8
EVAL = 5  # train.eval_interval of the dpo and grpo runs
SHAPE = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2"]
COMMON = ["logger=none", "logger.progress_bar=false", "train.sample_tokens=0", "optim.warmup_steps=0",
          "train.log_interval=1", f"train.eval_interval={EVAL}", "train.seed=0", "train.num_threads=1"]  # fmt: skip
BASE = ["data=instruct", "train.seq_len=64", "train.micro_batch_size=16", "optim.lr=3e-3", "optim.warmup_steps=20",
        "data.val_fraction=0.05", "train.log_interval=10", "train.eval_interval=100"]  # fmt: skip
LORA = ["lora=default", "lora.base_dtype=fp32"]  # r 16, alpha 32, every linear layer
DPO = ["objective=dpo", "data=preference", "train.seq_len=24", "train.micro_batch_size=16", "optim.lr=5e-3",
       "data.val_fraction=0.2", "train.eval_batches=5"]  # fmt: skip
GRPO = ["objective=grpo", "data=prompts", "train.seq_len=24", "train.micro_batch_size=16", "optim.lr=3e-3",
        f"objective.num_generations={NUM_GENERATIONS}", "objective.max_new_tokens=8", "objective.beta=0.04",
        "objective.rewards=[benchmarks.preference:case_share]", "data.val_fraction=0.1", "train.eval_batches=3"]  # fmt: skip


# ----------------------------------------------------------------------------- the task


def case_share(prompts: list[str], completions: list[str], completion_ids: list, case: list[str], **_: Any) -> list:
    """GRPO's reward: the share of a completion's letters in the case its prompt asks for (0 without letters)."""
    out = []
    for text, wanted in zip(completions, case, strict=True):
        letters = [c for c in text if c.isascii() and c.isalpha()]
        right = sum(c.isupper() == (wanted == "upper") for c in letters)
        out.append(right / len(letters) if letters else 0.0)
    return out


def write_data(directory: Path, seed: int = 0) -> dict[str, Path]:
    """The three record files: sft (the base: answers in a random case), pairs (dpo), prompts (grpo)."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))

    records: dict[str, list[dict]] = {"sft": [], "pairs": [], "prompts": []}
    for _ in range(3000):
        w, case = word(), rng.choice(("upper", "lower"))
        records["sft"].append({"prompt": f"{case} {w} >", "response": " " + rng.choice((w, w.upper()))})
    for i in range(400):  # the cases alternate: every split asks for each as often (chance is 0.5 for any bias)
        w, case = word(), ("upper", "lower")[i % 2]
        asked, other = (w.upper(), w) if case == "upper" else (w, w.upper())
        records["pairs"].append({"prompt": f"{case} {w} >", "chosen": " " + asked, "rejected": " " + other})
    for i in range(400):
        w, case = word(), ("upper", "lower")[i % 2]
        records["prompts"].append({"prompt": f"{case} {w} >", "case": case})
    paths = {}
    for name, rows in records.items():
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def save_byte_tokenizer(directory: Path) -> None:
    """A Hugging Face tokenizer with the byte tokenizer's ids: byte b -> id b, <|endoftext|> -> 256 (the eos).
    GPT-2's byte-level alphabet maps each byte to one character; with no merges every byte stays one token."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes_to_unicode
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {char: byte for byte, char in chars.items()} | {"<|endoftext|>": 256}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    sample = "upper kqmz > KQMZ"
    if tokenizer.encode(sample) != list(sample.encode()):
        raise RuntimeError(f"the byte-level tokenizer encodes {sample!r} as {tokenizer.encode(sample)}, not its bytes")
    tokenizer.save_pretrained(str(directory))


# ----------------------------------------------------------------------------- the runs


def run(overrides: list[str], run_dir: Path) -> tuple[list[dict], float]:
    """One train() run; its metrics.jsonl rows and wall seconds. The loop's console lines go to stderr."""
    from trainer.config.load import compose_config
    from trainer.loop import train

    cfg, _ = compose_config(overrides)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        train(cfg, run_dir)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, seconds


def pretrain_base(work: Path, data: dict[str, Path], steps: int) -> tuple[Path, dict]:
    """The base: sft from scratch, exported with the byte-level tokenizer; its directory and figures."""
    from trainer.export import main as export

    save_byte_tokenizer(work / "tokenizer")
    overrides = [*SHAPE, *COMMON, *BASE, f"data.path={data['sft']}", f"data.tokenizer={work / 'tokenizer'}",
                 f"data.cache_dir={work / 'cache'}", f"train.max_steps={steps}"]  # fmt: skip
    rows, seconds = run(overrides, work / "base")
    with contextlib.redirect_stdout(sys.stderr):
        if export([str(work / "base"), "--out", str(work / "hf")]) != 0:
            raise RuntimeError(f"python -m trainer.export {work / 'base'} failed")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    return work / "hf", {"steps": steps, "seconds": seconds, "loss": rows[-1]["loss"],
                         "val_loss": val[-1] if val else None, "overrides": overrides}  # fmt: skip


def dpo_figures(rows: list[dict]) -> dict:
    """Curves (train batch every step, held-out pairs every EVAL steps) and the summary."""
    train = [{"step": r["step"], "loss": r["loss"], "accuracy": r["rewards/accuracies"],
              "margin": r["rewards/margins"], "chosen": r["rewards/chosen"], "rejected": r["rewards/rejected"]}
             for r in rows if "rewards/accuracies" in r]  # fmt: skip
    held = [{"step": r["step"], "loss": r["val_loss"], "accuracy": r["val_rewards/accuracies"],
             "margin": r["val_rewards/margins"]} for r in rows if "val_rewards/accuracies" in r]  # fmt: skip
    reached = next((h["step"] for h in held if h["accuracy"] >= 0.9), None)
    summary = {
        "held_out_accuracy_start": held[0]["accuracy"], "held_out_accuracy_end": held[-1]["accuracy"],
        "held_out_margin_start": held[0]["margin"], "held_out_margin_end": held[-1]["margin"],
        "held_out_first_step": held[0]["step"], "held_out_accuracy_0.9_at_step": reached,
        "train_accuracy_first5": mean(t["accuracy"] for t in train[:5]),
        "train_accuracy_last5": mean(t["accuracy"] for t in train[-5:]),
        "train_margin_last5": mean(t["margin"] for t in train[-5:]),
    }  # fmt: skip
    return {"train": train, "held_out": held, "summary": summary}


def grpo_figures(rows: list[dict]) -> dict:
    """Reward and time split per step, held-out greedy reward every EVAL steps, and the summary."""
    steps = []
    for r in rows:
        if "reward/mean" not in r:
            continue
        step_s, generation_s = r["throughput/step_time_s"], r["time/generation_s"]
        rollout_rest = r["throughput/data_time_s"] - generation_s  # rewards, the reference's log-probs
        train_s = r["throughput/compute_time_s"] + r["throughput/optimizer_time_s"]
        steps.append({
            "step": r["step"], "reward": r["reward/mean"], "reward_std": r["reward/std"], "kl": r.get("kl"),
            "completion_length": r["completion_length/mean"], "frac_reward_zero_std": r["frac_reward_zero_std"],
            "step_s": step_s, "generation_s": generation_s, "rollout_rest_s": rollout_rest, "train_s": train_s,
            "other_s": step_s - generation_s - rollout_rest - train_s, "generation_share": generation_s / step_s,
        })  # fmt: skip
    held = [{"step": r["step"], "reward": r["val_reward/mean"]} for r in rows if "val_reward/mean" in r]
    summary = {
        "reward_first5": mean(s["reward"] for s in steps[:5]), "reward_last5": mean(s["reward"] for s in steps[-5:]),
        "held_out_reward_start": held[0]["reward"] if held else None,
        "held_out_reward_end": held[-1]["reward"] if held else None,
        "held_out_reward_0.9_at_step": next((h["step"] for h in held if h["reward"] >= 0.9), None),
        "step_s_median": statistics.median(s["step_s"] for s in steps),
        "generation_s_median": statistics.median(s["generation_s"] for s in steps),
        "generation_share_median": statistics.median(s["generation_share"] for s in steps),
        "train_s_median": statistics.median(s["train_s"] for s in steps),
        "rollout_rest_s_median": statistics.median(s["rollout_rest_s"] for s in steps),
    }  # fmt: skip
    return {"train": steps, "held_out": held, "summary": summary}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


# ----------------------------------------------------------------------------- output


def print_tables(dpo: dict, grpo: dict) -> None:
    held = {h["step"]: h for h in dpo["held_out"]}
    print("\nDPO (LoRA): the train batch each step; held-out pairs every", EVAL, "steps")
    print(f"{'step':>5} {'loss':>7} {'acc':>6} {'margin':>8} | {'val loss':>8} {'val acc':>7} {'val margin':>10}")
    for t in dpo["train"]:
        h = held.get(t["step"])
        tail = f" {h['loss']:8.4f} {h['accuracy']:7.3f} {h['margin']:10.4f}" if h else ""
        if h or t["step"] <= 5:
            print(f"{t['step']:5d} {t['loss']:7.4f} {t['accuracy']:6.3f} {t['margin']:8.4f} |{tail}")
    held = {h["step"]: h for h in grpo["held_out"]}
    print("\nGRPO (LoRA): reward of the sampled completions each step; greedy reward on held-out prompts every",
          EVAL, "steps; seconds per step")  # fmt: skip
    print(f"{'step':>5} {'reward':>7} {'std':>6} {'kl':>8} {'length':>6} | {'step s':>7} {'gen s':>6} "
          f"{'rollout':>7} {'train s':>7} {'other':>6} {'gen %':>6} | {'val reward':>10}")  # fmt: skip
    for s in grpo["train"]:
        h = held.get(s["step"])
        if not (h or s["step"] <= 5):
            continue
        kl = f"{s['kl']:8.5f}" if s["kl"] is not None else f"{'-':>8}"
        val = f"{h['reward']:10.3f}" if h else ""
        print(f"{s['step']:5d} {s['reward']:7.3f} {s['reward_std']:6.3f} {kl} {s['completion_length']:6.2f} | "
              f"{s['step_s']:7.3f} {s['generation_s']:6.3f} {s['rollout_rest_s']:7.3f} {s['train_s']:7.3f} "
              f"{s['other_s']:6.3f} {100 * s['generation_share']:5.1f}% | {val}")  # fmt: skip
    d, g = dpo["summary"], grpo["summary"]
    print(f"\nDPO held-out accuracy {d['held_out_accuracy_start']:.3f} (step {d['held_out_first_step']}) -> "
          f"{d['held_out_accuracy_end']:.3f}, margin {d['held_out_margin_start']:.4f} -> {d['held_out_margin_end']:.4f}; "
          f"0.9 reached at step {d['held_out_accuracy_0.9_at_step']}")  # fmt: skip
    print(f"GRPO mean reward {g['reward_first5']:.3f} (first 5 steps) -> {g['reward_last5']:.3f} (last 5); held-out "
          f"greedy {g['held_out_reward_start']:.3f} -> {g['held_out_reward_end']:.3f} (0.9 at step "
          f"{g['held_out_reward_0.9_at_step']}); generation "
          f"{100 * g['generation_share_median']:.0f}% of a {g['step_s_median']:.3f} s step (median)")  # fmt: skip


def plot(dpo: dict, grpo: dict, out: Path) -> list[str]:
    """OUT-dpo.png (accuracy and margin against step) and OUT-grpo.png (reward; the step's time split)."""
    from matplotlib.figure import Figure

    paths = [out.with_name(f"{out.stem}-dpo.png"), out.with_name(f"{out.stem}-grpo.png")]
    fig = Figure(figsize=(10, 4), layout="constrained")
    acc, margin = fig.subplots(1, 2)
    train, held = dpo["train"], dpo["held_out"]
    for ax, key, label in ((acc, "accuracy", "reward accuracy"), (margin, "margin", "reward margin")):
        ax.plot([t["step"] for t in train], [t[key] for t in train], color="0.6", lw=1, label="train batch")
        ax.plot([h["step"] for h in held], [h[key] for h in held], "o-", color="C0", label="held-out pairs")
        if key == "accuracy":
            ax.axhline(0.5, color="C3", ls="--", lw=1, label="chance")
            ax.set_ylim(-0.02, 1.02)
        ax.set(xlabel="step", ylabel=label, title=f"DPO (LoRA): {label}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if key == "accuracy" else "upper left")
    fig.savefig(paths[0], dpi=110, facecolor="white")

    fig = Figure(figsize=(10, 4), layout="constrained")
    reward, split = fig.subplots(1, 2)
    steps = grpo["train"]
    x = [s["step"] for s in steps]
    reward.plot(x, [s["reward"] for s in steps], color="C0", label="sampled (mean of the step)")
    reward.plot([h["step"] for h in grpo["held_out"]], [h["reward"] for h in grpo["held_out"]], "o-", color="C1",
                label="held-out prompts, greedy")  # fmt: skip
    reward.set(xlabel="step", ylabel="reward", title="GRPO (LoRA): mean reward", ylim=(-0.02, 1.02))
    reward.grid(alpha=0.3)
    reward.legend()
    parts = [("generation_s", "generation"), ("rollout_rest_s", "rewards + reference log-probs"),
             ("train_s", "forward, backward, optimizer"), ("other_s", "other (the loop, logging)")]  # fmt: skip
    split.stackplot(x, *[[max(s[key], 0.0) for s in steps] for key, _ in parts], labels=[n for _, n in parts])
    split.set(xlabel="step", ylabel="seconds", title="GRPO: time per step")
    split.grid(alpha=0.3)
    split.legend(loc="upper left", fontsize=8)
    fig.savefig(paths[1], dpi=110, facecolor="white")
    return [str(p) for p in paths]


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps of the dpo and of the grpo run")
    parser.add_argument("--base-steps", type=int, default=300, help="steps of the base's pretraining")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of the dpo and grpo runs (not the base's)")
    parser.add_argument("--quick", action="store_true", help="a few steps of each run (tests)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/preference.json"))
    args = parser.parse_args(argv)
    if args.steps < EVAL:
        parser.error(f"--steps {args.steps}: give at least {EVAL}, the evaluation interval")
    steps, base_steps = (EVAL, 10) if args.quick else (args.steps, args.base_steps)
    import torch

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="preference-bench-") as tmp:
        work = Path(tmp)
        data = write_data(work)
        hf, base = pretrain_base(work, data, base_steps)
        print(f"base: {base_steps} sft steps from scratch in {base['seconds']:.1f} s, loss {base['loss']:.3f}")
        common = [*COMMON, f"model.pretrained={hf}", *LORA, f"data.cache_dir={work / 'cache'}",
                  f"train.max_steps={steps}", f"train.seed={args.seed}"]  # fmt: skip
        dpo_overrides = [*common, *DPO, f"data.path={data['pairs']}"]
        dpo_rows, dpo_s = run(dpo_overrides, work / "dpo")
        grpo_overrides = [*common, *GRPO, f"data.path={data['prompts']}"]
        grpo_rows, grpo_s = run(grpo_overrides, work / "grpo")
    dpo, grpo = dpo_figures(dpo_rows), grpo_figures(grpo_rows)
    dpo.update(seconds=dpo_s, steps=steps, overrides=dpo_overrides)
    grpo.update(seconds=grpo_s, steps=steps, overrides=grpo_overrides)
    print_tables(dpo, grpo)
    print(f"wall time: base {base['seconds']:.0f} s, dpo {dpo_s:.0f} s, grpo {grpo_s:.0f} s, "
          f"all {time.perf_counter() - started:.0f} s")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plots = plot(dpo, grpo, args.out)
    record = {
        "machine": {"torch": torch.__version__, "threads": 1, "cores": os.cpu_count(), "platform": platform.platform()},
        "task": "prompt '<upper|lower> WORD >', answer ' WORD' in that case; words of 3-5 random letters",
        "quick": args.quick, "base": base, "dpo": dpo, "grpo": grpo, "plots": plots,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    write_report(args.out, record, f"and {', '.join(plots)}")
    return record


if __name__ == "__main__":
    main()
