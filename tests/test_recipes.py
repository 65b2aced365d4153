"""The model presets of real architectures (configs/model/qwen3-8b, gemma3-12b, qwen3-30b-a3b) against
the models' own public config.json numbers, with transformers as the reference: its model built from
those numbers on the meta device has exactly GPT's parameters; our family reads that config.json
back to the preset's shape, and an export of the preset writes its family with the same numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from trainer.__main__ import compose_config
from trainer.config import ModelConfig

# The architecture keys of each public config.json (Hugging Face Hub), as published: Qwen/Qwen3-8B,
# Qwen/Qwen3-30B-A3B, and google/gemma-3-12b-it's text_config with the Gemma3TextConfig defaults it
# relies on written out. Typed here from those files; nothing in trainer/ produced them.
QWEN3_8B = {
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 36, "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False,
    "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip
GEMMA3_12B = {
    "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3840, "intermediate_size": 15360,
    "max_position_embeddings": 131072, "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000, "sliding_window": 1024,
    "sliding_window_pattern": 6, "tie_word_embeddings": True, "vocab_size": 262208,
}  # fmt: skip
PRESETS = {"qwen3-8b": QWEN3_8B, "gemma3-12b": GEMMA3_12B, "qwen3-30b-a3b": QWEN3_30B_A3B}
# What the model cards say (total, active per token), to the digits they print.
CARDS = {"qwen3-8b": (8.2e9, None), "gemma3-12b": (12e9, None), "qwen3-30b-a3b": (30.5e9, 3.3e9)}


def preset(name: str) -> ModelConfig:
    return compose_config([f"model={name}"])[0].model


def transformers_config(hf: dict):
    """transformers' own config class for a config.json dict (AutoConfig.for_model)."""
    from transformers import AutoConfig

    keys = {k: v for k, v in hf.items() if k not in ("model_type", "architectures", "rope_scaling", "rope_theta")}
    if "rope_local_base_freq" in hf:  # transformers >= 5: RoPE per layer type, in rope_parameters
        keys.pop("rope_local_base_freq")
        keys["rope_parameters"] = {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": float(hf["rope_theta"])},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(hf["rope_local_base_freq"])},
        }
    else:
        keys["rope_parameters"] = {"rope_type": "default", "rope_theta": float(hf["rope_theta"])}
    return AutoConfig.for_model(hf["model_type"], **keys)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_has_transformers_parameter_count(name: str) -> None:
    """GPT on the meta device holds exactly the parameters of transformers' model built on the meta
    device from the public config.json (no vocabulary padding here: model.vocab_multiple=1; these
    vocabularies are multiples of 64 anyway, so the preset's default pads nothing either)."""
    from transformers import AutoModelForCausalLM

    from trainer.model import GPT

    m = preset(name)
    assert m.padded_vocab_size == m.vocab_size == PRESETS[name]["vocab_size"]
    with torch.device("meta"):
        ours = GPT(replace(m, vocab_multiple=1))
        theirs = AutoModelForCausalLM.from_config(transformers_config(PRESETS[name]))
    assert type(theirs).__name__ == PRESETS[name]["architectures"][0]
    total = sum(p.numel() for p in theirs.parameters())
    assert ours.num_params() == total
    card_total, card_active = CARDS[name]
    assert total == pytest.approx(card_total, rel=0.03)
    if card_active:  # a token's 8 of 128 experts: the card's 3.3B activated
        assert ours.active_params() == pytest.approx(card_active, rel=0.03) and ours.active_params() < total / 9


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_is_what_its_family_reads_from_config_json(name: str) -> None:
    """trainer.model.families reads the public config.json back to the preset's architecture (so
    model.pretrained with the real checkpoint builds the same model), and the preset's export names its
    family and writes the config.json numbers (so an exported random-base run loads as that model)."""
    from trainer.model.families import family
    from trainer.model.hf_import import hf_config_dict, model_family

    m, hf = preset(name), PRESETS[name]
    read = family(hf["model_type"]).fields(hf, "config.json")
    for key, value in read.items():
        assert getattr(m, key) == value, key
    assert m.hf_model_type == hf["model_type"] == model_family(m).model_type
    written = hf_config_dict(m)
    assert written["model_type"] == hf["model_type"] and written["architectures"] == hf["architectures"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "rms_norm_eps"):  # fmt: skip
        assert written[key] == hf[key], key
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
        assert written.get(key) == hf.get(key), key
