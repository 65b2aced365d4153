"""The seam between the loop and distribution: `Strategy`, the interface every strategy fills in.

What the loop (trainer/step.py, trainer/loop.py) asks of a strategy, and nothing more:

| concern        | methods                                                                         |
|----------------|---------------------------------------------------------------------------------|
| build          | setup (shard / wrap the meta-device model, materialise it, build the optimizer) |
| one step       | micro_step, backward, unscale_gradients, clip_and_step, skip_step, lr           |
| statistics     | grad_sumsq_by_group, param_sumsq_by_group, snapshot_params, update_sumsq_by_group |
| collectives    | all_reduce_sum, broadcast_path, barrier                                         |
| state          | checkpoint_parts (model + optimizer, schedule, loss scaler), full_state_dict    |

What a strategy cannot do is declared, not discovered mid-run: `can_skip_step` (dropping one
step's gradients, for spike skip / rollback) is checked by config.check_run before anything
is built. `TorchStrategy` is what none / ddp / fsdp share (a torch AdamW and its schedule, the
harness's loss scaler, torch.distributed.checkpoint); `SingleDevice` (parallel=none) is the
reference every other strategy is tested against.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from trainer.config import OptimConfig, PrecisionConfig
from trainer.model import param_group
from trainer.model.build import WeightSource
from trainer.model.gpt import bare_name
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel.dist import collective
from trainer.precision import DynamicLossScaler, autocast


class Strategy(abc.ABC):
    """How one rank holds the model and optimizer, and how ranks combine their gradients."""

    name: ClassVar[str] = ""
    can_skip_step: ClassVar[bool] = True  # can drop one step's gradients (spike skip / rollback)
    # parallel.expert > 1: the expert mesh and blocks (trainer/parallel/expert.py; ddp only)
    experts: Any = None

    def __init__(
        self, device: torch.device, rank: int = 0, world_size: int = 1, precision: PrecisionConfig | None = None
    ) -> None:
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.precision = precision or PrecisionConfig()
        # the data-parallel coordinates: which share of the global batch this rank reads (tensor-parallel
        # peers read the same one), and how many shares there are
        self.dp_rank, self.dp_size = rank, world_size
        self.tensor_rank = 0  # this rank's place in its tensor-parallel group (parallel.tensor)
        self.data_group: Any = None  # the process group of this rank's data-parallel peers (None: every rank)
        self.model: nn.Module | None = None  # after setup: the wrapped model the loop runs forward on
        self.owns_group = True  # close() destroys the process group (build_strategy: only one it started)

    # -- build -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self, model: nn.Module, weights: WeightSource, optim_cfg: OptimConfig, max_steps: int) -> None:
        """Take a model built on the meta device: shard or wrap it, give it storage on this rank,
        fill it from `weights`, then build the optimizer and its schedule."""

    def unwrapped(self) -> nn.Module:
        """The plain GPT module (for generation, FLOPs and export)."""
        return self.model

    def describe_mesh(self) -> str | None:
        """The device mesh in words for the start line, where there is more than one flat group (None)."""
        return None

    def frozen_copy(self, model: nn.Module, weights: WeightSource) -> nn.Module:
        """A second, frozen model from a meta-device `model` and its `weights`, held as this strategy
        holds the policy's weights (whole on each rank here; sharded by FSDP2 / ZeRO-3 there), in eval
        mode and without gradients: the reference of a preference / RL objective in full fine-tuning."""
        materialize(model, weights, self.device)
        return model.requires_grad_(False).eval()

    # -- one optimizer step ----------------------------------------------------------------------
    @abc.abstractmethod
    def micro_step(self, is_last: bool, reduce: bool = False) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward: gradient sync only when is_last
        (or reduce: the noise scale's small batch, read by `small_batch_sq` after it)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision policy's context for a forward outside micro_step (evaluation, sampling)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss already normalised by the global target count."""

    def unscale_gradients(self) -> None:  # noqa: B027 (a no-op unless the strategy runs the harness's scaler)
        """Divide this rank's gradients by the loss scale (a no-op without the harness's scaler)."""

    @abc.abstractmethod
    def clip_and_step(self, grad_norm: torch.Tensor, max_norm: float) -> bool:
        """Clip to the global norm max_norm (0: none), then step; a non-finite norm skips the step
        (weights, optimizer state and schedule unchanged). Returns whether it stepped."""

    @property
    def steps_without_sync(self) -> bool:
        """Whether clip_and_step_on_device can run: decide to step or skip without the host."""
        return False

    def clip_and_step_on_device(self, grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
        """clip_and_step with no host sync: a non-finite norm leaves weights and optimizer state
        as they were, decided on the device; the schedule advances either way. Returns the
        device flag it decided on (1.0: skipped for inf / NaN)."""
        raise RuntimeError(f"parallel={self.name} cannot step without a host sync")

    def skip_step(self) -> None:
        """Drop this step's gradients (only for strategies that declare can_skip_step)."""
        raise RuntimeError(f"parallel={self.name} cannot skip a step: config.check_run refuses this at start")

    @abc.abstractmethod
    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""

    def loss_scale(self) -> float | None:
        """The current loss scale (None when no scaler runs)."""
        return None

    # -- per-group statistics (each rank its own part, reduced across ranks) -----------------------
    @abc.abstractmethod
    def grad_sumsq_by_group(self) -> dict[str, torch.Tensor]:
        """Sum of squared gradient entries per parameter group (embed, block.i.attn, ..., head),
        over the whole model. Groups partition the parameters, so the global norm is sqrt(sum of
        the values). Values stay on the device: no host sync here."""

    def small_batch_sq(
        self, local_targets: torch.Tensor, step_targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise scale's small batch, right after the first micro-batch's backward under
        micro_step(reduce=True) (collective): (|mean gradient over it|^2, its target count), device
        tensors. Here that gradient is reduced over ranks, so the small batch is every rank's first
        micro-batch; its .grad is the sum of its token gradients / step_targets (the loss is
        normalised by the step's count) and still carries the loss scale (unscaled after the last)."""
        first = self.all_reduce_sum(local_targets.float(), "first micro-batch targets")
        scale = self.loss_scale() or 1.0
        return global_norm(self.grad_sumsq_by_group()) ** 2 * (step_targets / (first * scale)) ** 2, first

    @abc.abstractmethod
    def owned_params(self, trainable_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, the part of the weights this rank owns), parameter by parameter: the fp32 weights
        (masters where the strategy keeps them) and, unless trainable_only, the frozen ones."""

    def reduce_owned(self, sums: dict[str, torch.Tensor], trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Sum per-group values of owned parts over ranks (nothing to add when every rank owns all);
        trainable_only: the sums are of trainable parameters only (gradients, updates)."""
        return sums

    def sumsq_weights(self, names: Iterable[str]) -> list[float] | None:
        """A factor per named tensor on its square in the per-group sums (None: all 1): tensor parallelism
        counts once a tensor its peers all hold whole."""
        return None

    def param_sumsq_by_group(self) -> dict[str, torch.Tensor]:
        named = list(self.owned_params())
        return self.reduce_owned(group_sumsq(named, self.sumsq_weights(n for n, _ in named)))

    def snapshot_params(self) -> list[torch.Tensor]:
        """A copy of the owned weights, to measure the next update against (monitor steps only):
        one _foreach copy, freed once update_sumsq_by_group has read it."""
        params = [t for _, t in self.owned_params(trainable_only=True)]  # frozen ones do not move
        snapshot = [torch.empty_like(t) for t in params]
        if params:
            torch._foreach_copy_(snapshot, params)
        return snapshot

    def update_sumsq_by_group(self, before: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-group sums of squares of the update just applied (`before` minus the weights now:
        computed in place in the snapshot, which is spent afterwards)."""
        names, params = zip(*self.owned_params(trainable_only=True), strict=True) if before else ((), ())
        if before:
            torch._foreach_sub_(before, list(params))
        sums = group_sumsq(zip(names, before, strict=True), self.sumsq_weights(names))
        return self.reduce_owned(sums, trainable_only=True)

    # -- collectives over the default group (identities on one process) ------------------------------
    # Each runs under `collective(name)`: a rank that never comes (hung) or went away (died) ends
    # this one within parallel.timeout_s with a CollectiveError naming this rank and the collective.
    def all_reduce_sum(self, value: torch.Tensor, what: str = "sum", world: bool = False) -> torch.Tensor:
        """Sum a tensor over the data-parallel ranks (what: a name for it in a timeout's message); under
        tensor parallelism, its peers hold the same value and count once. world: over every rank."""
        if not _dist():
            return value
        import torch.distributed as dist

        value = value.clone()
        with collective(f"all_reduce ({what})"):
            dist.all_reduce(value)  # collective
        return value

    def barrier(self) -> None:
        """Wait for every rank."""
        if _dist():
            import torch.distributed as dist

            with collective("barrier"):
                dist.barrier()  # collective

    def first_error(self, error: str | None) -> str | None:
        """The first error message of any rank (in rank order), or None when none had one."""
        if not _dist():
            return error
        import torch.distributed as dist

        gathered: list[str | None] = [None] * dist.get_world_size()
        with collective("all_gather_object (every rank's error, if any)"):
            dist.all_gather_object(gathered, error)  # collective
        return next((e for e in gathered if e), None)

    def broadcast_object(self, value: Any, what: str = "object") -> Any:
        """Rank 0's `value` (anything picklable) on every rank."""
        if not _dist():
            return value
        import torch.distributed as dist

        box = [value]
        with collective(f"broadcast_object_list ({what})"):
            dist.broadcast_object_list(box, src=0)  # collective
        return box[0]

    def broadcast_path(self, path: Path | None) -> Path | None:
        """Rank 0's path on every rank."""
        if not _dist():
            return path
        import torch.distributed as dist

        box = [str(path) if path is not None else None]
        with collective("broadcast_object_list (checkpoint path)"):
            dist.broadcast_object_list(box, src=0)  # collective
        return Path(box[0]) if box[0] is not None else None

    # -- state ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def checkpoint_parts(self) -> dict[str, Any]:
        """The strategy's named checkpoint parts: "model" (model + optimizer, a FilePart),
        "scheduler", and "loss_scaler" where the harness runs one (see trainer/checkpoint)."""

    @abc.abstractmethod
    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The whole model's fp32 weights on CPU, on rank 0 (collective: gathers shards);
        trainable_only: only the parameters that train (LoRA's adapters), not the frozen base."""

    def close(self) -> None:
        """Release the process group, if this run started it (a caller's group is left as it was)."""
        if _dist() and self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class TorchStrategy(Strategy):
    """none / ddp / fsdp: a torch AdamW and its schedule, the harness's dynamic loss scaler under
    fp16 (or bf16 on request), and torch.distributed.checkpoint for model + optimizer."""

    plain_params: ClassVar[bool] = False  # plain tensors, not DTensors (none, ddp): the fused CPU AdamW takes them

    def __init__(
        self, device: torch.device, rank: int = 0, world_size: int = 1, precision: PrecisionConfig | None = None
    ) -> None:
        super().__init__(device, rank, world_size, precision)
        self.scaler = DynamicLossScaler(self.precision) if self.precision.scaled else None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def setup(self, model: nn.Module, weights: WeightSource, optim_cfg: OptimConfig, max_steps: int) -> None:
        self.model = self.parallelize(model, weights)
        # Fused AdamW: one kernel per step on a GPU, and the fused CPU kernel on the CPU (not over
        # FSDP's DTensors there).
        on_gpu = self.device.type == "cuda" and all(p.is_cuda for p in self.model.parameters())
        fused = on_gpu or (self.device.type == "cpu" and self.plain_params)
        self.optimizer = build_optimizer(self.model, optim_cfg, fused=fused)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, max_steps)

    @abc.abstractmethod
    def parallelize(self, model: nn.Module, weights: WeightSource) -> nn.Module:
        """Shard or wrap the meta-device model and materialise it; return what the loop runs."""

    @contextlib.contextmanager
    def micro_step(self, is_last: bool, reduce: bool = False) -> Iterator[None]:
        # The forward and backward hold the strategy's own collectives (DDP's gradient all-reduce,
        # FSDP's all-gathers and reduce-scatters), run inside torch: named here, all at once.
        sync = self.sync_gradients(is_last or reduce)  # reduce: gradients sum to the step's all the same
        with collective(f"forward / backward (parallel={self.name} gradient sync)"), sync:
            with self.autocast():
                yield

    def sync_gradients(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Distributed strategies skip the gradient reduction unless is_last."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already divided by the *global* target count; DDP and FSDP average
        # gradients over ranks, so multiply back by the world size to get the sum. Under loss
        # scaling, also by the scale (undone by unscale_gradients).
        scale = self.scaler.scale if self.scaler is not None else 1.0
        (loss * (self.world_size * scale)).backward()

    def unscale_gradients(self) -> None:
        if self.scaler is None:
            return
        grads = [local(p.grad) for p in self.model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.scaler.scale)

    def grad_sumsq_by_group(self) -> dict[str, torch.Tensor]:
        return group_sumsq((name, p.grad) for name, p in self.model.named_parameters() if p.grad is not None)

    def owned_params(self, trainable_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.model.named_parameters():  # every rank owns all on none / ddp
            # a QLoRA base: frozen, and without the arithmetic the statistics use
            if not quantized(p) and (p.requires_grad or not trainable_only):
                yield name, local(p.detach())

    def clip_and_step(self, grad_norm: torch.Tensor, max_norm: float) -> bool:
        # grad_norm is the global pre-clip norm from grad_sumsq_by_group, so a sharded strategy
        # clips by the norm of the whole gradient, never by its own shard's.
        finite = bool(torch.isfinite(grad_norm))  # host sync: once per step, to decide whether to step
        if self.scaler is not None:
            self.scaler.update(found_non_finite=not finite)
        if not finite:  # drop the gradients; the loss scale has backed off
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self._clip_and_step(grad_norm, max_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _clip_and_step(self, grad_norm: torch.Tensor, max_norm: float, found_inf: torch.Tensor | None = None) -> None:
        """Clip by the coefficient of torch.nn.utils.clip_grad_norm_ (on device, no sync), then step.
        A fused AdamW over plain tensors takes the coefficient as its `grad_scale` (it divides each
        gradient as it reads it: no pass of its own over the gradients) and skips on `found_inf`."""
        fused = self._fused_plain()
        coef = torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0) if max_norm > 0 else None
        if coef is not None and not fused:
            grads = [local(p.grad) for p in self.model.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        if fused:
            self.optimizer.grad_scale = None if coef is None else (1.0 / coef).to(torch.float32)
            self.optimizer.found_inf = found_inf
        try:
            self.optimizer.step()
        finally:
            self.optimizer.grad_scale = self.optimizer.found_inf = None

    def _fused_plain(self) -> bool:
        """A fused AdamW over plain tensors (none / ddp: not FSDP's DTensors)."""
        return bool(self.optimizer.defaults.get("fused")) and self.plain_params

    @property
    def steps_without_sync(self) -> bool:
        # Fused AdamW skips its update when `found_inf` (a device tensor) is set, as under
        # torch's GradScaler; the harness's loss scaler is host state, so it needs the sync.
        # FSDP's DTensors stay on the synchronous path until checked on a GPU.
        return self._fused_plain() and self.scaler is None

    def clip_and_step_on_device(self, grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
        # A non-finite norm gives a 0 / NaN coefficient: that step is skipped by found_inf anyway.
        found_inf = (~torch.isfinite(grad_norm)).to(torch.float32)
        self._clip_and_step(grad_norm, max_norm, found_inf=found_inf)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return found_inf

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def loss_scale(self) -> float | None:
        return self.scaler.scale if self.scaler is not None else None

    def checkpoint_parts(self) -> dict[str, Any]:
        from trainer.parallel.model_state import DCPModelState

        parts: dict[str, Any] = {"model": DCPModelState(self), "scheduler": self.scheduler}
        if self.scaler is not None:
            parts["loss_scaler"] = self.scaler
        return parts

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        if trainable_only:
            return {bare_name(n): p.detach().cpu() for n, p in self.unwrapped().named_parameters() if p.requires_grad}
        return {k: v.detach().cpu() for k, v in self.unwrapped().state_dict().items()}


class SingleDevice(TorchStrategy):
    """`parallel=none`: one process, one device, no wrapper."""

    name = "none"
    plain_params = True
    # How materialize puts each full tensor into the model (None: storage on the device, then a copy).
    # A QLoRA run sets it (lora.run.base_place) to quantise the adapted base weights as they arrive.
    place: Callable[[nn.Parameter, torch.Tensor], None] | None = None

    def parallelize(self, model: nn.Module, weights: WeightSource) -> nn.Module:
        materialize(model, weights, self.device, self.place)
        return model


def materialize(
    model: nn.Module,
    weights: WeightSource,
    device: torch.device,
    place: Callable[[nn.Parameter, torch.Tensor], None] | None = None,
) -> None:
    """Fill a meta-device model (sharded or not) from `weights`, one full tensor at a time: no
    rank ever holds more of the model than its own part plus one parameter.

    By default the model gets its (possibly sharded) storage on `device` first, and each full
    tensor is copied into this rank's part of its parameter; `place(param, full)` replaces that
    step (ZeRO-3 fills a parameter and partitions it at once)."""
    if place is None:
        model.to_empty(device=device)
        place = _copy_into_local_part
    params = {bare_name(name): p for name, p in model.named_parameters()}
    filled = set()
    with torch.no_grad():
        for name, full in weights(device):
            name = bare_name(name)
            if name not in params:
                raise ValueError(f"initial weights name {name!r}, which the model does not have")
            # a checkpoint's tensor not read yet (CheckpointTensor) is read here: its rows only, for a
            # shard; whole for a custom `place` (ZeRO-3, QLoRA)
            place(params[name], full if place is _copy_into_local_part else whole(full))
            filled.add(name)
    missing = sorted(params.keys() - filled)
    if missing:
        raise ValueError(f"initial weights lack {len(missing)} parameters, e.g. {missing[:3]}")


def _copy_into_local_part(param: nn.Parameter, full: torch.Tensor) -> None:
    local(param).copy_(shard_of(full, param))


def whole(tensor: Any) -> torch.Tensor:
    """A weight source's tensor, read whole if it is a checkpoint's tensor not read yet (CheckpointTensor)."""
    return tensor.full() if hasattr(tensor, "rows") else tensor


def shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor for `param`: all of it, or its DTensor shard. A checkpoint's
    tensor not read yet (trainer.model.hf_import.CheckpointTensor) is read only as far as this rank's
    part goes, when that part is a range of rows (FSDP2's dim-0 shards, replicated or not)."""
    if not hasattr(param, "device_mesh"):
        return whole(full)
    from torch.distributed.tensor import distribute_tensor

    if hasattr(full, "rows"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        if tuple(shape[1:]) == tuple(param.shape[1:]) and all(o == 0 for o in offset[1:]):
            return full.rows(offset[0], offset[0] + shape[0]).to(device=param.device, dtype=param.dtype)
        full = full.full()

    full = full.to(device=param.device, dtype=param.dtype)
    # src_data_rank=None: every rank holds the same full tensor, so each slices its own part
    # locally (no scatter).
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def _dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a DTensor under FSDP2); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def quantized(tensor: torch.Tensor) -> bool:
    """A quantised frozen weight (torchao's NF4Tensor, QLoRA's base: it holds packed 4-bit codes)."""
    return not tensor.requires_grad and hasattr(tensor, "quantized_data")


def group_sumsq(
    named_grads: Iterable[tuple[str, torch.Tensor]], weights: list[float] | None = None
) -> dict[str, torch.Tensor]:
    """Per-group sums of squares of (this rank's part of) each tensor, in fp32, on device: one
    _foreach_norm over all of them (a few kernels, not three per parameter), then one index_add
    into the groups, whose indices are worked out once per list of names. weights: a factor per
    tensor on its square (tensor parallelism: 1 / T for a tensor its T peers hold whole)."""
    names, tensors = [], []
    for name, tensor in named_grads:
        names.append(name)
        tensors.append(local(tensor).detach())
    if not tensors:
        return {}
    groups, index = _group_index(tuple(names), tensors[0].device)
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))  # (n_tensors,)
    squares = norms * norms
    if weights is not None:
        squares = squares * torch.tensor(weights, dtype=torch.float32, device=norms.device)
    sums = torch.zeros(len(groups), dtype=torch.float32, device=norms.device).index_add_(0, index, squares)
    return dict(zip(groups, sums.unbind(), strict=True))


@functools.lru_cache(maxsize=16)
def _group_index(names: tuple[str, ...], device: torch.device) -> tuple[list[str], torch.Tensor]:
    """The groups of `names` in first-seen order, and each name's group position (on device)."""
    groups = list(dict.fromkeys(param_group(name) for name in names))
    position = {group: i for i, group in enumerate(groups)}
    return groups, torch.tensor([position[param_group(name)] for name in names], device=device)


def all_reduce_groups(
    sums: dict[str, torch.Tensor], group: Any = None, what: str = "per-group sums of squares"
) -> dict[str, torch.Tensor]:
    """Sum per-group values over ranks in ONE collective (groups in sorted order on every rank)."""
    import torch.distributed as dist

    names = sorted(sums)
    stacked = torch.stack([sums[n] for n in names])
    with collective(f"all_reduce ({what})"):
        dist.all_reduce(stacked, group=group)  # collective: one all-reduce of len(groups) floats
    return dict(zip(names, stacked.unbind(), strict=True))


def global_norm(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """sqrt of the total sum of squares over groups (a 0-dim tensor on the groups' device)."""
    return torch.stack(list(sums.values())).sum().sqrt() if sums else torch.tensor(math.nan)
