"""Import and export local Hugging Face checkpoints (GPT-2, Llama, Mistral, Qwen2) for GPT.

A checkpoint directory holds config.json plus model.safetensors, sharded safetensors with
model.safetensors.index.json, or (fallback) pytorch_model.bin. Nothing is downloaded.
GPT-2 stores its projections as Conv1D, (in, out), so they are transposed; Llama's separate
q / k / v projections (Mistral's and Qwen2's: the same layout, Qwen2's with q / k / v biases) are
concatenated into the fused c_attn, [q | k | v], and split on export. Export writes the
architecture the checkpoint came from (ModelConfig.hf_model_type), else the one the layout fits.
A sliding window shorter than the context is refused (ModelConfig.check_context). The embedding and
an untied head are padded with zero rows to ModelConfig.padded_vocab_size on import, one tensor at
a time, and trimmed back to the checkpoint's vocab_size on export (`pad_vocab`, `trim_vocab`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from trainer.config import PRETRAINED_OVERRIDABLE, ModelConfig
from trainer.model.gpt import GPT, bare_name, has_qkv_bias

# HF model_type -> its tensor layout, and the class transformers builds for it.
LAYOUTS = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# HF tensors that are buffers or duplicates, not weights GPT needs.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
# GPT's tensors with one row per token: padded to ModelConfig.padded_vocab_size rows.
VOCAB_ROWS = ("embed.wte.weight", "head.weight")


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _read_config_json(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory; expected a local Hugging Face checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; expected a Hugging Face checkpoint with config.json")
    return json.loads(config_file.read_text())


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """rope_theta and 'llama3' scaling from the transformers<5 keys (rope_theta, rope_scaling)
    or the transformers>=5 key (rope_parameters, which also holds rope_theta)."""
    scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(hf.get("rope_theta") or scaling.get("rope_theta") or 10000.0)
    scaling.pop("rope_theta", None)
    kind = scaling.pop("type", None) or scaling.pop("rope_type", "default")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope scaling type {kind!r} is not supported (only 'llama3')")
    return theta, {"rope_type": "llama3", **scaling}


def load_hf_config(path: str | Path) -> ModelConfig:
    """Read a checkpoint's config.json into a ModelConfig (GPT-2, Llama, Mistral or Qwen2)."""
    hf = _read_config_json(path)
    model_type = hf.get("model_type")
    if model_type not in LAYOUTS:
        raise ValueError(
            f"{path}/config.json: model_type {model_type!r} unsupported; expected gpt2, llama, mistral or qwen2"
        )
    fields = _gpt2_fields(hf, path) if model_type == "gpt2" else _llama_fields(hf, path)
    name = Path(path).name or "pretrained"
    return ModelConfig(name=name, vocab_size=hf["vocab_size"], pretrained=str(path), hf_model_type=model_type, **fields)


def _gpt2_fields(hf: dict, path: str | Path) -> dict:
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


def _llama_fields(hf: dict, path: str | Path) -> dict:
    """Llama, Mistral and Qwen2: one layout; Qwen2 adds q / k / v biases (and no other bias)."""
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise ValueError(f"{path}: head_dim={hf['head_dim']} != hidden_size / num_attention_heads; unsupported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} unsupported; expected silu")
    if hf["model_type"] == "qwen2":  # q / k / v biases are built in, no other projection has one
        bias, qkv_bias = False, True
    else:
        bias, qkv_bias = hf.get("attention_bias", False), None
        if bias != hf.get("mlp_bias", False):
            raise ValueError(f"{path}: attention_bias={bias} with mlp_bias={hf.get('mlp_bias')} is unsupported")
    theta, scaling = _rope_from_hf(hf)
    return dict(
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        intermediate_size=hf["intermediate_size"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        bias=bool(bias),
        qkv_bias=qkv_bias,
        sliding_window=_sliding_window(hf),
    )


def _sliding_window(hf: dict) -> int | None:
    """The attention span of a layer that slides, or None when every layer attends to the whole
    context. Qwen2 slides only with use_sliding_window, in the layers layer_types marks (older
    config.json: the layers from max_window_layers on)."""
    window = hf.get("sliding_window")
    if hf["model_type"] != "qwen2" or window is None:
        return window
    if not hf.get("use_sliding_window", False):
        return None
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window if hf.get("max_window_layers", 0) < hf["num_hidden_layers"] else None


def _arch(cfg: ModelConfig) -> str:
    """The tensor layout of cfg: gpt2, llama, or qwen2 (llama's with biases on q / k / v only)."""
    qkv_bias = has_qkv_bias(cfg)
    gpt2_like = (cfg.position, cfg.norm) == ("learned", "layernorm") and cfg.mlp in ("gelu", "gelu_exact")
    if gpt2_like and cfg.bias and qkv_bias and (cfg.n_kv_head or cfg.n_head) == cfg.n_head:
        return "gpt2"
    if (cfg.position, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu"):
        if qkv_bias == cfg.bias:
            return "llama"
        if qkv_bias:
            return "qwen2"
    raise ValueError(
        f"model {cfg.name!r} matches no Hugging Face layout: gpt2 needs learned/layernorm/gelu/bias/no GQA, "
        "llama needs rope/rmsnorm/swiglu, qwen2 adds qkv_bias without bias"
    )


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF model_type export writes: model.hf_model_type (the checkpoint's), else the layout's."""
    layout = _arch(cfg)
    model_type = cfg.hf_model_type or layout
    if LAYOUTS[model_type] != layout or (model_type == "mistral" and cfg.bias):
        raise ValueError(
            f"model {cfg.name!r} has the {layout} layout{' with biases' if cfg.bias else ''}, "
            f"which hf_model_type={model_type} cannot hold"
        )
    return model_type


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The config.json transformers needs to rebuild cfg as the same architecture it came from:
    GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM."""
    model_type = hf_model_type(cfg)
    head = {"architectures": [CLASSES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size}
    hidden = cfg.intermediate_size or 4 * cfg.n_embd
    if model_type == "gpt2":
        return head | {
            "n_positions": cfg.block_size,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": hidden,
            "activation_function": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings,
        }
    config = head | {
        "max_position_embeddings": cfg.block_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if model_type == "llama":
        return config | {"attention_bias": cfg.bias, "mlp_bias": cfg.bias}
    if model_type == "mistral":  # GPT attends to the whole context (block_size): no window
        return config | {"sliding_window": None}
    return config | {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}


# ---------------------------------------------------------------------------------------------
# Tensor names: (our name, [HF names concatenated along dim 0], transposed Conv1D?)

Rows = list[tuple[str, list[str], bool]]


def _name_map(cfg: ModelConfig) -> Rows:
    kinds = ["weight", "bias"] if cfg.bias else ["weight"]
    qkv_kinds = ["weight", "bias"] if has_qkv_bias(cfg) else ["weight"]
    rows = _gpt2_rows(cfg, kinds) if _arch(cfg) == "gpt2" else _llama_rows(cfg, kinds, qkv_kinds)
    if not cfg.tie_embeddings:
        rows.append(("head.weight", ["lm_head.weight"], False))
    return rows


def _gpt2_rows(cfg: ModelConfig, kinds: list[str]) -> Rows:
    rows: Rows = [("embed.wte.weight", ["wte.weight"], False), ("embed.wpe.weight", ["wpe.weight"], False)]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"h.{i}."
        for ours, theirs in [("norm_1", "ln_1"), ("norm_2", "ln_2")]:
            rows += [(f"{p}{ours}.{k}", [f"{h}{theirs}.{k}"], False) for k in ("weight", "bias")]
        for mod in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            rows += [(f"{p}{mod}.{k}", [f"{h}{mod}.{k}"], k == "weight") for k in kinds]
    return rows + [(f"norm_f.{k}", [f"ln_f.{k}"], False) for k in ("weight", "bias")]


def _llama_rows(cfg: ModelConfig, kinds: list[str], qkv_kinds: list[str]) -> Rows:
    rows: Rows = [("embed.wte.weight", ["model.embed_tokens.weight"], False)]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        rows += [
            (f"{p}norm_1.weight", [f"{h}input_layernorm.weight"], False),
            (f"{p}norm_2.weight", [f"{h}post_attention_layernorm.weight"], False),
        ]
        rows += [(f"{p}attn.c_attn.{k}", [f"{h}self_attn.{x}_proj.{k}" for x in "qkv"], False) for k in qkv_kinds]
        for k in kinds:
            rows += [
                (f"{p}attn.c_proj.{k}", [f"{h}self_attn.o_proj.{k}"], False),
                (f"{p}mlp.w_gate.{k}", [f"{h}mlp.gate_proj.{k}"], False),
                (f"{p}mlp.w_up.{k}", [f"{h}mlp.up_proj.{k}"], False),
                (f"{p}mlp.c_proj.{k}", [f"{h}mlp.down_proj.{k}"], False),
            ]
    return rows + [("norm_f.weight", ["model.norm.weight"], False)]


def _check_names(names: list[str], rows: Rows, cfg: ModelConfig) -> None:
    """Raise (one line) when the HF names (prefix removed) lack a tensor GPT needs or hold one
    GPT would drop."""
    present = set(names)
    missing = [h for _, hs, _ in rows for h in hs if h not in present]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors GPT needs, e.g. {missing[:3]}")
    used = {h for _, hs, _ in rows for h in hs} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    unused = [k for k in names if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if unused:
        raise ValueError(f"checkpoint has {len(unused)} tensors GPT would drop, e.g. {unused[:3]}")


def _assemble(pieces: list[torch.Tensor], transpose: bool) -> torch.Tensor:
    """One GPT tensor from its HF pieces: q, k, v concatenated, Conv1D transposed."""
    t = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
    return (t.t() if transpose else t).contiguous()


def pad_vocab(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """GPT's tensor `name` with zero rows appended up to cfg.padded_vocab_size when it has one row
    per token (VOCAB_ROWS; it must hold cfg.vocab_size rows); any other tensor as it is."""
    if name not in VOCAB_ROWS:
        return tensor
    if tensor.size(0) != cfg.vocab_size:
        raise ValueError(f"{name} has {tensor.size(0)} rows, but the vocabulary (vocab_size) is {cfg.vocab_size}")
    padding = tensor.new_zeros(cfg.padded_vocab_size - cfg.vocab_size, *tensor.shape[1:])
    return torch.cat([tensor, padding]) if padding.numel() else tensor


def trim_vocab(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """GPT's tensor `name` without its padding rows (the real vocabulary's cfg.vocab_size rows
    when it has one row per token); any other tensor as it is."""
    return tensor[: cfg.vocab_size] if name in VOCAB_ROWS else tensor


def hf_to_trainer(hf_tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and fuse / transpose, pad the vocabulary of) HF tensors into GPT's state dict. Also
    maps gradients (the padding rows' are zero)."""
    tensors = {k.removeprefix("transformer."): v for k, v in hf_tensors.items()}
    rows = _name_map(cfg)
    _check_names(list(tensors), rows, cfg)
    return {ours: pad_vocab(ours, _assemble([tensors[h] for h in hs], transpose), cfg) for ours, hs, transpose in rows}


def trainer_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of hf_to_trainer: GPT's state dict in HF names (GPT-2 keys under transformer.), the
    vocabulary's padding rows dropped."""
    state = {bare_name(k): v for k, v in state.items()}
    hd, nh, nkv = cfg.n_embd // cfg.n_head, cfg.n_head, cfg.n_kv_head or cfg.n_head
    prefix = "transformer." if _arch(cfg) == "gpt2" else ""
    out = {}
    for ours, theirs, transpose in _name_map(cfg):
        t = trim_vocab(ours, state[ours].detach(), cfg)
        parts = t.split([nh * hd, nkv * hd, nkv * hd], dim=0) if len(theirs) == 3 else [t]
        for name, part in zip(theirs, parts, strict=True):
            key = name if name.startswith(("model.", "lm_head")) else prefix + name
            out[key] = (part.t() if transpose else part).contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Files


def _weight_files(path: Path) -> list[tuple[Path, list[str]]]:
    """The checkpoint's weight files in reading order, each with the tensor names it stores,
    taken from the index or the file's header: no tensor is read."""
    from safetensors import safe_open

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            by_file: dict[str, list[str]] = {}
            for name, file in json.loads(index.read_text())["weight_map"].items():
                by_file.setdefault(file, []).append(name)
            return [(path / file, by_file[file]) for file in sorted(by_file)]
    if (path / "model.safetensors").is_file():
        with safe_open(path / "model.safetensors", framework="pt") as f:
            return [(path / "model.safetensors", list(f.keys()))]
    if (path / "pytorch_model.bin").is_file():  # on meta: the names, no data
        names = torch.load(path / "pytorch_model.bin", map_location="meta", weights_only=True)
        return [(path / "pytorch_model.bin", list(names))]
    raise FileNotFoundError(
        f"{path}: no weights; expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _read_file(file: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for `names` of one weight file: one tensor at a time from safetensors, the
    whole file at once from a pickled pytorch_model*.bin (which has no per-tensor reader)."""
    from safetensors import safe_open

    if file.suffix == ".safetensors":
        with safe_open(file, framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)
    else:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
        for name in names:
            yield name, tensors.pop(name)


def read_hf_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory under their HF names (on CPU, stored dtype)."""
    files = _weight_files(Path(path).expanduser())
    return {name: t for file, names in files for name, t in _read_file(file, names)}


def pretrained_weights(path: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """GPT's tensors (our names; CPU; the checkpoint's dtype) streamed from a local HF checkpoint,
    each yielded once its HF pieces are read, file by file, so the whole model is never held: only
    pieces waiting for a partner in the next file (q, k, v of a layer split across shards).
    GPT-2's learned positions are cropped to cfg.block_size; the embedding and an untied head get
    zero rows up to cfg.padded_vocab_size. Missing or unused tensors are reported (ValueError) on
    the call, from the files' name lists, before any tensor is read."""
    path = Path(path).expanduser()
    files = _weight_files(path)
    rows = _name_map(cfg)
    _check_names([n.removeprefix("transformer.") for _, names in files for n in names], rows, cfg)
    return _stream(files, rows, cfg)


def _stream(files: list[tuple[Path, list[str]]], rows: Rows, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    row_of = {h: row for row in rows for h in row[1]}
    waiting: dict[str, torch.Tensor] = {}  # pieces read whose row still lacks one
    for file, stored in files:
        # stored name -> HF name without GPT-2's prefix, for GPT's tensors only (no buffers, no
        # tied head)
        wanted = {n: n.removeprefix("transformer.") for n in stored}
        wanted = {n: h for n, h in wanted.items() if h in row_of}
        for name, tensor in _read_file(file, list(wanted)):
            waiting[wanted[name]] = tensor
            ours, theirs, transpose = row_of[wanted[name]]
            if all(h in waiting for h in theirs):
                tensor = _assemble([waiting.pop(h) for h in theirs], transpose)
                if ours == "embed.wpe.weight":
                    tensor = _crop_positions(tensor, cfg.block_size)
                yield ours, pad_vocab(ours, tensor, cfg)


def _crop_positions(wpe: torch.Tensor, block_size: int) -> torch.Tensor:
    if block_size > wpe.size(0):
        raise ValueError(f"block_size={block_size} exceeds the checkpoint's {wpe.size(0)} positions")
    return wpe[:block_size].contiguous()


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, **overrides) -> GPT:
    """Build GPT from a local HF checkpoint. overrides: any of config.PRETRAINED_OVERRIDABLE (a smaller block_size
    crops GPT-2's learned positions). Built on the meta device, so nothing is randomly initialised."""
    bad = sorted(set(overrides) - set(PRETRAINED_OVERRIDABLE))
    if bad:
        raise ValueError(
            f"load_pretrained: cannot override {bad}; the checkpoint fixes them (allowed: {PRETRAINED_OVERRIDABLE})"
        )
    cfg = dataclasses.replace(load_hf_config(path), **overrides)
    with torch.device("meta"):
        model = GPT(cfg)
    state = {name: tensor.to(dtype) for name, tensor in pretrained_weights(path, cfg)}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def export_hf(model: GPT | Mapping[str, torch.Tensor], out_dir: str | Path, cfg: ModelConfig | None = None) -> None:
    """Write config.json + model.safetensors that transformers' from_pretrained loads.
    model: a GPT, or a full (unsharded) state dict with cfg given."""
    from safetensors.torch import save_file

    if cfg is None:
        if not isinstance(model, GPT):
            raise ValueError("export_hf: pass cfg when exporting a state dict")
        cfg = model.cfg
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    tensors = {k: v.cpu() for k, v in trainer_to_hf(state, cfg).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(tensors.values())).dtype
    config = hf_config_dict(cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
