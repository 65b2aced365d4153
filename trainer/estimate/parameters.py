"""GPT's parameters as a run builds them: counted on the meta device, LoRA applied as add_adapters
applies it, so the frozen base's dtypes are the ones trainer.lora gives it. With
lora.quantize_base=nf4 the adapted linears' weights are then stored in NF4 (as trainer.lora.qlora
quantises them, each from its lora.base_dtype copy); every other parameter as add_adapters left it.
A mixture of experts also gets its active count (a token's k of E experts, GPT.active_params), the
experts' own (E, I, H) tensors counted apart, and GPT.flops_per_token at train.seq_len."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from trainer.config import Config, LoraConfig, ModelConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
EXPERT_TENSORS = ("w_gate", "w_up", "w_down")  # trainer.model.moe.SparseMLP's (E, I, H) / (E, H, I) parameters
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter of a block: its HF name, the GPT module it adapts, in and out features."""

    name: str  # q_proj, ..., down_proj, c_attn, c_proj, c_fc
    module: str  # attn.c_attn, attn.c_proj, mlp.w_gate, mlp.w_up, mlp.w_gate_up, mlp.c_fc, mlp.c_proj, mlp.router
    in_features: int
    out_features: int  # its rows: q's, k's or v's slice of the fused c_attn, else the module's
    dora: bool


@dataclass(frozen=True)
class Parameters:
    """GPT's parameters as a run builds them (LoRA applied), by what trains and how they are stored."""

    total: int
    trainable: int
    adapters: int
    frozen: int  # frozen parameters stored as plain tensors (not NF4), in the dtypes of frozen_dtypes
    frozen_nf4: int  # the adapted linears' weights that lora.quantize_base=nf4 quantises
    frozen_bytes: int  # the frozen parameters' storage, NF4 included
    nf4_bytes: int  # the NF4 part of it
    block: int  # the largest block's parameters (blocks differ where dense MLPs sit among sparse ones)
    block_trainable: int  # the largest block's trainable parameters
    root: int  # embedding, final norm, head
    largest: int  # the largest trainable tensor
    trains: frozenset[str]  # which of head, embedding, norms, block_linears, experts train
    frozen_dtypes: Mapping[str, int]  # the plain frozen parameters by dtype: {"bf16": n, "fp32": n}
    # Bytes an element as stored (before FSDP / DeepSpeed cast for compute) of: embedding, head,
    # norms, adapted (an adapted linear's weight; under NF4 the dtype it is dequantised to), plain
    # (a block linear's weight without adapters), experts (a sparse MLP's expert tensor).
    stored: Mapping[str, int]
    nf4: bool  # the adapted linears' weights are NF4
    lora: LoraConfig | None  # the settings in force (lora.init_from's, when set)
    block_adapters: tuple[Adapter, ...]  # block 0's
    layer_adapters: tuple[tuple[Adapter, ...], ...] = ()  # each block's (a sparse MLP's router has its own)
    blocks: tuple[int, ...] = ()  # each block's parameters
    block_trainables: tuple[int, ...] = ()  # each block's trainable parameters
    active: int = 0  # total, with each sparse MLP's experts counted k of E (GPT.active_params)
    experts: int = 0  # the sparse MLPs' expert tensors (w_gate, w_up, w_down: E x ...), all of them
    experts_trainable: int = 0  # the part of experts that trains
    experts_bytes: int = 0  # the frozen expert tensors' storage
    expert_adapters: int = 0  # LoRA's adapters on the experts (trainer.lora.experts: (E, R, in), (E, out, R))
    expert_targets: tuple[str, ...] = ()  # their parameters: experts.gate_up_proj, experts.down_proj
    flops_per_token: int = 0  # GPT.flops_per_token(train.seq_len): 6 x the active matmul weights + attention


def count_parameters(cfg: Config, m: ModelConfig) -> Parameters:
    """GPT(m) on the meta device, with trainer.lora's adapters when lora.enabled. add_adapters casts
    the frozen base (cast_frozen_base); NF4 then replaces the adapted linears' weights."""
    from trainer.lora import LoRALinear
    from trainer.lora.run import add_adapters
    from trainer.model.gpt import GPT, bare_name

    with torch.device("meta"):
        model = GPT(m)
    lora = add_adapters(model, lambda device: iter(()), cfg, m)[2] if cfg.lora.enabled else None
    nf4 = lora is not None and lora.quantize_base == "nf4"
    quantised = {id(module.weight) for module in model.modules() if isinstance(module, LoRALinear)} if nf4 else set()
    n, blocks, block_trainables, dtypes, expert_leaves = _tally(model, quantised, m.n_layer)
    head = model.embed.wte if model.head is None else model.head
    block = model.blocks[0]
    linears = {name: module for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)}
    adapted = [module for module in linears.values() if isinstance(module, LoRALinear)]
    plain = [module for module in linears.values() if not isinstance(module, LoRALinear)]
    parts = {
        "head": head.weight, "embedding": model.embed.wte.weight, "norms": block.norm_1.weight,
        "block_linears": block.attn.c_proj.weight,
    }  # fmt: skip
    sparse = [b.mlp for b in model.blocks if hasattr(b.mlp, "w_down")]
    if sparse:
        parts["experts"] = sparse[0].w_gate
    stored = {k: parts[k].element_size() for k in ("embedding", "head", "norms")}
    for kind, modules in (("adapted", adapted), ("plain", plain)):
        stored[kind] = (modules or list(linears.values()))[0].weight.element_size()
    stored["experts"] = parts["experts"].element_size() if sparse else stored["plain"]
    layer_adapters = tuple(
        tuple(
            Adapter(leaf, bare_name(module_name), module.in_features, stop - start, leaf in module.lora_magnitude)
            for module_name, module in b.named_modules()
            if isinstance(module, LoRALinear)
            for leaf, (start, stop) in module.slices.items()
        )
        for b in model.blocks
    )
    largest_block = max(range(m.n_layer), key=lambda i: blocks[i])
    return Parameters(
        **n, block=blocks[largest_block], block_trainable=max(block_trainables),
        trains=frozenset(k for k, p in parts.items() if p.requires_grad), frozen_dtypes=dtypes, stored=stored,
        nf4=nf4, lora=lora, block_adapters=layer_adapters[0], layer_adapters=layer_adapters,
        blocks=tuple(blocks), block_trainables=tuple(block_trainables),
        active=model.active_params(), flops_per_token=model.flops_per_token(cfg.train.seq_len),
        expert_targets=tuple(expert_leaves),
    )  # fmt: skip


def _tally(model: torch.nn.Module, quantised: set[int], n_layer: int) -> tuple[dict, list, list, dict, dict]:
    """Per-parameter counts of a meta GPT: totals by kind (trainable, adapters, frozen, NF4, the
    experts'), per block, frozen bytes and dtypes, and the adapted expert parameters in order."""
    from trainer.model.gpt import bare_name

    n = dict(total=0, trainable=0, adapters=0, frozen=0, frozen_nf4=0, frozen_bytes=0, nf4_bytes=0, root=0, largest=0)
    n |= dict(experts=0, experts_trainable=0, experts_bytes=0, expert_adapters=0)
    blocks, block_trainables = [0] * n_layer, [0] * n_layer
    dtypes: dict[str, int] = {}
    expert_leaves: dict[str, None] = {}  # the adapted expert parameters (trainer.lora.experts), in order
    for name, p in model.named_parameters():
        name, numel = bare_name(name), p.numel()
        pieces = name.split(".")
        layer = int(pieces[1]) if pieces[0] == "blocks" else None
        # SparseMLP's (E, ., .) tensors (not adapters of theirs)
        expert = layer is not None and pieces[-1] in EXPERT_TENSORS and p.dim() == 3 and ".lora_" not in name
        n["total"] += numel
        n["root"] += numel if layer is None else 0
        n["experts"] += numel if expert else 0
        if layer is not None and ".lora_" in name and p.dim() == 3:  # an expert adapter's (E, ., .) A or B
            n["expert_adapters"] += numel
            expert_leaves[f"experts.{pieces[-1]}"] = None
        if layer is not None:
            blocks[layer] += numel
        if p.requires_grad:
            n["trainable"] += numel
            n["adapters"] += numel if ".lora_" in name else 0
            n["experts_trainable"] += numel if expert else 0
            n["largest"] = max(n["largest"], numel)
            if layer is not None:
                block_trainables[layer] += numel
        elif id(p) in quantised:
            n["frozen_nf4"] += numel
            n["nf4_bytes"] += nf4_bytes(numel, p.element_size())
            n["frozen_bytes"] += nf4_bytes(numel, p.element_size())
        else:
            n["frozen"] += numel
            n["frozen_bytes"] += numel * p.element_size()
            n["experts_bytes"] += numel * p.element_size() if expert else 0
            dtypes[DTYPE_NAMES[p.dtype]] = dtypes.get(DTYPE_NAMES[p.dtype], 0) + numel
    return n, blocks, block_trainables, dtypes, expert_leaves


def nf4_bytes(numel: int, dtype_bytes: int = 2) -> int:
    """One NF4 tensor as torchao's NF4Tensor stores it (trainer.lora.qlora): 4-bit codes, an int8
    absmax per 64-weight block, one scale per 256 absmaxes and their mean in the weight's dtype
    (QLoRA's double quantisation), and the 16-value code table: 4.126 bits a bf16 weight."""
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + dtype_bytes * (math.ceil(blocks / 256) + 1 + 16)
