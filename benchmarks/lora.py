"""LoRA against full fine-tuning of one small pretrained model on a toy task (the seed's exercise 7e).

    python -m benchmarks.lora [--steps 200] [--out benchmarks/results/lora.json]

1. Pretrain a small Llama-layout GPT on a synthetic Markov chain (train.seed 1) and export it as a
   Hugging Face checkpoint: the "pretrained" base.
2. Fine-tune it on another chain (train.seed 2: other transition rows, a known entropy floor) for
   --steps steps, once in full and once with LoRA (r 8 on all seven projections), same data, same
   batches, each at its usual learning rate (full 1e-3, LoRA 1e-2).
Printed and written: trainable parameters, the loss every 25 steps, the final validation loss
against the chain's entropy rate, the process's peak resident memory and the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import write_report

SHAPE = [
    "model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.n_kv_head=2", "model.intermediate_size=352",
    "model.norm=rmsnorm", "model.mlp=swiglu", "model.position=rope", "model.bias=false", "model.tie_embeddings=false",
]  # fmt: skip
COMMON = ["experiment=synthetic", "logger.wandb=false", "logger.progress_bar=false", "train.log_interval=5",
          "train.micro_batch_size=16", "train.seq_len=64", "data.synthetic_tokens=400000"]  # fmt: skip
CASES = {
    "full": ["optim.lr=1e-3"],
    "lora": ["lora=default", "lora.r=8", "lora.alpha=16", "optim.lr=1e-2", "lora.base_dtype=fp32"],
}


def trainer(*overrides: str) -> None:
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "trainer", *overrides], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"python -m trainer {' '.join(overrides)} failed: {done.stderr.strip().splitlines()[-1]}")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lora.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    trainer(*COMMON, *SHAPE, "train.seed=1", "train.max_steps=300", "optim.lr=3e-3", f"hydra.run.dir={work / 'base'}")
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run([sys.executable, "-m", "trainer.export", str(work / "base"), "--out", str(work / "hf")], check=True,
                   capture_output=True, env=env)  # fmt: skip
    import re

    results = {}
    for name, extra in CASES.items():
        run_dir = work / name
        trainer(*COMMON, "train.seed=2", f"train.max_steps={args.steps}", f"model.pretrained={work / 'hf'}",
                "train.eval_interval=50", f"hydra.run.dir={run_dir}", *extra)  # fmt: skip
        logged = rows(run_dir)
        log = (run_dir / "logs" / "rank0.log").read_text()
        trainable = re.search(r"([0-9,]+) trainable of", log)
        results[name] = {
            "trainable_params": int(trainable.group(1).replace(",", "")) if trainable else None,
            "loss": {r["step"]: r["loss"] for r in logged if r["step"] % 25 == 0},
            "val_loss": logged[-1]["val_loss"],
            "peak_rss_gb": max(r["memory/peak_gb"] for r in logged),
            "step_time_s": statistics.median(r["throughput/step_time_s"] for r in logged[1:]),
        }
    import torch

    from trainer.model import GPT, load_hf_config

    with torch.device("meta"):
        results["full"]["trainable_params"] = GPT(load_hf_config(work / "hf")).num_params()
    floor = float(re.search(r"entropy rate ([0-9.]+)", (work / "full" / "logs" / "rank0.log").read_text()).group(1))
    print(f"entropy rate of the fine-tuning chain (the loss floor): {floor:.4f} nats")
    print(f"{'':10} {'trainable':>12} {'val loss':>9} {'peak RSS GB':>12} {'step s':>8}   loss every 25 steps")
    for name, r in results.items():
        curve = " ".join(f"{v:.3f}" for v in r["loss"].values())
        print(f"{name:10} {str(r['trainable_params']):>12} {r['val_loss']:9.4f} {r['peak_rss_gb']:12.3f} "
              f"{r['step_time_s']:8.4f}   {curve}")  # fmt: skip
    write_report(args.out, {"steps": args.steps, "entropy_rate": floor, "cases": results})


if __name__ == "__main__":
    main()
