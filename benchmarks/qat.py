"""Quantisation-aware training against post-training quantisation on a toy task (exercise 8d-e).

    python -m benchmarks.qat                              # tiny GPT, 50 steps per run, ~1 minute on 2 CPU cores
    python -m benchmarks.qat --steps 200 --group-size 128 # longer runs; coarser int4 groups
    python -m benchmarks.qat --out /tmp/qat.json          # default: benchmarks/results/qat.json
    python -m benchmarks.qat --smoke                      # 2 layers on the synthetic chain, 3 steps (the test)

The model is configs/model/tiny (4 layers, n_embd 128: 0.79M parameters in its block linears) on
the default data, the Python standard library's source as bytes (data=stdlib: next-byte prediction
needs context, so the blocks matter; on the first-order Markov chain of data=synthetic the
embedding and the head alone carry the bigram, and quantising the blocks barely matters). Seq 64,
16 sequences per step, AdamW at lr 1e-3 (warmup 5, cosine; at 3e-3 float runs spiked too), one torch thread (--threads). Four
runs of --steps steps on the same batches, each built by the harness (benchmarks.harness
.build_trainer: build_model with cfg.quant, then parallelize) and stepped by trainer.step.train_step:

  float       quant.qat=null. Evaluated as trained (float), then post-training quantised (PTQ):
              the same weights through the fake-quantised forward of every block linear, i.e.
              torchao's quantise-dequantise of each weight (trainer.quant)
  float seed  the same with another init seed: how far two float runs land apart (run-to-run noise)
  qat int8    quant.qat=int8 (one scale per output channel) from the float run's init; evaluated
              quantised (as it trained) and with its float weights
  qat int4    quant.qat=int4 (one scale per --group-size input columns), likewise

Figures: validation loss (mean token loss over the first 8 batches of 16 validation sequences).
PTQ - float and QAT - its float weights are the quantisation's own cost to each model (same
weights, two forwards); QAT - float compares two training runs and so includes run-to-run noise
(compare float seed - float). Weight error: ||W - Q(W)||_F / ||W||_F over all block linears'
weights together (the float run's for PTQ, the QAT run's own for QAT). The embedding and the
tied head stay in float throughout. Prints a markdown table and writes JSON:
{"machine", "shape", "steps", "seconds", "results"}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import write_report

RUN = ["model=tiny", "train.seq_len=64", "train.micro_batch_size=16", "optim.lr=1e-3", "optim.warmup_steps=5",
       "train.eval_batches=8"]  # fmt: skip
SMOKE = ["data=synthetic", "data.synthetic_tokens=20000", "model.n_layer=2", "model.n_embd=64", "train.seq_len=32"]
BITS = ("int8", "int4")


def configs(steps: int, group_size: int, smoke: bool, cache_dir: str | None) -> tuple[Any, Any]:
    """(the float run's Config, its data), composed as the command line's would be; the model's
    vocabulary is the data's tokenizer's (the harness builds no tokenizer)."""
    from trainer.__main__ import compose_config
    from trainer.data import build_data

    overrides = [*RUN, *(SMOKE if smoke else []), f"train.max_steps={steps}"]
    cfg = compose_config([*overrides, *([f"data.cache_dir={cache_dir}"] if cache_dir else [])])[0]
    data = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed)
    model = dataclasses.replace(cfg.model, vocab_size=data.tokenizer.vocab_size)
    return dataclasses.replace(cfg, model=model, quant=dataclasses.replace(cfg.quant, group_size=group_size)), data


def variant(cfg: Any, qat: str | None = None, seed: int | None = None) -> Any:
    """cfg with quant.qat (group_size kept for int4 only) and the init seed changed."""
    quant = dataclasses.replace(cfg.quant, qat=qat, group_size=cfg.quant.group_size if qat == "int4" else 32)
    return dataclasses.replace(
        cfg, quant=quant, train=dataclasses.replace(cfg.train, seed=cfg.train.seed if seed is None else seed)
    )


def train(cfg: Any, data: Any, batch_seed: int) -> torch.nn.Module:
    """The model after cfg.train.max_steps steps through train_step, on the batches of batch_seed."""
    from benchmarks.harness import build_trainer
    from trainer.quant import QATLinear
    from trainer.step import train_step

    strategy, _ = build_trainer(cfg, seed=cfg.train.seed)
    model = strategy.unwrapped()
    if cfg.quant.qat and not any(isinstance(m, QATLinear) for m in model.modules()):
        raise SystemExit("benchmarks.harness.build_trainer built no QAT linears: it must pass cfg.quant to build_model")
    sampler = data.train.sampler(batch_seed)  # the same batches in every run
    for _ in range(cfg.train.max_steps):
        x, y = data.train.get_batch(sampler.next_global_batch(cfg.train.micro_batch_size))
        train_step(strategy, x, y, 1, cfg.optim.clip_grad_norm)
    return model


def val_loss(model: torch.nn.Module, cfg: Any, data: Any) -> float:
    """Mean token loss over the first train.eval_batches validation batches (trainer.step.evaluate)."""
    from trainer.step import evaluate

    device = next(model.parameters()).device
    return evaluate(model, data.val, cfg.train.micro_batch_size, cfg.train.eval_batches, device)


def ptq(model: torch.nn.Module, qat: str, group_size: int) -> torch.nn.Module:
    """A copy of model whose block linears compute with their weights quantised and dequantised."""
    from trainer.config.schema import QuantConfig
    from trainer.quant import add_fake_quantization

    quantized = copy.deepcopy(model)
    add_fake_quantization(quantized, QuantConfig(qat=qat, group_size=group_size))
    return quantized


def in_float(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a QAT model whose block linears compute with their float weights."""
    from trainer.quant import remove_fake_quantization

    plain = copy.deepcopy(model)
    remove_fake_quantization(plain)
    return plain


def measure(cfg: Any, data: Any) -> dict[str, Any]:
    """The four runs and their figures (see the module docstring)."""
    from trainer.quant import quantization_error

    batches, group = cfg.train.seed, cfg.quant.group_size
    float_model = train(variant(cfg), data, batches)
    float_loss = val_loss(float_model, cfg, data)
    other_seed = val_loss(train(variant(cfg, seed=cfg.train.seed + 1), data, batches), cfg, data)
    results: dict[str, Any] = {"float": {"val_loss": float_loss, "val_loss_other_seed": other_seed}}
    for bits in BITS:
        group_size = group if bits == "int4" else None
        qat_model = train(variant(cfg, bits), data, batches)
        results[bits] = {
            "group_size": group_size,
            "float_loss": float_loss,
            "ptq_loss": val_loss(ptq(float_model, bits, group), cfg, data),
            "qat_loss": val_loss(qat_model, cfg, data),
            "qat_float_loss": val_loss(in_float(qat_model), cfg, data),
            "ptq_weight_error": quantization_error(float_model, bits, group),
            "qat_weight_error": quantization_error(qat_model, bits, group),
        }
    return results


def table(results: dict[str, Any]) -> str:
    """The markdown table of measure's results."""
    lines = [
        "| weights | float | PTQ | PTQ - float | QAT | QAT - its float weights | QAT - float "
        "| weight error PTQ | weight error QAT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for bits in BITS:
        r = results[bits]
        name = f"{bits} (groups of {r['group_size']})" if r["group_size"] else f"{bits} (per channel)"
        lines.append(
            f"| {name} | {r['float_loss']:.4f} | {r['ptq_loss']:.4f} | {r['ptq_loss'] - r['float_loss']:+.4f} | "
            f"{r['qat_loss']:.4f} | {r['qat_loss'] - r['qat_float_loss']:+.4f} | "
            f"{r['qat_loss'] - r['float_loss']:+.4f} | {r['ptq_weight_error']:.4f} | {r['qat_weight_error']:.4f} |"
        )
    noise = results["float"]["val_loss_other_seed"] - results["float"]["val_loss"]
    lines.append(f"\nrun-to-run noise: a float run from another init seed lands {noise:+.4f} from the float run")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 50; smoke 3)")
    parser.add_argument("--group-size", type=int, default=32, help="int4: input columns per scale")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: repeatable figures)")
    parser.add_argument("--smoke", action="store_true", help="2 layers on the synthetic chain, 3 steps (tests)")
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/qat.json"))
    args = parser.parse_args(argv)
    from benchmarks.throughput import machine

    torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.smoke else 50)
    cfg, data = configs(steps, args.group_size, args.smoke, args.cache_dir)
    start = time.perf_counter()
    results = measure(cfg, data)
    m = cfg.model
    shape = {
        "model": m.name, "n_layer": m.n_layer, "n_embd": m.n_embd, "vocab": m.vocab_size, "data": cfg.data.source,
        "seq_len": cfg.train.seq_len, "micro_batch": cfg.train.micro_batch_size, "lr": cfg.optim.lr,
    }  # fmt: skip
    report = {"machine": machine(torch.device("cpu")), "shape": shape, "steps": steps,
              "seconds": time.perf_counter() - start, "results": results}  # fmt: skip
    print(f"{steps} steps per run on {cfg.data.source}; validation loss in nats/token; "
          f"weight error ||W - Q(W)|| / ||W|| over the block linears")  # fmt: skip
    print(table(results))
    write_report(args.out, report, f"({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
