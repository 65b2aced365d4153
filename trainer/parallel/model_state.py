"""The model + optimizer part of checkpoints, as each strategy writes it (a checkpoint FilePart).

Its directory holds the strategy's own format (torch.distributed.checkpoint here; DeepSpeed's in
zero.py) and info.json: the strategy, the world size, every parameter's shape and the model's
config, so that a checkpoint that cannot load is refused in one line before anything changes,
and `python -m trainer.export` can rebuild the model without a strategy.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.config import ConfigError
from trainer.model.gpt import bare_name

INFO = "info.json"


class ModelState(abc.ABC):
    """save / load of a strategy's model and optimizer (collective: every rank calls them)."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        unwrapped = strategy.unwrapped()
        # Whole shapes: a ZeRO-3 partitioned parameter's own shape is empty (its ds_shape is the whole).
        self.shapes = {bare_name(n): list(getattr(p, "ds_shape", p.shape)) for n, p in unwrapped.named_parameters()}
        if strategy.experts is not None:  # an expert block's whole tensor: what the checkpoint holds
            self.shapes.update(strategy.experts.full_shapes)
        cfg = getattr(unwrapped, "cfg", None)
        self.info = {
            "strategy": strategy.name, "world_size": strategy.world_size, "shapes": self.shapes,
            "model_config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
        }  # fmt: skip

    def save(self, directory: Path) -> None:
        self.write_info(directory)
        self.save_tensors(directory)

    def load(self, directory: Path) -> None:
        info = read_info(directory)
        check_compatible(info, self.shapes, self.strategy.name, self.strategy.world_size, directory.parent)
        self.load_tensors(directory, info["world_size"])

    def write_info(self, directory: Path) -> None:
        if self.strategy.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / INFO).write_text(json.dumps(self.info, indent=1))

    @abc.abstractmethod
    def save_tensors(self, directory: Path) -> None:
        """Write this rank's model and optimizer tensors into directory (collective)."""

    @abc.abstractmethod
    def load_tensors(self, directory: Path, saved_world_size: int) -> None:
        """Fill the model and optimizer from directory, written at saved_world_size (collective)."""


class DCPModelState(ModelState):
    """none / ddp / fsdp: torch.distributed.checkpoint, each rank writing its own shards, keyed
    by parameter name, so the result loads at any world size (and into any of the three)."""

    def _options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # A frozen (LoRA) base is rebuilt from its source at every start: never copied into checkpoints.
        frozen = any(not p.requires_grad for p in self.strategy.model.parameters())
        return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.strategy.model, self.strategy.optimizer, options=self._options())
        state = {"model": model_state, "optim": optim_state}
        if self.strategy.experts is not None:  # each rank's expert blocks, saved once under the whole tensor
            state = self.strategy.experts.to_dtensors(state)
        return self._regroup(state, canonical=True)

    def _regroup(self, state: dict[str, Any], canonical: bool) -> dict[str, Any]:
        """Under tensor parallelism, the fused q / k / v (gate / up) tensors and their optimizer state as
        new DTensors in the canonical row order (the checkpoint's, whatever the layout), or back in the
        order the split model holds (trainer/parallel/tensor.py); unchanged otherwise."""
        tensor = getattr(self.strategy, "tensor", 1)
        if tensor == 1:
            return state
        from trainer.parallel.tensor import fused_kind, regroup_dtensor

        cfg = self.strategy.unwrapped().cfg
        move = lambda name, value: regroup_dtensor(name, value, cfg, tensor, canonical)  # noqa: E731
        model = {name: move(name, value) for name, value in state["model"].items()}
        optim = dict(state["optim"])
        optim["state"] = {
            name: {k: move(name, v) for k, v in values.items()} if fused_kind(name, cfg) else values
            for name, values in state["optim"]["state"].items()
        }
        return {**state, "model": model, "optim": optim}

    def save_tensors(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        with _quiet_single_process():
            dcp.save(self._state(), checkpoint_id=str(directory), no_dist=not _dist())  # collective

    def save_async(self, directory: Path, group: Any) -> Any:
        """Like save, but returns once the tensors are staged in CPU memory; the write runs in a
        background thread on `group`. Returns a future (collective)."""
        import torch.distributed.checkpoint as dcp

        self.write_info(directory)
        with _quiet_single_process():
            return dcp.async_save(self._state(), checkpoint_id=str(directory), no_dist=not _dist(), process_group=group)

    def load_tensors(self, directory: Path, saved_world_size: int) -> None:
        """Load what save wrote, resharded to this run's layout (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        optimizer = self.strategy.optimizer
        # How this run's optimizer computes (a fused CPU / GPU kernel, foreach) is its own, not state: a
        # checkpoint written by another strategy (FSDP's unfused AdamW, loaded by parallel=none's fused one)
        # must not switch it, or the step would take the wrong kernel's arguments.
        kernels = [{k: g[k] for k in OPTIMIZER_KERNEL if k in g} for g in optimizer.param_groups]
        state = self._state()
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(directory), no_dist=not _dist())  # fills the tensors in place
        if self.strategy.experts is not None:
            state = self.strategy.experts.to_local(state)
        state = self._regroup(state, canonical=False)
        set_state_dict(
            self.strategy.model, optimizer,
            model_state_dict=state["model"], optim_state_dict=state["optim"], options=self._options(),
        )  # fmt: skip
        for group, kept in zip(optimizer.param_groups, kernels, strict=True):
            group.update(kept)


OPTIMIZER_KERNEL = ("fused", "foreach", "capturable", "differentiable")  # param_group keys that pick the kernel


def read_info(directory: Path) -> dict[str, Any]:
    """A model part's info.json (one line when it is missing: not a checkpoint of this trainer)."""
    path = directory / INFO
    if not path.is_file():
        raise ConfigError(f"{path} is missing: {directory.parent} is not a checkpoint this trainer wrote")
    return json.loads(path.read_text())


def check_compatible(
    info: dict[str, Any], shapes: dict[str, list[int]], strategy: str, world_size: int, path: Path
) -> None:
    """A checkpoint of another model shape, or of a strategy whose format this one cannot read:
    one line, before loading. (World sizes may differ: DCP reshards, and a ZeRO-1/2 checkpoint is
    converted to a universal one.)"""
    saved = info["shapes"]
    mismatched = sorted(
        f"{name} {saved.get(name)} vs {shape}" for name, shape in shapes.items() if saved.get(name) != shape
    ) + sorted(f"{name} {shape} vs absent" for name, shape in saved.items() if name not in shapes)
    if mismatched:
        listed = "; ".join(mismatched[:8]) + (f"; ... {len(mismatched) - 8} more" if len(mismatched) > 8 else "")
        vocab_rows = {"embed.wte.weight", "head.weight"}
        rows_only = all(
            name in vocab_rows and saved.get(name) and saved[name][1:] == shape[1:]
            for name, shape in shapes.items() if saved.get(name) != shape
        )  # fmt: skip
        hint = ""
        if rows_only:
            hint = " (only the vocabulary rows differ: a checkpoint from before padding resumes with model.vocab_multiple=1)"
        raise ConfigError(f"checkpoint {path} is from a different model shape (checkpoint vs model): {listed}{hint}")
    if info["strategy"] != strategy and (info["strategy"].startswith("zero") or strategy.startswith("zero")):
        raise ConfigError(
            f"checkpoint {path} was written by parallel={info['strategy']}; DeepSpeed and torch checkpoints "
            f"do not load into each other: resume with parallel={info['strategy']} (or export it with python -m trainer.export)"
        )
    if strategy == "zero3" and info["world_size"] != world_size:
        raise ConfigError(
            f"checkpoint {path} holds ZeRO-3 partitions for {info['world_size']} ranks, this run has "
            f"{world_size}: resume ZeRO-3 at world size {info['world_size']} (DeepSpeed's universal "
            "checkpoint restores ZeRO-3's optimizer state inexactly), or save with zero1 / zero2, which resume at any"
        )


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' when there is no process group: we know."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
