"""Qwen2 (Qwen2ForCausalLM): the Llama layout with q / k / v biases (no other bias); sliding
windows in the layers layer_types marks, when use_sliding_window is set."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import ChatQuirks, Family, register
from trainer.model.families._common import LLAMA_SWITCHES, layer_types, llama_config, llama_fields, llama_rows, mismatch
from trainer.model.gpt import has_qkv_bias


def fields(hf: dict, path: str) -> dict:
    types = layer_types(hf, hf.get("sliding_window"))
    window = hf.get("sliding_window") if types else None
    return llama_fields(hf, path) | {"qkv_bias": True, "sliding_window": window, "layer_types": types}


def config(cfg: ModelConfig) -> dict:
    return llama_config(cfg) | window_config(cfg)


def window_config(cfg: ModelConfig) -> dict:
    """Qwen2 / Qwen3's window keys: use_sliding_window with the layers' types."""
    if cfg.sliding_window is None:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}
    types = cfg.layer_types or ["sliding_attention"] * cfg.n_layer
    first = types.index("sliding_attention")  # max_window_layers: older transformers' spelling of the same
    return {
        "use_sliding_window": True,
        "sliding_window": cfg.sliding_window,
        "layer_types": types,
        "max_window_layers": first,
    }


def fits(cfg: ModelConfig) -> str | None:
    if cfg.bias or not has_qkv_bias(cfg):
        return "qwen2 has q / k / v biases and no other"
    return mismatch(
        cfg, "qwen2", **(LLAMA_SWITCHES | {"sliding_window": lambda w: True, "layer_types": lambda t: True})
    )


register(Family("qwen2", "Qwen2ForCausalLM", fields, config, llama_rows, fits, ChatQuirks(end_of_turn=("<|im_end|>",))))
