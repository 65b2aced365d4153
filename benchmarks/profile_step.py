"""Where a training step's time goes, and whether the steps between log steps wait for the host.

    python -m benchmarks.profile_step                                   # the default shape, on this machine
    python -m benchmarks.profile_step --model gpt2 --seq-len 1024 --micro-batch 16 --compile
    python -m benchmarks.profile_step --out /tmp/profile.json           # default: benchmarks/results/profile_step.json

The harness's step (benchmarks.harness.build_trainer, parallel=none, trainer.step.train_step) as
the loop runs it between log steps: deferred where the strategy can (no host sync), then one
synchronous step, as a log step is. Two measurements:

  top kernels   torch.profiler over --steps deferred steps after --warmup: the --top operators
                by self device time (CUDA kernels on a GPU, CPU operators on the CPU), with
                their share of the profiled time and call counts
  host syncs    on a GPU, the same deferred steps under torch.cuda.set_sync_debug_mode("warn"):
                every operation that makes the host wait for the device is a warning, counted
                and listed (the goal: none between log steps); None on the CPU (nothing to wait for)

Prints a table and writes JSON: {"machine", "shape", "top_kernels": [...], "host_syncs": {...}}.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks import write_report
from benchmarks.throughput import machine, model_config, random_batch, sync


def build(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """(strategy, model config, x, y): the harness at the shape asked for."""
    from benchmarks.harness import build_trainer
    from trainer.config import Config, ParallelConfig, PrecisionConfig, TrainConfig

    cfg = model_config(args)
    config = Config(
        model=cfg, parallel=ParallelConfig(strategy="none"), precision=PrecisionConfig(dtype=args.precision),
        train=TrainConfig(micro_batch_size=args.micro_batch, seq_len=args.seq_len, device=device.type,
                          max_steps=10_000, compile=args.compile),
    )  # fmt: skip
    strategy, _ = build_trainer(config, seed=0)
    x, y = random_batch(args, cfg.vocab_size, device)
    return strategy, cfg, x, y


def top_kernels(profile: Any, device: torch.device, top: int) -> list[dict[str, Any]]:
    """The operators with the most self time on the device (CPU: on the host), largest first."""
    on_gpu = device.type == "cuda"
    events = [e for e in profile.key_averages() if (e.self_device_time_total if on_gpu else e.self_cpu_time_total) > 0]
    seconds = [(e.self_device_time_total if on_gpu else e.self_cpu_time_total) / 1e6 for e in events]
    total = sum(seconds) or 1.0
    ranked = sorted(zip(events, seconds, strict=True), key=lambda pair: -pair[1])[:top]
    return [{"name": e.key, "self_s": s, "share": s / total, "calls": e.count} for e, s in ranked]


def count_syncs(step: Any, n_steps: int, device: torch.device) -> dict[str, Any] | None:
    """Host syncs in n_steps deferred steps (CUDA only): set_sync_debug_mode's warnings."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n_steps):
                step(True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"steps": n_steps, "count": len(messages), "first": sorted(set(messages))[:10]}


def main(argv: list[str] | None = None) -> None:
    from torch.profiler import ProfilerActivity, profile

    from trainer.step import train_step

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--model", "--n-layer", "--n-embd", "--n-head", "--vocab-size", "--mlp"):
        parser.add_argument(flag, default=None, type=None if flag in ("--model", "--mlp") else int)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="train.compile=true")
    parser.add_argument("--warmup", type=int, default=3, help="steps before profiling (compile falls here)")
    parser.add_argument("--steps", type=int, default=5, help="deferred steps profiled (and checked for syncs)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_step.json"))
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    strategy, cfg, x, y = build(args, device)
    clip, deferrable = 1.0, strategy.steps_without_sync

    def step(defer: bool) -> Any:
        return train_step(strategy, x, y, 1, clip, defer=defer and deferrable, all_targets=True)

    for _ in range(args.warmup):
        step(False)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step(True)
        step(False).settle()  # a log step: the one sync
        sync(device)
    seconds = time.perf_counter() - started
    kernels = top_kernels(prof, device, args.top)
    syncs = count_syncs(step, args.steps, device)
    step(False)
    report = {
        "machine": machine(device), "compile": args.compile, "precision": args.precision, "deferred": deferrable,
        "shape": {"name": cfg.name, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
                  "seq_len": args.seq_len, "micro_batch": args.micro_batch},
        "profiled_steps": args.steps + 1, "profiled_s": seconds, "top_kernels": kernels, "host_syncs": syncs,
    }  # fmt: skip
    print(f"{cfg.name} {args.precision}{' compiled' if args.compile else ''} on {device}: {args.steps} deferred "
          f"steps + 1 log step profiled in {seconds:.2f} s (deferred steps: {deferrable})")  # fmt: skip
    print("| operator | self s | share % | calls |\n|---|---:|---:|---:|")
    for k in kernels:
        print(f"| {k['name'][:70]} | {k['self_s']:.4f} | {100 * k['share']:.1f} | {k['calls']} |")
    if syncs is not None:
        print(f"host syncs in {syncs['steps']} deferred steps: {syncs['count']} {syncs['first']}")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
