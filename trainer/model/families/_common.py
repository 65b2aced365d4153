"""What several families share: config.json's RoPE keys, the Llama layout's fields, tensor names
and config.json keys, and the check that a ModelConfig uses only switches a family has."""

from __future__ import annotations

from collections.abc import Callable

from trainer.config import ModelConfig
from trainer.model.families import Row
from trainer.model.gpt import has_qkv_bias

# ModelConfig's switches at the plain Llama layout's values; a family states where it differs.
LLAMA_SWITCHES: dict = dict(
    position="rope", norm="rmsnorm", mlp="swiglu", qk_norm="none", norm_placement="pre", norm_offset=0.0,
    embed_scale=False, query_pre_attn_scalar=None, attn_softcap=None, final_softcap=None, fused_gate_up=False,
    n_experts=0, sliding_window=None, layer_types=None, rope_local_theta=None,
)  # fmt: skip


def mismatch(cfg: ModelConfig, family: str, **switches) -> str | None:
    """Why `family` cannot hold cfg: the first switch whose value differs from the family's
    (switches: field -> value, or a tuple of allowed values, or a callable check), else None."""
    for key, want in switches.items():
        have = getattr(cfg, key)
        ok = want(have) if callable(want) else have in want if isinstance(want, tuple) else have == want
        if not ok:
            return f"{family} has no model.{key}={have!r}"
    return None


def rope_from_hf(hf: dict, params: dict | None = None) -> tuple[float, dict | None]:
    """rope_theta and scaling from transformers<5 keys (rope_theta, rope_scaling) or transformers>=5's
    rope_parameters (which also holds rope_theta); params: one layer type's rope_parameters.
    Scaling kept as ModelConfig.rope_scaling: llama3, linear or longrope (LongRoPE's factor fixed
    here from the checkpoint's context, so cropping model.block_size does not change it)."""
    scaling = dict(params if params is not None else (hf.get("rope_scaling") or hf.get("rope_parameters") or {}))
    theta = float(scaling.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    kind = scaling.pop("type", None) or scaling.pop("rope_type", "default")
    if float(scaling.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    if kind in ("su", "yarn") and hf.get("model_type") == "phi3":  # Phi-3's old names for LongRoPE
        kind = "longrope"
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {"rope_type": "llama3", **{k: scaling[k] for k in keys}}
    if kind == "longrope":
        original = scaling.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        original = original or hf["max_position_embeddings"]
        factor = scaling.get("factor") or hf["max_position_embeddings"] / original
        out = {"rope_type": "longrope", "short_factor": list(scaling["short_factor"]),
               "long_factor": list(scaling["long_factor"]), "original_max_position_embeddings": original,
               "factor": float(factor)}  # fmt: skip
        if scaling.get("attention_factor") is not None:
            out["attention_factor"] = float(scaling["attention_factor"])
        return theta, out
    raise ValueError(f"rope scaling type {kind!r} is not supported (default, llama3, linear or longrope)")


def rope_to_hf(cfg: ModelConfig) -> dict:
    """config.json's RoPE keys for cfg, in transformers<5's spelling (rope_theta, rope_scaling), which
    transformers 5 reads too."""
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling}


def llama_fields(hf: dict, path: str) -> dict:
    """The Llama layout's ModelConfig fields from config.json (every family below Llama's shares them)."""
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
        raise ValueError(f"{path}: hidden_act {act!r} unsupported; expected silu")
    theta, scaling = rope_from_hf(hf)
    head_dim = hf.get("head_dim")
    return dict(
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        head_dim=None if head_dim is None or (n_embd % n_head == 0 and head_dim == n_embd // n_head) else head_dim,
        intermediate_size=hf["intermediate_size"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        bias=False,
    )


def layer_types(hf: dict, window: int | None) -> list[str] | None:
    """Which layers slide (Qwen2 / Qwen3): layer_types when config.json has them, else the layers
    from max_window_layers on, when use_sliding_window is set. None when no layer slides."""
    if window is None or not hf.get("use_sliding_window", False):
        return None
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention"
        for i in range(hf["num_hidden_layers"])
    ]
    return list(types) if "sliding_attention" in types else None


def llama_config(cfg: ModelConfig) -> dict:
    """config.json keys of the Llama layout (the family adds its own)."""
    return {
        "max_position_embeddings": cfg.block_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size or 4 * cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": cfg.attn_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        **rope_to_hf(cfg),
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def qkv_sizes(cfg: ModelConfig) -> tuple[int, int, int]:
    hd, nkv = cfg.attn_head_dim, cfg.n_kv_head or cfg.n_head
    return cfg.n_head * hd, nkv * hd, nkv * hd


def attention_rows(cfg: ModelConfig, p: str, h: str, qkv_kinds: list[str], kinds: list[str]) -> list[Row]:
    """Separate q / k / v projections fused into c_attn, o_proj, and q / k norms if any."""
    rows = [Row(f"{p}attn.c_attn.{k}", tuple(f"{h}self_attn.{x}_proj.{k}" for x in "qkv"), "cat") for k in qkv_kinds]
    rows += [Row(f"{p}attn.c_proj.{k}", (f"{h}self_attn.o_proj.{k}",)) for k in kinds]
    if cfg.qk_norm != "none":
        rows += [Row(f"{p}attn.{x}_norm.weight", (f"{h}self_attn.{x}_norm.weight",)) for x in "qk"]
    return rows


def mlp_rows(p: str, h: str, kinds: list[str], mlp: str = "mlp") -> list[Row]:
    """A gated MLP's gate_proj / up_proj / down_proj under `mlp`."""
    rows = []
    for k in kinds:
        rows += [
            Row(f"{p}mlp.w_gate.{k}", (f"{h}{mlp}.gate_proj.{k}",)),
            Row(f"{p}mlp.w_up.{k}", (f"{h}{mlp}.up_proj.{k}",)),
            Row(f"{p}mlp.c_proj.{k}", (f"{h}{mlp}.down_proj.{k}",)),
        ]
    return rows


def expert_rows(cfg: ModelConfig, p: str, h: str, router: str, names: tuple[str, str, str]) -> list[Row]:
    """A sparse MLP: the router, and each of gate / up / down stacked over the experts from one
    tensor per expert (h + "experts.{e}.{name}.weight")."""
    experts = range(cfg.n_experts)
    rows = [Row(f"{p}mlp.router.weight", (f"{h}{router}.weight",))]
    for ours, theirs in zip(("w_gate", "w_up", "w_down"), names, strict=True):
        rows.append(Row(f"{p}mlp.{ours}", tuple(f"{h}experts.{e}.{theirs}.weight" for e in experts), "stack"))
    return rows


LayerRows = Callable[[int, str, str], list[Row]]  # (layer, GPT's prefix, HF's prefix) -> that layer's rows


def llama_rows(
    cfg: ModelConfig, norms: tuple[str, ...] = (), attention: LayerRows | None = None, mlp: LayerRows | None = None
) -> list[Row]:
    """The Llama layout's tensors (embedding, blocks, final norm); norms: the block norms' HF
    names in GPT's order (default Llama's input_layernorm, post_attention_layernorm); attention /
    mlp: a family's own rows for a layer's sublayer (default Llama's q / k / v / o and gate / up / down)."""
    norms = norms or ("input_layernorm", "post_attention_layernorm")
    ours_norms = ("norm_1", "norm_2") if len(norms) == 2 else ("norm_1", "norm_1_post", "norm_2", "norm_2_post")
    kinds = ["weight", "bias"] if cfg.bias else ["weight"]
    qkv_kinds = ["weight", "bias"] if has_qkv_bias(cfg) else ["weight"]
    rows = [Row("embed.wte.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        rows += [
            Row(f"{p}{ours}.weight", (f"{h}{theirs}.weight",)) for ours, theirs in zip(ours_norms, norms, strict=True)
        ]
        rows += attention(i, p, h) if attention else attention_rows(cfg, p, h, qkv_kinds, kinds)
        rows += mlp(i, p, h) if mlp else mlp_rows(p, h, kinds)
    return rows + [Row("norm_f.weight", ("model.norm.weight",))]
