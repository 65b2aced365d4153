"""Precision policy for the non-DeepSpeed strategies: autocast dtype and dynamic loss scaling.

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero in its backward pass. Multiplying
the loss by a large scale S moves them into range; the gradients are divided by S again before
anything reads them. When a step's gradients overflow (inf / NaN) the step is skipped and S is
cut; after `growth_interval` clean steps S grows. bf16 has fp32's exponent range and needs no
scaling, but can opt in (`precision.loss_scaling=true`). Master weights and optimizer state stay
fp32 throughout: autocast only lowers the precision of the matmuls' inputs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from trainer.config import PrecisionConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(cfg: PrecisionConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16 / fp16 on device; a no-op for fp32."""
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[cfg.dtype])


class DynamicLossScaler:
    """Loss scale S with backoff on overflow and growth after `growth_interval` clean steps.

    The state is two numbers (saved with checkpoints as JSON).
    """

    def __init__(self, cfg: PrecisionConfig) -> None:
        self.cfg = cfg
        self.scale = float(cfg.initial_scale)
        self.clean_steps = 0  # steps since the last overflow or growth

    def update(self, found_non_finite: bool) -> None:
        """After a step: back off on overflow, grow after enough clean steps."""
        if found_non_finite:
            self.scale *= self.cfg.backoff_factor
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.cfg.growth_interval:
            self.scale *= self.cfg.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
