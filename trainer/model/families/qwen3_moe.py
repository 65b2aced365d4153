"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention with a sparse MLP (a router `gate`, experts
gate_proj / up_proj / down_proj of width moe_intermediate_size) in the layers decoder_sparse_step
and mlp_only_layers leave sparse, dense MLPs (intermediate_size) in the others; routing softmax ->
top-k, renormalised when norm_topk_prob."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import Family, Row, register
from trainer.model.families._common import expert_rows, llama_rows, mismatch, mlp_rows
from trainer.model.families.qwen3 import CHAT, SWITCHES
from trainer.model.families.qwen3 import config as qwen3_config
from trainer.model.families.qwen3 import fields as qwen3_fields
from trainer.model.gpt import has_qkv_bias


def fields(hf: dict, path: str) -> dict:
    n, step, dense = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    n_experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 5 writes the latter
    sparse = [i for i in range(n) if i not in dense and n_experts > 0 and (i + 1) % step == 0]
    return qwen3_fields(hf, path) | dict(
        n_experts=n_experts,
        n_experts_per_token=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        moe_norm_topk=bool(hf.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        moe_layers=None if len(sparse) == n else sparse,
    )


def config(cfg: ModelConfig) -> dict:
    sparse = [i for i in range(cfg.n_layer) if cfg.is_moe(i)]
    return qwen3_config(cfg) | {
        "num_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.n_experts_per_token,
        "moe_intermediate_size": cfg.moe_intermediate_size or cfg.intermediate_size,
        "norm_topk_prob": cfg.moe_norm_topk,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(cfg.n_layer) if i not in sparse],
        "output_router_logits": cfg.router_aux_loss_coef > 0,
    }


def rows(cfg: ModelConfig) -> list[Row]:
    def mlp(i: int, p: str, h: str) -> list[Row]:
        if cfg.is_moe(i):
            return expert_rows(cfg, p, f"{h}mlp.", "gate", ("gate_proj", "up_proj", "down_proj"))
        return mlp_rows(p, h, ["weight"])

    return llama_rows(cfg, mlp=mlp)


def fits(cfg: ModelConfig) -> str | None:
    if cfg.bias or has_qkv_bias(cfg):
        return "qwen3_moe has no biases"
    if not cfg.n_experts:
        return "qwen3_moe has sparse MLPs (model.n_experts > 0)"
    return mismatch(cfg, "qwen3_moe", **(SWITCHES | {"n_experts": lambda n: True}))


register(Family("qwen3_moe", "Qwen3MoeForCausalLM", fields, config, rows, fits, CHAT))
