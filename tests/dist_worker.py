"""Run under torchrun by tests/test_distributed.py: one optimizer step per strategy on a batch
whose ranks hold very different numbers of target tokens, through the real strategy code.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT.pt ddp fsdp zero1 zero2 zero3 fsdp-hybrid ...

Rank 0 saves, per strategy: the per-group gradient, parameter and update sums of squares, the
global norm and the whole model's weights after the (clipped) step.
"""

from __future__ import annotations

import sys

import torch
from helpers import build, fp32_rtol, masked_global_batch, step_once

from trainer.config import (
    Config,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainConfig,
)
from trainer.preflight import resolve_model_config

# No biases: the key projection's bias has an exactly zero true gradient (softmax ignores a
# constant added to a whole row of scores), so Adam turns its rounding noise into full-size
# steps of random sign, and weights compared after a step would differ there by design.
MODEL = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=False)
MICRO, ACCUM, WORLD = 2, 2, 2
CLIP = 0.5  # below the initial norm, so the step is clipped
# Adam's eps far above every gradient (|g| <= CLIP after clipping): the first update is
# lr * g / (|g| + eps) ~ g, linear in the gradient, so its rounding noise stays the gradient's. With
# eps = 1e-8 the update is lr * g / |g|, and rounding that moves a near-zero gradient moves its weight
# by up to 2 lr: equality after the step would then hold only by luck.
LR, EPS = 1.0, 1.0
# Each gradient entry adds (target tokens <= 8 x 16) x (the widest inner sum, 4 x n_embd = 128)
# products, through 2 matmuls per layer plus the embedding and the head in a row.
STEP_RTOL = fp32_rtol(terms=8 * 16 * 128, depth=2 * 2 + 2)  # 4.6e-5

VARIANTS = {  # name -> ParallelConfig options
    "fsdp-hybrid": {"strategy": "fsdp", "fsdp_shard_size": 1},  # 2D mesh: replicate 2 x shard 1
    "fsdp-keep": {"strategy": "fsdp", "fsdp_reshard_after_forward": False},
    "fsdp-prefetch2": {"strategy": "fsdp", "fsdp_prefetch": 2},  # explicit forward / backward prefetch
    "zero2-offload": {"strategy": "zero2", "zero_offload_optimizer": True},
    "zero3-offload": {"strategy": "zero3", "zero_offload_optimizer": True, "zero_offload_params": True},
}
LOW_PRECISION = {  # name -> (strategy, precision): checked against fp32 with a loose tolerance
    "ddp-fp16": ("ddp", "fp16"),
    "fsdp-bf16": ("fsdp", "bf16"),
    "fsdp-fp16": ("fsdp", "fp16"),
    "zero1-bf16": ("zero1", "bf16"),
    "zero3-bf16": ("zero3", "bf16"),
}


def config(strategy: str) -> Config:
    name, dtype = LOW_PRECISION.get(strategy, (strategy, "fp32"))
    return Config(
        model=MODEL,
        precision=PrecisionConfig(dtype=dtype),
        parallel=ParallelConfig(**VARIANTS.get(name, {"strategy": name})),
        optim=OptimConfig(lr=LR, eps=EPS, warmup_steps=0, schedule="constant", clip_grad_norm=CLIP),
        train=TrainConfig(micro_batch_size=MICRO, grad_accum_steps=ACCUM, seq_len=16, max_steps=1),
    )


def one_step(strategy_name: str) -> dict:
    """The step on this rank's share; with parallel=none, the whole global batch in one process."""
    cfg = config(strategy_name)
    x, y = masked_global_batch()
    strategy = build(cfg)
    seen = []  # the dtype the first linear layer computes in
    linear = next(m for m in strategy.unwrapped().modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda module, args, out: seen.append(str(out.dtype)))
    result = step_once(strategy, x, y, MICRO, CLIP)
    hook.remove()
    return {**result, "compute_dtype": seen[0]}


class HeldSplit:
    """A validation split of two fixed sequences (the sharpness instrument's held batch)."""

    def __len__(self) -> int:
        return 2

    def get_batch(self, rows):
        x, y = masked_global_batch(keep=(16, 9), seed=3)
        return x[rows], y[rows]


def diagnosed_step(name: str) -> dict:
    """'<strategy>-noise': one step with the noise scale's first-micro-batch probe on (its figures,
    and the weights after it); '<strategy>-sharpness': λmax at the initial weights, by finite differences."""
    from trainer.data import shard_for_rank
    from trainer.diagnostics.instruments import Instruments
    from trainer.step import train_step

    strategy_name, instrument = name.rsplit("-", 1)
    cfg = config(strategy_name)
    cfg.diagnostics.sharpness.enabled = instrument == "sharpness"
    cfg.diagnostics.sharpness.method, cfg.diagnostics.sharpness.batch_size = "finite_difference", 2
    strategy = build(cfg)
    if instrument == "sharpness":
        return {"lambda_max": Instruments(cfg, strategy, HeldSplit()).sharpness()}
    x, y = masked_global_batch()
    rows = torch.from_numpy(shard_for_rank(torch.arange(len(x)).numpy(), strategy.rank, strategy.world_size))
    result = train_step(strategy, x[rows], y[rows], ACCUM, CLIP, noise_probe=True)
    return {"noise": result.noise, "rows": rows[:MICRO], "weights": strategy.full_state_dict()}


def pretrained(strategy_name: str, path: str) -> dict:
    """The whole model's weights after building it from a local Hugging Face checkpoint."""
    cfg = config(strategy_name)
    cfg.model = resolve_model_config(ModelConfig(pretrained=path), tokenizer_vocab=1)
    return {"weights": build(cfg).full_state_dict()}


if __name__ == "__main__":
    out, names = sys.argv[1], sys.argv[2:]
    if names[0] == "--pretrained":  # OUT.pt --pretrained DIR STRATEGY...
        results = {name: pretrained(name, names[1]) for name in names[2:]}
    else:
        results = {
            name: diagnosed_step(name) if name.endswith(("-noise", "-sharpness")) else one_step(name) for name in names
        }
    import torch.distributed as dist

    from trainer.parallel.dist import exit_process

    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    exit_process(0)  # as `python -m trainer` ends: no interpreter teardown under gloo's live threads
