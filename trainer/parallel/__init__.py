"""Distribution strategies: the only package that knows ranks and shards.

| parallel= | what each rank holds                       | gradient sync at the boundary       |
|-----------|--------------------------------------------|-------------------------------------|
| none      | everything (one process)                   | -                                   |
| ddp       | whole model, gradients, optimizer state    | all-reduce                          |
| fsdp      | a shard of parameters, grads, optim state  | reduce-scatter (FSDP2 fully_shard)  |
| zero1     | whole model and grads, optim state shard   | DeepSpeed ZeRO-1                    |
| zero2     | whole model, grad and optim state shards   | DeepSpeed ZeRO-2 (reduce-scatter)   |
| zero3     | shards of all three                        | DeepSpeed ZeRO-3                    |

Mixture-of-experts models run under every strategy (FSDP2 shards an (E, ., .) expert tensor on dim
0, the experts; ZeRO partitions it flat like any other). Expert parallelism, `parallel.expert=N`
(each rank of N holds 1/N of the experts, tokens exchanged by all-to-all: trainer/parallel/expert.py),
runs with ddp.

`build_strategy(cfg)` starts the process group and returns the strategy; `parallelize` then
turns a model built on the meta device into the one this rank trains, in one documented order.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import Config, ConfigError
from trainer.model.checkpointing import apply_activation_checkpointing
from trainer.model.compile import apply_compile
from trainer.parallel.base import SingleDevice, Strategy, WeightSource, global_norm
from trainer.parallel.dist import env_local_rank, env_rank, env_world_size, init_distributed

__all__ = [
    "SingleDevice", "Strategy", "WeightSource", "build_strategy", "global_norm", "parallelize", "pick_device",
    "strategy_class",
]  # fmt: skip


def strategy_class(name: str) -> type[Strategy]:
    """The class behind `parallel.strategy=name`, for its declared capabilities (`can_skip_step`),
    without building it. Imports no distributed framework."""
    if name == "none":
        return SingleDevice
    if name == "ddp":
        from trainer.parallel.ddp import DDP

        return DDP
    if name == "fsdp":
        from trainer.parallel.fsdp import FSDP

        return FSDP
    from trainer.parallel.zero import DeepSpeedZero

    return DeepSpeedZero


def pick_device(requested: str) -> torch.device:
    """`auto` takes this rank's GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    if requested == "cuda":
        return torch.device("cuda", env_local_rank())
    return torch.device(requested)


def build_strategy(cfg: Config) -> Strategy:
    """The strategy `parallel.strategy` names, bound to this process's rank and device (the
    config has passed config.check_run)."""
    world_size = env_world_size()
    started = init_distributed(
        cfg.parallel.timeout_s, single=cfg.parallel.strategy != "none" or cfg.parallel.tensor > 1
    )
    device = pick_device(cfg.train.device)
    rank = env_rank()
    cls = strategy_class(cfg.parallel.strategy)
    if cfg.parallel.strategy == "none" and cfg.parallel.tensor > 1:  # tensor parallelism alone
        from trainer.parallel.fsdp import TensorParallel

        strategy = TensorParallel(device, rank, world_size, cfg.parallel, cfg.precision)
    elif cfg.parallel.strategy == "none":
        strategy = cls(device, precision=cfg.precision)
    elif cfg.parallel.strategy == "fsdp":
        strategy = cls(device, rank, world_size, cfg.parallel, cfg.precision)
    elif cfg.parallel.strategy == "ddp":
        strategy = cls(device, rank, world_size, cfg.precision, expert=cfg.parallel.expert)
    else:
        strategy = cls(device, rank, world_size, cfg)
    strategy.owns_group = started
    return strategy


def parallelize(model: nn.Module, weights: WeightSource, cfg: Config, strategy: Strategy) -> int:
    """Make a model built on the meta device the one this rank trains, in torchtitan's order:

    0. tensor + sequence parallelism splits every layer over the mesh's tensor dimension
       (parallel.tensor; trainer/parallel/tensor.py), on the meta device;
    1. activation checkpointing wraps the selected blocks (before sharding: FSDP2's units and
       DeepSpeed's hooks then see the wrapped modules, and recompute stays inside each unit);
    2. torch.compile, per block and the head + loss, with train.compile (trainer/model/compile.py);
    3. the strategy shards or wraps the model, gives it storage on this rank, fills it from
       `weights` (a random init or a pretrained checkpoint, one full tensor at a time) and
       builds the optimizer and its schedule.
    Returns how many modules activation checkpointing wrapped.
    """
    if cfg.parallel.tensor > 1:
        strategy.apply_tensor_parallel(model)
    wrapped = apply_activation_checkpointing(model, model.cfg)  # the resolved config (pretrained: its own)
    if cfg.train.compile:
        apply_compile(model, inside_checkpoints=cfg.parallel.tensor > 1)
    strategy.setup(model, weights, cfg.optim, cfg.train.max_steps)
    return wrapped
