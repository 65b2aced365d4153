"""A training run's parts, built once: `build_run` checks the config, starts the process group,
builds the data (once per node), the model (on the meta device, LoRA adapters added) and the
strategy that shards and fills it, and returns the `Run` that trainer/loop.py trains.

`Run.parts()` names the Stateful parts a checkpoint holds (the model first: it checks that the
checkpoint fits before anything changes).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import Checkpointer, CheckpointStore, RNGState
from trainer.config import Config, ConfigError, ModelConfig
from trainer.data import Data, Sampler, build_data
from trainer.data.prefetch import Prefetcher
from trainer.diagnostics.instruments import Instruments
from trainer.evaluation.inloop import Downstream
from trainer.loggers import Loggers, log_files
from trainer.lora.run import AdapterPart, BaseRef, add_adapters, base_place, base_reference
from trainer.model import check_attention_backend, resolve_attention_backend
from trainer.model.build import build_model
from trainer.monitor import SpikeWatch
from trainer.objectives import Objective, build_objective
from trainer.parallel import Strategy, build_strategy, parallelize
from trainer.parallel.dist import env_local_rank, env_world_size
from trainer.precision import DTYPES
from trainer.preflight import check_run, resolve_model_config
from trainer.state import TokenizerRef, TrainState

log = logging.getLogger("trainer")


@dataclass
class Run:
    """Everything one training run holds, built once by `build_run`."""

    cfg: Config
    run_dir: Path
    strategy: Strategy
    data: Data
    model_cfg: ModelConfig  # the resolved shape (a pretrained checkpoint's own, vocabulary fixed)
    accum: int  # micro-batches per step on each rank
    sampler: Sampler
    spikes: SpikeWatch
    state: TrainState
    checkpointer: Checkpointer
    tokenizer: TokenizerRef
    lora: BaseRef | None = None  # LoRA runs: the settings, the adapted modules and the base's reference
    loggers: Loggers | None = None
    batches: Prefetcher | None = None  # the train split in the sampler's order, read a step ahead
    instruments: Instruments | None = None  # diagnostics.*: noise scale, sharpness
    n_params: tuple[int, int] = (0, 0)  # (all, without embeddings), counted on the meta model
    flops_per_token: int = 0  # GPT.flops_per_token at train.seq_len, counted on the meta model
    rollbacks: tuple[str, int, int] = ("", 0, 0)  # the last rollback's checkpoint, its spiked step, how many in a row
    objective: Objective | None = None  # dpo / grpo / rloo (None: sft, the step's own token loss)
    downstream: Downstream | None = None  # eval.tasks / eval.files (None: neither)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.micro_batch_size * self.accum * self.strategy.dp_size

    @property
    def tokens_per_step(self) -> int:
        """Positions a step runs: seq_len per row (a DPO pair is two rows, a GRPO prompt num_generations)."""
        rows = {"dpo": 2, "grpo": self.cfg.objective.num_generations, "rloo": self.cfg.objective.num_generations}
        return self.global_batch * rows.get(self.cfg.objective.name, 1) * self.cfg.train.seq_len

    def parts(self, with_data: bool = True) -> dict[str, Any]:
        """The named Stateful parts of a checkpoint, the model first (it checks the checkpoint fits
        before anything changes). A rollback leaves out the sampler: the data moves on."""
        parts = {
            **self.strategy.checkpoint_parts(), "train_state": self.state, "spikes": self.spikes,
            "rng": RNGState(self.strategy.rank), "tokenizer": self.tokenizer,
        }  # fmt: skip
        if with_data:
            parts["sampler"] = self.sampler
        if self.instruments is not None:
            parts.update(self.instruments.parts())
        if self.objective is not None and self.objective.state_dict():
            parts["objective"] = self.objective  # GRPO's generations kept for objective.iterations steps
        if self.lora is not None:
            base = self.lora.base["pretrained"]
            parts["lora"] = self.lora
            parts["adapter"] = AdapterPart(self.strategy, self.model_cfg, self.lora.lora, base)
        return parts


def build_run(cfg: Config, run_dir: Path) -> Run:
    """Check the config, start the process group, then build data, model and strategy."""
    tc = cfg.train
    check_run(cfg, env_world_size(), has_gpu=torch.cuda.is_available() and tc.device != "cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info(f"run dir: {run_dir.resolve()} | {log_files(env_world_size())}")
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    set_tf32(tc.tf32)
    objective = build_objective(cfg)  # dpo / grpo / rloo: reward functions imported (or refused) before any work
    strategy = build_strategy(cfg)
    data = build_data_once_per_node(cfg, strategy)
    model_cfg = resolve_model_config(cfg.model, data.tokenizer.vocab_size)
    if cfg.parallel.tensor > 1:  # the vocabulary is known now: its padded rows must split too (every rank alike)
        from trainer.parallel.tensor import check_tensor_parallel

        check_tensor_parallel(model_cfg, cfg.parallel.tensor, tc.seq_len)
    tokenizer = save_tokenizer(data, run_dir, strategy.rank)
    downstream = Downstream.build(cfg, data.tokenizer)  # eval.*: tasks loaded (or refused) before the model
    dtype, masked = DTYPES[cfg.precision.dtype], bool(getattr(data.train, "document_mask", False))
    backend = resolve_attention_backend(model_cfg.attention_backend, strategy.device, dtype, masked, model_cfg.dropout)
    if backend != model_cfg.attention_backend:  # auto on Hopper with FA3 installed
        log.info(f"model.attention_backend=auto runs {backend} (FA3: Hopper, {cfg.precision.dtype}, no document mask)")
        model_cfg = replace(model_cfg, attention_backend=backend)
    check_attention_backend(model_cfg.attention_backend, strategy.device, dtype)
    model, weights = build_model(model_cfg, tc.seed, cfg.quant)  # on the meta device: no memory yet
    lora = None
    if cfg.lora.enabled:  # adapters before activation checkpointing and sharding
        weights, adapted, settings = add_adapters(model, weights, cfg, model_cfg)
        if settings.quantize_base:  # QLoRA (parallel=none only): NF4 base weights, quantised as they are filled
            strategy.place = base_place(model, strategy.device)
        # rank 0 hashes the base's weight files (every byte of them), the other ranks take its answer:
        # each rank reads only its shard of the weights themselves
        reference = strategy.broadcast_object(
            base_reference(model_cfg, tc.seed) if strategy.rank == 0 else None, "the LoRA base's sha256"
        )  # collective
        lora = BaseRef(reference, settings, adapted)
    # Counted on the meta model: strategies shard its parameters (ZeRO-3's hold numel 0 once partitioned)
    n_params = (model.num_params(), model.num_params(exclude_embeddings=True))
    flops_per_token = model.flops_per_token(tc.seq_len)
    checkpointed = parallelize(model, weights, cfg, strategy)
    # dropout and sampling start from the seed, whatever the init drew; tensor-parallel peers drop out their
    # own tokens and heads (sequence parallel), so each draws its own masks
    torch.manual_seed(tc.seed + 7919 * strategy.tensor_rank)
    run = Run(
        cfg, run_dir, strategy, data, model_cfg, tc.accumulation_steps(strategy.dp_size),
        data.train.sampler(tc.seed), SpikeWatch(cfg.monitor.spike.z, cfg.monitor.spike.warmup),
        TrainState(), Checkpointer(CheckpointStore(run_dir, cfg.checkpoint.keep)), tokenizer, lora,
    )  # fmt: skip
    run.n_params, run.flops_per_token = n_params, flops_per_token
    run.objective, run.downstream = objective, downstream
    if run.objective is not None:
        run.objective.setup_reference(run)  # a frozen copy for full fine-tuning (none under LoRA)
    run.instruments = Instruments(cfg, strategy, data.val)
    run.batches = Prefetcher(
        data.train, run.sampler, run.global_batch, rank=strategy.dp_rank, world_size=strategy.dp_size,
        device=strategy.device, enabled=cfg.data.prefetch,
    )  # fmt: skip
    unwrapped = strategy.unwrapped()
    log.info(data.describe())
    log.info(
        f"model: {model_cfg.name} {n_params[0] / 1e6:.2f}M params "
        f"({n_params[1] / 1e6:.2f}M without embeddings) | parallel={strategy.name} "
        f"on {strategy.world_size} rank(s)"
        + (f", mesh {mesh}" if (mesh := strategy.describe_mesh()) else "")
        + f", device {strategy.device}, {cfg.precision.dtype} | global batch "
        f"{run.global_batch} {batch_unit(cfg)} = {tc.micro_batch_size} micro x {run.accum} accum x {strategy.dp_size} "
        f"{'data-parallel ranks' if strategy.dp_size != strategy.world_size else 'ranks'} = {run.tokens_per_step:,} tokens/step"
        + (f" | activation checkpointing: {checkpointed} modules" if checkpointed else "")
        + (f" | torch.compile: {len(unwrapped.blocks)} blocks" if tc.compile else "")
    )
    if lora is not None:
        log.info(describe_lora(run))
    return run


def batch_unit(cfg: Config) -> str:
    """What train.micro_batch_size counts under cfg.objective (a DPO pair is two rows)."""
    o = cfg.objective
    if o.name in ("grpo", "rloo"):
        return f"prompts (x{o.num_generations} completions)"
    return "pairs" if o.name == "dpo" else "sequences"


def describe_lora(run: Run) -> str:
    """Trainable vs total parameters and the adapted modules (HF names), for the log."""
    settings, model = run.lora.lora, run.strategy.unwrapped()
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 partitions: the full size)
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    kind = "DoRA" if settings.dora else "LoRA"
    modules = adapted_summary(run.lora.adapted)
    return (
        f"{kind} r={settings.r} alpha={settings.alpha}{' (rsLoRA)' if settings.rslora else ''}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%), base frozen in "
        f"{'NF4 (QLoRA)' if settings.quantize_base else settings.base_dtype}; adapted: {modules}"
    )


def set_tf32(enabled: bool) -> None:
    """fp32 matmuls (and cuDNN convolutions) on TF32 tensor cores, or in full fp32 (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def build_data_once_per_node(cfg: Config, strategy: Strategy) -> Data:
    """The data, tokenized (and a BPE trained) once per node: local rank 0 builds the cache while the
    node's other ranks wait, then they open what it built. A ConfigError on any rank stops every
    rank with the same line."""
    build = lambda: build_data(  # noqa: E731
        cfg.data, cfg.train.seq_len, cfg.train.seed, rank=strategy.rank, pretrained=cfg.model.pretrained,
        val_samples=cfg.train.micro_batch_size * cfg.train.eval_batches,
        completion_room=cfg.objective.max_new_tokens if cfg.objective.name in ("grpo", "rloo") else 0,
    )  # fmt: skip
    data, error = None, None
    if env_local_rank() == 0:
        try:
            data = build()
        except ConfigError as failure:
            error = str(failure)
    error = strategy.first_error(error)  # collective: also the barrier the other ranks wait at
    if error is not None:
        raise ConfigError(error)
    return data if data is not None else build()  # a cache hit on the other ranks


TOKENIZER_DIR = "tokenizer"  # inside the run dir


def save_tokenizer(data: Data, run_dir: Path, rank: int) -> TokenizerRef:
    """Save a Hugging Face tokenizer into the run dir (rank 0; export and generate read it there)
    and return the reference checkpoints keep. A run dir that already holds another tokenizer is
    refused and left as it is."""
    tokenizer = data.tokenizer
    if not hasattr(tokenizer, "save"):  # byte / identity: nothing to save, the name says it all
        return TokenizerRef(None, tokenizer.fingerprint())
    directory = run_dir / TOKENIZER_DIR
    stamp = directory / "fingerprint.txt"
    if stamp.exists() and stamp.read_text().strip() != tokenizer.fingerprint():
        raise ConfigError(
            f"{directory} holds another tokenizer than this run's ({stamp.read_text().strip()}): keep the run's "
            "data.tokenizer / model.pretrained, or choose another hydra.run.dir"
        )
    if rank == 0 and not stamp.exists():
        tmp = run_dir / f"{TOKENIZER_DIR}.tmp"
        tokenizer.save(tmp)
        (tmp / "fingerprint.txt").write_text(tokenizer.fingerprint() + "\n")
        os.replace(tmp, directory)
    return TokenizerRef(TOKENIZER_DIR, tokenizer.fingerprint())


def adapted_summary(names: list[str]) -> str:
    """The adapted modules (HF names) in a line: each per-layer name once, with the layers it is in
    ("model.layers.{0-31}.self_attn.q_proj, ...")."""
    by_layer: dict[str, set[int]] = {}
    for name in names:
        match = re.match(r"(.*?\.(?:layers|h))\.(\d+)\.(.*)", name)
        if match is None:
            by_layer.setdefault(name, set())
        else:
            by_layer.setdefault(f"{match[1]}.{{}}.{match[3]}", set()).add(int(match[2]))
    parts = []
    for pattern, layers in by_layer.items():
        ordered = sorted(layers)
        if not ordered:
            parts.append(pattern)
            continue
        contiguous = len(ordered) > 1 and ordered == list(range(ordered[0], ordered[-1] + 1))
        span = f"{ordered[0]}-{ordered[-1]}" if contiguous else ",".join(map(str, ordered))
        parts.append(pattern.format("{" + span + "}"))
    return f"{len(names)} modules: " + ", ".join(parts)
