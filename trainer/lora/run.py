"""LoRA in a training run: adapters onto the meta-built model before it is sharded, and the two
checkpoint parts that go with them.

    weights, adapted, lora = add_adapters(model, weights, cfg, model_cfg)   # before parallelize
    strategy.place = base_place(model, strategy.device)                     # QLoRA only: NF4 as it fills
    parts["adapter"] = AdapterPart(strategy, model_cfg, lora, base)        # PEFT files, every checkpoint
    parts["lora"] = BaseRef(base_reference(model_cfg, seed))               # the base, by path + checksum

The frozen base is never written into checkpoints (the strategies' model part leaves frozen
parameters out): a resumed run rebuilds it from `model.pretrained` (or the seeded init), and the
checkpoint's `lora` part refuses a base that is not the one it was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import Config, ConfigError, LoraConfig, ModelConfig
from trainer.lora.layer import LoRALinear, apply_lora, with_adapter_init
from trainer.lora.peft_io import load_adapter, save_adapter
from trainer.lora.qlora import BLOCK_SIZE, quantizing_place
from trainer.model.build import WeightSource

BASE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_adapters(
    model: nn.Module, weights: WeightSource, cfg: Config, model_cfg: ModelConfig
) -> tuple[WeightSource, list[str], LoraConfig]:
    """Swap the targeted linears of the meta-device `model` for LoRA ones, freeze the rest, give
    the frozen base its storage dtype (lora.base_dtype; with lora.quantize_base=nf4 the adapted
    linears' weights are then quantised from that dtype as they are filled: base_place) and stream
    the adapters' initial values with the base weights. With lora.init_from, the adapter there
    (PEFT format) is the start, and its settings (r, alpha, targets, DoRA, rsLoRA, trained modules)
    are the run's."""
    lora = cfg.lora
    adapter = None
    if lora.init_from:
        adapter, found = load_adapter(lora.init_from, model_cfg)
        lora = dataclasses.replace(
            lora, r=found.r, alpha=found.alpha, target_modules=found.target_modules,
            target_parameters=found.target_parameters, rslora=found.rslora, dora=found.dora,
            train_modules=found.train_modules,
        )  # fmt: skip
    adapted = apply_lora(model, lora)
    if lora.quantize_base:
        check_quantizable(model)
    cast_frozen_base(model, BASE_DTYPES[lora.base_dtype], autocast=cfg.precision.dtype in ("bf16", "fp16"))
    seed = lora.seed if lora.seed is not None else cfg.train.seed
    return with_adapter_init(weights, model, seed, adapter), adapted, lora


def cast_frozen_base(model: nn.Module, dtype: torch.dtype, autocast: bool) -> None:
    """Store the frozen matrices in `dtype` (on the meta device only the dtype their storage will get
    changes). Norms stay fp32 (tiny, and CPU layer norms refuse a bf16 weight on fp32 input). Without
    autocast only the adapted linears' weights are cast (LoRALinear casts them to its input's dtype);
    a plain frozen linear or embedding in bf16 would meet fp32 activations it cannot multiply."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad or param.dim() < 2:
                continue
            if autocast or isinstance(module, LoRALinear):
                param.data = param.data.to(dtype)


def check_quantizable(model: nn.Module) -> None:
    """One line when an adapted weight cannot be cut into NF4's blocks of 64 weights."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.weight.numel() % BLOCK_SIZE:
            raise ConfigError(
                f"lora.quantize_base=nf4 quantises blocks of {BLOCK_SIZE} weights, and {name}.weight "
                f"{tuple(module.weight.shape)} holds {module.weight.numel()}: leave that module out of "
                "lora.target_modules, or drop lora.quantize_base"
            )


def base_place(model: nn.Module, device: torch.device) -> Any:
    """materialize's `place` for a meta-device model with QLoRA layers: their base weights quantised to
    NF4 one at a time as they are filled, from the dtype cast_frozen_base gave them (see
    qlora.quantizing_place); None (a plain copy) for a model without."""
    weights = [m.weight for m in model.modules() if isinstance(m, LoRALinear) and m.quantize]
    return quantizing_place(weights, device) if weights else None


def base_reference(model_cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """What the adapters were trained on: the pretrained checkpoint (its path and a sha256 over its
    weight files, read at each start: seconds for a few GB) or the seeded random init of this shape."""
    if not model_cfg.pretrained:
        return {"pretrained": None, "seed": seed, "shape": _shape(model_cfg)}
    path = Path(model_cfg.pretrained).expanduser()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return {"pretrained": str(path.resolve()), "sha256": digest.hexdigest(), "shape": _shape(model_cfg)}


def _shape(model_cfg: ModelConfig) -> dict[str, Any]:
    keys = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "hf_model_type")
    return {k: getattr(model_cfg, k) for k in keys}


class BaseRef:
    """The checkpoint's `lora` part: the base reference and the LoRA settings. Loading it checks
    that this run's base is the one the adapters were trained on."""

    def __init__(self, base: dict[str, Any], lora: LoraConfig, adapted: list[str]) -> None:
        self.base, self.lora, self.adapted = base, lora, adapted

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base, "config": dataclasses.asdict(self.lora), "adapted": self.adapted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["base"]
        if saved.get("sha256") != self.base.get("sha256") or saved.get("shape") != self.base.get("shape"):
            where = saved.get("pretrained") or f"a random init (seed {saved.get('seed')})"
            raise ConfigError(
                f"the checkpoint's adapters were trained on another base ({where}, sha256 "
                f"{str(saved.get('sha256'))[:12]}): resume with that model.pretrained, or start a new run dir"
            )
        if saved.get("seed") != self.base.get("seed") and saved.get("pretrained") is None:
            raise ConfigError(
                f"the checkpoint's adapters were trained on a random base drawn with seed {saved['seed']}, "
                f"this run draws seed {self.base['seed']}: resume with train.seed={saved['seed']}"
            )


class AdapterPart:
    """The adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), written by
    rank 0 from the gathered trainable tensors (collective: every rank gathers its shards), so
    neither an empty file (ZeRO-3) nor one rank's shard (FSDP) is ever saved. Loading reads
    nothing: the model part restores the adapters with their optimizer state."""

    def __init__(self, strategy: Any, model_cfg: ModelConfig, lora: LoraConfig, base: str | None) -> None:
        self.strategy, self.model_cfg, self.lora, self.base = strategy, model_cfg, lora, base

    def save(self, directory: Path) -> None:
        state = self.strategy.full_state_dict(trainable_only=True)  # collective
        if self.strategy.rank == 0:
            write_adapter(directory, state, self.model_cfg, self.lora, self.base)

    def load(self, directory: Path) -> None:
        return None


def write_adapter(
    directory: Path, state: Mapping[str, torch.Tensor], model_cfg: ModelConfig, lora: LoraConfig, base: str | None
) -> None:
    """PEFT files into `directory`, the adapters in fp32; refuses an adapter that gathered empty."""
    empty = sorted(name for name, tensor in state.items() if tensor.numel() == 0)
    if empty:
        raise RuntimeError(f"adapter tensors gathered empty (e.g. {empty[:3]}): refusing to write an empty adapter")
    save_adapter(directory, {k: v.float() for k, v in state.items()}, model_cfg, lora, base)
