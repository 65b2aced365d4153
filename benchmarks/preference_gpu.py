"""The preference and RL recipes, measured through the real loop (run by benchmarks/preference_gpu.sh).

    python -m benchmarks.preference_gpu [--steps 3] [--cases NAME ...] [--out benchmarks/results/preference_gpu.json]
                                        [--set KEY=VALUE ...] [--tiny]

Each case is `python -m trainer experiment=<recipe>` on a random base of the recipe's shape (no checkpoint:
random weights, bf16, frozen under the adapters) with records this script writes: synthetic preference pairs
for experiment=llama3-8b-dpo-lora, synthetic prompts (with an `answer` field) for qwen3-8b-grpo-lora. The
text is tokenized as UTF-8 bytes (data.tokenizer=byte: there is no tokenizer on that machine either), so a
row of the recipe's train.seq_len holds that many bytes; the model keeps the preset's vocabulary. The
GRPO case adds a reward of its own to the recipe's (a random base never earns exact_match or format, so
every advantage would be 0): the share of odd ids in the completion, which differs within a group. A random
base never samples the end-of-text id: every completion runs to objective.max_new_tokens (the longest rollout).

Per case, the medians over the steps after the first (start-up, allocator warm-up): step time (GRPO's with
its rollout), the loop's tokens/s (every row at train.seq_len: a pair's two rows, a prompt's num_generations
rows; GRPO rows are padded only to the batch's longest, so there it is an upper bound), the target
(completion) tokens/s, the largest `memory/peak_gb` (torch.cuda.max_memory_allocated), and for GRPO
time/generation_s and time/generation_share; next to trainer.estimate's peak for the rows a micro-batch
trains (`estimate_rows`) and, for GRPO, the rollout's KV cache and logits (`rollout_bytes`). --tiny runs the
same cases on tiny shapes on the CPU (to test this script where there is no GPU); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
from pathlib import Path
from typing import Any

from benchmarks import run_trainer, write_report

GIB = 2**30
CASES = ("llama3-8b-dpo-lora", "qwen3-8b-grpo-lora")
TINY = [  # a tiny shape of the same families for a CPU run of the script itself
    "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2", "model.intermediate_size=128",
    "model.vocab_size=512", "model.loss_chunk_size=32", "precision=fp32", "train.device=cpu",
]  # fmt: skip
TINY_SHAPE = {
    "llama3-8b-dpo-lora": ["train.seq_len=64", "model.block_size=64"],
    "qwen3-8b-grpo-lora": ["train.seq_len=48", "model.block_size=48", "objective.max_new_tokens=16"],
}
KEPT = (  # the per-step figures kept in the JSON
    "step", "loss", "throughput/step_time_s", "throughput/device_step_time_s", "tokens_per_s",
    "throughput/target_tokens_per_s", "memory/peak_gb", "time/generation_s", "time/generation_share",
    "completion_length/mean", "reward/mean", "rewards/accuracies", "rewards/margins", "grad_norm", "clip_ratio",
)  # fmt: skip
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
REWARD = '''def odd_share(completion_ids, **fields):
    """The share of odd ids in each completion: differs within a group, so advantages are not all 0."""
    return [sum(i % 2 for i in ids) / max(len(ids), 1) for ids in completion_ids]
'''


# -- what the estimator is asked --------------------------------------------------------------------------
def rows_per_sequence(cfg) -> int:
    """Rows a micro-batch trains per train.micro_batch_size unit: 2 per DPO pair, num_generations per
    GRPO / RLOO prompt, 1 for sft."""
    o = cfg.objective
    return {"dpo": 2, "grpo": o.num_generations, "rloo": o.num_generations}.get(o.name, 1)


def row_overrides(cfg) -> list[str]:
    """The overrides that ask trainer.estimate (which counts rows and knows no objectives) for the rows a
    micro-batch of cfg trains: micro_batch_size and global_batch_size times rows_per_sequence."""
    k, tc = rows_per_sequence(cfg), cfg.train
    out = [f"train.micro_batch_size={tc.micro_batch_size * k}"]
    return out + ([f"train.global_batch_size={tc.global_batch_size * k}"] if tc.global_batch_size else [])


def estimate_rows(overrides: list[str]) -> dict[str, Any]:
    """trainer.estimate's dict for these overrides with the micro-batch counted in rows (row_overrides)."""
    from trainer.__main__ import compose_config
    from trainer.estimate import estimate

    cfg, _ = compose_config(overrides)
    return estimate(compose_config([*overrides, *row_overrides(cfg)])[0])


def kv_cache_bytes(m, rows: int, positions: int, dtype_bytes: int) -> int:
    """GPT.generate's KV cache (trainer.model.attention.KVCache): keys and values of (rows, n_kv_head,
    positions, head_dim) per layer, positions = min(block_size, prompt width + max_new_tokens), allocated
    whole at the first token in the compute dtype."""
    return m.n_layer * 2 * (m.n_kv_head or m.n_head) * m.attn_head_dim * positions * rows * dtype_bytes


def prompt_logits_bytes(m, rows: int, dtype_bytes: int) -> int:
    """The prompt pass's logits in the compute dtype: the last position's only (GPT.forward's
    logits_to_keep=1), (rows, 1, vocab)."""
    return rows * m.vocab_size * dtype_bytes


def rollout_bytes(cfg, est: dict[str, Any]) -> dict[str, float]:
    """The GRPO / RLOO rollout's moment, which trainer.estimate does not model: every prompt of a step on
    this rank x num_generations rows generated in one batch (trainer/objectives/grpo.py), their KV cache and
    the prompt pass's logits at the full prompt room, on top of the kept states (the base, the adapters and
    their AdamW state). Transients of one block's forward are not counted."""
    tc, o = cfg.train, cfg.objective
    a = 2 if cfg.precision.dtype in ("bf16", "fp16") else 4
    rows = tc.micro_batch_size * est["run"]["accumulation"] * o.num_generations  # one rank: parallel=none
    kv = kv_cache_bytes(cfg.model, rows, min(cfg.model.block_size, tc.seq_len), a)  # prompt room + max_new_tokens
    logits = prompt_logits_bytes(cfg.model, rows, a)
    kept = est["peak"]["kept_states"]
    return {"rows": rows, "kv_cache": kv, "prompt_logits": logits, "kept_states": kept, "total": kept + kv + logits}


# -- the records --------------------------------------------------------------------------------------------
def text(rng: random.Random, length: int) -> str:
    """Words up to `length` characters (bytes: ASCII)."""
    out = []
    while sum(map(len, out)) + len(out) < length:
        out.append(rng.choice(WORDS))
    return " ".join(out)[:length]


def write_records(case: str, directory: Path, count: int, seq_len: int, prompt_room: int) -> Path:
    """`count` synthetic records for the case, sized to fill rows of seq_len bytes: pairs whose prompt takes
    a quarter of the row and whose completions the rest (cut at the row's end: truncation keep_start), or
    prompts of at most prompt_room bytes with an answer field."""
    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        if "dpo" in case:
            prompt = text(rng, seq_len // 4)
            lines.append({"prompt": prompt, "chosen": text(rng, seq_len), "rejected": text(rng, seq_len)})
        else:
            room = max(prompt_room - 8, 4)  # a little under the room (no BOS with bytes, but be safe)
            lines.append({"prompt": text(rng, rng.randint(room // 2, room)), "answer": str(i % 10)})
    path = directory / ("pairs.jsonl" if "dpo" in case else "prompts.jsonl")
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# -- one case ----------------------------------------------------------------------------------------------
def overrides_of(case: str, steps: int, run_dir: Path, tiny: bool, extra: list[str] | None = None) -> list[str]:
    """The case's `python -m trainer` overrides, its records written into run_dir; `extra` last (--set)."""
    from trainer.__main__ import compose_config

    shape = [*TINY, *TINY_SHAPE[case]] if tiny else []
    shape += extra or []
    cfg, _ = compose_config([f"experiment={case}", "data.path=x", *shape])
    tc, o = cfg.train, cfg.objective
    per_step = tc.global_batch_size or tc.micro_batch_size * tc.grad_accum_steps
    prompt_room = tc.seq_len - (o.max_new_tokens if o.name in ("grpo", "rloo") else 0)
    path = write_records(case, run_dir, per_step * (steps + 1) + 16, tc.seq_len, prompt_room)
    rewards = []
    if o.name in ("grpo", "rloo"):
        (run_dir / "odd_share.py").write_text(REWARD)
        specs = [*o.rewards, f"{run_dir / 'odd_share.py'}:odd_share"]
        rewards.append("objective.rewards=[" + ",".join(f"'{s}'" for s in specs) + "]")
    return [
        f"experiment={case}", f"data.path={path}", "data.tokenizer=byte", "data.val_fraction=0.05",
        f"data.cache_dir={run_dir / 'cache'}", "logger.wandb=false", "logger.progress_bar=false",
        f"train.max_steps={steps}", "train.log_interval=1", "train.eval_interval=100000", "train.eval_batches=1",
        "checkpoint.interval=0", f"hydra.run.dir={run_dir}", *rewards, *shape,
    ]  # fmt: skip


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def run_case(case: str, steps: int, root: Path, tiny: bool, extra: list[str] | None = None) -> dict[str, Any]:
    from trainer.__main__ import compose_config

    run_dir = root / case
    overrides = overrides_of(case, steps, run_dir, tiny, extra)
    composed = [o for o in overrides if not o.startswith("hydra.")]
    cfg, _ = compose_config(composed)
    est = estimate_rows(composed)
    record: dict[str, Any] = {"case": case, "objective": cfg.objective.name, "overrides": overrides}
    record["estimate_gib"] = est["peak"]["bytes"] / GIB
    if cfg.objective.name in ("grpo", "rloo"):
        record["rollout_estimate_gib"] = rollout_bytes(cfg, est)["total"] / GIB
    ran, rows = run_trainer(overrides, run_dir)
    record |= ran
    if "error" in ran:
        return record
    timed = [r for r in rows if r["step"] > 1] or rows  # the first step: start-up and allocator warm-up
    peaks = [r["memory/peak_gb"] for r in rows if r.get("memory/peak_gb")]  # GPU: max_memory_allocated
    record |= {
        "steps": len(rows), "rows_per_micro_batch": cfg.train.micro_batch_size * rows_per_sequence(cfg),
        "step_s": median(timed, "throughput/step_time_s"), "tokens_per_s": median(timed, "tokens_per_s"),
        "target_tokens_per_s": median(timed, "throughput/target_tokens_per_s"),
        "peak_gib": max(peaks) * 1e9 / GIB if peaks else None, "final_loss": rows[-1]["loss"],
        "generation_s": median(timed, "time/generation_s"), "generation_share": median(timed, "time/generation_share"),
        "completion_length": median(timed, "completion_length/mean"),
        "per_step": [{key: r.get(key) for key in KEPT if key in r} for r in rows],
    }  # fmt: skip
    return record


def gpu_name() -> str:
    """The GPU's name from nvidia-smi (this process creates no CUDA context: the runs get the whole card)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the recipes' 8B shapes need one (--tiny runs tiny shapes on the CPU)")
    try:
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "cuda (nvidia-smi gave no name)"


def _cell(value: float | None, spec: str, width: int) -> str:
    return format(value, spec).rjust(width) if value is not None else "-".rjust(width)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="default: both")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/preference_gpu.json"))
    parser.add_argument("--runs", type=Path, default=Path("benchmarks/results/preference_gpu_runs"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: tests the script only")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every case, last")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else gpu_name()
    results = [run_case(case, args.steps, args.runs, args.tiny, args.set) for case in args.cases]
    heads = ("step s", "tokens/s", "target/s", "peak GiB", "estimate", "gen share")
    print(f"{'case':20} " + " ".join(f"{h:>9}" for h in heads))
    for r in results:
        if "error" in r:
            print(f"{r['case']:20} error: {r['error']}")
            continue
        estimate = max(r["estimate_gib"], r.get("rollout_estimate_gib") or 0)
        print(f"{r['case']:20} {_cell(r['step_s'], '.2f', 9)} {_cell(r['tokens_per_s'], '.0f', 9)} "
              f"{_cell(r['target_tokens_per_s'], '.0f', 9)} {_cell(r['peak_gib'], '.2f', 9)} {estimate:9.2f} "
              f"{_cell(r['generation_share'], '.2f', 9)}")  # fmt: skip
    record = {"tiny": args.tiny, "steps": args.steps, "set": args.set, "device": device, "cases": results}
    write_report(args.out, record)
    return results


if __name__ == "__main__":
    main()
