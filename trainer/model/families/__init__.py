"""The Hugging Face families GPT imports and exports: one module each, in a registry.

A family says how its config.json becomes a ModelConfig (`fields`) and back (`config`), where each
of GPT's tensors lives in its checkpoint (`rows`), which ModelConfigs it can hold (`fits`), and its
chat quirks (`chat`). trainer.model.hf_import reads the registry; nothing else knows a family by
name. Adding a family is one module here that calls `register` (see ../shared/DESIGN.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from trainer.config import MODEL_TYPES, ModelConfig


@dataclasses.dataclass(frozen=True)
class Row:
    """One GPT tensor and the HF tensors it is made of.

    how: "same" (one tensor as it is), "conv1d" (one tensor, transposed: GPT-2's Conv1D),
    "cat" (the pieces concatenated along dim 0: q, k, v into c_attn), "stack" (the pieces stacked
    along a new dim 0: one tensor per expert), or "chunk:i/n" (piece i of n along dim 0 of one HF
    tensor: Phi-3's gate_up_proj when GPT keeps them apart)."""

    ours: str
    theirs: tuple[str, ...]
    how: str = "same"


@dataclasses.dataclass(frozen=True)
class ChatQuirks:
    """How a family's chat template behaves, for data=chat and generation."""

    system_role: bool = True  # False: the template has no system turn (Gemma); a system message is refused
    end_of_turn: tuple[str, ...] = ()  # tokens that close an assistant turn: trained on, and stop generation
    thinking: bool = False  # the template renders <think> ... </think> reasoning (Qwen3)


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    hf_class: str  # the class transformers builds (config.json's architectures)
    fields: Callable[[dict, str], dict]  # config.json, its directory -> ModelConfig fields
    config: Callable[[ModelConfig], dict]  # ModelConfig -> config.json (model_type etc. added by hf_import)
    rows: Callable[[ModelConfig], list[Row]]  # GPT's tensors in HF names (the untied head added by hf_import)
    fits: Callable[[ModelConfig], str | None]  # why this family cannot hold a ModelConfig; None when it can
    chat: ChatQuirks = ChatQuirks()
    prefix: str = ""  # prepended to HF names on export (GPT-2's "transformer.")
    # checkpoint tensors that are not GPT's (a multimodal checkpoint's vision tower): left out on
    # import, copied from the source checkpoint (model.pretrained) on export
    carried: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def family(model_type: str | None, where: str = "model") -> Family:
    """The registered family of a model_type; one line naming the supported ones otherwise."""
    _load_all()
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} unsupported; expected one of {', '.join(MODEL_TYPES)}")
    return FAMILIES[model_type]


def _load_all() -> None:
    import importlib

    for model_type in MODEL_TYPES:
        if model_type not in FAMILIES:
            importlib.import_module(f"trainer.model.families.{model_type}")
