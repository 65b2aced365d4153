"""Phi-3 (Phi3ForCausalLM): the Llama layout with q / k / v in one qkv_proj (GPT's c_attn as it
is) and gate / up in one gate_up_proj ([gate | up]: model.fused_gate_up), LongRoPE scaling (short
factors within the original context, long ones past it), and every layer within sliding_window
when config.json sets one."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import ChatQuirks, Family, Row, register
from trainer.model.families._common import LLAMA_SWITCHES, llama_config, llama_fields, llama_rows, mismatch
from trainer.model.gpt import has_qkv_bias


def fields(hf: dict, path: str) -> dict:
    return llama_fields(hf, path) | {"fused_gate_up": True, "sliding_window": hf.get("sliding_window")}


def config(cfg: ModelConfig) -> dict:
    out = llama_config(cfg) | {"sliding_window": cfg.sliding_window}
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "longrope":
        scaling = dict(cfg.rope_scaling)
        out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
        out["rope_scaling"] = {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}
    return out


def rows(cfg: ModelConfig) -> list[Row]:
    def attention(i: int, p: str, h: str) -> list[Row]:  # q / k / v already one tensor: GPT's c_attn as it is
        return [Row(f"{p}attn.c_attn.weight", (f"{h}self_attn.qkv_proj.weight",)),
                Row(f"{p}attn.c_proj.weight", (f"{h}self_attn.o_proj.weight",))]  # fmt: skip

    def mlp(i: int, p: str, h: str) -> list[Row]:  # [gate | up] in one tensor: model.fused_gate_up
        return [Row(f"{p}mlp.w_gate_up.weight", (f"{h}mlp.gate_up_proj.weight",)),
                Row(f"{p}mlp.c_proj.weight", (f"{h}mlp.down_proj.weight",))]  # fmt: skip

    return llama_rows(cfg, attention=attention, mlp=mlp)


def fits(cfg: ModelConfig) -> str | None:
    if cfg.bias or has_qkv_bias(cfg):
        return "phi3 has no biases"
    return mismatch(cfg, "phi3", **(LLAMA_SWITCHES | {"fused_gate_up": True, "sliding_window": lambda w: True}))


register(Family("phi3", "Phi3ForCausalLM", fields, config, rows, fits, ChatQuirks(end_of_turn=("<|end|>",))))
