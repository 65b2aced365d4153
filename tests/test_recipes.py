"""The model presets of real architectures (configs/model/qwen3-8b, gemma3-12b, qwen3-30b-a3b) against
the models' own public config.json numbers, with transformers as the reference: its model built from
those numbers on the meta device has exactly GPT's parameters; our family reads that config.json
back to the preset's shape, and an export of the preset writes its family with the same numbers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from trainer.__main__ import CONFIG_DIR, compose_config
from trainer.config import ConfigError, ModelConfig

# The architecture keys of each public config.json (Hugging Face Hub), as published: Qwen/Qwen3-8B,
# Qwen/Qwen3-30B-A3B, and google/gemma-3-12b-it's text_config with the Gemma3TextConfig defaults it
# relies on written out. Typed here from those files; nothing in trainer/ produced them.
QWEN3_8B = {
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 36, "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False,
    "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip
GEMMA3_12B = {
    "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3840, "intermediate_size": 15360,
    "max_position_embeddings": 131072, "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000, "sliding_window": 1024,
    "sliding_window_pattern": 6, "tie_word_embeddings": True, "vocab_size": 262208,
}  # fmt: skip
PRESETS = {"qwen3-8b": QWEN3_8B, "gemma3-12b": GEMMA3_12B, "qwen3-30b-a3b": QWEN3_30B_A3B}
# What the model cards say (total, active per token), to the digits they print.
CARDS = {"qwen3-8b": (8.2e9, None), "gemma3-12b": (12e9, None), "qwen3-30b-a3b": (30.5e9, 3.3e9)}


def preset(name: str) -> ModelConfig:
    return compose_config([f"model={name}"])[0].model


def transformers_config(hf: dict):
    """transformers' own config class for a config.json dict (AutoConfig.for_model)."""
    from transformers import AutoConfig

    keys = {k: v for k, v in hf.items() if k not in ("model_type", "architectures", "rope_scaling", "rope_theta")}
    if "rope_local_base_freq" in hf:  # transformers >= 5: RoPE per layer type, in rope_parameters
        keys.pop("rope_local_base_freq")
        keys["rope_parameters"] = {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": float(hf["rope_theta"])},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(hf["rope_local_base_freq"])},
        }
    else:
        keys["rope_parameters"] = {"rope_type": "default", "rope_theta": float(hf["rope_theta"])}
    return AutoConfig.for_model(hf["model_type"], **keys)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_has_transformers_parameter_count(name: str) -> None:
    """GPT on the meta device holds exactly the parameters of transformers' model built on the meta
    device from the public config.json (no vocabulary padding here: model.vocab_multiple=1; these
    vocabularies are multiples of 64 anyway, so the preset's default pads nothing either)."""
    from transformers import AutoModelForCausalLM

    from trainer.model import GPT

    m = preset(name)
    assert m.padded_vocab_size == m.vocab_size == PRESETS[name]["vocab_size"]
    with torch.device("meta"):
        ours = GPT(replace(m, vocab_multiple=1))
        theirs = AutoModelForCausalLM.from_config(transformers_config(PRESETS[name]))
    assert type(theirs).__name__ == PRESETS[name]["architectures"][0]
    total = sum(p.numel() for p in theirs.parameters())
    assert ours.num_params() == total
    card_total, card_active = CARDS[name]
    assert total == pytest.approx(card_total, rel=0.03)
    if card_active:  # a token's 8 of 128 experts: the card's 3.3B activated
        assert ours.active_params() == pytest.approx(card_active, rel=0.03) and ours.active_params() < total / 9


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_is_what_its_family_reads_from_config_json(name: str) -> None:
    """trainer.model.families reads the public config.json back to the preset's architecture (so
    model.pretrained with the real checkpoint builds the same model), and the preset's export names its
    family and writes the config.json numbers (so an exported random-base run loads as that model)."""
    from trainer.model.families import family
    from trainer.model.hf_import import hf_config_dict, model_family

    m, hf = preset(name), PRESETS[name]
    read = family(hf["model_type"]).fields(hf, "config.json")
    for key, value in read.items():
        assert getattr(m, key) == value, key
    assert m.hf_model_type == hf["model_type"] == model_family(m).model_type
    written = hf_config_dict(m)
    assert written["model_type"] == hf["model_type"] and written["architectures"] == hf["architectures"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "rms_norm_eps"):  # fmt: skip
        assert written[key] == hf[key], key
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
        assert written.get(key) == hf.get(key), key


# The recipes (configs/experiment) on one 80 GB GPU, the estimate their header states, and the data they
# are launched with (chat records: packed, document masks).
RECIPES = {  # experiment -> its preset
    "qwen3-8b-lora": "qwen3-8b", "qwen3-8b-qlora": "qwen3-8b", "gemma3-12b-lora": "gemma3-12b",
    "gemma3-12b-qlora": "gemma3-12b", "qwen3-30b-a3b-lora": "qwen3-30b-a3b", "qwen3-30b-a3b-qlora": "qwen3-30b-a3b",
}  # fmt: skip
CHAT = ["data=chat", "data.path=chats.jsonl"]
GIB = 2**30
# google/gemma-3-12b-it's config.json as published: a multimodal checkpoint whose text_config names only
# what differs from Gemma3TextConfig's defaults (the vision tower's config left out here).
GEMMA3_12B_IT = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256,
    "text_config": {
        "hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text", "num_attention_heads": 16,
        "num_hidden_layers": 48, "num_key_value_heads": 8, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
}  # fmt: skip


def header(experiment: str) -> str:
    """The recipe's header comment as one line of text."""
    lines = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    return " ".join(line.removeprefix("#").strip() for line in lines if line.startswith("#"))


def checkpoint_dir(tmp_path, hf: dict) -> str:
    """A directory holding only a config.json: what model.pretrained's architecture is read from."""
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return str(tmp_path)


@pytest.mark.parametrize(
    "experiment, hf",
    [
        *((e, PRESETS[p]) for e, p in RECIPES.items()),
        ("gemma3-12b-lora", {**GEMMA3_12B_IT, "text_config": GEMMA3_12B}),  # multimodal, text_config written out
        # as published: its text_config has no max_position_embeddings (transformers' default, 131072, applies)
        pytest.param("gemma3-12b-lora", GEMMA3_12B_IT, id="gemma3-12b-it-as-published"),
    ],
    ids=lambda v: v if isinstance(v, str) else v["model_type"],
)  # fmt: skip
def test_recipe_takes_its_checkpoint(tmp_path, experiment: str, hf: dict) -> None:
    """The launch line's model.pretrained: the recipe's preset agrees with the real checkpoint's
    config.json (no architecture key refused), and its train.seq_len fits the checkpoint's context."""
    from trainer.preflight import resolve_model_config

    cfg, _ = compose_config([f"experiment={experiment}", f"model.pretrained={checkpoint_dir(tmp_path, hf)}", *CHAT])
    m = resolve_model_config(cfg.model, 0)
    preset_m = preset(RECIPES[experiment])
    for key in (
        "n_layer",
        "n_embd",
        "n_head",
        "n_kv_head",
        "attn_head_dim",
        "intermediate_size",
        "n_experts",
        "vocab_size",
    ):
        assert getattr(m, key) == getattr(preset_m, key), key
    assert m.hf_model_type == hf["model_type"]
    _require_context(cfg.train.seq_len, m.block_size)


def _require_context(seq_len: int, block_size: int) -> None:
    if seq_len > block_size:
        raise ConfigError(f"train.seq_len={seq_len} exceeds the checkpoint's context {block_size}")


@pytest.mark.parametrize("experiment", list(RECIPES))
def test_recipe_fits_one_gpu_as_its_header_says(experiment: str) -> None:
    """trainer.estimate's peak with the launch line's data fits 80 GB with at least 8 GiB to spare (the CUDA
    context, the allocator's free blocks), and is the figure the recipe's header states; a random base
    (no model.pretrained) exports as the preset's family."""
    from trainer.estimate import estimate
    from trainer.model.hf_import import model_family

    cfg, _ = compose_config([f"experiment={experiment}", *CHAT])
    est = estimate(cfg)
    peak = est["peak"]["bytes"] / GIB
    assert peak < 80e9 / GIB - 8
    assert f"{peak:.1f} GiB allocated at the peak" in header(experiment)
    assert model_family(cfg.model).model_type == preset(RECIPES[experiment]).hf_model_type


def test_moe_recipe_header() -> None:
    """qwen3-30b-a3b-lora's header: total and active parameters, the adapters, the peak with the frozen
    base (the experts' part of it) and the moment it is reached, and why not every expert (all-linear:
    0.98B adapters, their fp32 weights, gradients and AdamW state so many GiB more)."""
    from trainer.estimate import count_parameters, estimate, model_shape

    text = header("qwen3-30b-a3b-lora")
    est = estimate(compose_config(["experiment=qwen3-30b-a3b-lora", *CHAT])[0])
    p, b, peak = est["parameters"], est["bytes"], est["peak"]
    assert (
        f"{(p['total'] - p['adapters']) / 1e9:.2f}B weights" in text and f"{p['adapters'] / 1e6:.2f}M adapters" in text
    )
    assert f"{(p['active'] - p['adapters']) / 1e9:.2f}B active" in text
    assert (
        f"{peak['bytes'] / GIB:.1f} GiB allocated at the peak: the frozen base {b['weights_frozen'] / GIB:.1f} "
        f"(the experts' {est['experts']['weights_frozen'] / GIB:.1f}) and {est['phases'][peak['at']] / GIB:.1f} "
        f"at the {peak['at'].replace('_', ' ')}"
    ) in text
    every_cfg = compose_config(["experiment=qwen3-30b-a3b-lora", *CHAT, "lora.target_modules=[all-linear]"])[0]
    every = estimate(every_cfg)["bytes"]
    assert f"{count_parameters(every_cfg, model_shape(every_cfg)).expert_adapters / 1e9:.2f}B parameters" in text
    more = sum(every[k] - b[k] for k in ("weights_trainable", "gradients", "optimizer"))
    assert f"AdamW state {more / GIB:.0f} GiB more" in text


@pytest.mark.slow  # 42 s: each recipe's 2 steps on the CPU; the recipes' estimates are checked by default
def test_lora_gpu_smoke_runs_every_recipe(tmp_path) -> None:
    """benchmarks/lora_gpu.py --smoke: each recipe (and the Llama 3 case) trains 2 steps through the real
    loop on a tiny shape of its family on the CPU, next to trainer.estimate's peak for the same overrides."""
    from benchmarks.lora_gpu import CASES, main, overrides_of

    cases = ["lora_checkpointed", *RECIPES]
    results = main(["--smoke", "--steps", "2", "--cases", *cases, "--out", str(tmp_path / "out.json"),
                    "--runs", str(tmp_path / "runs")])  # fmt: skip
    assert [r["case"] for r in results] == cases and json.loads((tmp_path / "out.json").read_text())["smoke"]
    for r in results:
        assert "error" not in r, r
        assert r["steps"] == 2 and r["experiment"] == CASES[r["case"]][0] and 0 < r["final_loss"] < 10
        assert 0 < r["estimate_gib"] < 0.01 and r["tokens_per_s"] > 0
    resolved = (tmp_path / "runs" / "qwen3-30b-a3b-lora" / ".hydra" / "config.yaml").read_text()
    assert "n_experts: 4" in resolved and "micro_batch_size: 2" in resolved  # the recipe's, on a tiny MoE
    assert "model.layer_types=[sliding_attention,full_attention]" in overrides_of("gemma3-12b-lora", 2, tmp_path, True)


# The preference and RL recipes (objective=dpo on data=preference, objective=grpo on data=prompts). trainer.estimate
# counts rows and knows no objectives: their micro-batch (pairs, prompts) is asked as the rows it trains
# (benchmarks.preference_gpu.row_overrides), and the rollout's KV cache and logits are added by hand (rollout_bytes).
OBJECTIVE_RECIPES = {"llama3-8b-dpo-lora": "llama3-8b", "qwen3-8b-grpo-lora": "qwen3-8b"}
# meta-llama/Llama-3.1-8B-Instruct's config.json as published (Hugging Face Hub), typed here.
LLAMA31_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "vocab_size": 128256,
}  # fmt: skip


def objective_recipe(experiment: str, *overrides: str):
    return compose_config([f"experiment={experiment}", "data.path=records.jsonl", *overrides])[0]


def test_dpo_recipe_composes() -> None:
    """llama3-8b-dpo-lora: sigmoid DPO at beta 0.1 on preference pairs, adapters on all seven projections over
    a bf16 base, 8 pairs (16 rows of 2048 tokens) a micro-batch, the log-probs in chunks; the config rules
    between objective and data hold (preflight's check_objective)."""
    from trainer.objectives import check_objective

    cfg = objective_recipe("llama3-8b-dpo-lora")
    o, tc, m = cfg.objective, cfg.train, cfg.model
    assert (o.name, o.loss, o.beta) == ("dpo", "sigmoid", 0.1)
    assert (cfg.data.format, cfg.data.path) == ("preference", "records.jsonl")
    assert cfg.lora.enabled and cfg.lora.base_dtype == "bf16" and (cfg.lora.r, cfg.lora.alpha) == (16, 32.0)
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert cfg.precision.dtype == "bf16" and m.activation_checkpointing == "full" and m.loss_chunk_size == 1024
    assert (tc.seq_len, m.block_size, tc.micro_batch_size, tc.accumulation_steps(1)) == (2048, 2048, 8, 4)
    check_objective(cfg)


def test_grpo_recipe_composes() -> None:
    """qwen3-8b-grpo-lora: DAPO-style GRPO (token-level loss, epsilon 0.2 / 0.28, no KL), 8 generations of up to
    1024 tokens, rows of 512 prompt tokens + the completion, a KV cache of model.block_size = train.seq_len
    positions; its reward functions load, and the user's replace them."""
    from trainer.objectives import check_objective
    from trainer.objectives.rewards import load_rewards

    cfg = objective_recipe("qwen3-8b-grpo-lora")
    o, tc = cfg.objective, cfg.train
    assert (o.name, o.loss_type, o.num_generations, o.beta) == ("grpo", "dapo", 8, 0.0)
    assert (o.epsilon, o.epsilon_high) == (0.2, 0.28)
    assert cfg.data.format == "prompts" and o.max_new_tokens == 1024 and tc.seq_len - o.max_new_tokens == 512
    assert cfg.model.block_size == tc.seq_len and (tc.micro_batch_size, tc.accumulation_steps(1)) == (2, 4)
    assert [r.name for r in load_rewards(o.rewards, o.reward_weights)] == ["exact_match", "format"]
    assert objective_recipe("qwen3-8b-grpo-lora", "objective.rewards=[length:512]").objective.rewards == ["length:512"]
    check_objective(cfg)


@pytest.mark.parametrize("experiment, lr, warmup, steps", [("llama3-8b-dpo-lora", 2e-5, 50, 1000),
                                                           ("qwen3-8b-grpo-lora", 1e-5, 10, 500)])  # fmt: skip
def test_objective_recipe_keeps_its_schedule(experiment: str, lr: float, warmup: int, steps: int) -> None:
    """The recipe's learning rate (DPO-LoRA: 2e-5 to 5e-5; GRPO-LoRA: 1e-5), warmup and steps reach the run."""
    cfg = objective_recipe(experiment)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps) == (lr, warmup, steps)


@pytest.mark.parametrize("experiment, hf", [("llama3-8b-dpo-lora", LLAMA31_8B), ("qwen3-8b-grpo-lora", QWEN3_8B)])
def test_objective_recipe_takes_its_checkpoint(tmp_path, experiment: str, hf: dict) -> None:
    """The launch line's model.pretrained: the preset agrees with the public config.json, and the recipe's
    shorter context (the GRPO KV cache's size) survives the checkpoint's 131072 / 40960 positions."""
    from trainer.preflight import resolve_model_config

    cfg = objective_recipe(experiment, f"model.pretrained={checkpoint_dir(tmp_path, hf)}")
    m, preset_m = resolve_model_config(cfg.model, 0), preset(OBJECTIVE_RECIPES[experiment])
    for key in ("n_layer", "n_embd", "n_head", "n_kv_head", "attn_head_dim", "intermediate_size", "vocab_size"):
        assert getattr(m, key) == getattr(preset_m, key), key
    assert m.rope_scaling == preset_m.rope_scaling and m.rope_theta == preset_m.rope_theta
    assert m.block_size == cfg.train.seq_len < hf["max_position_embeddings"]


@pytest.mark.parametrize("experiment", list(OBJECTIVE_RECIPES))
def test_objective_recipe_fits_one_gpu_as_its_header_says(experiment: str) -> None:
    """trainer.estimate's peak for the rows a micro-batch trains (2 per pair, 8 per prompt) fits 80 GB with 8 GiB
    to spare and is the header's figure. DPO: the reference forward (no grad) after the policy's, with the
    block-input activations held, stays under the backward's moment (one block's bytes as its transients).
    GRPO: the rollout (KV cache, prompt logits, kept states) fits too, and is the header's figure."""
    from benchmarks.preference_gpu import estimate_rows, rollout_bytes, row_overrides

    cfg = objective_recipe(experiment)
    assert row_overrides(cfg) == ["train.micro_batch_size=16", "train.global_batch_size=64"]
    est = estimate_rows([f"experiment={experiment}", "data.path=records.jsonl"])
    assert est["run"]["micro_batch_size"] == 16 and est["run"]["accumulation"] == 4
    peak, text = est["peak"]["bytes"] / GIB, header(experiment)
    assert peak < 80e9 / GIB - 8 and f"{peak:.1f} GiB allocated at the peak" in text
    p = est["parameters"]
    assert f"{(p['total'] - p['adapters']) / 1e9:.2f}B weights and {p['adapters'] / 1e6:.2f}M adapters" in text
    assert f"the frozen base {est['bytes']['weights_frozen'] / GIB:.1f}" in text
    if cfg.objective.name == "dpo":
        reference = est["peak"]["kept_states"] + est["phases"]["loss"] + est["activations"]["block"]
        assert est["peak"]["at"] == "backward" and reference < est["peak"]["bytes"]
        assert f"about {est['activations']['block'] / GIB:.1f} GiB" in text
    else:
        rollout = rollout_bytes(cfg, est)
        m, o = cfg.model, cfg.objective
        assert rollout["rows"] == 64 and rollout["kv_cache"] == 36 * 2 * 8 * 128 * 2 * 1536 * 64  # layers, k+v, heads
        assert rollout["prompt_logits"] == 64 * 151936 * 2 and m.block_size == cfg.train.seq_len  # the last position
        assert rollout["total"] / GIB < 80e9 / GIB - 8
        assert f"{rollout['kv_cache'] / GIB:.1f} GiB" in text
        assert f"{rollout['total'] / GIB:.1f} GiB with the kept states" in text and o.max_new_tokens == 1024
