"""The model: GPT (GPT-2 / Llama / Mistral / Qwen2 layouts), attention, parameter groups, HF import / export, the loss."""

from trainer.model.attention import check_attention_backend, resolve_attention_backend
from trainer.model.gpt import GPT, param_group
from trainer.model.hf_import import export_hf, load_hf_config, load_pretrained, pretrained_weights
from trainer.model.loss import IGNORE_INDEX, cross_entropy_sum

__all__ = [
    "GPT",
    "IGNORE_INDEX",
    "check_attention_backend",
    "cross_entropy_sum",
    "export_hf",
    "load_hf_config",
    "load_pretrained",
    "param_group",
    "pretrained_weights",
    "resolve_attention_backend",
]
