"""The adapter layer, putting it into a GPT, its initial values, and merging it back out."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import ConfigError, LoraConfig, ModelConfig
from trainer.lora.experts import LoRAExperts, initial_expert_adapters, merge_experts
from trainer.lora.names import (
    HFExperts,
    HFLinear,
    is_router,
    layout,
    scale_of,
    select_experts,
    select_targets,
    select_trained,
    split_name,
)
from trainer.lora.qlora import dequantize, is_nf4, linear_nf4, quantize, quantize_parameter
from trainer.model.build import WeightSource
from trainer.model.gpt import GPT, bare_name


class LoRALinear(nn.Linear):
    """nn.Linear plus low-rank adapters over disjoint row slices of its output.

    y = x W^T + b, and on each slice s: + scale B_s A_s dropout(x). With DoRA, as PEFT's
    DoraLinearLayer: y_s = (m_s / ||W_s + scale B_s A_s||_row) (W_s x + scale B_s A_s x) + b_s, the
    norm detached from the graph. The base weight may be stored in another dtype (bf16) than x and
    the adapters (fp32): it is cast to x's dtype for the matmul. With quantize="nf4" (QLoRA) the
    base is stored in NF4 once filled (see qlora.py): the matmul dequantises it, DoRA uses it dequantised.
    """

    def __init__(
        self,
        base: nn.Linear,
        slices: dict[str, tuple[int, int]],
        r: int,
        scale: float,
        dropout: float,
        dora: bool,
        quantize: str | None = None,
    ):
        nn.Module.__init__(self)  # not nn.Linear's: the base parameters are reused, not allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.slices = dict(sorted(slices.items(), key=lambda item: item[1]))  # leaf -> (start, stop) rows
        self.scale = scale
        self.quantize = quantize  # nf4: the base weight is (to be) stored in NF4
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device, rows = base.weight.device, {leaf: stop - start for leaf, (start, stop) in self.slices.items()}
        self.lora_A = _parameters({leaf: (r, self.in_features) for leaf in rows}, device)  # (r, in)
        self.lora_B = _parameters({leaf: (n, r) for leaf, n in rows.items()}, device)  # (rows, r)
        self.lora_magnitude = _parameters({leaf: (n,) for leaf, n in rows.items()} if dora else {}, device)

    adapters_off = False  # set by `adapters_off(model)`: the base alone (a DPO / GRPO reference)
    # parallel.tensor: the forward of the layer split over ranks, its adapters following the base
    # (trainer.parallel.tensor.split_lora sets it)
    split_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_forward is not None:
            return self.split_forward(self, x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if is_nf4(self.weight):  # QLoRA: no dequantised copy of the base is kept for backward
            y = linear_nf4(x, self.weight, bias)  # (..., out)
        elif torch.is_autocast_enabled(x.device.type):  # autocast casts x and the base: no fp32 copy of a bf16 base
            y = F.linear(x, self.weight, self.bias)  # (..., out)
        else:
            y = F.linear(x, self.weight.to(x.dtype), bias)  # (..., out)
        if self.adapters_off:
            return y
        pieces, end = [], 0  # y's rows, each adapted slice with its delta added (no in-place op)
        for leaf, (start, stop) in self.slices.items():
            if start > end:
                pieces.append(y[..., end:start])
            pieces.append(y[..., start:stop] + self._delta(leaf, x, start, stop).to(y.dtype))
            end = stop
        if end < self.out_features:
            pieces.append(y[..., end:])
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def _delta(self, leaf: str, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """What adapter `leaf` adds to rows [start, stop): (..., stop - start)."""
        A, B = self.lora_A[leaf], self.lora_B[leaf]  # (r, in), (rows, r)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear casts: no copy of x kept
            x = x.to(A.dtype)
        x = self.dropout(x)
        lora = F.linear(F.linear(x, A), B) * self.scale  # (..., rows)
        if leaf not in self.lora_magnitude:
            return lora
        base = dequantize(self.weight) if is_nf4(self.weight) else self.weight  # QLoRA: DoRA keeps this dense copy
        weight = base[start:stop].to(A.dtype)  # (rows, in)
        # DoRA (Liu et al. 2024, section 4.3): the row norm of W + scale B A is treated as a constant.
        norm = torch.linalg.norm(weight + self.scale * (B @ A).detach(), dim=1).detach()  # (rows,)
        factor = self.lora_magnitude[leaf] / norm  # (rows,)
        return (factor - 1) * F.linear(x, weight) + factor * lora

    def extra_repr(self) -> str:
        dora = ", dora" if len(self.lora_magnitude) else ""
        base = f", base={self.quantize}" if self.quantize else ""
        return f"{super().extra_repr()}, adapters={dict(self.slices)}, scale={self.scale:g}{dora}{base}"


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[int]:
    """Within the block every adapter of `model` (LoRA, DoRA, QLoRA, expert adapters) is off: the model
    computes its frozen base alone, as PEFT's `disable_adapter()`. The reference model of preference
    and RL objectives under LoRA, with no second copy. Yields the number of adapted modules."""
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear | LoRAExperts)]
    for module in adapted:
        module.adapters_off = True
    try:
        yield len(adapted)
    finally:
        for module in adapted:
            module.adapters_off = False


def _parameters(shapes: dict[str, tuple[int, ...]], device: torch.device) -> nn.ParameterDict:
    """fp32 parameters of these shapes, uninitialised (meta: no storage)."""
    return nn.ParameterDict({k: torch.empty(shape, dtype=torch.float32, device=device) for k, shape in shapes.items()})


def apply_lora(model: GPT, cfg: LoraConfig, seed: int | None = None) -> list[str]:
    """Replace each targeted nn.Linear of `model` (meta-device or real) by a LoRALinear and each sparse
    MLP with targeted experts by a LoRAExperts, freeze every parameter but the adapters and
    cfg.train_modules, and return the adapted HF module (expert parameter) names.

    Base parameters keep their names, objects and dtypes. Adapters are fp32, on the base's device;
    on a real model they are initialised here (as with_adapter_init does, seed: cfg.seed, else 0),
    on the meta device they wait for with_adapter_init. With cfg.quantize_base=nf4 the adapted
    weights of a real model are quantised here (in their dtype); a meta model's, as materialize
    fills them (run.base_place)."""
    if _adapted(model):
        raise ValueError("apply_lora: the model already has adapters")
    lay = layout(model.cfg)
    targets = select_targets(lay, cfg.target_modules, cfg.target_parameters)
    experts = select_experts(lay, cfg.target_modules, cfg.target_parameters)
    check_expert_settings(cfg, targets, experts)
    by_mlp: dict[str, dict[str, int]] = {}  # our SparseMLP -> adapter leaf -> rank factor
    for x, factor in experts.items():
        by_mlp.setdefault(x.module, {})[x.leaf] = factor
    for name, factors in by_mlp.items():
        parent, child = name.rsplit(".", 1)
        ranks = {leaf: factor * cfg.r for leaf, factor in factors.items()}
        scales = {leaf: scale_of(cfg, factor) for leaf, factor in factors.items()}
        setattr(model.get_submodule(parent), child, LoRAExperts(model.get_submodule(name), ranks, scales))
    by_module: dict[str, dict[str, tuple[int, int]]] = {}
    for x in targets:
        by_module.setdefault(x.module, {})[x.leaf] = (x.start, x.stop)
    trained = select_trained(lay, cfg.train_modules, set(by_module))
    for name, slices in by_module.items():
        parent, child = name.rsplit(".", 1)
        base = model.get_submodule(name)
        setattr(
            model.get_submodule(parent),
            child,
            LoRALinear(base, slices, cfg.r, scale_of(cfg), cfg.dropout, cfg.dora, cfg.quantize_base),
        )
    for name, p in model.named_parameters():
        p.requires_grad_(split_name(bare_name(name)) is not None or bare_name(name) in trained)
    if model.embed.wte.weight.device.type != "meta":
        seed = (cfg.seed or 0) if seed is None else seed
        with torch.no_grad():
            for name, module in _adapted(model).items():
                for key, value in _initial_adapters(name, module, getattr(module, _base_name(module)), seed).items():
                    module.get_parameter(key.removeprefix(name + ".")).copy_(value)
                if isinstance(module, LoRALinear) and module.quantize:
                    quantize_parameter(module.weight)
    return [x.hf_name for x in targets] + [x.hf_name for x in experts]


def check_expert_settings(cfg: LoraConfig, targets: list[HFLinear], experts: dict[HFExperts, int]) -> None:
    """One line for what PEFT cannot hold on transformers 5's experts and routers (its ParamWrapper: no
    dropout, no DoRA) or what this module does not do there (NF4 expert weights)."""
    routers = [x for x in targets if is_router(x)]
    if not experts and not routers:
        return
    what = "experts" if experts else "routers"
    fix = "or target attention only (q_proj, k_proj, v_proj, o_proj)"
    if cfg.dora:
        raise ConfigError(f"lora.dora=true: PEFT has no DoRA for transformers 5's {what} (ParamWrapper); {fix}")
    if cfg.dropout:
        raise ConfigError(
            f"lora.dropout={cfg.dropout}: PEFT's ParamWrapper, which adapts transformers 5's {what}, has no dropout; "
            f"set lora.dropout=0, {fix}"
        )
    if cfg.quantize_base and experts:
        raise ConfigError(f"lora.quantize_base={cfg.quantize_base} quantises linears, not stacked experts; {fix}")


def _adapted(model: nn.Module) -> dict[str, LoRALinear | LoRAExperts]:
    return {bare_name(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear | LoRAExperts)}


def _base_name(module: LoRALinear | LoRAExperts) -> str:
    """The base tensor a module's adapters are streamed after (with_adapter_init); a LoRALinear's weight
    also gives DoRA's magnitude."""
    return "w_down" if isinstance(module, LoRAExperts) else "weight"


def _generator(seed: int, a_name: str) -> torch.Generator:
    """A's own generator, seeded by `seed` and its name: independent of order and rank."""
    digest = hashlib.sha256(f"{seed}:{a_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _initial_adapters(
    module_name: str, module: LoRALinear | LoRAExperts, weight: torch.Tensor, seed: int
) -> dict[str, torch.Tensor]:
    """The adapters' initial values (our names -> fp32 CPU tensors) as PEFT draws them: A Kaiming-uniform
    (a = sqrt 5), B zero, DoRA's magnitude the row norms of `weight` (full) as the module stores it
    (rounded to its dtype; quantised to NF4 and back on a QLoRA base).
    Each A comes from its own generator seeded by `seed` and its name: independent of order and rank."""
    if isinstance(module, LoRAExperts):
        return initial_expert_adapters(module_name, module, lambda a_name: _generator(seed, a_name))
    out, stored = {}, None
    for leaf, (start, stop) in module.slices.items():
        a_name = f"{module_name}.lora_A.{leaf}"
        A = torch.empty(module.lora_A[leaf].shape)
        out[a_name] = nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=_generator(seed, a_name))
        out[f"{module_name}.lora_B.{leaf}"] = torch.zeros(module.lora_B[leaf].shape)
        if leaf in module.lora_magnitude:
            stored = _as_stored(module, weight) if stored is None else stored
            out[f"{module_name}.lora_magnitude.{leaf}"] = torch.linalg.norm(stored[start:stop], dim=1)
    return out


def _as_stored(module: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
    """The full base weight as `module` stores it, in fp32 on the CPU: rounded to its dtype, or (QLoRA)
    quantised to NF4 and back, as run.base_place / apply_lora will store it."""
    weight = weight.full() if hasattr(weight, "rows") else weight  # a checkpoint's tensor not read yet
    if is_nf4(weight):
        return dequantize(weight).float().cpu()
    weight = weight.detach().to(module.weight.dtype)
    if module.quantize:
        weight = dequantize(quantize(weight))
    return weight.float().cpu()


def with_adapter_init(
    weights: WeightSource, model: nn.Module, seed: int, adapter: Mapping[str, torch.Tensor] | None = None
) -> WeightSource:
    """`weights` (base tensors, passed through) plus, right after each adapted module's base weight,
    that module's adapter tensors: fresh ones (see _initial_adapters), or those in `adapter` (our
    names, e.g. from load_adapter), which also replace the base tensors it names (train_modules).
    Adapter tensors in `weights` are dropped: a seeded random init (GPT.initial_weights) draws a
    tensor for every parameter of the model, adapters included, which would overwrite these."""
    adapted = {f"{name}.{_base_name(module)}": (name, module) for name, module in _adapted(model).items()}
    adapter = {bare_name(k): v for k, v in (adapter or {}).items()}

    def source(device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights(device):
            name = bare_name(name)
            if split_name(name) is not None:
                continue
            tensor = adapter.get(name, tensor)
            yield name, tensor
            if name in adapted:
                module_name, module = adapted[name]
                for key, value in _initial_adapters(module_name, module, tensor, seed).items():
                    yield key, adapter.get(key, value).to(device)

    return source


def trainable_summary(model: nn.Module) -> str:
    """One line: trainable parameters (adapters, train_modules) against all, and the fraction."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"


def merge_lora(
    named_tensors: Mapping[str, torch.Tensor], model_cfg: ModelConfig, lora_cfg: LoraConfig
) -> dict[str, torch.Tensor]:
    """The plain model's state (our names, no adapter entries) with each adapter merged, every tensor
    in fp32 (fp64 when given fp64): W_s + scale B_s A_s per slice; DoRA: m_s / ||that||_row times that;
    experts: each expert's W_e + scale B_e A_e (its gate_up_proj's rows over w_gate, then w_up)."""
    lay = layout(model_cfg)
    rows = {(x.module, x.leaf): (x.start, x.stop) for x in lay.linears}
    experts = {(x.module, x.leaf): x for x in lay.experts}
    tensors = {bare_name(k): v.detach() for k, v in named_tensors.items()}
    out = {
        k: v.to(torch.promote_types(v.dtype, torch.float32)).clone()
        for k, v in tensors.items()
        if split_name(k) is None
    }
    scale = scale_of(lora_cfg)
    for name in tensors:
        split = split_name(name)
        if split is None or split[1] != "lora_A":
            continue
        module, _, leaf = split
        if (module, leaf) in experts:
            A, B = tensors[name], tensors[f"{module}.lora_B.{leaf}"]  # (E, R, in), (E, out, R)
            factor = A.shape[1] // lora_cfg.r  # gate_up_proj named by the checkpoint's names: rank 2r
            merge_experts(out, module, leaf, A.to(out[f"{module}.w_down"].dtype), B, scale_of(lora_cfg, factor))
            continue
        start, stop = rows[module, leaf]
        weight = out[f"{module}.weight"]  # fp32 (or fp64) copy, (out, in)
        A, B = tensors[name].to(weight.dtype), tensors[f"{module}.lora_B.{leaf}"].to(weight.dtype)
        merged = weight[start:stop] + scale * (B @ A)
        magnitude = tensors.get(f"{module}.lora_magnitude.{leaf}")
        if magnitude is not None:
            merged = (magnitude.to(weight.dtype) / torch.linalg.norm(merged, dim=1))[:, None] * merged
        weight[start:stop] = merged
    return out
