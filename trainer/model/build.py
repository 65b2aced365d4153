"""Build a model without memory: GPT on the meta device, and where its initial values come from."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from trainer.config import ModelConfig
from trainer.config.schema import QuantConfig
from trainer.model.gpt import GPT
from trainer.model.hf_import import pretrained_weights

# A model's initial values as (parameter name, full tensor) pairs, one at a time, for a device.
WeightSource = Callable[[torch.device], Iterable[tuple[str, torch.Tensor]]]


def build_model(cfg: ModelConfig, seed: int, quant: QuantConfig | None = None) -> tuple[GPT, WeightSource]:
    """GPT(cfg) on the meta device (no storage, no init), and its weight source: a function of
    the device that yields (name, full tensor) pairs one at a time, from the pretrained
    checkpoint cfg.pretrained names, or a random init drawn from `seed` (the same on every rank).
    A strategy materialises the model from it (trainer.parallel.parallelize).
    With quant.qat set, the block linears fake-quantise their weights (trainer.quant; names unchanged)."""
    with torch.device("meta"):
        model = GPT(cfg)
    if quant is not None and quant.qat:  # before LoRA (refused with QAT), checkpointing, compile, sharding
        from trainer.quant import add_fake_quantization  # imported here: it imports torchao on first use

        add_fake_quantization(model, quant)
    if cfg.pretrained:
        # lazy: each tensor read when the strategy places it, a shard reading only its rows
        return model, lambda device: pretrained_weights(cfg.pretrained, cfg, lazy=True)
    # lazy: each rank draws only the rows it holds (InitTensor), a shard its own
    return model, lambda device: model.initial_weights(seed, device, lazy=True)
