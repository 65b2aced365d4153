"""Every shipped config composes into the typed schema; bad input stops with one clear line."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
from helpers import HF_CONTEXT, run_cli, torchrun

from trainer.__main__ import CONFIG_DIR, compose_config, preflight
from trainer.config import (
    PRETRAINED_OVERRIDABLE,
    Config,
    ConfigError,
    ModelConfig,
    MonitorConfig,
    SpikeConfig,
    TrainConfig,
    check_switches,
)
from trainer.preflight import check_run, resolve_model_config

GROUPS = ["model", "data", "optim", "parallel", "precision", "lora", "logger", "experiment"]


def shipped_options() -> list[tuple[str, str]]:
    return [(group, path.stem) for group in GROUPS for path in sorted((CONFIG_DIR / group).glob("*.yaml"))]


def test_default_composes() -> None:
    cfg, _ = compose_config([])
    assert isinstance(cfg, Config)
    assert cfg.model.name == "tiny" and cfg.data.source == "stdlib" and cfg.parallel.strategy == "none"


def test_every_group_has_options() -> None:
    options = shipped_options()
    assert {group for group, _ in options} >= {"model", "data", "optim", "parallel", "precision", "logger"}


def option_overrides(group: str, option: str) -> list[str]:
    """The overrides that choose a shipped option, with the keys it leaves required."""
    overrides = [f"{group}={option}"]
    if group == "data" and option in ("files", "hf", "instruct", "chat", "preference", "prompts"):
        overrides.append("data.path=somewhere")
    if group == "objective" and option in ("grpo", "rloo"):  # reward functions are required: no default
        overrides.append("objective.rewards=[exact_match]")
    if group == "experiment" and option.endswith(("-dpo-lora", "-grpo-lora")):  # their data needs a path
        overrides.append("data.path=somewhere")
    if group == "model":  # big presets have long contexts; the default seq_len fits them all
        overrides.append("train.seq_len=64")
    return overrides


@pytest.mark.parametrize("group,option", shipped_options())
def test_every_shipped_config_composes(group: str, option: str) -> None:
    cfg, _ = compose_config(option_overrides(group, option))
    assert isinstance(cfg, Config)
    if group == "model":
        assert cfg.model.name == option
    if group == "data":
        records = ("instruct", "chat", "preference", "prompts")
        sources = {"files": "files", "hf": "hf", "synthetic": "synthetic", "shards": "shards"}
        sources |= dict.fromkeys(records, "files")
        assert cfg.data.source == sources.get(option, "stdlib")
        assert cfg.data.format == (option if option in records else "text")
    if group == "objective":
        assert cfg.objective.name == option


def test_every_shipped_yaml_starts_with_its_command() -> None:
    for path in CONFIG_DIR.rglob("*.yaml"):
        lines = [line for line in path.read_text().splitlines() if not line.startswith("# @package")]
        assert lines[0].startswith(("# python -m trainer", "# torchrun ")), path


def test_overrides_reach_the_dataclasses() -> None:
    cfg, _ = compose_config(["train.max_steps=7", "optim.lr=3e-4", "model.n_layer=2", "data.tokenizer=bpe"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 3e-4 and cfg.model.n_layer == 2
    assert cfg.data.tokenizer == "bpe"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
        (["trian.max_steps=3"], "unknown config key 'trian'"),
        (["train.max_steps=abc"], "train.max_steps"),
        (["train.max_steps=-1"], "train.max_steps must be >= 0"),
        (["model.n_head=3"], "model.n_head=3 does not divide model.n_embd=128"),
        (["train.seq_len=4096"], "train.seq_len=4096 exceeds the model's context"),
        (["model=nosuchmodel"], "Could not find 'model/nosuchmodel'"),
        (["data=files", "data.path=/no/such/corpus"], "data.path=/no/such/corpus does not exist"),
        (["data=files"], "data.source=files needs data.path"),
        (["model.norm=batchnorm"], "model.norm='batchnorm'"),
        (["optim.clip_grad_norm=-1"], "optim.clip_grad_norm must be >= 0"),
        (["model.pretrained=/no/such/checkpoint"], "model.pretrained=/no/such/checkpoint is not a directory"),
        (["data=synthetic", "data.synthetic_tokens=0"], "data.synthetic_tokens=0 must be positive"),
        (["data=synthetic", "data.synthetic_concentration=0"], "data.synthetic_concentration=0.0 must be positive"),
        (["lora.r=8"], "lora.r is set but LoRA is off (lora.enabled=false): set lora.enabled=true (or lora=default)"),
        (["lora=default", "lora.r=0"], "lora.r=0 must be positive"),
        (["monitor.spike.action=rollback"], "monitor.spike.action=rollback needs checkpoints to roll back to"),
    ],
)
def test_bad_input_is_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        preflight(overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_multirun_sweep_is_validated_by_its_first_value() -> None:
    preflight(["-m", "optim.lr=1e-3,3e-4"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        preflight(["-m", "optim.lrr=1e-3,3e-4"])


def test_cli_bad_key_exits_2_with_one_line_and_no_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train.max_stepz=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'train.max_stepz': check its spelling "
        "(`python -m trainer --cfg job` prints every key)"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert not run_dir.exists()


def test_cli_never_writes_over_an_existing_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run_dir / ".hydra" / "config.yaml").write_text("precious: true\n")
    result = run_cli("train.max_steps=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    assert "already holds a run" in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "precious: true\n"
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "metrics.jsonl"]


def test_two_ranks_stop_together_on_an_existing_run(tmp_path: Path) -> None:
    """Rank 0 finds the run dir taken: every rank exits with the one line (printed once), none
    is left in a collective with a rank that has gone (which ended in gloo tracebacks)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    result = torchrun("-m", "trainer", "parallel=ddp", "train.max_steps=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("already holds a run") == 1, result.stderr[-3000:]
    assert "[rank" not in result.stderr and "Connection closed" not in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_cli_empty_corpus_stops_before_training(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_text("")
    result = run_cli(
        "data=files",
        f"data.path={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "logger.wandb=false",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "empty" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_tokenizer_larger_than_model_vocabulary(tmp_path: Path) -> None:
    result = run_cli(
        "data=synthetic",
        "data.synthetic_vocab=300",
        "model.vocab_size=256",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "logger.wandb=false",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: the tokenizer's vocabulary (300) exceeds model.vocab_size=256: set model.vocab_size=300 "
        "or larger (or null), or use a smaller data.tokenizer"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- rules that span sections: check_run --------------------------------------------------------


def refusal(cfg: Config, world_size: int = 1, has_gpu: bool = False) -> str:
    """check_run's one-line message for cfg (fails the test if it passes or spans lines)."""
    with pytest.raises(ConfigError) as info:
        check_run(cfg, world_size, has_gpu)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def deepspeed_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """zero1-3 configs pass the installation check whether or not DeepSpeed is installed here."""
    real = importlib.util.find_spec
    present = real("json")  # any spec: only its existence is asked
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: present if name == "deepspeed" else real(name, *a)
    )


def test_cross_section_rules_wait_for_check_run() -> None:
    cfg = Config(monitor=MonitorConfig(spike=SpikeConfig(action="rollback")))  # builds: no __post_init__ veto
    assert refusal(cfg).startswith("monitor.spike.action=rollback needs checkpoints")


# -- an optional section's keys while it is off: refused in one line naming its switch ------------

OFF = {  # one key of each optional section (trainer/config/switches.py), set while the section is off
    "lora": (
        ["lora.target_modules=[q_proj]"],
        "lora.target_modules is set but LoRA is off (lora.enabled=false): set lora.enabled=true "
        "(or lora=default), or drop lora.target_modules=[q_proj]",
    ),
    "sharpness": (
        ["diagnostics.sharpness.interval=10"],
        "diagnostics.sharpness.interval is set but the sharpness is off (diagnostics.sharpness.enabled=false): "
        "set diagnostics.sharpness.enabled=true, or drop diagnostics.sharpness.interval=10",
    ),
    "noise_scale": (
        ["diagnostics.noise_scale_ema=0.9"],
        "diagnostics.noise_scale_ema is set but the noise scale is off (diagnostics.noise_scale=false): "
        "set diagnostics.noise_scale=true, or drop diagnostics.noise_scale_ema=0.9",
    ),
    "quant": (
        ["quant.group_size=64"],
        "quant.group_size is set but QAT is off (quant.qat=null): set quant.qat=int4, or drop quant.group_size=64",
    ),
}
ON = {  # the same keys with their section on: accepted
    "lora": ["lora=default", "lora.target_modules=[q_proj]"],  # whether q_proj exists is checked on the model
    "sharpness": ["diagnostics.sharpness.enabled=true", "diagnostics.sharpness.interval=10"],
    "noise_scale": ["diagnostics.noise_scale=true", "diagnostics.noise_scale_ema=0.9", "train.grad_accum_steps=2"],
    "quant": ["quant.qat=int4", "quant.group_size=64"],
}


@pytest.mark.parametrize("section", OFF)
def test_a_key_of_a_section_that_is_off_is_refused(section: str) -> None:
    """A key of an optional section is never silently ignored: lora.* without lora.enabled would train
    in full, diagnostics.sharpness.interval without diagnostics.sharpness.enabled would log nothing."""
    overrides, expected = OFF[section]
    cfg, _ = compose_config(overrides)
    assert refusal(cfg) == expected
    if section == "quant" and importlib.util.find_spec("torchao") is None:
        pytest.skip("quant.qat needs torchao")
    check_run(compose_config(ON[section])[0])


def test_a_section_off_with_its_keys_at_their_defaults_passes() -> None:
    """ "Set" means different from the schema's default: lora=none spells the defaults out, and a key
    set back to its default is not set."""
    check_run(compose_config(["lora=none"])[0])
    check_run(compose_config(["lora=default", "lora.enabled=false"])[0])  # lora/default.yaml: the defaults
    check_run(compose_config(["diagnostics.sharpness.interval=100", "quant.group_size=32"])[0])


@pytest.mark.parametrize("group,option", shipped_options())
def test_every_shipped_config_sets_no_key_of_a_section_it_leaves_off(group: str, option: str) -> None:
    check_switches(compose_config(option_overrides(group, option))[0])


@pytest.mark.parametrize("section", ["lora", "sharpness"])
def test_cli_refuses_a_key_of_a_section_that_is_off_in_one_line(section: str, tmp_path: Path) -> None:
    overrides, expected = OFF[section]
    result = run_cli(*overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: {expected}"]
    assert not (tmp_path / "run").exists()


def test_parallel_none_with_several_processes_is_refused() -> None:
    cfg, _ = compose_config([])
    assert refusal(cfg, world_size=2).startswith("parallel=none with 2 processes would train 2 independent copies")
    check_run(compose_config(["parallel=ddp"])[0], world_size=2)


def test_zero_without_deepspeed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    cfg, _ = compose_config(["parallel=zero3"])
    assert refusal(cfg, world_size=2) == (
        'parallel=zero3 needs DeepSpeed: pip install -e ".[deepspeed]" (or choose parallel=fsdp)'
    )


def test_world_size_must_divide_the_global_batch() -> None:
    cfg, _ = compose_config(["parallel=ddp", "train.micro_batch_size=4", "train.global_batch_size=12"])
    assert "train.global_batch_size=12 is not a multiple of" in refusal(cfg, world_size=2)
    check_run(cfg, world_size=3)  # 12 = 4 x 1 x 3


def test_fsdp_rules(deepspeed_installed: None) -> None:
    offload, _ = compose_config(["parallel=fsdp", "parallel.fsdp_cpu_offload=true"])
    assert refusal(offload, world_size=2).startswith("parallel.fsdp_cpu_offload=true needs a GPU")
    check_run(offload, world_size=2, has_gpu=True)
    hybrid, _ = compose_config(["parallel=fsdp", "parallel.fsdp_shard_size=3"])
    assert refusal(hybrid, world_size=4).startswith("parallel.fsdp_shard_size=3 does not divide the world size 4")
    check_run(hybrid, world_size=6)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["checkpoint.async_save=true"], "checkpoint.async_save=true is for none / ddp / fsdp"),
        (["precision=bf16", "precision.loss_scaling=true"], "precision.loss_scaling=true with bf16 is not available"),
        (["precision=fp16", "precision.growth_factor=3"], "DeepSpeed's loss scaler grows by 2"),
        (["precision=fp16", "precision.initial_scale=1000"], "precision.initial_scale=1000.0 must be a power of two"),
        (["monitor.spike.action=skip"], "monitor.spike.action=skip is available for none / ddp / fsdp"),
    ],
)
def test_what_deepspeed_cannot_do_is_refused(overrides: list[str], expected: str, deepspeed_installed: None) -> None:
    cfg, _ = compose_config(["parallel=zero2", *overrides])
    assert refusal(cfg, world_size=2, has_gpu=True).startswith(expected)


def test_deepspeed_fp16_needs_a_gpu(deepspeed_installed: None) -> None:
    cfg, _ = compose_config(["parallel=zero1", "precision=fp16"])
    assert refusal(cfg, world_size=2).startswith("precision=fp16 with parallel=zero1 needs a GPU")
    check_run(cfg, world_size=2, has_gpu=True)


def test_contradicting_deepspeed_json_is_refused(tmp_path: Path, deepspeed_installed: None) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg, _ = compose_config(["parallel=zero2", f"parallel.deepspeed_config={path}"])
    assert refusal(cfg, world_size=2).startswith("parallel.deepspeed_config sets zero_optimization.stage=3")
    path.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}, "train_batch_size": "auto"})
    )
    check_run(cfg, world_size=2)
    from trainer.parallel.zero import merged_deepspeed_config

    merged = merged_deepspeed_config(cfg, world_size=2)  # agreeing keys are honoured
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert merged["train_batch_size"] == 16 * 2  # the harness's value replaces "auto"


def test_deepspeed_overlaps_its_reduction_on_a_gpu_only(deepspeed_installed: None) -> None:
    from trainer.parallel.zero import harness_deepspeed_config

    cfg, _ = compose_config(["parallel=zero2"])
    gpu = harness_deepspeed_config(cfg, world_size=2, on_gpu=True)["zero_optimization"]
    assert gpu == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}
    assert harness_deepspeed_config(cfg, world_size=2, on_gpu=False)["zero_optimization"] == {"stage": 2}


def test_spike_skip_and_rollback_run_where_a_step_can_be_dropped() -> None:
    for strategy in ("none", "ddp", "fsdp"):
        cfg, _ = compose_config([f"parallel={strategy}", "monitor.spike.action=rollback", "checkpoint.interval=5"])
        check_run(cfg, world_size=1 if strategy == "none" else 2)


def test_synthetic_splits_must_hold_a_sample() -> None:
    cfg, _ = compose_config(["data=synthetic", "data.synthetic_tokens=1000", "train.seq_len=100"])
    assert refusal(cfg) == (  # 1000 tokens: 980 train, 20 validation
        "validation split holds 20 tokens, fewer than train.seq_len+1=101: lower train.seq_len or raise "
        "data.val_fraction"
    )
    cfg, _ = compose_config(
        ["data=synthetic", "data.synthetic_tokens=100", "data.val_fraction=0.45", "train.seq_len=60"]
    )
    assert refusal(cfg) == (
        "train split holds 55 tokens, fewer than train.seq_len+1=61: lower train.seq_len or raise data.synthetic_tokens"
    )
    check_run(compose_config(["data=synthetic", "data.synthetic_tokens=1000", "train.seq_len=19"])[0])


# -- model.pretrained: the checkpoint fixes the architecture -------------------------------------

# One non-default value for each ModelConfig field but `pretrained` (the checkpoint itself).
NON_DEFAULT = {
    "name": "custom", "vocab_size": 1000, "block_size": 32, "n_layer": 3, "n_head": 8, "n_kv_head": 2,
    "n_embd": 256, "intermediate_size": 100, "norm": "rmsnorm", "norm_eps": 1e-3, "mlp": "swiglu",
    "position": "rope", "rope_theta": 5e5, "tie_embeddings": False, "bias": False, "dropout": 0.1,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 16},
    "attention_backend": "math", "init_std": 0.01, "activation_checkpointing": "full",
    "activation_checkpointing_every": 2, "loss_chunk_size": 32, "qkv_bias": True, "sliding_window": 8,
    "hf_model_type": "mistral", "vocab_multiple": 128, "layer_types": ["full_attention"] * 4,
    "rope_local_theta": 1e4, "head_dim": 16, "qk_norm": "head", "norm_placement": "post", "norm_offset": 1.0,
    "embed_scale": True, "query_pre_attn_scalar": 64.0, "attn_softcap": 50.0, "final_softcap": 30.0,
    "fused_gate_up": True, "n_experts": 4, "n_experts_per_token": 1, "moe_intermediate_size": 64,
    "moe_norm_topk": False, "router_aux_loss_coef": 0.01, "moe_layers": [0], "moe_impl": "loop",
}  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("key", [f.name for f in dataclasses.fields(ModelConfig)])
def test_every_model_field_with_pretrained_takes_effect_or_is_refused(
    hf_checkpoints: dict[str, str], arch: str, key: str
) -> None:
    from trainer.model.hf_import import load_hf_config

    path = hf_checkpoints[arch]
    assert key == "pretrained" or key in NON_DEFAULT, f"add a non-default value of model.{key} to NON_DEFAULT"
    value = path if key == "pretrained" else NON_DEFAULT[key]
    assert value != getattr(ModelConfig(), key)
    model = dataclasses.replace(ModelConfig(pretrained=path), **{key: value})
    cfg = Config(model=model, train=TrainConfig(seq_len=16))
    if key in PRETRAINED_OVERRIDABLE or value == getattr(load_hf_config(path), key):
        check_run(cfg)
        assert getattr(resolve_model_config(model, tokenizer_vocab=50), key) == value
    else:  # the checkpoint's architecture: refused, by check_run and by the resolution itself
        message = refusal(cfg)
        assert message.startswith(f"model.{key}=") and f"drop model.{key} (the checkpoint fixes" in message
        with pytest.raises(ConfigError):
            resolve_model_config(model, tokenizer_vocab=50)


def test_a_conflicting_architecture_field_is_refused_in_one_line(hf_checkpoints: dict[str, str]) -> None:
    path = hf_checkpoints["gpt2"]
    cfg, _ = compose_config(["model.n_layer=3", f"model.pretrained={path}", "train.seq_len=16"])
    assert refusal(cfg) == (
        f"model.n_layer=3 conflicts with model.pretrained={path}, whose checkpoint has n_layer=2: "
        "drop model.n_layer (the checkpoint fixes the architecture)"
    )


def test_a_preset_that_agrees_with_its_checkpoint_passes(tmp_path: Path) -> None:
    import transformers

    transformers.GPT2Config().save_pretrained(tmp_path)  # GPT-2 small's config.json; no weights
    cfg, _ = compose_config(["model=gpt2", f"model.pretrained={tmp_path}"])
    assert refusal(cfg) == (  # the preset agrees; the checkpoint's weights are checked next, and missing
        f"model.pretrained={tmp_path}: {tmp_path}: no weights; expected model.safetensors, "
        "model.safetensors.index.json or pytorch_model.bin"
    )
    resolved = resolve_model_config(cfg.model, tokenizer_vocab=50257)
    assert (resolved.name, resolved.n_layer, resolved.n_embd, resolved.block_size) == ("gpt2", 12, 768, 1024)
    assert resolved.vocab_size == 50257 and resolved.pretrained == str(tmp_path)


@pytest.mark.parametrize("arch,positions", [("gpt2", "n_positions"), ("llama", "max_position_embeddings")])
def test_pretrained_context(hf_checkpoints: dict[str, str], arch: str, positions: str) -> None:
    path = hf_checkpoints[arch]
    cfg, _ = compose_config([f"model.pretrained={path}", f"train.seq_len={HF_CONTEXT}"])
    check_run(cfg)  # model=tiny's default block_size (256) does not stretch the checkpoint's 64
    assert resolve_model_config(cfg.model, tokenizer_vocab=50).block_size == HF_CONTEXT
    cfg, _ = compose_config([f"model.pretrained={path}", "train.seq_len=65"])
    assert refusal(cfg) == (
        f"train.seq_len=65 exceeds the model's context model.block_size=64 (model.pretrained={path} "
        "holds 64 positions): lower train.seq_len"
    )
    cfg, _ = compose_config([f"model.pretrained={path}", "model.block_size=32", "train.seq_len=48"])
    assert refusal(cfg).endswith("lower train.seq_len or raise model.block_size up to 64")
    cfg, _ = compose_config([f"model.pretrained={path}", "model.block_size=128", "train.seq_len=16"])
    assert refusal(cfg) == (
        f"model.block_size=128 exceeds model.pretrained={path}'s context ({positions}=64): "
        "use model.block_size=64 or less"
    )


def test_an_unreadable_checkpoint_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cfg, _ = compose_config([f"model.pretrained={tmp_path}"])
    assert refusal(cfg).startswith(f"model.pretrained={tmp_path}: ")
    assert "model_type 'bert' unsupported" in refusal(cfg)


def test_the_tokenizer_must_fit_the_checkpoint_vocabulary(hf_checkpoints: dict[str, str]) -> None:
    model = ModelConfig(pretrained=hf_checkpoints["gpt2"])
    assert resolve_model_config(model, tokenizer_vocab=96).vocab_size == 96
    with pytest.raises(
        ConfigError,
        match=r"the tokenizer's vocabulary \(97 tokens\) does not fit model.pretrained=.*'s embedding \(96 rows\)",
    ):
        resolve_model_config(model, tokenizer_vocab=97)
