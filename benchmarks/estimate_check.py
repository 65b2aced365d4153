"""trainer.estimate against measurement: activations and the peak of real steps on the CPU.

    python -m benchmarks.estimate_check                   # every case, table + benchmarks/results/estimate_check.json
    python -m benchmarks.estimate_check --cases gpt2-none llama-full

Each case is a set of overrides (as for `python -m trainer`) on a small model. For each, the
model is built as the harness builds it (GPT, then LoRA adapters when lora.enabled, then
activation checkpointing) and one training step runs on random tokens:

  saved      the bytes autograd keeps from forward to backward: every tensor that a
             saved_tensors_hooks pack sees during forward (and the loss) and that is still held
             when forward ends, each storage once and whole, parameters left out. A checkpointed
             block's inputs are saved by torch's checkpoint through the same hooks, its inner
             tensors are not (they are recomputed).
  peak       the high-water mark of allocated bytes during the whole step (forward, backward,
             gradient norm, clip, AdamW step, zero_grad), from the PyTorch profiler's allocation
             and free events (profile_memory=True, as benchmarks/checkpointing.py measures), plus
             what was allocated before the step (weights and AdamW state, each storage once, as
             benchmarks/memory.py counts them). A warm-up step runs first, so AdamW's state exists.

LoRA cases use trainer.lora's verbs as add_adapters applies them: apply_lora (one adapter per HF
projection; q, k, v as slices of the fused c_attn), then cast_frozen_base (frozen matrices in
lora.base_dtype: all under bf16 / fp16, only the adapted linears' under fp32; norms stay fp32).
Under precision=bf16 the step runs in torch.autocast on the CPU (parallel=none).
"""

from __future__ import annotations

import argparse
import math
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import write_report
from benchmarks.memory import storage_bytes
from trainer.config import Config
from trainer.estimate import estimate, model_shape

MB = 1e6
REPO = Path(__file__).resolve().parent.parent
SMALL = ["train.device=cpu", "model.block_size=256"]  # and model.vocab_size=512 unless the case sets it
LLAMA = [
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.position=rope",
    "model.bias=false",
    "model.tie_embeddings=false",
]
# Gemma 3's switches: head_dim != n_embd / n_head, q / k norms per head, sandwich norms scaling by 1 +
# weight, GeGLU, scaled embeddings, a score scale, two sliding layers (window 32 < seq_len) and a
# global one with their own RoPE bases, a tied head
GEMMA = [
    "model.norm=rmsnorm", "model.mlp=geglu", "model.position=rope", "model.bias=false", "model.n_layer=3",
    "model.n_embd=96", "model.n_head=4", "model.n_kv_head=2", "model.head_dim=32", "model.intermediate_size=160",
    "model.qk_norm=head", "model.norm_placement=sandwich", "model.norm_offset=1.0", "model.embed_scale=true",
    "model.query_pre_attn_scalar=32", "model.sliding_window=32", "model.rope_local_theta=10000",
    "model.layer_types=[sliding_attention,sliding_attention,full_attention]",
]  # fmt: skip
# Qwen3-MoE's: 8 experts of width 48, 2 per token, renormalised, a load-balancing loss, block 0 dense
MOE = [
    *LLAMA, "model.n_layer=3", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2", "model.head_dim=32",
    "model.intermediate_size=128", "model.qk_norm=head", "model.n_experts=8", "model.n_experts_per_token=2",
    "model.moe_intermediate_size=48", "model.moe_layers=[1,2]", "model.router_aux_loss_coef=0.01",
]  # fmt: skip
CASES: dict[str, list[str]] = {
    "gpt2-none": ["model.n_layer=4", "model.n_embd=128", "train.micro_batch_size=4", "train.seq_len=128"],
    "gpt2-full": ["model.n_layer=4", "model.n_embd=128", "train.micro_batch_size=4", "train.seq_len=128",
                  "model.activation_checkpointing=full"],
    "gpt2-chunked-bf16": ["model.n_layer=3", "model.n_embd=192", "model.n_head=6", "train.micro_batch_size=2",
                          "train.seq_len=256", "model.loss_chunk_size=128", "precision=bf16"],
    "gpt2-wide-bf16": ["model.n_layer=2", "model.n_embd=256", "train.micro_batch_size=8", "train.seq_len=64",
                       "precision=bf16"],
    "llama-none": [*LLAMA, "model.n_layer=4", "model.n_embd=128", "model.n_head=8", "model.n_kv_head=2",
                   "model.intermediate_size=344", "train.micro_batch_size=4", "train.seq_len=128"],
    "llama-full": [*LLAMA, "model.n_layer=6", "model.n_embd=128", "model.n_head=8", "model.n_kv_head=2",
                   "model.intermediate_size=344", "train.micro_batch_size=2", "train.seq_len=256",
                   "model.activation_checkpointing=full", "model.loss_chunk_size=64"],
    "llama-bf16": [*LLAMA, "model.n_layer=4", "model.n_embd=256", "model.n_head=8", "model.n_kv_head=4",
                   "model.intermediate_size=688", "train.micro_batch_size=2", "train.seq_len=128", "precision=bf16"],
    "llama-mlp-every2": [*LLAMA, "model.n_layer=4", "model.n_embd=128", "model.n_head=4", "train.micro_batch_size=4",
                         "train.seq_len=128", "model.activation_checkpointing=mlp",
                         "model.activation_checkpointing_every=2"],
    "llama-lora-bf16": [*LLAMA, "model.n_layer=4", "model.n_embd=256", "model.n_head=8", "model.n_kv_head=2",
                        "model.intermediate_size=688", "train.micro_batch_size=2", "train.seq_len=256",
                        "precision=bf16", "lora.enabled=true", "model.loss_chunk_size=128"],
    "llama-lora-full-bf16": [*LLAMA, "model.n_layer=4", "model.n_embd=256", "model.n_head=8", "model.n_kv_head=2",
                             "model.intermediate_size=688", "train.micro_batch_size=2", "train.seq_len=256",
                             "precision=bf16", "lora.enabled=true", "lora.target_modules=[q_proj,v_proj]",
                             "model.activation_checkpointing=full"],
    "gpt2-logits-wall": ["model.n_layer=2", "model.n_embd=64", "model.vocab_size=8192", "train.micro_batch_size=4",
                         "train.seq_len=128"],
    "llama-logits-chunked-bf16": [*LLAMA, "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
                                  "model.vocab_size=8192", "train.micro_batch_size=4", "train.seq_len=128",
                                  "model.loss_chunk_size=128", "precision=bf16"],
    "llama-attention-every3": [*LLAMA, "model.n_layer=6", "model.n_embd=128", "model.n_head=8", "model.n_kv_head=4",
                               "train.micro_batch_size=2", "train.seq_len=256", "model.activation_checkpointing=attention",
                               "model.activation_checkpointing_every=3"],
    "llama-dora-dropout-bf16": [*LLAMA, "model.n_layer=3", "model.n_embd=128", "model.n_head=4", "model.n_kv_head=2",
                                "train.micro_batch_size=2", "train.seq_len=128", "precision=bf16", "lora.enabled=true",
                                "lora.dora=true", "lora.dropout=0.1", "lora.target_modules=[q_proj,v_proj,down_proj]"],
    "llama-lora-norms-bf16": [*LLAMA, "model.n_layer=3", "model.n_embd=128", "model.n_head=4", "train.micro_batch_size=2",
                              "train.seq_len=128", "precision=bf16", "lora.enabled=true", "lora.train_modules=[norm]",
                              "lora.target_modules=[q_proj,k_proj,o_proj,up_proj]"],
    "gpt2-lora-fp32base-bf16": ["model.n_layer=3", "model.n_embd=128", "train.micro_batch_size=4",
                                "train.seq_len=128", "precision=bf16", "lora.enabled=true", "lora.r=8",
                                "lora.base_dtype=fp32", "lora.train_modules=[lm_head]"],
    "gpt2-lora-fp32": ["model.n_layer=4", "model.n_embd=128", "train.micro_batch_size=4", "train.seq_len=128",
                       "lora.enabled=true", "lora.base_dtype=fp32", "lora.target_modules=[c_attn,c_fc]",
                       "lora.train_modules=[norm]"],
    "llama-dora-bf16base-fp32": [*LLAMA, "model.n_layer=3", "model.n_embd=128", "model.n_head=4",
                                 "model.n_kv_head=2", "train.micro_batch_size=2", "train.seq_len=128",
                                 "lora.enabled=true", "lora.dora=true", "lora.target_modules=[q_proj,o_proj,gate_proj]"],
    "gpt2-lora-proj-norms-bf16": ["model.n_layer=3", "model.n_embd=128", "train.micro_batch_size=2",
                                  "train.seq_len=128", "precision=bf16", "lora.enabled=true",
                                  "lora.target_modules=[c_proj]", "lora.train_modules=[norm]"],
    "llama-lora-mlp-only-bf16": [*LLAMA, "model.n_layer=3", "model.n_embd=128", "model.n_head=4",
                                 "train.micro_batch_size=2", "train.seq_len=128", "precision=bf16",
                                 "lora.enabled=true", "lora.target_modules=[up_proj,down_proj]"],
    "gemma-like-bf16": [*GEMMA, "train.micro_batch_size=2", "train.seq_len=64", "precision=bf16"],
    "gemma-like-lora-full-bf16": [*GEMMA, "train.micro_batch_size=2", "train.seq_len=64", "precision=bf16",
                                  "lora.enabled=true", "model.activation_checkpointing=full"],
    "moe-fp32": [*MOE, "train.micro_batch_size=2", "train.seq_len=64"],
    "moe-lora-attention-bf16": [*MOE, "train.micro_batch_size=2", "train.seq_len=64", "precision=bf16",
                                "lora.enabled=true", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"],
    "moe-lora-attention-full-bf16": [*MOE, "train.micro_batch_size=2", "train.seq_len=128", "precision=bf16",
                                     "lora.enabled=true", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
                                     "model.activation_checkpointing=full", "model.loss_chunk_size=64"],
    "moe-lora-attention-full-fp32": [*MOE, "train.micro_batch_size=2", "train.seq_len=128", "lora.enabled=true",
                                     "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
                                     "model.activation_checkpointing=full", "model.loss_chunk_size=64"],
    "moe-full-bf16": [*MOE, "train.micro_batch_size=2", "train.seq_len=128", "precision=bf16",
                      "model.activation_checkpointing=full", "model.loss_chunk_size=64"],
    "olmo-like-fused-fp32": [*LLAMA, "model.n_layer=3", "model.n_embd=64", "model.n_head=4", "model.head_dim=24",
                             "model.intermediate_size=96", "model.qk_norm=full", "model.norm_placement=post",
                             "model.fused_gate_up=true", "train.micro_batch_size=2", "train.seq_len=64"],
}  # fmt: skip


def apply_adapters(model: nn.Module, cfg: Config) -> None:
    """trainer.lora's adapters on a real model, the frozen base cast as add_adapters casts it (its
    matrices to lora.base_dtype: all of them under autocast, the adapted linears' otherwise)."""
    from trainer.lora import apply_lora
    from trainer.lora.run import BASE_DTYPES, cast_frozen_base

    apply_lora(model, cfg.lora)
    cast_frozen_base(model, BASE_DTYPES[cfg.lora.base_dtype], autocast=cfg.precision.dtype in ("bf16", "fp16"))


def build(cfg: Config) -> nn.Module:
    """The case's model: GPT, then trainer.lora's adapters, then activation checkpointing (the harness's order)."""
    from trainer.model import GPT
    from trainer.model.checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    model = GPT(model_shape(cfg))
    if cfg.lora.enabled:
        apply_adapters(model, cfg)
    apply_activation_checkpointing(model, model.cfg)
    return model


class _Saved:
    """What the pack hook hands autograd: alive as long as the graph node that saved it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config) -> int:
    """Bytes of the distinct storages autograd still holds after forward and the loss (parameters
    left out). Tensors saved by graph nodes that forward already freed (the product DoRA detaches
    from its row norm, say) are not counted: the hook's holders of those are gone."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    holders: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> _Saved:
        saved = _Saved(t)
        holders.append(weakref.ref(saved))
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor), _autocast(cfg):
        loss = model(x, targets=y)
    live = [saved.tensor.untyped_storage() for ref in holders if (saved := ref()) is not None]
    storages = {s.data_ptr(): s.nbytes() for s in live if s.data_ptr() not in weights}
    del loss, live
    return sum(storages.values())


def _autocast(cfg: Config):
    from trainer.precision import autocast

    return autocast(cfg.precision, torch.device("cpu"))


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, cfg: Config) -> None:
    """One training step as train_step takes it on one process: forward / backward, gradient
    sums of squares per group, clip, AdamW, zero_grad(set_to_none)."""
    from torch.profiler import record_function

    from trainer.parallel.base import global_norm, group_sumsq

    with record_function("phase:forward"), _autocast(cfg):
        loss = model(x, targets=y)
    with record_function("phase:backward"):
        (loss / y.numel()).backward()
        del loss
    with record_function("phase:optimizer_step"):
        named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        norm = global_norm(group_sumsq((n.replace(".base.", ".").replace("lora_", ""), g) for n, g in named))
        grads = [g for _, g in named]
        torch._foreach_mul_(grads, torch.clamp(1.0 / (norm + 1e-6), max=1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def peak_step_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, cfg: Config) -> dict[str, int]:
    """High-water marks of allocated bytes above the step's start (profiler events): in each of
    forward, backward and the optimizer step, and `held`, what forward leaves for backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, optimizer, x, y, cfg)
    events = prof.profiler.kineto_results.events()
    phases = sorted((e.start_ns(), e.name()[6:]) for e in events if e.name().startswith("phase:"))
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live, peaks, held = 0, {name: 0 for _, name in phases}, 0
    for start, nbytes in memory:
        live += nbytes
        current = [name for begin, name in phases if begin <= start]
        if current:
            peaks[current[-1]] = max(peaks[current[-1]], live)
            if current[-1] == "forward":
                held = live
    return {**peaks, "held": held}


def measure(overrides: list[str]) -> dict[str, Any]:
    """Predicted and measured bytes for one case (one torch thread: the bytes do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(overrides)
    finally:
        torch.set_num_threads(threads)


def _measure(overrides: list[str]) -> dict[str, Any]:
    from trainer.__main__ import compose_config
    from trainer.optim import build_optimizer

    vocab = [] if any(o.startswith("model.vocab_size=") for o in overrides) else ["model.vocab_size=512"]
    cfg, _ = compose_config([*SMALL, *vocab, *overrides])
    predicted = estimate(cfg)
    model = build(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.train.seq_len)
    x = torch.randint(0, model.cfg.vocab_size, shape, generator=g)
    y = torch.randint(0, model.cfg.vocab_size, shape, generator=g)
    optimizer = build_optimizer(model, cfg.optim)
    step(model, optimizer, x, y, cfg)  # warm-up: AdamW's state exists from here on
    saved = saved_bytes(model, x, y, cfg)
    before = storage_bytes(list(model.parameters()) + [t for s in optimizer.state.values() for t in s.values()])
    peaks = peak_step_bytes(model, optimizer, x, y, cfg)
    peak = before + max(peaks.values())
    return {
        "overrides": overrides,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "predicted_parameters": predicted["parameters"]["total"],
        "predicted_trainable": predicted["parameters"]["trainable"],
        "saved": saved,
        "predicted_saved": predicted["activations"]["total"],
        "kept_states": before,
        "predicted_kept_states": predicted["peak"]["kept_states"],
        "peak": peak,
        "predicted_peak": predicted["peak"]["bytes"],
        "predicted_peak_at": predicted["peak"]["at"],
        "phases": peaks,
        "predicted_phases": predicted["phases"],
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| case | params | trainable | counts exact | saved MB | predicted MB | ratio | peak MB | predicted MB | ratio | at |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        exact = (r["parameters"], r["trainable"]) == (r["predicted_parameters"], r["predicted_trainable"])
        lines.append(
            f"| {name} | {r['parameters']:,} | {r['trainable']:,} | {'yes' if exact else 'NO'} | {r['saved'] / MB:.2f} | "
            f"{r['predicted_saved'] / MB:.2f} | {r['predicted_saved'] / r['saved']:.3f} | {r['peak'] / MB:.2f} | "
            f"{r['predicted_peak'] / MB:.2f} | {r['predicted_peak'] / r['peak']:.3f} | {r['predicted_peak_at']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "estimate_check.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = {}
    for name in args.cases:
        rows[name] = measure(CASES[name])
        print(f"  {name}: saved {rows[name]['saved'] / MB:.2f} MB, peak {rows[name]['peak'] / MB:.2f} MB", flush=True)
    print(table(rows))
    worst = max(abs(math.log(r["predicted_saved"] / r["saved"])) for r in rows.values())
    print(f"largest activation error {100 * (math.exp(worst) - 1):.1f}%; {time.perf_counter() - start:.0f}s")
    write_report(args.out, {"torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
