"""The harness's strategy and model, built as trainer.run's build_run builds them, for the
benchmarks that train (checkpoint, memory) without data: they step on random tokens."""

from __future__ import annotations

import torch

from trainer.config import Config
from trainer.model.build import build_model
from trainer.parallel import Strategy, build_strategy, parallelize
from trainer.parallel.dist import env_world_size
from trainer.preflight import check_run, resolve_model_config


def build_trainer(cfg: Config, seed: int = 0) -> tuple[Strategy, int]:
    """(the strategy holding the parallelized model and its optimizer, the parameter count).

    cfg.model.vocab_size must be set (there is no tokenizer to take it from). The order is the
    loop's: check the config, start the process group, build on the meta device, parallelize
    (activation checkpointing, then shard / wrap, materialise, optimizer). The count is taken on
    the meta model, before any strategy partitions it; a tied weight counts once.
    """
    if cfg.model.vocab_size is None:
        raise ValueError("benchmarks build no tokenizer: set model.vocab_size")
    has_gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
    check_run(cfg, env_world_size(), has_gpu=has_gpu)
    strategy = build_strategy(cfg)
    model_cfg = resolve_model_config(cfg.model, cfg.model.vocab_size)
    model, weights = build_model(model_cfg, seed, cfg.quant)  # on the meta device: no memory yet
    n_params = sum(p.numel() for p in model.parameters())
    parallelize(model, weights, cfg, strategy)
    torch.manual_seed(seed)  # as the loop does: what follows starts from the seed
    return strategy, n_params
