"""OLMo 2 (Olmo2ForCausalLM): the Llama layout with its norms after the sublayers
(x + norm(f(x)): post_attention_layernorm, post_feedforward_layernorm) and RMSNorm over the whole
q and k projections (before the heads are split)."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import ChatQuirks, Family, Row, register
from trainer.model.families._common import LLAMA_SWITCHES, llama_config, llama_fields, llama_rows, mismatch
from trainer.model.gpt import has_qkv_bias


def fields(hf: dict, path: str) -> dict:
    if hf.get("attention_bias", False):
        raise ValueError(f"{path}: attention_bias=true is unsupported")
    return llama_fields(hf, path) | {"qk_norm": "full", "norm_placement": "post"}


def config(cfg: ModelConfig) -> dict:
    return llama_config(cfg) | {"attention_bias": False}


def rows(cfg: ModelConfig) -> list[Row]:
    return llama_rows(cfg, norms=("post_attention_layernorm", "post_feedforward_layernorm"))


def fits(cfg: ModelConfig) -> str | None:
    if cfg.bias or has_qkv_bias(cfg):
        return "olmo2 has no biases"
    return mismatch(cfg, "olmo2", **(LLAMA_SWITCHES | {"qk_norm": "full", "norm_placement": "post"}))


register(Family("olmo2", "Olmo2ForCausalLM", fields, config, rows, fits, ChatQuirks(end_of_turn=("<|endoftext|>",))))
