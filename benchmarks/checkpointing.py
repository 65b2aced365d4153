"""Activation checkpointing: peak activation memory and step time for every mode and interval.

    python -m benchmarks.checkpointing [--n-layer 12 --n-embd 128 --seq-len 128 --batch 4 ...]

One forward + backward of a GPT per setting, in fp32:

- none; `full` with model.activation_checkpointing_every = k for k = 1..L (blocks 0, k, 2k, ...
  are wrapped, one checkpoint each, the others keep everything); `attention` and `mlp`
  (selective, every block);
- `segment` k = 2..L (benchmark only, not a harness mode): one checkpoint around each run of k
  consecutive blocks, so only every k-th block's input is kept and backward recomputes a
  whole segment at a time. This is the textbook scheme ("checkpoint every 3rd layer") that
  the sqrt(L) rule is about; segment k = 1 is full k = 1.

Peak activation memory is the high-water mark of allocated bytes above what was allocated
before the step (weights and gradient buffers, which exist from the warm-up step): on CUDA
torch.cuda.max_memory_allocated, on CPU the allocation / free events of the PyTorch profiler
(profile_memory=True), summed in time order. Both include the recomputed activations that
backward rebuilds, and the temporaries. Step time is the median of --repeats un-profiled steps
after one warm-up, timed in rounds over all settings; on the CPU one thread by default
(--threads), which is steadier than several when other work shares the machine.

The model column predicts the activation memory relative to none from two sizes measured once
(bytes autograd saves for one block, A, and its input, I = B T C x 4 bytes) and what each
scheme keeps: every-k-th with c checkpointed blocks keeps (L - c) A + c I, plus one block's A
while backward recomputes it; segments of k keep ceil(L/k) I + k A. With I = A (one stored
vector per layer, the textbook network) segments are best at k = sqrt(L); a transformer block
saves many times its input (16x in the default shape), so the best length is sqrt(L I / A).

The figures go to --out (default benchmarks/results/checkpointing.json) as one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import statistics
import time
from typing import Any

import torch
from torch import nn

from benchmarks import write_report
from trainer.config import ModelConfig
from trainer.model import GPT
from trainer.model.checkpointing import CheckpointWrapper, apply_activation_checkpointing

MB = 2**20


class Segment(nn.Module):
    """k consecutive blocks run as one unit, so one checkpoint can cover all of them."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, *args)  # rope, mask, cache: as GPT.forward passes them to each block
        return x


def build(base: ModelConfig, mode: str, k: int, device: torch.device) -> tuple[GPT, list[int]]:
    """The model for one setting and the indices of the blocks whose forward is recomputed."""
    torch.manual_seed(0)
    if mode == "segment":
        model = GPT(base)
        blocks = list(model.blocks)
        model.blocks = nn.ModuleList(CheckpointWrapper(Segment(blocks[i : i + k])) for i in range(0, len(blocks), k))
        return model.to(device), list(range(base.n_layer))
    cfg = dataclasses.replace(base, activation_checkpointing=mode, activation_checkpointing_every=k)
    model = GPT(cfg)
    apply_activation_checkpointing(model, cfg)
    blocks = list(range(0, cfg.n_layer, k)) if mode != "none" else []
    return model.to(device), blocks


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model(x, targets=y).backward()  # gradients accumulate into the buffers the warm-up made


def peak_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """High-water mark of allocated bytes during one forward + backward, above the start."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(model, x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, x, y)
    # "[memory]" events carry +bytes on allocation and -bytes on free.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Wall time of one forward + backward."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(model, x, y)
    if x.device.type == "cuda":
        torch.cuda.synchronize()  # host sync: the step's kernels are done
    return time.perf_counter() - start


def saved_bytes(module: nn.Module, *inputs: Any) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(storages.values())


def block_sizes(base: ModelConfig, batch: int, seq_len: int, device: torch.device) -> dict[str, int]:
    """A = bytes one block saves, its attention and MLP parts, and I = one block's input."""
    from trainer.model.gpt import Block, rope_cos_sin

    block = Block(base).to(device)
    x = torch.randn(batch, seq_len, base.n_embd, device=device, requires_grad=True)
    rope = rope_cos_sin(base, seq_len, device) if base.position == "rope" else None
    h = torch.randn_like(x, requires_grad=True)
    return {
        "block": saved_bytes(block, x, rope),
        "attn": saved_bytes(block.attn, h, rope),
        "mlp": saved_bytes(block.mlp, h),
        "input": x.numel() * x.element_size(),
    }


def model_memory(mode: str, k: int, n_layer: int, sizes: dict[str, int]) -> float:
    """Predicted block activation memory relative to none (see the module docstring)."""
    L, A, inp = n_layer, sizes["block"], sizes["input"]
    if mode == "none":
        kept = L * A
    elif mode == "full":
        c = math.ceil(L / k)
        kept = (L - c) * A + c * inp + A
    elif mode == "segment":
        kept = math.ceil(L / k) * inp + k * A
    else:  # selective: the part's saved tensors become its input, plus one part recomputed
        part = sizes["attn" if mode == "attention" else "mlp"]
        kept = L * (A - part + inp) + part
    return kept / (L * A)


def flops_fraction(base: ModelConfig, seq_len: int, mode: str) -> float:
    """Share of the forward FLOPs that one recomputed block (or its part) redoes, per block."""
    C, T, V = base.n_embd, seq_len, base.vocab_size
    hidden = base.intermediate_size or 4 * C
    kv = (base.n_kv_head or base.n_head) / base.n_head
    attn = 2 * C * C * (2 + 2 * kv) + 4 * T * C  # q, o, k, v projections; scores and mix
    mlp = 2 * C * hidden * (3 if base.mlp == "swiglu" else 2)
    total = base.n_layer * (attn + mlp) + 2 * C * V  # + the head
    return {"attention": attn, "mlp": mlp}.get(mode, attn + mlp) / total


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    base = ModelConfig(
        vocab_size=args.vocab, block_size=args.seq_len, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd, dropout=0.0,
    )  # fmt: skip
    L = base.n_layer
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(device)
    settings = [("none", 1), *(("full", k) for k in range(1, L + 1)), ("attention", 1), ("mlp", 1)]
    if not args.no_segments:
        settings += [("segment", k) for k in range(2, L + 1)]
    sizes = block_sizes(base, args.batch, args.seq_len, device)

    # Memory first, one setting at a time (deterministic: the same allocations every run).
    rows, models = [], []
    for mode, k in settings:
        model, recomputed = build(base, mode, k, device)
        step(model, x, y)  # warm-up; also allocates the gradient buffers
        peak = peak_activation_bytes(model, x, y)
        models.append(model)
        rows.append({
            "mode": mode,
            "k": k,
            "checkpointed_blocks": math.ceil(L / k) if mode == "segment" else len(recomputed),
            "peak_activation_mb": peak / MB,
            "model_memory_vs_none": model_memory(mode, k, L, sizes),
            "theory_overhead_pct": 100 * len(recomputed) * flops_fraction(base, args.seq_len, mode) / 3,
        })  # fmt: skip
        print(f"  {mode:9s} k={k:2d}  peak {peak / MB:8.2f} MB", flush=True)
    # Time in rounds over all settings, so a slow spell of a shared machine hits every
    # setting alike; the median over rounds is each setting's step time.
    times: list[list[float]] = [[] for _ in settings]
    for _ in range(args.repeats):
        for model, measured in zip(models, times, strict=True):
            measured.append(step_seconds(model, x, y))
    none_s = statistics.median(times[0])
    for row, measured in zip(rows, times, strict=True):
        row["step_s"] = statistics.median(measured)
        row["step_s_all"] = measured
        row["memory_vs_none"] = row["peak_activation_mb"] / rows[0]["peak_activation_mb"]
        row["overhead_pct"] = 100 * (row["step_s"] / none_s - 1)
        row["memory_x_time"] = row["memory_vs_none"] * row["step_s"] / none_s
    harness = [r for r in rows if r["mode"] != "segment"]
    full_1 = next(r for r in rows if r["mode"] == "full" and r["k"] == 1)
    segments = [r for r in rows if r["mode"] == "segment"]
    return {
        "config": {
            **vars(args),
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "block_saved_bytes": sizes,
        "rows": rows,
        "best": min(harness, key=lambda r: r["memory_x_time"]),
        # segment k = 1 is full k = 1
        "best_segment": min([full_1, *segments], key=lambda r: r["memory_x_time"]) if segments else None,
        # ceil(L/k) I + k A is least at k = sqrt(L I / A): sqrt(L) when a layer saves only its input
        "model_best_segment_k": math.sqrt(L * sizes["input"] / sizes["block"]),
        "full_recompute_overhead_pct": full_1["overhead_pct"],
        "full_recompute_theory_pct": full_1["theory_overhead_pct"],
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| mode | k | checkpointed | peak act. MB | x none | model x none | step s | overhead % | theory % | memory x time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['k']} | {r['checkpointed_blocks']} | {r['peak_activation_mb']:.1f} | "
            f"{r['memory_vs_none']:.2f} | {r['model_memory_vs_none']:.2f} | {r['step_s']:.3f} | "
            f"{r['overhead_pct']:+.1f} | {r['theory_overhead_pct']:.1f} | {r['memory_x_time']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds over all settings (median)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-segments", action="store_true", help="skip the segment k = 2..L rows")
    p.add_argument("--out", default="benchmarks/results/checkpointing.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(
        f"activation checkpointing: L={args.n_layer} C={args.n_embd} heads={args.n_head} "
        f"T={args.seq_len} B={args.batch} vocab={args.vocab} on {args.device}, fp32"
    )
    result = run(args)
    print(table(result))
    best, f1 = result["best"], result["full_recompute_overhead_pct"]
    print(f"lowest memory x time (harness modes): {best['mode']} k={best['k']} ({best['memory_x_time']:.2f} of none)")
    if result["best_segment"]:
        s = result["best_segment"]
        rho = result["block_saved_bytes"]["input"] / result["block_saved_bytes"]["block"]
        print(
            f"lowest memory x time (segments): k={s['k']} ({s['memory_x_time']:.2f} of none); a block saves "
            f"{1 / rho:.1f}x its input, so the model's best segment is sqrt(L x {rho:.3f}) = "
            f"{result['model_best_segment_k']:.2f} blocks (sqrt(L) = {math.sqrt(args.n_layer):.2f} if it saved 1x)"
        )
    print(
        f"full recompute (full k=1): {f1:+.1f}% step time, theory {result['full_recompute_theory_pct']:.1f}% "
        "(one more forward of every block; backward ~ 2 forwards)"
    )
    write_report(args.out, result)


if __name__ == "__main__":
    main()
