"""GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, GELU, biases everywhere, Conv1D weights
stored (in, out) and transposed here, tensors under "transformer."."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import Family, Row, register
from trainer.model.families._common import LLAMA_SWITCHES, mismatch
from trainer.model.gpt import has_qkv_bias


def fields(hf: dict, path: str) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"{path}: GPT-2 activation_function {act!r} unsupported; expected gelu_new or gelu")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError(f"{path}: GPT-2 attention-scaling variants are not supported")
    return dict(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu_exact" if act == "gelu" else "gelu",
        position="learned",
        tie_embeddings=hf.get("tie_word_embeddings", True),
        bias=True,
    )


def config(cfg: ModelConfig) -> dict:
    return {
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.intermediate_size or 4 * cfg.n_embd,
        "activation_function": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def rows(cfg: ModelConfig) -> list[Row]:
    kinds = ["weight", "bias"] if cfg.bias else ["weight"]
    out = [Row("embed.wte.weight", ("wte.weight",)), Row("embed.wpe.weight", ("wpe.weight",))]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"h.{i}."
        for ours, theirs in [("norm_1", "ln_1"), ("norm_2", "ln_2")]:
            out += [Row(f"{p}{ours}.{k}", (f"{h}{theirs}.{k}",)) for k in ("weight", "bias")]
        for mod in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out += [Row(f"{p}{mod}.{k}", (f"{h}{mod}.{k}",), "conv1d" if k == "weight" else "same") for k in kinds]
    return out + [Row(f"norm_f.{k}", (f"ln_f.{k}",)) for k in ("weight", "bias")]


def fits(cfg: ModelConfig) -> str | None:
    switches = LLAMA_SWITCHES | dict(position="learned", norm="layernorm", mlp=("gelu", "gelu_exact"))
    if not (cfg.bias and has_qkv_bias(cfg)):
        return "gpt2 has biases in every layer"
    if (cfg.n_kv_head or cfg.n_head) != cfg.n_head or cfg.head_dim not in (None, cfg.n_embd // cfg.n_head):
        return "gpt2 has no grouped-query attention or head_dim of its own"
    return mismatch(cfg, "gpt2", **switches)


register(Family("gpt2", "GPT2LMHeadModel", fields, config, rows, fits, prefix="transformer."))
