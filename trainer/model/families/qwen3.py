"""Qwen3 (Qwen3ForCausalLM): the Llama layout with RMSNorm over each head's q and k (before
RoPE), its own head_dim, no biases, and Qwen2's sliding-window keys. Chat: <|im_end|> ends a turn;
the template renders <think> ... </think> reasoning."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import ChatQuirks, Family, register
from trainer.model.families._common import LLAMA_SWITCHES, layer_types, llama_config, llama_fields, llama_rows, mismatch
from trainer.model.families.qwen2 import window_config
from trainer.model.gpt import has_qkv_bias

CHAT = ChatQuirks(end_of_turn=("<|im_end|>",), thinking=True)
SWITCHES = LLAMA_SWITCHES | {"qk_norm": "head", "sliding_window": lambda w: True, "layer_types": lambda t: True}


def fields(hf: dict, path: str) -> dict:
    if hf.get("attention_bias", False):
        raise ValueError(f"{path}: attention_bias=true (q / k / v / o biases without MLP ones) is unsupported")
    types = layer_types(hf, hf.get("sliding_window"))
    window = hf.get("sliding_window") if types else None
    return llama_fields(hf, path) | {"qk_norm": "head", "sliding_window": window, "layer_types": types}


def config(cfg: ModelConfig) -> dict:
    return llama_config(cfg) | {"attention_bias": False} | window_config(cfg)


def fits(cfg: ModelConfig) -> str | None:
    if cfg.bias or has_qkv_bias(cfg):
        return "qwen3 has no biases"
    return mismatch(cfg, "qwen3", **SWITCHES)


register(Family("qwen3", "Qwen3ForCausalLM", fields, config, llama_rows, fits, CHAT))
