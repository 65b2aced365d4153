"""torch.compile for training, applied per transformer block as torchtitan does.

Each block is compiled on its own (`Module.compile`, in place: parameter names and state-dict
keys stay the same), so one compiled graph serves every layer of the same shape, compile time
does not grow with depth, and wrappers applied afterwards (FSDP2's per-block units, DDP) see the
same modules as without compile. Activation checkpointing comes first: the compiled block is the
checkpoint wrapper, so the recompute is compiled too. The head and the loss (the largest
activations of a step) are compiled as one more function (`GPT.compile_loss`).

fullgraph=True: a graph break inside a block is an error, not a silent slowdown. Nothing in a
block's forward queries the machine or checks the config (those run once, at build time).
Dao's flash-attn kernels are the exception: they are opaque to dynamo, so with
model.attention_backend=flash_attn the blocks compile around them (fullgraph off).
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, inside_checkpoints: bool = False) -> int:
    """Compile each of model.blocks in place, and the head + loss; returns how many blocks.

    inside_checkpoints: where a block (or its attention / MLP) is wrapped for activation checkpointing,
    compile what the wrapper holds, so that the checkpoint runs eagerly around compiled code: a split
    model (parallel.tensor) needs it, as AOTAutograd cannot trace the checkpoint of a region that
    builds DTensors (it saves their DeviceMesh among the tensors). Full checkpointing: the block inside
    its wrapper; selective: the block's attention and MLP (the norms and residual adds run eager)."""
    from trainer.model.checkpointing import WRAPPED

    fullgraph = model.cfg.attention_backend != "flash_attn"
    for block in model.blocks:
        if inside_checkpoints and hasattr(block, WRAPPED):  # full
            getattr(block, WRAPPED).compile(fullgraph=fullgraph)
        elif inside_checkpoints and any(hasattr(block.get_submodule(n), WRAPPED) for n in ("attn", "mlp")):
            for name in ("attn", "mlp"):
                part = block.get_submodule(name)
                getattr(part, WRAPPED, part).compile(fullgraph=fullgraph)
        else:
            block.compile(fullgraph=fullgraph)
    model.compile_loss()
    return len(model.blocks)


def compiled_blocks(model: nn.Module) -> int:
    """How many of model.blocks run compiled, whole or in their parts (for the log and the tests)."""
    return sum(
        any(getattr(m, "_compiled_call_impl", None) is not None for m in block.modules()) for block in model.blocks
    )
