"""PyTorch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks.

Each transformer block is its own FSDP unit (all-gathered just before it runs, resharded after),
then the root takes what is left (embeddings, final norm, head). Parameters become DTensors
sharded on dim 0; each rank's optimizer updates only its shard.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from trainer.config import ParallelConfig
from trainer.parallel.base import Distributed, all_reduce_groups, group_sumsq
from trainer.precision import DTYPES


class FSDP(Distributed):
    """`parallel=fsdp`: fully_shard per block, then the root."""

    name = "fsdp"

    def __init__(
        self, device: torch.device, rank: int, world_size: int, cfg: ParallelConfig, precision=None
    ) -> None:
        super().__init__(device, rank, world_size, precision)
        self.cfg = cfg
        if cfg.fsdp_cpu_offload and device.type != "cuda":
            from trainer.config import ConfigError

            raise ConfigError(
                "parallel.fsdp_cpu_offload=true needs a GPU (FSDP2 offloads GPU shards to the CPU; "
                "on the CPU they are there already): drop it or run on GPUs"
            )
        shard = cfg.fsdp_shard_size or world_size
        if world_size % shard:
            from trainer.config import ConfigError

            raise ConfigError(
                f"parallel.fsdp_shard_size={shard} does not divide the world size {world_size}: "
                "use a divisor (e.g. the GPUs per node) or 0 to shard over all ranks"
            )
        if shard == world_size:
            self.mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
        else:  # hybrid: shard inside groups of `shard` ranks, replicate across the groups
            self.mesh = init_device_mesh(
                device.type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard")
            )
        self.shard_group = self.mesh["shard"].get_group()

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        offload = CPUOffloadPolicy() if self.cfg.fsdp_cpu_offload else OffloadPolicy()
        # bf16 / fp16: each block computes with low-precision copies of its gathered weights;
        # sharded master weights, gradients and their reduction stay fp32.
        compute = DTYPES[self.precision.dtype]
        mixed = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        if not self.cfg.fsdp_cpu_offload:  # with offload the shards live in CPU memory
            model = model.to(self.device)
        options = dict(mesh=self.mesh, offload_policy=offload, mp_policy=mixed)
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=self.cfg.fsdp_reshard_after_forward, **options)
        # The root keeps its (small) embedding / head parameters gathered after forward: the
        # head runs last and backward needs them straight away.
        fully_shard(model, reshard_after_forward=False, **options)
        return model

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
        device = self.device
        sums = {k: v.to(device) for k, v in sums.items()}
        return all_reduce_groups(sums, group=self.shard_group)

    def reduce_owned(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return all_reduce_groups(sums, group=self.shard_group)  # each rank owns a shard of every parameter

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Collective: all-gathers each parameter; only rank 0 keeps the CPU copy.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value)  # collective
        return value
