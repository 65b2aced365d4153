"""The checks before anything is built: the rules that span config sections and components
(`check_run`: the launch against the strategy, a checkpoint against model.*, the data against the
context), and the model a run builds from model.* and a pretrained checkpoint (`resolve_model_config`).

It sits above the components it reads (the strategies, the token cache's split, the checkpoint
importer), so trainer/config stays a leaf: its schema and per-section checks import no component.
The run builder (trainer/run.py) and the command line (trainer/__main__.py) call it first.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import fields, replace
from pathlib import Path

from trainer.config import (
    PRETRAINED_OVERRIDABLE,
    Config,
    ConfigError,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
)
from trainer.config.schema import QuantConfig, _require
from trainer.config.switches import check_switches, show
from trainer.data.cache import split_point
from trainer.model.hf_import import check_weights, load_hf_config
from trainer.objectives import check_objective
from trainer.parallel import strategy_class
from trainer.parallel.zero import merged_deepspeed_config


def check_run(cfg: Config, world_size: int = 1, has_gpu: bool = False) -> None:
    """Every rule that spans config sections; raises ConfigError (one line) on the first broken one.

    has_gpu: whether this run will compute on a GPU (torch.cuda.is_available() and
    train.device != cpu). Reads model.pretrained's config.json; builds nothing.
    """
    check_switches(cfg)  # an optional section's keys while it is off (trainer/config/switches.py)
    _check_lora(cfg.lora, cfg.parallel.strategy)
    _check_launch(cfg, world_size, has_gpu)
    _check_experts(cfg, world_size)
    _check_spike(cfg)
    _check_synthetic_splits(cfg)
    _check_model(cfg)
    _check_compile(cfg)
    _check_qat(cfg)
    _check_diagnostics(cfg, world_size)
    check_objective(cfg)  # objective= against data= and train.compile (trainer/objectives/)
    _check_eval(cfg)


def _check_eval(cfg: Config) -> None:
    """eval.*: a key that only the tasks (or the tasks and files) read is not set without them, the
    files exist, and the tasks are known with their data (trainer/evaluation/inloop.check_eval)."""
    from trainer.config import EvalConfig
    from trainer.evaluation.inloop import check_eval

    ec, default = cfg.eval, EvalConfig()
    for key, needs in (("include_path", "tasks"), ("limit", "tasks"), ("num_fewshot", "tasks"),
                       ("apply_chat_template", "tasks"), ("batch_size", "enabled"), ("interval", "enabled")):  # fmt: skip
        if getattr(ec, key) != getattr(default, key) and not getattr(ec, needs):
            what = "eval.tasks is empty" if needs == "tasks" else "eval.tasks and eval.files are empty"
            raise ConfigError(
                f"eval.{key}={show(getattr(ec, key))} is set but {what}, so nothing would read it: name the tasks "
                "with eval.tasks=[...] (or held-out text with eval.files=[...]), or drop the key"
            )
    for path in ec.files:
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"eval.files: {path} is not a file: list held-out text files (eval.files=[a.txt,b.txt])")
    check_eval(ec)


def _check_compile(cfg: Config) -> None:
    """train.compile runs with torch's own strategies, and not over a 4-bit (QLoRA) base."""
    if not cfg.train.compile:
        return
    _require(
        cfg.parallel.strategy in ("none", "ddp", "fsdp"),
        f"train.compile=true with parallel={cfg.parallel.strategy} is not supported (DeepSpeed wraps the model "
        "itself): use parallel=fsdp / ddp / none, or train.compile=false",
    )
    _require(
        not (cfg.lora.enabled and cfg.lora.quantize_base),
        "train.compile=true with a 4-bit QLoRA base (lora.quantize_base=nf4) is not supported: set train.compile=false",
    )
    n_experts = _resolved_model(cfg).n_experts
    _require(
        not n_experts,
        f"train.compile=true with model.n_experts={n_experts} is not supported (a sparse MLP's experts run over "
        "token slices whose sizes are data: the blocks' fullgraph compile cannot trace them): set train.compile=false",
    )


def _check_experts(cfg: Config, world_size: int) -> None:
    """Expert parallelism (parallel.expert=N): a mixture-of-experts model whose experts split into N
    equal blocks, over expert groups of N consecutive ranks, under the strategy that implements it."""
    degree = cfg.parallel.expert
    if degree == 1:
        return
    n_experts, strategy = _resolved_model(cfg).n_experts, cfg.parallel.strategy
    _require(
        n_experts > 0,
        f"parallel.expert={degree} splits the experts of a mixture-of-experts model, and this model is dense "
        "(model.n_experts=0): set model.n_experts, or parallel.expert=1",
    )
    _require(
        n_experts % degree == 0,
        f"parallel.expert={degree} does not divide model.n_experts={n_experts}: each rank of an expert group holds "
        f"n_experts / expert of them; use a divisor of {n_experts}",
    )
    why = (
        "one process holds every expert" if strategy == "none" else f"{strategy} shards them with the rest of the model"
    )
    _require(
        strategy == "ddp",
        f"parallel.expert={degree} runs with parallel=ddp, not parallel={strategy} ({why}): "
        "use parallel=ddp, or parallel.expert=1",
    )
    _require(
        world_size % degree == 0,
        f"parallel.expert={degree} does not divide the world size {world_size}: expert groups are "
        f"parallel.expert consecutive ranks; launch a multiple of {degree} processes",
    )
    _require(
        not cfg.lora.enabled,
        f"parallel.expert={degree} with LoRA is not supported: use lora=none, or parallel.expert=1",
    )
    _require(
        not cfg.diagnostics.sharpness.enabled,
        f"diagnostics.sharpness.enabled=true with parallel.expert={degree} is not supported (its gradients "
        "would need the expert blocks' own reduction): turn it off, or use parallel.expert=1",
    )


def _resolved_model(cfg: Config) -> ModelConfig:
    """model.* as the run will build it: with model.pretrained, over the checkpoint's config.json."""
    return _over_checkpoint(cfg.model, _checkpoint_config(cfg.model)) if cfg.model.pretrained else cfg.model


def _check_qat(cfg: Config) -> None:
    """quant.qat needs torchao, trains the full weights (not LoRA's), and int4 groups that tile every
    block linear's input (model.n_embd and the MLP's hidden width, the checkpoint's with model.pretrained)."""
    qat, group = cfg.quant.qat, cfg.quant.group_size
    _require(
        qat == "int4" or group == QuantConfig().group_size,
        f"quant.group_size={group} is used by quant.qat=int4 only (int8 has one scale per output channel): "
        "drop quant.group_size or set quant.qat=int4",
    )
    if qat is None:
        return
    _require(
        importlib.util.find_spec("torchao") is not None,
        f"quant.qat={qat} needs torchao (its quantisation primitives): pip install torchao",
    )
    _require(
        not cfg.lora.enabled,
        f"quant.qat={qat} with LoRA is not supported (QAT trains the full weights, LoRA freezes them): "
        "use lora=none, or quant.qat=null",
    )
    if qat != "int4":
        return
    model = _over_checkpoint(cfg.model, _checkpoint_config(cfg.model)) if cfg.model.pretrained else cfg.model
    widths = {"model.n_embd": model.n_embd, "the MLP's hidden width": model.intermediate_size or 4 * model.n_embd}
    for name, width in widths.items():
        _require(
            width % group == 0,
            f"quant.qat=int4 groups quant.group_size={group} input columns per scale, which does not divide "
            f"{name} ({width}): set quant.group_size to a divisor of it (e.g. 32)",
        )


def _check_lora(cfg: LoraConfig, strategy: str) -> None:
    """LoRA settings that cannot work, in one line each (r, alpha and dropout: LoraConfig itself)."""
    if not cfg.enabled:  # its keys set while it is off: check_switches
        return
    problem = qlora_problem(cfg, strategy, torchao=importlib.util.find_spec("torchao") is not None)
    _require(problem is None, problem or "")
    if cfg.init_from:
        _require(
            (Path(cfg.init_from).expanduser() / "adapter_config.json").is_file(),
            f"lora.init_from={cfg.init_from} holds no adapter_config.json: point it at a PEFT adapter directory",
        )


def qlora_problem(cfg: LoraConfig, strategy: str, torchao: bool) -> str | None:
    """Why lora.quantize_base cannot run (one line), or None: it needs torchao (its NF4 tensor), and
    parallel=none (ddp would broadcast and fsdp / zero1-3 shard a base the NF4 tensor stores whole)."""
    if cfg.quantize_base is None:
        return None
    if not torchao:
        return f"lora.quantize_base={cfg.quantize_base} needs torchao (its NF4 tensor): pip install torchao"
    if strategy != "none":
        return (
            f"lora.quantize_base={cfg.quantize_base} (QLoRA) runs with parallel=none only, not parallel={strategy}: "
            "use parallel=none (one GPU), or drop lora.quantize_base to shard a bf16 base"
        )
    return None


def _check_launch(cfg: Config, world_size: int, has_gpu: bool) -> None:
    """What the strategy needs from the launch: process count, packages, batch split, devices."""
    strategy = cfg.parallel.strategy
    tensor = cfg.parallel.tensor
    _require(
        strategy != "none" or world_size == tensor,
        f"parallel=none with {world_size} processes would train {world_size} independent copies: "
        "choose parallel=ddp, fsdp, zero1, zero2 or zero3"
        + (f" (or parallel=fsdp parallel.tensor={tensor} to add data parallelism)" if tensor > 1 else ""),
    )
    _require(
        world_size % tensor == 0,
        f"parallel.tensor={tensor} does not divide the world size {world_size}: replicate x shard x tensor "
        "must be the world size",
    )
    _check_tensor(cfg, world_size)
    _require(
        not strategy.startswith("zero") or importlib.util.find_spec("deepspeed") is not None,
        f'parallel={strategy} needs DeepSpeed: pip install -e ".[deepspeed]" (or choose parallel=fsdp)',
    )
    cfg.train.accumulation_steps(world_size // tensor)  # raises when the global batch cannot be split
    _require(
        cfg.parallel.replicate == 1 or strategy == "fsdp",
        f"parallel.replicate={cfg.parallel.replicate} (HSDP: FSDP shards replicated across groups) needs "
        f"parallel=fsdp, not parallel={strategy}",
    )
    if strategy == "fsdp":
        _check_fsdp(cfg.parallel, world_size, has_gpu)
    if strategy.startswith("zero"):
        _check_deepspeed(cfg, world_size, has_gpu)


def _check_tensor(cfg: Config, world_size: int) -> None:
    """parallel.tensor: the model splits over T ranks, and what does not run split yet is refused."""
    tensor = cfg.parallel.tensor
    if tensor == 1:
        return
    from trainer.parallel.tensor import check_tensor_parallel

    model = _over_checkpoint(cfg.model, _checkpoint_config(cfg.model)) if cfg.model.pretrained else cfg.model
    if model.vocab_size is None:  # the tokenizer's, known later (build_run checks it again then)
        model = replace(model, vocab_size=model.vocab_multiple * tensor)
    check_tensor_parallel(model, tensor, cfg.train.seq_len)
    refused = [
        (cfg.lora.enabled and cfg.lora.dora, "DoRA (lora.dora: its row norms span the ranks)"),
        (cfg.lora.enabled and cfg.lora.quantize_base, "lora.quantize_base (QLoRA is for one GPU)"),
        (cfg.lora.enabled and cfg.lora.dropout > 0, "lora.dropout (one mask on the replicated input)"),
        (cfg.quant.qat, "quantization-aware training (quant.qat)"),
        (cfg.parallel.expert > 1, "expert parallelism (parallel.expert)"),
        (cfg.diagnostics.sharpness.enabled, "diagnostics.sharpness"),
    ]
    for bad, what in refused:
        _require(not bad, f"parallel.tensor={tensor} does not run with {what} yet: drop one of them")


def _check_fsdp(cfg: ParallelConfig, world_size: int, has_gpu: bool) -> None:
    _require(
        not cfg.fsdp_cpu_offload or has_gpu,
        "parallel.fsdp_cpu_offload=true needs a GPU (FSDP2 offloads GPU shards to the CPU; "
        "on the CPU they are there already): drop it or run on GPUs",
    )
    data = world_size // cfg.tensor
    ranks = f"the world size {world_size}" if cfg.tensor == 1 else (
        f"the data-parallel ranks (world size {world_size} / parallel.tensor {cfg.tensor} = {data})")  # fmt: skip
    product = "replicate x shard" + (" x tensor" if cfg.tensor > 1 else "")
    _require(
        data % cfg.replicate == 0,
        f"parallel.replicate={cfg.replicate} does not divide {ranks}: {product} must be the world size (on several "
        "nodes: replicate = the node count)",
    )
    _require(
        cfg.replicate == 1 or cfg.fsdp_shard_size in (0, data // cfg.replicate),
        f"parallel.replicate={cfg.replicate} and parallel.fsdp_shard_size={cfg.fsdp_shard_size} disagree at "
        f"world size {world_size} ({product} = world size): set one of them",
    )
    shard = cfg.fsdp_shard_size or data
    _require(
        data % shard == 0,
        f"parallel.fsdp_shard_size={shard} does not divide {ranks}: "
        "use a divisor (e.g. the GPUs per node) or 0 to shard over all ranks",
    )


def _check_deepspeed(cfg: Config, world_size: int, has_gpu: bool) -> None:
    """What DeepSpeed's checkpoint and precision sections cannot express, and the user's JSON."""
    _require(
        not cfg.checkpoint.async_save,
        "checkpoint.async_save=true is for none / ddp / fsdp (torch.distributed.checkpoint); for zero1-3 "
        "use DeepSpeed's own checkpoint engine through parallel.deepspeed_config",
    )
    precision = cfg.precision
    fp16 = precision.dtype == "fp16"
    _require(
        not fp16 or has_gpu,
        f"precision=fp16 with parallel={cfg.parallel.strategy} needs a GPU (DeepSpeed's CPU backend has no "
        "fp16): use precision=bf16, or parallel=ddp / fsdp for fp16 on the CPU",
    )
    _require(
        not (precision.dtype == "bf16" and precision.loss_scaling),
        "precision.loss_scaling=true with bf16 is not available under DeepSpeed: drop it, or use parallel=ddp / fsdp",
    )
    _require(
        not fp16 or (precision.growth_factor == 2.0 and precision.backoff_factor == 0.5),
        "DeepSpeed's loss scaler grows by 2 and backs off by 0.5: leave precision.growth_factor / "
        "backoff_factor at their defaults with parallel=zero1/2/3",
    )
    _require(
        not fp16 or 2 ** int(math.log2(precision.initial_scale)) == precision.initial_scale,
        f"precision.initial_scale={precision.initial_scale} must be a power of two under DeepSpeed",
    )
    merged_deepspeed_config(cfg, world_size)  # raises on a contradicting DeepSpeed JSON


def _check_diagnostics(cfg: Config, world_size: int) -> None:
    """The noise scale needs a small batch inside the step (a first micro-batch); the sharpness,
    the torch strategies (its extra gradients run outside DeepSpeed's counted micro-steps)."""
    d, strategy = cfg.diagnostics, cfg.parallel.strategy
    _require(
        not d.sharpness.enabled or not strategy.startswith("zero"),
        f"diagnostics.sharpness.enabled=true is available for parallel=none / ddp / fsdp, not {strategy}: "
        "use parallel=fsdp for sharding, or turn it off",
    )
    if d.noise_scale:
        accum = cfg.train.accumulation_steps(world_size)
        _require(
            accum >= 2,
            f"diagnostics.noise_scale=true compares one micro-batch's gradient with the step's, and this step has "
            f"{accum} micro-batch per rank: set train.grad_accum_steps=2 or more (or a larger train.global_batch_size)",
        )


def _check_spike(cfg: Config) -> None:
    action = cfg.monitor.spike.action
    _require(
        action != "rollback" or cfg.checkpoint.interval > 0,
        "monitor.spike.action=rollback needs checkpoints to roll back to: set checkpoint.interval=N",
    )
    _require(
        action == "log" or strategy_class(cfg.parallel.strategy).can_skip_step,
        f"monitor.spike.action={action} is available for none / ddp / fsdp: DeepSpeed "
        "cannot drop one step's reduced gradients; use monitor.spike.action=log with zero1-3",
    )


def _check_synthetic_splits(cfg: Config) -> None:
    """Each synthetic split must hold one sample (seq_len + 1 tokens); other sources are counted
    only once tokenized."""
    if cfg.data.source != "synthetic":
        return
    total, need = cfg.data.synthetic_tokens, cfg.train.seq_len + 1
    train_tokens = split_point(total, cfg.data.val_fraction)
    _require(
        train_tokens >= need,
        f"train split holds {train_tokens} tokens, fewer than train.seq_len+1={need}: "
        "lower train.seq_len or raise data.synthetic_tokens",
    )
    _require(
        total - train_tokens >= need,
        f"validation split holds {total - train_tokens} tokens, fewer than train.seq_len+1={need}: "
        "lower train.seq_len or raise data.val_fraction",
    )


def _check_model(cfg: Config) -> None:
    """train.seq_len fits the model's context; with model.pretrained, the model.* settings fit the checkpoint."""
    seq_len, model = cfg.train.seq_len, cfg.model
    if not model.pretrained:
        _require(
            seq_len <= model.block_size,
            f"train.seq_len={seq_len} exceeds the model's context model.block_size="
            f"{model.block_size}: lower train.seq_len or raise model.block_size",
        )
        return
    checkpoint = _checkpoint_config(model)
    try:  # names and shapes against config.json, from the index and the files' headers: no tensor read
        check_weights(model.pretrained, checkpoint)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.pretrained={model.pretrained}: {error}") from error
    context = _over_checkpoint(model, checkpoint).block_size
    raise_it = f" or raise model.block_size up to {checkpoint.block_size}" if context < checkpoint.block_size else ""
    _require(
        seq_len <= context,
        f"train.seq_len={seq_len} exceeds the model's context model.block_size={context} "
        f"(model.pretrained={model.pretrained} holds {checkpoint.block_size} positions): lower train.seq_len{raise_it}",
    )


# ---------------------------------------------------------------------------------------------
# The model a run builds: the config as given, or a checkpoint's architecture with a few overrides.


def resolve_model_config(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """The model's shape with its vocabulary fixed: a derived copy, the run config is untouched.

    vocab_size is the real vocabulary: model.vocab_size, else the checkpoint's, else the tokenizer's;
    the embedding and head hold it padded to model.vocab_multiple (ModelConfig.padded_vocab_size).
    With model.pretrained, the checkpoint's config.json with cfg's PRETRAINED_OVERRIDABLE fields
    applied; a conflicting architecture field raises ConfigError.
    """
    if cfg.pretrained:
        cfg = _over_checkpoint(cfg, _checkpoint_config(cfg))
        _require(
            tokenizer_vocab <= cfg.vocab_size,
            f"the tokenizer's vocabulary ({tokenizer_vocab} tokens) does not fit model.pretrained={cfg.pretrained}'s "
            f"embedding ({cfg.vocab_size} rows): leave data.tokenizer unset to use the model's own tokenizer",
        )
    if cfg.vocab_size is None:
        return replace(cfg, vocab_size=tokenizer_vocab)
    _require(
        tokenizer_vocab <= cfg.vocab_size,
        f"the tokenizer's vocabulary ({tokenizer_vocab}) exceeds model.vocab_size={cfg.vocab_size}: "
        f"set model.vocab_size={tokenizer_vocab} or larger (or null), or use a smaller data.tokenizer",
    )
    return cfg


def _checkpoint_config(cfg: ModelConfig) -> ModelConfig:
    """model.pretrained's config.json as a ModelConfig (its reading errors as one ConfigError line)."""
    try:
        return load_hf_config(cfg.pretrained)
    except KeyError as error:
        raise ConfigError(f"model.pretrained={cfg.pretrained}: its config.json lacks the key {error}") from error
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.pretrained={cfg.pretrained}: {error}") from error


def _over_checkpoint(cfg: ModelConfig, checkpoint: ModelConfig) -> ModelConfig:
    """checkpoint with cfg's overridable fields applied; refuses an architecture field it contradicts.

    A field left at ModelConfig's default counts as unset (the default model=tiny must not crop a
    checkpoint's context to its 256 positions), so it keeps the checkpoint's value.
    """
    default = ModelConfig()
    for f in fields(ModelConfig):
        ours, theirs = getattr(cfg, f.name), getattr(checkpoint, f.name)
        _require(
            f.name in PRETRAINED_OVERRIDABLE or ours in (getattr(default, f.name), theirs),
            f"model.{f.name}={show(ours)} conflicts with model.pretrained={cfg.pretrained}, whose checkpoint "
            f"has {f.name}={show(theirs)}: drop model.{f.name} (the checkpoint fixes the architecture)",
        )
    overrides = {k: getattr(cfg, k) for k in PRETRAINED_OVERRIDABLE if getattr(cfg, k) != getattr(default, k)}
    positions = "n_positions" if checkpoint.position == "learned" else "max_position_embeddings"
    _require(
        overrides.get("block_size", 0) <= checkpoint.block_size,
        f"model.block_size={cfg.block_size} exceeds model.pretrained={cfg.pretrained}'s context "
        f"({positions}={checkpoint.block_size}): use model.block_size={checkpoint.block_size} or less",
    )
    resolved = replace(checkpoint, **overrides)
    return resolved
