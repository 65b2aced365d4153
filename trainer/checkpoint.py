"""Checkpoints: weights as safetensors, optimizer / schedule as tensors, progress as JSON.

Written into a temporary directory and renamed into place, so a checkpoint directory either
exists complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def save_checkpoint(
    directory: Path,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    scheduler_state: dict[str, Any],
    train_state: dict[str, Any],
) -> Path:
    """Write model.safetensors, optimizer.pt (when whole), scheduler.json and train_state.json."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(scheduler_state, default=str))
    (tmp / "train_state.json").write_text(json.dumps(train_state, indent=2))
    for path in tmp.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_model_weights(directory: Path, model: nn.Module) -> None:
    """Load model.safetensors into model (tied weights are restored through their shared storage)."""
    missing, unexpected = model.load_state_dict(load_file(str(Path(directory) / "model.safetensors")), strict=False)
    tied = {name for name in missing if name.endswith("head.weight")}
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit the model: missing {missing}, unexpected {unexpected}")
