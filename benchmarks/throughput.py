"""Training throughput of the harness's step against plain PyTorch and Hugging Face, one process.

    python -m benchmarks.throughput                                # 6 x 384, 6 heads, 8 x 256 tokens, vocab 320, erf GELU
    python -m benchmarks.throughput --precisions bf16 --steps 20   # one precision, longer windows
    python -m benchmarks.throughput --model gpt2 --seq-len 1024    # a shipped configs/model/*.yaml
    python -m benchmarks.throughput --n-layer 12 --n-embd 768 --n-head 12   # or change the default shape
    python -m benchmarks.throughput --out /tmp/throughput.json     # default: benchmarks/results/throughput.json
    python -m benchmarks.throughput --nanogpt ~/src/nanoGPT       # also karpathy/nanoGPT's model.py + AdamW
    python -m benchmarks.throughput --strategies ddp fsdp          # also the harness on 2 ranks (torchrun)

One model shape and one batch shape (micro batch x seq_len random tokens), four systems, each
precision given (fp32: full precision; bf16: autocast to bfloat16, fp32 weights and AdamW state):

  trainer      the harness's real step: benchmarks.harness.build_trainer (parallel=none, as the
               loop builds it) and trainer.step.train_step (gradient statistics, global norm,
               clipping, AdamW, LR schedule), deferred as the loop runs the steps between log
               steps (no host sync, trainer/step.py) where the strategy can
  trainer_compile  the same with train.compile=true (each block and the head + loss compiled);
               compile time falls in the warm-up steps
  plain_torch  the same GPT module (trainer.model.gpt.GPT) in a bare loop: forward (under
               torch.autocast for bf16), backward, AdamW step, zero_grad; no clipping, no
               statistics, no schedule: the floor of the harness's overhead
  hf_loop      transformers' GPT2LMHeadModel (GPT-2 layout) or LlamaForCausalLM (Llama layout) at
               the same shape (trainer.model.hf_import.hf_config_dict, random weights, sdpa
               attention), in the same bare loop
  hf_trainer   the same HF model under transformers.Trainer: no saving, evaluation or logging,
               max_grad_norm 1.0 and a constant LR, the same random tokens as a Dataset
  trainer_<s>  with --strategies s ...: the harness under parallel=s on --world-size ranks (this
               script under torchrun; each rank its own micro-batch), global tokens/s of rank 0's clock
  nanogpt      with --nanogpt DIR only (a checkout of karpathy/nanoGPT; not shipped here): its
               model.py's GPT at the same shape (GPT-2 layout; dropout 0) and its own
               configure_optimizers AdamW (fused on CUDA, foreach elsewhere), in the bare loop

AdamW is fused wherever torch supports it on the device (probed once), and so is the harness's
(trainer/parallel/base.py); nanoGPT picks its own: the JSON's `optimizer` says which.

Each system runs --warmup steps, then --repeats windows of --steps steps, back to back (on a
GPU the clock is read after torch.cuda.synchronize() at each window's ends only, so the host
may run ahead of the device within a window as in training). A window's tokens/s is its
micro_batch x seq_len x steps over its wall time; the figure is the median over windows,
`spread` their [min, max]. hf_trainer runs one Trainer.train() of warmup + repeats x steps
steps; a TrainerCallback stamps each step's end, so a window holds everything Trainer does
between steps (data loader, collation, its optimizer and scheduler calls). With --interleave
every system but hf_trainer is built and warmed up first, then their windows alternate (window 1
of each, then window 2, ... the order rotating), so a shared machine whose speed drifts by tens of
percent over minutes slows them alike: use it for ratios (peak memory is then not split: None).

MFU = tokens/s x FLOPs per token / peak FLOP/s: FLOPs per token from GPT.flops_per_token
(PaLM's 6N + 12 L C T, the same for every system: the same shape). The peak: on a GPU
trainer.monitor.peak_flops (the datasheet's dense bf16 figure, for fp32 too, as the loop's
MFU); on a CPU a measured 2048 x 2048 matmul rate in each precision (`peak_flops` in the
JSON), because trainer.monitor's 512 x 512 probe reads below what the step itself sustains
(MFU over 100%). Peak memory: on a GPU
torch.cuda.max_memory_allocated, reset before each system and precision; on a CPU None: the
process's peak RSS only grows over one process, so it cannot be split between systems.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import write_report

SYSTEMS = ("trainer", "trainer_compile", "plain_torch", "hf_loop", "hf_trainer", "nanogpt")
DEFAULT_SYSTEMS = ("trainer", "plain_torch", "hf_loop", "hf_trainer")  # + nanogpt with --nanogpt
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
LR = 1e-3  # every optimizer: a real update each step (OptimConfig's default lr)
WEIGHT_DECAY = 0.1


# -- the shape ------------------------------------------------------------------------------------


def model_config(args: argparse.Namespace) -> Any:
    """The ModelConfig measured: a shipped configs/model/<name>.yaml, or nanoGPT's shakespeare-char
    shape by default; --n-layer / --n-embd / --n-head / --vocab-size override either."""
    from trainer.config import ModelConfig

    if args.model:
        from trainer.__main__ import compose_config

        cfg = compose_config([f"model={args.model}"])[0].model
    else:  # block_size is the context: the default shape's learned positions cover seq_len
        # nanoGPT's function too: erf GELU (nn.GELU), not GPT-2's tanh approximation
        cfg = ModelConfig(name="shakespeare-char", n_layer=6, n_embd=384, n_head=6, vocab_size=320,
                          block_size=args.seq_len, mlp="gelu_exact")  # fmt: skip
    flags = {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head, "vocab_size": args.vocab_size,
             "mlp": args.mlp}  # fmt: skip
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})  # __post_init__ checks again
    if args.seq_len > cfg.block_size:
        raise SystemExit(f"--seq-len {args.seq_len} is longer than model {cfg.name!r}'s block_size {cfg.block_size}")
    return cfg


def random_batch(args: argparse.Namespace, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (B, T): next-token pairs from one fixed random sequence per row (seeded)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(vocab_size, (args.micro_batch, args.seq_len + 1), generator=generator)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def fused_adamw(device: torch.device) -> bool:
    """Whether torch's fused AdamW runs on this device (one tiny step to find out)."""
    try:
        p = torch.nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best-of-`repeats` rate of an n x n matmul in dtype on the CPU, in each precision (bf16 runs
    on its own units where the CPU has them); trainer.monitor's measured_matmul_flops is the
    run's fp32 MFU peak. n is large enough to be compute-bound where the CPU computes fast (a
    512 x 512 one read 0.16-0.25 TFLOP/s on an earlier machine, below what the model's own step
    sustained). A CPU without bf16 units emulates it at ~1 GFLOP/s (one 1024 matmul took 2.4 s on
    this project's 2-core AMD EPYC machine), so the size grows from 256 up to n only while one
    matmul takes under 50 ms: such a rate is the same at any size."""
    size = 256
    while True:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        start = time.perf_counter()
        a @ b  # warm up
        if size >= n or time.perf_counter() - start > 0.05:
            break
        size *= 2
    n = size
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops_by_precision(device: torch.device, precisions: list[str]) -> dict[str, float]:
    """Peak FLOP/s for MFU: a GPU's datasheet dense bf16 figure for every precision
    (trainer.monitor.peak_flops, as the loop's MFU); on a CPU each precision's measured rate."""
    from trainer.monitor import peak_flops

    if device.type == "cuda":
        return dict.fromkeys(precisions, peak_flops(device, None))
    return {p: matmul_flops(DTYPES[p] or torch.float32) for p in precisions}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # host sync: the clock is read after the device's work is done


# -- the four systems: each returns the wall time at the end of every step (after warm-up's start)


def time_loop(step: Callable[[], None], n_steps: int, device: torch.device, every: int = 1) -> list[float]:
    """Run step n_steps times; the clock at the start and after each step. The device is waited
    for only after steps whose count is a multiple of `every` (the windows' ends): between them
    the stamps are the host's and the host may run ahead, as in training."""
    sync(device)
    stamps = [time.perf_counter()]
    for i in range(1, n_steps + 1):
        step()
        if i % every == 0 or i == n_steps:
            sync(device)
        stamps.append(time.perf_counter())
    return stamps


def window_ends(args: argparse.Namespace) -> int:
    """time_loop's `every`: steps between the device waits (warm-up and windows line up with it
    when --warmup is a multiple of --steps; otherwise every step)."""
    return args.steps if args.warmup % args.steps == 0 else 1


Step = Callable[[], None]  # one training step of a system


def make_trainer(
    cfg: Any, precision: str, args: argparse.Namespace, device: torch.device, compile: bool = False
) -> tuple[Step, str]:
    """The harness's strategy and model (build_trainer) stepping through trainer.step.train_step."""
    from benchmarks.harness import build_trainer
    from trainer.config import Config, ParallelConfig, PrecisionConfig, TrainConfig
    from trainer.step import train_step

    config = Config(
        model=cfg, parallel=ParallelConfig(strategy="none"), precision=PrecisionConfig(dtype=precision),
        train=TrainConfig(micro_batch_size=args.micro_batch, seq_len=args.seq_len, device=device.type,
                          max_steps=10_000, compile=compile),  # the LR schedule's length; never reached
    )  # fmt: skip
    strategy, _ = build_trainer(config, seed=0)
    x, y = random_batch(args, cfg.vocab_size, strategy.device)
    clip, defer = config.optim.clip_grad_norm, strategy.steps_without_sync

    def step() -> None:
        train_step(strategy, x, y, 1, clip, defer=defer, all_targets=True)  # random tokens: no masked target

    kind = "fused" if strategy.optimizer.defaults.get("fused") else "foreach"
    return step, kind + (", deferred" if defer else "")


def plain_loop(model: torch.nn.Module, loss_of: Callable, precision: str, device: torch.device,
               fused: bool) -> Step:  # fmt: skip
    """forward (autocast for bf16), backward, AdamW, zero_grad: nothing else."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=fused or None)
    dtype = DTYPES[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = loss_of(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_plain_torch(cfg: Any, precision: str, args: argparse.Namespace, device: torch.device, fused: bool) -> Step:
    """The same GPT module, built directly on the device, in the bare loop."""
    from trainer.model.gpt import GPT

    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    x, y = random_batch(args, cfg.vocab_size, device)
    n_targets = y.numel()
    return plain_loop(model, lambda m: m(x, targets=y) / n_targets, precision, device, fused)


def make_nanogpt(cfg: Any, precision: str, args: argparse.Namespace, device: torch.device) -> tuple[Step, str]:
    """karpathy/nanoGPT's model.py (from --nanogpt DIR) and its own AdamW, in a bare loop like
    plain_loop's: forward (autocast for bf16) returning (logits, loss), backward, step, zero_grad."""
    import importlib.util

    if cfg.position != "learned" or cfg.norm != "layernorm" or cfg.mlp != "gelu_exact" or not cfg.tie_embeddings:
        raise SystemExit(
            "--systems nanogpt: nanoGPT is the GPT-2 layout with erf GELU only (the default shape, or --mlp gelu_exact "
            "with a GPT-2 shaped --model)"
        )
    spec = importlib.util.spec_from_file_location("nanogpt_model", args.nanogpt / "model.py")
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count
        spec.loader.exec_module(module)
        config = module.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                                  n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias)  # fmt: skip
        torch.manual_seed(0)
        model = module.GPT(config).to(device).train()
        optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, (0.9, 0.95), device.type)
    x, y = random_batch(args, cfg.vocab_size, device)
    dtype = DTYPES[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, "fused" if optimizer.defaults.get("fused") else "foreach"


def hf_model(cfg: Any, device: torch.device) -> torch.nn.Module:
    """GPT2LMHeadModel or LlamaForCausalLM at cfg's shape, random weights, built locally."""
    import transformers

    from trainer.model.hf_import import hf_config_dict

    fields = hf_config_dict(cfg)
    model_type = fields.pop("model_type")
    fields.pop("architectures")
    # GPT2Config's default bos / eos ids (50256) lie outside a small vocabulary: none here
    fields.update(bos_token_id=None, eos_token_id=None)
    config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.train()


def make_hf_loop(cfg: Any, precision: str, args: argparse.Namespace, device: torch.device, fused: bool) -> Step:
    """The HF model in the bare loop (labels = inputs: HF shifts them itself)."""
    model = hf_model(cfg, device)
    x, _ = random_batch(args, cfg.vocab_size, device)
    return plain_loop(model, lambda m: m(input_ids=x, labels=x).loss, precision, device, fused)


def make_step(system: str, cfg: Any, precision: str, args: argparse.Namespace, device: torch.device,
              fused: bool) -> tuple[Step, str]:  # fmt: skip
    """One step of `system` (any but hf_trainer, which runs its own loop) and its optimizer's kind."""
    if system in ("trainer", "trainer_compile"):
        return make_trainer(cfg, precision, args, device, compile=system == "trainer_compile")
    if system == "nanogpt":
        return make_nanogpt(cfg, precision, args, device)
    maker = {"plain_torch": make_plain_torch, "hf_loop": make_hf_loop}[system]
    return maker(cfg, precision, args, device, fused), "fused" if fused else "foreach"


def run_hf_trainer(
    cfg: Any, precision: str, args: argparse.Namespace, device: torch.device, fused: bool
) -> list[float]:
    """The HF model under transformers.Trainer: one train() of warmup + repeats x steps steps."""
    import transformers

    n_steps = args.warmup + args.repeats * args.steps
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (args.micro_batch * n_steps, args.seq_len), generator=generator)
    dataset = [{"input_ids": row, "labels": row} for row in tokens]

    class Stamps(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_begin(self, targs, state, control, **kwargs):  # noqa: ANN001, ANN201
            if not self.stamps:
                sync(device)
                self.stamps.append(time.perf_counter())

        def on_step_end(self, targs, state, control, **kwargs):  # noqa: ANN001, ANN201
            sync(device)
            self.stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as out_dir:
        targs = transformers.TrainingArguments(
            output_dir=out_dir, max_steps=n_steps, per_device_train_batch_size=args.micro_batch,
            learning_rate=LR, weight_decay=WEIGHT_DECAY, lr_scheduler_type="constant", max_grad_norm=1.0,
            optim="adamw_torch_fused" if fused else "adamw_torch", bf16=precision == "bf16",
            use_cpu=device.type == "cpu", save_strategy="no", eval_strategy="no", logging_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )  # fmt: skip
        probe = Stamps()
        trainer = transformers.Trainer(model=hf_model(cfg, device), args=targs, train_dataset=dataset,
                                       callbacks=[probe])  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):  # its end-of-train metrics line: stdout keeps the table
            trainer.train()
        if precision == "bf16" and trainer.accelerator.mixed_precision != "bf16":
            raise RuntimeError(f"hf_trainer: bf16=True gave mixed precision {trainer.accelerator.mixed_precision!r}")
    if len(probe.stamps) != n_steps + 1:
        raise RuntimeError(f"hf_trainer: {len(probe.stamps) - 1} step ends seen, {n_steps} expected")
    return probe.stamps


# -- figures --------------------------------------------------------------------------------------


def window_rates(stamps: list[float], args: argparse.Namespace) -> list[float]:
    """tokens/s of each of the --repeats windows of --steps steps after --warmup steps."""
    tokens = args.micro_batch * args.seq_len * args.steps
    starts = [args.warmup + i * args.steps for i in range(args.repeats)]
    return [tokens / (stamps[s + args.steps] - stamps[s]) for s in starts]


def summarize(rates: list[float], flops_per_token: int, peak: float, peak_mem: int | None) -> dict[str, Any]:
    tokens_per_s = statistics.median(rates)
    return {
        "tokens_per_s": tokens_per_s,
        "spread": [min(rates), max(rates)],
        "mfu": tokens_per_s * flops_per_token / peak if peak else None,
        "peak_mem_bytes": peak_mem,
        "windows_tokens_per_s": rates,
    }


def measure(system: str, cfg: Any, precision: str, args: argparse.Namespace, device: torch.device,
            fused: bool) -> tuple[list[float], int | None, str]:  # fmt: skip
    """Run one system at one precision: (step stamps, peak bytes on a GPU else None, optimizer kind)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if system == "hf_trainer":
        stamps, kind = run_hf_trainer(cfg, precision, args, device, fused), "fused" if fused else "foreach"
    else:
        step, kind = make_step(system, cfg, precision, args, device, fused)
        stamps = time_loop(step, args.warmup + args.repeats * args.steps, device, window_ends(args))
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    gc.collect()
    return stamps, peak_mem, kind


STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
SHAPE_FLAGS = ("model", "n_layer", "n_embd", "n_head", "vocab_size", "mlp", "seq_len", "micro_batch")


def measure_strategy(strategy: str, precision: str, args: argparse.Namespace, device: torch.device) -> dict:
    """--strategies: the harness under `strategy` on --world-size ranks (this script under
    torchrun, each rank its own micro-batch: global batch = micro_batch x ranks); rank 0's
    windows in global tokens/s and its optimizer kind. Peak memory: rank 0's on a GPU."""
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        out = Path(tmp) / "rank0.json"
        flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SHAPE_FLAGS if getattr(args, k) is not None]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world_size}",
                   "-m", "benchmarks.throughput", "--worker", strategy, "--precisions", precision, *flags,
                   f"--warmup={args.warmup}", f"--steps={args.steps}", f"--repeats={args.repeats}",
                   f"--device={device.type}", f"--out={out}"]  # fmt: skip
        path = os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"--strategies {strategy}: torchrun exited {result.returncode}\n{result.stderr[-4000:]}")
        return json.loads(out.read_text())


def strategy_worker(args: argparse.Namespace) -> None:
    """One rank of measure_strategy: build_trainer under --worker's strategy, train_step in windows."""
    from benchmarks.harness import build_trainer
    from trainer.config import Config, ParallelConfig, PrecisionConfig, TrainConfig
    from trainer.step import train_step

    cfg, precision = model_config(args), args.precisions[0]
    config = Config(
        model=cfg, parallel=ParallelConfig(strategy=args.worker), precision=PrecisionConfig(dtype=precision),
        train=TrainConfig(micro_batch_size=args.micro_batch, seq_len=args.seq_len, device=args.device,
                          max_steps=10_000),
    )  # fmt: skip
    strategy, _ = build_trainer(config, seed=0)
    x, y = random_batch(args, cfg.vocab_size, strategy.device)
    defer = strategy.steps_without_sync

    def step() -> None:
        train_step(strategy, x, y, 1, config.optim.clip_grad_norm, defer=defer, all_targets=True)

    stamps = time_loop(step, args.warmup + args.repeats * args.steps, strategy.device, window_ends(args))
    rates = [rate * strategy.world_size for rate in window_rates(stamps, args)]  # every rank's tokens
    peak = torch.cuda.max_memory_allocated(strategy.device) if strategy.device.type == "cuda" else None
    kind = "fused" if getattr(strategy.optimizer, "defaults", {}).get("fused") else "foreach"
    if strategy.rank == 0:
        report = {"rates": rates, "optimizer": kind + (", deferred" if defer else ""), "peak_mem_bytes": peak}
        args.out.write_text(json.dumps(report))
    strategy.close()


def measure_interleaved(systems: list[str], cfg: Any, precision: str, args: argparse.Namespace,
                        device: torch.device, fused: bool) -> dict[str, tuple[list[float], str]]:  # fmt: skip
    """--interleave: every system built first and warmed up, then window r of each in turn (the
    order rotating by one each round), so a machine whose speed drifts slows all of them alike.
    Returns each system's window rates and optimizer kind (peak memory: not split, None)."""
    steps = {system: make_step(system, cfg, precision, args, device, fused) for system in systems}
    for step, _ in steps.values():
        time_loop(step, args.warmup, device, args.warmup)
    rates: dict[str, list[float]] = {system: [] for system in systems}
    tokens = args.micro_batch * args.seq_len * args.steps
    for r in range(args.repeats):
        for system in systems[r % len(systems) :] + systems[: r % len(systems)]:
            stamps = time_loop(steps[system][0], args.steps, device, args.steps)
            rates[system].append(tokens / (stamps[-1] - stamps[0]))
    return {system: (rates[system], steps[system][1]) for system in systems}


def markdown_table(systems: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| system | precision | tokens/s | min-max | vs trainer | MFU % | peak mem MB | optimizer |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for system, by_precision in systems.items():
        for precision, r in by_precision.items():
            base = systems.get("trainer", {}).get(precision)
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
            mfu = f"{100 * r['mfu']:.1f}" if r["mfu"] is not None else "-"
            mem = f"{r['peak_mem_bytes'] / 1e6:.0f}" if r["peak_mem_bytes"] is not None else "-"
            lo, hi = r["spread"]
            lines.append(
                f"| {system} | {precision} | {r['tokens_per_s']:,.0f} | {lo:,.0f}-{hi:,.0f} | {ratio} | {mfu} | "
                f"{mem} | {r['optimizer']} |"
            )
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else platform.processor()."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def machine(device: torch.device) -> dict[str, Any]:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "transformers": transformers.__version__, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "platform": platform.platform(), "tf32": device.type == "cuda",
    }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a configs/model/*.yaml (tiny, gpt2, llama-1b, ...)")
    parser.add_argument("--n-layer", type=int, default=None)
    parser.add_argument("--n-embd", type=int, default=None)
    parser.add_argument("--n-head", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--mlp", default=None, choices=["gelu", "gelu_exact", "swiglu"], help="model.mlp")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the first window, not timed")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per system and precision")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument(
        "--systems",
        nargs="+",
        default=None,
        choices=SYSTEMS,
        help=f"default: {' '.join(DEFAULT_SYSTEMS)} (+ nanogpt with --nanogpt)",
    )
    parser.add_argument("--nanogpt", type=Path, default=None, help="a karpathy/nanoGPT checkout (its model.py)")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=[],
        choices=STRATEGIES,
        help="also the harness under these strategies, on --world-size ranks under torchrun",
    )
    parser.add_argument("--world-size", type=int, default=2, help="ranks for --strategies")
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="alternate the systems' windows (all but hf_trainer): fair ratios on a noisy machine",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args(argv)
    if args.systems is None:
        args.systems = [*DEFAULT_SYSTEMS, *(["nanogpt"] if args.nanogpt else [])]
    if "nanogpt" in args.systems and (args.nanogpt is None or not (args.nanogpt / "model.py").is_file()):
        parser.error("--systems nanogpt needs --nanogpt DIR, a karpathy/nanoGPT checkout holding model.py")
    return args


def main(argv: list[str] | None = None) -> None:
    from trainer.model.gpt import GPT

    args = parse_args(argv)
    if args.worker:
        return strategy_worker(args)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda":  # the loop's default (train.tf32=true), for every system alike
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = model_config(args)
    with torch.device("meta"):
        meta = GPT(cfg)
    flops_per_token = meta.flops_per_token(args.seq_len)
    peaks = peak_flops_by_precision(device, args.precisions)
    fused = fused_adamw(device)
    shape = {
        **{k: getattr(cfg, k) for k in ("name", "n_layer", "n_embd", "n_head", "vocab_size", "block_size")},
        "layout": "llama" if cfg.position == "rope" else "gpt2", "n_params": meta.num_params(),
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "tokens_per_step": args.micro_batch * args.seq_len,
        "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "flops_per_token": flops_per_token,
    }  # fmt: skip
    print(
        f"{cfg.name}: {cfg.n_layer} x {cfg.n_embd}, {cfg.n_head} heads, vocab {cfg.vocab_size}, "
        f"{shape['n_params'] / 1e6:.2f}M params; {args.micro_batch} x {args.seq_len} tokens per step; "
        f"{device}, {torch.get_num_threads()} threads; peak TFLOP/s "
        f"{', '.join(f'{p} {v / 1e12:.3f}' for p, v in peaks.items())}; "
        f"{args.warmup} warm-up + {args.repeats} x {args.steps} steps per system"
    )
    started = time.perf_counter()
    systems: dict[str, dict[str, dict[str, Any]]] = {}
    for precision in args.precisions:
        together = [s for s in args.systems if s != "hf_trainer"] if args.interleave else []
        measured = measure_interleaved(together, cfg, precision, args, device, fused) if together else {}
        for system in args.systems:
            if system in measured:
                rates, kind = measured[system]
                result = summarize(rates, flops_per_token, peaks[precision], None)
            else:
                stamps, peak_mem, kind = measure(system, cfg, precision, args, device, fused)
                result = summarize(window_rates(stamps, args), flops_per_token, peaks[precision], peak_mem)
            result.update(optimizer=kind, compile=system == "trainer_compile", interleaved=system in measured)
            systems.setdefault(system, {})[precision] = result
            print(f"  {system} {precision}: {result['tokens_per_s']:,.0f} tokens/s", flush=True)
        for strategy in args.strategies:  # global tokens/s of --world-size ranks (MFU against their peaks)
            row = measure_strategy(strategy, precision, args, device)
            peak = peaks[precision] * (args.world_size if device.type == "cuda" else 1)  # CPU ranks share cores
            result = summarize(row["rates"], flops_per_token, peak, row["peak_mem_bytes"])
            result.update(optimizer=row["optimizer"], compile=False, interleaved=False, ranks=args.world_size)
            systems.setdefault(f"trainer_{strategy}", {})[precision] = result
            print(f"  trainer_{strategy} {precision}: {result['tokens_per_s']:,.0f} tokens/s", flush=True)
    print()
    print(markdown_table(systems))
    report = {
        "machine": machine(device), "shape": shape, "peak_flops": peaks, "systems": systems,
        "peak_mem_note": None if device.type == "cuda" else "CPU: not measured (peak RSS is per process)",
        "elapsed_s": time.perf_counter() - started,
    }  # fmt: skip
    write_report(args.out, report, f"({report['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
