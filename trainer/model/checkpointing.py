"""Activation checkpointing: keep fewer activations in forward, recompute them in backward.

`model.activation_checkpointing` picks what is wrapped, in blocks 0, k, 2k, ... where
k = `model.activation_checkpointing_every`:

| mode      | wrapped             | kept for backward in a wrapped part       | extra compute      |
|-----------|---------------------|-------------------------------------------|--------------------|
| none      | nothing             | every activation                          | -                  |
| full      | the whole block     | the block's input (B, T, C) only          | one block forward  |
| attention | block.attn          | attn's input (the MLP keeps all its own)  | attention forward  |
| mlp       | block.mlp           | mlp's input, not its (B, T, 4C) hidden    | MLP forward        |

Recompute is torch.utils.checkpoint in its non-reentrant form, the one PyTorch recommends and
the one its own `checkpoint_wrapper` (torch.distributed.algorithms._checkpoint) and torchtitan
use ahead of FSDP2. `CheckpointWrapper` below is that wrapper's essentials, kept here so the
model package never imports torch.distributed. Apply it before the strategy wraps the model
(trainer.parallel.parallelize does): DDP and FSDP2 (fully_shard on each, possibly wrapped, block) then see
ordinary modules whose backward happens to recompute; FSDP2's pre-backward all-gather runs
before the recompute needs the parameters. DeepSpeed ZeRO-1/2/3 use the same wrapper:
ZeRO-3's per-module hooks gather the parameters again when the recompute calls the inner
modules. DeepSpeed's own `deepspeed.checkpointing` (a copy of torch's reentrant checkpoint,
plus a non-reentrant variant, set up with `configure()`) adds activation partitioning across
model-parallel ranks and CPU offload of checkpoints, neither of which applies to data-parallel
ZeRO, so torch's is used for every strategy; tests/test_activation_checkpointing.py checks
every strategy against the same step without checkpointing.

Dropout stays exact: checkpoint saves the RNG state before the forward and restores it for
the recompute (preserve_rng_state=True, the default), so the masks are the same.

State-dict keys are unchanged: the wrapped module sits at `_checkpoint_wrapped_module`,
PyTorch's own attribute name, and state-dict hooks drop it from `state_dict()` and add it
back in `load_state_dict()`, so checkpoints of a wrapped and an unwrapped model are
interchangeable. `named_parameters()` does show it (as with torch's wrapper); `param_group`,
torch.distributed.checkpoint and `gpt.bare_name` drop it, and code that turns parameter
names into checkpoint keys must do the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.config import ModelConfig

WRAPPED = "_checkpoint_wrapped_module"  # same attribute name as torch's checkpoint_wrapper
SELECTIVE = {"attention": "attn", "mlp": "mlp"}  # mode -> the Block attribute it wraps


class CheckpointWrapper(nn.Module):
    """Runs `module` under non-reentrant activation checkpointing when gradients are on."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._checkpoint_wrapped_module = module
        self.register_state_dict_post_hook(_drop_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    def __getattr__(self, name: str) -> Any:
        # Attributes the wrapper lacks come from the wrapped module, as in torch's wrapper:
        # torch.distributed.checkpoint (FSDP2's full state dict) walks the prefix-free names.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._checkpoint_wrapped_module, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation / generation: nothing to save or recompute
            return self._checkpoint_wrapped_module(*args, **kwargs)
        return checkpoint(self._checkpoint_wrapped_module, *args, use_reentrant=False, **kwargs)


def _drop_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    # "blocks.0._checkpoint_wrapped_module.attn..." -> "blocks.0.attn...". The wrapped module's
    # keys are the newest in the dict when this runs, so popping and re-adding keeps the order.
    old = f"{prefix}{WRAPPED}."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + key[len(old) :]] = state_dict.pop(key)


def _add_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # The reverse, on load_state_dict's private copy; keys that already carry it are left alone.
    new = f"{prefix}{WRAPPED}."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(new)]:
        state_dict[new + key[len(prefix) :]] = state_dict.pop(key)


def checkpointed_blocks(cfg: ModelConfig) -> list[int]:
    """Indices of the blocks that `cfg` checkpoints (whole, or their attention / MLP)."""
    if cfg.activation_checkpointing == "none":
        return []
    return list(range(0, cfg.n_layer, cfg.activation_checkpointing_every))


def apply_activation_checkpointing(model: nn.Module, cfg: ModelConfig) -> int:
    """Wrap the blocks (or their attention / MLP) that `cfg` selects; return how many were wrapped.

    In place, before any distribution wrapper. Modules already wrapped are left as they are,
    so applying it twice changes nothing.
    """
    wrapped = 0
    for i in checkpointed_blocks(cfg):
        if cfg.activation_checkpointing == "full":
            parent, name = model.blocks, str(i)
        else:  # selective: "attention" -> block.attn, "mlp" -> block.mlp
            parent, name = model.blocks[i], SELECTIVE[cfg.activation_checkpointing]
        target = parent.get_submodule(name)
        if isinstance(target, CheckpointWrapper):
            continue
        parent.register_module(name, CheckpointWrapper(target))  # replaces the child in place
        wrapped += 1
    return wrapped
