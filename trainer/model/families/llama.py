"""Llama (LlamaForCausalLM): RoPE (Llama 3 scaling), RMSNorm, SwiGLU, grouped-query attention,
separate q / k / v projections (fused into c_attn here), optional biases (attention_bias and
mlp_bias together)."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import ChatQuirks, Family, register
from trainer.model.families._common import LLAMA_SWITCHES, llama_config, llama_fields, llama_rows, mismatch
from trainer.model.gpt import has_qkv_bias


def fields(hf: dict, path: str) -> dict:
    bias = hf.get("attention_bias", False)
    if bias != hf.get("mlp_bias", False):
        raise ValueError(f"{path}: attention_bias={bias} with mlp_bias={hf.get('mlp_bias')} is unsupported")
    return llama_fields(hf, path) | {"bias": bool(bias)}


def config(cfg: ModelConfig) -> dict:
    return llama_config(cfg) | {"attention_bias": cfg.bias, "mlp_bias": cfg.bias}


def fits(cfg: ModelConfig) -> str | None:
    if has_qkv_bias(cfg) != cfg.bias:
        return "llama has q / k / v biases only together with every other bias"
    return mismatch(cfg, "llama", **LLAMA_SWITCHES)


register(Family("llama", "LlamaForCausalLM", fields, config, llama_rows, fits, ChatQuirks(end_of_turn=("<|eot_id|>",))))
