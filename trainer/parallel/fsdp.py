"""PyTorch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks.

Each transformer block is its own FSDP unit (all-gathered just before it runs, resharded after),
then the root takes what is left (embeddings, final norm, head). Parameters become DTensors
sharded on dim 0; each rank's optimizer updates only its shard. The model arrives on the meta
device and is sharded there, so a rank allocates only its own shards (then fills them one
full parameter at a time): no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from trainer.config import ParallelConfig
from trainer.parallel.base import (
    TorchStrategy,
    WeightSource,
    all_reduce_groups,
    group_sumsq,
    materialize,
)
from trainer.precision import DTYPES


class FSDP(TorchStrategy):
    """`parallel=fsdp`: fully_shard per block, then the root (config.check_run has checked that
    the shard size divides the world size and that CPU offload has a GPU to offload from)."""

    name = "fsdp"

    def __init__(self, device: torch.device, rank: int, world_size: int, cfg: ParallelConfig, precision=None) -> None:
        super().__init__(device, rank, world_size, precision)
        self.cfg = cfg
        shard = world_size // cfg.replicate if cfg.replicate > 1 else cfg.fsdp_shard_size or world_size
        if shard == world_size:
            self.mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
        else:  # HSDP: shard inside groups of `shard` ranks, replicate across the groups
            self.mesh = init_device_mesh(
                device.type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard")
            )
        self.shard_group = self.mesh["shard"].get_group()

    def describe_mesh(self) -> str | None:
        """The device mesh in words, for the start line: 'replicate 2 x shard 4 (HSDP)' or 'shard 8'."""
        sizes = dict(zip(self.mesh.mesh_dim_names, self.mesh.shape, strict=True))
        text = " x ".join(f"{name} {size}" for name, size in sizes.items())
        return text + (" (HSDP: all-gathers and reduce-scatters within a shard group, one all-reduce across "
                       "replicas)" if "replicate" in sizes else "")  # fmt: skip

    def parallelize(self, model: nn.Module, weights: WeightSource) -> nn.Module:
        # Shard first, on the meta device; then each rank allocates and fills its shards only.
        apply_fsdp(model, self.mesh, self.cfg, DTYPES[self.precision.dtype])
        home = torch.device("cpu") if self.cfg.fsdp_cpu_offload else self.device  # offloaded shards live on the CPU
        materialize(model, weights, home)
        return model

    def frozen_copy(self, model: nn.Module, weights: WeightSource) -> nn.Module:
        model.requires_grad_(False)
        apply_fsdp(model, self.mesh, self.cfg, DTYPES[self.precision.dtype])  # sharded like the policy
        materialize(model, weights, torch.device("cpu") if self.cfg.fsdp_cpu_offload else self.device)
        return model.eval()

    def sync_gradients(self, is_last: bool) -> contextlib.AbstractContextManager:
        # Before the boundary keep unsharded gradients locally: no reduce-scatter.
        self.model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # FSDP2 casts parameters itself (MixedPrecisionPolicy)

    def grad_sumsq_by_group(self) -> dict[str, torch.Tensor]:
        """Sums of squares of each rank's gradient shards, summed over the shard group.

        Never gathers a gradient: each rank squares its own shard, then one all-reduce of a
        few floats adds the shards up (replicas under hybrid sharding are not added twice).
        """
        sums = group_sumsq((n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None)
        sums = {k: v.to(self.device) for k, v in sums.items()}
        return all_reduce_groups(sums, group=self.shard_group)

    def reduce_owned(self, sums: dict[str, torch.Tensor], trainable_only: bool = False) -> dict[str, torch.Tensor]:
        return all_reduce_groups(sums, group=self.shard_group)  # each rank owns a shard of every parameter

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Collective: all-gathers each parameter; only rank 0 keeps the CPU copy.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(self.model, options=options)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, compute_dtype: torch.dtype) -> None:
    """fully_shard each block, then the root, in place (on the meta device or a real one)."""
    offload = CPUOffloadPolicy() if cfg.fsdp_cpu_offload else OffloadPolicy()
    # bf16 / fp16: each block computes with low-precision copies of its gathered weights;
    # sharded master weights, gradients and their reduction stay fp32.
    mixed = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    options = dict(mesh=mesh, offload_policy=offload, mp_policy=mixed)
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=cfg.fsdp_reshard_after_forward, **options)
    if cfg.fsdp_prefetch > 1:  # gather the next k blocks' weights ahead (FSDP2's implicit prefetch is 1)
        blocks, k = list(model.blocks), cfg.fsdp_prefetch
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + k])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - k) : i][::-1])
    # The root keeps its (small) embedding / head parameters gathered after forward: the
    # head runs last and backward needs them straight away.
    fully_shard(model, reshard_after_forward=False, **options)
