"""Gemma 2 (Gemma2ForCausalLM): Gemma 3's layout (gemma3_text.py) without q / k norms, with one
RoPE base for every layer, and soft-capping of the scores (attn_logit_softcapping) and the final
logits (final_logit_softcapping)."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import Family, register
from trainer.model.families._common import rope_to_hf
from trainer.model.families.gemma3_text import CHAT, gemma_config, gemma_fields, gemma_fits, rows


def fields(hf: dict, path: str) -> dict:
    return gemma_fields(hf, path, pattern=2, context=8192)


def config(cfg: ModelConfig) -> dict:
    return gemma_config(cfg) | rope_to_hf(cfg)


def fits(cfg: ModelConfig) -> str | None:
    return gemma_fits(cfg, "gemma2", attn_softcap=lambda cap: True, final_softcap=lambda cap: True)


register(Family("gemma2", "Gemma2ForCausalLM", fields, config, rows, fits, CHAT))
