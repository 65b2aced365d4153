"""Quantisation: quantisation-aware training of the block linears (quant.qat=int8|int4), with
torchao's quantise-dequantise numbers and a straight-through gradient (see trainer.quant.qat)."""

from trainer.quant.qat import (
    QATLinear,
    add_fake_quantization,
    block_linears,
    fake_quantize,
    quantization_error,
    quantize_dequantize,
    remove_fake_quantization,
)

__all__ = [
    "QATLinear",
    "add_fake_quantization",
    "block_linears",
    "fake_quantize",
    "quantize_dequantize",
    "quantization_error",
    "remove_fake_quantization",
]
