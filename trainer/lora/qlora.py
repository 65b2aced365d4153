"""QLoRA (Dettmers et al. 2023): the frozen base weight of each adapted linear stored in 4-bit
NormalFloat, as torchao's NF4Tensor holds it (the format torchtune's QLoRA uses).

NF4 keeps per weight a 4-bit index into 16 normal-distribution quantiles, scaled per block of 64
weights by that block's absmax; the absmaxes are themselves quantised to int8 in blocks of 256
around their mean (double quantisation), leaving one scale per 256 blocks: ~4.13 bits per weight.

    place = quantizing_place(params, device)     # materialize(model, weights, device, place)
    y = linear_nf4(x, weight, bias)              # LoRALinear.forward on an NF4 base

The NF4 weight stays an nn.Parameter (requires_grad=False), so counts and FLOPs still see it; the
matmul dequantises it (in its own dtype, lora.base_dtype) inside an autograd function that keeps
only the 4-bit form for backward, where it dequantises again (as torchao's LinearNF4, but with
autocast resolved first: torchao's dequantisation fails under CPU fp16 autocast): gradients reach
x, never the base.

torchao is imported on first use (a LoRA run without quantize_base never loads it), with the
"Failed to load ... .so" lines its import logs on machines without its kernels silenced.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64  # weights per absmax (QLoRA's blocksize for the weights)
SCALER_BLOCK_SIZE = 256  # absmaxes per int8 scale (QLoRA's blocksize for double quantisation)
_MODULE = "torchao.quantization"  # the public home of to_nf4 and NF4Tensor
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")  # kernels that fail to load; a deprecation notice


@functools.cache
def _torchao_nf4() -> ModuleType:
    """torchao.quantization (to_nf4, NF4Tensor), imported with its import-time log lines silenced."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization

        return torchao.quantization
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether tensor is an NF4Tensor (False without importing torchao when nothing imported it)."""
    module = sys.modules.get(_MODULE)
    return module is not None and isinstance(tensor, module.NF4Tensor)


def scaler_block_size(numel: int) -> int:
    """Absmaxes per double-quantisation scale: 256, or for a weight of fewer (or not a multiple of
    256) blocks, the largest divisor of its block count up to 256 (tiny test models)."""
    blocks = numel // BLOCK_SIZE
    return max(d for d in range(1, min(blocks, SCALER_BLOCK_SIZE) + 1) if blocks % d == 0)


def quantize(weight: torch.Tensor) -> torch.Tensor:
    """weight (out, in) as an NF4Tensor of its dtype and device: 4-bit codes, an int8 absmax per 64
    weights, one scale per 256 absmaxes (see scaler_block_size) and their mean."""
    if weight.numel() % BLOCK_SIZE:
        raise ValueError(
            f"NF4 quantises blocks of {BLOCK_SIZE} weights; a {tuple(weight.shape)} weight has no whole blocks"
        )
    weight = weight.detach().contiguous()
    return _torchao_nf4().to_nf4(weight, BLOCK_SIZE, scaler_block_size(weight.numel()))


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """An NF4Tensor's values as a plain tensor of its dtype (what every matmul with it multiplies by),
    computed in that dtype whatever autocast is on."""
    with torch.autocast(weight.device.type, enabled=False):
        return weight.get_original_weight()


class _LinearNF4(torch.autograd.Function):
    """x W^T for an NF4 W, dequantised to x's dtype in the forward and again in the backward: only
    the 4-bit W is saved for backward (no dense copy per layer). No gradient for W (frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, dequantize(weight).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            return grad @ dequantize(weight).to(grad.dtype), None


def linear_nf4(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b with W an NF4Tensor (..., in) -> (..., out), in autocast's dtype when autocast is on
    (as F.linear would be); the gradient flows to x, none to W."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    with torch.autocast(device, enabled=False):
        y = _LinearNF4.apply(x, weight)
    return y if bias is None else y + bias.to(y.dtype)


def quantize_parameter(param: nn.Parameter) -> None:
    """Replace a (real) parameter's contents by its NF4 quantisation, frozen; the object stays the
    same, so every module holding it sees the NF4 weight."""
    torch.utils.swap_tensors(param, nn.Parameter(quantize(param.detach()), requires_grad=False))


def quantizing_place(
    params: Iterable[nn.Parameter], device: torch.device
) -> Callable[[nn.Parameter, torch.Tensor], None]:
    """materialize's `place` for a meta-device model whose `params` are to be stored in NF4: each of
    those is quantised from its full tensor (cast to the parameter's dtype, on device) as it
    arrives, so the full-precision base is never held whole; every other parameter gets storage on
    device and a copy. Parameter objects stay the same (torch.utils.swap_tensors)."""
    quantized = {id(p) for p in params}

    def place(param: nn.Parameter, full: torch.Tensor) -> None:
        if id(param) in quantized:
            filled = nn.Parameter(quantize(full.to(device=device, dtype=param.dtype)), requires_grad=False)
        else:
            tensor = torch.empty_like(param, device=device).copy_(full)
            filled = nn.Parameter(tensor, requires_grad=param.requires_grad)
        torch.utils.swap_tensors(param, filled)

    return place
