"""Gemma 3's multimodal checkpoints (Gemma3ForConditionalGeneration, model_type gemma3: the 4B, 12B
and 27B releases): the text model (text_config, tensors under language_model.) is Gemma 3's
(gemma3_text.py) and trains here; the vision tower and its projector are left out on import and
copied from the source checkpoint on export, so the export is the same multimodal model with the
text weights trained."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.model.families import Family, Row, register
from trainer.model.families import gemma3_text as text
from trainer.model.hf_import import _read_config_json


def fields(hf: dict, path: str) -> dict:
    config = hf.get("text_config") or {}
    return text.fields(config, path) | {"vocab_size": config.get("vocab_size", 262208)}


def config(cfg: ModelConfig) -> dict:
    if not cfg.pretrained:
        raise ValueError("exporting gemma3 (multimodal) needs its source checkpoint: model.pretrained")
    source = _read_config_json(cfg.pretrained)
    text_config = text.config(cfg) | {"model_type": "gemma3_text", "vocab_size": cfg.vocab_size}
    source.pop("vocab_size", None)
    return {k: v for k, v in source.items() if k not in ("architectures", "model_type")} | {"text_config": text_config}


def rows(cfg: ModelConfig) -> list[Row]:
    return [Row(r.ours, tuple(f"language_model.{h}" for h in r.theirs), r.how) for r in text.rows(cfg)]


register(
    Family(
        "gemma3",
        "Gemma3ForConditionalGeneration",
        fields,
        config,
        rows,
        lambda cfg: "gemma3 (multimodal) is written only from a gemma3 checkpoint" if cfg.hf_model_type != "gemma3"
        else text.fits(cfg),
        text.CHAT,
        carried=("vision_tower.", "multi_modal_projector."),
    )
)  # fmt: skip
