"""The training loop: the one place that knows the order of things. Read it top to bottom.

    for each step: draw the global batch -> k micro-batches (forward, backward; no gradient
    all-reduce until the last) -> per-group gradient sums of squares -> clip -> step -> log
    -> evaluate / checkpoint every N

The loss of a step is the sum of token losses over the whole global batch divided by the
number of target tokens in it, so accumulation over micro-batches (and ranks) with unequal
token counts gives exactly the gradient of one big batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from trainer.checkpoint import Checkpointer, save_weights, step_dir_name
from trainer.config import Config, ConfigError, ModelConfig
from trainer.data import Sampler, build_data, shard_for_rank
from trainer.loggers import Loggers
from trainer.model import GPT, check_attention_backend, load_hf_config, load_pretrained
from trainer.model.checkpointing import apply_activation_checkpointing, unwrapped_name
from trainer.model.loss import IGNORE_INDEX
from trainer.monitor import SpikeWatch, group_norms, peak_flops, peak_memory_gb
from trainer.parallel import build_strategy, global_norm
from trainer.precision import DTYPES

log = logging.getLogger("trainer")


def resolve_model_config(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """The model's shape with its vocabulary fixed: a derived copy, the run config is untouched."""
    if cfg.pretrained:
        pretrained = load_hf_config(cfg.pretrained)
        cfg = dataclasses.replace(
            pretrained, pretrained=cfg.pretrained, dropout=cfg.dropout, attention_backend=cfg.attention_backend,
            activation_checkpointing=cfg.activation_checkpointing,
            activation_checkpointing_every=cfg.activation_checkpointing_every, loss_chunk_size=cfg.loss_chunk_size,
        )
    if cfg.vocab_size is None:
        return dataclasses.replace(cfg, vocab_size=64 * math.ceil(tokenizer_vocab / 64))
    if tokenizer_vocab > cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer's vocabulary ({tokenizer_vocab}) exceeds model.vocab_size={cfg.vocab_size}: "
            f"set model.vocab_size={tokenizer_vocab} or larger (or null), or use a smaller data.tokenizer"
        )
    return cfg


def split_micro_batches(x: torch.Tensor, y: torch.Tensor, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the global batch, as k micro-batches of equal size."""
    return list(zip(x.chunk(k), y.chunk(k), strict=True))


def forward_backward(
    strategy: Any, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, accum_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's batch in accum_steps micro-batches.

    Each micro-batch's summed token loss is divided by the number of target tokens in the
    whole global batch (every micro-batch, every rank), so the accumulated gradient equals
    the gradient of the mean token loss over the global batch, whatever each micro-batch's
    token count. Returns (this rank's summed token loss, global target count), on device.
    """
    n_targets = strategy.all_reduce_sum((y != IGNORE_INDEX).sum().to(torch.float32))  # collective
    loss_sum = torch.zeros((), device=x.device)
    for i, (xb, yb) in enumerate(split_micro_batches(x, y, accum_steps)):
        with strategy.micro_step(is_last=i == accum_steps - 1):
            token_loss = model(xb, targets=yb)  # summed over this micro-batch's target tokens
            strategy.backward(token_loss / n_targets)
        loss_sum += token_loss.detach()
    return loss_sum, n_targets


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Any, batch_size: int, batches: int, device: torch.device) -> float:
    """Mean token loss over the first `batches` validation batches (a fixed, deterministic set)."""
    model.eval()
    total = torch.zeros((), device=device)
    count = 0
    n = min(len(split), batch_size * batches)
    for start in range(0, n, batch_size):
        x, y = split.get_batch(np.arange(start, min(start + batch_size, n)))
        x, y = x.to(device), y.to(device)
        total += model(x, targets=y)
        count += int((y != IGNORE_INDEX).sum())
    model.train()
    return total.item() / max(count, 1)  # host sync: once per evaluation


def train(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Run cfg.train.max_steps optimizer steps; return the last logged metrics."""
    tc = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    strategy = build_strategy(cfg)
    rank, world, device = strategy.rank, strategy.world_size, strategy.device
    torch.manual_seed(tc.seed)

    # -- data and model ------------------------------------------------------------------------
    data = build_data(cfg.data, tc.seq_len, tc.seed, rank=rank)
    model_cfg = resolve_model_config(cfg.model, data.tokenizer.vocab_size)
    if tc.seq_len > model_cfg.block_size:
        raise ConfigError(
            f"train.seq_len={tc.seq_len} exceeds the model's context ({model_cfg.block_size}): lower train.seq_len"
        )
    if model_cfg.pretrained:
        model = load_pretrained(
            model_cfg.pretrained, dropout=model_cfg.dropout, attention_backend=model_cfg.attention_backend
        )
    else:
        model = GPT(model_cfg)
    n_params, n_body = model.num_params(), model.num_params(exclude_embeddings=True)
    compute_dtype = DTYPES[cfg.precision.dtype]
    check_attention_backend(model_cfg.attention_backend, device, compute_dtype)
    # Order matters (as in torchtitan): activation checkpointing wraps blocks first, then the
    # strategy shards / wraps the model.
    checkpointed = apply_activation_checkpointing(model, model_cfg)
    accum = tc.accumulation_steps(world)
    strategy.setup(model, cfg.optim, tc.max_steps, accum)

    global_batch = tc.micro_batch_size * accum * world
    tokens_per_step = global_batch * tc.seq_len
    log.info(data.describe())
    log.info(
        f"model: {model_cfg.name} {n_params / 1e6:.2f}M params ({n_body / 1e6:.2f}M without embeddings) | "
        f"parallel={strategy.name} on {world} rank(s), device {device}, {cfg.precision.dtype} | global batch {global_batch} sequences = "
        f"{tc.micro_batch_size} micro x {accum} accum x {world} ranks = {tokens_per_step:,} tokens/step"
        + (f" | activation checkpointing: {checkpointed} modules" if checkpointed else "")
    )
    # -- resume: model, optimizer, schedule, sampler, scaler, RNG from the newest valid checkpoint
    sampler = Sampler(len(data.train), tc.seed)
    spikes = SpikeWatch(cfg.monitor.spike.z, cfg.monitor.spike.warmup)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep, strategy)
    shapes = {unwrapped_name(name): list(p.shape) for name, p in strategy.unwrapped().named_parameters()}
    step, tokens_seen, wandb_id = 0, 0, None

    def restore(path: Path, with_data: bool) -> dict[str, Any]:
        """Load a checkpoint into every part of the run. with_data=False is a rollback: the sampler
        stays where it is (the data that caused the spike is skipped) and the log keeps its
        history (the steps after the checkpoint are run again and logged again)."""
        meta = checkpointer.load(path, shapes)  # collective
        if with_data:
            sampler.load_state_dict(meta["sampler"])
        strategy.scheduler.load_state_dict(meta["scheduler"])
        strategy.skipped_steps = meta["skipped_steps"]
        if strategy.scaler is not None and meta.get("loss_scaler"):
            strategy.scaler.load_state_dict(meta["loss_scaler"])
        if meta.get("spikes"):
            spikes.load_state_dict(meta["spikes"])
        if rank == 0 and with_data:
            truncate_metrics(run_dir / "metrics.jsonl", meta["step"])
        return meta

    resume_from = checkpointer.find(tc.resume, warn=log.warning) if rank == 0 else None
    resume_from = strategy.broadcast_path(resume_from)  # collective: every rank loads the same one
    if resume_from is not None:
        meta = restore(resume_from, with_data=True)
        step, tokens_seen, wandb_id = meta["step"], meta["tokens"], meta.get("wandb_id")
        log.info(f"resumed from {resume_from} at step {step}")

    run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    loggers = Loggers(cfg.logger, run_dir, run_config, tc.max_steps, step, enabled=rank == 0, run_id=wandb_id)

    def save(at_step: int) -> Path:
        meta = {
            "step": at_step, "tokens": tokens_seen, "sampler": sampler.state_dict(),
            "scheduler": strategy.scheduler.state_dict(), "skipped_steps": strategy.skipped_steps,
            "loss_scaler": strategy.scaler.state_dict() if strategy.scaler is not None else None,
            "spikes": spikes.state_dict(), "wandb_id": loggers.run_id, "world_size": world,
            "strategy": strategy.name, "shapes": shapes,
            "model": dataclasses.asdict(model_cfg),  # the resolved shape, for python -m trainer.export
        }
        return checkpointer.save(at_step, meta, async_save=cfg.checkpoint.async_save)  # collective

    model = strategy.model
    monitor_interval = cfg.monitor.interval or tc.log_interval
    flops_per_token = strategy.unwrapped().flops_per_token(tc.seq_len)
    peak = peak_flops(device, cfg.monitor.peak_flops) * world
    metrics: dict[str, Any] = {}
    consecutive_skips = 0
    window = {"start": time.perf_counter(), "tokens": 0, "data": 0.0, "compute": 0.0, "optimizer": 0.0, "steps": 0}

    while step < tc.max_steps:
        # -- this rank's share of the global batch, split into micro-batches -------------------
        t0 = time.perf_counter()
        indices = sampler.next_global_batch(global_batch)
        x, y = data.train.get_batch(shard_for_rank(indices, rank, world))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        t1 = time.perf_counter()
        loss_sum, n_targets = forward_backward(strategy, model, x, y, accum)

        # -- unscale, gradient statistics, spike check --------------------------------------------
        strategy.unscale_gradients()
        grad_sumsq = strategy.grad_sumsq_by_group()  # reduced across ranks by the strategy
        grad_norm = global_norm(grad_sumsq)
        step_loss = strategy.all_reduce_sum(loss_sum) / n_targets  # collective
        loss_value, norm_value = torch.stack([step_loss, grad_norm.to(step_loss)]).tolist()  # host sync
        t2 = time.perf_counter()
        spiked, spike_metrics = spikes.check(loss_value, norm_value)
        act = spiked and cfg.monitor.spike.action != "log"

        # -- clip, step (or skip: a spike under skip / rollback, or inf / NaN gradients) ----------
        monitored = (step + 1) % monitor_interval == 0
        before = strategy.snapshot_params() if monitored and not act else None
        lr = strategy.scheduler.get_last_lr()[0]
        if act:
            strategy.skip_step()
            stepped = False
        else:
            stepped = strategy.clip_and_step(grad_norm, cfg.optim.clip_grad_norm)
            consecutive_skips = 0 if stepped else consecutive_skips + 1
        if consecutive_skips >= tc.max_consecutive_skips:
            last_good = checkpointer.complete()[0] if checkpointer.complete() else "none"
            raise TrainingError(
                f"stopping at step {step + 1}: {consecutive_skips} steps in a row had inf / NaN gradients "
                f"(last good checkpoint: {last_good}); lower optim.lr or check the data"
            )
        t3 = time.perf_counter()
        step += 1
        tokens_seen += tokens_per_step
        for key, value in (("tokens", tokens_per_step), ("data", t1 - t0), ("compute", t2 - t1),
                           ("optimizer", t3 - t2), ("steps", 1)):
            window[key] += value

        # -- log -------------------------------------------------------------------------------
        last = step == tc.max_steps
        if step % tc.log_interval == 0 or last or monitored or spiked:
            elapsed = time.perf_counter() - window["start"]
            clip = cfg.optim.clip_grad_norm
            coef = min(1.0, clip / (norm_value + 1e-6)) if clip > 0 else 1.0
            metrics = {
                "step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                "grad_norm_clipped": norm_value * coef, "clip_coef": coef,
                "tokens_per_s": window["tokens"] / elapsed, "tokens": tokens_seen, "global_batch": global_batch,
                "skipped_steps": strategy.skipped_steps, "spike/count": spikes.count,
                "throughput/tokens_per_s": window["tokens"] / elapsed,
                "throughput/mfu": flops_per_token * window["tokens"] / elapsed / peak if peak else 0.0,
                "throughput/step_time_s": elapsed / window["steps"],
                "throughput/data_time_s": window["data"] / window["steps"],
                "throughput/compute_time_s": window["compute"] / window["steps"],
                "throughput/optimizer_time_s": window["optimizer"] / window["steps"],
                "memory/peak_gb": peak_memory_gb(device),
            }
            if strategy.loss_scale() is not None:
                metrics["loss_scale"] = strategy.loss_scale()
            if monitored:
                metrics.update(group_norms("grad_norm", grad_sumsq))
                params = group_norms("param_norm", strategy.param_sumsq_by_group())
                metrics.update(params)
                if before is not None and stepped:
                    updates = group_norms("update_ratio", strategy.update_sumsq_by_group(before))
                    for key, value in updates.items():
                        metrics[key] = value / max(params["param_norm/" + key.split("/", 1)[1]], 1e-12)
            if spiked:
                metrics.update(spike_metrics, **{"spike/action": cfg.monitor.spike.action})
                loggers.alert(f"spike at step {step}", json.dumps({k: v for k, v in spike_metrics.items()}))
            if step % tc.eval_interval == 0 or last:
                metrics["val_loss"] = evaluate(model, data.val, tc.micro_batch_size, tc.eval_batches, device)
            loggers.log(metrics)
            if step % tc.log_interval == 0 or last or spiked:
                loggers.write(console_line(metrics))
            window = {"start": time.perf_counter(), "tokens": 0, "data": 0.0, "compute": 0.0, "optimizer": 0.0,
                      "steps": 0}
        loggers.advance(1, loss=loss_value)

        if spiked and cfg.monitor.spike.action == "rollback":
            checkpointer.wait()  # collective: a checkpoint still being written is committed first
            good = checkpointer.find("auto", warn=log.warning) if rank == 0 else None
            good = strategy.broadcast_path(good)  # collective
            if good is None:
                raise TrainingError(f"spike at step {step} and no checkpoint to roll back to")
            meta = restore(good, with_data=False)
            log.warning(f"spike at step {step}: rolled back to {good.name}, skipping the data since then")
            step, tokens_seen = meta["step"], meta["tokens"]
            continue
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and not last:
            save(step)

    # -- the end: a checkpoint, consolidated weights, a sample, where everything is ---------------
    if not checkpointer.complete() or checkpointer.complete()[0].name != step_dir_name(tc.max_steps):
        save(tc.max_steps)
    checkpointer.wait()  # collective: commit a checkpoint still being written in the background
    weights = strategy.full_state_dict()  # collective: gathers shards; whole only on rank 0
    if rank == 0:
        save_weights(run_dir / "checkpoints" / "final", weights)
    loggers.close()
    if tc.sample_tokens > 0:  # every rank generates: sharded models need all ranks in forward
        text = sample(strategy.unwrapped(), data.tokenizer, tc.sample_prompt, tc.sample_tokens, tc.seed)
        log.info("sample:\n" + text)
    log.info(f"run dir: {run_dir.resolve()}")
    strategy.close()
    return metrics


def console_line(metrics: dict[str, Any]) -> str:
    """The headline figures of a logged step, for the console."""
    keys = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "skipped_steps", "loss_scale")
    parts = [f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}" for k in keys if k in metrics]
    if metrics.get("spike/loss") or metrics.get("spike/grad_norm"):
        parts.append(f"SPIKE ({metrics['spike/action']})")
    return " | ".join(parts)


class TrainingError(RuntimeError):
    """Training cannot go on (its message is one line for the user)."""


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop logged rows past the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(row + "\n" for row in rows))
    os.replace(tmp, path)


def sample(model: torch.nn.Module, tokenizer: Any, prompt: str, n_tokens: int, seed: int) -> str:
    """A short continuation of prompt (temperature 0.8, top-k 50), seeded for repeatability."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        torch.tensor([ids], device=device), n_tokens, temperature=0.8, top_k=50, generator=generator
    )
    return tokenizer.decode(out[0].tolist())
