"""In-loop downstream evaluation of an 8B model on one GPU (run by benchmarks/evaluation_gpu.sh).

    python -m benchmarks.evaluation_gpu [--steps 2] [--out benchmarks/results/evaluation_gpu.json]
                                        [--set KEY=VALUE ...] [--tiny]

`python -m trainer experiment=llama3-8b-lora` on a random base of Llama-3-8B's shape (no checkpoint on that
machine: random weights, frozen in bf16 under rank-16 adapters) with text this script writes, tokenized as
UTF-8 bytes (data.tokenizer=byte: no tokenizer there either; lm_eval gets the byte tokenizer as a
transformers one), for --steps steps, evaluating at every step: eval.tasks=[tiny_mc,tiny_gen,tiny_rolling]
(the shipped lm_eval tasks: 20 multiple-choice items, 15 generations to a stop string, 10 paragraphs'
rolling log-likelihood) and eval.files (a held-out text this script writes), batch eval.batch_size.
Printed: per evaluation its time (eval/time_s; the first one holds CUDA's warm-up), the training step's
time, tokens/s and peak memory; the figures (a random base scores chance). --tiny runs it on tiny shapes
on the CPU (to test this script where there is no GPU); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from benchmarks import run_trainer, write_report

CASE = "llama3-8b-lora"
TASKS = "eval.tasks=[tiny_mc,tiny_gen,tiny_rolling]"
TINY = [  # a tiny Llama for a CPU run of the script itself
    "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2", "model.intermediate_size=128",
    "model.vocab_size=512", "model.loss_chunk_size=32", "precision=fp32", "train.device=cpu",
    "train.seq_len=64", "model.block_size=64", "lora.base_dtype=fp32",
]  # fmt: skip
WORDS = "the of and to in is was for on that with as by at from his her an which were are be this".split()


def write_text(path: Path, n_bytes: int, seed: int) -> Path:
    rng = random.Random(seed)
    words, size = [], 0
    while size < n_bytes:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    path.write_text(" ".join(words) + "\n")
    return path


def overrides_of(steps: int, run_dir: Path, tiny: bool, batch: int, extra: list[str]) -> list[str]:
    from trainer.__main__ import compose_config

    shape = [*(TINY if tiny else []), *extra]
    cfg, _ = compose_config([f"experiment={CASE}", *shape])
    tc = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    train = write_text(run_dir / "train.txt", tc.seq_len * tc.micro_batch_size * (steps + 2) * 24, 0)
    held_out = write_text(run_dir / "held_out.txt", tc.seq_len * 4, 1)
    return [
        f"experiment={CASE}", "data=files", f"data.path={train}", "data.tokenizer=byte", "data.val_fraction=0.05",
        f"data.cache_dir={run_dir / 'cache'}", "logger.wandb=false", "logger.progress_bar=false",
        f"train.max_steps={steps}", "train.log_interval=1", "train.eval_interval=1", "train.eval_batches=1",
        "checkpoint.interval=0", TASKS, f"eval.files=[{held_out}]", f"eval.batch_size={batch}",
        f"hydra.run.dir={run_dir}", *shape,
    ]  # fmt: skip


def run(steps: int, root: Path, tiny: bool, batch: int, extra: list[str]) -> dict[str, Any]:
    run_dir = root / CASE
    overrides = overrides_of(steps, run_dir, tiny, batch, extra)
    record: dict[str, Any] = {"case": CASE, "overrides": overrides}
    ran, rows = run_trainer(overrides, run_dir)
    record |= ran
    if "error" in ran:
        return record
    keep = ("step", "loss", "throughput/step_time_s", "tokens_per_s", "memory/peak_gb")
    record["steps"] = [
        {k: r[k] for k in r if k in keep or k.startswith("eval/")} for r in rows if "eval/time_s" in r
    ]  # fmt: skip
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="eval.batch_size")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluation_gpu.json"))
    parser.add_argument("--runs", type=Path, default=Path("benchmarks/results/evaluation_gpu_runs"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: tests the script only")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides, last")
    args = parser.parse_args(argv)
    if not args.tiny:
        from benchmarks.preference_gpu import gpu_name

        device = gpu_name()
    else:
        device = "cpu"
    result = run(args.steps, args.runs, args.tiny, args.batch_size, args.set)
    print(f"{CASE} on {device}, in-loop evaluation at every step (eval.batch_size={args.batch_size})")
    if "error" in result:
        print(f"error: {result['error']}")
    else:
        print(f"{'step':>4} {'eval s':>8} {'step s':>8} {'tokens/s':>9} {'peak GB':>8}  figures")
        for r in result["steps"]:
            figures = {k[5:]: round(v, 4) for k, v in r.items()
                       if k.startswith("eval/") and "_stderr" not in k and k != "eval/time_s"}  # fmt: skip
            print(f"{r['step']:>4} {r['eval/time_s']:8.2f} {r.get('throughput/step_time_s', 0):8.2f} "
                  f"{r.get('tokens_per_s', 0):9.0f} {r.get('memory/peak_gb', 0):8.2f}  {figures}")  # fmt: skip
    record = {"tiny": args.tiny, "device": device, "batch_size": args.batch_size, **result}
    write_report(args.out, record)
    return record


if __name__ == "__main__":
    main()
