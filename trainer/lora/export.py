"""A LoRA checkpoint, outside training: the base rebuilt from its source with the checkpoint's
adapters on it, and the merge into plain weights with a fidelity report.

The checkpoint holds the adapters (`adapter/`, PEFT's format) and the base's reference (its `lora`
part: path and sha256, or the seed of a random init), never the base itself. A QLoRA checkpoint's
base is quantised again, as the run quantised it (deterministic), and merged dequantised: the merged
model is the one the adapters were trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError, LoraConfig, ModelConfig
from trainer.lora.layer import apply_lora, merge_lora, with_adapter_init
from trainer.lora.peft_io import load_adapter
from trainer.lora.qlora import dequantize, is_nf4
from trainer.lora.run import BASE_DTYPES, base_place, base_reference, cast_frozen_base
from trainer.model.build import build_model
from trainer.model.gpt import GPT


def load_lora_model(checkpoint: Path, cfg: ModelConfig, ref: dict[str, Any]) -> GPT:
    """GPT with LoRA layers: the base from model.pretrained (checked against the checkpoint's
    sha256) or from the seeded init, in fp32 on the CPU (QLoRA: the adapted linears' weights in NF4,
    quantised from lora.base_dtype as in training), and the checkpoint's adapters."""
    from trainer.parallel.base import materialize

    settings, base = LoraConfig(**ref["config"]), ref["base"]
    seed = base.get("seed") or 0
    if base.get("pretrained"):
        now = base_reference(cfg, seed)
        if now.get("sha256") != base.get("sha256"):
            raise ConfigError(
                f"{cfg.pretrained} is not the base these adapters were trained on (sha256 {str(now.get('sha256'))[:12]} "
                f"vs {str(base.get('sha256'))[:12]}): restore that checkpoint directory"
            )
    model, weights = build_model(cfg, seed)
    apply_lora(model, settings)
    place = None
    if settings.quantize_base:  # the adapted weights' dtype (whatever the compute dtype was), then NF4
        cast_frozen_base(model, BASE_DTYPES[settings.base_dtype], autocast=False)
        place = base_place(model, torch.device("cpu"))
    adapter, _ = load_adapter(checkpoint / "adapter", cfg)  # every adapter tensor: the init is replaced
    materialize(model, with_adapter_init(weights, model, seed, adapter), torch.device("cpu"), place)
    return model


def merged(model: GPT, settings: LoraConfig, dtype: torch.dtype) -> GPT:
    """A plain GPT (no LoRA layers) whose weights are the adapters merged in fp32, then cast to dtype;
    an NF4 base (QLoRA) is merged dequantised."""
    tensors = {k: dequantize(v) if is_nf4(v) else v.detach() for k, v in model.state_dict().items()}
    state = merge_lora(tensors, model.cfg, settings)
    with torch.device("meta"):
        plain = GPT(model.cfg)
    plain.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return plain


@torch.no_grad()
def fidelity(adapter_model: GPT, merged_model: GPT, batch: int = 4, seed: int = 0) -> dict[str, float]:
    """The merged model against the adapter model on a held batch of random token ids (seeded):
    the largest logit difference (in fp32) and the share of positions whose top-1 token agrees."""
    cfg = adapter_model.cfg
    length = min(cfg.block_size, 64)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    ours = adapter_model.eval()(ids).float()
    theirs = merged_model.eval().float()(ids).float()
    return {
        "max_logit_diff": (ours - theirs).abs().max().item(),
        "top1_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
        "tokens": batch * length,
    }


def base_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype the base checkpoint stores its weights in (fp32 for a random init)."""
    if not cfg.pretrained:
        return torch.float32
    from safetensors import safe_open

    files = sorted(Path(cfg.pretrained).expanduser().glob("*.safetensors"))
    if not files:
        return torch.float32
    with safe_open(files[0], framework="pt") as handle:  # reads the header only
        stored = handle.get_slice(next(iter(handle.keys()))).get_dtype()
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)
