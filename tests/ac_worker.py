"""Run under torchrun by tests/test_activation_checkpointing.py: one clipped optimizer step per
(strategy, checkpointing mode), through the real strategy code, with dropout on.

    torchrun --nproc_per_node 2 tests/ac_worker.py OUT.pt ddp fsdp zero1 zero2 zero3

For each strategy named, the step runs once without checkpointing and once per mode in
MODES[strategy]. Rank 0 saves, per "strategy/mode": the per-group gradient sums of squares, the
global norm, the weights after the step, how many modules were wrapped and how many times each
block's attention and MLP ran (2 micro-batches: 2 without recompute, 4 with it).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from helpers import build, step_once

from trainer.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from trainer.model.checkpointing import CheckpointWrapper

MODEL = ModelConfig(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=32, dropout=0.1)
MICRO, ACCUM = 2, 2
CLIP = 0.5
# mode name -> (activation_checkpointing, activation_checkpointing_every)
SETTINGS = {
    "none": ("none", 1),
    "full": ("full", 1),
    "full2": ("full", 2),
    "attention": ("attention", 1),
    "mlp": ("mlp", 1),
}
MODES = {  # every strategy against itself without checkpointing; whole blocks and selective
    "ddp": ["full"],
    "fsdp": ["full2", "attention"],  # every 2nd block: wrapped and plain FSDP units side by side
    "zero1": ["full"],
    "zero2": ["full"],
    "zero3": ["full2", "mlp"],
}


def config(strategy: str, mode: str) -> Config:
    kind, every = SETTINGS[mode]
    model = dataclasses.replace(MODEL, activation_checkpointing=kind, activation_checkpointing_every=every)
    return Config(
        model=model,
        parallel=ParallelConfig(strategy=strategy),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", clip_grad_norm=CLIP),
        train=TrainConfig(micro_batch_size=MICRO, grad_accum_steps=ACCUM, seq_len=16, max_steps=1),
    )


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (8, 16), generator=g), torch.randint(0, 64, (8, 16), generator=g)


def one_step(strategy_name: str, mode: str) -> dict:
    forwards = {f"{i}.{part}": 0 for i in range(MODEL.n_layer) for part in ("attn", "mlp")}

    def count_forwards(model: torch.nn.Module) -> None:
        # Pre-hooks, registered before wrapping, count forwards and recomputes alike (a recompute
        # stops early, once it has rebuilt the last saved tensor, so post-hooks would miss it).
        for name in forwards:
            i, part = name.split(".")
            model.blocks[int(i)].get_submodule(part).register_forward_pre_hook(
                lambda *_, name=name: forwards.__setitem__(name, forwards[name] + 1)
            )

    strategy = build(config(strategy_name, mode), before_parallelize=count_forwards)
    wrapped = sum(isinstance(m, CheckpointWrapper) for m in strategy.unwrapped().modules())
    torch.manual_seed(1 + strategy.rank)  # dropout masks: per rank, the same with and without recompute
    x, y = global_batch()
    result = step_once(strategy, x, y, MICRO, CLIP, stats=False)
    return {**result, "wrapped": wrapped, "forwards": forwards}


if __name__ == "__main__":
    out, names = sys.argv[1], sys.argv[2:]
    results = {f"{s}/{m}": one_step(s, m) for s in names for m in ["none", *MODES[s]]}
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
