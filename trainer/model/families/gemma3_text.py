"""Gemma 3's text model (Gemma3ForCausalLM, model_type gemma3_text) and, with its own switches,
Gemma 2 (gemma2.py reuses this module).

Gemma: norms on both sides of each sublayer (sandwich: input_layernorm, post_attention_layernorm,
pre_feedforward_layernorm, post_feedforward_layernorm), RMSNorm scaling by (1 + weight),
embeddings times sqrt(hidden_size), GeGLU (tanh GELU), scores scaled by query_pre_attn_scalar's
-1/2 power, a tied head, and layer_types alternating sliding and full attention. Gemma 3 adds
RMSNorm on each head's q and k and a RoPE base of its own for the sliding layers
(rope_local_base_freq); Gemma 2 soft-caps the scores and the final logits instead. Chat: no
system role; <end_of_turn> ends a turn.
"""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import ChatQuirks, Family, Row, register
from trainer.model.families._common import (
    LLAMA_SWITCHES,
    llama_config,
    llama_fields,
    llama_rows,
    mismatch,
    rope_from_hf,
)
from trainer.model.gpt import has_qkv_bias

CHAT = ChatQuirks(system_role=False, end_of_turn=("<end_of_turn>",))
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
SHARED = dict(mlp="geglu", norm_placement="sandwich", norm_offset=1.0, embed_scale=True)


def gemma_fields(hf: dict, path: str, pattern: int, context: int = 131072) -> dict:
    """What Gemma 2 and 3 share; pattern: every pattern-th layer attends fully when config.json has
    no layer_types (Gemma 2: 2, Gemma 3: sliding_window_pattern, 6); context: transformers' default
    max_position_embeddings (Gemma 3: 131072, Gemma 2: 8192)."""
    if hf.get("attention_bias", False) or hf.get("use_bidirectional_attention"):
        raise ValueError(f"{path}: attention_bias or use_bidirectional_attention is unsupported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"{path}: hidden_activation {act!r} unsupported; expected gelu_pytorch_tanh")
    n = hf["num_hidden_layers"]
    pattern = hf.get("sliding_window_pattern", pattern)
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    window = hf.get("sliding_window")
    nested = "full_attention" in (hf.get("rope_parameters") or {})  # Gemma 3's per-layer-type RoPE: read below
    base = llama_fields(hf | {"hidden_act": "silu"} | ({"rope_parameters": None} if nested else {}), path)
    return (
        base
        | SHARED
        | dict(
            block_size=hf.get("max_position_embeddings", context),  # Gemma 3's text_config often omits it
            head_dim=hf.get("head_dim", 256),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            sliding_window=window if "sliding_attention" in types else None,
            layer_types=list(types) if window is not None and "sliding_attention" in types else None,
            attn_softcap=hf.get("attn_logit_softcapping"),
            final_softcap=hf.get("final_logit_softcapping"),
        )
    )


def fields(hf: dict, path: str) -> dict:
    out = gemma_fields(hf, path, pattern=6) | {"qk_norm": "head"}
    params = hf.get("rope_parameters")
    if params and "full_attention" in params:  # transformers >= 5: one set per layer type
        theta, scaling = rope_from_hf(hf, params["full_attention"])
        local_theta, local_scaling = rope_from_hf(hf, params.get("sliding_attention") or {"rope_theta": 10000.0})
        if local_scaling:
            raise ValueError(f"{path}: RoPE scaling on Gemma 3's sliding layers is unsupported")
    else:  # transformers < 5: rope_theta, rope_scaling (the global layers'), rope_local_base_freq
        theta, scaling = rope_from_hf({"rope_theta": hf.get("rope_theta", 1e6), "rope_scaling": hf.get("rope_scaling")})
        local_theta = hf.get("rope_local_base_freq", 10000.0)
    return out | {"rope_theta": theta, "rope_scaling": scaling, "rope_local_theta": float(local_theta)}


def gemma_config(cfg: ModelConfig) -> dict:
    out = llama_config(cfg)
    out.pop("hidden_act")
    return out | {
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "query_pre_attn_scalar": _number(cfg.query_pre_attn_scalar),
        "sliding_window": cfg.sliding_window,
        "layer_types": cfg.layer_types or ["full_attention"] * cfg.n_layer,
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.final_softcap,
    }


def _number(x: float | None) -> float | int | None:
    """A whole number as an int (transformers' strict config wants query_pre_attn_scalar's int)."""
    return int(x) if x is not None and float(x).is_integer() else x


def config(cfg: ModelConfig) -> dict:
    out = gemma_config(cfg)
    del out["rope_theta"], out["rope_scaling"]
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta} | dict(cfg.rope_scaling or {})
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    return out | {"rope_parameters": {"full_attention": full, "sliding_attention": local}}


def rows(cfg: ModelConfig) -> list[Row]:
    return llama_rows(cfg, norms=NORMS)


def gemma_fits(cfg: ModelConfig, name: str, **switches) -> str | None:
    if cfg.bias or has_qkv_bias(cfg):
        return f"{name} has no biases"
    if not cfg.tie_embeddings:
        return f"{name} ties its head to the embedding"
    any_value = lambda value: True  # noqa: E731
    allowed = dict.fromkeys(("query_pre_attn_scalar", "sliding_window", "layer_types"), any_value)
    return mismatch(cfg, name, **(LLAMA_SWITCHES | SHARED | allowed | switches))


def fits(cfg: ModelConfig) -> str | None:
    return gemma_fits(cfg, "gemma3_text", qk_norm="head", rope_local_theta=lambda theta: True)


register(Family("gemma3_text", "Gemma3ForCausalLM", fields, config, rows, fits, CHAT))
