"""Mixtral (MixtralForCausalLM): the Mistral layout with a sparse MLP in every layer
(block_sparse_moe: a router `gate`, experts w1 / w3 / w2 = gate / up / down, one tensor per
expert, stacked here), routing softmax -> top-k -> renormalised, and the load-balancing loss
weighted by router_aux_loss_coef."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import ChatQuirks, Family, Row, register
from trainer.model.families._common import (
    LLAMA_SWITCHES,
    expert_rows,
    llama_config,
    llama_fields,
    llama_rows,
    mismatch,
)
from trainer.model.gpt import has_qkv_bias


def fields(hf: dict, path: str) -> dict:
    if hf.get("router_jitter_noise", 0.0):
        raise ValueError(f"{path}: router_jitter_noise={hf['router_jitter_noise']} is unsupported; set it to 0")
    return llama_fields(hf, path) | dict(
        sliding_window=hf.get("sliding_window"),
        n_experts=hf["num_local_experts"],
        n_experts_per_token=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["intermediate_size"],
        moe_norm_topk=True,
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
    )


def config(cfg: ModelConfig) -> dict:
    return llama_config(cfg) | {
        "intermediate_size": cfg.moe_intermediate_size or cfg.intermediate_size,
        "sliding_window": cfg.sliding_window,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.n_experts_per_token,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_jitter_noise": 0.0,
        "output_router_logits": cfg.router_aux_loss_coef > 0,
    }


def rows(cfg: ModelConfig) -> list[Row]:
    return llama_rows(cfg, mlp=lambda i, p, h: expert_rows(cfg, p, f"{h}block_sparse_moe.", "gate", ("w1", "w3", "w2")))


def fits(cfg: ModelConfig) -> str | None:
    if cfg.bias or has_qkv_bias(cfg):
        return "mixtral has no biases"
    if not cfg.n_experts or cfg.moe_layers is not None or not cfg.moe_norm_topk:
        return "mixtral has a sparse MLP in every layer, with renormalised top-k weights"
    any_value = lambda value: True  # noqa: E731
    return mismatch(cfg, "mixtral", **(LLAMA_SWITCHES | {"sliding_window": any_value, "n_experts": any_value}))


register(Family("mixtral", "MixtralForCausalLM", fields, config, rows, fits, ChatQuirks(end_of_turn=("</s>",))))
