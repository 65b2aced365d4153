"""LoRA on a mixture-of-experts MLP's experts, as PEFT 0.21 puts it on transformers 5's fused experts.

transformers 5 holds a sparse MLP's experts as two stacked parameters, `mlp.experts.gate_up_proj`
(E, 2I, H) = [gate; up] per expert and `mlp.experts.down_proj` (E, H, I), and PEFT adapts each with a
ParamWrapper (LoraConfig.target_parameters): per expert e, W_e + scale B_e A_e with its own
A_e (R, in) and B_e (out, R). gate and up therefore share A_e. PEFT maps the checkpoint's per-expert
names in target_modules (Mixtral w1 w3 w2, Qwen3-MoE gate_proj up_proj down_proj) onto these two, and
gives gate_up_proj rank 2r and alpha 2 alpha (rank_pattern / alpha_pattern), as names.select_experts does.

Here the adapters are `<mlp>.lora_A.<leaf>` (E, R, in) and `<mlp>.lora_B.<leaf>` (E, out, R), leaf
gate_up_proj (out = 2I, over our w_gate then w_up) or down_proj (over w_down). They are added on the
activations, not the weights: each expert's rows get scale (x A_e^T) B_e^T besides x W_e^T, so no
(E, out, in) delta is ever made (PEFT folds the delta into the weight; the two agree to rounding).

PEFT's ParamWrapper has no dropout and no DoRA; QLoRA's NF4 quantises linears' weights, not these
stacked ones: apply_lora refuses all three with expert targets (check_expert_settings). Expert
parallelism (trainer.parallel.expert.shard_experts) would shard the experts but not these adapters: preflight
refuses parallel.expert with LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.model.moe import SparseMLP

FUSED = {"gate_up_proj": ("w_gate", "w_up"), "down_proj": ("w_down",)}  # adapter leaf -> our weights, stacked on dim 1
RANK_ALIGN = 8  # torch._grouped_mm wants 16-byte strides: the grouped path pads the rank to a multiple of this


class LoRAExperts(SparseMLP):
    """SparseMLP plus per-expert low-rank adapters on its gate_up_proj and / or down_proj, each with its
    own rank and scale (see the module docstring). Routing, experts and their parameters are the base's."""

    def __init__(self, base: SparseMLP, ranks: dict[str, int], scales: dict[str, float]):
        nn.Module.__init__(self)  # not SparseMLP's: the base's parameters, modules and settings are reused
        for key, value in vars(base).items():
            if not key.startswith("_"):
                setattr(self, key, value)
        for name, module in base.named_children():
            setattr(self, name, module)
        for name, param in base.named_parameters(recurse=False):
            setattr(self, name, param)
        self.scales = dict(scales)
        shapes = {leaf: self.fused_shape(leaf) for leaf in ranks}  # leaf -> (E, out, in)
        device = self.w_gate.device
        self.lora_A = _parameters({leaf: (e, ranks[leaf], i) for leaf, (e, _, i) in shapes.items()}, device)
        self.lora_B = _parameters({leaf: (e, o, ranks[leaf]) for leaf, (e, o, _) in shapes.items()}, device)

    def fused_shape(self, leaf: str) -> tuple[int, int, int]:
        """(E, out, in) of transformers 5's fused parameter `leaf`."""
        weights = [getattr(self, name) for name in FUSED[leaf]]
        return weights[0].shape[0], sum(w.shape[1] for w in weights), weights[0].shape[2]

    # -- the loop path: per expert, (weight, adapter) pairs; adapter = (A_e, B_e's rows, scale) or None

    adapters_off = False  # set by trainer.lora.layer.adapters_off: the base experts alone

    def per_expert(self) -> Iterator[tuple[Any, Any, Any]]:
        if self.adapters_off:
            yield from (((g, None), (u, None), (d, None)) for g, u, d in super().per_expert())
            return
        adapters = {leaf: zip(A.unbind(0), self.lora_B[leaf].unbind(0), strict=True) for leaf, A in self.lora_A.items()}
        for w_gate, w_up, w_down in super().per_expert():
            gate = up = down = None
            if "gate_up_proj" in adapters:
                A, B = next(adapters["gate_up_proj"])  # (R, H), (2I, R)
                scale, rows = self.scales["gate_up_proj"], w_gate.shape[0]
                gate, up = (A, B[:rows], scale), (A, B[rows:], scale)
            if "down_proj" in adapters:
                A, B = next(adapters["down_proj"])  # (R, I), (H, R)
                down = (A, B, self.scales["down_proj"])
            yield (w_gate, gate), (w_up, up), (w_down, down)

    def expert_linear(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        weight, adapter = weight
        y = super().expert_linear(x, weight)  # (S_e, out)
        if adapter is None:
            return y
        A, B, scale = adapter
        if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear casts
            x = x.to(A.dtype)
        return y + (F.linear(F.linear(x, A), B) * scale).to(y.dtype)

    # -- the grouped path: stacked (E, in, out) weights and adapters, for torch._grouped_mm

    def stacked(self, dtype: torch.dtype) -> tuple[Any, Any, Any]:
        w_gate, w_up, w_down = super().stacked(dtype)
        gate = up = down = None
        if self.adapters_off:
            return (w_gate, None), (w_up, None), (w_down, None)
        if "gate_up_proj" in self.lora_A:
            A, B = self._grouped_factors("gate_up_proj", dtype)  # (E, H, R'), (E, R', 2I)
            scale, rows = self.scales["gate_up_proj"], w_gate.shape[-1]
            gate, up = (A, B[..., :rows], scale), (A, B[..., rows:], scale)
        if "down_proj" in self.lora_A:
            A, B = self._grouped_factors("down_proj", dtype)
            down = (A, B, self.scales["down_proj"])
        return (w_gate, gate), (w_up, up), (w_down, down)

    def _grouped_factors(self, leaf: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A^T (E, in, R') and B^T (E, R', out) in dtype, the rank zero-padded to R' = a multiple of RANK_ALIGN."""
        A, B = self.lora_A[leaf].to(dtype), self.lora_B[leaf].to(dtype)  # (E, R, in), (E, out, R)
        pad = -A.shape[1] % RANK_ALIGN
        return F.pad(A, (0, 0, 0, pad)).transpose(-2, -1), F.pad(B, (0, pad)).transpose(-2, -1)

    def grouped_linear(self, x: torch.Tensor, weight: Any, ends: torch.Tensor) -> torch.Tensor:
        weight, adapter = weight
        y = super().grouped_linear(x, weight, ends)  # (S, out)
        if adapter is None:
            return y
        A, B, scale = adapter
        return y + super().grouped_linear(super().grouped_linear(x, A, ends), B, ends) * scale

    def extra_repr(self) -> str:
        ranks = {leaf: A.shape[1] for leaf, A in self.lora_A.items()}
        return f"adapters (rank)={ranks}, scales={self.scales}"


def _parameters(shapes: dict[str, tuple[int, ...]], device: torch.device) -> nn.ParameterDict:
    """fp32 parameters of these shapes, uninitialised (meta: no storage)."""
    return nn.ParameterDict({k: torch.empty(shape, dtype=torch.float32, device=device) for k, shape in shapes.items()})


def initial_expert_adapters(module_name: str, module: LoRAExperts, generator_of) -> dict[str, torch.Tensor]:
    """The adapters' initial values as PEFT's ParamWrapper draws them: A (E R, in) Kaiming-uniform (a = sqrt 5,
    fan-in `in`, as one nn.Linear(in, E R)), B zero. generator_of(name): A's own seeded generator."""
    out = {}
    for leaf, A in module.lora_A.items():
        a_name = f"{module_name}.lora_A.{leaf}"
        experts, rank, inputs = A.shape
        flat = torch.empty(experts * rank, inputs)
        out[a_name] = nn.init.kaiming_uniform_(flat, a=math.sqrt(5), generator=generator_of(a_name)).view(A.shape)
        out[f"{module_name}.lora_B.{leaf}"] = torch.zeros(module.lora_B[leaf].shape)
    return out


def merge_experts(
    weights: dict[str, torch.Tensor], module: str, leaf: str, A: torch.Tensor, B: torch.Tensor, scale: float
) -> None:
    """In place: each expert of `module`'s fused `leaf` (our weights in `weights`) plus scale B_e A_e."""
    delta = scale * torch.bmm(B.to(A.dtype), A)  # (E, out, in)
    start = 0
    for name in FUSED[leaf]:
        weight = weights[f"{module}.{name}"]  # (E, rows, in)
        rows = weight.shape[1]
        weight += delta[:, start : start + rows].to(weight.dtype)
        start += rows
