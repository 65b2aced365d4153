"""Where each Hugging Face module lives in GPT, and which modules a LoRA config selects.

Read from hf_import's name map (our tensor -> HF tensors, GPT-2's Conv1D transposed, Llama's
q / k / v fused into c_attn) and a meta-device GPT's shapes, so no weights are needed.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from trainer.config import ConfigError, LoraConfig, ModelConfig
from trainer.model.gpt import GPT
from trainer.model.hf_import import _name_map, model_family

KINDS = ("lora_A", "lora_B", "lora_magnitude")  # our adapter tensors: <module>.<kind>.<leaf>


@dataclasses.dataclass(frozen=True)
class HFLinear:
    """One HF linear module inside the blocks: an adapter target."""

    hf_name: str  # e.g. model.layers.0.self_attn.q_proj, transformer.h.0.attn.c_attn
    module: str  # our module, e.g. blocks.0.attn.c_attn
    leaf: str  # the adapter's key in module.lora_A / lora_B: hf_name's last part
    start: int  # its output rows [start, stop) in our weight (out, in)
    stop: int
    in_features: int


@dataclasses.dataclass(frozen=True)
class Layout:
    linears: list[HFLinear]  # adapter targets, in GPT's order
    tensors: dict[str, tuple[str, bool]]  # every GPT tensor with one HF tensor: our name -> (HF key, transposed)
    shapes: dict[str, torch.Size]  # our parameter name -> shape

    def module_params(self) -> dict[str, list[str]]:
        """HF module name -> our parameter names, for modules trained in full (train_modules)."""
        out: dict[str, list[str]] = {}
        for ours, (key, _) in self.tensors.items():
            out.setdefault(key.rsplit(".", 1)[0], []).append(ours)
        return out


def layout(cfg: ModelConfig) -> Layout:
    """The HF names of cfg's modules, read from hf_import's name map and a meta-device GPT's shapes."""
    with torch.device("meta"):
        model = GPT(cfg)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    prefix = model_family(cfg).prefix
    linears, tensors = [], {}
    for row in _name_map(cfg):
        ours, transpose = row.ours, row.how == "conv1d"
        keys = [h if h.startswith(("model.", "lm_head")) else prefix + h for h in row.theirs]
        module = ours.rsplit(".", 1)[0]
        in_blocks = ours.startswith("blocks.") and ours.endswith(".weight")
        if in_blocks and isinstance(model.get_submodule(module), nn.Linear):
            out, inp = shapes[ours]
            sizes = [out] if len(keys) == 1 else _qkv_sizes(cfg)
            start = 0
            for key, size in zip(keys, sizes, strict=True):
                hf_name = key.removesuffix(".weight")
                linears.append(HFLinear(hf_name, module, hf_name.rsplit(".", 1)[1], start, start + size, inp))
                start += size
        if len(keys) == 1:
            tensors[ours] = (keys[0], transpose)
    return Layout(linears, tensors, shapes)


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    hd, nkv = cfg.attn_head_dim, cfg.n_kv_head or cfg.n_head
    return [cfg.n_head * hd, nkv * hd, nkv * hd]


def select_targets(lay: Layout, target_modules: list[str]) -> list[HFLinear]:
    """The adapter targets PEFT would pick for a target_modules list: a name equal to the module's, or
    ending it after a dot; all-linear: every linear in the blocks (not the head)."""
    if "all-linear" in target_modules:
        return list(lay.linears)
    for target in target_modules:
        if not any(_matches(x.hf_name, target) for x in lay.linears):
            names = sorted({x.leaf for x in lay.linears})
            raise ConfigError(f"lora.target_modules: {target!r} matches no module; the model has {names} or all-linear")
    return [x for x in lay.linears if any(_matches(x.hf_name, t) for t in target_modules)]


def _matches(hf_name: str, target: str) -> bool:
    return hf_name == target or hf_name.endswith("." + target)


def select_trained(lay: Layout, train_modules: list[str], adapted: set[str]) -> dict[str, str]:
    """our parameter name -> its HF module, for the modules trained in full. Entries: "norm" (every
    norm, norm_f too), "lm_head" / "head" (the head, or the tied embedding), "embed_tokens" / "wte" /
    "embed", else HF module names matched as PEFT's modules_to_save (the name ends with the entry)."""
    modules = lay.module_params()
    embed = lay.tensors["embed.wte.weight"][0].removesuffix(".weight")
    aliases = {
        "head": "lm_head" if "lm_head" in modules else embed,
        "embed": embed,
        "embed_tokens": embed,
        "wte": embed,
    }
    aliases["lm_head"] = aliases["head"]
    chosen = {}
    for entry in train_modules:
        if entry == "norm":
            hits = [m for m, params in modules.items() if "norm" in params[0]]
        else:
            hits = [aliases[entry]] if entry in aliases else [m for m in modules if m.endswith(entry)]
        if not hits:
            known = "norm, lm_head, embed_tokens or an HF module name"
            raise ConfigError(
                f"lora.train_modules: {entry!r} matches no module; use {known}, e.g. {sorted(modules)[-1]}"
            )
        for m in hits:
            if any(p.rsplit(".", 1)[0] in adapted for p in modules[m]):
                raise ConfigError(f"lora.train_modules: {entry!r} selects {m}, which lora.target_modules adapts")
            chosen |= {p: m for p in modules[m]}
    return chosen


def scale_of(cfg: LoraConfig) -> float:
    """The adapters' output scale: alpha / r, or alpha / sqrt(r) with rslora."""
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)


def split_name(name: str) -> tuple[str, str, str] | None:
    """(module, kind, leaf) of an adapter tensor name; None for a base tensor."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-2] in KINDS:
        return ".".join(parts[:-2]), parts[-2], parts[-1]
    return None


def peft_names(chosen: set[str], candidates: list[str], sep: str) -> list[str]:
    """The shortest PEFT list for the `chosen` HF modules: their last name parts when these select
    exactly them among `candidates` (a candidate matches a name it ends with, after `sep`), else full names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in chosen})
    hits = {c for c in candidates if any(c == leaf or c.endswith(sep + leaf) for leaf in leaves)}
    return leaves if hits == chosen else sorted(chosen)
