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
    the shard size divides the world size and that CPU offload has a GPU to offload from).

    One named device mesh, built once: (replicate, shard, tensor), each dimension present when it
    has more than one rank ("shard" always under fsdp). HSDP replicates the shards across
    `replicate` groups; `parallel.tensor=T` splits every layer over the innermost T ranks
    (trainer/parallel/tensor.py), so a node's GPUs hold a tensor group. The data-parallel rank and
    degree are the (replicate, shard) coordinates: tensor-parallel peers read the same batch."""

    name = "fsdp"
    shards = True  # fully_shard over the data-parallel dimensions (TensorParallel: not)

    def __init__(self, device: torch.device, rank: int, world_size: int, cfg: ParallelConfig, precision=None) -> None:
        super().__init__(device, rank, world_size, precision)
        self.cfg = cfg
        tensor = cfg.tensor
        data = world_size // tensor  # the data-parallel ranks
        if not self.shards:
            replicate, shard = data, 1
        elif cfg.replicate > 1:
            replicate, shard = cfg.replicate, data // cfg.replicate
        else:  # fsdp_shard_size: shard inside groups of that many, replicate across them
            shard = cfg.fsdp_shard_size or data
            replicate = data // shard
        dims = [("replicate", replicate), ("shard", shard), ("tensor", tensor)]
        kept = [(n, s) for n, s in dims if s > 1 or (n == "shard" and self.shards)]
        names, sizes = zip(*kept, strict=True) if kept else (("tensor",), (1,))
        self.mesh = init_device_mesh(device.type, tuple(sizes), mesh_dim_names=tuple(names))
        self.tensor = tensor
        self.dp_size, self.dp_rank = data, rank // tensor  # tensor innermost: peers are neighbours
        self.tensor_rank = rank % tensor
        data_dims = tuple(n for n in names if n in ("replicate", "shard"))
        # fully_shard's mesh: (replicate, shard) for HSDP, (shard,) for FSDP; the data-parallel group: all of them
        self.fsdp_mesh = self.mesh[data_dims] if data_dims else None
        self.data_group = self._sub(data_dims).get_group() if data_dims else None
        # the ranks whose parts of a parameter differ: the shards, and the tensor slices
        split = tuple(n for n in names if n in ("shard", "tensor"))
        self.shard_group = self._sub(split).get_group() if split else None

    def _sub(self, dims: tuple[str, ...]) -> DeviceMesh | None:
        """The sub-mesh over `dims` as one dimension (None without any)."""
        if not dims:
            return None
        sub = self.mesh[dims]
        return sub._flatten("_".join(dims)) if len(dims) > 1 else sub

    def describe_mesh(self) -> str | None:
        """The device mesh in words, for the start line: 'replicate 2 x shard 4 (HSDP)' or 'shard 8'."""
        sizes = dict(zip(self.mesh.mesh_dim_names, self.mesh.shape, strict=True))
        text = " x ".join(f"{name} {size}" for name, size in sizes.items())
        notes = []
        if "replicate" in sizes and self.shards:
            notes.append("HSDP: all-gathers and reduce-scatters within a shard group, one all-reduce across replicas")
        if self.tensor > 1:
            notes.append(f"tensor + sequence parallel over {self.tensor} ranks; data-parallel degree {self.dp_size}")
        return text + (f" ({'; '.join(notes)})" if notes else "")

    def all_reduce_sum(self, value: torch.Tensor, what: str = "sum", world: bool = False) -> torch.Tensor:
        """Sum over the data-parallel ranks (tensor-parallel peers hold the same value: counted once);
        world: over every rank."""
        if self.tensor == 1 or world:
            return super().all_reduce_sum(value, what)
        if self.data_group is None:
            return value.clone()
        import torch.distributed as dist

        from trainer.parallel.dist import collective

        value = value.clone()
        with collective(f"all_reduce ({what})"):
            dist.all_reduce(value, group=self.data_group)  # collective
        return value

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP averages gradients over the data-parallel ranks only: multiply back by their count
        scale = self.scaler.scale if self.scaler is not None else 1.0
        (loss * (self.dp_size * scale)).backward()

    def apply_tensor_parallel(self, model: nn.Module) -> None:
        """Split the meta-device model over the mesh's tensor dimension (before checkpointing, compile and
        fully_shard: torchtitan's order)."""
        if self.tensor > 1:
            from trainer.parallel.tensor import apply_tensor_parallel

            apply_tensor_parallel(model, self.mesh["tensor"])

    def parallelize(self, model: nn.Module, weights: WeightSource) -> nn.Module:
        # Shard first, on the meta device; then each rank allocates and fills its shards only.
        if self.tensor > 1:  # fused q / k / v (gate / up) rows in the order the split model holds them
            from trainer.parallel.tensor import grouped_source

            weights = grouped_source(weights, model.cfg, self.tensor)
        if self.shards:
            apply_fsdp(model, self.fsdp_mesh, self.cfg, DTYPES[self.precision.dtype])
        home = torch.device("cpu") if self.cfg.fsdp_cpu_offload else self.device  # offloaded shards live on the CPU
        materialize(model, weights, home)
        return model

    def frozen_copy(self, model: nn.Module, weights: WeightSource) -> nn.Module:
        model.requires_grad_(False)
        if self.tensor > 1:  # split like the policy
            from trainer.parallel.tensor import grouped_source

            self.apply_tensor_parallel(model)
            weights = grouped_source(weights, model.cfg, self.tensor)
        if self.shards:
            apply_fsdp(model, self.fsdp_mesh, self.cfg, DTYPES[self.precision.dtype])  # sharded like the policy
        materialize(model, weights, torch.device("cpu") if self.cfg.fsdp_cpu_offload else self.device)
        return model.eval()

    @contextlib.contextmanager
    def micro_step(self, is_last: bool, reduce: bool = False):
        with super().micro_step(is_last, reduce):
            yield
        if self.tensor > 1 and (is_last or reduce):
            self._settle_partial_grads()

    def _settle_partial_grads(self) -> None:
        """Tensor parallelism leaves the gradient of a weight every peer holds whole (a norm's, wpe's) as
        a Partial DTensor: each peer's part comes from its own tokens (sequence parallel). Summed here
        over the tensor group, all of them in one all-reduce, so the statistics and the optimizer read
        whole gradients. A gradient placed otherwise than its weight (the vocabulary-sharded embedding's
        comes back replicated) is cut to the weight's placement."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Partial

        from trainer.parallel.dist import collective

        grads = [p for p in self.model.parameters() if isinstance(p.grad, DTensor)]
        for p in grads:  # the vocabulary-sharded embedding's gradient comes back whole (Replicate): its rows
            if p.grad.placements != p.placements and not any(isinstance(q, Partial) for q in p.grad.placements):
                p.grad = p.grad.redistribute(placements=p.placements)  # a local slice, no communication
        pending = [p for p in grads if any(isinstance(q, Partial) for q in p.grad.placements)]
        if not pending:
            return
        flat = torch.cat([p.grad.to_local().reshape(-1) for p in pending])
        with collective("all_reduce (tensor-parallel gradients of replicated weights)"):
            dist.all_reduce(flat, group=self.mesh["tensor"].get_group())  # collective
        offset = 0
        for p in pending:
            n = p.grad.to_local().numel()
            whole = flat[offset : offset + n].view_as(p.grad.to_local())
            p.grad = DTensor.from_local(whole, p.grad.device_mesh, p.placements, run_check=False)
            offset += n

    def sync_gradients(self, is_last: bool) -> contextlib.AbstractContextManager:
        # Before the boundary keep unsharded gradients locally: no reduce-scatter.
        if self.shards:
            self.model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # FSDP2 casts parameters itself (MixedPrecisionPolicy)

    def grad_sumsq_by_group(self) -> dict[str, torch.Tensor]:
        """Sums of squares of each rank's gradient shards, summed over the shard group.

        Never gathers a gradient: each rank squares its own shard, then one all-reduce of a
        few floats adds the shards up (replicas under hybrid sharding are not added twice).
        """
        named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        sums = group_sumsq(named, self.sumsq_weights(n for n, _ in named))
        sums = {k: v.to(self.device) for k, v in sums.items()}
        return self._reduce(sums)

    def reduce_owned(self, sums: dict[str, torch.Tensor], trainable_only: bool = False) -> dict[str, torch.Tensor]:
        return self._reduce(sums)  # each rank owns a shard of every parameter

    def sumsq_weights(self, names) -> list[float] | None:
        """Under tensor parallelism, 1 / T for a tensor every tensor-parallel peer holds whole (norms,
        biases after a row-wise split): its T copies count once in the sums over the shard group."""
        if self.tensor == 1:
            return None
        if self._replicated is None:  # worked out once: the placements do not change
            from torch.distributed.tensor import Replicate

            dim = self.mesh.mesh_dim_names.index("tensor")
            self._replicated = {
                n for n, p in self.model.named_parameters() if isinstance(p.placements[dim], Replicate)
            }  # fmt: skip
        return [1.0 / self.tensor if n in self._replicated else 1.0 for n in names]

    _replicated: set[str] | None = None

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return all_reduce_groups(sums, group=self.shard_group) if self.shard_group is not None else sums

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Collective: all-gathers each parameter; only rank 0 keeps the CPU copy.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(self.model, options=options)
        if self.tensor > 1:  # fused projections back in the canonical [q | k | v] row order
            from trainer.parallel.tensor import to_canonical

            cfg = self.unwrapped().cfg
            state = {name: to_canonical(name, value, cfg, self.tensor) for name, value in state.items()}
        return state


class TensorParallel(FSDP):
    """`parallel=none parallel.tensor=T`: tensor and sequence parallelism alone, over all T ranks (no
    data parallelism: every rank reads the same batch)."""

    name = "none"
    shards = False

    def autocast(self) -> contextlib.AbstractContextManager:
        return TorchStrategy.autocast(self)  # no FSDP2 to cast the weights: torch.autocast, as parallel=none


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
