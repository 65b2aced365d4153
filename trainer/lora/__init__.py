"""LoRA and DoRA adapters for GPT, named and saved as PEFT names them.

The verbs, as litgpt's lora.py: `apply_lora` swaps the targeted nn.Linear layers for `LoRALinear`
and freezes the rest; `with_adapter_init` streams the adapters' initial values with the base
weights; `save_adapter` / `load_adapter` write and read PEFT's adapter format; `merge_lora` folds
the adapters into plain weights for export.

Targets are Hugging Face module names (Llama-family q_proj ... down_proj, GPT-2 c_attn c_proj c_fc,
or all-linear), so each adapter maps one-to-one onto a PEFT module. GPT fuses q / k / v into one
c_attn; in a Llama-family layout that module carries up to three adapters over disjoint row
slices (q_proj, k_proj, v_proj), while GPT-2's c_attn is one HF Conv1D and gets one adapter.
Parameter names: the base keeps `<module>.weight` / `.bias`; adapters add `<module>.lora_A.<leaf>`
(r, in), `<module>.lora_B.<leaf>` (rows, r) and with DoRA `<module>.lora_magnitude.<leaf>` (rows,),
leaf being the HF module name's last part (q_proj, c_attn, down_proj, ...).

| module   | what                                                                              |
|----------|-----------------------------------------------------------------------------------|
| names    | HF module <-> GPT module and row slice; target_modules / train_modules selection  |
| layer    | LoRALinear, apply_lora, with_adapter_init, merge_lora, trainable_summary          |
| peft_io  | peft_state_dict, adapter_config, save_adapter, load_adapter                       |
| qlora    | lora.quantize_base=nf4: the adapted base weights in torchao's NF4, quantised as the |
|          | model is filled (quantizing_place), linear_nf4 / dequantize for the layer and merge |
| experts  | LoRAExperts: a sparse MLP's experts adapted per expert, as PEFT's ParamWrapper does |
|          | on transformers 5's fused gate_up_proj / down_proj (lora.target_parameters, or      |
|          | the checkpoint's expert names in target_modules)                                    |
"""

from trainer.lora.experts import LoRAExperts
from trainer.lora.layer import LoRALinear, apply_lora, merge_lora, trainable_summary, with_adapter_init
from trainer.lora.names import layout, scale_of
from trainer.lora.peft_io import adapter_config, load_adapter, peft_state_dict, save_adapter

__all__ = [
    "LoRAExperts",
    "LoRALinear",
    "adapter_config",
    "apply_lora",
    "layout",
    "load_adapter",
    "merge_lora",
    "peft_state_dict",
    "save_adapter",
    "scale_of",
    "trainable_summary",
    "with_adapter_init",
]
