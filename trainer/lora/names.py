"""Where each Hugging Face module lives in GPT, and which modules a LoRA config selects.

Read from hf_import's name map (our tensor -> HF tensors, GPT-2's Conv1D transposed, Llama's
q / k / v fused into c_attn, a sparse MLP's experts stacked) and a meta-device GPT's shapes, so no
weights are needed. A sparse MLP is named as transformers 5 holds it, which is what PEFT adapts: the
router `model.layers.N.mlp.gate` and the fused experts `model.layers.N.mlp.experts.gate_up_proj` /
`.down_proj` (Mixtral's checkpoint says block_sparse_moe and one tensor per expert).
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
class HFExperts:
    """One fused expert parameter of a sparse MLP, as transformers 5 holds it: an adapter target (PEFT's
    target_parameters, see experts.py)."""

    hf_name: str  # e.g. model.layers.0.mlp.experts.gate_up_proj
    module: str  # our SparseMLP, e.g. blocks.0.mlp
    leaf: str  # gate_up_proj (our w_gate and w_up) or down_proj (w_down)
    parts: tuple[str, ...]  # the checkpoint's per-expert names it fuses: (w1, w3), (w2), (gate_proj, up_proj) ...
    n_experts: int
    out_features: int
    in_features: int


@dataclasses.dataclass(frozen=True)
class Layout:
    linears: list[HFLinear]  # adapter targets, in GPT's order
    experts: list[HFExperts]  # the sparse MLPs' fused expert parameters, in GPT's order
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
    linears, tensors, parts = [], {}, {}
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
                hf_name = transformers5_name(key.removesuffix(".weight"))
                linears.append(HFLinear(hf_name, module, hf_name.rsplit(".", 1)[1], start, start + size, inp))
                start += size
        if row.how == "stack":  # a sparse MLP's w_gate / w_up / w_down from experts.{e}.<part>.weight
            parts[ours] = keys[0].removesuffix(".weight").rsplit(".", 1)[1]
        if len(keys) == 1:
            tensors[ours] = (keys[0], transpose)
    return Layout(linears, _experts(linears, parts, shapes), tensors, shapes)


def transformers5_name(hf_name: str) -> str:
    """A checkpoint's module name as transformers 5 names the module: Mixtral's block_sparse_moe is its
    `mlp` (transformers' conversion_mapping renames it on load); every other name is the same."""
    return hf_name.replace(".block_sparse_moe.", ".mlp.")


def is_router(x: HFLinear) -> bool:
    """Whether x is a sparse MLP's router (HF `gate`), which PEFT adapts as a parameter on transformers 5."""
    return x.module.endswith(".mlp.router")


def _experts(linears: list[HFLinear], parts: dict[str, str], shapes: dict[str, torch.Size]) -> list[HFExperts]:
    """The fused expert parameters of each sparse MLP (found by its router, `<mlp>.router`)."""
    out = []
    for router in filter(is_router, linears):
        mlp, container = router.module.removesuffix(".router"), router.hf_name.removesuffix(".gate") + ".experts"
        (n, inter, hidden) = shapes[f"{mlp}.w_gate"]
        names = {w: parts[f"{mlp}.{w}"] for w in ("w_gate", "w_up", "w_down")}
        out.append(HFExperts(f"{container}.gate_up_proj", mlp, "gate_up_proj", (names["w_gate"], names["w_up"]),
                             n, 2 * inter, hidden))  # fmt: skip
        out.append(HFExperts(f"{container}.down_proj", mlp, "down_proj", (names["w_down"],), n, hidden, inter))
    return out


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    hd, nkv = cfg.attn_head_dim, cfg.n_kv_head or cfg.n_head
    return [cfg.n_head * hd, nkv * hd, nkv * hd]


def select_targets(lay: Layout, target_modules: list[str], target_parameters: list[str] = ()) -> list[HFLinear]:
    """The linear adapter targets PEFT would pick: for each target_modules entry, the modules whose name
    equals it or ends with it after a dot; all-linear: every linear in the blocks (not the head). With
    experts, as PEFT on transformers 5: the experts' names (expert_names) select experts (select_experts),
    never a dense MLP's linear, and `gate` (or a target_parameters entry matching `<router>.weight`) every router."""
    experts = expert_names(lay)
    linears = [x for x in lay.linears if x.leaf not in experts]
    routers = [x for x in linears if is_router(x)]
    chosen = []
    for target in target_modules:
        if target == "all-linear":
            hits = linears
        elif routers and target.rsplit(".", 1)[-1] == "gate":  # PEFT maps it to every router's gate.weight
            hits = routers
        else:
            hits = [x for x in linears if _matches(x.hf_name, target)]
        if not hits and target.rsplit(".", 1)[-1] not in experts:
            names = sorted({x.leaf for x in linears} | set(experts))
            raise ConfigError(f"lora.target_modules: {target!r} matches no module; the model has {names} or all-linear")
        chosen += hits
    chosen += [x for x in routers if any(_matches(f"{x.hf_name}.weight", t) for t in target_parameters)]
    return [x for x in lay.linears if x in chosen]


def expert_names(lay: Layout) -> set[str]:
    """The checkpoint's per-expert names (w1 w3 w2, gate_proj up_proj down_proj), which PEFT accepts in
    target_modules for the fused experts."""
    return {part for x in lay.experts for part in x.parts}


def select_experts(lay: Layout, target_modules: list[str], target_parameters: list[str]) -> dict[HFExperts, int]:
    """The fused expert parameters PEFT on transformers 5 adapts, each with its rank factor (its rank is
    r times that, its alpha alpha times that): a target_parameters entry matching the parameter's name
    (equal, or ending it after a dot), factor 1; the checkpoint's names in target_modules (a name or its
    last part; all-linear is all of them), which PEFT maps onto the fused parameters, gate_up_proj with
    rank 2r and alpha 2 alpha (rank_pattern / alpha_pattern). gate and up need each other: they are one
    parameter."""
    named = {t.rsplit(".", 1)[-1] for t in target_modules}
    if "all-linear" in target_modules:
        named |= expert_names(lay)
    chosen: dict[HFExperts, int] = {}
    for x in lay.experts:
        hit = named & set(x.parts)
        if hit and hit != set(x.parts):
            raise ConfigError(
                f"lora.target_modules: {sorted(hit)[0]!r} without {sorted(set(x.parts) - hit)[0]!r}: transformers 5 "
                f"fuses them into {x.leaf}, which PEFT adapts whole; name both"
            )
        if hit:
            chosen[x] = len(x.parts)
        elif any(_matches(x.hf_name, t) for t in target_parameters):
            chosen[x] = 1
    for target in target_parameters:
        params = [x.hf_name for x in lay.experts] + [f"{x.hf_name}.weight" for x in lay.linears if is_router(x)]
        if not any(_matches(name, target) for name in params):
            raise ConfigError(
                f"lora.target_parameters: {target!r} matches no parameter; the model has "
                f"{sorted({name.split('.mlp.')[-1] for name in params}) or 'none'}"
            )
    return chosen


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


def scale_of(cfg: LoraConfig, factor: int = 1) -> float:
    """The adapters' output scale: alpha / r, or alpha / sqrt(r) with rslora; for a rank factor (an
    expert's gate_up_proj), the scale of rank factor r and alpha factor alpha, as PEFT's patterns give."""
    return factor * cfg.alpha / (math.sqrt(factor * cfg.r) if cfg.rslora else factor * cfg.r)


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
