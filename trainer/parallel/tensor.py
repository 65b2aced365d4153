"""Tensor and sequence parallelism (`parallel.tensor=T`) on the GPT, with DTensor's parallel styles.

Megatron's split, as torchtitan applies it to Llama, on a 1-D `tensor` mesh of T ranks:

| module                          | style                                   | what a rank holds              |
|---------------------------------|-----------------------------------------|--------------------------------|
| embed.wte                       | RowwiseParallel (vocabulary-sharded)    | 1/T of the vocabulary's rows   |
| attn.c_attn, mlp.c_fc / w_gate / w_up / w_gate_up | ColwiseParallel       | 1/T of the heads / hidden      |
| attn.c_proj, mlp.c_proj         | RowwiseParallel, output sequence-sharded| 1/T of the input features      |
| norms (block and final), wpe    | SequenceParallel / replicated           | all of it, 1/T of the tokens   |
| head (or the tied wte)          | column-wise: vocabulary-parallel loss   | 1/T of the vocabulary's rows   |

Between the sublayers the residual stream is sharded along the sequence (sequence parallel): the
norms and dropout run on T/tp tokens per rank; each attention and MLP all-gathers its input
along the sequence and reduce-scatters its output. The head's logits stay sharded over the
vocabulary and the loss is computed there (`loss_parallel`): no rank holds (tokens, vocab) logits.

Fused projections. The GPT keeps q / k / v in one linear (c_attn: [q | k | v] rows) and a gated
MLP may keep [gate | up] in one (w_gate_up). Column-wise sharding cuts a tensor's rows into T
contiguous pieces, which would hand rank 0 all of q; so under TP these tensors are held in a
*grouped* row order, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] where q_r / k_r / v_r are rank r's heads
(kv head h // (nh / nkv) stays with its queries: T must divide the kv heads), and each rank's
contiguous piece is exactly its heads. `to_grouped` / `to_canonical` move a full tensor between
the orders; everything outside the TP model (weight sources, checkpoints, exports) sees the
canonical [q | k | v] order, so a checkpoint reshards between TP and any other layout.

The model stays rank-agnostic: GPT.forward only pads a sequence to `sequence_multiple` tokens and calls
`split_head` when set; both are set here, as is a LoRALinear's `split_forward` (its adapters follow
the base's placement). What runs split lives in this file: the styles, `vocab_parallel_head` and
Megatron's `vocab_parallel_cross_entropy`, `split_lora_forward`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from trainer.config import ConfigError, ModelConfig
from trainer.model.gpt import bare_name, softcap
from trainer.model.loss import IGNORE_INDEX

FUSED = ("attn.c_attn.weight", "attn.c_attn.bias", "mlp.w_gate_up.weight", "mlp.w_gate_up.bias")


def check_tensor_parallel(cfg: ModelConfig, tensor: int, seq_len: int) -> None:
    """ConfigError (one line) when the model cannot be split over `tensor` ranks."""
    if tensor <= 1:
        return
    nkv = cfg.n_kv_head or cfg.n_head
    hidden = cfg.intermediate_size or 4 * cfg.n_embd
    needs = [
        ("attention heads (model.n_head)", cfg.n_head),
        ("key / value heads (model.n_kv_head; GQA: each rank keeps whole kv groups)", nkv),
        ("hidden size (model.n_embd)", cfg.n_embd),
        ("MLP width (model.intermediate_size)", hidden),
        ("padded vocabulary (model.vocab_size rounded up to model.vocab_multiple)", cfg.padded_vocab_size),
        ("sequence length (train.seq_len; sequence parallel splits it)", seq_len),
    ]
    for what, size in needs:
        if size % tensor:
            raise ConfigError(
                f"parallel.tensor={tensor} does not divide the {what}, {size}: use a tensor degree that divides it"
                + (" (or set model.vocab_multiple to a multiple of it)" if "vocabulary" in what else "")
            )
    refused = [
        (cfg.n_experts, "mixture-of-experts MLPs (use parallel.expert with ddp)"),
        (cfg.qk_norm == "full", "model.qk_norm=full (a norm over the whole q / k projection spans the ranks)"),
        (cfg.loss_chunk_size not in (None, 0), "model.loss_chunk_size (the vocabulary-parallel loss never builds "
         "whole logits: set model.loss_chunk_size=0)"),
    ]  # fmt: skip
    for bad, what in refused:
        if bad:
            raise ConfigError(f"parallel.tensor={tensor} does not run {what}")


# -- the grouped row order of fused projections -------------------------------------------------


@cache
def grouped_rows(kind: str, sizes: tuple[int, ...], tensor: int) -> torch.Tensor:
    """Row index (n,) taking a canonical fused tensor to the grouped order: grouped = canonical[index].
    kind 'qkv': sizes (nh, nkv, hd); 'gate_up': sizes (hidden,)."""
    if kind == "qkv":
        nh, nkv, hd = sizes
        parts = [(0, nh * hd), (nh * hd, nkv * hd), ((nh + nkv) * hd, nkv * hd)]  # q, k, v: (start, rows)
    else:
        (hidden,) = sizes
        parts = [(0, hidden), (hidden, hidden)]
    index = []
    for r in range(tensor):
        for start, rows in parts:
            step = rows // tensor
            index.append(torch.arange(start + r * step, start + (r + 1) * step))
    return torch.cat(index)


SLICE_LEAVES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # adapters over one part of a fused projection


def fused_kind(name: str, cfg: ModelConfig) -> tuple[str, tuple[int, ...]] | None:
    """('qkv', (nh, nkv, hd)) or ('gate_up', (hidden,)) for a fused projection's weight or bias name,
    or a LoRA lora_B over all of its rows (GPT-2's c_attn, Phi-3's qkv_proj / gate_up_proj); else None.
    A q_proj / k_proj / v_proj adapter covers one part: its rows are in order already."""
    name = bare_name(name)
    parts = name.split(".")
    adapter = len(parts) >= 2 and parts[-2] == "lora_B" and parts[-1] not in SLICE_LEAVES
    if ".attn.c_attn." in name and (name.endswith(("c_attn.weight", "c_attn.bias")) or adapter):
        return "qkv", (cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.attn_head_dim)
    if ".mlp.w_gate_up." in name and (name.endswith(("w_gate_up.weight", "w_gate_up.bias")) or adapter):
        return "gate_up", (cfg.intermediate_size or 4 * cfg.n_embd,)
    return None


def to_grouped(name: str, full: torch.Tensor, cfg: ModelConfig, tensor: int) -> torch.Tensor:
    """A full tensor in canonical row order -> the order the TP model holds (unchanged unless fused)."""
    kind = fused_kind(name, cfg)
    if kind is None or tensor == 1:
        return full
    return full[grouped_rows(*kind, tensor).to(full.device)]


def to_canonical(name: str, full: torch.Tensor, cfg: ModelConfig, tensor: int) -> torch.Tensor:
    """The inverse of to_grouped."""
    kind = fused_kind(name, cfg)
    if kind is None or tensor == 1:
        return full
    index = grouped_rows(*kind, tensor).to(full.device)
    out = torch.empty_like(full)
    out[index] = full
    return out


def grouped_source(weights, cfg: ModelConfig, tensor: int):
    """A weight source whose fused tensors arrive in the grouped order (read whole: their rows move; a
    checkpoint's or a lazy init's tensor, not read yet, through its full())."""

    def source(device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        for name, full in weights(device):
            if fused_kind(name, cfg):
                full = to_grouped(name, full.full() if hasattr(full, "rows") else full, cfg, tensor)
            yield name, full

    return source


def regroup_dtensor(name: str, value: torch.Tensor, cfg: ModelConfig, tensor: int, canonical: bool) -> torch.Tensor:
    """A DTensor (a parameter or its optimizer state) of a fused projection as a new DTensor of the
    same mesh and placements, its rows in the canonical order (canonical=True) or back in the grouped
    one. Gathers the whole tensor on every rank for the move (one tensor at a time: checkpoints)."""
    if fused_kind(name, cfg) is None or not hasattr(value, "device_mesh") or tensor == 1:
        return value
    move = to_canonical if canonical else to_grouped
    full = move(name, value.full_tensor(), cfg, tensor)
    return distribute_tensor(full, value.device_mesh, value.placements, src_data_rank=None)


# -- the plan --------------------------------------------------------------------------------


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Split a GPT (on the meta device or a real one) over the 1-D `mesh`, in place."""
    tp = mesh.size()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}  # DTensor's styles forget it
    vocab_rows = Shard(0)
    parallelize_module(
        model.embed,
        mesh,
        {"wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False)},
    )
    if model.embed.wpe is not None:  # learned positions: replicated; added to the sequence-sharded tokens
        distribute_module(model.embed.wpe, mesh, input_fn=_replicate_inputs)
    # the embedding's output: this rank's tokens, a plain tensor (the residual stream stays local)
    parallelize_module(
        model, mesh, {"embed": PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Shard(1),
                                                   use_local_output=True)},
    )  # fmt: skip
    # A copy, not the DTensor's own local tensor: handed to a compiled block (train.compile) that alias is
    # taken by AOTAutograd for a view of the DTensor, and the embedding's backward got a plain gradient.
    model.embed.register_forward_hook(lambda module, inputs, output: output.clone())
    from trainer.lora.layer import LoRALinear

    for block in model.blocks:
        lora = {n for n, m in block.named_modules() if isinstance(m, LoRALinear)}
        for name in lora:  # adapted linears: split by hand, their adapters following the base
            split_lora(block.get_submodule(name), mesh, rowwise=name.endswith("c_proj"))
        plan = {
            "norm_1": SequenceParallel(use_local_output=True),
            "norm_2": SequenceParallel(use_local_output=True),
            "attn": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
                use_local_output=True,
            ),
            "attn.c_attn": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                      use_local_output=True),
            "mlp.c_proj": RowwiseParallel(output_layouts=Shard(1)),
        }  # fmt: skip
        for name in ("norm_1_post", "norm_2_post"):
            if hasattr(block, name):
                plan[name] = SequenceParallel(use_local_output=True)
        for name in ("c_fc", "w_gate", "w_up", "w_gate_up"):
            if hasattr(block.mlp, name):
                plan[f"mlp.{name}"] = ColwiseParallel()
        parallelize_module(block, mesh, {k: v for k, v in plan.items() if k not in lora})
        attn = block.attn
        attn.n_head //= tp  # this rank's heads (the grouped c_attn rows give it whole kv groups)
        attn.n_kv_head //= tp
        if attn.qk_norm == "head":  # per-head norms on this rank's heads: (B, heads, T, hd), sharded on heads
            for norm in (attn.q_norm, attn.k_norm):
                distribute_module(norm, mesh, input_fn=_heads_in, output_fn=_local_out)
    parallelize_module(model, mesh, {"norm_f": SequenceParallel(use_local_output=False)})
    if model.head is not None:  # untied: the head's rows sharded like the tied wte's (column-wise matmul)
        model.head.weight = nn.Parameter(distribute_tensor(model.head.weight, mesh, [vocab_rows]),
                                         requires_grad=model.head.weight.requires_grad)  # fmt: skip
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    model.sequence_multiple = tp  # sequence parallelism: every rank an equal share of the tokens
    model.split_head = partial(vocab_parallel_head, mesh=mesh)


def split_lora(module: nn.Module, mesh: DeviceMesh, rowwise: bool) -> None:
    """A LoRALinear split over `mesh` like the plain linear it adapts, its adapters following the base
    (see LoRALinear._forward_split). Column-wise: weight, bias and each lora_B sharded by rows
    (Shard(0)), lora_A whole (Replicate). Row-wise: weight and each lora_A sharded by input features
    (Shard(1)), bias and lora_B whole."""
    rows, cols, whole = [Shard(0)], [Shard(1)], [Replicate()]

    def place(holder: nn.Module, key: str, placements: list) -> None:
        p = holder[key] if isinstance(holder, nn.ParameterDict) else getattr(holder, key)
        split = nn.Parameter(distribute_tensor(p.data, mesh, placements), requires_grad=p.requires_grad)
        if isinstance(holder, nn.ParameterDict):
            holder[key] = split
        else:
            holder.register_parameter(key, split)

    place(module, "weight", cols if rowwise else rows)
    if module.bias is not None:
        place(module, "bias", whole if rowwise else rows)
    for leaf in module.lora_A:
        place(module.lora_A, leaf, cols if rowwise else whole)
        place(module.lora_B, leaf, whole if rowwise else rows)
    module.split_forward = partial(split_lora_forward, mesh=mesh, rowwise=rowwise)


def split_lora_forward(layer: nn.Module, x: torch.Tensor, mesh: DeviceMesh, rowwise: bool) -> torch.Tensor:
    """A LoRALinear `layer` split over the tensor-parallel ranks, as DTensor's ColwiseParallel / RowwiseParallel
    split a plain linear, its adapters following the base. Column-wise (q / k / v, gate / up): x is
    every token's input (..., in), the base's rows and each lora_B's are sharded, lora_A is whole;
    returns this rank's output columns, each adapter's slice at its local rows (start / T, stop / T:
    the grouped order of trainer.parallel.tensor). Row-wise (o / down): x is this rank's input
    features (..., in / T), the base's columns and lora_A's are sharded, lora_B is whole; base and
    adapter outputs are partial sums, reduce-scattered over the sequence (sequence parallel)."""
    tp = mesh.size()
    weight = layer.weight if torch.is_autocast_enabled(x.device.type) else layer.weight.to(x.dtype)
    if rowwise:
        xd = DTensor.from_local(x, mesh, [Shard(-1)], run_check=False)
        y = F.linear(xd, weight)  # Partial: each rank's input features' share
        if not layer.adapters_off:
            for leaf in layer.slices:  # one, over every row (o_proj, down_proj, GPT-2's c_proj)
                A, B = layer.lora_A[leaf], layer.lora_B[leaf]
                h = xd if torch.is_autocast_enabled(x.device.type) else xd.to(A.dtype)
                y = y + (F.linear(F.linear(h, A), B) * layer.scale).to(y.dtype)  # Partial + Partial
        y = y.redistribute(placements=[Shard(1)])  # summed, and cut to this rank's tokens
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.to_local()
    xd = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    y = F.linear(xd, weight, bias).to_local()  # (..., out / T)
    if layer.adapters_off:
        return y
    pieces, end = [], 0
    for leaf, (start, stop) in layer.slices.items():
        start, stop = start // tp, stop // tp
        if start > end:
            pieces.append(y[..., end:start])
        A, B = layer.lora_A[leaf], layer.lora_B[leaf]
        h = xd if torch.is_autocast_enabled(x.device.type) else xd.to(A.dtype)
        pieces.append(y[..., start:stop] + (F.linear(F.linear(h, A), B) * layer.scale).to_local().to(y.dtype))
        end = stop
    if end < y.size(-1):
        pieces.append(y[..., end:])
    return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]


# -- the head: vocabulary-parallel logits and loss ------------------------------------------------------


def vocab_parallel_head(
    model: nn.Module,
    x: torch.Tensor,
    T: int,
    targets: torch.Tensor | None,
    token_logps: bool,
    logits_to_keep: int,
    mesh: DeviceMesh,
) -> torch.Tensor:
    """GPT's head on a split model (GPT.split_head): x, the final norm's output, is a DTensor sharded on the
    sequence (with GPT.forward's appended tokens past T); the head's rows (or the tied wte's) are sharded
    over the vocabulary. The tokens are all-gathered, each rank computes its vocabulary columns' logits,
    and the loss (or the target log-probabilities) comes from a vocabulary-parallel cross-entropy
    (Megatron's): no rank ever holds whole (tokens, vocab) logits. Logits for generation are gathered whole."""
    cfg = model.cfg
    weight = model.embed.wte.weight if model.head is None else model.head.weight  # DTensor (padded vocab, C)
    x = x.redistribute(placements=[Replicate()])[:, :T]  # (B, T, C) every (real) token on every rank
    if targets is None:
        x = x[:, -logits_to_keep:] if logits_to_keep else x
        logits = F.linear(x, weight).full_tensor()[..., : cfg.vocab_size]  # (B, T, vocab)
        return softcap(logits, cfg.final_softcap)
    logits = softcap(F.linear(x, weight), cfg.final_softcap)  # (B, T, padded vocab), sharded on vocab
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).to_local()  # this rank's columns
    start = mesh.get_local_rank() * logits.size(-1)  # the first column it holds
    values = vocab_parallel_cross_entropy(
        logits.flatten(0, 1), targets.flatten(), start, cfg.vocab_size, mesh.get_group()
    ).view_as(targets)  # (B, T): each token's loss, the same on every rank; 0 at IGNORE_INDEX
    return -values if token_logps else values.sum()


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, start: int, vocab: int, group
) -> torch.Tensor:
    """Per-token cross-entropy (N,) fp32 of logits split over the vocabulary across the ranks of
    `group` (tensor parallelism): logits (N, V_local) are this rank's columns start ..
    start + V_local - 1 of the padded vocabulary; columns >= vocab are padding (-inf). Three
    all-reduces of (N,) values (the max, the sum of exponentials, the target's logit) give every
    rank the same losses, 0 at IGNORE_INDEX; backward needs no communication (each rank's
    gradient is its own columns' softmax minus the one-hot). Megatron-LM's
    vocab_parallel_cross_entropy."""
    return _VocabParallelCrossEntropy.apply(logits, targets, start, vocab, group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, start, vocab, group):
        import torch.distributed as dist

        width = logits.size(-1)
        columns = torch.arange(start, start + width, device=logits.device)
        logits = logits.masked_fill(columns >= vocab, float("-inf"))  # padding columns
        peak = logits.max(dim=-1).values  # (N,)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - peak[:, None]
        exp = shifted.exp()
        total = exp.sum(dim=-1)  # (N,)
        dist.all_reduce(total, group=group)
        valid = targets != IGNORE_INDEX
        mine = valid & (targets >= start) & (targets < start + width)  # the target's column is here
        column = (targets - start).clamp(0, width - 1)
        target_logit = torch.where(mine, shifted.gather(1, column[:, None]).squeeze(1), 0.0)  # not -inf * 0
        dist.all_reduce(target_logit, group=group)
        loss = torch.where(valid, total.log() - target_logit, 0.0)
        ctx.save_for_backward(exp / total[:, None], column, mine, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        probs, column, mine, valid = ctx.saved_tensors
        grad = probs.clone()
        rows = torch.arange(grad.size(0), device=grad.device)
        grad[rows, column] -= mine.to(grad.dtype)
        grad *= (grad_loss * valid)[:, None]
        return grad, None, None, None, None


def _replicate_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    from torch.distributed.tensor import DTensor

    return tuple(
        DTensor.from_local(x, mesh, [Replicate()], run_check=False) if isinstance(x, torch.Tensor) else x
        for x in inputs
    )


def _heads_in(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    from torch.distributed.tensor import DTensor

    return tuple(DTensor.from_local(x, mesh, [Shard(1)], run_check=False) for x in inputs)


def _local_out(module: nn.Module, output: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return output.to_local()
