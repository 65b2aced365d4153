"""Distribution strategies: the only package that knows ranks and shards."""

from __future__ import annotations

import torch

from trainer.config import Config
from trainer.parallel.base import SingleProcess, global_norm

__all__ = ["SingleProcess", "build_strategy", "global_norm", "pick_device"]


def pick_device(requested: str) -> torch.device:
    """`auto` takes the GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        from trainer.config import ConfigError

        raise ConfigError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    return torch.device(requested)


def build_strategy(cfg: Config) -> SingleProcess:
    """The strategy `parallel.strategy` names, bound to this process's device."""
    device = pick_device(cfg.train.device)
    if cfg.parallel.strategy == "none":
        return SingleProcess(device)
    raise NotImplementedError(cfg.parallel.strategy)  # config validation lists what exists
