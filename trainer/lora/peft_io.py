"""PEFT's adapter format: adapter_config.json + adapter_model.safetensors, both ways.

Keys are PEFT 0.21's: base_model.model.<HF module>.lora_A.weight / .lora_B.weight /
.lora_magnitude_vector (DoRA), and modules_to_save's tensors under their HF names; a trained embedding
or head in the real vocabulary's shape (GPT's padding rows dropped on save, zero rows added on load).

Experts (experts.py) are written as PEFT on transformers 5 writes them: target_parameters, and keys on
the ParamWrapper that replaces `<mlp>.experts`, lora_A (E R, in) with expert e's A in rows [e R, (e + 1) R)
and lora_B (out, R E) with expert e's B in columns e, e + E, e + 2E, ... (PEFT's reshape (out, R, E)).
A layer with both fused parameters adapted nests gate_up_proj's wrapper inside down_proj's:
`experts.base_layer.lora_A.weight` is gate_up_proj's, `experts.lora_A.weight` down_proj's. An expert
gate_up_proj named by the checkpoint's names has rank 2r and alpha 2 alpha, which rank_pattern /
alpha_pattern say (`.*\\.gate_up_proj`), as PEFT writes them. An adapter PEFT wrote on transformers 4,
one per expert (`experts.{e}.w1.lora_A.weight` ...), is read fused as PEFT 0.21 fuses it on loading.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from trainer.config import ConfigError, LoraConfig, ModelConfig
from trainer.lora.names import (
    KINDS,
    HFExperts,
    HFLinear,
    Layout,
    expert_names,
    is_router,
    layout,
    peft_names,
    select_experts,
    select_targets,
    select_trained,
    split_name,
    transformers5_name,
)
from trainer.model.gpt import bare_name
from trainer.model.hf_import import VOCAB_ROWS, _arch, pad_vocab, trim_vocab

PEFT_PREFIX = "base_model.model."
# PEFT's key suffix for each of our adapter tensors (DoRA's magnitude is saved without ".weight").
PEFT_SUFFIX = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", "lora_magnitude": ".lora_magnitude_vector"}
GATE_UP_PATTERN = rf".*\.{re.escape('gate_up_proj')}"  # PEFT's rank_pattern / alpha_pattern key for it


def expert_module(x: HFExperts, nested: bool) -> str:
    """The PEFT module whose lora_A / lora_B hold x's adapter: the ParamWrapper on `<mlp>.experts`, and with
    both of the layer's parameters adapted (`nested`), gate_up_proj's is that wrapper's base_layer (PEFT
    wraps the parameters in the order transformers registers them, gate_up_proj first)."""
    container = x.hf_name.rsplit(".", 1)[0]
    return f"{container}.base_layer" if nested and x.leaf == "gate_up_proj" else container


def to_peft(kind: str, tensor: torch.Tensor) -> torch.Tensor:
    """Our expert adapter (A (E, R, in) or B (E, out, R)) as PEFT's ParamWrapper stores it: (E R, in) or (out, R E)."""
    if kind == "lora_A":
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor.permute(1, 2, 0).reshape(tensor.shape[1], -1)


def from_peft(kind: str, tensor: torch.Tensor, n_experts: int) -> torch.Tensor:
    """PEFT's ParamWrapper tensor back to ours (to_peft's inverse)."""
    if kind == "lora_A":
        return tensor.reshape(n_experts, -1, tensor.shape[-1])
    return tensor.reshape(tensor.shape[0], -1, n_experts).permute(2, 0, 1)


def peft_state_dict(named_tensors: Mapping[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename adapter tensors (and any base tensors given: those trained in full) to PEFT's keys,
    e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight; CPU, contiguous. A trained
    tied embedding is written twice, as the embedding and as lm_head, as PEFT's ensure_weight_tying does."""
    lay = layout(model_cfg)
    by_leaf = {(x.module, x.leaf): x.hf_name for x in lay.linears}
    experts = {(x.module, x.leaf): x for x in lay.experts}
    adapted = {split_name(bare_name(name))[::2] for name in named_tensors if split_name(bare_name(name))}
    out = {}
    for name, tensor in named_tensors.items():
        name, tensor = bare_name(name), tensor.detach().cpu()
        split = split_name(name)
        if split is not None and (split[0], split[2]) in experts:
            module, kind, leaf = split
            nested = {(module, "gate_up_proj"), (module, "down_proj")} <= adapted
            key = expert_module(experts[module, leaf], nested) + PEFT_SUFFIX[kind]
            out[PEFT_PREFIX + key] = to_peft(kind, tensor).contiguous()
        elif split is not None:
            module, kind, leaf = split
            out[PEFT_PREFIX + by_leaf[module, leaf] + PEFT_SUFFIX[kind]] = tensor.contiguous()
        else:
            key, transpose = lay.tensors[name]
            tensor = trim_vocab(name, tensor, model_cfg)
            out[PEFT_PREFIX + key] = (tensor.t() if transpose else tensor).contiguous()
            if name == "embed.wte.weight" and model_cfg.tie_embeddings:
                out[PEFT_PREFIX + "lm_head.weight"] = tensor.clone()  # safetensors stores no shared tensors
    return out


def adapter_config(model_cfg: ModelConfig, lora_cfg: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """PEFT's adapter_config.json for these adapters (LoRA, CAUSAL_LM)."""
    lay = layout(model_cfg)
    targets = select_targets(lay, lora_cfg.target_modules, lora_cfg.target_parameters)
    experts = select_experts(lay, lora_cfg.target_modules, lora_cfg.target_parameters)
    trained = select_trained(lay, lora_cfg.train_modules, {x.module for x in targets})
    modules = set(trained.values())
    # A trained tied embedding: PEFT 0.21 keeps the head tied to the trained copy only when
    # modules_to_save names lm_head with ensure_weight_tying (naming GPT-2's wte unties them).
    tie = model_cfg.tie_embeddings and "embed.wte.weight" in trained
    if tie:
        modules.discard(lay.tensors["embed.wte.weight"][0].removesuffix(".weight"))
    candidates = list(lay.module_params()) + [x.hf_name for x in lay.linears]
    modules_to_save = (peft_names(modules, candidates, "") if modules else []) + (["lm_head"] if tie else [])
    linears = {x.hf_name for x in targets if not is_router(x)}
    plain = [x.hf_name for x in lay.linears if not is_router(x) and x.leaf not in expert_names(lay)]
    doubled = any(factor > 1 for factor in experts.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.r,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": peft_names(linears, plain, ".") if linears else [],
        "target_parameters": _target_parameters(lay, targets, experts) or None,
        "rank_pattern": {GATE_UP_PATTERN: 2 * lora_cfg.r} if doubled else {},
        "alpha_pattern": {GATE_UP_PATTERN: 2 * lora_cfg.alpha} if doubled else {},
        "use_rslora": lora_cfg.rslora,
        "use_dora": lora_cfg.dora,
        "fan_in_fan_out": _arch(model_cfg) == "gpt2",  # GPT-2's Conv1D stores weights (in, out)
        "modules_to_save": modules_to_save or None,
        "ensure_weight_tying": tie,
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _target_parameters(lay: Layout, targets: list[HFLinear], experts: dict[HFExperts, int]) -> list[str]:
    """PEFT's target_parameters for the adapted routers and experts: gate.weight, gate_up_proj, down_proj
    where every layer's is adapted, else the full names."""
    routers = [f"{x.hf_name}.weight" for x in lay.linears if is_router(x)]
    groups = {"gate.weight": (routers, {f"{x.hf_name}.weight" for x in targets if is_router(x)})}
    for leaf in ("gate_up_proj", "down_proj"):
        groups[leaf] = (
            [x.hf_name for x in lay.experts if x.leaf == leaf],
            {x.hf_name for x in experts if x.leaf == leaf},
        )
    out = []
    for short, (every, chosen) in groups.items():
        if chosen:
            out += [short] if chosen == set(every) else sorted(chosen)
    return sorted(out)


def save_adapter(
    directory: str | Path,
    named_tensors: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write adapter_config.json + adapter_model.safetensors, which peft.PeftModel.from_pretrained
    loads onto the base model. named_tensors: the model's state (adapters and train_modules are
    taken from it; other base tensors are left out)."""
    from safetensors.torch import save_file

    lay = layout(model_cfg)
    adapted = {x.module for x in select_targets(lay, lora_cfg.target_modules, lora_cfg.target_parameters)}
    trained = select_trained(lay, lora_cfg.train_modules, adapted)
    kept = {k: v for k, v in named_tensors.items() if split_name(bare_name(k)) is not None or bare_name(k) in trained}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model_cfg, lora_cfg, base_model_name_or_path)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(peft_state_dict(kept, model_cfg), directory / "adapter_model.safetensors", metadata={"format": "pt"})


# PEFT LoRA options this module cannot reproduce; an adapter that sets one is refused.
_UNSUPPORTED = ("lora_bias", "layer_replication", "use_bdlora", "arrow_config", "alora_invocation_tokens",
                "velora_config", "monteclora_config", "kasa_config", "trainable_token_indices",
                "use_qalora")  # fmt: skip


def load_adapter(directory: str | Path, model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """Read a PEFT LoRA / DoRA adapter directory (made by save_adapter or by PEFT) for a model of
    model_cfg: (our name -> tensor, the LoraConfig that apply_lora needs to hold it). Its linear targets
    and train_modules are read from the tensors present, its experts from target_parameters (and the
    checkpoint's expert names in target_modules, as PEFT reads them). A mismatch is one ConfigError line."""
    directory = Path(directory).expanduser()
    where = f"lora.init_from={directory}"
    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{where}: peft_type {config.get('peft_type')!r}, expected LORA")
    bad = [key for key in _UNSUPPORTED if config.get(key)]
    if bad:
        raise ConfigError(f"{where}: PEFT options {bad} are not supported")
    lay = layout(model_cfg)
    experts = _file_experts(lay, config, where)
    tensors = _fuse_per_expert(_read_tensors(directory), experts, where)
    out, targets, trained = _our_tensors(tensors, lay, config["r"], experts, model_cfg, where)
    routers = [x for x in lay.linears if x.hf_name in targets and is_router(x)]
    linears = targets - {x.hf_name for x in routers}
    plain = [x.hf_name for x in lay.linears if not is_router(x) and x.leaf not in expert_names(lay)]
    lora_cfg = LoraConfig(
        enabled=True,
        r=config["r"],
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        # gate_up_proj at rank 2r is what the checkpoint's expert names give; the rest are target_parameters
        target_modules=(peft_names(linears, plain, ".") if linears else [])
        + sorted({part for x, factor in experts.items() if factor > 1 for part in x.parts}),
        target_parameters=_target_parameters(lay, routers, {x: 1 for x, factor in experts.items() if factor == 1}),
        rslora=bool(config.get("use_rslora")),
        dora=bool(config.get("use_dora")),
        train_modules=peft_names(trained, list(lay.module_params()), "") if trained else [],
        init_from=str(directory),
    )
    chosen = select_targets(lay, lora_cfg.target_modules, lora_cfg.target_parameters)
    expected = {k for x in chosen for k in _adapter_names(x, lora_cfg.dora)}
    expected |= {f"{x.module}.{kind}.{x.leaf}" for x in experts for kind in ("lora_A", "lora_B")}
    unpaired = sorted(expected.symmetric_difference(k for k in out if split_name(k)))
    if unpaired:
        raise ConfigError(f"{where}: adapter tensors do not pair up (use_dora={lora_cfg.dora}): {unpaired[:3]}")
    if select_experts(lay, lora_cfg.target_modules, lora_cfg.target_parameters) != experts:
        raise ConfigError(f"{where}: its experts' ranks (rank_pattern) differ between layers, which lora.* cannot say")
    return out, lora_cfg


def _file_experts(lay: Layout, config: dict, where: str) -> dict[HFExperts, int]:
    """The fused expert parameters an adapter_config.json targets, with their rank factors, as PEFT on
    transformers 5 reads it: target_parameters, the checkpoint's expert names in target_modules, and
    rank_pattern / alpha_pattern, accepted only as PEFT writes them (gate_up_proj at 2r and 2 alpha)."""
    r, alpha = config["r"], float(config["lora_alpha"])
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    doubled = bool(ranks or alphas)
    if doubled and (
        ranks != {GATE_UP_PATTERN: 2 * r} or {k: float(v) for k, v in alphas.items()} != {GATE_UP_PATTERN: 2 * alpha}
    ):
        raise ConfigError(
            f"{where}: rank_pattern {ranks} / alpha_pattern {alphas} are not supported; only PEFT's own "
            f"{{{GATE_UP_PATTERN!r}: 2 r}} / {{...: 2 lora_alpha}} for experts"
        )
    modules = config.get("target_modules") or []
    if isinstance(modules, str):  # PEFT's all-linear, or a regex (which names no expert here)
        modules = ["all-linear"] if modules == "all-linear" else []
    try:
        experts = select_experts(lay, modules, list(config.get("target_parameters") or []))
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    return {x: 2 if doubled and x.leaf == "gate_up_proj" else factor for x, factor in experts.items()}


_PER_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.([^.]+)\.(lora_A|lora_B)\.weight")


def _fuse_per_expert(tensors: dict[str, torch.Tensor], experts: dict[HFExperts, int], where: str) -> dict:
    """An adapter PEFT wrote on transformers 4, one per expert (`<mlp>.experts.{e}.w1.lora_A.weight` ...),
    in the fused form PEFT 0.21 converts it to for transformers 5 (its PeftConcatenate): per expert, the
    A of gate and up stacked (2r, in) and their B block-diagonal (2I, 2r); other tensors as they are."""
    pieces: dict[tuple[str, str, str], dict[int, torch.Tensor]] = {}  # (container, part, kind) -> expert -> tensor
    out = {}
    for key, tensor in tensors.items():
        match = _PER_EXPERT.fullmatch(key.removeprefix(PEFT_PREFIX))
        if match is None:
            out[key] = tensor
        else:
            container, expert, part, kind = match.groups()
            pieces.setdefault((transformers5_name(container), part, kind), {})[int(expert)] = tensor
    for x in experts:
        container = x.hf_name.rsplit(".", 1)[0]
        found = {kind: [pieces.pop((container, part, kind), {}) for part in x.parts] for kind in ("lora_A", "lora_B")}
        if not any(found["lora_A"]):
            continue
        if any(sorted(got) != list(range(x.n_experts)) for got in found["lora_A"] + found["lora_B"]):
            raise ConfigError(f"{where}: {container}'s per-expert adapters do not cover its {x.n_experts} experts")
        A = torch.stack([torch.cat([got[e] for got in found["lora_A"]]) for e in range(x.n_experts)])  # (E, R, in)
        B = torch.stack([torch.block_diag(*[got[e] for got in found["lora_B"]]) for e in range(x.n_experts)])
        nested = sum(y.hf_name.startswith(container + ".") for y in experts) == 2
        for kind, tensor in (("lora_A", A), ("lora_B", B)):
            out[PEFT_PREFIX + expert_module(x, nested) + PEFT_SUFFIX[kind]] = to_peft(kind, tensor)
    if pieces:
        (container, part, _), *_ = pieces
        raise ConfigError(
            f"{where}: adapters on {container}.{{e}}.{part}, which its adapter_config.json does not target"
        )
    return out


def _our_tensors(
    tensors: dict[str, torch.Tensor],
    lay: Layout,
    r: int,
    experts: dict[HFExperts, int],
    model_cfg: ModelConfig,
    where: str,
) -> tuple[dict[str, torch.Tensor], set[str], set[str]]:
    """PEFT's tensors under our names, each checked against the model's shape; with the HF names of
    the adapted linear modules and of those trained in full."""
    by_hf = {x.hf_name: x for x in lay.linears}
    by_key = {key: (ours, transpose) for ours, (key, transpose) in lay.tensors.items()}
    tied_keys = [PEFT_PREFIX + lay.tensors["embed.wte.weight"][0], PEFT_PREFIX + "lm_head.weight"]
    if model_cfg.tie_embeddings and any(k in tensors for k in tied_keys):
        if not all(k in tensors for k in tied_keys) or not torch.equal(*(tensors[k] for k in tied_keys)):
            raise ConfigError(f"{where}: PEFT trained the tied embedding untied (ensure_weight_tying), unlike GPT")
        tensors = {k: v for k, v in tensors.items() if k != tied_keys[1]}
    out, targets, trained = {}, set(), set()
    for key, tensor in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        kind = next((k for k, suffix in PEFT_SUFFIX.items() if key.endswith(suffix)), None)
        if kind is not None:
            hf_name = transformers5_name(key.removesuffix(PEFT_SUFFIX[kind]))
            x, e = by_hf.get(hf_name), None if hf_name in by_hf else _expert_of(hf_name, experts)
            if x is not None:
                name, rows = f"{x.module}.{kind}.{x.leaf}", x.stop - x.start
                expected = {"lora_A": (r, x.in_features), "lora_B": (rows, r), "lora_magnitude": (rows,)}[kind]
                targets.add(x.hf_name)
            elif e is not None and kind != "lora_magnitude":
                name, rank = f"{e.module}.{kind}.{e.leaf}", r * experts[e]
                shapes = {"lora_A": (e.n_experts * rank, e.in_features), "lora_B": (e.out_features, rank * e.n_experts)}
                _check_shape(key, tensor, shapes[kind], where)
                out[name] = from_peft(kind, tensor, e.n_experts).contiguous()
                continue
            else:
                raise ConfigError(
                    f"{where}: adapter on {hf_name}, which model {model_cfg.name!r} lacks "
                    "(or its adapter_config.json does not target)"
                )
        elif key in by_key:
            name, transpose = by_key[key]
            tensor, expected = (tensor.t() if transpose else tensor), tuple(lay.shapes[name])
            if name in VOCAB_ROWS:  # PEFT's shape is the real vocabulary's, GPT's is padded
                expected = (model_cfg.vocab_size, *expected[1:])
            trained.add(key.rsplit(".", 1)[0])
        else:
            raise ConfigError(f"{where}: tensor {key} fits no module of model {model_cfg.name!r}")
        _check_shape(key, tensor, expected, where)
        out[name] = pad_vocab(name, tensor, model_cfg).contiguous()
    return out, targets, trained


def _check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...], where: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ConfigError(f"{where}: {key} has shape {tuple(tensor.shape)}, the model needs {expected}")


def _expert_of(module: str, experts: dict[HFExperts, int]) -> HFExperts | None:
    """Which targeted fused parameter a PEFT module path holds the adapter of (see expert_module)."""
    container = module.removesuffix(".base_layer")
    here = {x.leaf: x for x in experts if x.hf_name.rsplit(".", 1)[0] == container}
    nested = len(here) == 2
    if module.endswith(".base_layer"):
        return here["gate_up_proj"] if nested else None
    return here["down_proj"] if nested else next(iter(here.values()), None)


def _adapter_names(x: HFLinear, dora: bool) -> list[str]:
    return [f"{x.module}.{kind}.{x.leaf}" for kind in KINDS if dora or kind != "lora_magnitude"]


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(directory / "adapter_model.safetensors")
    if (directory / "adapter_model.bin").is_file():
        return torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: no adapter_model.safetensors or adapter_model.bin")
