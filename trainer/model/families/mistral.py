"""Mistral (MistralForCausalLM): the Llama layout without biases, every layer within one
sliding window when config.json sets sliding_window."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import ChatQuirks, Family, register
from trainer.model.families._common import LLAMA_SWITCHES, llama_config, llama_fields, llama_rows, mismatch
from trainer.model.gpt import has_qkv_bias


def fields(hf: dict, path: str) -> dict:
    return llama_fields(hf, path) | {"sliding_window": hf.get("sliding_window")}


def config(cfg: ModelConfig) -> dict:
    return llama_config(cfg) | {"sliding_window": cfg.sliding_window}


def fits(cfg: ModelConfig) -> str | None:
    if cfg.bias or has_qkv_bias(cfg):
        return "mistral has no biases"
    return mismatch(cfg, "mistral", **(LLAMA_SWITCHES | {"sliding_window": lambda w: True}))


register(Family("mistral", "MistralForCausalLM", fields, config, llama_rows, fits, ChatQuirks(end_of_turn=("</s>",))))
