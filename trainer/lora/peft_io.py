"""PEFT's adapter format: adapter_config.json + adapter_model.safetensors, both ways.

Keys are PEFT 0.21's: base_model.model.<HF module>.lora_A.weight / .lora_B.weight /
.lora_magnitude_vector (DoRA), and modules_to_save's tensors under their HF names; a trained embedding
or head in the real vocabulary's shape (GPT's padding rows dropped on save, zero rows added on load).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from trainer.config import ConfigError, LoraConfig, ModelConfig
from trainer.lora.names import KINDS, HFLinear, Layout, layout, peft_names, select_targets, select_trained, split_name
from trainer.model.gpt import bare_name
from trainer.model.hf_import import VOCAB_ROWS, _arch, pad_vocab, trim_vocab

PEFT_PREFIX = "base_model.model."
# PEFT's key suffix for each of our adapter tensors (DoRA's magnitude is saved without ".weight").
PEFT_SUFFIX = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", "lora_magnitude": ".lora_magnitude_vector"}


def peft_state_dict(named_tensors: Mapping[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename adapter tensors (and any base tensors given: those trained in full) to PEFT's keys,
    e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight; CPU, contiguous. A trained
    tied embedding is written twice, as the embedding and as lm_head, as PEFT's ensure_weight_tying does."""
    lay = layout(model_cfg)
    by_leaf = {(x.module, x.leaf): x.hf_name for x in lay.linears}
    out = {}
    for name, tensor in named_tensors.items():
        name, tensor = bare_name(name), tensor.detach().cpu()
        split = split_name(name)
        if split is not None:
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
    targets = select_targets(lay, lora_cfg.target_modules)
    trained = select_trained(lay, lora_cfg.train_modules, {x.module for x in targets})
    modules = set(trained.values())
    # A trained tied embedding: PEFT 0.21 keeps the head tied to the trained copy only when
    # modules_to_save names lm_head with ensure_weight_tying (naming GPT-2's wte unties them).
    tie = model_cfg.tie_embeddings and "embed.wte.weight" in trained
    if tie:
        modules.discard(lay.tensors["embed.wte.weight"][0].removesuffix(".weight"))
    candidates = list(lay.module_params()) + [x.hf_name for x in lay.linears]
    modules_to_save = (peft_names(modules, candidates, "") if modules else []) + (["lm_head"] if tie else [])
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.r,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": peft_names({x.hf_name for x in targets}, [x.hf_name for x in lay.linears], "."),
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
    adapted = {x.module for x in select_targets(lay, lora_cfg.target_modules)}
    trained = select_trained(lay, lora_cfg.train_modules, adapted)
    kept = {k: v for k, v in named_tensors.items() if split_name(bare_name(k)) is not None or bare_name(k) in trained}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model_cfg, lora_cfg, base_model_name_or_path)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(peft_state_dict(kept, model_cfg), directory / "adapter_model.safetensors", metadata={"format": "pt"})


# PEFT LoRA options this module cannot reproduce; an adapter that sets one is refused.
_UNSUPPORTED = ("lora_bias", "rank_pattern", "alpha_pattern", "layer_replication", "use_bdlora", "arrow_config",
                "alora_invocation_tokens", "velora_config", "monteclora_config", "kasa_config", "target_parameters",
                "trainable_token_indices", "use_qalora")  # fmt: skip


def load_adapter(directory: str | Path, model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """Read a PEFT LoRA / DoRA adapter directory (made by save_adapter or by PEFT) for a model of
    model_cfg: (our name -> tensor, the LoraConfig that apply_lora needs to hold it). Its targets and
    train_modules are read from the tensors present. A mismatch is one ConfigError line."""
    directory = Path(directory).expanduser()
    where = f"lora.init_from={directory}"
    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{where}: peft_type {config.get('peft_type')!r}, expected LORA")
    bad = [key for key in _UNSUPPORTED if config.get(key)]
    if bad:
        raise ConfigError(f"{where}: PEFT options {bad} are not supported")
    lay = layout(model_cfg)
    out, targets, trained = _our_tensors(_read_tensors(directory), lay, config["r"], model_cfg, where)
    lora_cfg = LoraConfig(
        enabled=True,
        r=config["r"],
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=peft_names(targets, [x.hf_name for x in lay.linears], "."),
        rslora=bool(config.get("use_rslora")),
        dora=bool(config.get("use_dora")),
        train_modules=peft_names(trained, list(lay.module_params()), "") if trained else [],
        init_from=str(directory),
    )
    expected = {k for x in select_targets(lay, lora_cfg.target_modules) for k in _adapter_names(x, lora_cfg.dora)}
    unpaired = sorted(expected.symmetric_difference(k for k in out if split_name(k)))
    if unpaired:
        raise ConfigError(f"{where}: adapter tensors do not pair up (use_dora={lora_cfg.dora}): {unpaired[:3]}")
    return out, lora_cfg


def _our_tensors(
    tensors: dict[str, torch.Tensor], lay: Layout, r: int, model_cfg: ModelConfig, where: str
) -> tuple[dict[str, torch.Tensor], set[str], set[str]]:
    """PEFT's tensors under our names, each checked against the model's shape; with the HF names of
    the adapted modules and of those trained in full."""
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
            x = by_hf.get(key.removesuffix(PEFT_SUFFIX[kind]))
            if x is None:
                hf_name = key.removesuffix(PEFT_SUFFIX[kind])
                raise ConfigError(f"{where}: adapter on {hf_name}, which model {model_cfg.name!r} lacks")
            name, rows = f"{x.module}.{kind}.{x.leaf}", x.stop - x.start
            expected = {"lora_A": (r, x.in_features), "lora_B": (rows, r), "lora_magnitude": (rows,)}[kind]
            targets.add(x.hf_name)
        elif key in by_key:
            name, transpose = by_key[key]
            tensor, expected = (tensor.t() if transpose else tensor), tuple(lay.shapes[name])
            if name in VOCAB_ROWS:  # PEFT's shape is the real vocabulary's, GPT's is padded
                expected = (model_cfg.vocab_size, *expected[1:])
            trained.add(key.rsplit(".", 1)[0])
        else:
            raise ConfigError(f"{where}: tensor {key} fits no module of model {model_cfg.name!r}")
        if tuple(tensor.shape) != expected:
            raise ConfigError(f"{where}: {key} has shape {tuple(tensor.shape)}, the model needs {expected}")
        out[name] = pad_vocab(name, tensor, model_cfg).contiguous()
    return out, targets, trained


def _adapter_names(x: HFLinear, dora: bool) -> list[str]:
    return [f"{x.module}.{kind}.{x.leaf}" for kind in KINDS if dora or kind != "lora_magnitude"]


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(directory / "adapter_model.safetensors")
    if (directory / "adapter_model.bin").is_file():
        return torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: no adapter_model.safetensors or adapter_model.bin")
