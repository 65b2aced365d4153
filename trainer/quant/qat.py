"""Quantisation-aware training: each block linear multiplies by its weight quantised and dequantised.

    names = add_fake_quantization(model, cfg.quant)   # on the meta-built GPT, before parallelize
    w_q = quantize_dequantize(w, "int4", 32)          # post-training quantisation, the same numbers
    quantization_error(model, "int8", 32)             # ||W - Q(W)|| / ||W|| over the block linears
    remove_fake_quantization(model)                   # plain nn.Linear again: the float model

The quantisation is torchao's symmetric affine scheme, through its public primitives
(choose_qparams_affine -> quantize_affine -> dequantize_affine): int8 with one scale per output
channel (row), int4 with one scale per group of `group_size` input columns; scale = absmax /
((qmax - qmin) / 2) in fp32, codes clamped to [-128, 127] / [-8, 7]. For fp32 weights these are
bit for bit the weights torchao's PTQ configs store (Int8WeightOnlyConfig; IntxWeightOnlyConfig(
torch.int4, PerGroup(group_size))) and its QAT fake quantiser computes (IntxFakeQuantizer), so a
QAT model exported in float and quantised by torchao holds the weights training multiplied by.

Gradient: the straight-through estimator. torchao's fake quantiser differentiates through its
round (identity) but also through its clamp and its divide-then-multiply by the scale, so its
weight gradient is zero at clamped codes and off by an ulp elsewhere; here backward passes
dL/dW_q to W unchanged, exactly the gradient a plain linear would take at the quantised weight.

Which layers: every nn.Linear inside the transformer blocks (attention c_attn / c_proj, MLP
c_fc / w_gate / w_up / c_proj), as torchao's and torchtune's linear QAT quantisers swap linear
modules (embeddings take a quantiser of their own). The embedding stays float, and so does the
head: tied to the embedding by default, and even untied read by GPT.forward as a weight for the
(chunked) loss rather than called as a module; the logits' matmul is also the one low-bit schemes
most often keep in higher precision.

Names: the linears change class in place (QATLinear is an nn.Linear with another forward), so
parameter names, state_dict keys, checkpoints, export and resume are those of the float model.
The fake quantisation runs inside each block's forward, so it is recomputed under activation
checkpointing, traced by torch.compile, and sees the gathered weight under FSDP2, DDP and
DeepSpeed (ZeRO-3 included).

This module imports torchao (with its import-time log lines silenced, as trainer.lora.qlora does);
only a run with quant.qat set imports this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config.schema import ConfigError, QuantConfig
from trainer.lora.qlora import _torchao_nf4 as _torchao_quantization
from trainer.model.gpt import GPT

tq = _torchao_quantization()  # torchao.quantization, imported once here: torch.compile traces the calls below
CODE_RANGE = {"int8": (-128, 127), "int4": (-8, 7)}  # signed codes (quant_min, quant_max)


def block_size(shape: torch.Size, qat: str, group_size: int) -> tuple[int, int]:
    """Weights (out, in) sharing one scale: a whole row for int8, group_size columns of a row for int4."""
    return (1, shape[1]) if qat == "int8" else (1, group_size)


@torch.no_grad()
def quantize_dequantize(weight: torch.Tensor, qat: str, group_size: int) -> torch.Tensor:
    """weight (out, in) rounded to the int8 / int4 grid and back, in weight's dtype (no gradient).

    The codes are stored as int8 in between (int4 codes in int8's range [-8, 7]), as torchao does."""
    blocks = block_size(weight.shape, qat, group_size)
    low, high = CODE_RANGE[qat]
    scale, zero_point = tq.choose_qparams_affine(
        weight, tq.MappingType.SYMMETRIC, blocks, torch.int8, low, high, scale_dtype=torch.float32
    )
    codes = tq.quantize_affine(weight, blocks, scale, zero_point, torch.int8, low, high)  # (out, in) int8
    return tq.dequantize_affine(codes, blocks, scale, zero_point, torch.int8, low, high, output_dtype=weight.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: quantize_dequantize(weight). Backward: the incoming gradient, unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, qat: str, group_size: int) -> torch.Tensor:
        return quantize_dequantize(weight, qat, group_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def fake_quantize(weight: torch.Tensor, qat: str, group_size: int) -> torch.Tensor:
    """quantize_dequantize(weight) in forward; dL/dW = dL/dW_q in backward (straight-through)."""
    return _StraightThrough.apply(weight, qat, group_size)


class QATLinear(nn.Linear):
    """nn.Linear whose forward multiplies by its weight fake-quantised; parameters as nn.Linear's."""

    qat: str  # int8 | int4
    group_size: int  # int4: input columns per scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.qat, self.group_size), self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.qat == "int4" else ""
        return f"{super().extra_repr()}, qat={self.qat}{group}"


def block_linears(model: GPT) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every linear in the transformer blocks: attention and MLP projections."""
    return [(f"blocks.{name}", m) for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]


def add_fake_quantization(model: GPT, cfg: QuantConfig) -> list[str]:
    """Make every block linear a QATLinear in place (same module, parameters and names) and return
    their names; works on a meta-built model. An int4 linear whose input width quant.group_size does
    not divide raises ConfigError (check_run refuses such a config before anything is built)."""
    if cfg.qat is None:
        return []
    linears = block_linears(model)
    for name, module in linears:
        if cfg.qat == "int4" and module.in_features % cfg.group_size:
            raise ConfigError(
                f"quant.qat=int4 groups {cfg.group_size} input columns per scale, but {name} has "
                f"{module.in_features}: set quant.group_size to a divisor of it (e.g. 32)"
            )
    for _, module in linears:
        module.__class__ = QATLinear  # a subclass without new state: only forward changes
        module.qat, module.group_size = cfg.qat, cfg.group_size
    return [name for name, _ in linears]


def remove_fake_quantization(model: nn.Module) -> int:
    """Make every QATLinear a plain nn.Linear again, in place (its float weights); returns how many."""
    linears = [m for m in model.modules() if isinstance(m, QATLinear)]
    for module in linears:
        module.__class__ = nn.Linear
        del module.qat, module.group_size
    return len(linears)


@torch.no_grad()
def quantization_error(model: GPT, qat: str, group_size: int) -> float:
    """||W - Q(W)||_F / ||W||_F over the block linears' weights taken together (Q: quantize_dequantize)."""
    error = norm = 0.0
    for _, module in block_linears(model):
        weight = module.weight.float()
        error += (weight - quantize_dequantize(weight, qat, group_size)).square().sum()
        norm += weight.square().sum()
    return float((error / norm).sqrt())  # host sync
