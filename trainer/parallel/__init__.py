"""Distribution strategies: the only package that knows ranks and shards.

| parallel= | what each rank holds                       | gradient sync at the boundary       |
|-----------|--------------------------------------------|-------------------------------------|
| none      | everything (one process)                   | -                                   |
| ddp       | whole model, gradients, optimizer state    | all-reduce                          |
| fsdp      | a shard of parameters, grads, optim state  | reduce-scatter (FSDP2 fully_shard)  |
| zero1     | whole model and grads, optim state shard   | DeepSpeed ZeRO-1                    |
| zero2     | whole model, grad and optim state shards   | DeepSpeed ZeRO-2 (reduce-scatter)   |
| zero3     | shards of all three                        | DeepSpeed ZeRO-3                    |
"""

from __future__ import annotations

import importlib.util

import torch

from trainer.config import Config, ConfigError
from trainer.parallel.base import SingleProcess, global_norm
from trainer.parallel.dist import env_local_rank, env_rank, env_world_size, init_distributed

__all__ = ["SingleProcess", "build_strategy", "check_launch", "global_norm", "pick_device"]


def pick_device(requested: str) -> torch.device:
    """`auto` takes this rank's GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    if requested == "cuda":
        return torch.device("cuda", env_local_rank())
    return torch.device(requested)


def check_launch(cfg: Config, world_size: int) -> None:
    """What the strategy needs from the launch, checked before any rank builds anything."""
    strategy = cfg.parallel.strategy
    if strategy == "none" and world_size > 1:
        raise ConfigError(
            f"parallel=none with {world_size} processes would train {world_size} independent copies: "
            "choose parallel=ddp, fsdp, zero1, zero2 or zero3"
        )
    if strategy.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"parallel={strategy} needs DeepSpeed: pip install deepspeed (or choose parallel=fsdp)")
    cfg.train.accumulation_steps(world_size)  # raises when the global batch cannot be split
    if cfg.checkpoint.async_save and strategy.startswith("zero"):
        raise ConfigError(
            "checkpoint.async_save=true is for none / ddp / fsdp (torch.distributed.checkpoint); for zero1-3 "
            "use DeepSpeed's own checkpoint engine through parallel.deepspeed_config"
        )
    if strategy.startswith("zero"):
        from trainer.parallel.zero import check_deepspeed_precision, merged_deepspeed_config

        check_deepspeed_precision(cfg, has_gpu=torch.cuda.is_available() and cfg.train.device != "cpu")
        merged_deepspeed_config(cfg, world_size)  # raises on a contradicting DeepSpeed JSON


def build_strategy(cfg: Config) -> SingleProcess:
    """The strategy `parallel.strategy` names, bound to this process's rank and device."""
    world_size = env_world_size()
    check_launch(cfg, world_size)
    init_distributed(cfg.parallel.timeout_s, single=cfg.parallel.strategy != "none")
    device = pick_device(cfg.train.device)
    rank = env_rank()
    strategy = cfg.parallel.strategy
    if strategy == "none":
        return SingleProcess(device, precision=cfg.precision)
    if strategy == "ddp":
        from trainer.parallel.ddp import DDP

        return DDP(device, rank, world_size, cfg.precision)
    if strategy == "fsdp":
        from trainer.parallel.fsdp import FSDP

        return FSDP(device, rank, world_size, cfg.parallel, cfg.precision)
    from trainer.parallel.zero import DeepSpeedZero

    return DeepSpeedZero(device, rank, world_size, cfg)
