"""DeepSpeed ZeRO stages 1-3: optimizer state (1), + gradients (2), + parameters (3) partitioned.

DeepSpeed owns gradient accumulation (its engine knows the boundary from
gradient_accumulation_steps and reduces gradients there), gradient clipping and, in half
precision, loss scaling. This class hides that from the loop: the loop sees the same
micro_step / backward / grad_sumsq_by_group / clip_and_step as for every other strategy.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import Config, ConfigError, OptimConfig
from trainer.model import param_group
from trainer.model.gpt import bare_name
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel.base import (
    Strategy,
    WeightSource,
    all_reduce_groups,
    group_sumsq,
    materialize,
)
from trainer.parallel.model_state import ModelState


def harness_deepspeed_config(cfg: Config, world_size: int, on_gpu: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON that the harness config implies (on_gpu: default, whether a GPU will run it)."""
    stage = int(cfg.parallel.strategy[-1])
    accum = cfg.train.accumulation_steps(world_size)
    zero: dict[str, Any] = {"stage": stage}
    if on_gpu if on_gpu is not None else (cfg.train.device != "cpu" and torch.cuda.is_available()):
        # Reduce gradients on a side stream while backward goes on, into one contiguous buffer
        # (stage 3 overlaps by default; stages 1-2 do not). CUDA streams: GPU only.
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if cfg.parallel.zero_offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.parallel.zero_offload_params:
        zero["offload_param"] = {"device": "cpu"}
    precision = cfg.precision
    fp16: dict[str, Any] = {"enabled": precision.dtype == "fp16"}
    if precision.dtype == "fp16":  # DeepSpeed's dynamic scaler: doubles / halves the scale
        fp16.update(
            loss_scale=0,  # 0 means dynamic
            initial_scale_power=int(math.log2(precision.initial_scale)),
            loss_scale_window=precision.growth_interval,
            hysteresis=1,  # back off on the first overflow, as the harness's own scaler does
            min_loss_scale=1,
        )
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.train.micro_batch_size * accum * world_size,
        "gradient_clipping": cfg.optim.clip_grad_norm,
        "zero_optimization": zero,
        "fp16": fp16,
        "bf16": {"enabled": precision.dtype == "bf16"},
    }


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def merged_deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The user's JSON (parallel.deepspeed_config), if any, under the harness's keys.

    Keys the harness does not set (bucket sizes, overlap_comm, ...) are honoured; a key the
    harness sets to a different value is a contradiction and stops the run, naming the key.
    """
    ours = harness_deepspeed_config(cfg, world_size)
    if not cfg.parallel.deepspeed_config:
        return ours
    path = Path(cfg.parallel.deepspeed_config).expanduser()
    if not path.is_file():
        raise ConfigError(f"parallel.deepspeed_config={path} does not exist: point it at a DeepSpeed JSON file")
    try:
        theirs = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"parallel.deepspeed_config={path} is not valid JSON: {error}") from error
    flat_ours, flat_theirs = _flatten(ours), _flatten(theirs)
    for key, value in flat_theirs.items():
        if key in flat_ours and flat_ours[key] != value and value != "auto":
            raise ConfigError(
                f"parallel.deepspeed_config sets {key}={value} but the harness config implies {flat_ours[key]}: "
                "remove it from the JSON or change the matching harness key (train.*, optim.clip_grad_norm, parallel=)"
            )
    return _merge(theirs, ours)


class DeepSpeedZero(Strategy):
    """`parallel=zero1|zero2|zero3` through deepspeed.initialize.

    The model arrives on the meta device. zero1/2 keep whole parameters on every rank, so it is
    materialised whole; under zero3 each parameter is partitioned as soon as it is filled, so no
    rank ever holds the whole model.
    """

    can_skip_step = False  # DeepSpeed reduces and steps inside engine.step(): a step cannot be dropped

    def __init__(self, device: torch.device, rank: int, world_size: int, cfg: Config) -> None:
        super().__init__(device, rank, world_size, cfg.precision)
        self.cfg = cfg
        self.name = cfg.parallel.strategy
        self.stage = int(self.name[-1])
        self.ds_config = merged_deepspeed_config(cfg, world_size)
        self.ds_config.setdefault("steps_per_print", 10**9)  # DeepSpeed's own logging stays quiet
        self.ds_config.setdefault("zero_allow_untested_optimizer", True)  # our torch AdamW
        self.ds_config.setdefault("zero_force_ds_cpu_optimizer", False)  # ... also when offloading
        self.optimizer: Any = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def setup(self, model: nn.Module, weights: WeightSource, optim_cfg: OptimConfig, max_steps: int) -> None:
        import deepspeed

        if self.stage == 3:  # partitioned as it is filled: no rank holds the whole model
            optimizer = build_optimizer(
                model, optim_cfg
            )  # grouped by the meta shapes; filling keeps each parameter object
            deepspeed.init_distributed(dist_backend=None, dist_init_required=False)  # zero.Init reads the ranks from it
            materialize(model, weights, self.device, place=fill_and_partition(self.ds_config, self.device))
        else:
            materialize(model, weights, self.device)
            # torch's fused AdamW over the fp32 partitions on a GPU (one kernel a step); offloaded
            # partitions live on the CPU, where the foreach one runs.
            on_gpu = self.device.type == "cuda" and not self.cfg.parallel.zero_offload_optimizer
            optimizer = build_optimizer(model, optim_cfg, fused=on_gpu)
        self.names = {p: bare_name(n) for n, p in model.named_parameters()}
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        # Our schedule steps the optimizer DeepSpeed wraps (it shares the param groups).
        self.scheduler = build_scheduler(optimizer, optim_cfg, max_steps)

    def unwrapped(self) -> nn.Module:
        return self.model.module

    def frozen_copy(self, model: nn.Module, weights: WeightSource) -> nn.Module:
        """The frozen reference as TRL's prepare_deepspeed holds it: an engine without an optimizer
        (ZeRO-3: partitioned as it is filled, gathered block by block in forward)."""
        import deepspeed

        model.requires_grad_(False)
        config = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "scheduler")}
        if self.stage == 3:
            materialize(model, weights, self.device, place=fill_and_partition(config, self.device))
        else:
            config["zero_optimization"] = {**config.get("zero_optimization", {}), "stage": 0}
            materialize(model, weights, self.device)
        engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
        engine.eval()  # (DeepSpeedEngine.eval returns None, not the engine)
        return engine

    @contextlib.contextmanager
    def micro_step(self, is_last: bool, reduce: bool = False) -> Iterator[None]:
        # reduce (the noise scale's small batch): DeepSpeed decides when it reduces, and where it
        # keeps a gradient mid-step depends on the stage and the offload; so each rank adds up the
        # squares of its own gradients as autograd hands them over, before DeepSpeed's hooks.
        hooks = []
        if reduce:
            self.local_sumsq = torch.zeros((), device=self.device)
            hooks = [p.register_hook(self._add_local_sumsq) for p in self.names if p.requires_grad]
        try:
            yield  # no autocast: DeepSpeed holds bf16 / fp16 weights itself
        finally:
            for hook in hooks:
                hook.remove()
        if not is_last:
            # DeepSpeed counts micro-steps to find the accumulation boundary; before it, step()
            # only advances the count (no reduction for zero1, no update for any stage).
            self.model.step()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is normalised by the global target count already: undo DeepSpeed's division
        # by the accumulation steps and its average over ranks.
        self.model.backward(loss * self.world_size, scale_wrt_gas=False)

    def grad_sumsq_by_group(self) -> dict[str, torch.Tensor]:
        """Sums of squares of this rank's gradient partitions, summed over ranks in one collective."""
        named = []
        for p, name in self.names.items():
            fragment = self._local_grad(p)
            if fragment is not None:
                named.append((name, fragment))
        sums = self.reduce_owned(group_sumsq(named), trainable_only=True)
        scale = self.loss_scale() or 1.0  # fp16: DeepSpeed unscales inside step(), so divide here
        return {k: v / scale**2 for k, v in sums.items()}

    def _add_local_sumsq(self, grad: torch.Tensor) -> None:
        self.local_sumsq += grad.detach().float().pow(2).sum()

    def small_batch_sq(
        self, local_targets: torch.Tensor, step_targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each rank's own first micro-batch is a small batch (its gradient as backward made it, before
        DeepSpeed reduced it: see micro_step). Returns the mean over the ranks (with targets) of their
        mean gradients' squared norms, and the harmonic mean of their target counts, which is the
        small batch size that mean estimates |G|^2 + tr(Sigma) / B for (trainer.diagnostics.noise_scale)."""
        n = local_targets.float()
        # backward multiplied the loss by the world size: .grad = world * (sum of token gradients) / step_targets
        mean_sq = self.local_sumsq * (step_targets / (self.world_size * n * (self.loss_scale() or 1.0))) ** 2
        counted = (n > 0).float()
        sums = self.all_reduce_sum(
            torch.stack([torch.where(n > 0, mean_sq, 0.0), counted / n.clamp(min=1), counted]),
            "first micro-batch norms",
        )  # collective
        return sums[0] / sums[2], sums[2] / sums[1]

    def reduce_owned(self, sums: dict[str, torch.Tensor], trainable_only: bool = False) -> dict[str, torch.Tensor]:
        for p, name in self.names.items():  # every rank must send every group, even if it owns none
            if p.requires_grad or not trainable_only:
                sums.setdefault(param_group(name), torch.zeros((), device=self.device))
        return all_reduce_groups(sums)

    def owned_params(self, trainable_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's partition of the fp32 master weights, parameter by parameter, then this rank's
        share of the frozen ones (LoRA's base: no master copy), each counted once over the ranks."""
        from deepspeed.utils import safe_get_local_fp32_param

        for p, name in self.names.items():
            if not p.requires_grad:
                continue
            if self.stage == 3:
                yield name, safe_get_local_fp32_param(p)
            elif getattr(p, "_hp_mapping", None) is not None:
                yield name, p._hp_mapping.get_hp_fragment()
        if trainable_only:
            return
        for p, name in self.names.items():
            if p.requires_grad:
                continue
            if self.stage == 3:  # this rank's partition, without the padding of the last one
                size = p.ds_tensor.numel()
                yield name, p.ds_tensor.flatten().narrow(0, 0, max(0, min(size, p.ds_numel - self.rank * size)))
            elif self.rank == 0:  # zero1/2: every rank holds it whole
                yield name, p.detach()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def loss_scale(self) -> float | None:
        if self.precision.dtype != "fp16":
            return None
        return float(self.model.optimizer.loss_scale)

    def _local_grad(self, p: nn.Parameter) -> torch.Tensor | None:
        """The part of p's reduced gradient that this rank's optimizer partition owns."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            return safe_get_local_grad(p)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # no part of p lives in this rank's partition
            return None
        fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
        address = mapping.lp_fragment_address
        if fragment.numel() == p.numel() and address.numel != p.numel():
            fragment = fragment.narrow(0, address.start, address.numel)
        return fragment

    def clip_and_step(self, grad_norm: torch.Tensor, max_norm: float) -> bool:
        # DeepSpeed clips by its own global norm (gradient_clipping = optim.clip_grad_norm),
        # which equals grad_norm; then it steps (or, in fp16, skips on overflow and backs off
        # the scale) and zeroes the gradients.
        self.model.step()
        if not self.model.was_step_applied():
            return False
        self.scheduler.step()
        return True

    def checkpoint_parts(self) -> dict[str, Any]:
        # DeepSpeed's loss scaler is saved inside its own checkpoint, with the optimizer.
        return {"model": DeepSpeedModelState(self), "scheduler": self.scheduler}

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The fp32 master weights (not the bf16 / fp16 working copies), whole, on rank 0; frozen
        parameters (no master copy) as they are stored."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, p in self.model.module.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            full = safe_get_full_fp32_param(p) if p.requires_grad else _gathered(p)  # collective
            if self.rank == 0:
                state[bare_name(name)] = full.detach().cpu().clone()
        return state


def _gathered(param: nn.Parameter) -> torch.Tensor:
    """A frozen parameter whole (ZeRO-3 gathers its partitions; collective), as stored."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):  # a no-op below ZeRO-3
        return param.detach().clone()


def fill_and_partition(ds_config: dict[str, Any], device: torch.device) -> Callable[[nn.Parameter, torch.Tensor], None]:
    """ZeRO-3's way to fill a parameter: the full tensor goes into the (meta) parameter object in
    place, then DeepSpeed's zero.Init partitions that one parameter over the ranks (it keeps this
    rank's slice and drops the rest), as it would for a model built inside its context."""
    import deepspeed

    # In DeepSpeed's precision, as zero1/2's engine casts the whole model and zero.Init casts the
    # parameters built inside it (one filled outside is partitioned as it is): the optimizer keeps
    # fp32 masters of the trainable partitions. Without bf16 / fp16, a frozen parameter keeps the
    # dtype the meta model gave it (lora.base_dtype for the adapted weights: cast_frozen_base).
    low = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else None
    low = torch.float16 if ds_config.get("fp16", {}).get("enabled") else low

    def place(param: nn.Parameter, full: torch.Tensor) -> None:
        dtype = low or (torch.float32 if param.requires_grad else param.dtype)
        filled = nn.Parameter(full.to(device=device, dtype=dtype), requires_grad=param.requires_grad)
        torch.utils.swap_tensors(param, filled)  # the same object: the model and optimizer keep it
        holder = nn.Module()
        holder.register_parameter("param", param)
        deepspeed.zero.Init(module=holder, config_dict_or_path=ds_config)  # collective: partitions it

    return place


class DeepSpeedModelState(ModelState):
    """DeepSpeed's own checkpoint (tag `zero`): each rank writes its ZeRO partitions."""

    def save_tensors(self, directory: Path) -> None:
        """The client state marks it convertible to a universal checkpoint (DeepSpeed's
        ds_to_universal asks for it), which is how it loads at another world size."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.strategy.model.save_checkpoint(
            str(directory), tag="zero", save_latest=False, client_state=info, exclude_frozen_parameters=True
        )  # a frozen (LoRA) base is rebuilt from its source, never copied into checkpoints

    def load_tensors(self, directory: Path, saved_world_size: int) -> None:
        """Load DeepSpeed's checkpoint (collective). Written at another world size, its ZeRO
        partitions do not fit this run's: rank 0 converts it to a universal checkpoint (one file
        per parameter, DeepSpeed's ds_to_universal) in a scratch directory beside the checkpoints,
        every rank loads its new partitions from that, and the scratch directory is removed. The
        checkpoint itself is only read."""
        engine = self.strategy.model
        if saved_world_size == self.strategy.world_size:
            _load_deepspeed(engine, directory)
            return
        import shutil
        import tempfile

        scratch = None
        if self.strategy.rank == 0:
            scratch = Path(tempfile.mkdtemp(prefix=".universal-", dir=directory.parent.parent))
            _to_universal(directory / "zero", scratch / "zero")
        scratch = self.strategy.broadcast_path(scratch)  # collective: rank 0 has converted it
        engine._config.load_universal_checkpoint = True  # read by load_checkpoint at each step of loading
        try:
            _load_deepspeed(engine, scratch)
        finally:
            engine._config.load_universal_checkpoint = False
            self.strategy.barrier()  # collective: every rank has read its partitions
            if self.strategy.rank == 0:
                shutil.rmtree(scratch, ignore_errors=True)


def _load_deepspeed(engine: Any, directory: Path) -> None:
    frozen = any(not p.requires_grad for p in engine.module.parameters())  # LoRA: the base is not in it
    load_path, _ = engine.load_checkpoint(
        str(directory), tag="zero", load_optimizer_states=True, load_lr_scheduler_states=False,
        load_module_strict=not frozen,
    )  # fmt: skip
    if load_path is None:
        raise ConfigError(f"DeepSpeed found no checkpoint in {directory}")


def _to_universal(zero_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process: zero_dir (one tag's partitions) to out_dir."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(argparse.Namespace(
        input_folder=str(zero_dir), output_folder=str(out_dir), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,  # checkpoints saved before the marker
    ))  # fmt: skip
