"""The training loop: the one place that knows the order of things. Read it top to bottom.

    train():      build the run -> resume -> for each step: batch -> train_step -> count -> log
                  -> callbacks -> rollback / checkpoint when due -> the end (checkpoint, weights, sample)
    build_run():  trainer/run.py, the run's parts (data, model, strategy, checkpointer) in one `Run`
    train_step(): trainer/step.py, the only copy of the step (tests and benchmarks call it too)

Each component decides its own cadence (`due`): logging, monitor statistics, evaluation,
checkpoints. A step none of them reads runs deferred (`can_defer`: no host sync, the host runs
ahead to the next batch) and is read back and accounted for at the next step that syncs (`settle`).
Everything the run holds is in one `Run`; its checkpointed state is the dict of named parts
`Run.parts()` returns.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import OmegaConf

from trainer.checkpoint import save_weights, step_dir_name
from trainer.config import Config
from trainer.loggers import Loggers, human, human_bytes, human_duration
from trainer.lora.run import write_adapter
from trainer.moe_monitor import ExpertWatch
from trainer.monitor import Throughput, mfu_peak, peak_memory_gb, step_metrics
from trainer.preemption import Preemption
from trainer.run import Run, build_run
from trainer.step import StepResult, evaluate, train_step

log = logging.getLogger("trainer")


class Callback(Protocol):
    """Observes a run (benchmarks, tools) without touching the loop's code."""

    def on_step_end(self, run: Run, result: StepResult, metrics: dict[str, Any] | None) -> bool | None:
        """After each step and its log (metrics: what was logged, or None). True stops the run
        there: no final checkpoint, weights or sample."""


def train(cfg: Config, run_dir: Path, callbacks: tuple[Callback, ...] = ()) -> dict[str, Any]:
    """Run cfg.train.max_steps optimizer steps; return the last logged metrics. Stopped by a signal
    (train.preemption_signals): raises Preempted (exit code 75) once that step is saved."""
    tc = cfg.train
    preemption = Preemption(tc.preemption_signals).install()  # before building: a signal then counts too
    run = build_run(cfg, run_dir)
    resume(run)
    if run.objective is not None:  # DPO's precomputed reference: after resume, before the first step
        run.objective.before_training(run)
    experts = ExpertWatch.of(run.strategy.unwrapped(), cfg.monitor.moe_collapse_share)  # None: no sparse blocks
    # CPU: measured once per machine and cached; before start_loggers' barrier, so every rank's clock starts after it
    peak = mfu_peak(run.strategy.device, cfg.monitor.peak_flops)
    log.info(f"MFU peak: {peak}")
    run.loggers = start_loggers(run)
    state = run.state
    meter = Throughput(
        run.flops_per_token,
        peak,
        run.strategy.world_size,
        run.strategy.device,
    )
    metrics: dict[str, Any] = {}
    first_step = state.step + 1
    deferred: list[tuple[int, StepResult, float]] = []  # steps run without a host sync, not read back yet
    while state.step < tc.max_steps:
        if (stop := preemption.agreed(run.strategy, state.step)) is not None:  # collective: see preemption.py
            settle(run, deferred, meter)
            saved = save_last(run) if state.step > 0 else None  # collective; step 0: a restart starts afresh
            close(run)
            raise preemption.exit(stop, saved, first_step)
        started = time.perf_counter()
        x = y = positions = batch = None
        if run.objective is not None:  # read, or produced by a rollout (generation and rewards: GRPO)
            batch = run.objective.batch(run)
        else:
            x, y, positions = next_batch(run)
        data_s = time.perf_counter() - started
        defer = can_defer(run, state.step + 1, first_step, callbacks)
        if not defer:
            settle(run, deferred, meter)  # the deferred steps before this one, in order
        result = train_step(
            run.strategy, x, y, run.accum, cfg.optim.clip_grad_norm, spikes=run.spikes,
            spike_action=cfg.monitor.spike.action, stats=due(state.step + 1, cfg.monitor.interval or tc.log_interval),
            positions=positions, defer=defer, all_targets=run.data.train.all_targets,
            noise_probe=run.instruments.probe_first_micro_batch, experts=experts, objective=run.objective, batch=batch,
        )  # fmt: skip
        if defer:  # nothing reads this step's figures now: the host runs ahead to the next batch
            state.advance(run.tokens_per_step)
            deferred.append((state.step, result, data_s))
            run.loggers.advance(1)
            continue
        state.record(run.tokens_per_step, result.target_tokens, result.stepped, result.non_finite)
        check_skips(run)
        check_targets(run, result)
        run.instruments.after_step(result, state.step, result.lr, run.tokens_per_step)
        # (not for sampled objectives: a batch whose rewards are all equal rightly moves nothing)
        if run.lora is not None and state.step == min(2, tc.max_steps) and cfg.objective.name in ("sft", "dpo"):
            check_adapters_learn(run)
        if tc.compile and state.step == first_step:  # dynamo traces and inductor compiles in the first step
            log.info(f"torch.compile: the first step took {time.perf_counter() - started:.1f} s, compiling included")
        meter.add(run.tokens_per_step, result.target_tokens, data_s, result.timings)
        logged = log_step(run, result, meter) if should_log(run, result) else None
        metrics = logged or metrics
        run.loggers.advance(1, loss=result.loss)
        if any([callback.on_step_end(run, result, logged) for callback in callbacks]):
            log.info(f"stopped at step {state.step} by a callback")
            close(run)
            preemption.restore()
            return metrics
        if result.spiked and cfg.monitor.spike.action == "rollback":
            rollback(run)
        elif due(state.step, cfg.checkpoint.interval) and state.step < tc.max_steps:
            save(run)
    finish(run)
    preemption.finished(state.step)
    return metrics


def resume(run: Run) -> None:
    """Continue from the checkpoint train.resume names (none, auto, a path): every part. Says which,
    or why the run starts fresh."""
    setting = run.cfg.train.resume
    found = run.checkpointer.store.find(setting, warn=log.warning) if run.strategy.rank == 0 else None
    found = run.strategy.broadcast_path(found)  # collective: every rank loads the same one
    if found is None:
        why = "" if setting == "none" else f" no checkpoint in {run.checkpointer.store.root.resolve()}:"
        log.info(f"train.resume={setting}:{why} starting fresh")
        return
    run.checkpointer.load(found, run.parts())  # collective
    if run.strategy.rank == 0:
        truncate_metrics(run.run_dir / "metrics.jsonl", run.state.step)
    log.info(f"resumed from {found} at step {run.state.step} (train.resume={setting})")


def start_loggers(run: Run) -> Loggers:
    """metrics.jsonl, wandb (the same run again after a resume), TensorBoard and the progress bar on
    rank 0, each saying where it writes; console lines (`Loggers.write`) on every rank."""
    config = OmegaConf.to_container(OmegaConf.structured(run.cfg), resolve=True)
    loggers = Loggers(
        run.cfg.logger, run.run_dir, config, run.cfg.train.max_steps, run.state.step,
        enabled=run.strategy.rank == 0, run_id=run.state.logger_run_id,
    )  # fmt: skip
    run.state.logger_run_id = loggers.run_id
    run.strategy.barrier()  # collective: no rank's clock (tokens/s, elapsed, ETA) runs while rank 0 starts wandb
    loggers.started = time.time()
    return loggers


def next_batch(run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's share of the next global batch, on its device: inputs, targets and, for packed
    examples with document masking, each token's position in its example (else None). With
    data.prefetch it was read (and pinned, on CUDA) on a background thread during the last step."""
    return run.batches.next()


def can_defer(run: Run, step: int, first_step: int, callbacks: tuple[Callback, ...]) -> bool:
    """Whether `step` may run without a host sync (train_step's defer): the strategy can, spikes are
    only logged (skip / rollback must act on the step itself), and nothing reads this step's figures
    when it ends: no log row, evaluation, statistics, checkpoint or callback, not the first step
    (compile time), the last, or LoRA's check after step 2."""
    cfg, tc = run.cfg, run.cfg.train
    if callbacks or cfg.monitor.spike.action != "log" or not run.strategy.steps_without_sync:
        return False
    if run.objective is not None:  # its figures (rewards, kl) are read every step
        return False
    if run.instruments.probe_first_micro_batch:  # the noise scale reads every step's norms
        return False
    sharpness = cfg.diagnostics.sharpness.interval if cfg.diagnostics.sharpness.enabled else 0
    intervals = (tc.log_interval, tc.eval_interval, cfg.monitor.interval or tc.log_interval, cfg.checkpoint.interval)
    intervals += (sharpness, run.downstream.interval if run.downstream is not None else 0)
    special = {first_step, tc.max_steps} | ({min(2, tc.max_steps)} if run.lora is not None else set())
    return step not in special and not any(due(step, interval) for interval in intervals)


def settle(run: Run, deferred: list[tuple[int, StepResult, float]], meter: Throughput) -> None:
    """Read back the deferred steps, oldest first (their copies finished long ago: no stall), and
    account for them as for a synchronous step: counters, the skip and target checks, throughput,
    spike checks (each spike gets its row, up to log_interval steps after it happened)."""
    for step, result, data_s in deferred:
        result.settle(run.spikes)
        run.state.count(result.target_tokens, result.stepped, result.non_finite)
        check_skips(run)
        check_targets(run, result)
        meter.add(run.tokens_per_step, result.target_tokens, data_s, result.timings)
        if result.spiked:
            log_step(run, result, None, step)
    deferred.clear()


def due(step: int, interval: int) -> bool:
    """Whether something done every `interval` steps (0: never) is due at `step`."""
    return interval > 0 and step % interval == 0


def should_log(run: Run, result: StepResult) -> bool:
    tc, step = run.cfg.train, run.state.step
    measured = run.instruments is not None and run.instruments.sharpness_step == step
    downstream = run.downstream is not None and run.downstream.due(step, tc.max_steps)
    return (
        due(step, tc.log_interval) or step == tc.max_steps or bool(result.param_sumsq) or result.spiked or measured
        or downstream
    )  # fmt: skip


def check_skips(run: Run) -> None:
    """Stop when too many steps in a row had inf / NaN gradients: the run is not going to recover."""
    state, limit = run.state, run.cfg.train.max_consecutive_skips
    if state.consecutive_skips >= limit:
        last_good = run.checkpointer.store.latest()
        raise TrainingError(
            f"stopping at step {state.step}: {state.consecutive_skips} steps in a row had inf / NaN gradients "
            f"(last good checkpoint: {last_good.name if last_good else 'none'}); lower optim.lr or check the data"
        )


def check_targets(run: Run, result: StepResult) -> None:
    """A global batch whose every label is masked teaches nothing (its loss is 0 / 0): stop."""
    if result.target_tokens == 0:
        raise TrainingError(
            f"step {run.state.step}: every label of the global batch is masked (no response / assistant token "
            "to learn): check data.train_on_prompt, data.format and train.seq_len against the examples' lengths"
        )


def check_adapters_learn(run: Run) -> None:
    """After the first steps, name every adapter whose lora_B is still exactly zero: its gradient
    was exactly zero, so nothing reaches it (a frozen path, a detached input) and it will never learn."""
    adapters = run.strategy.full_state_dict(trainable_only=True)  # collective: gathers the adapters
    if run.strategy.rank != 0:
        return
    stuck = sorted(name for name, tensor in adapters.items() if ".lora_B." in name and not tensor.any())
    if stuck:
        listed = ", ".join(stuck[:5]) + (f", ... ({len(stuck)} in all)" if len(stuck) > 5 else "")
        log.warning(f"after {run.state.step} steps these adapters' lora_B is still exactly zero (no gradient "
                    f"reaches them, they are not learning): {listed}")  # fmt: skip


def log_step(run: Run, result: StepResult, meter: Throughput | None, step: int | None = None) -> dict[str, Any]:
    """One row of metrics.jsonl / wandb (and, at its cadence, the evaluation and a console line).
    step: an earlier, deferred step's row (a spike found when it was read back; no throughput)."""
    cfg, state, strategy = run.cfg, run.state, run.strategy
    step = state.step if step is None else step
    metrics = {
        "step": step, **step_metrics(result, cfg.optim.clip_grad_norm),
        "tokens": state.tokens - (state.step - step) * run.tokens_per_step, "target_tokens": state.target_tokens,
        "global_batch": run.global_batch, "skipped_steps": state.skipped_steps, "spike/count": run.spikes.count,
        **(meter.metrics() if meter is not None else {}), "memory/peak_gb": peak_memory_gb(strategy.device),
        **(run.instruments.metrics(step) if run.instruments is not None and step == state.step else {}),
        **({f"data/tokens/{name}": n for name, n in run.sampler.tokens_drawn().items()}  # data=shards: per source
           if hasattr(run.sampler, "tokens_drawn") and step == state.step else {}),
    }  # fmt: skip
    if (scale := strategy.loss_scale()) is not None:
        metrics["loss_scale"] = scale
    metrics.update(result.objective)
    if result.spiked:
        metrics.update(result.spike, **{"spike/action": cfg.monitor.spike.action})
        run.loggers.alert(f"spike at step {step}", json.dumps(result.spike))
    if result.expert_load is not None:  # collective: the step's expert load summed over ranks
        moe, collapse = result.expert_load.metrics(strategy, step, shares=bool(result.param_sumsq))
        metrics.update(moe)
        if collapse:
            log.warning(collapse)
            run.loggers.alert(f"expert collapse at step {step}", collapse)
    if step == state.step and (due(step, cfg.train.eval_interval) or step == cfg.train.max_steps):
        tc = cfg.train
        if run.objective is not None:  # collective: the objective's own validation figures
            metrics.update(run.objective.evaluate(run))
        else:
            metrics["val_loss"] = evaluate(
                strategy.model, run.data.val, tc.micro_batch_size, tc.eval_batches, strategy.device, strategy.autocast()
            )
    if step == state.step and run.downstream is not None and run.downstream.due(step, cfg.train.max_steps):
        metrics.update(run.downstream.evaluate(run))  # collective: eval.tasks and eval.files, with eval/time_s
    run.loggers.log(metrics)
    if due(step, cfg.train.log_interval) or step == cfg.train.max_steps or result.spiked:
        run.loggers.write(console_line(metrics, cfg.train.max_steps, *run.loggers.timing(step, cfg.train.max_steps)))
    if "eval/time_s" in metrics:
        run.loggers.write(eval_line(step, metrics))
    if meter is not None:
        meter.reset()
    return metrics


def rollback(run: Run) -> None:
    """After a spike under monitor.spike.action=rollback: back to the newest good checkpoint,
    every part but the sampler, so the data that caused the spike is skipped. The log keeps its
    history: the steps after the checkpoint are run and logged again."""
    spiked_at = run.state.step
    run.checkpointer.wait()  # collective: a checkpoint still being written is committed first
    good = run.checkpointer.store.find("auto", warn=log.warning) if run.strategy.rank == 0 else None
    good = run.strategy.broadcast_path(good)  # collective
    if good is None:
        raise TrainingError(f"spike at step {spiked_at} and no checkpoint to roll back to")
    # In a row: to the same checkpoint, never getting past the last spike. Kept on the Run, in no
    # checkpoint part (a rollback restores those), so the count survives its own rollbacks.
    last, last_spike, count = run.rollbacks
    in_a_row = count + 1 if last == good.name and spiked_at <= last_spike else 1
    limit = run.cfg.monitor.spike.max_rollbacks
    if in_a_row > limit:
        raise TrainingError(
            f"spike at step {spiked_at} again after {limit} rollbacks in a row to {good.name} (fresh data each "
            "time): the model, not the data, is unstable there; lower optim.lr, or raise monitor.spike.z"
        )
    run.rollbacks = (good.name, spiked_at, in_a_row)
    run.checkpointer.load(good, run.parts(with_data=False))  # collective
    log.warning(f"spike at step {spiked_at}: rolled back to {good.name}, skipping the data since then")


def save(run: Run) -> Path:
    """Checkpoint every part at the current step (collective)."""
    return run.checkpointer.save(run.state.step, run.parts(), async_save=run.cfg.checkpoint.async_save)


def finish(run: Run) -> None:
    """The end: a checkpoint of the last step, consolidated weights, a sample, where everything is."""
    save_last(run)  # collective
    final = run.run_dir / "checkpoints" / "final"
    if run.lora is not None:  # the adapters alone, in PEFT's format (the base is model.pretrained)
        adapters = run.strategy.full_state_dict(trainable_only=True)  # collective
        if run.strategy.rank == 0:
            write_adapter(final / "adapter", adapters, run.model_cfg, run.lora.lora, run.lora.base["pretrained"])
    else:
        weights = run.strategy.full_state_dict()  # collective: gathers shards; whole only on rank 0
        if run.strategy.rank == 0:
            save_weights(final, weights)
    tc = run.cfg.train
    if tc.sample_tokens > 0:  # every rank generates: sharded models need all ranks in forward
        with run.strategy.autocast():  # the training precision (a bf16 frozen base needs it)
            text = sample(run.strategy.unwrapped(), run.data.tokenizer, tc.sample_prompt, tc.sample_tokens, tc.seed)
        log.info("sample:\n" + text)
    log.info(f"run dir: {run.run_dir.resolve()}")
    close(run)


def save_last(run: Run) -> tuple[Path, bool]:
    """A committed checkpoint of the current step (collective): (its path, whether it was written
    now rather than already there). A save still in flight is committed before `latest` is read, so
    every rank reads the same one."""
    run.checkpointer.wait()  # collective
    latest = run.checkpointer.store.latest()
    if latest is not None and latest.name == step_dir_name(run.state.step):
        return latest, False
    path = save(run)
    run.checkpointer.wait()  # collective: commit a checkpoint still being written in the background
    return path, True


def close(run: Run) -> None:
    run.batches.close()
    run.checkpointer.wait()  # collective
    run.loggers.close()
    run.strategy.close()


def console_line(metrics: dict[str, Any], max_steps: int, elapsed_s: float, eta_s: float | None) -> str:
    """A logged step for the console and every rank's log file: the headline figures, tokens/s (all and
    target tokens) in readable units, MFU, this rank's peak memory, the wall-clock time, the time since
    the start and the ETA (None: not known yet)."""
    keys = ("loss", "val_loss", "lr", "grad_norm", "loss_scale")
    parts = [f"step {metrics['step']}/{max_steps}"] + [
        f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}" for k in keys if k in metrics
    ]
    if metrics.get("skipped_steps"):
        parts.append(f"skipped_steps {metrics['skipped_steps']}")
    if "tokens_per_s" in metrics:
        target = metrics.get("throughput/target_tokens_per_s", metrics["tokens_per_s"])
        parts.append(f"{human(metrics['tokens_per_s'])} tok/s ({human(target)} target)")
        parts.append(f"MFU {100 * metrics.get('throughput/mfu', 0.0):.3g}%")
    if "memory/peak_gb" in metrics:
        parts.append(f"peak mem {human_bytes(metrics['memory/peak_gb'] * 1e9)}")
    eta = f" | ETA {human_duration(eta_s)}" if eta_s is not None else ""
    parts.append(f"{time.strftime('%H:%M:%S')} | elapsed {human_duration(elapsed_s)}{eta}")
    if metrics.get("spike/loss") or metrics.get("spike/grad_norm"):
        parts.append(f"SPIKE ({metrics['spike/action']})")
    return " | ".join(parts)


def eval_line(step: int, metrics: dict[str, Any]) -> str:
    """The downstream evaluation for the console: each task's figures (with their stderr), the files'
    perplexities and the time it took."""
    parts = []
    for key, value in metrics.items():
        if key.startswith("eval/") and "_stderr" not in key and key != "eval/time_s":
            stderr = metrics.get(key + "_stderr")
            parts.append(f"{key[5:]} {value:.4g}" + (f" ± {stderr:.2g}" if stderr else ""))
    return f"eval at step {step}: " + " | ".join(parts) + f" | {metrics['eval/time_s']:.1f} s"


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
    """A short continuation of prompt (temperature 0.8, top-k 50), seeded for repeatability; it stops
    at the tokenizer's stop ids (eos and its family's end-of-turn tokens), or eos."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        torch.tensor([ids], device=device), n_tokens, temperature=0.8, top_k=50, generator=generator,
        eos_id=getattr(tokenizer, "stop_ids", tokenizer.eot_id),
    )  # fmt: skip
    return tokenizer.decode(out[0].tolist())
