"""Run under torchrun by tests/test_tensor_parallel.py: for each model config, the GPT split over all
ranks (trainer.parallel.tensor) against the same GPT whole in this process, from the same weights.

    torchrun --nproc_per_node 2 tests/tp_worker.py OUT.pt

Rank 0 saves, per config, the largest gaps of: the summed loss, every parameter's gradient (gathered
whole, fused rows back in the canonical order, relative to the gradient's largest entry), the logits,
the target log-probabilities, and whether generation (KV cache; left-padded batched prompts; no cache)
and a packed batch (per-token positions) give the same tokens / losses.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from trainer.config import LoraConfig, ModelConfig
from trainer.lora import apply_lora
from trainer.model.gpt import GPT
from trainer.parallel.base import local, shard_of
from trainer.parallel.tensor import apply_tensor_parallel, to_canonical, to_grouped

BASE = dict(vocab_size=250, n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_multiple=64)
CONFIGS = {
    "gpt2": {},  # learned positions, LayerNorm, GELU, tied head, biases
    "llama": dict(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_head=2, tie_embeddings=False, bias=False),
    "qwen3": dict(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_head=2, qk_norm="head", bias=False,
                  head_dim=16),
    "gemma": dict(norm="rmsnorm", mlp="geglu", position="rope", n_kv_head=2, qk_norm="head", norm_placement="sandwich",
                  norm_offset=1.0, embed_scale=True, bias=False, fused_gate_up=True, final_softcap=30.0,
                  attn_softcap=50.0, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                  rope_local_theta=10000.0, rope_theta=1e6),
    "olmo_post_qkv_bias": dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, qkv_bias=True,
                               norm_placement="post"),
}  # fmt: skip


def whole(grad: torch.Tensor) -> torch.Tensor:
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def compare(cfg: ModelConfig, mesh, lora: bool = False) -> dict[str, float]:
    tp = mesh.size()
    torch.manual_seed(0)
    ref = GPT(cfg)
    x, y = torch.randint(0, cfg.vocab_size, (2, 16)), torch.randint(0, cfg.vocab_size, (2, 16))
    y[0, :3] = -100  # ignored targets
    with torch.device("meta"):
        split = GPT(cfg)
    if lora:  # every linear adapted (frozen base), lora_B non-zero so that the adapters count in every output
        adapters = LoraConfig(enabled=True, r=4, target_modules=["all-linear"])
        apply_lora(ref, adapters)
        apply_lora(split, adapters)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0.0, 0.1)
    apply_tensor_parallel(split, mesh)
    split.to_empty(device="cpu")
    params = dict(split.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            local(params[name]).copy_(shard_of(to_grouped(name, p.detach(), cfg, tp), params[name]))
    want, got = ref(x, targets=y), split(x, targets=y)
    want.backward()
    got.backward()
    out = {"loss": abs(got.item() - want.item()) / abs(want.item()), "grad": 0.0}
    for name, p in ref.named_parameters():
        if p.grad is None:  # frozen
            assert params[name].grad is None, name
            continue
        g = to_canonical(name, whole(params[name].grad), cfg, tp)
        # a weight every rank holds whole leaves a Partial gradient (the strategy sums it): full_tensor sums too
        out["grad"] = max(out["grad"], ((g - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)).item())
    with torch.no_grad():
        out["logits"] = (split(x) - ref(x)).abs().max().item()
        out["logps"] = (split(x, targets=y, token_logps=True) - ref(x, targets=y, token_logps=True)).abs().max().item()
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]] * 2)  # packed documents
        packed = ref(x, targets=y, positions=positions).item()
        out["packed"] = abs(split(x, targets=y, positions=positions).item() - packed) / abs(packed)
        prompt = x[:, :5]  # 5 tokens: not a multiple of the tensor degree
        out["generate"] = float(
            torch.equal(split.generate(prompt, 7, temperature=0), ref.generate(prompt, 7, temperature=0))
        )
        out["generate_no_cache"] = float(torch.equal(
            split.generate(prompt, 7, temperature=0, use_cache=False), ref.generate(prompt, 7, temperature=0, use_cache=False)
        ))  # fmt: skip
        lengths = torch.tensor([3, 5])  # left-padded batched prompts
        out["generate_batched"] = float(torch.equal(
            split.generate(prompt, 7, temperature=0, prompt_lengths=lengths),
            ref.generate(prompt, 7, temperature=0, prompt_lengths=lengths),
        ))  # fmt: skip
    return out


if __name__ == "__main__":
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tensor",))
    results = {name: compare(ModelConfig(**BASE, **overrides), mesh) for name, overrides in CONFIGS.items()}
    # LoRA on every linear: GPT-2's one c_attn adapter over [q | k | v], Llama's q / k / v slices of it, Phi-3's
    # qkv_proj and gate_up_proj (fused [q | k | v], fused [gate | up])
    phi3 = dict(CONFIGS["llama"], fused_gate_up=True, hf_model_type="phi3")
    for name, overrides in {"gpt2": CONFIGS["gpt2"], "llama": CONFIGS["llama"], "phi3": phi3}.items():
        results[f"{name}_lora"] = compare(ModelConfig(**BASE, **overrides), mesh, lora=True)
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
